"""Train-time augmentation on the stored low-resolution crops, as one UDP affine per sample.

A shard row holds a crop whose central ``1 / margin`` is the padded person box
(docs/architecture.md, "Shard format"). :func:`sample_transform` draws the
augmentation in crop pixels and returns a single ``(2, 3)`` affine from crop
pixels to input pixels; :func:`warp_sample` applies it to the pixels (one
``cv2.warpAffine``, bilinear) and to the keypoints with the same matrix, so
image and labels can never disagree. With no augmentation the matrix maps the
padded box exactly onto the input (UDP: ``geometry.warp_matrix``).

What is drawn, following the authors' HRNet-based code
(``lib/dataset/JointsDataset.py`` with ``experiments/coco/hrnet/*.yaml`` of
ilovepose/Low-resolution-human-pose; the paper states only the ranges):

- half body, p = 0.3, only when more than 8 joints are labelled: the box
  becomes the upper-body joints (chosen when a standard normal draw is < 0.5,
  i.e. ~69%, and more than 2 upper joints are labelled) or else the lower-body
  joints (if more than 2), aspect-corrected and enlarged x1.5;
- scale ``s = clip(N(1, 0.35), 0.65, 1.35)`` on the box size;
- rotation with p = 0.6: ``r = clip(N(0, 45), -90, 90)`` degrees, else 0
  (so "+-45" is the standard deviation, not a hard bound);
- horizontal flip, p = 0.5: mirror ``x -> (W_crop - 1) - x`` (UDP) and swap
  left/right joints (``skeleton.FLIP_INDEX``).

Pixels the transform pulls from outside the stored crop are filled with zeros,
as HRNet's ``warpAffine`` does outside the image. Joints that land outside
the input lose their label (visibility 0), so no codec trains on them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import cv2
import numpy as np

from cal_core.geometry import warp_coefficients, warp_matrix
from cal_core.skeleton import FLIP_INDEX, LOWER_BODY, UPPER_BODY


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation probabilities and ranges (defaults: the authors' COCO settings)."""

    flip_prob: float = 0.5
    half_body_prob: float = 0.3
    half_body_min_joints: int = 8  # half body needs MORE labelled joints than this
    half_body_enlarge: float = 1.5
    scale_factor: float = 0.35
    rotation_factor: float = 45.0
    rotation_prob: float = 0.6


_FLIP = np.asarray(FLIP_INDEX)


def crop_box(crop_wh: tuple[int, int], margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre and ``(w, h)`` in crop pixels of the padded person box: the central ``1 / margin``.

    UDP: a crop of ``W`` pixels spans ``W - 1`` units, so the box is ``(W - 1) / margin`` wide.
    """
    if margin < 1:
        raise ValueError(f"margin must be >= 1, got {margin}")
    span = np.array([crop_wh[0] - 1.0, crop_wh[1] - 1.0])
    return span / 2.0, span / margin


def half_body_box(
    keypoints: np.ndarray, labelled: np.ndarray, aspect_wh: float, enlarge: float, upper_first: bool
) -> tuple[np.ndarray, np.ndarray] | None:
    """Box (centre, ``(w, h)``) around the upper or lower body's labelled joints, or None if too few.

    The upper body is used when ``upper_first`` and it has more than 2 labelled
    joints, else the lower body when it has more than 2, else the upper body; a
    selection with fewer than 2 joints gives None. The extent (+1 px) is grown
    to ``aspect_wh`` and enlarged by ``enlarge``. The authors' +1 is one
    full-resolution pixel (HRNet's inclusive count; UDP-Pose adds none); here
    it is one crop pixel, 2-3 image pixels at 64x48: on an extent of a few
    tens of crop pixels the box is a few percent larger than theirs. Kept:
    the benchmarks in docs/results.md were trained with it.
    """
    upper = [k for k in UPPER_BODY if labelled[k]]
    lower = [k for k in LOWER_BODY if labelled[k]]
    chosen = upper if (upper_first and len(upper) > 2) or len(lower) <= 2 else lower
    if len(chosen) < 2:
        return None
    pts = keypoints[chosen]
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    w, h = hi - lo + 1.0
    if w > aspect_wh * h:
        h = w / aspect_wh
    else:
        w = h * aspect_wh
    return pts.mean(axis=0), np.array([w, h]) * enlarge


def udp_affine(
    center: tuple[float, float],
    size_wh: tuple[float, float],
    rotation_deg: float,
    output_wh: tuple[int, int],
    mirror_width: int | None = None,
) -> np.ndarray:
    """``geometry.warp_matrix`` after an optional UDP mirror of a ``mirror_width``-wide source.

    Equal to ``compose_affine(warp_matrix(c', size, r, out), hflip_matrix(W))``
    with ``c'`` the mirrored centre (or ``warp_matrix(c, size, r, out)`` without
    a mirror); the mirror ``x -> W - 1 - x`` is folded into the coefficients
    as floats, as this runs once per training sample.
    """
    if mirror_width is None:
        return warp_matrix(center, size_wh, rotation_deg, output_wh)
    w1 = mirror_width - 1.0
    a, b, c, d, e, f = warp_coefficients((w1 - float(center[0]), center[1]), size_wh, rotation_deg, output_wh)
    return np.array([[-a, b, c + a * w1], [-d, e, f + d * w1]])


def sample_transform(
    rng: random.Random | None,
    keypoints: np.ndarray,
    visibility: np.ndarray,
    crop_wh: tuple[int, int],
    margin: float,
    input_size: tuple[int, int],
    config: AugmentConfig | None,
) -> tuple[np.ndarray, bool]:
    """Draw one augmentation; returns the crop -> input affine and whether it mirrors.

    ``keypoints`` ``(K, 2)`` and ``visibility`` ``(K,)`` are in crop pixels;
    ``input_size`` is ``(H, W)``. ``config=None`` is evaluation: the padded box
    maps exactly onto the input and nothing is drawn from ``rng`` (which may be
    None). ``rng`` is a ``random.Random``: seeding one per sample costs a
    fraction of a numpy generator, and the loader seeds one per sample.
    """
    out_wh = (int(input_size[1]), int(input_size[0]))
    center, size = crop_box(crop_wh, margin)
    if config is None:
        return warp_matrix(center, size, 0.0, out_wh), False
    labelled = np.asarray(visibility) > 0
    if rng.random() < config.half_body_prob and labelled.sum() > config.half_body_min_joints:
        upper_first = rng.gauss(0.0, 1.0) < 0.5
        box = half_body_box(keypoints, labelled, out_wh[0] / out_wh[1], config.half_body_enlarge, upper_first)
        if box is not None:
            center, size = box
    sf, rf = config.scale_factor, config.rotation_factor
    scale = min(max(rng.gauss(1.0, sf), 1.0 - sf), 1.0 + sf)
    rotation = (
        min(max(rng.gauss(0.0, rf), -2.0 * rf), 2.0 * rf) if rng.random() < config.rotation_prob else 0.0
    )
    flip = rng.random() < config.flip_prob
    size_wh = (float(size[0]) * scale, float(size[1]) * scale)
    return udp_affine(center, size_wh, rotation, out_wh, crop_wh[0] if flip else None), flip


def warp_sample(
    crop: np.ndarray,
    keypoints: np.ndarray,
    visibility: np.ndarray,
    matrix: np.ndarray,
    flipped: bool,
    input_size: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply ``matrix`` to the crop pixels and keypoints; relabel sides if ``flipped``.

    Returns the input image ``(H, W, C)`` (one bilinear ``cv2.warpAffine``,
    zero border), keypoints ``(K, 2)`` float32 in input pixels and visibility
    ``(K,)`` where joints outside the input are set to 0.
    """
    height, width = (int(v) for v in input_size)
    image = cv2.warpAffine(
        crop, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
    )
    points = np.asarray(keypoints, dtype=np.float64) @ matrix[:, :2].T + matrix[:, 2]
    vis = np.asarray(visibility, dtype=np.float32)
    if flipped:
        points, vis = points[_FLIP], vis[_FLIP]
    inside = ((points >= 0.0) & (points <= (width - 1.0, height - 1.0))).all(axis=1)
    return image, points.astype(np.float32), np.where(inside, vis, np.float32(0.0))
