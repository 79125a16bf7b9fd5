"""Make container failures visible under ``kfp.local.DockerRunner`` (kfp 2.16.1 on podman 4.3.1).

kfp's ``kfp/local/docker_task_handler.py:run_docker_container`` starts each task's
container with ``auto_remove=True`` and, when ``wait`` answers NotFound, returns
exit code 0. Podman 4.3.1's Docker-compatible API answers exactly that for an
auto-removed container, so a stage that exits 3 is reported SUCCESS
(``../shared/notes/containers.md``).

:func:`use_container_runner` swaps that one function for :func:`run_container`,
which runs the container with ``auto_remove=False``, streams its log (keeping
the last lines), waits for the real exit code, then removes the container. A
non-zero exit - or an exit code that cannot be read - is returned as non-zero,
so kfp marks the task FAILURE and the pipeline fails; the failure, with the
log tail, is recorded so the caller can report it (:class:`PipelineFailed`).

It also adds what every task container needs beyond kfp's pipeline-root mount:
extra bind mounts (the dataset, the MLflow database folder) and environment
variables passed through from this process at each container's start (the
MLflow parent run id only exists once the pipeline run has opened it).
"""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

#: Log lines kept from a failed container for the error message.
LOG_TAIL_LINES = 40
#: Exit code reported when the container's own exit code cannot be read (never assume success).
UNKNOWN_EXIT = 125
#: Terminal colour codes kfp puts in its status messages (unreadable in files and CI logs).
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class ContainerFailure:
    """A task container that exited non-zero: what ran, its exit code and the end of its log."""

    image: str
    exit_code: int
    log_tail: tuple[str, ...]
    command: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        """A readable block for error messages: image, exit code, last log lines."""
        tail = "\n".join(f"    {line}" for line in self.log_tail) or "    (no output)"
        return f"container of {self.image} exited with code {self.exit_code}; last log lines:\n{tail}"


class PipelineFailed(RuntimeError):
    """The pipeline run failed; the message names the failed task and each failed container's log tail."""

    def __init__(self, message: str, failures: Iterable[ContainerFailure]) -> None:
        self.failures = tuple(failures)
        blocks = "\n".join(failure.describe() for failure in self.failures)
        message = _ANSI.sub("", message)
        super().__init__(f"{message}\n{blocks}" if blocks else message)


def _environment(run_args: dict[str, Any], pass_env: Iterable[str]) -> dict[str, str]:
    """The runner's static ``environment`` (dict or ``K=V`` list) plus ``pass_env`` names set here now."""
    static = run_args.pop("environment", None) or {}
    if not isinstance(static, Mapping):
        static = dict(item.split("=", 1) for item in static)
    passed = {name: os.environ[name] for name in pass_env if name in os.environ}
    return {**static, **passed}


def _ensure_image(client: Any, image: str) -> None:
    """Use the local image; pull it only when absent (as kfp does), with a clear error if that fails."""
    import docker

    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        try:
            client.images.pull(image)
        except docker.errors.APIError as error:
            raise RuntimeError(f"image {image} is neither local nor pullable ({error}); "
                               "build the stage images with `make images`") from error


def run_container(client: Any, image: str, command: list[str], volumes: Mapping[str, Any], *,
                  extra_volumes: Mapping[str, Any] | None = None, pass_env: Iterable[str] = (),
                  tail_lines: int = LOG_TAIL_LINES, **run_args: Any) -> tuple[int, tuple[str, ...]]:
    """Run ``command`` in ``image`` to completion; returns ``(exit code, last log lines)``.

    The log is echoed as it streams (kfp prints it under the task's name). The
    container is always removed afterwards, also when streaming or waiting fails.
    """
    import docker
    from kfp.local.docker_task_handler import add_latest_tag_if_not_present

    image = add_latest_tag_if_not_present(image)
    _ensure_image(client, image)
    run_args = {key: value for key, value in run_args.items() if key not in {"auto_remove", "remove", "detach"}}
    environment = _environment(run_args, pass_env)
    container = client.containers.run(image=image, command=command, volumes={**(extra_volumes or {}), **volumes},
                                      environment=environment, detach=True, stdout=True, stderr=True,
                                      auto_remove=False, **run_args)
    tail: deque[str] = deque(maxlen=tail_lines)
    partial = ""
    try:
        for chunk in container.logs(stream=True, follow=True):
            text = chunk.decode(errors="replace")
            print(text, end="", flush=True)
            lines = (partial + text).split("\n")
            partial = lines.pop()
            tail.extend(lines)
        if partial:
            tail.append(partial)
        try:
            code = int(container.wait()["StatusCode"])
        except (docker.errors.NotFound, KeyError, TypeError, ValueError) as error:
            tail.append(f"[container_runner] could not read the exit code: {error!r}")
            code = UNKNOWN_EXIT
    finally:
        with suppress(docker.errors.NotFound):
            container.remove(force=True)
    return code, tuple(tail)


@contextmanager
def use_container_runner(extra_volumes: Mapping[str, Any] | None = None,
                         pass_env: Iterable[str] = ()) -> Iterator[list[ContainerFailure]]:
    """Within the block, kfp's DockerRunner runs containers through :func:`run_container`.

    Yields the list that collects a :class:`ContainerFailure` per failed
    container. ``extra_volumes`` uses the docker SDK's volume dict form
    (``{host: {"bind": path, "mode": "ro"}}``); ``pass_env`` names environment
    variables copied from this process into each container when it starts.
    """
    from kfp.local import docker_task_handler

    failures: list[ContainerFailure] = []
    names = tuple(pass_env)

    def replacement(client: Any, image: str, command: list[str], volumes: dict[str, Any],
                    **run_args: Any) -> int:
        code, tail = run_container(client, image, command, volumes, extra_volumes=extra_volumes,
                                   pass_env=names, **run_args)
        if code != 0:
            failures.append(ContainerFailure(image, code, tail, tuple(command)))
        return code

    original = docker_task_handler.run_docker_container
    docker_task_handler.run_docker_container = replacement
    try:
        yield failures
    finally:
        docker_task_handler.run_docker_container = original
