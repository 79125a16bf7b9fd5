"""Augmentation: box geometry, flips, half body, the drawn ranges, pixels and labels moving together."""

from __future__ import annotations

import random

import numpy as np
import pytest

from cal_core.data.augment import (
    AugmentConfig,
    crop_box,
    half_body_box,
    sample_transform,
    udp_affine,
    warp_sample,
)
from cal_core.geometry import compose_affine, hflip_matrix, warp_matrix
from cal_core.skeleton import NUM_KEYPOINTS

NO_AUG = AugmentConfig(flip_prob=0.0, half_body_prob=0.0, scale_factor=0.0, rotation_prob=0.0)


def test_crop_box_is_the_central_part_in_udp_units() -> None:
    center, size = crop_box((72, 96), 1.5)
    np.testing.assert_allclose(center, [35.5, 47.5])
    np.testing.assert_allclose(size, [71 / 1.5, 95 / 1.5])
    with pytest.raises(ValueError, match="margin"):
        crop_box((72, 96), 0.5)


def test_eval_maps_the_padded_box_onto_the_input() -> None:
    # crop 72 wide x 96 high, margin 1.5, input 64x48: box x 11.8333..59.1667 -> 0..47, y 15.8333..79.1667 -> 0..63
    matrix, flipped = sample_transform(
        random.Random(0), np.zeros((17, 2)), np.zeros(17), (72, 96), 1.5, (64, 48), None
    )
    assert not flipped
    corners = np.array([[35.5 - 71 / 3, 47.5 - 95 / 3], [35.5 + 71 / 3, 47.5 + 95 / 3], [35.5, 47.5]])
    mapped = corners @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(mapped, [[0, 0], [47, 63], [23.5, 31.5]], atol=1e-9)


def test_no_augmentation_with_margin_one_is_the_identity() -> None:
    matrix, _ = sample_transform(
        random.Random(0), np.zeros((17, 2)), np.zeros(17), (48, 64), 1.0, (64, 48), NO_AUG
    )
    np.testing.assert_allclose(matrix, [[1, 0, 0], [0, 1, 0]], atol=1e-12)


def test_flip_mirrors_pixels_and_swaps_a_known_joint() -> None:
    rng = random.Random(1)
    crop = np.random.default_rng(1).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    keypoints = np.zeros((NUM_KEYPOINTS, 2))
    vis = np.zeros(NUM_KEYPOINTS)
    keypoints[9], vis[9] = (10.0, 20.0), 2  # left wrist
    matrix, flipped = sample_transform(
        rng,
        keypoints,
        vis,
        (48, 64),
        1.0,
        (64, 48),
        AugmentConfig(flip_prob=1.0, half_body_prob=0.0, scale_factor=0.0, rotation_prob=0.0),
    )
    assert flipped
    image, points, out_vis = warp_sample(crop, keypoints, vis, matrix, flipped, (64, 48))
    np.testing.assert_array_equal(image, crop[:, ::-1])
    assert out_vis[10] == 2 and out_vis[9] == 0  # now the right wrist
    np.testing.assert_allclose(points[10], [37.0, 20.0], atol=1e-5)  # x -> (48 - 1) - 10


def test_half_body_box_by_hand() -> None:
    keypoints = np.zeros((NUM_KEYPOINTS, 2))
    labelled = np.zeros(NUM_KEYPOINTS, bool)
    keypoints[[5, 6, 7, 8]] = [(10, 10), (20, 10), (10, 30), (20, 30)]
    labelled[[5, 6, 7, 8]] = True
    keypoints[[11, 12]] = [(12, 50), (18, 50)]
    labelled[[11, 12]] = True
    center, size = half_body_box(keypoints, labelled, 0.75, 1.5, upper_first=False)  # lower has only 2 joints
    np.testing.assert_allclose(center, [15, 20])
    np.testing.assert_allclose(size, [15.75 * 1.5, 21 * 1.5])  # 11x21 grown to aspect 0.75, x1.5
    labelled[[6, 7, 8]] = False
    labelled[12] = False
    assert half_body_box(keypoints, labelled, 0.75, 1.5, upper_first=True) is None


def test_half_body_needs_more_than_eight_labelled_joints() -> None:
    keypoints = np.random.default_rng(0).uniform(10, 60, (NUM_KEYPOINTS, 2))
    vis = np.zeros(NUM_KEYPOINTS)
    vis[:8] = 2
    config = AugmentConfig(flip_prob=0.0, half_body_prob=1.0, scale_factor=0.0, rotation_prob=0.0)
    plain, _ = sample_transform(random.Random(0), keypoints, vis, (72, 96), 1.5, (64, 48), NO_AUG)
    eight, _ = sample_transform(random.Random(0), keypoints, vis, (72, 96), 1.5, (64, 48), config)
    np.testing.assert_allclose(eight, plain)
    vis[:10] = 2
    nine, _ = sample_transform(random.Random(0), keypoints, vis, (72, 96), 1.5, (64, 48), config)
    assert not np.allclose(nine, plain)


def test_drawn_scale_rotation_and_flip_follow_the_authors_distributions() -> None:
    rng = random.Random(2)
    kp, vis = np.zeros((NUM_KEYPOINTS, 2)), np.zeros(NUM_KEYPOINTS)
    base, _ = sample_transform(rng, kp, vis, (72, 96), 1.5, (64, 48), None)
    scales, angles, flips = [], [], []
    for _ in range(3000):
        matrix, flipped = sample_transform(rng, kp, vis, (72, 96), 1.5, (64, 48), AugmentConfig())
        linear = matrix[:, :2] @ np.diag([-1.0, 1.0]) if flipped else matrix[:, :2]
        assert (np.linalg.det(matrix[:, :2]) < 0) == flipped
        scales.append(np.sqrt(np.linalg.det(base[:, :2]) / abs(np.linalg.det(linear))))
        angles.append(np.degrees(np.arctan2(linear[0, 1], linear[0, 0])))
        flips.append(flipped)
    scales, angles = np.array(scales), np.array(angles)
    assert scales.min() >= 0.65 - 1e-9 and scales.max() <= 1.35 + 1e-9 and abs(scales.mean() - 1) < 0.02
    rotated = np.abs(angles) > 1e-9
    assert abs(rotated.mean() - 0.6) < 0.04 and np.abs(angles).max() <= 90 + 1e-9
    assert 40 < angles[rotated].std() < 47  # N(0, 45) clipped at +-90
    assert abs(np.mean(flips) - 0.5) < 0.04


def test_pixels_and_keypoints_move_together_under_random_augmentation() -> None:
    rng = random.Random(3)
    hits = 0
    for _ in range(200):
        crop = np.zeros((96, 72), np.uint8)
        kp = np.zeros((NUM_KEYPOINTS, 2))
        vis = np.zeros(NUM_KEYPOINTS)
        joint = rng.randrange(NUM_KEYPOINTS)
        kp[joint] = rng.randrange(20, 52), rng.randrange(25, 71)
        vis[joint] = 2
        crop[int(kp[joint, 1]) - 1 : int(kp[joint, 1]) + 2, int(kp[joint, 0]) - 1 : int(kp[joint, 0]) + 2] = (
            255
        )
        matrix, flipped = sample_transform(rng, kp, vis, (72, 96), 1.5, (64, 48), AugmentConfig())
        image, points, out_vis = warp_sample(crop, kp, vis, matrix, flipped, (64, 48))
        labelled = np.flatnonzero(out_vis)
        assert labelled.size <= 1
        if (
            labelled.size == 0
            or not (points[labelled[0]] >= 3).all()
            or not (points[labelled[0]] <= (44, 60)).all()
        ):
            continue  # the dot is gone or cut by the border, so its centroid moves
        ys, xs = np.mgrid[: image.shape[0], : image.shape[1]]
        weight = image.astype(np.float64)
        centroid = np.array([(xs * weight).sum(), (ys * weight).sum()]) / weight.sum()
        assert np.hypot(*(points[labelled[0]] - centroid)) <= 0.5
        hits += 1
    assert hits > 150


def test_joints_leaving_the_input_lose_their_label() -> None:
    kp = np.array([[5.0, 5.0]] * NUM_KEYPOINTS)
    kp[0] = (40.0, 50.0)
    vis = np.full(NUM_KEYPOINTS, 2.0)
    matrix, _ = sample_transform(random.Random(0), kp, vis, (72, 96), 1.5, (64, 48), None)
    _, points, out_vis = warp_sample(np.zeros((96, 72, 3), np.uint8), kp, vis, matrix, False, (64, 48))
    assert out_vis[0] == 2 and (out_vis[1:] == 0).all()
    assert (points[1:] < 0).all()


def test_fast_affine_equals_the_geometry_composition() -> None:
    rng = np.random.default_rng(4)
    for _ in range(50):
        center, size = rng.uniform(10, 100, 2), rng.uniform(20, 150, 2)
        rotation, out_wh, width = (
            float(rng.uniform(-90, 90)),
            (int(rng.integers(8, 200)), int(rng.integers(8, 200))),
            144,
        )
        np.testing.assert_allclose(
            udp_affine(center, size, rotation, out_wh), warp_matrix(center, size, rotation, out_wh), atol=1e-9
        )
        mirrored = np.array([width - 1 - center[0], center[1]])
        expected = compose_affine(warp_matrix(mirrored, size, rotation, out_wh), hflip_matrix(width))
        np.testing.assert_allclose(udp_affine(center, size, rotation, out_wh, width), expected, atol=1e-9)
