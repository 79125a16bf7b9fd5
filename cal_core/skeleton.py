"""COCO-17 person skeleton: keypoint names, left/right flip pairs, OKS sigmas, limbs.

These constants are the COCO keypoint definition (the ``person`` category of
``person_keypoints_*.json``) and the per-keypoint OKS falloffs that
pycocotools' ``COCOeval`` uses (paper Eq. 16). Everything that swaps joints on
a horizontal flip (augmentation, flip test, ONNX flip graph) uses
:data:`FLIP_INDEX`, so the pairing lives in one place.
"""

from __future__ import annotations

import numpy as np

KEYPOINT_NAMES: tuple[str, ...] = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)
NUM_KEYPOINTS = len(KEYPOINT_NAMES)

#: (left, right) index pairs that trade places under a horizontal flip.
FLIP_PAIRS: tuple[tuple[int, int], ...] = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))


def _flip_index(num: int, pairs: tuple[tuple[int, int], ...]) -> tuple[int, ...]:
    """Permutation p with ``flipped[k] = original[p[k]]`` for a horizontal mirror."""
    index = list(range(num))
    for left, right in pairs:
        index[left], index[right] = right, left
    return tuple(index)


#: ``keypoints[FLIP_INDEX]`` relabels a mirrored person's joints (left <-> right).
FLIP_INDEX: tuple[int, ...] = _flip_index(NUM_KEYPOINTS, FLIP_PAIRS)

#: Per-keypoint OKS sigmas, exactly as pycocotools ``COCOeval.Params.kpt_oks_sigmas``.
OKS_SIGMAS = np.array(
    [0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89]
) / 10.0

#: Limbs as (from, to) joint indices (0-based), the COCO ``skeleton`` field minus one.
LIMBS: tuple[tuple[int, int], ...] = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7),
    (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)  # fmt: skip

#: Joints of the upper body, used by half-body augmentation.
UPPER_BODY: tuple[int, ...] = tuple(range(11))
LOWER_BODY: tuple[int, ...] = tuple(range(11, 17))

#: COCO ``categories`` entry for persons, written by the synthetic generator and exports.
COCO_PERSON_CATEGORY = {
    "id": 1,
    "name": "person",
    "supercategory": "person",
    "keypoints": list(KEYPOINT_NAMES),
    "skeleton": [[a + 1, b + 1] for a, b in LIMBS],
}
