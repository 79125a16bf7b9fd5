"""cal_core.evaluate: pycocotools scoring, OKS-NMS, instance scores, results, report details."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from cal_core import cli, evaluate
from cal_core.codecs import build_codec
from cal_core.data.dataset import add_targets
from cal_core.skeleton import NUM_KEYPOINTS, OKS_SIGMAS
from tests.coco_reference import direct_pycocotools


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
    direct = direct_pycocotools(gt_path, path)
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


def test_nms_areas_are_the_padded_aspect_corrected_boxes() -> None:
    """HRNet's OKS-NMS area: the box grown to the input's aspect (W/H 0.75 here), then x1.25 per side."""
    boxes = np.array([[0.0, 0.0, 30.0, 40.0], [5.0, 5.0, 40.0, 40.0], [0.0, 0.0, 30.0, 80.0]])
    # 30x40 has the aspect: 37.5 x 50; 40x40 grows to 40 x 53.33: 50 x 66.67; 30x80 grows to 60 x 80: 75 x 100
    np.testing.assert_allclose(evaluate.nms_areas(boxes, (64, 48)), [1875.0, 10000.0 / 3.0, 7500.0])


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


@pytest.mark.parametrize("where", ["keypoint", "score"])
def test_non_finite_predictions_are_refused_not_scored(where: str) -> None:
    """A NaN pose scoring first once suppressed the other person of its image and wrote NaN into results.json."""
    rng = np.random.default_rng(3)
    kpts = np.stack([rng.uniform(10, 90, (NUM_KEYPOINTS, 2)), rng.uniform(300, 400, (NUM_KEYPOINTS, 2))])
    kp_scores = np.full((2, NUM_KEYPOINTS), 0.8)
    if where == "keypoint":
        kpts[1, 4, 0] = np.nan
    else:
        kp_scores[1, 2] = np.inf
    with pytest.raises(ValueError, match=r"1 of 2 predicted poses hold NaN or infinite .* \(first: image 5\)"):
        evaluate.coco_results(np.array([5, 5]), kpts, kp_scores, np.array([0.5, 1.0]), np.full(2, 1500.0), 0.9)


# ----------------------------------------------------------------------------- model runs over real shards


@pytest.fixture(scope="module")
def val_shards(coco_mini: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """coco-mini val cut to 64x48 shards by `cal-pose downsample` (GT boxes)."""
    from cal_core.cli import main

    out = tmp_path_factory.mktemp("val")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAL_POSE_TRACKING", "off")
        mp.chdir(out)
        assert main(["downsample", "--coco", str(coco_mini), "--split", "val", "--out", str(out),
                     "--input-size", "64x48"]) == 0
    return out / "64x48"


def _oracle(codec, shift: float = 0.0) -> evaluate.Predictor:
    """A predictor that decodes the batch's own targets (GT through the codec), moved by ``shift`` px."""

    def run(batch: dict) -> tuple[np.ndarray, np.ndarray]:
        targets = add_targets(batch, codec)["targets"]
        kpts, scores = codec.decode(targets["heatmap"], targets.get("offset"))
        return kpts.numpy() + shift, scores.numpy()

    return run


def test_oracle_predictions_score_about_100(val_shards: Path) -> None:
    from cal_core.data.dataset import ShardDataset

    codec = build_codec("udp", (64, 48))
    got = evaluate.collect(_oracle(codec), ShardDataset(str(val_shards), codec, train=False), codec)
    results = evaluate.coco_results(got.image_ids, got.keypoints, got.scores, got.box_scores,
                                     evaluate.nms_areas(got.bboxes, codec.input_size))
    metrics = evaluate.coco_keypoint_ap(val_shards / "annotations.json", results)
    # Not exactly 1: a few labelled joints lie outside the padded box (the input), where no target exists.
    assert metrics["AP"] >= 0.95, metrics
    assert metrics["AP50"] == pytest.approx(1.0), metrics


@pytest.fixture()
def tiny_checkpoint(tmp_path: Path) -> Path:
    """A randomly initialised tiny udp model saved as a cal-pose checkpoint."""
    import torch

    from cal_core.models import build_model

    torch.manual_seed(0)
    model = build_model("tiny", "offset", input_size=(64, 48))
    config = {"method": "udp", "backbone": "tiny", "head": "offset", "input_size": [64, 48], "num_joints": 17,
              "codec": build_codec("udp", (64, 48)).config()}
    path = tmp_path / "model.pt"
    torch.save({"model": model.state_dict(), "config": config}, path)
    return path


def _args(model: Path, shards: Path, out: Path, **extra) -> argparse.Namespace:
    base = {"model": str(model), "shards": str(shards), "out": str(out), "flip": True, "detections": None,
            "batch_size": 32, "workers": 0, "experiment": None, "run_name": None}
    return argparse.Namespace(**{**base, **extra})


def test_cli_metrics_are_pycocotools_on_the_written_results(val_shards: Path, tiny_checkpoint: Path,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAL_POSE_TRACKING", "off")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "eval"
    (out / "overlays").mkdir(parents=True)
    (out / "overlays" / "099.png").write_bytes(b"an earlier evaluation's overlay")
    assert evaluate.run(_args(tiny_checkpoint, val_shards, out)) == 0
    doc = json.loads((out / "metrics.json").read_text())
    direct = direct_pycocotools(val_shards / "annotations.json", out / "results.json")
    assert [doc["metrics"][n] for n in evaluate.METRIC_NAMES] == direct.tolist()
    assert doc["input_size"] == "64x48" and doc["method"] == "udp" and len(doc["val_digest"]) == 64
    assert doc["oks_nms"] == evaluate.OKS_NMS_THR  # GT boxes too, as HRNet and mmpose evaluate
    assert doc["counts"]["results"] == len(json.loads((out / "results.json").read_text()))
    labelled = [a for a in json.loads((val_shards / "annotations.json").read_text())["annotations"]
                if not a["iscrowd"] and a["num_keypoints"] > 0]
    rows = json.loads((val_shards / "manifest.json").read_text())["counts"]["instances"]
    assert doc["counts"]["instances"] == len(labelled)
    assert doc["counts"]["unscored_instances"] == rows - len(labelled) > 0
    report = (out / "report.md").read_text()
    assert "| Method | Backbone | Input size | AP |" in report and "left_ankle" in report
    assert doc["counts"]["gt_area_from_box"] == 0 and "no area in the source file" not in report
    assert doc["split"] == "val" and "train** split" not in report
    assert doc["model_sha256"] == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()  # what register checks
    assert (out / "oks_histogram.png").is_file()
    assert len(list((out / "overlays").glob("*.png"))) == evaluate.OVERLAYS


def test_an_edited_annotations_json_is_refused(val_shards: Path, tiny_checkpoint: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """pycocotools scores against annotations.json: cut down by hand, it scored other people than the shards."""
    monkeypatch.setenv("CAL_POSE_TRACKING", "off")
    edited = tmp_path / "val"
    shutil.copytree(val_shards, edited)
    gt = json.loads((edited / "annotations.json").read_text())
    gt["annotations"] = gt["annotations"][: len(gt["annotations"]) // 2]
    (edited / "annotations.json").write_text(json.dumps(gt))
    with pytest.raises(ValueError, match="does not match the sha256 its manifest records"):
        evaluate.evaluate(str(tiny_checkpoint), str(edited), tmp_path / "out")


def test_a_train_split_is_scored_with_a_warning_and_a_report_note(val_shards: Path, tiny_checkpoint: Path,
                                                                  tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAL_POSE_TRACKING", "off")
    as_train = tmp_path / "train"
    shutil.copytree(val_shards, as_train)
    manifest = json.loads((as_train / "manifest.json").read_text())
    (as_train / "manifest.json").write_text(json.dumps({**manifest, "split": "train"}))
    with caplog.at_level("WARNING", logger="cal_core.evaluate"):
        doc = evaluate.evaluate(str(tiny_checkpoint), str(as_train), tmp_path / "out")
    assert doc["split"] == "train" and "is a train split" in caplog.text
    assert "scored on a **train** split" in (tmp_path / "out" / "report.md").read_text()


def test_the_report_says_when_box_areas_stood_in_for_missing_ones(coco_mini: Path, tiny_checkpoint: Path,
                                                                  tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Box areas make OKS more lenient than COCO's: AP on such a set must not pass for COCO-comparable."""
    from cal_core.cli import main

    monkeypatch.setenv("CAL_POSE_TRACKING", "off")
    monkeypatch.chdir(tmp_path)
    gt = json.loads((coco_mini / "annotations" / "person_keypoints_val2017.json").read_text())
    for ann in gt["annotations"]:
        ann.pop("area")
    (tmp_path / "src" / "annotations").mkdir(parents=True)
    (tmp_path / "src" / "annotations" / "person_keypoints_val2017.json").write_text(json.dumps(gt))
    (tmp_path / "src" / "val2017").symlink_to(coco_mini / "val2017")
    assert main(["downsample", "--coco", str(tmp_path / "src"), "--split", "val", "--out", str(tmp_path / "val"),
                 "--input-size", "64x48", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "val" / "64x48" / "manifest.json").read_text())
    assert manifest["counts"]["area_from_box"] == manifest["counts"]["instances"] > 0
    assert evaluate.run(_args(tiny_checkpoint, tmp_path / "val" / "64x48", tmp_path / "eval")) == 0
    doc = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert doc["counts"]["gt_area_from_box"] == manifest["counts"]["instances"]
    assert f"{doc['counts']['gt_area_from_box']} GT people had no area in the source file" in (
        tmp_path / "eval" / "report.md").read_text()


def test_shifted_oracle_through_collect_matches_direct_pycocotools(val_shards: Path, tmp_path: Path) -> None:
    from cal_core.data.dataset import ShardDataset

    codec = build_codec("cal", (64, 48))
    got = evaluate.collect(_oracle(codec, shift=1.5), ShardDataset(str(val_shards), codec, train=False), codec)
    results = evaluate.coco_results(got.image_ids, got.keypoints, got.scores, got.box_scores,
                                     evaluate.nms_areas(got.bboxes, codec.input_size))
    (tmp_path / "results.json").write_text(json.dumps(results))
    metrics = evaluate.coco_keypoint_ap(val_shards / "annotations.json", results)
    direct = direct_pycocotools(val_shards / "annotations.json", tmp_path / "results.json")
    assert [metrics[n] for n in evaluate.METRIC_NAMES] == direct.tolist()
    assert metrics["AP"] < 0.95  # 1.5 input px at 64x48 is several image px: OKS drops


def test_only_people_cocoeval_scores_are_predicted(coco_mini: Path, val_shards: Path) -> None:
    from cal_core.data.dataset import ShardDataset

    dataset = ShardDataset(str(val_shards), build_codec("udp", (64, 48)), train=False)
    gt = json.loads((val_shards / "annotations.json").read_text())
    chosen = dataset.ann_ids()[evaluate.scored_indices(dataset, gt)]
    labelled = {a["id"] for a in _val_gt(coco_mini)["annotations"] if not a["iscrowd"] and a["num_keypoints"] > 0}
    assert sorted(chosen.tolist()) == sorted(labelled)  # coco-mini val: 68 of its 117 non-crowd people
    assert len(dataset) > len(chosen)


class _Boxes:
    """Just what :func:`evaluate.scored_indices` reads of a dataset."""

    def __init__(self, ann_ids: list[int]) -> None:
        self._ids = np.asarray(ann_ids, np.int64)

    def __len__(self) -> int:
        return len(self._ids)

    def ann_ids(self) -> np.ndarray:
        return self._ids


def test_detector_boxes_are_all_predicted_and_an_unscorable_set_is_refused() -> None:
    gt = {"annotations": [{"id": 7, "num_keypoints": 0, "iscrowd": 0}, {"id": 8, "num_keypoints": 3, "iscrowd": 1}]}
    assert evaluate.scored_indices(_Boxes([-1, -1, -1]), gt).tolist() == [0, 1, 2]
    assert evaluate.scored_indices(_Boxes([7, 9, -1]), gt).tolist() == [1, 2]  # 9: not in the file, kept
    with pytest.raises(ValueError, match="shard set s3://b/v: none of its 2 people has a labelled keypoint"):
        evaluate.scored_subset(_Boxes([7, 8]), gt, "s3://b/v")


def test_model_that_does_not_fit_the_shards_is_refused(val_shards: Path) -> None:
    manifest = json.loads((val_shards / "manifest.json").read_text())
    info = evaluate.ModelInfo("udp", (128, 96), 17, "tiny", "torch")
    with pytest.raises(ValueError, match=r"128x96 does not match .* \(64x48\)"):
        evaluate.check_compatible(info, manifest, str(val_shards), 10)
    with pytest.raises(ValueError, match="predicts 16 keypoints"):
        evaluate.check_compatible(evaluate.ModelInfo("udp", (64, 48), 16, "", ""), manifest, "s", 10)
    with pytest.raises(ValueError, match="no person instances"):
        evaluate.check_compatible(evaluate.ModelInfo("udp", (64, 48), 17, "", ""), manifest, "s", 0)


def test_cli_names_a_size_mismatch(val_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture) -> None:
    import torch

    from cal_core.models import build_model

    monkeypatch.setenv("CAL_POSE_TRACKING", "off")
    monkeypatch.chdir(tmp_path)
    model = build_model("tiny", "heatmap", input_size=(128, 96))
    config = {"method": "heatmap", "backbone": "tiny", "input_size": [128, 96]}
    torch.save({"model": model.state_dict(), "config": config}, tmp_path / "big.pt")
    argv = ["evaluate", "--model", str(tmp_path / "big.pt"), "--shards", str(val_shards), "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    assert "cal-pose evaluate: model input size 128x96 does not match the shard set" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # a refused evaluation leaves no empty --out behind


def test_a_remote_model_is_fetched_once_and_named_in_errors(val_shards: Path, tiny_checkpoint: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The model was downloaded twice (load, then sha256); an error named its staged temporary copy."""
    from cal_core import storage

    sources = {"s3://models/run/model.pt": tiny_checkpoint, "s3://models/run/keypoints.onnx": tmp_path / "empty"}
    (tmp_path / "empty").write_bytes(b"")
    fetched = []

    def download(uri: str, dst: Path) -> Path:
        fetched.append(uri)
        shutil.copyfile(sources[uri], dst)
        return Path(dst)

    monkeypatch.setattr(storage, "download", download)
    doc = evaluate.evaluate("s3://models/run/model.pt", str(val_shards), tmp_path / "eval", flip=False)
    assert fetched == ["s3://models/run/model.pt"]
    assert doc["model_sha256"] == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert doc["model"] == "s3://models/run/model.pt"
    with pytest.raises(ValueError, match=r"^s3://models/run/keypoints.onnx is not an ONNX model \(no graph"):
        evaluate.evaluate("s3://models/run/keypoints.onnx", str(val_shards), tmp_path / "eval2")


def test_the_val_digest_names_people_boxes_and_cut_but_not_the_input_size() -> None:
    """A hand-edited margin or another box padding changed AP but not the digest register compares by."""
    got = evaluate.Collected(np.array([3, 1]), np.array([30, 10]), np.zeros((2, 17, 2)), np.ones((2, 17)),
                             np.ones(2), np.array([[1.0, 2, 30, 60], [5, 6, 40, 80]]), [])
    manifest = {"input_size": [64, 48], "crop_size": [96, 72], "margin": 1.5, "crop_format": "jpeg",
                "settings": {"padding": 1.25, "jpeg_quality": 95, "resampling": "r", "shard_size": 2000}}
    base = evaluate.val_digest(b"gt", got, manifest)
    reordered = evaluate.Collected(*(a[::-1] for a in list(got.__dict__.values())[:6]), [])
    assert evaluate.val_digest(b"gt", reordered, manifest) == base  # the set, not the shard order
    same = [{**manifest, "input_size": [128, 96], "crop_size": [192, 144]},  # register compares sizes itself
            {**manifest, "settings": {**manifest["settings"], "shard_size": 10}}]
    assert all(evaluate.val_digest(b"gt", got, m) == base for m in same)
    moved = evaluate.Collected(**{**got.__dict__, "bboxes": got.bboxes + [[0, 0, 0, 1]]})
    other = [{**manifest, "margin": 2.0}, {**manifest, "settings": {**manifest["settings"], "padding": 1.0}},
             {**manifest, "settings": {**manifest["settings"], "jpeg_quality": 80}}]
    assert len({base, evaluate.val_digest(b"gt2", got, manifest), evaluate.val_digest(b"gt", moved, manifest),
                *(evaluate.val_digest(b"gt", got, m) for m in other)}) == 6


def test_detections_must_be_the_file_the_shards_were_cut_from(coco_mini: Path, val_shards: Path,
                                                              tiny_checkpoint: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """evaluate re-read the file itself: it crashed on a record downsample had skipped (image_id null) and
    refused an 80-class detector's file (other categories on images outside the val set)."""
    from cal_core.data import downsample

    gt = json.loads((coco_mini / "annotations" / "person_keypoints_val2017.json").read_text())
    dets = [{"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.9}
            for a in gt["annotations"] if not a["iscrowd"]]
    dets += [{"image_id": None, "category_id": 1, "bbox": [1, 1, 9, 9], "score": 0.5},  # skipped: bad_record
             {"image_id": 999999, "category_id": 18, "bbox": [1, 1, 9, 9], "score": 0.9}]  # a dog elsewhere
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    downsample.downsample(str(coco_mini), "val", str(tmp_path / "det"), ["64x48"], str(tmp_path / "dets.json"),
                          workers=1, progress=False)
    doc = evaluate.evaluate(str(tiny_checkpoint), str(tmp_path / "det" / "64x48"), tmp_path / "eval", flip=False,
                            detections_uri=str(tmp_path / "dets.json"))
    assert doc["detections"] == str(tmp_path / "dets.json") and doc["counts"]["instances"] == len(dets) - 2

    def no_inference(*args, **kwargs):
        raise AssertionError("inference ran before the detections file was checked")

    monkeypatch.setattr(evaluate, "collect", no_inference)
    (tmp_path / "edited.json").write_text(json.dumps(dets[:-1]))  # another file, even if close: refused
    with pytest.raises(ValueError, match=r"detections .*edited.json \(sha256 \w{12}\.\.\.\) is not the file the "
                                         r"shard set was cut from \(.*dets.json"):
        evaluate.evaluate(str(tiny_checkpoint), str(tmp_path / "det" / "64x48"), tmp_path / "eval",
                          detections_uri=str(tmp_path / "edited.json"))
    with pytest.raises(ValueError, match="cut from ground-truth boxes"):
        evaluate.evaluate(str(tiny_checkpoint), str(val_shards), tmp_path / "eval",
                          detections_uri=str(tmp_path / "dets.json"))


@pytest.mark.slow  # two dynamo exports: ~30 s on a busy 2-core machine
def test_onnx_graphs_predict_what_the_checkpoint_predicts(val_shards: Path, tiny_checkpoint: Path,
                                                          tmp_path: Path) -> None:
    import torch

    from cal_core.data.dataset import ShardDataset
    from cal_core.export import export_graphs
    from cal_core.models import model_from_checkpoint

    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    predictor, info, codec = evaluate.load_predictor(str(tiny_checkpoint), flip=True)
    dataset = ShardDataset(str(val_shards), codec, train=False)
    want = evaluate.collect(predictor, dataset, codec)
    export_graphs(model_from_checkpoint(ckpt), ckpt["config"], tmp_path, flip=True)
    for graph in ("raw.onnx", "keypoints.onnx"):
        onnx_predict, onnx_info, _ = evaluate.load_predictor(str(tmp_path / graph), flip=True)
        assert (onnx_info.input_size, onnx_info.num_joints, onnx_info.method) == ((64, 48), 17, "udp")
        got = evaluate.collect(onnx_predict, dataset, codec)
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-4)
        # image px; ties in a random net's near-flat heatmaps may pick another argmax for a few joints
        close = np.linalg.norm(got.keypoints - want.keypoints, axis=-1) <= 1e-2
        assert close.mean() >= 0.95, graph
    with pytest.raises(ValueError, match="exported with the flip test"):
        evaluate.load_predictor(str(tmp_path / "keypoints.onnx"), flip=False)
