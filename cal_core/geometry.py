"""UDP-unbiased affine geometry: person box -> crop, crop <-> image, horizontal flips.

Conventions (Huang et al., "The Devil is in the Details: Delving into Unbiased
Data Processing for Human Pose Estimation", CVPR 2020, the UDP that the CAL
paper builds on): pixel centres sit on integer coordinates, so an axis of N
pixels spans N - 1 units. A crop of ``size`` source pixels therefore maps to
an output of W pixels with scale ``(W - 1) / size`` (not ``W / size``), the
crop centre lands on ``((W - 1) / 2, (H - 1) / 2)``, and a horizontal mirror
is ``x -> (W - 1) - x``. Keeping every transform in this convention is what
makes encode/decode exact and the flip test unbiased.

All matrices are ``(2, 3)`` float64 arrays acting on column vectors
``(x, y, 1)``: ``p' = M[:, :2] @ p + M[:, 2]``.
"""

from __future__ import annotations

import math

import numpy as np

from cal_core.skeleton import FLIP_INDEX

#: Box enlargement applied around a person box before cropping (HRNet/UDP: 1.25).
DEFAULT_PADDING = 1.25


def box_to_center_size(
    box_xywh: np.ndarray | tuple[float, float, float, float], aspect_wh: float, padding: float = DEFAULT_PADDING
) -> tuple[np.ndarray, np.ndarray]:
    """Centre and ``(w, h)`` in source pixels of the region to crop for a person box.

    The box ``(x, y, w, h)`` is grown along one axis until ``w / h == aspect_wh``
    (the network input's ``W / H``, so the crop is not distorted), then both sides
    are multiplied by ``padding``. Raises ``ValueError`` on a non-positive aspect
    or padding, or a box whose width or height is not positive and finite.
    """
    x, y, w, h = (float(v) for v in np.asarray(box_xywh, dtype=np.float64).reshape(4))
    if not (aspect_wh > 0 and padding > 0):
        raise ValueError(f"aspect_wh and padding must be positive, got {aspect_wh}, {padding}")
    if not (all(math.isfinite(v) for v in (x, y, w, h)) and w > 0 and h > 0):
        raise ValueError(f"box must have finite coordinates and positive width/height, got {(x, y, w, h)}")
    center = np.array([x + 0.5 * w, y + 0.5 * h])
    if w > aspect_wh * h:
        h = w / aspect_wh
    else:
        w = h * aspect_wh
    return center, np.array([w * padding, h * padding])


def warp_coefficients(
    center: np.ndarray | tuple[float, float], size_wh: np.ndarray | tuple[float, float], rotation_deg: float,
    output_wh: tuple[int, int]
) -> tuple[float, float, float, float, float, float]:
    """The six entries ``(a, b, c, d, e, f)`` of :func:`warp_matrix` as Python floats, row by row.

    For callers that fold more into the affine per sample (the training
    mirror) without a dozen small numpy calls.
    """
    out_w, out_h = output_wh
    size_w, size_h = (float(v) for v in size_wh)
    if out_w < 2 or out_h < 2 or not (size_w > 0 and size_h > 0):
        raise ValueError(f"need output >= 2x2 pixels and a positive size, got {output_wh}, {[size_w, size_h]}")
    cx, cy = (float(v) for v in center)
    theta = math.radians(rotation_deg)
    cos, sin = math.cos(theta), math.sin(theta)
    sx, sy = (out_w - 1) / size_w, (out_h - 1) / size_h
    a, b, d, e = sx * cos, sx * sin, -sy * sin, sy * cos
    return a, b, (out_w - 1) / 2.0 - a * cx - b * cy, d, e, (out_h - 1) / 2.0 - d * cx - e * cy


def warp_matrix(
    center: np.ndarray | tuple[float, float], size_wh: np.ndarray | tuple[float, float], rotation_deg: float,
    output_wh: tuple[int, int]
) -> np.ndarray:
    """``(2, 3)`` affine from source pixels to an output of ``output_wh = (W, H)`` pixels (UDP).

    The source region of ``size_wh`` pixels around ``center`` fills the output:
    ``scale = (W - 1) / size_w`` along x and ``(H - 1) / size_h`` along y, and
    ``center`` maps to ``((W - 1) / 2, (H - 1) / 2)``. A positive ``rotation_deg``
    turns the person counter-clockwise as seen on screen (y points down), the
    convention of the HRNet/UDP code: the linear part is ``diag(sx, sy) @ R(-theta)``
    with ``R(theta) = [[cos, -sin], [sin, cos]]``. ``center`` and ``size_wh``
    are pairs (tuples or 1-D arrays). Built from Python floats: it runs once
    per crop and per training sample, where a dozen small numpy calls would
    cost more than the pixel work.
    """
    a, b, c, d, e, f = warp_coefficients(center, size_wh, rotation_deg, output_wh)
    return np.array([[a, b, c], [d, e, f]])


def affine_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply the ``(2, 3)`` affine ``matrix`` to points of shape ``(..., 2)``; returns float64."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.shape[-1] != 2:
        raise ValueError(f"points must have shape (..., 2), got {pts.shape}")
    m = np.asarray(matrix, dtype=np.float64)
    return pts @ m[:, :2].T + m[:, 2]


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a ``(2, 3)`` affine (e.g. output pixels -> source pixels), in closed form.

    Raises ``ValueError`` if the linear part is singular (or not finite).
    """
    (a, b, c), (d, e, f) = np.asarray(matrix, dtype=np.float64).reshape(2, 3).tolist()
    det = a * e - b * d
    if det == 0 or not math.isfinite(det):
        raise ValueError(f"affine is not invertible (determinant {det}): {[[a, b, c], [d, e, f]]}")
    ia, ib, id_, ie = e / det, -b / det, -d / det, a / det
    return np.array([[ia, ib, -(ia * c + ib * f)], [id_, ie, -(id_ * c + ie * f)]])


def compose_affine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The ``(2, 3)`` affine ``a after b``: ``affine_points(p, result) == affine_points(affine_points(p, b), a)``."""
    (a0, a1, a2), (a3, a4, a5) = np.asarray(a, dtype=np.float64).reshape(2, 3).tolist()
    (b0, b1, b2), (b3, b4, b5) = np.asarray(b, dtype=np.float64).reshape(2, 3).tolist()
    return np.array([[a0 * b0 + a1 * b3, a0 * b1 + a1 * b4, a0 * b2 + a1 * b5 + a2],
                     [a3 * b0 + a4 * b3, a3 * b1 + a4 * b4, a3 * b2 + a4 * b5 + a5]])


def hflip_matrix(width: int) -> np.ndarray:
    """``(2, 3)`` affine of a horizontal mirror of an image ``width`` pixels wide: ``x -> (W - 1) - x``."""
    return np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0]])


def flip_keypoints(keypoints: np.ndarray, width: int) -> np.ndarray:
    """Mirror keypoints ``(..., K, 2|3)`` in an image ``width`` wide and relabel left <-> right.

    x becomes ``(W - 1) - x`` (UDP), y and any third column (visibility) are
    kept, and joints are reordered by :data:`cal_core.skeleton.FLIP_INDEX` so a
    left wrist in the mirror is labelled as the right wrist it now looks like.
    """
    kpts = np.asarray(keypoints)
    if kpts.ndim < 2 or kpts.shape[-2] != len(FLIP_INDEX) or kpts.shape[-1] not in (2, 3):
        raise ValueError(f"keypoints must have shape (..., {len(FLIP_INDEX)}, 2|3), got {kpts.shape}")
    flipped = kpts[..., list(FLIP_INDEX), :].astype(np.result_type(kpts.dtype, np.float32), copy=True)
    flipped[..., 0] = (width - 1) - flipped[..., 0]
    return flipped
