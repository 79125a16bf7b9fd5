"""CAL codec: G = B * C (Eq. 10) by hand; the argmax of G is the joint's nearest pixel."""

from __future__ import annotations

import math

import numpy as np

from cal_core.codecs import build_codec
from tests.codec_cases import random_joints


def test_gaussian_weighted_disk_by_hand() -> None:
    codec = build_codec("cal", (64, 48), sigma=2.0, radius=4.0)
    kpts = np.zeros((17, 2))
    kpts[3] = [3.5 * 47 / 11, 7.25 * 4.2]  # heatmap (3.5, 7.25)
    targets, weights = codec.encode(kpts, np.eye(17)[3] * 2)
    g = targets["heatmap"][3]
    # B * C, divided by its sampled peak: the nearest pixels (3, 7) and (4, 7), |p - y|^2 = 0.3125
    peak = math.exp(-0.3125 / 8)
    assert g[7, 3] == g[7, 4] == 1.0
    # (x=7, y=7): 12.3125 <= 16 (inside) -> exp(-12.3125 / 8) / peak
    assert abs(g[7, 7] - math.exp(-12.3125 / 8) / peak) < 1e-7
    # (x=8, y=7): 20.3125 > 16: outside the disk, so 0 although C = exp(-20.3125 / 8) = 0.079 > 0
    assert g[7, 8] == 0.0
    ys, xs = np.mgrid[0:16, 0:12]
    np.testing.assert_array_equal(g > 0, (xs - 3.5) ** 2 + (ys - 7.25) ** 2 <= 16)  # support = the disk B
    assert weights.sum() == 1.0 and not targets["heatmap"][:3].any()


def test_default_sigma_follows_the_authors_configs() -> None:
    assert [build_codec("cal", s).sigma for s in ("64x48", "128x96", "256x192")] == [0.3, 1.0, 2.0]
    codec = build_codec("cal", "128x96")
    assert (codec.radius, codec.offset_norm) == (4.0, 1.5)


def test_argmax_of_target_is_nearest_pixel() -> None:
    codec = build_codec("cal", (128, 96))
    joints = random_joints(codec, 50, seed=9)
    for person in joints:
        heat = codec.encode(person, np.full(17, 2))[0]["heatmap"]
        hm = codec.input_to_heatmap(person)
        y, x = np.unravel_index(heat.reshape(17, -1).argmax(-1), codec.heatmap_size)
        np.testing.assert_array_equal(np.stack([x, y], -1), np.floor(hm + 0.5))


def test_target_peak_is_one_whatever_the_sub_pixel_phase() -> None:
    """At sigma 0.3 (64x48) a joint on a pixel corner once had a peak of exp(-0.5 / 0.18) = 0.062, not 1."""
    codec = build_codec("cal", (64, 48))
    assert codec.sigma == 0.3
    for phase in ((0.0, 0.0), (0.5, 0.5), (0.25, 0.5), (0.49, 0.1)):
        kpts = np.zeros((17, 2))
        kpts[0] = codec.heatmap_to_input(np.array([5.0 + phase[0], 7.0 + phase[1]]))
        g = codec.encode(kpts, np.eye(17)[0] * 2)[0]["heatmap"][0]
        assert g.max() == 1.0, phase
        # the shape is C's: at (x=6, y=7) exp(-(|p - y|^2 - d_min^2) / (2 sigma^2))
        d2 = (6 - 5 - phase[0]) ** 2 + phase[1] ** 2
        d2_min = min(phase[0], 1 - phase[0]) ** 2 + min(phase[1], 1 - phase[1]) ** 2
        assert abs(g[7, 6] - math.exp(-(d2 - d2_min) / 0.18)) < 1e-5, phase  # float32 targets
