"""Shared helpers for the codec tests: random joints and a batched encode/decode round trip."""

from __future__ import annotations

import numpy as np
import torch

from cal_core.codecs import Codec

SIZES = [(64, 48), (128, 96), (256, 192)]


def random_joints(codec: Codec, n: int, seed: int = 0) -> np.ndarray:
    """``(n, 17, 2)`` sub-pixel joints in input px spread over the whole heatmap (pixel centres 0..w-1)."""
    height, width = codec.input_size
    return np.random.default_rng(seed).uniform([0, 0], [width - 1, height - 1], size=(n, 17, 2))


def encode_batch(codec: Codec, joints: np.ndarray) -> dict[str, np.ndarray]:
    """Encode every person with all joints visible and stack the targets along a batch axis."""
    targets = [codec.encode(person, np.full(len(person), 2))[0] for person in joints]
    return {key: np.stack([t[key] for t in targets]) for key in targets[0]}


def round_trip(codec: Codec, joints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """decode(encode(joints)) through torch and through numpy, both ``(n, 17, 2)`` input px."""
    targets = encode_batch(codec, joints)
    offset = targets.get("offset")
    torch_kpts, _ = codec.decode(torch.from_numpy(targets["heatmap"]), None if offset is None else torch.from_numpy(offset))
    numpy_kpts, _ = codec.decode_numpy(targets["heatmap"], offset)
    return torch_kpts.double().numpy(), numpy_kpts


def heatmap_error(codec: Codec, decoded: np.ndarray, joints: np.ndarray) -> np.ndarray:
    """Per-axis absolute error in heatmap pixels."""
    return np.abs(decoded - joints) / codec.stride
