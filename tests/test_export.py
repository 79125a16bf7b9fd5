"""cal-pose export: ONNX graphs of the tiny net for every method, parity with torch, metadata."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cal_core import export, geometry, infer
from cal_core.codecs import CODECS, build_codec
from cal_core.data import crops
from cal_core.data.dataset import normalise
from cal_core.models import build_model, default_head
from cal_core.skeleton import KEYPOINT_NAMES

SIZE = (64, 48)
#: Person boxes (x, y, w, h) in a 240x320 test image: tall, wide, and one of the input aspect partly outside.
#: Each shrinks less than 2x into the input, so cal_core's anti-aliased crop is one plain bilinear warp.
BOXES = np.array([[100.0, 60.0, 50.0, 90.0], [20.0, 150.0, 60.0, 30.0], [280.0, -10.0, 60.0, 80.0]])
DEPLOY_KEYS = {"box_padding", "crop_box", "crop_affine", "crop_warp", "keypoint_score",
               "keypoint_score_threshold", "instance_score"}


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


def test_mismatch_fails_with_the_numbers(exported: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    folder = tmp_path / "onnx-udp"  # a copy: the failing check rewrites parity.json, which other tests read
    shutil.copytree(exported["udp"][0], folder)
    model = exported["udp"][1]
    monkeypatch.setattr(export, "OUTPUT_TOL", 0.0)
    real = torch.zeros(2, 3, *SIZE)
    with pytest.raises(export.ParityError, match="heatmap_max_abs_diff"):
        export.check_parity(model, _config("udp"), folder, flip=True, real=real)
    report = json.loads((folder / "parity.json").read_text())
    assert report["ok"] is False and report["checks"][0]["heatmap_max_abs_diff"] > 0.0
    assert [r["inputs"] for r in report["checks"]] == ["random normal", "real crops"]


class _Saturated(torch.nn.Module):
    """A net whose heatmap logits are ``scale`` times larger: sigmoid is exactly 1.0 on whole plateaus."""

    def __init__(self, model: torch.nn.Module, scale: float) -> None:
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(x)
        return {**out, "heatmap": out["heatmap"] * self.scale}


def test_parity_holds_for_a_confident_udp_net_with_saturated_plateaus(tmp_path: Path) -> None:
    """A blurred saturated plateau has exact ties the raw logits do not show; the check must not fail on them."""
    model = _Saturated(_model("udp"), 1000.0).eval()
    with torch.no_grad():
        saturated = torch.sigmoid(model(torch.randn(4, 3, *SIZE))["heatmap"]) == 1.0
    assert saturated.float().mean() > 0.05  # the case exists: pixels at exactly 1.0
    report = export.export_model(model, _config("udp"), tmp_path, flip=True, run_id="r1", code_version="v1")
    assert report["ok"], report["checks"]
    assert report["checks"][0]["heatmap_max_abs"] > 50.0  # relative tolerance: float32 rounding grows with it


def _formula(statements: str, **names: float) -> dict:
    """Run a metadata formula (Python statements) on ``names``; returns the names it defines."""
    scope = dict(names)
    exec(statements, {"__builtins__": {"max": max}}, scope)  # our own export's metadata, not user input
    return scope


def test_metadata_states_the_deployment_contract(exported: dict) -> None:
    """The crop/score keys hold the code's constants, and the formulas compute cal_core.geometry's crop."""
    folder = exported["cal"][0]
    raw, kp = export.read_metadata(folder / "raw.onnx"), export.read_metadata(folder / "keypoints.onnx")
    assert set(kp) >= DEPLOY_KEYS and set(raw) >= DEPLOY_KEYS | {"heatmap_to_input"}
    assert "heatmap_to_input" not in kp
    assert json.loads(kp["box_padding"]) == geometry.DEFAULT_PADDING == 1.25
    assert json.loads(kp["keypoint_score_threshold"]) == infer.KEYPOINT_SCORE_THRESHOLD
    assert f"> {infer.KEYPOINT_SCORE_THRESHOLD} " in kp["instance_score"]
    # UDP heatmap -> input scale (W-1)/(w-1), (H-1)/(h-1) at 64x48 -> 16x12: 47/11 and 63/15, not 4.
    assert json.loads(raw["heatmap_to_input"]) == pytest.approx([47 / 11, 63 / 15], abs=1e-12)
    height, width = SIZE
    for box in [*BOXES, (0.0, 0.0, 30.0, 40.0)]:  # the last has the input's aspect exactly
        x, y, w, h = box
        crop = _formula(kp["crop_box"], x=x, y=y, w=w, h=h, W=width, H=height,
                        box_padding=json.loads(kp["box_padding"]))
        center, size = geometry.box_to_center_size(box, width / height)
        np.testing.assert_allclose([crop["cx"], crop["cy"], crop["size_w"], crop["size_h"]], [*center, *size],
                                   rtol=1e-12)
        affine = _formula(kp["crop_affine"], **crop)
        np.testing.assert_allclose(affine["M"], geometry.warp_matrix(center, size, 0.0, (width, height)),
                                   rtol=1e-12, atol=1e-9)


def _deploy_affine(meta: dict[str, str], box: np.ndarray) -> np.ndarray:
    """Image px -> input px for a person box, from the metadata only (the recipe of docs/quickstart.md)."""
    height, width = (int(v) for v in meta["input_size"].split("x"))
    x, y, w, h = box
    pad = float(meta["box_padding"])
    cx, cy = x + w / 2, y + h / 2
    size_w, size_h = max(w, h * (width / height)) * pad, max(h, w / (width / height)) * pad
    sx, sy = (width - 1) / size_w, (height - 1) / size_h
    return np.array([[sx, 0, (width - 1) / 2 - sx * cx], [0, sy, (height - 1) / 2 - sy * cy]])


def _deploy_estimate(path: Path, image_bgr: np.ndarray, boxes: np.ndarray,
                     box_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints (N, K, 3) in image px and person scores (N,) with numpy, cv2 and onnxruntime only.

    The recipe of docs/quickstart.md ("Deploying the ONNX model"), step for step.
    """
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    height, width = (int(v) for v in meta["input_size"].split("x"))
    mean, std = np.float32(json.loads(meta["mean"])), np.float32(json.loads(meta["std"]))
    mats = [_deploy_affine(meta, box) for box in boxes]
    crops_bgr = [cv2.warpAffine(image_bgr, m, (width, height), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0) for m in mats]
    x = (np.stack(crops_bgr)[..., ::-1] / np.float32(255) - mean) / std
    out = session.run(None, {"x": x.transpose(0, 3, 1, 2).astype(np.float32)})[0]
    for m, kpts in zip(mats, out, strict=True):
        back = cv2.invertAffineTransform(m)
        kpts[:, :2] = kpts[:, :2] @ back[:, :2].T + back[:, 2]
    above = out[..., 2] > float(meta["keypoint_score_threshold"])
    mean_above = (out[..., 2] * above).sum(-1) / np.maximum(above.sum(-1), 1)
    return out, np.asarray(box_scores) * mean_above


@pytest.mark.parametrize("method", CODECS)
def test_metadata_recipe_reproduces_cal_core_inference(method: str, exported: dict) -> None:
    """Image + boxes -> keypoints by the metadata alone == cal_core's evaluation path, within 1e-3 px."""
    folder, model, _ = exported[method]
    codec = build_codec(method, SIZE)
    image = np.random.default_rng(3).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    box_scores = np.array([0.9, 0.5, 1.0])
    got, person_scores = _deploy_estimate(folder / "keypoints.onnx", image, BOXES, box_scores)

    # cal_core: padded box -> UDP crop (anti-aliased renderer), normalise, torch flip test, inverse affine.
    mats = [crops.crop_matrix(tuple(box), SIZE, 1.0, geometry.DEFAULT_PADDING) for box in BOXES]
    decoded = crops.Decoded(image, 1, (image.shape[1], image.shape[0]))
    x = torch.stack([normalise(crops.render(decoded, m, SIZE[::-1])) for m in mats])
    kpts, scores = infer.predict(model, x, codec, flip=True)
    want = infer.to_image_coords(kpts, np.stack([geometry.invert_affine(m) for m in mats]))

    with torch.no_grad():
        heat = infer.forward(model, x, flip=True)["heatmap"]
    clear = ~export.undecidable_joints(codec, heat, export.ROUNDING_TOL)  # ties cannot be held to 1e-3 px
    heat = heat.numpy()
    assert clear.mean() >= 0.8
    assert np.linalg.norm(got[..., :2] - want, axis=-1)[clear].max() <= export.KEYPOINT_TOL_PX
    np.testing.assert_allclose(got[..., 2], scores.numpy(), atol=1e-4)
    np.testing.assert_allclose(person_scores, infer.instance_score(box_scores, scores.numpy()), atol=1e-4)

    # keypoint_score: the (flip-averaged) heatmap maximum, through a sigmoid iff the heatmap is a logit map,
    # blurred first where the codec's decoder blurs (udp; OpenCV here, edge-replicated border).
    meta = export.read_metadata(folder / "keypoints.onnx")
    logits = getattr(codec, "logit_heatmap", False)
    assert meta["keypoint_score"].startswith("sigmoid") == logits
    confidence = 1 / (1 + np.exp(-heat.astype(np.float64))) if logits else heat.astype(np.float64)
    if getattr(codec, "blur_heatmap", False):
        assert "blurred" in meta["keypoint_score"]
        kernel = (codec.settings.blur_kernel,) * 2
        confidence = np.stack([[cv2.GaussianBlur(m, kernel, 0, borderType=cv2.BORDER_REPLICATE) for m in maps]
                               for maps in confidence])
    np.testing.assert_allclose(got[..., 2], confidence.reshape(*heat.shape[:2], -1).max(-1), atol=1e-4)


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
