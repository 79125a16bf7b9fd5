"""Inference: flip-test equivariance, exact decode through an oracle, back-projection, instance score."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cal_core import infer
from cal_core.codecs import CODECS, build_codec
from cal_core.geometry import flip_keypoints
from cal_core.skeleton import FLIP_INDEX

SIZE = (64, 48)


class TinyNet(nn.Module):
    """A deterministic random conv net with the contract's outputs at input / 4 (no symmetry built in)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
        self.heat = nn.Conv2d(8, 17, 3, 1, 1)
        self.off = nn.Conv2d(8, 34, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.body(x)
        n, _, h, w = f.shape
        return {"heatmap": self.heat(f), "offset": self.off(f).reshape(n, 17, 2, h, w)}


class MirrorAwareOracle(nn.Module):
    """Returns the codec targets of fixed keypoints, or of their mirror when the image is mirrored.

    The image carries a marker: brighter left half = original, brighter right half = mirror.
    A correct flip test must then decode the keypoints exactly.
    """

    def __init__(self, codec, keypoints: np.ndarray) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # gives predict a device to use
        plain, _ = codec.encode(keypoints, np.full(17, 2))
        mirror, _ = codec.encode(flip_keypoints(keypoints, SIZE[1]), np.full(17, 2))
        for key in ("heatmap", "offset"):
            if key in plain:
                self.register_buffer(f"{key}_plain", torch.from_numpy(plain[key])[None])
                self.register_buffer(f"{key}_mirror", torch.from_numpy(mirror[key])[None])
        self.keys = [key for key in ("heatmap", "offset") if key in plain]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        w = x.shape[-1]
        mirrored = x[..., w // 2 :].sum(dim=(1, 2, 3)) > x[..., : w // 2].sum(dim=(1, 2, 3))
        out = {}
        for key in self.keys:
            plain, mirror = getattr(self, f"{key}_plain"), getattr(self, f"{key}_mirror")
            shape = (-1,) + (1,) * (plain.ndim - 1)
            out[key] = torch.where(mirrored.view(shape), mirror, plain)
        return out


def _marked_images(n: int) -> torch.Tensor:
    images = torch.rand(n, 3, *SIZE)
    images[..., : SIZE[1] // 2] += 1.0  # the left half is brighter
    return images


@pytest.mark.parametrize("name", CODECS)
def test_flip_test_on_mirrored_input_gives_mirrored_keypoints(name: str) -> None:
    codec = build_codec(name, SIZE)
    model = TinyNet()
    images = torch.randn(3, 3, *SIZE)
    kpts, scores = infer.predict(model, images, codec, flip=True)
    kpts_m, scores_m = infer.predict(model, images.flip(-1), codec, flip=True)
    np.testing.assert_allclose(kpts_m.numpy(), flip_keypoints(kpts.numpy(), SIZE[1]), atol=1e-4)
    np.testing.assert_allclose(scores_m.numpy(), scores.numpy()[:, list(FLIP_INDEX)], atol=1e-6)
    assert model.training  # mode restored


def test_without_flip_test_the_random_net_is_not_equivariant() -> None:
    # guards the test above: equivariance comes from the flip test, not from the network
    codec = build_codec("udp", SIZE)
    model, images = TinyNet(), torch.randn(3, 3, *SIZE)
    kpts, _ = infer.predict(model, images, codec, flip=False)
    kpts_m, _ = infer.predict(model, images.flip(-1), codec, flip=False)
    assert np.abs(kpts_m.numpy() - flip_keypoints(kpts.numpy(), SIZE[1])).max() > 0.1


@pytest.mark.parametrize("name", ["udp", "cal"])
def test_flip_test_with_oracle_decodes_exactly(name: str) -> None:
    codec = build_codec(name, SIZE)
    truth = np.random.default_rng(1).uniform([0, 0], [SIZE[1] - 1, SIZE[0] - 1], size=(17, 2))
    model = MirrorAwareOracle(codec, truth)
    images = _marked_images(2)
    kpts, scores = infer.predict(model, images, codec, flip=True, batch_size=1)
    np.testing.assert_allclose(kpts.numpy(), np.broadcast_to(truth, (2, 17, 2)), atol=1e-3)
    kpts_m, _ = infer.predict(model, images.flip(-1), codec, flip=True)
    np.testing.assert_allclose(kpts_m.numpy(), np.broadcast_to(flip_keypoints(truth, SIZE[1]), (2, 17, 2)), atol=1e-3)


def test_flip_back_by_hand() -> None:
    heat = torch.zeros(1, 17, 2, 3)
    heat[0, 9, 1, 0] = 1.0  # left wrist at (x=0, y=1)
    offset = torch.zeros(1, 17, 2, 2, 3)
    offset[0, 9, :, 1, 0] = torch.tensor([0.4, -0.2])
    out = infer.flip_back({"heatmap": heat, "offset": offset})
    assert out["heatmap"][0, 10, 1, 2] == 1.0 and out["heatmap"].sum() == 1.0  # right wrist at x = 3 - 1 - 0
    assert out["offset"][0, 10, :, 1, 2].tolist() == pytest.approx([-0.4, -0.2])


def test_predict_rejects_wrong_input_size() -> None:
    with pytest.raises(ValueError, match="predict needs images"):
        infer.predict(TinyNet(), torch.zeros(1, 3, 32, 24), build_codec("udp", SIZE))


@pytest.mark.parametrize("name", sorted(CODECS))
def test_predict_on_no_images_returns_empty_results(name: str) -> None:
    """An image without boxes: (0, K, 2) and (0, K), as the exported keypoints graph returns (it once raised)."""
    kpts, scores = infer.predict(TinyNet(), torch.zeros(0, 3, *SIZE), build_codec(name, SIZE))
    assert tuple(kpts.shape) == (0, 17, 2) and tuple(scores.shape) == (0, 17)


def test_to_image_coords_by_hand() -> None:
    kpts = np.array([[[1.0, 2.0], [0.0, 0.0]]])
    mats = np.array([[[2.0, 0.0, 10.0], [0.0, 3.0, -5.0]]])
    np.testing.assert_allclose(infer.to_image_coords(kpts, mats), [[[12.0, 1.0], [10.0, -5.0]]])
    with pytest.raises(ValueError, match="affines"):
        infer.to_image_coords(kpts, mats[0])


def test_instance_score_by_hand() -> None:
    scores = np.array([[0.1, 0.5, 0.7, 0.2], [0.1, 0.0, 0.15, 0.05]])
    # first: (0.5 + 0.7) / 2 = 0.6 (0.2 is not above the threshold) x 0.9; second: nothing confident -> 0
    np.testing.assert_allclose(infer.instance_score(np.array([0.9, 1.0]), scores), [0.54, 0.0])
