"""pipelines/container_runner.py against a fake Docker client that behaves like podman 4.3.1's compat API.

The fake answers ``wait`` with NotFound for a container started with
``auto_remove=True`` (the podman bug): kfp's own handler then reports a task
that exited 3 as SUCCESS; through the wrapper the task and the pipeline FAIL,
with the exit code and the container's log tail. The real-podman version of
this is in tests/test_containers.py (slow).
"""

import docker
import pytest
from kfp import dsl, local

from pipelines import container_runner

FAKE_IMAGE = "localhost/cal-pose-test/fake:1"


class FakeContainer:
    """A finished container: its output (in uneven chunks) and exit code."""

    def __init__(self, output: bytes, exit_code: int, auto_remove: bool) -> None:
        self.output, self.exit_code, self.auto_remove = output, exit_code, auto_remove
        self.removed = False

    def logs(self, stream: bool, follow: bool = False):
        assert stream
        for start in range(0, len(self.output), 7):  # chunks split lines in the middle
            yield self.output[start:start + 7]

    def wait(self) -> dict:
        if self.auto_remove:  # podman 4.3.1: the auto-removed container "does not exist in database"
            raise docker.errors.NotFound("no container with ID found in database")
        return {"StatusCode": self.exit_code}

    def remove(self, force: bool = False) -> None:
        self.removed = True


class FakeImages:
    def __init__(self, present: set[str]) -> None:
        self.present = present
        self.pulled: list[str] = []

    def get(self, name: str):
        if name not in self.present:
            raise docker.errors.ImageNotFound(name)
        return name

    def list(self):  # kfp's own handler looks images up this way
        return [type("Image", (), {"tags": sorted(self.present), "attrs": {"RepoDigests": []}})()]

    def pull(self, name: str):
        self.pulled.append(name)
        raise docker.errors.APIError(f"pull access denied for {name}")


class FakeContainers:
    def __init__(self, client: "FakeClient") -> None:
        self.client = client

    def run(self, **kwargs) -> FakeContainer:
        self.client.runs.append(kwargs)
        container = FakeContainer(self.client.output, self.client.exit_code, kwargs["auto_remove"])
        self.client.started.append(container)
        return container


class FakeClient:
    def __init__(self, output: bytes, exit_code: int, images: set[str] = frozenset({FAKE_IMAGE})) -> None:
        self.output, self.exit_code = output, exit_code
        self.images = FakeImages(set(images))
        self.containers = FakeContainers(self)
        self.runs: list[dict] = []
        self.started: list[FakeContainer] = []

    def info(self) -> dict:
        return {}

    def close(self) -> None:
        pass


FAILING_LOG = b"".join(f"step {i}\n".encode() for i in range(60)) + b"Traceback: ValueError: bad --method\n"


@dsl.component(base_image=FAKE_IMAGE, install_kfp_package=False)
def stage() -> None:
    """Never runs: the fake client stands in for the container."""


@pytest.fixture
def fake_docker(monkeypatch):
    """Install a fake client (exit 3 with FAILING_LOG) as ``docker.from_env``; returns it."""
    client = FakeClient(FAILING_LOG, exit_code=3)
    monkeypatch.setattr(docker, "from_env", lambda: client)
    return client


def test_kfp_alone_reports_the_failed_container_as_success(fake_docker, tmp_path):
    # The bug the wrapper exists for; if kfp fixes it this test says so (then the wrapper can go).
    local.init(runner=local.DockerRunner(), pipeline_root=str(tmp_path), raise_on_error=True)
    stage()
    assert fake_docker.runs[0]["auto_remove"] is True


def test_wrapper_fails_the_task_with_exit_code_and_log_tail(fake_docker, tmp_path):
    local.init(runner=local.DockerRunner(), pipeline_root=str(tmp_path), raise_on_error=True)
    with container_runner.use_container_runner() as failures, pytest.raises(RuntimeError, match="FAILURE"):
        stage()
    assert fake_docker.runs[0]["auto_remove"] is False
    assert fake_docker.started[0].removed, "the container must be removed after its exit code is read"
    [failure] = failures
    assert failure.image == FAKE_IMAGE and failure.exit_code == 3
    assert failure.log_tail[-1] == "Traceback: ValueError: bad --method"
    assert len(failure.log_tail) == container_runner.LOG_TAIL_LINES
    assert failure.log_tail[0] == f"step {61 - container_runner.LOG_TAIL_LINES}"
    error = container_runner.PipelineFailed("Pipeline \x1b[95m'p'\x1b[0m finished with status FAILURE", failures)
    assert str(error).startswith("Pipeline 'p' finished with status FAILURE\n")
    assert "exited with code 3" in str(error) and "bad --method" in str(error)


def test_wrapper_is_removed_after_the_block(fake_docker, tmp_path):
    from kfp.local import docker_task_handler

    original = docker_task_handler.run_docker_container
    with container_runner.use_container_runner():
        assert docker_task_handler.run_docker_container is not original
    assert docker_task_handler.run_docker_container is original


def test_success_returns_zero_and_records_nothing(monkeypatch, tmp_path):
    client = FakeClient(b"done\n", exit_code=0)
    monkeypatch.setattr(docker, "from_env", lambda: client)
    local.init(runner=local.DockerRunner(), pipeline_root=str(tmp_path), raise_on_error=True)
    with container_runner.use_container_runner() as failures:
        stage()
    assert failures == [] and client.started[0].removed


def test_unreadable_exit_code_is_a_failure():
    client = FakeClient(b"partial line without newline", exit_code=0)
    container = FakeContainer(b"", 0, auto_remove=True)  # wait() raises NotFound
    client.containers.run = lambda **kwargs: container
    code, tail = container_runner.run_container(client, FAKE_IMAGE, ["true"], {})
    assert code == container_runner.UNKNOWN_EXIT
    assert "could not read the exit code" in tail[-1] and container.removed


def test_environment_and_extra_volumes_reach_the_container(monkeypatch):
    client = FakeClient(b"no trailing newline", exit_code=0)
    monkeypatch.setenv("CAL_POSE_PARENT_RUN_ID", "abc123")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    code, tail = container_runner.run_container(
        client, FAKE_IMAGE, ["true"], {"/root/a": {"bind": "/root/a", "mode": "rw"}},
        extra_volumes={"/data": {"bind": "/data", "mode": "ro"}},
        pass_env=("CAL_POSE_PARENT_RUN_ID", "MLFLOW_EXPERIMENT_NAME"), environment={"STATIC": "1"},
        auto_remove=True, network_mode="host")
    assert (code, tail) == (0, ("no trailing newline",))
    run = client.runs[0]
    assert run["environment"] == {"STATIC": "1", "CAL_POSE_PARENT_RUN_ID": "abc123"}
    assert run["volumes"] == {"/data": {"bind": "/data", "mode": "ro"}, "/root/a": {"bind": "/root/a", "mode": "rw"}}
    assert run["auto_remove"] is False and run["network_mode"] == "host"


def test_missing_image_that_cannot_be_pulled_names_make_images():
    client = FakeClient(b"", exit_code=0, images=set())
    with pytest.raises(RuntimeError, match="make images"):
        container_runner.run_container(client, "localhost/cal-pose/nope:1", ["true"], {})
    assert client.images.pulled == ["localhost/cal-pose/nope:1"] and client.runs == []
