"""``make run``: the whole pipeline end to end on this machine with ``kfp.local`` (no cluster, no servers).

What it does:
1. data: ``--coco URI`` or ``$COCO_ROOT`` (a COCO-layout folder or s3:// prefix), else a
   synthetic low-resolution people set made by ``cal-pose synth`` (cached in
   ``runs/data/`` so reruns compare on the same data);
2. MLflow: ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<abs>/runs/mlflow.db``; one
   parent run per pipeline run, every stage a child run (the parent id goes
   to the stages as ``CAL_POSE_PARENT_RUN_ID``);
3. the DAG of ``pipelines.cal_pipeline`` under
   ``kfp.local.SubprocessRunner(use_venv=False)``, artifacts in
   ``runs/<run-id>/artifacts/``, at 64x48 with the tiny backbone and short
   schedules (flags below shrink or grow it);
4. prints the COCO keypoint AP table, writes ``runs/<run-id>/summary.json``
   and prints the ``mlflow ui`` command to compare runs.
"""

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cal_core import tracking
from cal_core.cli import main as cal_pose
from cal_core.uris import is_remote

#: Thread-pool sizes the tasks inherit (torch/OpenMP, MKL, OpenBLAS). One thread per process is fastest on
#: a small CPU: the training process plus its loader worker fill two cores, and spinning OpenMP threads of
#: oversubscribed pools cost far more than they give when other processes share the cores.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
#: Metrics of the AP table, in the order of the paper's tables.
AP_TABLE = ("AP", "AP50", "AP75", "APM", "APL", "AR")


def synthetic_set(runs: Path, train: int, val: int, seed: int) -> Path:
    """A synthetic COCO-layout set under ``runs/data/``, generated once per (size, seed)."""
    target = runs / "data" / f"synthetic-train{train}-val{val}-seed{seed}"
    if target.is_dir():
        print(f"using cached synthetic set {target}", flush=True)
        return target
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    print(f"generating a synthetic people set ({train} train / {val} val people) in {target}", flush=True)
    code = cal_pose(["synth", "--out", str(staging), "--train", str(train), "--val", str(val),
                     "--seed", str(seed)])
    if code != 0:
        raise RuntimeError(f"cal-pose synth failed with exit code {code}")
    staging.rename(target)
    return target


def lr_steps(epochs: int) -> str:
    """Learning-rate drops at 75% and 90% of a short schedule (the paper's 170,200 of 210, scaled).

    Only drops inside the schedule (none for a 1-epoch run), each once.
    """
    steps = sorted({max(1, round(epochs * share)) for share in (0.75, 0.9)})
    return ",".join(str(s) for s in steps if s < epochs)


def pipeline_arguments(args: argparse.Namespace, coco: str) -> dict[str, Any]:
    """Pipeline parameters for a laptop-sized run, then any ``--param NAME=VALUE`` overrides."""
    from pipelines.client import parse_arguments

    values: dict[str, Any] = {
        "coco_uri": coco if is_remote(coco) else str(Path(coco).resolve()),
        "input_size": args.input_size, "method": args.method,
        "backbone": args.backbone, "epochs_stage1": args.epochs, "epochs_stage2": args.epochs_stage2,
        "batch_size": args.batch_size, "lr": args.lr, "lr_steps": lr_steps(args.epochs),
        "workers": args.workers, "amp": False, "mlflow_experiment": args.experiment, "seed": args.seed,
    }
    values.update(parse_arguments(args.param))
    return values


def find_one(root: Path, pattern: str) -> Path:
    """The single file under ``root`` matching ``pattern`` (a clear error if missing or ambiguous)."""
    found = sorted(root.glob(pattern))
    if len(found) != 1:
        raise RuntimeError(f"expected one {pattern} under {root}, found {len(found)}: {found}")
    return found[0]


def ap_table(run_id: str, metrics: dict[str, float]) -> str:
    """A markdown table of the COCO keypoint metrics (in percent)."""
    names = [m for m in AP_TABLE if m in metrics]
    head = "| run | " + " | ".join(names) + " |"
    rule = "|---|" + "---:|" * len(names)
    row = f"| {run_id} | " + " | ".join(f"{100 * metrics[m]:.1f}" for m in names) + " |"
    return "\n".join((head, rule, row))


@dataclass(frozen=True)
class RunSetup:
    """One pipeline run's folder, data and pipeline arguments (shared by the in-process and container runners)."""

    run_id: str
    run_dir: Path
    runs: Path
    coco: str
    arguments: dict[str, Any]
    started: float


def prepare_run(args: argparse.Namespace, suffix: str = "") -> RunSetup:
    """Create ``runs/<run-id>/``, set the tracking and thread environment the tasks inherit, resolve the data."""
    runs = Path(args.runs_dir).resolve()
    run_id = args.run_id or f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{args.method}-{args.input_size}{suffix}"
    run_dir = runs / run_id
    if run_dir.exists():
        raise FileExistsError(f"{run_dir} exists; pick another --run-id")
    run_dir.mkdir(parents=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{runs / 'mlflow.db'}")
    os.environ["MLFLOW_EXPERIMENT_NAME"] = args.experiment
    for name in THREAD_ENV:
        os.environ.setdefault(name, str(args.threads))
    started = time.monotonic()
    coco_root = args.coco or os.environ.get("COCO_ROOT")
    coco = coco_root or str(synthetic_set(runs, args.people, args.val_people, args.data_seed))
    return RunSetup(run_id, run_dir, runs, coco, pipeline_arguments(args, coco), started)


def finish_run(setup: RunSetup, parent: tracking.Tracker, decision: str, extra: dict[str, Any]) -> dict[str, Any]:
    """Put the evaluation's metrics on the parent run and write ``runs/<run-id>/summary.json``."""
    evaluation = find_one(setup.run_dir / "artifacts", "*/evaluate/evaluation/metrics.json")
    doc = json.loads(evaluation.read_text())
    parent.log_metrics(tracking.defined_metrics(doc["metrics"]))
    parent.set_tags({"registry_decision": decision})
    summary = {
        "run_id": setup.run_id, "mlflow_run_id": parent.run_id, "tracking_uri": tracking.redact_uri(tracking.tracking_uri()), **extra,
        "data": setup.coco, "arguments": setup.arguments, "metrics": doc["metrics"], "registry": decision,
        "run_dir": str(setup.run_dir), "artifacts": str(evaluation.parents[2]),
        "wall_seconds": round(time.monotonic() - setup.started, 1),
    }
    (setup.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def run_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    """Run the DAG once; returns the summary also written to ``runs/<run-id>/summary.json``."""
    from kfp import local

    from pipelines.cal_pipeline import cal_pipeline

    setup = prepare_run(args)
    print(f"run {setup.run_id}: artifacts in {setup.run_dir}, MLflow at {tracking.redact_uri(tracking.tracking_uri())}", flush=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(setup.run_dir / "artifacts"),
               raise_on_error=True)
    # the pipeline's first task logs every pipeline parameter on this run (as in a cluster)
    with tracking.pipeline_run(setup.run_id, args.experiment, tags={"runner": "kfp.local", "data": setup.coco},
                               local_dir=setup.run_dir) as parent:
        decision = cal_pipeline(**setup.arguments).output
        return finish_run(setup, parent, decision, {})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``make run`` / ``cal-pose pipeline run-local`` (defaults: a 4-6 minute CPU run on 2 cores)."""
    parser.add_argument("--coco", help="COCO-layout dataset: a folder or s3://bucket/prefix "
                        "(default: $COCO_ROOT, else synthetic people)")
    parser.add_argument("--people", type=int, default=2000, help="synthetic training people")
    parser.add_argument("--val-people", type=int, default=300, help="synthetic validation people")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic set")
    parser.add_argument("--input-size", default="64x48", help="network input HxW")
    parser.add_argument("--method", default="cal", choices=("heatmap", "dark", "udp", "cal"))
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of stage 1")
    parser.add_argument("--epochs-stage2", type=int, default=5, help="epochs of CAL stage 2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=1, help="downsampling and data-loading workers")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per task process (OMP_NUM_THREADS etc., unless already set)")
    parser.add_argument("--experiment", default="cal-pose", help="MLflow experiment")
    parser.add_argument("--runs-dir", default="runs", help="where runs/<run-id>/ and mlflow.db go")
    parser.add_argument("--run-id", help="name of this run (default: UTC time, method and size)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="any other pipeline parameter (repeatable), e.g. --param mgm_update=batch")


def print_summary(summary: dict[str, Any]) -> None:
    """The end-of-run report: AP table, registry decision, wall time and how to open MLflow."""
    print("\nCOCO keypoint AP (pycocotools, %):\n" + ap_table(summary["run_id"], summary["metrics"]))
    print(f"registry: {summary['registry']}")
    print(f"wall time: {summary['wall_seconds']:.0f} s; summary: {summary['run_dir']}/summary.json")
    uri = summary["tracking_uri"]
    if uri.startswith("sqlite:///"):
        print(f"compare runs: .venv/bin/mlflow ui --backend-store-uri {uri}")
    else:
        print(f"compare runs: open {uri} (experiment {summary['arguments']['mlflow_experiment']!r})")


def run(args: argparse.Namespace) -> int:
    """Run, print the AP table and how to open MLflow."""
    print_summary(run_pipeline(args))
    return 0


if __name__ == "__main__":
    cli = argparse.ArgumentParser(prog="python -m pipelines.run_local", description=__doc__.splitlines()[0])
    add_arguments(cli)
    sys.exit(run(cli.parse_args()))
