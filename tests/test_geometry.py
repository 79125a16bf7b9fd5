"""UDP geometry: hand-computed matrices, round trips, flips."""

from __future__ import annotations

import numpy as np
import pytest

from cal_core import geometry
from cal_core.skeleton import FLIP_INDEX, NUM_KEYPOINTS


def test_box_to_center_size_tall_box_widens_then_pads() -> None:
    # box x=10..40, y=20..100: centre (25, 60); 30 < 0.75 * 80 = 60 so w -> 60; padded: (75, 100).
    center, size = geometry.box_to_center_size((10, 20, 30, 80), aspect_wh=0.75)
    np.testing.assert_allclose(center, [25.0, 60.0])
    np.testing.assert_allclose(size, [75.0, 100.0])


def test_box_to_center_size_wide_box_grows_height() -> None:
    # 120 > 0.75 * 40 so h -> 120 / 0.75 = 160; padding 1.0 leaves it.
    center, size = geometry.box_to_center_size((0, 0, 120, 40), aspect_wh=0.75, padding=1.0)
    np.testing.assert_allclose(center, [60.0, 20.0])
    np.testing.assert_allclose(size, [120.0, 160.0])


@pytest.mark.parametrize("box", [(0, 0, 0, 10), (0, 0, 10, -1), (0, np.nan, 10, 10)])
def test_box_to_center_size_rejects_degenerate_boxes(box: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="box"):
        geometry.box_to_center_size(box, aspect_wh=0.75)


def test_warp_matrix_no_rotation_hand_computed() -> None:
    # sx = (48 - 1) / 75, sy = (64 - 1) / 100 = 0.63; t = (23.5 - sx * 25, 31.5 - 0.63 * 60).
    m = geometry.warp_matrix(np.array([25.0, 60.0]), np.array([75.0, 100.0]), 0.0, (48, 64))
    expected = np.array([[47 / 75, 0.0, 23.5 - 47 / 75 * 25], [0.0, 0.63, 31.5 - 37.8]])
    np.testing.assert_allclose(m, expected, atol=1e-12)
    # the crop's corners (left/top edge centre) land on the output's first/last pixel centres
    corners = geometry.affine_points(np.array([[25 - 37.5, 60 - 50], [25 + 37.5, 60 + 50]]), m)
    np.testing.assert_allclose(corners, [[0.0, 0.0], [47.0, 63.0]], atol=1e-12)


def test_warp_matrix_rotation_is_counter_clockwise_on_screen() -> None:
    # size 10 -> output 11 px: unit scale; 90 deg: a point right of the centre moves up (y - 1).
    m = geometry.warp_matrix(np.zeros(2), np.array([10.0, 10.0]), 90.0, (11, 11))
    np.testing.assert_allclose(m, [[0.0, 1.0, 5.0], [-1.0, 0.0, 5.0]], atol=1e-12)
    np.testing.assert_allclose(geometry.affine_points(np.array([1.0, 0.0]), m), [5.0, 4.0], atol=1e-12)


def test_invert_and_compose_round_trip() -> None:
    rng = np.random.default_rng(0)
    m = geometry.warp_matrix(np.array([320.0, 200.0]), np.array([90.0, 120.0]), 30.0, (96, 128))
    pts = rng.uniform(0, 500, size=(5, 17, 2))
    back = geometry.affine_points(geometry.affine_points(pts, m), geometry.invert_affine(m))
    np.testing.assert_allclose(back, pts, atol=1e-9)
    np.testing.assert_allclose(geometry.compose_affine(m, geometry.invert_affine(m)), np.eye(2, 3), atol=1e-12)
    f = geometry.hflip_matrix(96)
    composed = geometry.compose_affine(f, m)
    np.testing.assert_allclose(
        geometry.affine_points(pts, composed), geometry.affine_points(geometry.affine_points(pts, m), f), atol=1e-9
    )


def test_invert_and_compose_match_numpy_on_general_affines() -> None:
    """The closed forms against numpy's 3x3 algebra on shears, rotations and reflections."""
    rng = np.random.default_rng(1)
    for _ in range(20):
        a, b = rng.normal(size=(2, 2, 3))
        full_a, full_b = np.vstack([a, [0, 0, 1]]), np.vstack([b, [0, 0, 1]])
        np.testing.assert_allclose(geometry.invert_affine(a), np.linalg.inv(full_a)[:2], rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(geometry.compose_affine(a, b), (full_a @ full_b)[:2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("linear", [[[1.0, 2.0], [2.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]], [[np.nan, 0.0], [0.0, 1.0]]])
def test_invert_affine_rejects_singular_matrices(linear: list[list[float]]) -> None:
    with pytest.raises(ValueError, match="not invertible"):
        geometry.invert_affine(np.hstack([np.array(linear), [[1.0], [2.0]]]))


def test_flip_keypoints_mirrors_and_swaps_pairs() -> None:
    kpts = np.zeros((NUM_KEYPOINTS, 3), dtype=np.float32)
    kpts[:, 0] = np.arange(NUM_KEYPOINTS)  # x = joint index
    kpts[:, 1] = 100 + np.arange(NUM_KEYPOINTS)
    kpts[:, 2] = 2
    kpts[9, 2] = 0
    flipped = geometry.flip_keypoints(kpts, width=48)
    # joint 9 (left wrist) comes from joint 10 (right wrist): x = 47 - 10 = 37, y = 110
    np.testing.assert_allclose(flipped[9], [37.0, 110.0, 2.0])
    np.testing.assert_allclose(flipped[10], [38.0, 109.0, 0.0])
    np.testing.assert_allclose(flipped[0], [47.0, 100.0, 2.0])  # nose keeps its label
    np.testing.assert_allclose(flipped[:, 0], 47 - np.array(FLIP_INDEX, dtype=np.float32))
    np.testing.assert_allclose(geometry.flip_keypoints(flipped, width=48), kpts)  # an involution
    np.testing.assert_allclose(geometry.affine_points(kpts[:, :2], geometry.hflip_matrix(48))[0], [47.0, 100.0])


def test_flip_keypoints_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match="keypoints"):
        geometry.flip_keypoints(np.zeros((5, 2)), width=10)
