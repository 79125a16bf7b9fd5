"""One pipeline run against real services: S3 (SeaweedFS) for the dataset and a real ``mlflow server``.

The dataset is read from ``s3://`` by the downsampling tasks through the minio
client, exactly as in a cluster; the MLflow tracking server runs on
127.0.0.1 with a sqlite backend and its artifacts in that S3 bucket
(``--artifacts-destination s3://...``), and the stages log through HTTP.
In the default suite (issue 6: the real-services run is part of CI); a few
minutes on 2 cores.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.s3server import S3Server, s3_server  # noqa: F401 - pytest fixture
from tests.test_run_local import check_artifacts, check_mlflow, check_pycocotools_ap, run_local

MLFLOW_READY_S = 90


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(s3_server: S3Server, tmp_path: Path) -> Iterator[str]:  # noqa: F811 - fixture argument
    """A real MLflow tracking server with artifacts in the test bucket; yields its URL, stopped by PID."""
    port = _free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    env = {**os.environ, **s3_server.env(), "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint}
    log = (tmp_path / "mlflow-server.log").open("w")
    proc = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                             "--artifacts-destination", f"s3://{s3_server.bucket}/mlflow"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + MLFLOW_READY_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{(tmp_path / 'mlflow-server.log').read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_pipeline_reads_s3_and_tracks_to_an_mlflow_server(s3_server, mlflow_server, tmp_path):  # noqa: F811
    from cal_core import storage
    from cal_core.cli import main as cal_pose

    local = tmp_path / "people"
    assert cal_pose(["synth", "--out", str(local), "--train", "200", "--val", "50", "--seed", "1"]) == 0
    coco = f"s3://{s3_server.bucket}/coco"
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.upload(path, storage.join(coco, path.relative_to(local).as_posix()))
    shutil.rmtree(local)

    runs = tmp_path / "runs"
    summary = run_local(runs, "--coco", coco, "--epochs", "2", "--epochs-stage2", "1", "--workers", "1",
                        "--run-id", "services", env={**s3_server.env(), "MLFLOW_TRACKING_URI": mlflow_server})
    assert summary["tracking_uri"] == mlflow_server and summary["arguments"]["coco_uri"] == coco
    assert not (runs / "mlflow.db").exists(), "tracking went to the local sqlite default, not the server"
    evaluation = check_artifacts(summary, "cal")
    check_pycocotools_ap(evaluation, summary)
    check_mlflow(summary, "cal")
    stored = storage.list_prefix(f"s3://{s3_server.bucket}/mlflow")
    assert any(key.endswith("model.onnx") for key in stored), "the registered model is not in S3"
    assert any(key.endswith("report.md") or key.endswith(".png") for key in stored)
    assert json.loads((evaluation / "metrics.json").read_text())["counts"]["gt_people"] == 50
