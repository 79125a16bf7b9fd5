"""End to end: the whole pipeline under kfp.local (``make run``, smaller), on synthetic people and on coco-mini.

Each run goes through ``python -m pipelines.run_local`` in a subprocess (a
clean environment, as ``make run`` has), then the test checks what every
stage left behind, the MLflow runs (one parent per pipeline run, a child per
stage, comparable metric names across runs) and that the AP is pycocotools'
(recomputed here from the evaluation's own results file with COCOeval).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.coco_reference import direct_pycocotools

ROOT = Path(__file__).resolve().parents[1]
#: A small, fast run: a few hundred people, a few epochs of the tiny net.
SMALL = ["--people", "300", "--val-people", "60", "--epochs", "3", "--epochs-stage2", "1", "--workers", "1"]
#: ``cal_pose.stage`` tags of the child runs; fit-gmm and stage 2 run for CAL only (else they pass through).
STAGE_RUNS = {"downsample", "train-s1", "export", "evaluate", "register"}
CAL_ONLY_RUNS = {"fit-gmm", "train-s2"}


def run_local(runs: Path, *flags: str, env: dict[str, str] | None = None, timeout: int = 900) -> dict:
    """Run ``pipelines.run_local`` into ``runs`` (clean env + ``env``); returns its summary.json."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("MLFLOW_", "CAL_POSE_", "COCO_ROOT", "AWS_", "S3_"))}
    proc = subprocess.run([sys.executable, "-m", "pipelines.run_local", "--runs-dir", str(runs), *flags],
                          cwd=ROOT, env={**clean, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"run_local failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}"
    assert "COCO keypoint AP (pycocotools" in proc.stdout and "compare runs: " in proc.stdout
    summaries = sorted(runs.glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(summaries[-1].read_text())


def one(root: Path, pattern: str) -> Path:
    """The single path under ``root`` matching ``pattern``."""
    found = sorted(root.glob(pattern))
    assert len(found) == 1, f"{pattern}: {found}"
    return found[0]


def check_artifacts(summary: dict, method: str) -> Path:
    """Every stage's outputs exist; returns the evaluation folder."""
    root = Path(summary["artifacts"])
    manifests = sorted(root.glob("downsample*/shards/64x48/manifest.json"))
    assert [json.loads(m.read_text())["split"] for m in manifests] == ["train", "val"]
    assert one(root, "train-stage1/model/model.pt").stat().st_size > 0
    gmm = json.loads(one(root, "fit-gmm/gmm/gmm.json").read_text())
    assert gmm.get("skipped") is (None if method == "cal" else True)
    assert one(root, "train-stage2/model/model.pt").stat().st_size > 0
    for name in ("raw.onnx", "keypoints.onnx", "parity.json"):
        assert one(root, f"export-onnx/onnx_model/{name}").stat().st_size > 0
    parity = json.loads(one(root, "export-onnx/onnx_model/parity.json").read_text())
    assert parity["ok"] and [c["inputs"] for c in parity["checks"]] == ["random normal", "real crops"]
    evaluation = one(root, "evaluate/evaluation")
    assert (evaluation / "report.md").read_text().strip()
    assert one(root, "evaluate/report").read_text() == (evaluation / "report.md").read_text()
    return evaluation


def check_pycocotools_ap(evaluation: Path, summary: dict) -> None:
    """COCOeval, called directly on the evaluation's ground truth and results file, gives the AP the run reported."""
    doc = json.loads((evaluation / "metrics.json").read_text())
    results = json.loads((evaluation / "results.json").read_text())
    assert len(results) == doc["counts"]["results"] > 0, "no keypoint results were scored"
    val_manifests = [m for m in Path(summary["artifacts"]).glob("downsample*/shards/64x48/manifest.json")
                     if json.loads(m.read_text())["split"] == "val"]
    gt = val_manifests[0].with_name("annotations.json")
    recomputed = direct_pycocotools(gt, evaluation / "results.json")
    assert recomputed[0] == pytest.approx(doc["metrics"]["AP"], abs=1e-9)
    assert summary["metrics"]["AP"] == doc["metrics"]["AP"]
    assert 0.0 <= doc["metrics"]["AP"] <= 1.0


def mlflow_runs(summary: dict) -> tuple[object, list[object]]:
    """The parent run of this pipeline run and its children."""
    from mlflow import MlflowClient

    mlflow_client = MlflowClient(tracking_uri=summary["tracking_uri"])
    parent = mlflow_client.get_run(summary["mlflow_run_id"])
    children = mlflow_client.search_runs([parent.info.experiment_id],
                                         f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return parent, children


def check_mlflow(summary: dict, method: str) -> None:
    """A FINISHED parent run with the AP metrics and a FINISHED child run per stage that ran."""
    parent, children = mlflow_runs(summary)
    assert parent.info.status == "FINISHED"
    assert {"AP", "AP50", "AP75", "AR"} <= set(parent.data.metrics)
    assert parent.data.params["method"] == method  # every pipeline parameter, as the cluster's parent has them
    assert {"flip_test", "detections_uri", "pretrained_weights", "model_name"} <= set(parent.data.params)
    stages = [run.data.tags.get("cal_pose.stage") for run in children]
    expected = STAGE_RUNS | (CAL_ONLY_RUNS if method == "cal" else set())
    assert set(stages) == expected, f"child runs: {sorted(stages)}"
    assert stages.count("downsample") == 2
    assert all(run.info.status == "FINISHED" for run in children)
    by_stage = {run.data.tags["cal_pose.stage"]: run for run in children}
    assert by_stage["evaluate"].data.metrics["AP"] == pytest.approx(summary["metrics"]["AP"])
    assert "loss" in by_stage["train-s1"].data.metrics, "training logged no loss"
    trained = ["train-s1", "train-s2"] if method == "cal" else ["train-s1"]
    assert all("val_AP" in by_stage[stage].data.metrics for stage in trained), "no val AP during training"


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def synthetic_run(runs_dir) -> dict:
    """The first pipeline run into ``runs_dir`` (synthetic people, CAL): its summary.json.

    A fixture, not a test's side effect, so the coco-mini test that compares
    against it also runs alone (``-k``, ``--lf``) or in any order.
    """
    return run_local(runs_dir, *SMALL, "--run-id", "cal-synthetic")


def test_cal_pipeline_on_synthetic_people(runs_dir, synthetic_run):
    summary = synthetic_run
    assert summary["tracking_uri"] == f"sqlite:///{runs_dir / 'mlflow.db'}"
    evaluation = check_artifacts(summary, "cal")
    check_pycocotools_ap(evaluation, summary)
    check_mlflow(summary, "cal")
    assert summary["registry"].startswith("champion: cal-pose v1")


def test_coco_mini_run_is_a_comparable_second_run(runs_dir, coco_mini, synthetic_run):
    first = synthetic_run
    summary = run_local(runs_dir, "--coco", str(coco_mini), "--epochs", "3", "--epochs-stage2", "1",
                        "--workers", "1", "--run-id", "cal-coco-mini")
    assert summary["data"] == str(coco_mini)
    evaluation = check_artifacts(summary, "cal")
    check_pycocotools_ap(evaluation, summary)
    check_mlflow(summary, "cal")
    assert summary["tracking_uri"] == first["tracking_uri"]
    parents = [mlflow_runs(s)[0] for s in (first, summary)]
    assert parents[0].info.experiment_id == parents[1].info.experiment_id
    assert set(parents[0].data.metrics) == set(parents[1].data.metrics)
    assert summary["registry"].startswith(("champion: cal-pose v2", "challenger: cal-pose v2"))


@pytest.mark.slow
def test_heatmap_run_passes_through_gmm_and_stage2(runs_dir):
    summary = run_local(runs_dir, *SMALL, "--method", "heatmap", "--run-id", "heatmap-synthetic")
    check_artifacts(summary, "heatmap")
    check_mlflow(summary, "heatmap")
    root = Path(summary["artifacts"])
    assert one(root, "train-stage2/model/model.pt").read_bytes() == one(root, "train-stage1/model/model.pt").read_bytes()
