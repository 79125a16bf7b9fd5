"""build_codec, settings and defaults, ONNX export of every decoder, encode speed."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch.overrides import TorchFunctionMode

from cal_core.codecs import CODECS, Codec, build_codec, default_settings, parse_size


def test_build_every_codec_and_describe_it() -> None:
    for name in CODECS:
        codec = build_codec(name, "128x96")
        assert codec.name == name and codec.input_size == (128, 96) and codec.heatmap_size == (32, 24)
        assert codec.has_offsets == (name in ("udp", "cal"))
        assert codec.config()["name"] == name and codec.config()["input_size"] == [128, 96]


def test_overrides_and_errors() -> None:
    assert build_codec("cal", (64, 48), sigma=0.5, radius=None).sigma == 0.5
    assert build_codec("cal", (64, 48), radius=None).radius == 4.0
    with pytest.raises(ValueError, match="unknown codec"):
        build_codec("simcc", (64, 48))
    with pytest.raises(ValueError, match="unknown codec settings"):
        build_codec("udp", (64, 48), sgima=1.0)
    with pytest.raises(ValueError, match="positive"):
        build_codec("udp", (64, 48), radius=0.0)
    with pytest.raises(ValueError, match="64x48"):
        parse_size("64-48")
    assert parse_size("256x192") == (256, 192)


def test_untabulated_size_takes_nearest_defaults() -> None:
    assert default_settings("cal", (112, 84)) == default_settings("cal", (128, 96))
    assert default_settings("dark", "384x288").blur_kernel == 11


class _Decode(torch.nn.Module):
    def __init__(self, codec: Codec) -> None:
        super().__init__()
        self.codec = codec

    def forward(self, heatmap: torch.Tensor, offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codec.decode(heatmap, offset)


@pytest.mark.parametrize("name", CODECS)
def test_decode_exports_to_onnx_with_dynamic_batch(name: str) -> None:
    codec = build_codec(name, (64, 48))
    rng = np.random.default_rng(0)
    args = [torch.from_numpy(rng.random((2, 17, 16, 12), dtype=np.float32))]
    names = ["heatmap"]
    if codec.has_offsets:
        args.append(torch.from_numpy(rng.normal(size=(2, 17, 2, 16, 12)).astype(np.float32)))
        names.append("offset")
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Decode(codec).eval(), tuple(args), buffer, dynamo=False, input_names=names,
                          dynamic_axes={n: {0: "batch"} for n in names})
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    feed = {n: np.concatenate([a.numpy()] * 3) for n, a in zip(names, args, strict=True)}  # batch 6
    kpts, scores = session.run(None, feed)
    ref_kpts, ref_scores = codec.decode_numpy(*feed.values())
    np.testing.assert_allclose(kpts, ref_kpts, atol=1e-3)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-6)


class _TorchCalls(TorchFunctionMode):
    """Counts the torch functions and tensor methods Python calls while active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", CODECS)
def test_batch_encode_is_vectorised(name: str) -> None:
    # The trainer encodes whole batches (cal_core.data.dataset.add_targets). Vectorised code makes the
    # same torch calls whatever the batch size; a Python loop over people makes more calls
    # for a bigger batch. Counting calls (not timing) keeps the check exact on a busy machine.
    codec = build_codec(name, (128, 96))
    counts = []
    for n in (2, 64):
        joints = torch.from_numpy(np.random.default_rng(0).uniform(0, 95, size=(n, 17, 2)))
        with _TorchCalls() as calls:
            codec.encode_torch(joints, torch.full((n, 17), 2.0))
        counts.append(calls.calls)
    assert counts[0] == counts[1] > 0, f"{name}: {counts[0]} torch calls for 2 people, {counts[1]} for 64"
