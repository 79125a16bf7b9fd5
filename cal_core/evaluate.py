"""COCO keypoint evaluation with pycocotools (OKS AP), for torch checkpoints or ONNX models.

The numbers are pycocotools' own (``COCOeval(iouType="keypoints")``); this
module only forms the results and reads COCOeval's state for the report
(per-keypoint error of matched people, OKS histogram). Instance scores follow
the usual top-down protocol (HRNet, UDP, CAL): box score x mean score of the
keypoints whose confidence exceeds ``infer.KEYPOINT_SCORE_THRESHOLD``; then
duplicates are removed by OKS-NMS per image, with ground-truth boxes as with
detector boxes (HRNet's and mmpose's ``CocoMetric`` default). With GT boxes
only the people COCOeval scores are predicted (:func:`scored_indices`), as
HRNet and mmpose do, although the val shards keep every non-crowd person.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from cal_core.geometry import box_to_center_size
from cal_core.infer import instance_score
from cal_core.skeleton import COCO_PERSON_CATEGORY, KEYPOINT_NAMES, NUM_KEYPOINTS, OKS_SIGMAS

log = logging.getLogger(__name__)

#: COCOeval.stats order for keypoints.
METRIC_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APM", "APL", "AR", "AR50", "AR75", "ARM", "ARL")
#: OKS-NMS threshold of every evaluation (HRNet/UDP/CAL's ``oks_thre``).
OKS_NMS_THR = 0.9


def _load_gt(gt: str | Path | Mapping[str, Any]) -> Any:
    """A pycocotools ``COCO`` from a path to annotations.json or an already-loaded dict."""
    from pycocotools.coco import COCO

    data = json.loads(Path(gt).read_text()) if isinstance(gt, str | Path) else copy.deepcopy(dict(gt))
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _check_results(coco_gt: Any, results: Sequence[Mapping[str, Any]]) -> None:
    """Reject result lists pycocotools would choke on, naming what does not match."""
    if not results:
        raise ValueError("no keypoint results to score (empty result list)")
    known = set(coco_gt.getImgIds())
    foreign = sorted({int(r["image_id"]) for r in results} - known)
    if foreign:
        raise ValueError(f"{len(foreign)} result image ids are not in the ground truth "
                         f"({len(known)} images), e.g. {foreign[:5]}")
    bad = [r for r in results if len(r["keypoints"]) != 3 * NUM_KEYPOINTS]
    if bad:
        raise ValueError(f"results must have {3 * NUM_KEYPOINTS} keypoint values (x, y, score) x "
                         f"{NUM_KEYPOINTS}; got {len(bad[0]['keypoints'])} for image {bad[0]['image_id']}")


def run_cocoeval(gt: str | Path | Mapping[str, Any], results: Sequence[Mapping[str, Any]]) -> Any:
    """Evaluate ``results`` against ``gt`` with ``COCOeval(iouType="keypoints")``; returns the evaluator."""
    from pycocotools.cocoeval import COCOeval

    coco_gt = _load_gt(gt)
    _check_results(coco_gt, results)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes([dict(r) for r in results])
        evaluator = COCOeval(coco_gt, coco_dt, iouType="keypoints")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def coco_keypoint_ap(gt: str | Path | Mapping[str, Any], results: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """pycocotools' keypoint AP/AR (AP, AP50, AP75, APM, APL, AR, AR50, AR75, ARM, ARL) in [0, 1].

    ``results`` are COCO keypoint results: dicts with ``image_id``,
    ``category_id``, ``keypoints`` (51 floats x, y, score) and ``score``.
    Undefined entries (no ground truth in that area range) are -1, as in
    pycocotools.
    """
    stats = run_cocoeval(gt, results).stats
    return {name: float(value) for name, value in zip(METRIC_NAMES, stats, strict=True)}


@dataclass
class MatchDetails:
    """What the report needs beyond AP: errors of matched people and best OKS per person."""

    keypoint_error_px: np.ndarray  # (K,) mean image-pixel error over matched, labelled joints (nan if none)
    keypoint_count: np.ndarray  # (K,) number of matched, labelled joints behind each mean
    best_oks: np.ndarray  # (G,) best OKS of any result for each non-ignored person with keypoints


def match_details(evaluator: Any) -> MatchDetails:
    """Per-keypoint error of results matched at OKS 0.5 (area "all"), and best OKS per person."""
    params = evaluator.params
    errors = np.zeros(NUM_KEYPOINTS)
    counts = np.zeros(NUM_KEYPOINTS, dtype=np.int64)
    best: list[float] = []
    for entry in evaluator.evalImgs:
        if entry is None or entry["aRng"] != params.areaRng[0]:
            continue
        for dt_id, gt_id in zip(entry["dtIds"], entry["dtMatches"][0], strict=True):
            if gt_id <= 0:
                continue
            gt_kp = np.asarray(evaluator.cocoGt.anns[int(gt_id)]["keypoints"], float).reshape(-1, 3)
            dt_kp = np.asarray(evaluator.cocoDt.anns[int(dt_id)]["keypoints"], float).reshape(-1, 3)
            labelled = gt_kp[:, 2] > 0
            dist = np.linalg.norm(gt_kp[:, :2] - dt_kp[:, :2], axis=1)
            errors[labelled] += dist[labelled]
            counts[labelled] += 1
        best.extend(_best_oks(evaluator, entry["image_id"], entry["category_id"]))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, errors / np.maximum(counts, 1), np.nan)
    return MatchDetails(mean, counts, np.asarray(best, dtype=np.float64))


def _best_oks(evaluator: Any, image_id: int, category_id: int) -> list[float]:
    """Best OKS over results for each labelled, non-crowd person of one image (0 when no result)."""
    gts = evaluator._gts[image_id, category_id]
    ious = evaluator.ious.get((image_id, category_id), [])
    oks = np.asarray(ious, dtype=np.float64)
    out = []
    for j, gt in enumerate(gts):
        if gt.get("iscrowd", 0) or gt.get("num_keypoints", 0) == 0:
            continue
        out.append(float(oks[:, j].max()) if oks.ndim == 2 and oks.shape[0] else 0.0)
    return out


def oks_between(kpts: np.ndarray, area: float, others: np.ndarray, other_areas: np.ndarray,
                sigmas: np.ndarray = OKS_SIGMAS) -> np.ndarray:
    """OKS of one pose ``kpts`` (K, 2|3) against ``others`` (M, K, 2|3), scale = mean of the two areas.

    This is the symmetric OKS of OKS-NMS (HRNet's ``oks_iou``), mean of
    ``exp(-d^2 / (2 s^2 k^2))`` over all K joints with ``k = 2 sigma``.
    """
    variances = (2.0 * np.asarray(sigmas)) ** 2
    d2 = ((others[..., :2] - kpts[None, :, :2]) ** 2).sum(-1)
    scale = (area + np.asarray(other_areas, float)) / 2.0 + np.spacing(1)
    return np.exp(-d2 / variances[None] / scale[:, None] / 2.0).mean(axis=1)


def oks_nms(kpts: np.ndarray, scores: np.ndarray, areas: np.ndarray, threshold: float = OKS_NMS_THR,
            sigmas: np.ndarray = OKS_SIGMAS) -> list[int]:
    """Greedy NMS on poses of ONE image: indices kept, best score first.

    A pose is suppressed when its OKS with an already kept, higher-scoring
    pose exceeds ``threshold``.
    """
    order = list(np.argsort(-np.asarray(scores), kind="stable"))
    keep: list[int] = []
    while order:
        top, rest = order[0], np.asarray(order[1:], dtype=np.int64)
        keep.append(int(top))
        if rest.size == 0:
            break
        oks = oks_between(kpts[top], float(areas[top]), kpts[rest], areas[rest], sigmas)
        order = [int(i) for i in rest[oks <= threshold]]
    return keep


def nms_areas(bboxes: np.ndarray, input_size: tuple[int, int]) -> np.ndarray:
    """Areas OKS-NMS scales by: the padded, aspect-corrected boxes the crops cover (HRNet's ``prod(s * 200)``).

    Raw detector-box areas are at least 1.56x smaller, so duplicates' OKS
    drops and fewer are suppressed than under the protocol of the paper's
    detection-box numbers.
    """
    height, width = input_size
    return np.array([float(np.prod(box_to_center_size(box, width / height)[1])) for box in np.asarray(bboxes)])


def _check_finite(image_ids: np.ndarray, keypoints: np.ndarray, keypoint_scores: np.ndarray) -> None:
    """Refuse NaN or infinite predictions, which would corrupt OKS-NMS and results.json without a word.

    A NaN pose never counts as a duplicate (``oks <= threshold`` is False)
    yet suppresses every other person of its image when it scores first,
    and JSON has no NaN; a model that diverged or overflows is the cause.
    """
    bad = ~(np.isfinite(np.asarray(keypoints)).all(axis=(-1, -2)) & np.isfinite(np.asarray(keypoint_scores)).all(-1))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{int(bad.sum())} of {len(bad)} predicted poses hold NaN or infinite keypoints or scores "
                         f"(first: image {int(np.asarray(image_ids)[first])}): the model diverged or overflows")


def coco_results(image_ids: np.ndarray, keypoints: np.ndarray, keypoint_scores: np.ndarray,
                 box_scores: np.ndarray, areas: np.ndarray, nms_threshold: float | None = None
                 ) -> list[dict[str, Any]]:
    """COCO keypoint results from per-instance predictions in image pixels.

    ``keypoints`` (N, K, 2), ``keypoint_scores`` (N, K), ``box_scores``,
    ``areas`` (the OKS-NMS scales, :func:`nms_areas`) and ``image_ids`` (N,).
    With ``nms_threshold``, OKS-NMS runs per image (evaluation always passes :data:`OKS_NMS_THR`).
    """
    n = len(image_ids)
    for name, arr in (("keypoints", keypoints), ("keypoint_scores", keypoint_scores),
                      ("box_scores", box_scores), ("areas", areas)):
        if len(arr) != n:
            raise ValueError(f"{name} has {len(arr)} rows, image_ids has {n}")
    _check_finite(image_ids, keypoints, keypoint_scores)
    scores = instance_score(np.asarray(box_scores), np.asarray(keypoint_scores))
    poses = np.concatenate([keypoints, keypoint_scores[..., None]], axis=-1)
    results = []
    for image_id in dict.fromkeys(int(i) for i in image_ids):
        idx = np.flatnonzero(np.asarray(image_ids) == image_id)
        if nms_threshold is not None:
            idx = idx[oks_nms(poses[idx], scores[idx], np.asarray(areas)[idx], nms_threshold)]
        results.extend({
            "image_id": image_id,
            "category_id": COCO_PERSON_CATEGORY["id"],
            "keypoints": [round(float(v), 3) for v in poses[i].reshape(-1)],
            "score": float(scores[i]),
        } for i in idx)
    return results


# ----------------------------------------------------------------------------- running a model over shards

#: A predictor maps one collated batch of :class:`~cal_core.data.dataset.ShardDataset` samples to
#: keypoints ``(B, K, 2)`` in input pixels and scores ``(B, K)`` (numpy).
Predictor = Callable[[dict[str, Any]], tuple[np.ndarray, np.ndarray]]
#: How many val crops get a skeleton overlay (the first ones of the shard set: a fixed set).
OVERLAYS = 16


@dataclass
class ModelInfo:
    """What the shards must agree with, and what the report says about the model."""

    method: str
    input_size: tuple[int, int]
    num_joints: int
    backbone: str
    source: str


@dataclass
class Collected:
    """Per-instance predictions over a shard set, plus what the report and the digest need."""

    image_ids: np.ndarray  # (N,) int64
    ann_ids: np.ndarray  # (N,) int64, -1 for detector boxes
    keypoints: np.ndarray  # (N, K, 2) image px
    scores: np.ndarray  # (N, K)
    box_scores: np.ndarray  # (N,)
    bboxes: np.ndarray  # (N, 4)
    overlays: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]  # (crop, kpts, scores, gt) input px


def torch_predictor(model: nn.Module, codec: Any, flip: bool, device: Any = None) -> Predictor:
    """A predictor running ``model`` through :func:`cal_core.infer.predict` (flip test optional)."""
    from cal_core.infer import predict

    if device is not None:
        model = model.to(device)

    def run(batch: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        kpts, scores = predict(model, batch["image"], codec, flip=flip, batch_size=len(batch["image"]))
        return kpts.numpy(), scores.numpy()

    return run


def onnx_predictor(path: str | Path, flip: bool) -> tuple[Predictor, ModelInfo, Any]:
    """A predictor for an exported graph (``cal-pose export``), its description and codec.

    ``keypoints`` graphs decode (and flip) inside; their baked-in flip setting
    must equal ``flip``. ``raw`` graphs return network outputs, which are
    flip-averaged and decoded here with the codec recorded in the metadata.
    """
    import torch

    from cal_core.codecs import build_codec, parse_size
    from cal_core.export import ort_session, read_metadata
    from cal_core.infer import flip_back

    meta = read_metadata(path)
    missing = [k for k in ("graph", "method", "input_size", "codec", "keypoint_names") if k not in meta]
    if missing:
        raise ValueError(f"{path} lacks cal-pose metadata {missing}: export it with `cal-pose export`")
    settings = {k: v for k, v in json.loads(meta["codec"]).items() if k not in {"name", "input_size"}}
    codec = build_codec(meta["method"], parse_size(meta["input_size"]), **settings)
    info = ModelInfo(meta["method"], codec.input_size, len(json.loads(meta["keypoint_names"])),
                     meta.get("backbone", ""), f"onnx:{meta['graph']}")
    session = ort_session(path)
    if meta["graph"] == "keypoints":
        baked = meta.get("flip_test") == "true"
        if baked and not flip:
            raise ValueError(f"{path} was exported with the flip test inside: evaluate it without --no-flip, "
                             "or evaluate raw.onnx")
        if flip and not baked:
            raise ValueError(f"{path} was exported without the flip test: evaluate it with --no-flip, "
                             "or evaluate raw.onnx (the flip test then runs outside the graph)")

        def run_keypoints(batch: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
            out = session.run(None, {"x": batch["image"].numpy()})[0]
            return out[..., :2], out[..., 2]

        return run_keypoints, info, codec

    def outputs(x: np.ndarray) -> dict[str, Any]:
        return {name.name: torch.from_numpy(v) for name, v in zip(session.get_outputs(), session.run(None, {"x": x}),
                                                                   strict=True)}

    def run_raw(batch: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        x = batch["image"]
        out = outputs(x.numpy())
        if flip:
            mirrored = flip_back(outputs(x.flip(-1).numpy()))
            out = {k: (out[k] + mirrored[k]) * 0.5 for k in out}
        kpts, scores = codec.decode(out["heatmap"], out.get("offset") if codec.has_offsets else None)
        return kpts.numpy(), scores.numpy()

    return run_raw, info, codec


def load_predictor(model_path: str, flip: bool, device: Any = None) -> tuple[Predictor, ModelInfo, Any]:
    """Predictor, description and codec for a local ``.onnx`` graph or ``.pt`` checkpoint.

    :func:`evaluate` fetches a remote model once and passes its local copy.
    """
    from cal_core.export import codec_for
    from cal_core.models import load_checkpoint, model_from_checkpoint

    if str(model_path).endswith(".onnx"):
        return onnx_predictor(model_path, flip)
    ckpt = load_checkpoint(model_path)
    config = dict(ckpt["config"])
    codec = codec_for(config)
    model = model_from_checkpoint(ckpt)
    info = ModelInfo(str(config["method"]), codec.input_size, int(config.get("num_joints", NUM_KEYPOINTS)),
                     str(config.get("backbone", "")), "torch")
    return torch_predictor(model, codec, flip, device), info, codec


def check_compatible(info: ModelInfo, manifest: dict[str, Any], shards_uri: str, size: int) -> None:
    """Refuse a model whose input size or keypoint count differs from the shards, or an empty set."""
    from cal_core.codecs import parse_size

    shard_size = parse_size(manifest["input_size"])
    if tuple(info.input_size) != shard_size:
        raise ValueError(f"model input size {info.input_size[0]}x{info.input_size[1]} does not match the shard set "
                         f"{shards_uri} ({shard_size[0]}x{shard_size[1]})")
    if info.num_joints != NUM_KEYPOINTS:
        raise ValueError(f"model predicts {info.num_joints} keypoints, the shard set {shards_uri} holds "
                         f"{NUM_KEYPOINTS} (COCO)")
    if size == 0:
        raise ValueError(f"shard set {shards_uri} has no person instances to evaluate")


def check_shard_set(info: ModelInfo, shards_uri: str, scorable: bool = False) -> None:
    """:func:`check_compatible` against the manifest of ``shards_uri`` (read here; a clear error if unreadable).

    ``scorable`` also refuses a ground-truth-box set in which COCOeval would
    score nobody (:func:`scored_subset` would refuse it later), so training
    with validation fails before its first epoch rather than after it.
    """
    from cal_core.data.dataset import read_manifest

    manifest = read_manifest(shards_uri)
    rows = sum(int(s["rows"]) for s in manifest["shards"])
    check_compatible(info, manifest, shards_uri, rows)
    if manifest.get("split") == "train":
        log.warning("%s is a train split (manifest): AP on it measures fit to the training people, not "
                    "validation, and `cal-pose register` refuses it", shards_uri)
    if scorable and manifest.get("settings", {}).get("box_source") != "detections":
        gt = json.loads(read_gt(shards_uri, manifest))
        if all(_unscored(a) for a in gt["annotations"]):
            raise ValueError(_nobody_scored(shards_uri, rows))


def read_gt(shards_uri: str, manifest: Mapping[str, Any]) -> bytes:
    """The shard set's annotations.json bytes, checked against the manifest's sha256 (when it records one).

    pycocotools scores against this file: one edited or replaced after
    downsampling would score other people than the shards hold, silently.
    """
    from cal_core.storage import join, read_bytes

    uri = join(shards_uri, "annotations.json")
    data = read_bytes(uri)
    want = (manifest.get("annotations") or {}).get("sha256")
    if want and hashlib.sha256(data).hexdigest() != want:
        raise ValueError(f"{uri} does not match the sha256 its manifest records (edited or replaced after "
                         "downsampling?): rerun `cal-pose downsample` into a fresh folder")
    return data


def _overlay_items(batch: dict[str, Any], kpts: np.ndarray, scores: np.ndarray, codec: Any,
                   room: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Up to ``room`` (crop uint8 HWC, keypoints, scores, GT (K, 3)) tuples, all in input px."""
    from cal_core.models import MEAN, STD

    items = []
    if room <= 0:
        return items
    _, labelled = codec.joint_labels(batch["keypoints"], batch["visibility"])
    for i in range(min(room, len(kpts))):
        image = batch["image"][i].numpy().transpose(1, 2, 0) * np.asarray(STD) + np.asarray(MEAN)
        crop = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
        gt = np.concatenate([batch["keypoints"][i].numpy(), labelled[i].numpy()[:, None]], axis=1)
        items.append((crop, kpts[i], scores[i], gt))
    return items


def collect(predictor: Predictor, dataset: Any, codec: Any, batch_size: int = 64, workers: int = 0,
            overlays: int = 0, progress: bool = True) -> Collected:
    """Run ``predictor`` over an eval-mode ShardDataset; keypoints back in image pixels."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from cal_core.data.dataset import fork_safe_opencv
    from cal_core.infer import to_image_coords

    fork_safe_opencv(workers)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("image_ids", "ann_ids", "keypoints", "scores",
                                                           "box_scores", "bboxes")}
    shown: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    for batch in tqdm(loader, desc="evaluate", unit="batch", leave=False, disable=not progress):
        kpts, scores = predictor(batch)
        meta = batch["meta"]
        shown += _overlay_items(batch, kpts, scores, codec, overlays - len(shown))
        parts["keypoints"].append(to_image_coords(kpts, meta["input_to_image"].numpy()))
        parts["scores"].append(np.asarray(scores, np.float64))
        for key, name in (("image_ids", "image_id"), ("ann_ids", "ann_id"), ("box_scores", "score"),
                          ("bboxes", "bbox")):
            parts[key].append(np.asarray(meta[name]))
    return Collected(**{k: np.concatenate(v) for k, v in parts.items()}, overlays=shown)


def scored_indices(dataset: Any, gt: Mapping[str, Any]) -> np.ndarray:
    """Indices of the samples an evaluation predicts: every detector box, and the GT people COCOeval scores.

    COCOeval ignores a GT person whose ``num_keypoints`` is 0 (and crowd
    regions), and HRNet and mmpose leave such people out of their GT-box
    evaluation before cropping. The val shards keep them (the data stage's
    rule, so that every person reaches pycocotools), so they are left out
    here: no inference is spent on them, and their predictions take no place
    in OKS-NMS or in COCOeval's 20 results per image. Measured on coco-mini
    val with a noisy-GT predictor: AP 0.501 with them, 0.504 without.
    """
    unscored = np.array([a["id"] for a in gt["annotations"] if _unscored(a)], dtype=np.int64)
    ann_ids = dataset.ann_ids()
    return np.flatnonzero((ann_ids < 0) | ~np.isin(ann_ids, unscored))


def scored_subset(dataset: Any, gt: Mapping[str, Any], shards_uri: str) -> Any:
    """``dataset`` restricted to :func:`scored_indices`; an error naming the set when nobody is left."""
    from torch.utils.data import Subset

    indices = scored_indices(dataset, gt)
    if len(indices) == 0:
        raise ValueError(_nobody_scored(shards_uri, len(dataset)))
    return Subset(dataset, indices.tolist())


def _unscored(ann: Mapping[str, Any]) -> bool:
    """True for a GT record COCOeval ignores: a crowd region or a person without a labelled keypoint."""
    return bool(ann.get("iscrowd")) or ann["num_keypoints"] == 0


def _nobody_scored(shards_uri: str, people: int) -> str:
    """The error for a GT-box set in which COCOeval would score nobody."""
    return (f"shard set {shards_uri}: none of its {people} people has a labelled keypoint, "
            "so COCOeval would score none of them")


def protocol_results(got: Collected, input_size: tuple[int, int]) -> list[dict[str, Any]]:
    """The COCO results every evaluation scores: rescored instances, OKS-NMS (:data:`OKS_NMS_THR`) per image."""
    return coco_results(got.image_ids, got.keypoints, got.scores, got.box_scores,
                        nms_areas(got.bboxes, input_size), OKS_NMS_THR)


#: Manifest entries that decide what the model is shown of each box (besides its input size).
CUT_SETTINGS = ("margin", "crop_format", "padding", "jpeg_quality", "resampling")


def val_digest(gt_bytes: bytes, collected: Collected, manifest: Mapping[str, Any]) -> str:
    """sha256 naming the validation set: the GT file, every evaluated box (ids, box, score) and how it was cut.

    Two evaluations with equal digests scored the same people from the same
    boxes, cut alike, so their APs are comparable (used by ``cal-pose
    register``). The cut is the manifest's :data:`CUT_SETTINGS`: another
    box padding or JPEG quality shows the model other pixels of the same
    box. The input size is left out (runs at 64x48 and 128x96 share the
    val set; ``register`` compares input sizes on its own).
    """
    h = hashlib.sha256(gt_bytes)
    settings = {**manifest, **manifest.get("settings", {})}
    h.update(json.dumps({key: settings.get(key) for key in CUT_SETTINGS}, sort_keys=True).encode())
    order = np.lexsort((collected.ann_ids, collected.image_ids))
    for i in order:
        box = ",".join(f"{v:.2f}" for v in collected.bboxes[i])
        h.update(f"{collected.image_ids[i]}|{collected.ann_ids[i]}|{box}|{collected.box_scores[i]:.4f};".encode())
    return h.hexdigest()


def evaluate_model(model: nn.Module, codec: Any, shards_uri: str, flip: bool = True, device: Any = None,
                   batch_size: int = 64, progress: bool = True) -> dict[str, float]:
    """COCO keypoint AP/AR of an in-memory torch model on a shard set (train.py's validation)."""
    from cal_core.data.dataset import ShardDataset

    info = ModelInfo("", codec.input_size, int(getattr(model, "arch", {}).get("num_joints", NUM_KEYPOINTS)), "",
                     "torch")
    check_shard_set(info, shards_uri)
    dataset = ShardDataset(shards_uri, codec, train=False)
    gt = json.loads(read_gt(shards_uri, dataset.manifest))
    got = collect(torch_predictor(model, codec, flip, device), scored_subset(dataset, gt, shards_uri), codec,
                  batch_size, progress=progress)
    return coco_keypoint_ap(gt, protocol_results(got, codec.input_size))


def check_detections(data: bytes, manifest: Mapping[str, Any], uri: str) -> None:
    """Refuse ``--detections`` unless it is the very file the shard set was cut from (its manifest sha256).

    The shards already hold the detector's boxes and scores; the flag
    proves which file they came from. Comparing digests needs no parsing:
    the file ``downsample`` read is accepted whatever it held that
    ``downsample`` skipped (malformed records, other categories, images
    outside the val set), and any other file (edited, or for another val
    set) is refused, before inference. Checking contents instead refused
    such valid files and crashed on records downsample had skipped.
    """
    source = manifest.get("source", {}).get("detections")
    if not source:
        raise ValueError(f"--detections {uri} given, but the shard set was cut from ground-truth boxes: "
                         "cut it with `cal-pose downsample --detections`")
    digest = hashlib.sha256(data).hexdigest()
    if digest != source.get("sha256"):
        raise ValueError(f"detections {uri} (sha256 {digest[:12]}...) is not the file the shard set was cut "
                         f"from ({source.get('uri')}, sha256 {str(source.get('sha256'))[:12]}...)")


def _write(path: Path, data: str | bytes) -> None:
    """Atomic write of a small file (temporary sibling + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    tmp.replace(path)


def write_outputs(out: Path, doc: dict[str, Any], results: list[dict[str, Any]], details: MatchDetails,
                  collected: Collected) -> None:
    """metrics.json, results.json, report.md, oks_histogram.png and overlays/*.png into ``out``."""
    import matplotlib.pyplot as plt

    from cal_core import report

    out.mkdir(parents=True, exist_ok=True)
    _write(out / "results.json", json.dumps(results))
    _write(out / "metrics.json", json.dumps(doc, indent=2))
    fig = report.oks_histogram_figure(details.best_oks)
    fig.savefig(out / "oks_histogram.png")
    plt.close(fig)
    row = {"method": doc["method"], "backbone": doc["backbone"], "input_size": doc["input_size"], **doc["metrics"]}
    notes = [f"model: {doc['model']} ({doc['source']}), flip test: {doc['flip']}",
             f"{doc['counts']['instances']} boxes on {doc['counts']['images']} images; "
             f"{doc['counts']['results']} results after OKS-NMS; {doc['counts']['unscored_instances']} GT people "
             f"without a labelled keypoint left out (COCOeval ignores them)",
             f"val set digest: {doc['val_digest']}"]
    if doc["split"] == "train":
        notes.append("scored on a **train** split: fit to the training people, not a validation score")
    if doc["counts"]["gt_area_from_box"]:
        notes.append(f"{doc['counts']['gt_area_from_box']} GT people had no area in the source file: their box "
                     "area is their OKS scale, more lenient than COCO's segmentation areas (AP not comparable)")
    text = report.markdown_report(f"Evaluation: {doc['method']} {doc['input_size']}", [row], doc["metrics"],
                                  details.keypoint_error_px, details.keypoint_count, details.best_oks, notes)
    _write(out / "report.md", text)
    (out / "overlays").mkdir(exist_ok=True)
    for stale in (out / "overlays").glob("[0-9][0-9][0-9].png"):  # an earlier evaluation's into the same --out
        stale.unlink()
    for i, (crop, kpts, scores, gt) in enumerate(collected.overlays):
        report.draw_overlay(crop, kpts, scores, gt).save(out / "overlays" / f"{i:03d}.png")


def evaluate(model_uri: str, shards_uri: str, out: Path, flip: bool = True, detections_uri: str | None = None,
             batch_size: int = 64, workers: int = 0, tracker: Any = None) -> dict[str, Any]:
    """Score ``model_uri`` on a shard set, write the outputs to ``out``; returns the metrics document."""
    import tempfile

    from cal_core import storage
    from cal_core.data.dataset import ShardDataset
    from cal_core.uris import fetch_local, sha256_of

    with tempfile.TemporaryDirectory(prefix="cal-pose-model-") as staging:  # a remote model is fetched once
        local = fetch_local(model_uri, Path(staging) / Path(str(model_uri)).name)
        model_sha256 = sha256_of(local)  # the bytes scored, which register matches against the ONNX it registers
        try:
            predictor, info, codec = load_predictor(str(local), flip)
        except ValueError as exc:  # name the model as the user gave it, not its staged copy
            raise ValueError(str(exc).replace(str(local), str(model_uri))) from exc
    check_shard_set(info, shards_uri)
    dataset = ShardDataset(shards_uri, codec, train=False)
    if detections_uri:  # before inference
        check_detections(storage.read_bytes(detections_uri), dataset.manifest, detections_uri)
    gt_bytes = read_gt(shards_uri, dataset.manifest)
    gt = json.loads(gt_bytes)
    got = collect(predictor, scored_subset(dataset, gt, shards_uri), codec, batch_size, workers, overlays=OVERLAYS)
    results = protocol_results(got, codec.input_size)
    evaluator = run_cocoeval(gt, results)
    metrics = {name: float(v) for name, v in zip(METRIC_NAMES, evaluator.stats, strict=True)}
    details = match_details(evaluator)
    doc = {
        "metrics": metrics, "val_digest": val_digest(gt_bytes, got, dataset.manifest),
        "method": info.method, "backbone": info.backbone,
        "input_size": f"{info.input_size[0]}x{info.input_size[1]}", "model": str(model_uri),
        "source": info.source, "model_sha256": model_sha256, "shards": str(shards_uri), "detections": detections_uri,
        "split": dataset.manifest.get("split"), "flip": flip, "oks_nms": OKS_NMS_THR,
        "counts": {"instances": len(got.image_ids), "unscored_instances": len(dataset) - len(got.image_ids),
                   "images": len(set(got.image_ids.tolist())),
                   "results": len(results), "gt_people": len(details.best_oks),
                   "gt_area_from_box": int(dataset.manifest.get("counts", {}).get("area_from_box", 0))},
        "keypoint_error_px": {name: (None if n == 0 else float(e)) for name, e, n in
                              zip(KEYPOINT_NAMES, details.keypoint_error_px, details.keypoint_count, strict=True)},
    }
    write_outputs(out, doc, results, details, got)
    if tracker is not None:
        from cal_core.tracking import defined_metrics

        tracker.log_metrics(defined_metrics(metrics))
        tracker.log_artifact(out)
    return doc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI flags of `cal-pose evaluate`."""
    parser.add_argument("--model", required=True, help="model URI: .onnx (raw or keypoints graph) or .pt checkpoint")
    parser.add_argument("--shards", required=True, help="val shard set URI (manifest.json + annotations.json)")
    parser.add_argument("--out", required=True, help="output folder URI: metrics.json, report.md, overlays/")
    parser.add_argument("--no-flip", dest="flip", action="store_false", help="skip the flip test")
    parser.add_argument("--detections", default=None, help="COCO detections the shards were cut from (checked against them)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default $MLFLOW_EXPERIMENT_NAME)")
    parser.add_argument("--run-name", default=None, help="MLflow run name")


def run(args: argparse.Namespace) -> int:
    """Evaluate, publish to ``--out``, log to MLflow and print the Table-8 row."""
    import tempfile

    from cal_core import storage, tracking
    from cal_core.report import metrics_table
    from cal_core.uris import output_dir, publish

    params = {"model": args.model, "shards": args.shards, "flip": args.flip, "detections": args.detections,
              "batch_size": args.batch_size}
    # bad input raises ValueError / FileNotFoundError: cal_core.cli prints it as one line (exit 2)
    storage.check_writable(args.out)  # before inference; --out itself is created with the first output
    with tempfile.TemporaryDirectory() as tmp, \
            tracking.stage_run("evaluate", args.experiment, args.run_name, params=params) as tracker:
        out = output_dir(args.out, Path(tmp) / "out")
        doc = evaluate(args.model, args.shards, out, args.flip, args.detections, args.batch_size,
                       args.workers, tracker)
        tracker.set_tags({"val_digest": doc["val_digest"], "method": doc["method"],
                          "input_size": doc["input_size"]})
        publish(out, args.out)
    print(metrics_table([{"method": doc["method"], "backbone": doc["backbone"], "input_size": doc["input_size"],
                          **doc["metrics"]}]))
    return 0
