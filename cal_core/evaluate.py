"""COCO keypoint evaluation with pycocotools (OKS AP), for torch checkpoints or ONNX models.

The numbers are pycocotools' own (``COCOeval(iouType="keypoints")``); this
module only forms the results and reads COCOeval's state for the report
(per-keypoint error of matched people, OKS histogram). Instance scores follow
the usual top-down protocol (HRNet, UDP, CAL): box score x mean score of the
keypoints whose confidence exceeds ``infer.KEYPOINT_SCORE_THRESHOLD``; with detector boxes,
duplicates are removed by OKS-NMS.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cal_core.infer import instance_score
from cal_core.skeleton import COCO_PERSON_CATEGORY, NUM_KEYPOINTS, OKS_SIGMAS

#: COCOeval.stats order for keypoints.
METRIC_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APM", "APL", "AR", "AR50", "AR75", "ARM", "ARL")
#: OKS-NMS threshold used with detector boxes (HRNet/UDP's oks_thre).
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


def coco_results(image_ids: np.ndarray, keypoints: np.ndarray, keypoint_scores: np.ndarray,
                 box_scores: np.ndarray, areas: np.ndarray, nms_threshold: float | None = None
                 ) -> list[dict[str, Any]]:
    """COCO keypoint results from per-instance predictions in image pixels.

    ``keypoints`` (N, K, 2), ``keypoint_scores`` (N, K), ``box_scores``,
    ``areas`` and ``image_ids`` (N,). With ``nms_threshold``, OKS-NMS runs per
    image (use it with detector boxes).
    """
    n = len(image_ids)
    for name, arr in (("keypoints", keypoints), ("keypoint_scores", keypoint_scores),
                      ("box_scores", box_scores), ("areas", areas)):
        if len(arr) != n:
            raise ValueError(f"{name} has {len(arr)} rows, image_ids has {n}")
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
