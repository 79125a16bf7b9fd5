"""`cal-pose export`: a checkpoint (any method) -> two ONNX graphs, checked against torch.

- ``raw.onnx``: input ``x`` (N, 3, H, W) normalised crops -> ``heatmap``
  (N, K, h, w) [+ ``offset`` (N, K, 2, h, w)], the network alone.
- ``keypoints.onnx``: the same input -> ``keypoints`` (N, K, 3) = x, y, score
  in input-crop pixels: the codec's torch decode (argmax + quarter shift,
  DARK, or Eq. 9 argmax + offset for udp/cal) runs inside the graph, with the
  flip test optionally folded in (``--flip``).

Both graphs: opset :data:`OPSET`, dynamic batch, one file (weights inline),
and metadata_props describing the model (method, input size, mean/std,
keypoint names, skeleton, training run id, code version, graph kind, flip).

Self-check before anything is written as done: ``onnx.checker``, then
onnxruntime vs torch on random inputs and (with ``--shards``) real crops:
heatmaps/offsets within :data:`OUTPUT_TOL`, keypoints within
:data:`KEYPOINT_TOL_PX`. A mismatch fails the stage with the numbers; they
are in ``parity.json`` either way.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from cal_core.skeleton import FLIP_INDEX, KEYPOINT_NAMES, LIMBS

log = logging.getLogger(__name__)

OPSET = 18
OUTPUT_TOL = 1e-4
KEYPOINT_TOL_PX = 1e-3
RANDOM_BATCH = 4
REAL_CROPS = 8


class ParityError(RuntimeError):
    """onnxruntime and torch disagree beyond tolerance (the message has the numbers)."""


def flip_back(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Outputs of a mirrored input mapped back to the original frame.

    Heatmaps are mirrored along x and left/right channels swapped; offsets
    also get their x component negated. Under UDP the heatmap's first and
    last pixel centres coincide with the input's, so no pixel shift is needed.
    """
    index = torch.as_tensor(FLIP_INDEX)
    out = {"heatmap": outputs["heatmap"].flip(-1)[:, index]}
    if "offset" in outputs:
        offset = outputs["offset"].flip(-1)[:, index]
        out["offset"] = torch.stack([-offset[:, :, 0], offset[:, :, 1]], dim=2)
    return out


def flip_test(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Average of the outputs for ``x`` and its mirror (flipped back); the standard flip test."""
    plain = model(x)
    mirrored = flip_back(model(x.flip(-1)))
    return {key: (plain[key] + mirrored[key]) / 2 for key in plain}


class RawGraph(nn.Module):
    """The network with tuple outputs (heatmap[, offset]) for export."""

    def __init__(self, model: nn.Module, has_offsets: bool) -> None:
        super().__init__()
        self.model = model
        self.has_offsets = has_offsets

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(x)
        return (out["heatmap"], out["offset"]) if self.has_offsets else (out["heatmap"],)


class KeypointGraph(nn.Module):
    """Network + (optional flip test) + codec decode: (N, 3, H, W) -> (N, K, 3) x, y, score."""

    def __init__(self, model: nn.Module, codec: Any, flip: bool) -> None:
        super().__init__()
        self.model = model
        self.codec = codec
        self.flip = flip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = flip_test(self.model, x) if self.flip else self.model(x)
        offset = out.get("offset") if self.codec.has_offsets else None
        keypoints, scores = self.codec.decode(out["heatmap"], offset)
        return torch.cat([keypoints, scores.unsqueeze(-1)], dim=-1)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata_props of an ONNX file as a dict (weights are not loaded)."""
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def _export(module: nn.Module, example: torch.Tensor, path: Path, output_names: list[str],
            metadata: dict[str, str]) -> None:
    """Export ``module`` with a dynamic batch axis to one self-contained ONNX file with metadata."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, (example,), dynamo=True, input_names=["x"], output_names=output_names,
            opset_version=OPSET, dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
            external_data=False, verbose=False,
        )
    model = program.model_proto
    onnx.helper.set_model_props(model, metadata)
    onnx.checker.check_model(model, full_check=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)


def ort_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session (explicit provider: the wheel also lists Azure)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ambiguous_joints(heatmap: np.ndarray, tol: float) -> np.ndarray:
    """(N, K) True where the top two heatmap values are within ``tol``: argmax may differ legitimately."""
    flat = heatmap.reshape(*heatmap.shape[:2], -1)
    top2 = np.sort(flat, axis=-1)[..., -2:]
    return (top2[..., 1] - top2[..., 0]) <= tol


def compare(raw: RawGraph, keypoints: KeypointGraph, raw_path: Path, kp_path: Path, x: torch.Tensor,
            label: str) -> dict[str, Any]:
    """Numbers of onnxruntime vs torch on ``x``: max |diff| per raw output, max keypoint px error.

    Joints whose heatmap top-2 gap is within :data:`OUTPUT_TOL` are left out
    of the keypoint comparison (counted in ``ambiguous_joints``): a 1e-4
    heatmap agreement cannot decide their argmax.
    """
    with torch.no_grad():
        want_raw = [t.numpy() for t in raw(x)]
        want_kp = keypoints(x).numpy()
        heat = (flip_test(raw.model, x) if keypoints.flip else raw.model(x))["heatmap"].numpy()
    feed = {"x": x.numpy()}
    got_raw = ort_session(raw_path).run(None, feed)
    got_kp = ort_session(kp_path).run(None, feed)[0]
    names = ["heatmap", "offset"][: len(want_raw)]
    row: dict[str, Any] = {"inputs": label, "batch": int(x.shape[0])}
    for name, want, got in zip(names, want_raw, got_raw, strict=True):
        row[f"{name}_max_abs_diff"] = float(np.abs(want - got).max())
    clear = ~_ambiguous_joints(heat, OUTPUT_TOL)
    xy_err = np.linalg.norm(want_kp[..., :2] - got_kp[..., :2], axis=-1)
    row["keypoint_max_px_diff"] = float(xy_err[clear].max()) if clear.any() else 0.0
    row["score_max_abs_diff"] = float(np.abs(want_kp[..., 2] - got_kp[..., 2]).max())
    row["ambiguous_joints"] = int((~clear).sum())
    row["ok"] = bool(max(row[f"{n}_max_abs_diff"] for n in names) <= OUTPUT_TOL
                     and row["keypoint_max_px_diff"] <= KEYPOINT_TOL_PX
                     and row["score_max_abs_diff"] <= OUTPUT_TOL)
    return row


def metadata_for(config: dict[str, Any], codec: Any, graph: str, flip: bool, run_id: str | None,
                 code_version: str) -> dict[str, str]:
    """metadata_props for one graph: everything a deployer needs to feed it and read its output."""
    from cal_core.models import MEAN, STD

    height, width = codec.input_size
    return {
        "graph": graph,
        "method": str(config["method"]),
        "backbone": str(config.get("backbone", "")),
        "input_size": f"{height}x{width}",
        "heatmap_size": f"{codec.heatmap_size[0]}x{codec.heatmap_size[1]}",
        "input_format": "RGB float32 (N,3,H,W), /255 then (x-mean)/std",
        "mean": json.dumps([float(v) for v in MEAN]),
        "std": json.dumps([float(v) for v in STD]),
        "keypoint_names": json.dumps(list(KEYPOINT_NAMES)),
        "skeleton": json.dumps([list(limb) for limb in LIMBS]),
        "codec": json.dumps(codec.config()),
        "flip_test": "true" if (flip and graph == "keypoints") else "false",
        "output": ("keypoints (N,K,3): x, y in input-crop px (UDP pixel centres), score" if graph == "keypoints"
                   else "heatmap (N,K,h,w)" + (", offset (N,K,2,h,w) / offset_norm" if codec.has_offsets else "")),
        "training_run_id": run_id or "",
        "code_version": code_version,
    }


def codec_for(config: dict[str, Any]) -> Any:
    """The checkpoint's codec: method + input size + the settings it was trained with."""
    from cal_core.codecs import build_codec

    settings = {k: v for k, v in dict(config.get("codec") or {}).items() if k not in {"name", "input_size"}}
    return build_codec(config["method"], tuple(config["input_size"]), **settings)


def export_model(model: nn.Module, config: dict[str, Any], out_dir: Path, flip: bool,
                 real: torch.Tensor | None = None, run_id: str | None = None,
                 code_version: str = "") -> dict[str, Any]:
    """Export ``model`` to ``out_dir``/{raw,keypoints}.onnx, check parity, write parity.json.

    Raises :class:`ParityError` (after writing parity.json) when onnxruntime
    and torch disagree beyond tolerance.
    """
    codec = codec_for(config)
    model = model.eval().float()
    raw, keypoints = RawGraph(model, codec.has_offsets), KeypointGraph(model, codec, flip)
    height, width = codec.input_size
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(RANDOM_BATCH, 3, height, width, generator=generator)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"raw": out_dir / "raw.onnx", "keypoints": out_dir / "keypoints.onnx"}
    raw_names = ["heatmap", "offset"] if codec.has_offsets else ["heatmap"]
    for graph, module, names in (("raw", raw, raw_names), ("keypoints", keypoints, ["keypoints"])):
        _export(module, example, paths[graph], names, metadata_for(config, codec, graph, flip, run_id, code_version))
    rows = [compare(raw, keypoints, paths["raw"], paths["keypoints"], example, "random normal")]
    if real is not None and len(real):
        rows.append(compare(raw, keypoints, paths["raw"], paths["keypoints"], real.float(), "real crops"))
    report = {"opset": OPSET, "tolerances": {"output_abs": OUTPUT_TOL, "keypoint_px": KEYPOINT_TOL_PX},
              "method": config["method"], "input_size": f"{height}x{width}", "flip_test": flip,
              "checks": rows, "ok": all(r["ok"] for r in rows)}
    tmp = out_dir / "parity.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out_dir / "parity.json")
    if not report["ok"]:
        bad = [r for r in rows if not r["ok"]]
        raise ParityError(f"onnxruntime vs torch mismatch beyond tolerance: {json.dumps(bad)}")
    return report
