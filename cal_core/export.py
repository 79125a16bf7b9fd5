"""`cal-pose export`: a checkpoint (any method) -> two ONNX graphs, checked against torch.

- ``raw.onnx``: input ``x`` (N, 3, H, W) normalised crops -> ``heatmap``
  (N, K, h, w) [+ ``offset`` (N, K, 2, h, w)], the network alone.
- ``keypoints.onnx``: the same input -> ``keypoints`` (N, K, 3) = x, y, score
  in input-crop pixels: the codec's torch decode (argmax + quarter shift,
  DARK, or Eq. 9 argmax + offset for udp/cal) runs inside the graph, with the
  flip test optionally folded in (``--flip``).

Both graphs: opset :data:`OPSET`, dynamic batch, one file (weights inline),
and metadata_props describing the model (method, input size, mean/std,
keypoint names, skeleton, training run id, code version, graph kind, flip)
and the deployment contract (:func:`deployment_metadata`): how to cut the
input crop from an image and a person box, how to map keypoints back, what
the scores mean. The formulas there are Python statements, exact and
checked against :mod:`cal_core.geometry` by the tests.

Self-check before anything is written as done: ``onnx.checker``, then
onnxruntime vs torch on random inputs and (with ``--shards``) real crops:
heatmaps/offsets within :data:`OUTPUT_TOL` of their scale, keypoints within
:data:`KEYPOINT_TOL_PX` where the argmax is not a tie (:func:`compare`). A
mismatch fails the stage with the numbers; they are in ``parity.json``
either way.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from cal_core import infer, tracking
from cal_core.cli import StageFailed
from cal_core.geometry import DEFAULT_PADDING
from cal_core.skeleton import KEYPOINT_NAMES, LIMBS

log = logging.getLogger(__name__)

OPSET = 18
OUTPUT_TOL = 1e-4
KEYPOINT_TOL_PX = 1e-3
#: Relative float32 rounding slack between runtimes computing the same peak map (sigmoid, blur).
ROUNDING_TOL = 1e-5
RANDOM_BATCH = 4
REAL_CROPS = 8

#: Person box ``x, y, w, h`` (image px) -> crop centre and size: :func:`cal_core.geometry.box_to_center_size`
#: with the input's aspect ``W / H`` and ``box_padding``, as Python statements.
CROP_BOX = ("cx = x + w / 2; cy = y + h / 2; "
            "size_w = max(w, h * (W / H)) * box_padding; size_h = max(h, w / (W / H)) * box_padding")
#: Image px -> input px affine ``M`` (2x3, ``p' = M @ (x, y, 1)``): :func:`cal_core.geometry.warp_matrix`
#: (UDP: scale (W - 1) / size, not W / size as HRNet/mmpose's get_affine_transform).
CROP_AFFINE = ("sx = (W - 1) / size_w; sy = (H - 1) / size_h; "
               "M = [[sx, 0, (W - 1) / 2 - sx * cx], [0, sy, (H - 1) / 2 - sy * cy]]")
#: How to make the crop pixels (one bilinear warp: the same geometry as the evaluation crops, which
#: were rendered anti-aliased at margin x the input size, stored as JPEG and warped down once more,
#: docs/quickstart.md "Low resolution") and map keypoints back.
CROP_WARP = ("cv2.warpAffine(image_bgr, M, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, "
             "borderValue=0), then input_format; keypoints: input px -> image px by the inverse of M")
#: What a keypoint score is, per codec: a value read at the argmax pixel of the heatmap (d: that
#: pixel's distance to the joint in heatmap px; sigma and R: the codec's settings, metadata ``codec``).
KEYPOINT_SCORES = {
    "heatmap": "heatmap value at the argmax: the regressed Gaussian C (Eq. 2, target exp(-d^2 / (2 sigma^2))), "
               "not squashed (may leave [0, 1])",
    "dark": "heatmap value at the argmax (before DARK's blur): the regressed Gaussian C (Eq. 2, target "
            "exp(-d^2 / (2 sigma^2))), not squashed (may leave [0, 1])",
    "udp": "sigmoid of the heatmap logits, blurred (codec blur_kernel, edge-replicated border), at its "
           "argmax: the predicted probability that pixels there lie within R of the joint (disk B, Eqs. 6 and 8)",
    "cal": "heatmap value at the argmax: the regressed G = B * C (Eq. 10: the Gaussian C within R of the "
           "joint, 0 outside), scaled so the target at the joint's nearest pixel is 1; not squashed "
           "(may leave [0, 1])",
}


class ParityError(StageFailed):
    """onnxruntime and torch disagree beyond tolerance (the message has the numbers)."""


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
        out = infer.forward(self.model, x, self.flip)
        offset = out.get("offset") if self.codec.has_offsets else None
        keypoints, scores = self.codec.decode(out["heatmap"], offset)
        return torch.cat([keypoints, scores.unsqueeze(-1)], dim=-1)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata_props of an ONNX file as a dict (weights are not loaded); a ValueError if it is not ONNX."""
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError as exc:
        raise ValueError(f"{path} is not an ONNX model ({exc})") from exc
    if not model.graph.node:  # an empty file parses as an empty ModelProto
        raise ValueError(f"{path} is not an ONNX model (no graph: an empty or truncated file?)")
    return {p.key: p.value for p in model.metadata_props}


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path, output_names: list[str],
            metadata: dict[str, str]) -> None:
    """Export ``module`` with a dynamic batch axis to one self-contained ONNX file with metadata."""
    chatter = io.StringIO()  # the exporter prints progress lines on stdout; keep CLI output clean
    with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, (example,), dynamo=True, input_names=["x"], output_names=output_names,
            opset_version=OPSET, dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
            external_data=False, verbose=False,
        )
    log.debug("torch.onnx.export: %s", chatter.getvalue())
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


def undecidable_joints(codec: Any, heatmap: torch.Tensor, tol: float) -> np.ndarray:
    """(N, K) True where the top two values of the map the codec argmaxes differ by <= ``tol`` (relative, >= 1).

    Measured on :meth:`~cal_core.codecs.base.Codec.peak_map`, not on the raw
    heatmap: a confident udp net saturates the sigmoid at exactly 1.0, and the
    blurred plateau then has exact ties the raw logits do not show. Which of
    two tied pixels wins depends on float32 rounding, which differs between
    runtimes, so no keypoint tolerance can hold such a joint.
    """
    flat = codec.peak_map(heatmap.float()).reshape(*heatmap.shape[:2], -1)
    top2 = flat.topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1] <= tol * top2[..., 0].abs().clamp(min=1.0)).numpy()


def compare(raw: RawGraph, keypoints: KeypointGraph, raw_path: Path, kp_path: Path, x: torch.Tensor,
            label: str) -> dict[str, Any]:
    """Numbers of onnxruntime vs torch on ``x``: max |diff| per raw output, max keypoint px error.

    Raw outputs must agree within :data:`OUTPUT_TOL` relative to their
    largest magnitude (at least 1: float32 rounding grows with it). Joints
    whose argmax the measured heatmap difference (or rounding,
    :data:`ROUNDING_TOL`) can flip (:func:`undecidable_joints`) are left out
    of the keypoint comparison and counted in ``undecidable_joints``: the
    peak map (a sigmoid and a blur at most) moves by no more than the heatmap,
    so a gap above twice that difference keeps its argmax. The gap is at
    least :data:`OUTPUT_TOL`: the keypoint graph is optimised apart from the
    raw one, and its own heatmap difference is not measured.
    """
    with torch.no_grad():
        want_raw = [t.numpy() for t in raw(x)]
        want_kp = keypoints(x).numpy()
        heat = infer.forward(raw.model, x, keypoints.flip)["heatmap"]
    feed = {"x": x.numpy()}
    got_raw = ort_session(raw_path).run(None, feed)
    got_kp = ort_session(kp_path).run(None, feed)[0]
    names = ["heatmap", "offset"][: len(want_raw)]
    row: dict[str, Any] = {"inputs": label, "batch": int(x.shape[0])}
    close = []
    for name, want, got in zip(names, want_raw, got_raw, strict=True):
        row[f"{name}_max_abs_diff"] = float(np.abs(want - got).max())
        row[f"{name}_max_abs"] = float(np.abs(want).max())  # the scale the difference is measured against
        close.append(row[f"{name}_max_abs_diff"] <= OUTPUT_TOL * max(1.0, row[f"{name}_max_abs"]))
    tie = max(OUTPUT_TOL, 2 * row["heatmap_max_abs_diff"] + ROUNDING_TOL)  # the keypoint graph is another graph
    clear = ~undecidable_joints(keypoints.codec, heat, tie)
    xy_err = np.linalg.norm(want_kp[..., :2] - got_kp[..., :2], axis=-1)
    row["keypoint_max_px_diff"] = float(xy_err[clear].max()) if clear.any() else 0.0
    row["score_max_abs_diff"] = float(np.abs(want_kp[..., 2] - got_kp[..., 2]).max())
    row["undecidable_joints"] = int((~clear).sum())
    row["ok"] = bool(all(close) and row["keypoint_max_px_diff"] <= KEYPOINT_TOL_PX
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
                   else "heatmap (N,K,h,w)" + (", offset (N,K,2,h,w) / offset_norm" if codec.has_offsets else "")
                   + "; heatmap px -> input px: x, y times heatmap_to_input"),
        "training_run_id": run_id or "",
        "code_version": code_version,
        **deployment_metadata(codec, graph, flip),
    }


def deployment_metadata(codec: Any, graph: str, flip: bool) -> dict[str, str]:
    """The metadata keys that say how to cut the crop, map keypoints back and read the scores.

    Without them a deployer would guess HRNet's conventions (``W / size``
    affine, stride-4 heatmaps), which put keypoints up to 1 input px off
    (affine) or 3 px (stride 4 for 47/11 at the right edge of a 64x48 input).
    Every value comes from the constants the code uses (padding, UDP stride,
    score threshold), so metadata and code cannot drift apart.
    """
    score = KEYPOINT_SCORES[codec.name]
    if flip and graph == "keypoints":
        score += "; read from the heatmap averaged with the mirrored input's (flip_test)"
    meta = {
        "box_padding": json.dumps(DEFAULT_PADDING),
        "crop_box": CROP_BOX,
        "crop_affine": CROP_AFFINE,
        "crop_warp": CROP_WARP,
        "keypoint_score": score,
        "keypoint_score_threshold": json.dumps(infer.KEYPOINT_SCORE_THRESHOLD),
        "instance_score": (f"box_score * mean of the keypoint scores > {infer.KEYPOINT_SCORE_THRESHOLD} "
                           "(0 if none), as HRNet/mmpose and cal-pose evaluate"),
    }
    if graph == "raw":  # UDP: (W - 1) / (w - 1), not the stride 4
        meta["heatmap_to_input"] = json.dumps([float(v) for v in codec.stride])
    return meta


def codec_for(config: dict[str, Any]) -> Any:
    """The checkpoint's codec: method + input size + the settings it was trained with."""
    from cal_core.codecs import build_codec

    settings = {k: v for k, v in dict(config.get("codec") or {}).items() if k not in {"name", "input_size"}}
    return build_codec(config["method"], tuple(config["input_size"]), **settings)


def _random_inputs(codec: Any) -> torch.Tensor:
    """The fixed random batch used as export example and first parity input."""
    height, width = codec.input_size
    return torch.randn(RANDOM_BATCH, 3, height, width, generator=torch.Generator().manual_seed(0))


def export_graphs(model: nn.Module, config: dict[str, Any], out_dir: Path, flip: bool,
                  run_id: str | None = None, code_version: str = "") -> dict[str, Path]:
    """Write ``out_dir``/raw.onnx and keypoints.onnx (checked by onnx.checker); returns their paths."""
    codec = codec_for(config)
    model = model.eval().float()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"raw": out_dir / "raw.onnx", "keypoints": out_dir / "keypoints.onnx"}
    graphs = (("raw", RawGraph(model, codec.has_offsets), ["heatmap", "offset"][: 1 + codec.has_offsets]),
              ("keypoints", KeypointGraph(model, codec, flip), ["keypoints"]))
    for graph, module, names in graphs:
        export_onnx(module, _random_inputs(codec), paths[graph], names,
                    metadata_for(config, codec, graph, flip, run_id, code_version))
    return paths


def check_parity(model: nn.Module, config: dict[str, Any], out_dir: Path, flip: bool,
                 real: torch.Tensor | None = None) -> dict[str, Any]:
    """Compare the graphs in ``out_dir`` with torch on random (and real) inputs; write parity.json.

    Raises :class:`ParityError` (after writing parity.json) when onnxruntime
    and torch disagree beyond tolerance.
    """
    codec = codec_for(config)
    model = model.eval().float()
    raw, keypoints = RawGraph(model, codec.has_offsets), KeypointGraph(model, codec, flip)
    paths = (out_dir / "raw.onnx", out_dir / "keypoints.onnx")
    rows = [compare(raw, keypoints, *paths, _random_inputs(codec), "random normal")]
    if real is not None and len(real):
        rows.append(compare(raw, keypoints, *paths, real.float(), "real crops"))
    report = {"opset": OPSET, "tolerances": {"output_rel": OUTPUT_TOL, "keypoint_px": KEYPOINT_TOL_PX},
              "method": config["method"], "input_size": "{}x{}".format(*codec.input_size), "flip_test": flip,
              "checks": rows, "ok": all(r["ok"] for r in rows)}
    tmp = out_dir / "parity.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out_dir / "parity.json")
    if not report["ok"]:
        bad = [r for r in rows if not r["ok"]]
        raise ParityError(f"onnxruntime vs torch mismatch beyond tolerance: {json.dumps(bad)}")
    return report


def export_model(model: nn.Module, config: dict[str, Any], out_dir: Path, flip: bool,
                 real: torch.Tensor | None = None, run_id: str | None = None,
                 code_version: str = "") -> dict[str, Any]:
    """Export both graphs to ``out_dir`` and check them (:func:`export_graphs` + :func:`check_parity`)."""
    export_graphs(model, config, out_dir, flip, run_id, code_version)
    return check_parity(model, config, out_dir, flip, real)


def real_crops(shards_uri: str, codec: Any, count: int = REAL_CROPS) -> torch.Tensor:
    """The first ``count`` validation crops of a shard set, as the network sees them (eval mode)."""
    from cal_core.data.dataset import ShardDataset

    dataset = ShardDataset(shards_uri, codec, train=False)
    if len(dataset) == 0:
        raise ValueError(f"shard set {shards_uri} is empty: no real crops for the parity check")
    return torch.stack([dataset[i]["image"] for i in range(min(count, len(dataset)))])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI flags of `cal-pose export`."""
    parser.add_argument("--checkpoint", required=True, help="checkpoint URI (model.pt of `cal-pose train`)")
    parser.add_argument("--out", required=True, help="output folder URI: raw.onnx, keypoints.onnx, parity.json")
    parser.add_argument("--flip", action="store_true", help="fold the flip test into keypoints.onnx")
    parser.add_argument("--shards", default=None, help="shard set whose crops join the parity check")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default $MLFLOW_EXPERIMENT_NAME)")
    parser.add_argument("--run-name", default=None, help="MLflow run name")


def run(args: argparse.Namespace) -> int:
    """Export, self-check, publish to ``--out`` and log to MLflow (errors, a parity failure too: cal_core.cli)."""
    from cal_core import storage
    from cal_core.models import load_checkpoint, model_from_checkpoint
    from cal_core.uris import output_dir, publish

    storage.check_writable(args.out)
    ckpt = load_checkpoint(args.checkpoint)
    config = dict(ckpt["config"])
    model = model_from_checkpoint(ckpt)
    real = real_crops(args.shards, codec_for(config)) if args.shards else None
    params = {"checkpoint": args.checkpoint, "flip": args.flip, "method": config["method"],
              "backbone": config.get("backbone"), "input_size": config["input_size"], "opset": OPSET}
    with tempfile.TemporaryDirectory() as tmp, \
            tracking.stage_run("export", args.experiment, args.run_name, params=params) as tracker:
        out = output_dir(args.out, Path(tmp) / "out")
        out.mkdir(parents=True, exist_ok=True)
        try:
            report = export_model(model, config, out, args.flip, real, ckpt.get("run_id"),
                                  str(ckpt.get("code_version", "")))
        finally:  # parity.json explains a failure too
            publish(out, args.out)
            tracker.log_artifact(out, "onnx")
        for row in report["checks"]:
            tracker.log_metrics({f"parity/{row['inputs'].replace(' ', '_')}/{k}": v for k, v in row.items()
                                 if isinstance(v, float)})
    print(f"exported {config['method']} {report['input_size']} to {args.out}: parity ok "
          f"({', '.join(r['inputs'] for r in report['checks'])})")
    return 0
