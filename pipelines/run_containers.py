"""``make run-containers``: the DAG of ``make run`` with every stage inside its own image.

The same pipeline, data and small settings as ``pipelines.run_local`` (its
helpers and flags are imported, not copied), but run by
``kfp.local.DockerRunner``, so each task runs in the stage image its
component names (``components/images.py``; build them with ``make images``).
``images/run_containers.sh`` starts podman's Docker-compatible service and sets
``DOCKER_HOST`` before calling this; with Docker, its own socket is used.

How the containers see what they need:
- kfp bind-mounts the artifact root (``runs/<run-id>/artifacts``) at the same
  absolute path; we add the dataset folder (read-only) and the folder of the
  sqlite MLflow database (``runs/``, read-write; the experiment's artifact
  store is ``runs/artifacts`` beside it), also at their own paths, so every
  path means the same inside and outside.
- MLflow stays the embedded sqlite store of ``make run`` (no server to start):
  the parent run is opened here, and ``MLFLOW_TRACKING_URI``,
  ``MLFLOW_EXPERIMENT_NAME`` and ``CAL_POSE_PARENT_RUN_ID`` are passed into
  each container when it starts, so every stage logs a child run into the same
  database. An ``http://`` tracking URI works too: containers share the host
  network (``network_mode="host"``), so a loopback server is reachable.
- Containers run as the calling user (``docker run -u $(id -u):$(id -g)``) so
  the files they write in ``runs/`` belong to whoever started the run; the
  images' own default user is the non-root ``calpose`` (uid 1000).
- A container that exits non-zero fails its task and the run, with the log
  tail (``pipelines/container_runner.py``: kfp 2.16.1 on podman 4.3.1 would
  otherwise report it as a success).
"""

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from cal_core import tracking
from cal_core.uris import is_remote
from components import images
from pipelines import cal_pipeline, container_runner, run_local

#: Environment copied into every stage container (when set here): what a cluster task gets from the
#: pipeline's ConfigMap and Secrets (endpoints, S3 region and keys, MLflow login or token), the
#: experiment, the parent run, the tracking switch and the thread-pool sizes.
PASS_ENV = (*cal_pipeline.CONFIG_KEYS.values(), *cal_pipeline.OPTIONAL_CONFIG_KEYS.values(),
            *cal_pipeline.S3_KEYS.values(), *cal_pipeline.MLFLOW_KEYS.values(), "MLFLOW_EXPERIMENT_NAME",
            tracking.PARENT_ENV, tracking.TRACKING_SWITCH_ENV, *run_local.THREAD_ENV)


def missing_images(client: Any) -> list[str]:
    """Stage images the components name that the engine does not have."""
    import docker

    missing = []
    for name in images.IMAGES:
        try:
            client.images.get(images.image(name))
        except docker.errors.ImageNotFound:
            missing.append(images.image(name))
    return missing


def mounts(coco: str, runs: Path, tracking_uri: str) -> dict[str, dict[str, str]]:
    """Extra bind mounts, each at its own absolute path: a local dataset (ro), runs/ and the sqlite folder (rw)."""
    volumes = {str(runs): {"bind": str(runs), "mode": "rw"}}
    if not is_remote(coco):
        data = str(Path(coco).resolve())
        volumes[data] = {"bind": data, "mode": "ro"}
    if tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri[len("sqlite:///"):]).resolve().parent
        if not folder.is_relative_to(runs):
            volumes[str(folder)] = {"bind": str(folder), "mode": "rw"}
    return volumes


def run_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    """Run the DAG once in containers; returns the summary also written to ``runs/<run-id>/summary.json``.

    Raises :class:`container_runner.PipelineFailed` (with each failed container's log tail) when a stage fails.
    """
    import docker
    from kfp import local

    from pipelines.cal_pipeline import cal_pipeline

    client = docker.from_env()
    try:
        absent = missing_images(client)
    finally:
        client.close()
    if absent:
        raise RuntimeError(f"stage images missing: {', '.join(absent)}; build them with `make images`")

    setup = run_local.prepare_run(args, suffix="-containers")
    uri = tracking.tracking_uri()
    print(f"run {setup.run_id}: every stage in its image ({images.registry()}/<stage>:{images.tag()}), "
          f"artifacts in {setup.run_dir}, MLflow at {tracking.redact_uri(uri)}", flush=True)

    runner = local.DockerRunner(network_mode="host", user=f"{os.getuid()}:{os.getgid()}")
    local.init(runner=runner, pipeline_root=str(setup.run_dir / "artifacts"), raise_on_error=True)
    tags = {"runner": "kfp.local.DockerRunner", "data": setup.coco, "images": f"{images.registry()}/<stage>:{images.tag()}"}
    with container_runner.use_container_runner(mounts(setup.coco, setup.runs, uri), PASS_ENV) as failures, \
            tracking.pipeline_run(setup.run_id, args.experiment, tags=tags,  # params: the DAG's first task
                                  local_dir=setup.run_dir) as parent:
        try:
            decision = cal_pipeline(**setup.arguments).output
        except RuntimeError as error:
            if failures:
                raise container_runner.PipelineFailed(str(error), failures) from error
            raise
        return run_local.finish_run(setup, parent, decision, {"runner": "docker"})


def run(args: argparse.Namespace) -> int:
    """Run; print the AP table, or the failed stage with its log tail (exit code 1)."""
    try:
        summary = run_pipeline(args)
    except container_runner.PipelineFailed as failed:
        print(f"\nFAILURE: {failed}", file=sys.stderr, flush=True)
        return 1
    run_local.print_summary(summary)
    return 0


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m pipelines.run_containers", description=__doc__.splitlines()[0])
    run_local.add_arguments(cli)
    sys.exit(run(cli.parse_args()))
