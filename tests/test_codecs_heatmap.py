"""Heatmap codec: Eq. 2 target values, quantization error of argmax, the quarter shift."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cal_core.codecs import build_codec
from tests.codec_cases import SIZES, heatmap_error, random_joints, round_trip


def test_stride_and_sizes_follow_udp() -> None:
    codec = build_codec("heatmap", "64x48")
    assert codec.heatmap_size == (16, 12)
    np.testing.assert_allclose(codec.stride, [47 / 11, 63 / 15])  # (W_in - 1) / (W_hm - 1), (H_in - 1) / (H_hm - 1)


def test_encode_gaussian_value_by_hand() -> None:
    codec = build_codec("heatmap", (64, 48), sigma=1.0)
    kpts = np.zeros((17, 2))
    kpts[3] = [3.5 * 47 / 11, 7.25 * 4.2]  # heatmap (3.5, 7.25)
    vis = np.zeros(17)
    vis[3] = 2
    targets, weights = codec.encode(kpts, vis)
    heat = targets["heatmap"]
    assert heat.shape == (17, 16, 12) and heat.dtype == np.float32
    # pixel (x=3, y=7): |p - y|^2 = 0.5^2 + 0.25^2 = 0.3125 -> exp(-0.3125 / 2) = 0.85534533
    assert heat[3, 7, 3] == pytest.approx(0.85534533, abs=1e-6)
    # pixel (x=0, y=0): 3.5^2 + 7.25^2 = 64.8125 -> exp(-32.40625)
    assert heat[3, 0, 0] == pytest.approx(math.exp(-32.40625), rel=1e-4)
    np.testing.assert_array_equal(weights, np.eye(17, dtype=np.float32)[3])
    assert not heat[np.arange(17) != 3].any()  # unlabelled joints: zero maps


def test_joints_outside_heatmap_get_zero_weight_and_target() -> None:
    codec = build_codec("heatmap", (64, 48))
    kpts = np.full((17, 2), 20.0)
    kpts[0] = [-3.0, 20.0]  # heatmap x = -0.70 (< -0.5: no pixel)
    kpts[1] = [47.0 + 2.2, 20.0]  # heatmap x = 11.51 (>= w - 0.5)
    kpts[2] = [np.nan, 20.0]
    targets, weights = codec.encode(kpts, np.full(17, 2))
    assert weights[:3].tolist() == [0.0, 0.0, 0.0] and weights[3:].all()
    assert not targets["heatmap"][:3].any()


def test_bad_input_shapes_raise() -> None:
    codec = build_codec("heatmap", (64, 48))
    with pytest.raises(ValueError, match="keypoints"):
        codec.encode(np.zeros((17, 3)), np.ones(17))
    with pytest.raises(ValueError, match="heatmaps"):
        codec.decode(torch.zeros(1, 17, 8, 6))


@pytest.mark.parametrize("size", SIZES)
def test_plain_argmax_has_half_pixel_quantization_error(size: tuple[int, int]) -> None:
    codec = build_codec("heatmap", size, quarter_shift=False)
    joints = random_joints(codec, 300)
    decoded, decoded_np = round_trip(codec, joints)
    err = heatmap_error(codec, decoded, joints)
    assert 0.48 < err.max() <= 0.5 + 1e-5  # nearest pixel: at most, and nearly, half a heatmap pixel
    assert err.mean() == pytest.approx(0.25, abs=0.02)  # uniform sub-pixel position: mean |error| = 1/4
    np.testing.assert_allclose(decoded, decoded_np, atol=1e-4)


@pytest.mark.parametrize("size", SIZES)
def test_quarter_shift_halves_worst_case_inside(size: tuple[int, int]) -> None:
    codec = build_codec("heatmap", size)
    joints = random_joints(codec, 300, seed=1)
    decoded, decoded_np = round_trip(codec, joints)
    err = heatmap_error(codec, decoded, joints)
    hm = codec.input_to_heatmap(joints)
    h, w = codec.heatmap_size
    inner = (hm[..., 0] > 0.5) & (hm[..., 0] < w - 1.5) & (hm[..., 1] > 0.5) & (hm[..., 1] < h - 1.5)
    assert err[inner].max() <= 0.25 + 1e-5
    assert err.mean() == pytest.approx(0.125, abs=0.02)  # uniform position, error |u - 1/4| on [0, 1/2]
    np.testing.assert_allclose(decoded, decoded_np, atol=1e-4)


def test_torch_decode_matches_numpy_on_noisy_maps() -> None:
    codec = build_codec("heatmap", (128, 96))
    heat = np.random.default_rng(2).random((4, 17, 32, 24)).astype(np.float32)
    kpts, scores = codec.decode(torch.from_numpy(heat))
    kpts_np, scores_np = codec.decode_numpy(heat)
    np.testing.assert_allclose(kpts.numpy(), kpts_np, atol=1e-4)
    np.testing.assert_allclose(scores.numpy(), heat.reshape(4, 17, -1).max(-1))
    np.testing.assert_allclose(scores_np, scores.numpy())


def test_quarter_shift_direction_by_hand() -> None:
    codec = build_codec("heatmap", (64, 48))
    heat = np.zeros((1, 17, 16, 12), dtype=np.float32)
    heat[0, :, 5, 4] = 1.0
    heat[0, :, 5, 5] = 0.5  # right neighbour higher -> +0.25 in x
    heat[0, :, 4, 4] = 0.3  # upper neighbour higher -> -0.25 in y
    kpts, _ = codec.decode(torch.from_numpy(heat))
    np.testing.assert_allclose(kpts[0, 0].numpy(), [4.25 * 47 / 11, 4.75 * 4.2], rtol=1e-6)
