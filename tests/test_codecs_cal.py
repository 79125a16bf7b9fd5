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
    # (x=3, y=7): |p - y|^2 = 0.3125, sigma 2 -> exp(-0.3125 / 8)
    assert abs(g[7, 3] - math.exp(-0.3125 / 8)) < 1e-7
    # (x=7, y=7): 12.3125 <= 16 (inside) -> exp(-12.3125 / 8)
    assert abs(g[7, 7] - math.exp(-12.3125 / 8)) < 1e-7
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
