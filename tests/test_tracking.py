"""cal_core.tracking against a real sqlite MLflow store and an unreachable server."""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from cal_core import tracking  # noqa: E402


@pytest.fixture()
def sqlite_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh sqlite tracking store in tmp, selected through the environment."""
    uri = f"sqlite:///{tmp_path / 'ml' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    monkeypatch.delenv(tracking.TRACKING_SWITCH_ENV, raising=False)
    return uri


def _free_port() -> int:
    """A local TCP port nobody listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_default_uri_is_absolute_sqlite_under_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'runs' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    assert tracking.experiment_name() == "from-env"
    assert tracking.experiment_name("arg") == "arg"


def test_stage_run_logs_params_metrics_artifacts(sqlite_uri: str, tmp_path: Path) -> None:
    note = tmp_path / "note.txt"
    note.write_text("hello")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    with tracking.stage_run("train", experiment="exp-a", params={"lr": 0.001, "steps": [170, 200]}) as t:
        t.log_metrics({"loss": 0.5}, step=1)
        t.log_metrics({"loss": 0.25}, step=2)
        t.log_artifact(note, "notes")
        t.log_figure(fig, "plots/curve.png")
        t.set_tags({"method": "cal"})
        run_id = t.run_id
    plt.close(fig)
    client = MlflowClient(sqlite_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.001", "steps": "[170, 200]"}
    assert run.data.tags["cal_pose.stage"] == "train" and run.data.tags["method"] == "cal"
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [0.5, 0.25]
    names = {a.path for a in client.list_artifacts(run_id, "notes")} | {
        a.path for a in client.list_artifacts(run_id, "plots")}
    assert names == {"notes/note.txt", "plots/curve.png"}
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "exp-a"
    assert exp.artifact_location.startswith((tmp_path / "ml").resolve().as_uri())


def test_failure_marks_run_failed(sqlite_uri: str) -> None:
    with pytest.raises(RuntimeError, match="boom"), tracking.stage_run("evaluate") as t:
        run_id = t.run_id
        raise RuntimeError("boom")
    assert MlflowClient(sqlite_uri).get_run(run_id).info.status == "FAILED"


def test_stage_runs_are_children_of_the_pipeline_run(sqlite_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with tracking.pipeline_run("nightly") as parent:
        assert tracking.os.environ[tracking.PARENT_ENV] == parent.run_id
        with tracking.stage_run("export") as child:
            child_id = child.run_id
    assert tracking.PARENT_ENV not in tracking.os.environ
    tags = MlflowClient(sqlite_uri).get_run(child_id).data.tags
    assert tags["mlflow.parentRunId"] == parent.run_id


def test_secrets_never_logged(sqlite_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    params = {"aws_secret_access_key": "x", "db_password": "y", "api_token": "z",
              "endpoint": "http://u:pw@host:9000/x", "cmd": "--key s3cr3t-value --lr 1", "lr": 0.1}
    expected = {"endpoint": "http://host:9000/x", "cmd": "--key *** --lr 1", "lr": "0.1"}
    assert tracking.clean_params(params) == expected
    with tracking.stage_run("train", params=params) as t:
        run_id = t.run_id
    assert MlflowClient(sqlite_uri).get_run(run_id).data.params == expected


def test_key_ids_and_short_words_do_not_swallow_params(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kubeflow's MinIO key id is "minio": params naming minio buckets must survive (they once vanished)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "minio")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "minio123")
    params = {"coco_uri": "s3://minio-data/coco", "endpoint": "http://minio-service.kubeflow:9000",
              "note": "key minio123"}
    assert tracking.clean_params(params) == {"coco_uri": "s3://minio-data/coco",
                                             "endpoint": "http://minio-service.kubeflow:9000",
                                             "note": "key ***"}


def test_unreachable_server_falls_back_to_jsonl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    out = tmp_path / "out"
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="cal_core.tracking"), \
            tracking.stage_run("train", params={"lr": 0.1}, local_dir=out) as t:
        t.log_metrics({"loss": 1.5}, step=3)
        fig = plt.figure()
        t.log_figure(fig, "plots/x.png")
        plt.close(fig)
    assert time.monotonic() - start < 15
    assert not t.online and t.run_id is None
    warnings = [r for r in caplog.records if "MLflow unavailable" in r.getMessage()]
    assert len(warnings) == 1
    events = [json.loads(line) for line in (out / tracking.OFFLINE_FILE).read_text().splitlines()]
    kinds = [e["kind"] for e in events]
    assert kinds == ["start", "params", "metrics", "figure", "end"]
    assert events[1]["data"] == {"lr": "0.1"}
    assert events[2]["data"] == {"step": 3, "values": {"loss": 1.5}}
    assert (out / "figures" / "plots" / "x.png").is_file()


def test_tracking_off_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tracking.TRACKING_SWITCH_ENV, "off")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'never.db'}")
    with tracking.stage_run("synth", local_dir=tmp_path) as t:
        t.log_metrics({"n": 3})
    assert not (tmp_path / "never.db").exists()
    assert (tmp_path / tracking.OFFLINE_FILE).is_file()


def test_defined_metrics_keeps_only_scores() -> None:
    """NaN, strings, bools and COCOeval's -1 (no ground truth in that area range) are not logged."""
    assert tracking.defined_metrics({"a": 1, "b": float("nan"), "c": "x", "d": True, "e": 2.5, "APL": -1.0,
                                     "AP": 0.0}) == {"a": 1.0, "e": 2.5, "AP": 0.0}


def test_attach_run_logs_to_and_closes_a_run_opened_elsewhere(sqlite_uri: str) -> None:
    """The cluster pipeline's last task closes the parent run that its first task opened."""
    opened = tracking.start_run("pipeline demo", "attach-exp")
    assert opened.run_id
    attached = tracking.attach_run(opened.run_id)
    attached.log_metrics({"AP": 0.25})
    attached.end("FINISHED")
    run = MlflowClient(tracking_uri=sqlite_uri).get_run(opened.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["AP"] == 0.25


def test_attach_run_to_an_unknown_id_goes_offline(sqlite_uri: str, tmp_path: Path) -> None:
    attached = tracking.attach_run("0123456789abcdef", local_dir=tmp_path / "off")
    assert not attached.online
    attached.log_metrics({"AP": 0.5})
    kinds = [json.loads(line)["kind"] for line in attached.offline_path.read_text().splitlines()]
    assert kinds == ["attach", "metrics"]


def test_a_required_run_fails_clearly_when_mlflow_is_unreachable(tmp_path, monkeypatch):
    """The cluster's parent run: an unreachable server is an error after bounded retries, not a silent offline file."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:pw@127.0.0.1:{port}")
    monkeypatch.delenv(tracking.TRACKING_SWITCH_ENV, raising=False)
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    with pytest.raises(tracking.TrackingUnavailableError, match=rf"127.0.0.1:{port} is unreachable after 2 attempts") \
            as info:
        tracking.start_required_run("pipeline x", "exp", attempts=2, wait_s=0.01)
    assert "pw" not in str(info.value)  # the credentials in the URI are not echoed
    monkeypatch.setenv(tracking.TRACKING_SWITCH_ENV, "off")
    assert tracking.start_required_run("pipeline x", "exp", attempts=2, wait_s=0.01) == ""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.delenv(tracking.TRACKING_SWITCH_ENV)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert tracking.start_required_run("pipeline x", "exp", params={"method": "cal"})


class _FlakyServer:
    """An MlflowClient stand-in whose server can go away and come back (``down``)."""

    def __init__(self) -> None:
        self.down = False
        self.metrics: list[tuple[int, float]] = []
        self.status = "RUNNING"

    def _answer(self) -> None:
        if self.down:
            raise ConnectionError("connection refused (MLflow pod restarting)")

    def get_experiment_by_name(self, name: str):
        return type("Exp", (), {"experiment_id": "1"})()

    def create_run(self, experiment_id: str, run_name: str, tags: dict):
        return type("Run", (), {"info": type("Info", (), {"run_id": "r1"})()})()

    def get_run(self, run_id: str) -> None:
        self._answer()

    def log_batch(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        self._answer()
        if any(m.key == "bad" for m in metrics):
            raise ValueError("the server refused this batch")
        self.metrics += [(m.step, m.value) for m in metrics]

    def set_terminated(self, run_id: str, status: str) -> None:
        self._answer()
        self.status = status


@pytest.fixture()
def flaky(monkeypatch: pytest.MonkeyPatch) -> _FlakyServer:
    server = _FlakyServer()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.invalid:5000")
    monkeypatch.delenv(tracking.TRACKING_SWITCH_ENV, raising=False)
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    monkeypatch.setattr(tracking, "_probe", lambda uri: None)
    monkeypatch.setattr(tracking, "_make_client", lambda uri: server)
    monkeypatch.setattr(tracking, "RETRY_FIRST_S", 0.05)
    return server


def test_a_server_that_comes_back_gets_the_whole_run(flaky: _FlakyServer, tmp_path: Path) -> None:
    with tracking.stage_run("train-s1", local_dir=tmp_path) as t:
        t.log_metrics({"loss": 1.0}, step=1)
        flaky.down = True  # restarted mid-run
        t.log_metrics({"loss": 0.9}, step=2)
        t.log_metrics({"loss": 0.8}, step=3)
        assert not t.online
        flaky.down = False
        time.sleep(0.2)  # past the first retry
        t.log_metrics({"loss": 0.7}, step=4)
        assert t.online
    assert flaky.metrics == [(1, 1.0), (2, 0.9), (3, 0.8), (4, 0.7)]  # in order, none twice
    assert flaky.status == "FINISHED"
    kinds = [json.loads(line)["kind"] for line in t.offline_path.read_text().splitlines()]
    assert kinds == ["metrics", "metrics", "delivered"]


def test_end_waits_for_the_server_then_leaves_the_rest_in_the_offline_file(flaky: _FlakyServer, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking, "FINAL_WAIT_S", 0.5)
    t = tracking.start_run("train-s2", local_dir=tmp_path)
    flaky.down = True
    t.log_metrics({"loss": 0.5}, step=1)
    start = time.monotonic()
    t.end("FINISHED")
    assert 0.5 <= time.monotonic() - start < 5
    assert flaky.status == "RUNNING" and flaky.metrics == []
    kinds = [json.loads(line)["kind"] for line in t.offline_path.read_text().splitlines()]
    assert kinds == ["metrics", "end"]


def test_a_refused_call_is_dropped_not_queued(flaky: _FlakyServer, tmp_path: Path) -> None:
    with tracking.stage_run("evaluate", local_dir=tmp_path) as t:
        t.log_metrics({"bad": 1.0})
        assert t.online  # the server answers: only that batch was refused
        t.log_metrics({"AP": 0.5}, step=2)
    assert flaky.metrics == [(2, 0.5)] and flaky.status == "FINISHED"


def test_a_remote_stage_folder_gets_the_offline_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cal_core import storage

    written = {}
    monkeypatch.setattr(storage, "write_bytes", lambda uri, data: written.update({uri: data}))
    monkeypatch.setenv(tracking.TRACKING_SWITCH_ENV, "off")
    monkeypatch.chdir(tmp_path)
    with tracking.stage_run("train-s1", local_dir="s3://work/run-1/stage1") as t:
        t.log_metrics({"loss": 1.0}, step=1)
    assert list(written) == ["s3://work/run-1/stage1/" + tracking.OFFLINE_FILE]
    assert written["s3://work/run-1/stage1/" + tracking.OFFLINE_FILE] == t.offline_path.read_bytes()
    assert t.offline_path.parent == Path("runs") / "offline"
