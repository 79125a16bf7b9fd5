"""Synthetic COCO-format people: a deterministic, CPU-cheap stand-in for COCO keypoints.

``generate(out_dir, n_train, n_val, seed)`` writes the COCO layout
(``annotations/person_keypoints_{train,val}2017.json`` + ``train2017/`` and
``val2017/`` JPEGs), so the downsampling stage reads it exactly like COCO and
the whole system can be trained and compared without external data.

Each figure is a COCO-17 skeleton posed in 3D (torso lean and twist, shoulder
and hip flexion/abduction, elbow and knee bends within anatomical ranges, a
free body yaw and an in-plane roll), projected orthographically (which gives
natural foreshortening) and drawn back to front as tapered limbs, a torso
silhouette and a head. Left and right limbs share one colour family, so the
sides can only be told apart from configuration and from the face (eyes,
nose, ears and hair show which way the head faces), as with real people.

Labels come from the drawing itself: every shape is rasterised into an
owner-id mask with sub-pixel precision (OpenCV fixed-point ``shift``; integer
coordinates are pixel centres, the UDP convention). A labelled joint is
``v=2`` when the pixel under it belongs to one of its own limbs, ``v=1`` when
something else covers it (another limb, person or an occluder) and ``v=0``
(stored as ``0, 0, 0``) when it lies outside the image or, for face points,
behind the head. ``bbox`` is the tight box of the whole drawn figure clipped
to the image (amodal, so it contains every labelled joint) and ``area`` the
figure's visible pixel count (like COCO's segmentation area).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from cal_core import storage
from cal_core.skeleton import COCO_PERSON_CATEGORY, NUM_KEYPOINTS

log = logging.getLogger(__name__)

#: Splits as ``(name, folder, first image id)``; ids never collide across splits.
SPLITS: tuple[tuple[str, str, int], ...] = (("train", "train2017", 1), ("val", "val2017", 10_000_001))
#: Image side range in pixels and the person height range (pixels, log-uniform).
IMAGE_SIDES = (320, 640)
PERSON_HEIGHTS = (40.0, 400.0)
#: Probability of 1, 2, 3 or 4 people in a scene.
PEOPLE_PER_IMAGE = (0.4, 0.3, 0.2, 0.1)


@dataclass(frozen=True)
class SceneStyle:
    """How busy a scene is: everything that makes people hard to find, apart from the figures themselves.

    ``full`` (the default) has 4-14 clutter shapes per background (a third of
    them limb-like bars), an occluder in front of 30% of the people and up to
    four people per scene. ``plain`` keeps the figures, their poses, textures,
    scales and the textured gradient background, and drops the clutter, the
    occluders and the crowd (one person per scene): a set a small CPU-trained
    network can learn to localise within minutes, so that a comparison of
    codecs measures their sub-pixel precision rather than which method
    happens to find limbs first (benchmarks/accuracy.py).
    """

    name: str = "full"
    clutter: tuple[int, int] = (4, 15)
    occluder_prob: float = 0.3
    people_per_image: tuple[float, ...] = PEOPLE_PER_IMAGE


STYLES: dict[str, SceneStyle] = {
    style.name: style
    for style in (SceneStyle(), SceneStyle("plain", clutter=(0, 1), occluder_prob=0.0, people_per_image=(1.0,)))
}
JPEG_QUALITY = 92
#: Fixed-point bits for sub-pixel rasterisation (OpenCV ``shift``).
_SHIFT = 4
_NOISE_TILE = 768
#: Resolution divisor of the smooth background layers.
_COARSE = 4

# Keypoint indices (see cal_core.skeleton.KEYPOINT_NAMES).
NOSE, L_EYE, R_EYE, L_EAR, R_EAR = 0, 1, 2, 3, 4
L_SHOULDER, L_ELBOW, L_WRIST, L_HIP, L_KNEE, L_ANKLE = 5, 7, 9, 11, 13, 15

# Skin, hair and shoe colour families (RGB).
_SKIN = np.array(
    [[255, 219, 172], [241, 194, 125], [224, 172, 105], [198, 134, 66], [141, 85, 36], [92, 58, 32]]
)
_HAIR = np.array([[20, 17, 15], [60, 40, 25], [120, 80, 40], [200, 170, 110], [150, 150, 150]])


@dataclass
class Shape:
    """One drawn part: polygons filled with one owner id, the joints it carries and its look."""

    name: str
    polygons: list[np.ndarray]
    depth: float
    joints: tuple[int, ...]
    colour: np.ndarray
    texture: float
    person: int = -1


@dataclass
class Figure:
    """A posed person in image pixels: joints, per-joint depth and the face's visibility."""

    keypoints: np.ndarray  # (17, 2) image px
    depth: np.ndarray  # (17,) toward the camera, px
    face_front: np.ndarray  # (5,) face point depth relative to the head centre (> 0: facing us)
    head: np.ndarray  # (2,) head centre px
    head_depth: float
    hair: np.ndarray  # (3,) hair centre (x, y, depth) px
    radius: float  # head radius px
    foot_tips: np.ndarray  # (2, 2) toe points for the left and right foot
    shapes: list[Shape] = field(default_factory=list)


def _rot(axis: np.ndarray, angle: float) -> np.ndarray:
    """3x3 rotation by ``angle`` radians about ``axis`` (Rodrigues)."""
    a = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


_X, _Y, _Z = np.eye(3)


def _limb_dirs(rng: np.random.Generator, base: np.ndarray, side: float, arm: bool) -> tuple[np.ndarray, ...]:
    """Unit directions (body frame: x left, y up, z forward) of an arm or a leg and its bend.

    Returns (proximal segment, distal segment, distal "front" vector). Arms:
    flexion -40..170 deg, abduction 0..150, elbow 0..150 toward the arm's
    front after a humeral twist. Legs: flexion -30..110, abduction -10..45,
    knee 0..140 toward the back of the thigh.
    """
    deg = np.deg2rad
    if arm:
        flex, abd, bend = deg(rng.uniform(-40, 170)), deg(rng.uniform(0, 150)), deg(150 * rng.beta(1.3, 2.0))
        front_sign, twist = 1.0, deg(rng.uniform(-60, 60))
    else:
        flex, abd, bend = (
            deg(rng.uniform(-30, 110) * rng.beta(1.0, 1.6)),
            deg(rng.uniform(-10, 45)),
            deg(140 * rng.beta(1.1, 2.5)),
        )
        front_sign, twist = -1.0, deg(rng.uniform(-15, 15))
    frame = base @ _rot(_X, -flex) @ _rot(_Z, side * abd)
    proximal = frame @ -_Y
    front = _rot(proximal, twist) @ (frame @ (front_sign * _Z))
    distal = np.cos(bend) * proximal + np.sin(bend) * front
    distal_front = -np.sin(bend) * proximal + np.cos(bend) * front
    return proximal, distal, distal_front * front_sign


def _body_3d(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A random pose in body units (height 1, origin at the hip centre).

    Returns the 17 joints (17, 3), the head centre and frame (3, 3) and the two
    toe points (2, 3). Segment lengths are adult proportions with +-8% jitter.
    """
    deg = np.deg2rad
    j = rng.uniform(0.92, 1.08, size=9)
    hip_w, sh_w, torso, neck, upper, fore, thigh, shin, foot = j * [
        0.085,
        0.12,
        0.3,
        0.13,
        0.17,
        0.15,
        0.245,
        0.245,
        0.07,
    ]
    lean = (
        _rot(_X, deg(rng.uniform(-10, 35)))
        @ _rot(_Z, deg(rng.normal(0, 6)))
        @ _rot(_Y, deg(rng.normal(0, 12)))
    )
    head_frame = lean @ _rot(_Y, deg(rng.uniform(-50, 50))) @ _rot(_X, deg(rng.uniform(-25, 20)))
    joints = np.zeros((NUM_KEYPOINTS, 3))
    toes = np.zeros((2, 3))
    shoulder_c = lean @ (torso * _Y)
    head = shoulder_c + neck * (lean @ _rot(_X, deg(rng.uniform(-15, 15))) @ _Y)
    for side_i, side in enumerate((1.0, -1.0)):
        sh, hip = L_SHOULDER + side_i, L_HIP + side_i
        joints[sh] = shoulder_c + side * sh_w * (lean @ _X)
        up_arm, forearm, _ = _limb_dirs(rng, lean, side, arm=True)
        joints[L_ELBOW + side_i] = joints[sh] + upper * up_arm
        joints[L_WRIST + side_i] = joints[L_ELBOW + side_i] + fore * forearm
        joints[hip] = side * hip_w * _X
        thigh_d, shin_d, foot_d = _limb_dirs(rng, np.eye(3), side, arm=False)
        joints[L_KNEE + side_i] = joints[hip] + thigh * thigh_d
        joints[L_ANKLE + side_i] = joints[L_KNEE + side_i] + shin * shin_d
        toes[side_i] = joints[L_ANKLE + side_i] + foot * foot_d
    return joints, head, head_frame, toes


#: Face points in the head frame, in head radii: nose, left/right eye, left/right ear.
_FACE = np.array(
    [[0, -0.15, 1.05], [0.38, 0.18, 0.88], [-0.38, 0.18, 0.88], [1.0, 0.0, -0.05], [-1.0, 0.0, -0.05]]
)
_HEAD_RADIUS = 0.065


def sample_figure(rng: np.random.Generator, height_px: float, hip_px: np.ndarray) -> Figure:
    """Pose a person, turn it by a random yaw and roll and project it to image pixels.

    ``height_px`` is the standing height, ``hip_px`` where the hip centre lands.
    Orthographic projection: image x = body x cos(yaw) + z sin(yaw), image y =
    -body y, depth = -x sin(yaw) + z cos(yaw) (positive toward the camera).
    """
    joints, head, head_frame, toes = _body_3d(rng)
    face = head + _HEAD_RADIUS * _FACE @ head_frame.T
    hair = head + _HEAD_RADIUS * head_frame @ np.array([0, 0.35, -0.45])
    yaw = rng.uniform(-np.pi, np.pi)
    roll = np.deg2rad(rng.normal(0, 8) if rng.random() > 0.08 else rng.uniform(-180, 180))
    camera = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, -1, 0], [-np.sin(yaw), 0, np.cos(yaw)]])
    in_plane = np.array([[np.cos(roll), -np.sin(roll)], [np.sin(roll), np.cos(roll)]])

    def project(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = p @ camera.T * height_px
        return q[..., :2] @ in_plane.T + hip_px, q[..., 2]

    kp, depth = project(joints)
    face_px, face_depth = project(face)
    (head_px, hair_px), (head_depth, hair_depth) = project(np.stack([head, hair]))
    kp[:5] = face_px
    depth[:5] = face_depth
    return Figure(
        keypoints=kp,
        depth=depth,
        face_front=face_depth - head_depth,
        head=head_px,
        head_depth=float(head_depth),
        hair=np.array([*hair_px, hair_depth]),
        radius=_HEAD_RADIUS * height_px,
        foot_tips=project(toes)[0],
    )


def _unit_circle(n: int) -> np.ndarray:
    """``(n, 2)`` points of the unit circle."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


_CIRCLE = _unit_circle(20)
_ELLIPSE = _unit_circle(24)


def _circle(center: np.ndarray, radius: float) -> np.ndarray:
    """Polygon (20, 2) approximating a circle."""
    return np.asarray(center) + radius * _CIRCLE


def _ellipse(center: np.ndarray, axes: tuple[float, float], major: np.ndarray) -> np.ndarray:
    """Polygon (24, 2) of an ellipse with semi-axes ``axes`` (along ``major``, across it)."""
    u = major / max(float(np.linalg.norm(major)), 1e-9)
    basis = np.array([axes[0] * u, [-axes[1] * u[1], axes[1] * u[0]]])
    return np.asarray(center) + _ELLIPSE @ basis


def _limb(p0: np.ndarray, p1: np.ndarray, w0: float, w1: float) -> list[np.ndarray]:
    """A tapered limb from ``p0`` (half-width ``w0``) to ``p1`` (``w1``) with rounded joints."""
    d = p1 - p0
    n = np.array([-d[1], d[0]]) / max(float(np.linalg.norm(d)), 1e-9)
    quad = np.stack([p0 + w0 * n, p1 + w1 * n, p1 - w1 * n, p0 - w0 * n])
    return [quad, _circle(p0, w0), _circle(p1, w1)]


def _person_colours(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One person's look: skin, hair, shirt (sleeve colour), trousers (shin colour) and shoes, RGB."""
    skin = np.clip(_SKIN[rng.integers(len(_SKIN))] + rng.normal(0, 8, 3), 0, 255)
    shirt = rng.uniform(20, 235, 3)
    pants = rng.uniform(15, 200, 3)
    return {
        "skin": skin,
        "hair": np.clip(_HAIR[rng.integers(len(_HAIR))] + rng.normal(0, 6, 3), 0, 255),
        "shirt": shirt,
        "sleeve": shirt if rng.random() < 0.6 else skin,
        "pants": pants,
        "shin": pants if rng.random() < 0.75 else skin,
        "shoe": rng.uniform(10, 90, 3),
    }


#: Limb parts: (name, from joint, to joint, colour key, half-widths as fractions of the height).
_LIMBS = (
    ("upper_arm", L_SHOULDER, L_ELBOW, "shirt", 0.042, 0.033),
    ("forearm", L_ELBOW, L_WRIST, "sleeve", 0.033, 0.024),
    ("thigh", L_HIP, L_KNEE, "pants", 0.062, 0.045),
    ("shin", L_KNEE, L_ANKLE, "shin", 0.045, 0.031),
)


def _side_shapes(fig: Figure, colours: dict[str, np.ndarray], height: float, side: int) -> list[Shape]:
    """Arm, hand, leg and foot shapes of one side (0 left, 1 right); joint indices shift by ``side``."""
    kp, depth = fig.keypoints, fig.depth
    shapes = []
    for name, a, b, key, w0, w1 in _LIMBS:
        a, b = a + side, b + side
        shapes.append(
            Shape(
                name,
                _limb(kp[a], kp[b], w0 * height, w1 * height),
                (depth[a] + depth[b]) / 2,
                (a, b),
                colours[key],
                14.0,
            )
        )
    wrist, ankle = L_WRIST + side, L_ANKLE + side
    shapes.append(
        Shape("hand", [_circle(kp[wrist], 0.03 * height)], depth[wrist], (wrist,), colours["skin"], 4.0)
    )
    foot = _limb(kp[ankle], fig.foot_tips[side], 0.03 * height, 0.025 * height)
    shapes.append(Shape("foot", foot, depth[ankle], (ankle,), colours["shoe"], 6.0))
    return shapes


def _trunk_shapes(fig: Figure, colours: dict[str, np.ndarray], height: float) -> list[Shape]:
    """Torso silhouette (hull of shoulders, hips and a minimum body depth), neck, head and hair."""
    kp, depth = fig.keypoints, fig.depth
    sh_c, hip_c = kp[[5, 6]].mean(0), kp[[11, 12]].mean(0)
    spine = sh_c - hip_c
    across = np.array([-spine[1], spine[0]]) / max(float(np.linalg.norm(spine)), 1e-9)
    core = [sh_c + s * 0.065 * height * across for s in (1, -1)] + [
        hip_c + s * 0.07 * height * across for s in (1, -1)
    ]
    hull = cv2.convexHull(np.vstack([kp[[5, 6, 11, 12]], *core]).astype(np.float32))[:, 0].astype(np.float64)
    torso_depth = float(depth[[5, 6, 11, 12]].mean())
    r = fig.radius
    face_parts = [
        _circle(kp[k], 0.28 * r if k >= L_EAR else 0.16 * r) for k in range(5) if _face_shown(fig, k)
    ]
    head = [_ellipse(fig.head, (1.12 * r, 0.95 * r), fig.head - sh_c), *face_parts]
    neck = _limb(sh_c + 0.3 * (fig.head - sh_c), fig.head, 0.03 * height, 0.028 * height)
    return [
        Shape("torso", [hull], torso_depth, (5, 6, 11, 12), colours["shirt"], 14.0),
        Shape("neck", neck, torso_depth + 0.01 * height, (), colours["skin"], 3.0),
        Shape("head", head, fig.head_depth, tuple(range(5)), colours["skin"], 3.0),
        Shape(
            "hair",
            [_circle(fig.hair[:2], 1.02 * r)],
            float(fig.hair[2]),
            tuple(range(5)),
            colours["hair"],
            10.0,
        ),
    ]


def _face_shown(fig: Figure, k: int) -> bool:
    """Whether face point ``k`` is on the camera side of the head (ears show from further round)."""
    return bool(fig.face_front[k] > (-0.3 if k >= L_EAR else 0.1) * fig.radius)


def figure_shapes(fig: Figure, rng: np.random.Generator, height: float, person: int) -> list[Shape]:
    """All shapes of a figure, back to front, shaded darker with distance from the camera."""
    colours = _person_colours(rng)
    shapes = _trunk_shapes(fig, colours, height) + _side_shapes(fig, colours, height, 0)
    shapes += _side_shapes(fig, colours, height, 1)
    shapes.sort(key=lambda s: s.depth)
    for shape in shapes:
        shade = min(max(0.92 + 0.6 * shape.depth / height, 0.75), 1.05)
        shape.colour = shape.colour * shade + rng.normal(0, 4, 3)
        shape.person = person
    return shapes


def noise_tiles(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fine (full resolution) and coarse (quarter resolution) unit-variance noise textures, fixed by ``seed``."""
    rng = np.random.default_rng([seed, 7])
    tiles = []
    for side, sigma in ((_NOISE_TILE, 0.8), (_NOISE_TILE // _COARSE, 5.0 / _COARSE)):
        tile = cv2.GaussianBlur(rng.standard_normal((side, side)).astype(np.float32), (0, 0), sigma)
        tiles.append(tile / tile.std())
    return tiles[0], tiles[1]


def _crop_tile(rng: np.random.Generator, tile: np.ndarray, width: int, height: int) -> np.ndarray:
    """A random ``height x width`` window of a noise tile."""
    y, x = rng.integers(0, tile.shape[0] - height + 1), rng.integers(0, tile.shape[1] - width + 1)
    return tile[y : y + height, x : x + width]


def _background(
    rng: np.random.Generator, width: int, height: int, coarse: np.ndarray, clutter: tuple[int, int]
) -> np.ndarray:
    """Float32 RGB background: a random gradient, blotchy noise and ``rng.integers(*clutter)`` clutter shapes.

    Gradient and blotches are smooth, so they are made at quarter resolution and
    upsampled once (one full-size pass instead of three).
    """
    small_wh = (width // _COARSE + 2, height // _COARSE + 2)
    corners = rng.uniform(0, 255, (2, 2, 3)).astype(np.float32)
    small = cv2.resize(corners, small_wh, interpolation=cv2.INTER_LINEAR)
    small += rng.uniform(5, 30) * _crop_tile(rng, coarse, *small_wh)[..., None]
    bg = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    scale = min(width, height)
    for _ in range(rng.integers(*clutter)):
        colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
        kind, c = rng.integers(4), rng.uniform(0, 1, 2) * (width, height)
        size = rng.uniform(0.03, 0.3) * scale
        if kind == 0:
            polys = [c + rng.uniform(-size, size, (4, 2))]
        elif kind == 1:
            polys = [_ellipse(c, (size, size * rng.uniform(0.3, 1.0)), rng.standard_normal(2))]
        else:  # limb-like bars: distractors a detector of tapered shapes would confuse
            polys = _limb(
                c,
                c + rng.uniform(-2 * size, 2 * size, 2),
                rng.uniform(0.05, 0.2) * size,
                rng.uniform(0.05, 0.2) * size,
            )
        for polygon in polys:
            cv2.fillPoly(bg, [_fixed(polygon)], colour, lineType=cv2.LINE_AA, shift=_SHIFT)
    return bg


def _fixed(points: np.ndarray) -> np.ndarray:
    """Polygon vertices as OpenCV fixed-point int32 (``shift`` fractional bits)."""
    return np.round(np.asarray(points) * (1 << _SHIFT)).astype(np.int32)


def _occluder(rng: np.random.Generator, fig: Figure, height: float) -> Shape:
    """A box or blob in front of a random joint of ``fig`` (hides joints, which then get v=1)."""
    c = fig.keypoints[rng.integers(NUM_KEYPOINTS)] + rng.normal(0, 0.05 * height, 2)
    size = rng.uniform(0.08, 0.2) * height
    if rng.random() < 0.5:
        poly = c + np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * size * rng.uniform(0.4, 1.0, 2)
    else:
        poly = _ellipse(c, (size, size * rng.uniform(0.4, 1.0)), rng.standard_normal(2))
    return Shape("occluder", [poly], np.inf, (), rng.uniform(0, 255, 3), float(rng.uniform(3, 20)))


def _rasterise(shapes: list[Shape], width: int, height: int) -> np.ndarray:
    """Owner-id mask (uint8): pixel = 1 + index of the last shape drawn over it, 0 for background."""
    if len(shapes) > 255:
        raise ValueError(f"{len(shapes)} shapes exceed the 255 ids of the uint8 owner mask")
    mask = np.zeros((height, width), np.uint8)
    for i, shape in enumerate(shapes, start=1):
        for polygon in shape.polygons:  # one call each: a multi-contour fillPoly would XOR the overlaps
            cv2.fillPoly(mask, [_fixed(polygon)], i, lineType=cv2.LINE_8, shift=_SHIFT)
    return mask


def _composite(bg: np.ndarray, mask: np.ndarray, shapes: list[Shape], texture: np.ndarray) -> np.ndarray:
    """Paint every shape's colour plus its amount of texture noise over the background; uint8 RGB.

    Only the bounding window of the drawn shapes is recomputed (most of a scene is background).
    """
    palette = np.zeros((len(shapes) + 1, 3), np.float32)
    amount = np.zeros(len(shapes) + 1, np.float32)
    for i, shape in enumerate(shapes, start=1):
        palette[i], amount[i] = shape.colour, shape.texture
    x, y, w, h = cv2.boundingRect(mask)
    window = (slice(y, y + h), slice(x, x + w))
    ids = mask[window]
    drawn = ids > 0
    painted = ids[drawn]
    bg[window][drawn] = palette[painted] + (amount[painted] * texture[window][drawn])[:, None]
    return cv2.add(bg, 0.0, dtype=cv2.CV_8U)  # rounds and saturates to 0..255


def _visibility(fig: Figure, person: int, shapes: list[Shape], mask: np.ndarray) -> np.ndarray:
    """COCO v per joint: 2 if its own limb is on top there, 1 if covered, 0 if outside or behind the head."""
    height, width = mask.shape
    vis = np.zeros(NUM_KEYPOINTS, np.int64)
    for k, (x, y) in enumerate(fig.keypoints):
        if not (0 <= x <= width - 1 and 0 <= y <= height - 1) or (k < 5 and not _face_shown(fig, k)):
            continue
        owner = int(mask[int(round(y)), int(round(x))])
        own = owner > 0 and shapes[owner - 1].person == person and k in shapes[owner - 1].joints
        vis[k] = 2 if own else 1
    return vis


def _draw_face(image: np.ndarray, fig: Figure, vis: np.ndarray, skin: np.ndarray) -> None:
    """Eyes, nose and ear marks on the head where those keypoints are visible (the facing cue)."""
    r = fig.radius
    looks = {
        NOSE: (0.16, skin * 0.7),
        L_EYE: (0.13, (25, 20, 20)),
        R_EYE: (0.13, (25, 20, 20)),
        L_EAR: (0.14, skin * 0.75),
        R_EAR: (0.14, skin * 0.75),
    }
    for k, (size, colour) in looks.items():
        if vis[k] == 2:
            centre = tuple(int(v) for v in np.round(fig.keypoints[k] * (1 << _SHIFT)))
            radius = int(round(max(size * r, 0.7) * (1 << _SHIFT)))
            cv2.circle(image, centre, radius, tuple(float(c) for c in colour), -1, cv2.LINE_AA, _SHIFT)


def _annotation(
    fig: Figure, person: int, shapes: list[Shape], vis: np.ndarray, area: float
) -> dict[str, Any]:
    """COCO annotation fields of one figure: keypoints (v=0 stored as 0,0,0), bbox, area, num_keypoints."""
    kp = np.where(vis[:, None] > 0, np.round(fig.keypoints, 2), 0.0)
    verts = np.vstack([p for s in shapes if s.person == person for p in s.polygons])
    return {
        "keypoints": [float(v) for v in np.column_stack([kp, vis]).ravel()],
        "num_keypoints": int((vis > 0).sum()),
        "vertices": verts,
        "area": float(max(area, 1.0)),
        "iscrowd": 0,
        "category_id": 1,
        "segmentation": [],
    }


def _clip_bbox(vertices: np.ndarray, width: int, height: int) -> list[float]:
    """Tight ``[x, y, w, h]`` box of the vertices clipped to the image's pixel-centre extent."""
    lo = np.clip(vertices.min(0), 0, [width - 1, height - 1])
    hi = np.clip(vertices.max(0), 0, [width - 1, height - 1])
    return [round(float(v), 2) for v in (lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1])]


def render_scene(
    rng: np.random.Generator, n_people: int, tiles: tuple[np.ndarray, np.ndarray], style: SceneStyle = STYLES["full"]
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Draw one scene with ``n_people`` figures; returns the RGB uint8 image and their COCO annotations."""
    width, height = (int(v) for v in rng.integers(IMAGE_SIDES[0], IMAGE_SIDES[1] + 1, 2))
    bg = _background(rng, width, height, tiles[1], style.clutter)
    shapes: list[Shape] = []
    figures = []
    occluders = []
    for person in range(n_people):
        tall = float(
            np.exp(rng.uniform(np.log(PERSON_HEIGHTS[0]), np.log(min(PERSON_HEIGHTS[1], 1.3 * height))))
        )
        hip = rng.uniform([0.05 * width, 0.25 * height], [0.95 * width, 0.95 * height])
        fig = sample_figure(rng, tall, hip)
        figures.append(fig)
        shapes += figure_shapes(fig, rng, tall, person)
        if rng.random() < style.occluder_prob:
            occluders.append(_occluder(rng, fig, tall))
    shapes += occluders
    mask = _rasterise(shapes, width, height)
    image = _composite(bg, mask, shapes, _crop_tile(rng, tiles[0], width, height))
    owner_area = np.bincount(mask.ravel(), minlength=len(shapes) + 1)[1:]
    annotations = []
    for person, fig in enumerate(figures):
        vis = _visibility(fig, person, shapes, mask)
        own = [i for i, s in enumerate(shapes) if s.person == person]
        head = next(s for s in shapes if s.person == person and s.name == "head")
        _draw_face(image, fig, vis, head.colour)
        ann = _annotation(fig, person, shapes, vis, float(owner_area[own].sum()))
        ann["bbox"] = _clip_bbox(ann.pop("vertices"), width, height)
        annotations.append(ann)
    return image, annotations


def _split_dataset(
    out: Path, split: int, n_people: int, seed: int, tiles: tuple[np.ndarray, np.ndarray], quality: int,
    style: SceneStyle,
) -> dict[str, Any]:
    """Draw scenes until ``n_people`` people exist; write their JPEGs; return the COCO dict."""
    name, folder, first_id = SPLITS[split]
    (out / folder).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    with tqdm(total=n_people, desc=f"synth {name}", unit="person", disable=n_people < 200) as bar:
        while len(annotations) < n_people:
            index = len(images)
            rng = np.random.default_rng([seed, split, index])
            crowd = style.people_per_image
            count = min(int(rng.choice(len(crowd), p=crowd)) + 1, n_people - len(annotations))
            image, anns = render_scene(rng, count, tiles, style)
            image_id = first_id + index
            file_name = f"{image_id:012d}.jpg"
            ok, jpeg = cv2.imencode(
                ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
            )
            if not ok:
                raise RuntimeError(f"JPEG encoding failed for {folder}/{file_name}")
            storage.write_bytes(out / folder / file_name, jpeg.tobytes(), durable=False)
            images.append(
                {
                    "id": image_id,
                    "file_name": file_name,
                    "width": image.shape[1],
                    "height": image.shape[0],
                    "license": 1,
                }
            )
            for ann in anns:
                annotations.append({"id": first_id + len(annotations), "image_id": image_id, **ann})
            bar.update(len(anns))
    return {
        "info": {
            "description": f"cal-pose synthetic people ({name})",
            "version": "1",
            "year": 2026,
            "seed": seed,
            "style": style.name,
        },
        "licenses": [
            {"id": 1, "name": "Synthetic images generated by cal-pose (no restrictions)", "url": ""}
        ],
        "images": images,
        "annotations": annotations,
        "categories": [COCO_PERSON_CATEGORY],
    }


def generate(
    out_dir: str | Path, n_train: int, n_val: int, seed: int = 0, quality: int = JPEG_QUALITY, style: str = "full"
) -> dict[str, Path]:
    """Write a synthetic COCO-keypoints tree with ``n_train`` / ``n_val`` PEOPLE under ``out_dir``.

    Layout: ``annotations/person_keypoints_{train,val}2017.json``, ``train2017/``
    and ``val2017/`` JPEGs. The same arguments always give byte-identical files
    (every scene draws from its own generator seeded by (seed, split, index)).
    ``style`` names a :class:`SceneStyle` in :data:`STYLES`. Returns the
    annotation file path per split.
    """
    if n_train < 0 or n_val < 0:
        raise ValueError(f"people counts must be >= 0, got train={n_train}, val={n_val}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0 (numpy seeds are non-negative), got {seed}")
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be 1..100, got {quality}")
    if style not in STYLES:
        raise ValueError(f"unknown scene style {style!r}; choose one of {sorted(STYLES)}")
    out = Path(out_dir)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    tiles = noise_tiles(seed)
    written = {}
    for split, n_people in enumerate((n_train, n_val)):
        name, folder, _ = SPLITS[split]
        coco = _split_dataset(out, split, n_people, seed, tiles, quality, STYLES[style])
        path = out / "annotations" / f"person_keypoints_{folder}.json"
        storage.write_bytes(path, json.dumps(coco, separators=(",", ":")).encode(), durable=False)
        written[name] = path
        log.info("synth %s: %d images, %d people -> %s", name, len(coco["images"]), n_people, path)
    return written


def _int_in(low: int, high: int | None) -> Any:
    """An argparse type: an integer in ``[low, high]`` (no upper bound when ``high`` is None), else a usage error."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{'' if high is None else high}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``cal-pose synth`` options."""
    parser.add_argument("--out", required=True, help="output folder (COCO layout)")
    parser.add_argument("--train", type=_int_in(0, None), required=True, help="number of training PEOPLE (not images)")
    parser.add_argument("--val", type=_int_in(0, None), required=True, help="number of validation PEOPLE (not images)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes")
    parser.add_argument("--quality", type=_int_in(1, 100), default=JPEG_QUALITY, help="JPEG quality of the scenes (1-100)")
    parser.add_argument("--style", choices=sorted(STYLES), default="full",
                        help="scene style: full (clutter, occluders, crowds) or plain (one person, no clutter)")


def run(args: argparse.Namespace) -> int:
    """Generate the synthetic set described by ``args``."""
    generate(args.out, args.train, args.val, args.seed, args.quality, args.style)
    return 0
