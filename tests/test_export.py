"""cal-pose export: ONNX graphs of the tiny net for every method, parity with torch, metadata."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from cal_core import export, infer
from cal_core.codecs import CODECS, build_codec
from cal_core.models import build_model, default_head
from cal_core.skeleton import KEYPOINT_NAMES

SIZE = (64, 48)


def _model(method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("tiny", default_head(method), input_size=SIZE).eval()


def _config(method: str) -> dict:
    return {"method": method, "backbone": "tiny", "input_size": list(SIZE),
            "codec": build_codec(method, SIZE).config()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module, dict]]:
    """Each method's tiny net exported once with the flip test (exports take seconds each)."""
    out = {}
    for method in CODECS:
        folder = tmp_path_factory.mktemp(f"onnx-{method}")
        model = _model(method)
        report = export.export_model(model, _config(method), folder, flip=True, run_id="r1", code_version="v1")
        out[method] = (folder, model, report)
    return out


@pytest.mark.parametrize("method", CODECS)
def test_export_parity_for_every_method(method: str, exported: dict) -> None:
    folder, model, report = exported[method]
    assert report["ok"] and json.loads((folder / "parity.json").read_text())["ok"]
    row = report["checks"][0]
    assert row["heatmap_max_abs_diff"] <= export.OUTPUT_TOL
    assert ("offset_max_abs_diff" in row) == (method in ("udp", "cal"))

    raw = onnx.load(str(folder / "raw.onnx"))
    assert max(op.version for op in raw.opset_import if op.domain in ("", "ai.onnx")) >= 17
    meta = export.read_metadata(folder / "keypoints.onnx")
    assert meta["method"] == method and meta["input_size"] == "64x48" and meta["flip_test"] == "true"
    assert json.loads(meta["keypoint_names"]) == list(KEYPOINT_NAMES)
    assert meta["training_run_id"] == "r1" and meta["code_version"] == "v1"
    assert json.loads(meta["mean"]) == pytest.approx([0.485, 0.456, 0.406])

    # Independent reference: infer.predict (torch, flip test) on a batch size the export never saw.
    x = torch.randn(3, 3, *SIZE, generator=torch.Generator().manual_seed(5))
    want_kp, want_score = infer.predict(model, x, build_codec(method, SIZE), flip=True)
    got = export.ort_session(folder / "keypoints.onnx").run(None, {"x": x.numpy()})[0]
    assert got.shape == (3, 17, 3)
    np.testing.assert_allclose(got[..., 2], want_score.numpy(), atol=1e-4)
    close = np.linalg.norm(got[..., :2] - want_kp.numpy(), axis=-1) <= export.KEYPOINT_TOL_PX
    assert close.mean() >= 0.95  # the rest: argmax ties at 1e-7 heatmap noise, allowed by the parity rule


def test_mismatch_fails_with_the_numbers(exported: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, model, _ = exported["udp"]
    monkeypatch.setattr(export, "OUTPUT_TOL", 0.0)
    real = torch.zeros(2, 3, *SIZE)
    with pytest.raises(export.ParityError, match="heatmap_max_abs_diff"):
        export.check_parity(model, _config("udp"), folder, flip=True, real=real)
    report = json.loads((folder / "parity.json").read_text())
    assert report["ok"] is False and report["checks"][0]["heatmap_max_abs_diff"] > 0.0
    assert [r["inputs"] for r in report["checks"]] == ["random normal", "real crops"]


@pytest.mark.slow  # two more dynamo exports (~10 s on a quiet 2-core machine)
def test_cli_exports_a_checkpoint(coco_mini: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cal_core.cli import main

    monkeypatch.setenv("CAL_POSE_TRACKING", "off")
    monkeypatch.chdir(tmp_path)
    assert main(["downsample", "--coco", str(coco_mini), "--split", "val", "--out", str(tmp_path / "val"),
                 "--input-size", "64x48"]) == 0
    model = _model("cal")
    ckpt = tmp_path / "model.pt"
    torch.save({"model": model.state_dict(), "config": _config("cal"), "code_version": "git:abc"}, ckpt)
    args = argparse.Namespace(checkpoint=str(ckpt), out=str(tmp_path / "onnx"), flip=False,
                              shards=str(tmp_path / "val" / "64x48"), experiment=None, run_name=None)
    assert export.run(args) == 0
    parity = json.loads((tmp_path / "onnx" / "parity.json").read_text())
    assert [r["inputs"] for r in parity["checks"]] == ["random normal", "real crops"]
    assert parity["checks"][1]["batch"] == export.REAL_CROPS and parity["ok"]
    assert {p.name for p in (tmp_path / "onnx").iterdir()} == {"raw.onnx", "keypoints.onnx", "parity.json"}
    meta = export.read_metadata(tmp_path / "onnx" / "raw.onnx")
    assert meta["graph"] == "raw" and meta["code_version"] == "git:abc" and meta["flip_test"] == "false"
    x = torch.randn(2, 3, *SIZE)
    heat, offset = export.ort_session(tmp_path / "onnx" / "raw.onnx").run(None, {"x": x.numpy()})
    with torch.no_grad():
        want = model(x)
    np.testing.assert_allclose(heat, want["heatmap"].numpy(), atol=1e-4)
    np.testing.assert_allclose(offset, want["offset"].numpy(), atol=1e-4)
