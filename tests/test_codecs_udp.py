"""UDP codec: disk (Eq. 6) and offsets (Eq. 7) by hand, exact round trip (Eq. 9)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from cal_core.codecs import build_codec
from tests.codec_cases import SIZES, random_joints, round_trip


def _one_joint(codec_name: str, **settings: float) -> tuple[dict[str, np.ndarray], np.ndarray]:
    codec = build_codec(codec_name, (64, 48), **settings)
    kpts = np.zeros((17, 2))
    kpts[3] = [3.5 * 47 / 11, 7.25 * 4.2]  # heatmap (3.5, 7.25)
    vis = np.zeros(17)
    vis[3] = 1
    return codec.encode(kpts, vis)


def test_disk_and_offsets_by_hand() -> None:
    targets, weights = _one_joint("udp", radius=4.0, offset_norm=1.5)
    disk, offset = targets["heatmap"][3], targets["offset"][3]  # UDP's heatmap target is B itself
    assert targets["offset"].shape == (17, 2, 16, 12) and disk.dtype == np.float32
    # (x=3, y=7): y - p = (0.5, 0.25), divided by 1.5
    assert disk[7, 3] == 1.0
    np.testing.assert_allclose(offset[:, 7, 3], [0.5 / 1.5, 0.25 / 1.5], rtol=1e-6)
    # (x=7, y=7): distance 3.509 <= 4, offset (-3.5, 0.25) / 1.5
    np.testing.assert_allclose(offset[:, 7, 7], [-3.5 / 1.5, 0.25 / 1.5], rtol=1e-6)
    # (x=8, y=7): distance sqrt(4.5^2 + 0.25^2) = 4.507 > 4 -> outside, zero offset
    assert disk[7, 8] == 0.0 and not offset[:, 7, 8].any()
    # disk pixels: integer p with (x - 3.5)^2 + (y - 7.25)^2 <= 16, counted independently
    ys, xs = np.mgrid[0:16, 0:12]
    assert disk.sum() == np.count_nonzero((xs - 3.5) ** 2 + (ys - 7.25) ** 2 <= 16)
    assert weights[3] == 1.0 and weights.sum() == 1.0
    assert not targets["heatmap"][4].any() and not targets["offset"][4].any()


@pytest.mark.parametrize("name", ["udp", "cal"])
@pytest.mark.parametrize("size", SIZES)
def test_round_trip_is_exact(name: str, size: tuple[int, int]) -> None:
    codec = build_codec(name, size)
    joints = random_joints(codec, 200, seed=7)
    decoded, decoded_np = round_trip(codec, joints)
    assert np.abs(decoded - joints).max() < 1e-3  # input pixels
    assert np.abs(decoded_np - joints).max() < 1e-3


@pytest.mark.parametrize("name", ["udp", "cal"])
def test_torch_decode_matches_numpy_on_random_outputs(name: str) -> None:
    codec = build_codec(name, (128, 96))
    rng = np.random.default_rng(8)
    heat = rng.random((3, 17, 32, 24)).astype(np.float32)
    offset = rng.normal(size=(3, 17, 2, 32, 24)).astype(np.float32)
    kpts, scores = codec.decode(torch.from_numpy(heat), torch.from_numpy(offset))
    kpts_np, scores_np = codec.decode_numpy(heat, offset)
    np.testing.assert_allclose(kpts.numpy(), kpts_np, atol=1e-4)
    np.testing.assert_allclose(scores.numpy(), scores_np, rtol=1e-6)
    # Eq. 9 by hand for one joint: argmax pixel + 1.5 * offset there, times the stride. UDP takes the argmax
    # of its sigmoid map blurred 7x7 (128x96), computed here with OpenCV (edge-replicated border).
    n, k = 1, 5
    confidence = heat[n, k].astype(np.float64)
    if name == "udp":
        assert codec.settings.blur_kernel == 7
        confidence = cv2.GaussianBlur(1 / (1 + np.exp(-confidence)), (7, 7), 0, borderType=cv2.BORDER_REPLICATE)
    y, x = np.unravel_index(confidence.argmax(), (32, 24))
    expected = (np.array([x, y]) + 1.5 * offset[n, k, :, y, x]) * codec.stride
    np.testing.assert_allclose(kpts_np[n, k], expected)
    np.testing.assert_allclose(scores_np[n, k], confidence[y, x], rtol=1e-9)


def test_decode_requires_offsets() -> None:
    codec = build_codec("udp", (64, 48))
    with pytest.raises(ValueError, match="offsets"):
        codec.decode(torch.zeros(1, 17, 16, 12))
    with pytest.raises(ValueError, match="offsets"):
        codec.decode_numpy(np.zeros((1, 17, 16, 12)), np.zeros((1, 17, 16, 12)))


def test_scores_are_probabilities_for_udp_logits_and_raw_for_cal() -> None:
    """UDP's heatmap is a logit map (Eq. 8 BCE): score = its sigmoid, blurred 7x7; CAL's is G itself."""
    heat = np.full((1, 17, 16, 12), -3.0, dtype=np.float32)
    heat[0, :, 5, 4] = 2.0  # the peak logit
    offset = np.zeros((1, 17, 2, 16, 12), dtype=np.float32)
    # OpenCV's 7-tap kernel has centre tap 0.28125: the peak pixel weighs 0.28125^2, the other 48 (all
    # sigmoid(-3), inside the map) the rest
    centre = 0.28125**2
    expected = centre / (1.0 + np.exp(-2.0)) + (1 - centre) / (1.0 + np.exp(3.0))  # 0.113343...
    for decode in (build_codec("udp", (64, 48)).decode_numpy, build_codec("udp", (64, 48)).decode):
        args = (heat, offset) if decode.__name__ == "decode_numpy" else (torch.from_numpy(heat), torch.from_numpy(offset))
        _, scores = decode(*args)
        np.testing.assert_allclose(np.asarray(scores), expected, rtol=1e-6)
    _, cal_scores = build_codec("cal", (64, 48)).decode_numpy(heat, offset)
    np.testing.assert_allclose(cal_scores, 2.0)


def test_blurred_argmax_finds_the_centre_of_a_predicted_plateau() -> None:
    """A network trained on the flat disk predicts a noisy plateau: its raw argmax lands anywhere in the disk.

    UDP's decoder blurs first (UDP-Pose, mmpose); the coarse estimate (offsets zeroed) moves to the centre.
    """
    codec = build_codec("udp", (128, 96))
    plain = build_codec("udp", (128, 96), blur_kernel=1)
    rng = np.random.default_rng(3)
    joints = random_joints(codec, 40, seed=4)
    errors = {"blurred": [], "plain": []}
    for person in joints:
        disk = codec.encode(person, np.full(17, 2))[0]["heatmap"]
        logits = np.where(disk > 0, 3.0, -3.0) + rng.normal(0.0, 0.3, disk.shape)
        zero = np.zeros((1, 17, 2, *codec.heatmap_size))
        for name, c in (("blurred", codec), ("plain", plain)):
            coarse = c.decode_numpy(logits[None], zero)[0][0]
            errors[name].append(np.linalg.norm((coarse - person) / codec.stride, axis=-1).mean())
    assert np.mean(errors["blurred"]) < 0.5 * np.mean(errors["plain"]), errors
