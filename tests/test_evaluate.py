"""cal_core.evaluate: pycocotools scoring, OKS-NMS, instance scores, results, report details."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from cal_core import evaluate
from cal_core.skeleton import NUM_KEYPOINTS, OKS_SIGMAS


def _val_gt(coco_mini: Path) -> dict:
    return json.loads((coco_mini / "annotations" / "person_keypoints_val2017.json").read_text())


def _gt_results(gt: dict, shift: tuple[float, float] = (0.0, 0.0)) -> list[dict]:
    """Every labelled, non-crowd person of ``gt`` as a result, keypoints moved by ``shift``."""
    out = []
    for ann in gt["annotations"]:
        if ann["iscrowd"] or ann["num_keypoints"] == 0:
            continue
        kp = np.asarray(ann["keypoints"], float).reshape(-1, 3)
        kp[:, 0] += shift[0]
        kp[:, 1] += shift[1]
        kp[:, 2] = 1.0
        out.append({"image_id": ann["image_id"], "category_id": 1, "keypoints": kp.reshape(-1).tolist(),
                    "score": 1.0})
    return out


def _direct_pycocotools(gt_path: Path, results_path: Path) -> np.ndarray:
    """The stats pycocotools prints for a results file, computed without cal_core."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        dt = gt.loadRes(str(results_path))
        ev = COCOeval(gt, dt, "keypoints")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_ground_truth_as_results_scores_one(coco_mini: Path) -> None:
    metrics = evaluate.coco_keypoint_ap(_val_gt(coco_mini), _gt_results(_val_gt(coco_mini)))
    assert set(metrics) == set(evaluate.METRIC_NAMES)
    assert all(v == pytest.approx(1.0) for v in metrics.values())


def test_shifted_results_match_direct_pycocotools(coco_mini: Path, tmp_path: Path) -> None:
    gt_path = coco_mini / "annotations" / "person_keypoints_val2017.json"
    results = _gt_results(_val_gt(coco_mini), shift=(6.0, -4.0))
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    metrics = evaluate.coco_keypoint_ap(gt_path, json.loads(path.read_text()))
    direct = _direct_pycocotools(gt_path, path)
    assert [metrics[name] for name in evaluate.METRIC_NAMES] == direct.tolist()
    assert 0.0 < metrics["AP"] < 1.0


def test_bad_results_are_named(coco_mini: Path) -> None:
    gt = _val_gt(coco_mini)
    with pytest.raises(ValueError, match="empty"):
        evaluate.coco_keypoint_ap(gt, [])
    foreign = _gt_results(gt)[:2]
    foreign[0] = {**foreign[0], "image_id": 999999999}
    with pytest.raises(ValueError, match="999999999"):
        evaluate.coco_keypoint_ap(gt, foreign)
    short = [{**_gt_results(gt)[0], "keypoints": [0.0] * 42}]
    with pytest.raises(ValueError, match="51"):
        evaluate.coco_keypoint_ap(gt, short)


def test_match_details_report_the_shift_as_pixel_error(coco_mini: Path) -> None:
    gt = _val_gt(coco_mini)
    ev = evaluate.run_cocoeval(gt, _gt_results(gt, shift=(3.0, 4.0)))
    details = evaluate.match_details(ev)
    matched = details.keypoint_count > 0
    assert matched.sum() == NUM_KEYPOINTS
    np.testing.assert_allclose(details.keypoint_error_px[matched], 5.0, atol=1e-9)
    people = sum(1 for a in gt["annotations"] if not a["iscrowd"] and a["num_keypoints"] > 0)
    assert len(details.best_oks) == people
    assert np.all((details.best_oks > 0) & (details.best_oks < 1))


def _oks_by_hand(a: np.ndarray, b: np.ndarray, area_a: float, area_b: float) -> float:
    """Symmetric OKS written out joint by joint: mean_k exp(-d_k^2 / (2 s^2 (2 sigma_k)^2))."""
    s2 = (area_a + area_b) / 2.0
    total = 0.0
    for k in range(NUM_KEYPOINTS):
        d2 = (a[k, 0] - b[k, 0]) ** 2 + (a[k, 1] - b[k, 1]) ** 2
        total += math.exp(-d2 / (2.0 * s2 * (2.0 * OKS_SIGMAS[k]) ** 2))
    return total / NUM_KEYPOINTS


def test_oks_between_matches_hand_formula() -> None:
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 100, (NUM_KEYPOINTS, 3))
    others = a[None] + rng.normal(0, 3, (4, NUM_KEYPOINTS, 3))
    areas = np.array([900.0, 2500.0, 400.0, 1600.0])
    got = evaluate.oks_between(a, 1200.0, others, areas)
    want = [_oks_by_hand(a, o, 1200.0, ar) for o, ar in zip(others, areas, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_oks_nms_drops_near_duplicates_only() -> None:
    rng = np.random.default_rng(1)
    person = rng.uniform(0, 100, (NUM_KEYPOINTS, 3))
    far = person + 200.0
    poses = np.stack([person + 0.2, person, far, person + 40.0])
    scores = np.array([0.8, 0.9, 0.5, 0.7])
    areas = np.full(4, 2000.0)
    # 0 duplicates 1 (OKS ~1 > 0.9): dropped; 2 is elsewhere; 3 is 40 px off: OKS below 0.9.
    assert _oks_by_hand(poses[1], poses[3], 2000.0, 2000.0) < 0.9
    assert evaluate.oks_nms(poses, scores, areas, threshold=0.9) == [1, 3, 2]
    assert evaluate.oks_nms(poses, scores, areas, threshold=1.01) == [1, 0, 3, 2]


def test_coco_results_with_nms_per_image() -> None:
    rng = np.random.default_rng(2)
    base = rng.uniform(10, 90, (NUM_KEYPOINTS, 2))
    kpts = np.stack([base, base + 0.1, base])
    kp_scores = np.full((3, NUM_KEYPOINTS), 0.8)
    image_ids = np.array([7, 7, 8])
    results = evaluate.coco_results(image_ids, kpts, kp_scores, np.array([1.0, 0.9, 1.0]),
                                    np.full(3, 1500.0), nms_threshold=0.9)
    assert [r["image_id"] for r in results] == [7, 8]
    assert results[0]["score"] == pytest.approx(0.8)
    assert len(results[0]["keypoints"]) == 51
    kept = np.asarray(results[0]["keypoints"]).reshape(-1, 3)
    np.testing.assert_allclose(kept[:, :2], base, atol=1e-3)
    assert len(evaluate.coco_results(image_ids, kpts, kp_scores, np.ones(3), np.full(3, 1500.0))) == 3
