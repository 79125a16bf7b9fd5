"""components.runtime: how the cluster pipeline's last task closes the MLflow parent run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cal_core import tracking
from components import runtime


def test_parent_run_is_closed_with_metrics_only_in_cluster_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    assert runtime.pipeline_opened_parent_run()  # nothing inherited: the pipeline's own task opened it
    parent = tracking.start_run("pipeline kfp-run", "runtime-exp")
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"metrics": {"AP": 0.5, "AR": 0.625, "APL": -1.0}, "method": "cal"}))

    runtime.finish_pipeline_run(parent.run_id, str(metrics), "champion: cal-pose v3 (AP 0.500000)")

    run = MlflowClient(tracking_uri=uri).get_run(parent.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"AP": 0.5, "AR": 0.625}  # COCOeval's -1 (no large person) is not a score
    assert run.data.tags["registry_decision"] == "champion: cal-pose v3 (AP 0.500000)"  # as make run tags it
    monkeypatch.setenv(tracking.PARENT_ENV, parent.run_id)  # make run exports it to every task
    assert not runtime.pipeline_opened_parent_run()
