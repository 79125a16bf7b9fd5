"""Every stage in its own container: build the images from an empty podman store, run the DAG in them.

``make test-slow`` only (slow + podman marks): the build alone takes many
minutes on 2 cores. The image store is a temporary folder
(``CONTAINERS_STORAGE_CONF``), so the build starts from nothing - base image
included - and the machine's own store is left alone. The checks of a finished
run (artifacts, MLflow parent/child runs with metrics, the AP recomputed with
pycocotools) are those of ``tests/test_run_local.py``: the containers must
produce exactly what ``make run`` produces.
"""

import json
import os
import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.test_run_local import SMALL, check_artifacts, check_mlflow, check_pycocotools_ap

ROOT = Path(__file__).resolve().parents[1]
IMAGES_DIR = ROOT / "images"
BUILD_TIMEOUT_S = 5400
RUN_TIMEOUT_S = 2400

pytestmark = [pytest.mark.slow, pytest.mark.podman]


def _podman_problem(env: dict[str, str]) -> str | None:
    """Why podman cannot build and run here, or None."""
    if shutil.which("podman") is None:
        return "podman is not installed (apt-get install podman runc)"
    if os.geteuid() != 0:
        return "the verified podman recipe is rootful (../shared/notes/containers.md); run as root"
    if not os.environ.get("BASE_IMAGE") and shutil.which("debootstrap") is None:
        return "debootstrap is not installed and no BASE_IMAGE is given (apt-get install debootstrap)"
    probe = subprocess.run(["podman", "run", "--rm", "--help"], env=env, capture_output=True, text=True)
    info = subprocess.run(["podman", "info"], env=env, capture_output=True, text=True)
    if probe.returncode or info.returncode:
        return f"podman does not work here: {(info.stderr or probe.stderr).strip()[-500:]}"
    return None


@pytest.fixture(scope="session")
def podman_env(tmp_path_factory):
    """Environment for podman with images/containers.conf and an empty image store in a temporary folder."""
    store = tmp_path_factory.mktemp("podman-store")
    storage = store / "storage.conf"
    storage.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{store}/graph"\nrunroot = "{store}/run"\n')
    # images/containers.conf plus a private tmp_dir: podman's event log and locks live there, so the
    # events this test reads are this store's only, and nothing of the host's podman is touched.
    conf = store / "containers.conf"
    conf.write_text((IMAGES_DIR / "containers.conf").read_text().replace(
        "[engine]\n", f'[engine]\ntmp_dir = "{store}/tmp"\n', 1))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "CAL_POSE_", "COCO_ROOT", "AWS_", "S3_", "DOCKER_"))}
    env.update(CONTAINERS_CONF=str(conf), CONTAINERS_STORAGE_CONF=str(storage))
    problem = _podman_problem(env)
    if problem:
        pytest.skip(problem)
    yield env
    subprocess.run(["podman", "rmi", "--all", "--force"], env=env, capture_output=True)
    shutil.rmtree(store, ignore_errors=True)


@pytest.fixture(scope="session")
def stage_images(podman_env, tmp_path_factory):
    """``images/build.sh`` into the empty store; returns its results JSON (build times and sizes)."""
    assert subprocess.run(["podman", "images", "-q"], env=podman_env, capture_output=True,
                          text=True).stdout.strip() == "", "the test store must start empty"
    results = Path(os.environ.get("IMAGES_RESULTS") or tmp_path_factory.mktemp("images") / "images.json")
    proc = subprocess.run(["bash", str(IMAGES_DIR / "build.sh")], cwd=ROOT, env={**podman_env, "IMAGES_RESULTS": str(results)},
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert proc.returncode == 0, f"build.sh failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}"
    return json.loads(results.read_text())


def _image_refs() -> dict[str, str]:
    """Every image build.sh makes, by name: the shared base and the stage images the components name."""
    from components import images

    return {"base": f"{images.registry()}/base:{images.tag()}"} | {name: images.image(name) for name in images.IMAGES}


def run_containers(podman_env: dict[str, str], runs: Path, *flags: str) -> subprocess.CompletedProcess:
    """``images/run_containers.sh`` (podman service started and stopped by it) into ``runs``."""
    return subprocess.run(["bash", str(IMAGES_DIR / "run_containers.sh"), "--runs-dir", str(runs), *flags],
                          cwd=ROOT, env=podman_env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def _summary(proc: subprocess.CompletedProcess, runs: Path, run_id: str) -> dict:
    assert proc.returncode == 0, f"run_containers failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-8000:]}"
    assert "COCO keypoint AP" in proc.stdout
    summary = json.loads((runs / run_id / "summary.json").read_text())
    assert summary["runner"] == "docker"
    return summary


def _nothing_left(podman_env: dict[str, str], proc: subprocess.CompletedProcess) -> None:
    """Every container was removed after its exit code was read, and the API service was stopped."""
    left = subprocess.run(["podman", "ps", "-a", "-q"], env=podman_env, capture_output=True, text=True)
    assert left.stdout.strip() == "", f"containers left behind: {left.stdout}"
    service = re.search(r"podman API service \(pid (\d+)\) on unix://(\S+)", proc.stdout)
    assert service, "run_containers.sh did not report its podman service"
    assert not Path(f"/proc/{service[1]}").exists(), "the podman service is still running"
    assert not Path(service[2]).exists(), "the podman socket was not removed"


def _ran_in_images(podman_env: dict[str, str], since: str) -> set[str]:
    """Images of the containers that exited since ``since`` (podman's event log)."""
    events = subprocess.run(["podman", "events", "--stream=false", "--since", since, "--filter", "event=died",
                             "--format", "{{.Image}}"], env=podman_env, capture_output=True, text=True)
    return set(events.stdout.split())


def _now() -> str:
    """The current UTC time in the form ``podman events --since`` takes."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.timeout(BUILD_TIMEOUT_S + 60)
def test_images_build_from_an_empty_store_non_root_without_secrets(stage_images, podman_env):
    refs = _image_refs()
    rows = {row["image"]: row for row in stage_images["rows"]}
    # From an empty store the local Debian base is made too (unless a registry BASE_IMAGE is given).
    assert set(rows) == set(refs) | ({"debian-base"} if not os.environ.get("BASE_IMAGE") else set())
    assert all(row["size_mb"] > 0 and row["build_seconds"] >= 0 for row in rows.values())
    for name, ref in refs.items():
        assert rows[name]["ref"] == ref
        inspect = json.loads(subprocess.run(["podman", "image", "inspect", ref], env=podman_env, check=True,
                                            capture_output=True, text=True).stdout)[0]
        assert inspect["Config"]["User"] == "1000", f"{ref} must run as the non-root user"
        history = subprocess.run(["podman", "history", "--no-trunc", "--format", "{{.CreatedBy}}", ref],
                                 env=podman_env, check=True, capture_output=True, text=True).stdout
        assert "BEGIN CERTIFICATE" not in history and "://" not in history, f"{ref} history names a host or secret"
    # The CA bundle was a build secret: nothing of it, nor the apt mirror, is in the image's files.
    check = ("test ! -e /run/secrets/pipca && ! grep -rqs 'BEGIN CERTIFICATE' /opt/venv/pyvenv.cfg "
             "&& test ! -s /etc/apt/sources.list && id -un")
    out = subprocess.run(["podman", "run", "--rm", "--network", "none", refs["data"], "sh", "-c", check],
                         env=podman_env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "calpose", out.stderr


@pytest.mark.timeout(BUILD_TIMEOUT_S + RUN_TIMEOUT_S)
def test_dag_in_containers_on_synthetic_people(stage_images, podman_env, tmp_path):
    since = _now()
    runs = tmp_path / "runs"
    proc = run_containers(podman_env, runs, *SMALL, "--run-id", "cal-synthetic")
    summary = _summary(proc, runs, "cal-synthetic")
    evaluation = check_artifacts(summary, "cal")
    check_pycocotools_ap(evaluation, summary)
    check_mlflow(summary, "cal")  # child runs written from inside the containers, into the bind-mounted sqlite
    stages = {ref for name, ref in _image_refs().items() if name != "base"}
    assert stages <= _ran_in_images(podman_env, since), "every stage image must have run a container"
    _nothing_left(podman_env, proc)


@pytest.mark.timeout(BUILD_TIMEOUT_S + RUN_TIMEOUT_S)
def test_dag_in_containers_on_coco_mini(stage_images, podman_env, tmp_path, coco_mini):
    runs = tmp_path / "runs"
    proc = run_containers(podman_env, runs, "--coco", str(coco_mini), "--epochs", "3", "--epochs-stage2", "1",
                          "--workers", "1", "--run-id", "cal-coco-mini")
    summary = _summary(proc, runs, "cal-coco-mini")
    evaluation = check_artifacts(summary, "cal")
    check_pycocotools_ap(evaluation, summary)
    check_mlflow(summary, "cal")
    _nothing_left(podman_env, proc)


@pytest.mark.timeout(BUILD_TIMEOUT_S + RUN_TIMEOUT_S)
def test_failing_stage_fails_the_run_with_its_log_tail(stage_images, podman_env, tmp_path, coco_mini):
    # A corrupt input: the training annotations cut off mid-file, so the downsample stage exits non-zero.
    corrupt = tmp_path / "corrupt-coco"
    shutil.copytree(coco_mini, corrupt)
    ann = corrupt / "annotations" / "person_keypoints_train2017.json"
    ann.write_bytes(ann.read_bytes()[:5000])
    runs = tmp_path / "runs"
    proc = run_containers(podman_env, runs, "--coco", str(corrupt), "--epochs", "1", "--run-id", "corrupt")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, f"a failed stage must fail the run:\n{output[-6000:]}"
    assert "FAILURE" in proc.stderr and "downsample" in proc.stderr
    assert "exited with code" in proc.stderr and "not valid JSON" in proc.stderr, proc.stderr[-4000:]
    assert not list(runs.glob("corrupt/summary.json"))
    parent = [run for run in _parent_runs(runs) if run.info.run_name == "corrupt"]
    assert [run.info.status for run in parent] == ["FAILED"]
    _nothing_left(podman_env, proc)


def _parent_runs(runs: Path) -> list:
    """Parent (pipeline) runs in the sqlite store under ``runs``."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, "tags.`cal_pose.stage` = 'pipeline'")
