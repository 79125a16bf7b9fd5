"""What every component body does: set the tracking environment and run one ``cal-pose`` command.

Imported inside component functions (their source is shipped alone), so it
lives in the installed package, not in the component file.
"""

from __future__ import annotations

import os

from cal_core import tracking
from cal_core.cli import main


def run_stage(argv: list[str], experiment: str, parent_run_id: str) -> None:
    """Run ``cal-pose <argv>`` in this process as a child run of ``parent_run_id``; raise on failure.

    The experiment and parent run travel as environment variables (the CLI
    contract), so the stage's MLflow run lands under the pipeline's run.
    """
    if experiment:
        os.environ["MLFLOW_EXPERIMENT_NAME"] = experiment
    if parent_run_id:
        os.environ[tracking.PARENT_ENV] = parent_run_id
    print("cal-pose " + " ".join(argv), flush=True)
    code = main(argv)
    if code != 0:
        raise RuntimeError(f"`cal-pose {argv[0]}` failed with exit code {code}")


def pipeline_opened_parent_run() -> bool:
    """True where the parent run was opened by the pipeline's own first task (a cluster run).

    ``make run`` opens the parent run in its own process and exports
    :data:`cal_core.tracking.PARENT_ENV` to every task (and closes the run
    itself); in a cluster no task inherits it. Call this before :func:`run_stage`,
    which sets that variable.
    """
    return not os.environ.get(tracking.PARENT_ENV)


def finish_pipeline_run(parent_run_id: str, metrics_path: str, decision: str) -> None:
    """Log the evaluation's headline metrics and the registry ``decision`` on the parent run; mark it FINISHED.

    The decision is the tag ``registry_decision``, as on the parent run ``make run`` opens.
    """
    import json
    from pathlib import Path

    if not parent_run_id:
        return
    doc = json.loads(Path(metrics_path).read_text())
    parent = tracking.attach_run(parent_run_id)
    parent.log_metrics(tracking.defined_metrics(doc.get("metrics", {})))
    parent.set_tags({"registry_decision": decision})
    parent.end("FINISHED")


def validation_flags(val_path: str, input_size: str, val_every: int, flip: bool) -> list[str]:
    """``cal-pose train`` flags for COCO AP on the val shards every ``val_every`` epochs (0: never).

    The val AP curve lands in the training's MLflow run (``val_AP`` etc. per
    validated epoch), with the flip test as the final evaluation uses it.
    """
    if val_every <= 0:
        return ["--val-every", "0"]
    return ["--val-shards", f"{val_path}/{input_size}", "--val-every", str(val_every)] + (
        [] if flip else ["--no-val-flip"])


def flag(value: str, name: str) -> list[str]:
    """``[name, value]`` when ``value`` is set, else ``[]`` (optional CLI flags from pipeline strings)."""
    return [name, value] if value else []


def copy_file(uri: str, dst: str) -> None:
    """Copy ``uri`` (local path or s3://) to the local file ``dst``."""
    import shutil
    from pathlib import Path

    from cal_core.uris import fetch_local

    target = Path(dst)
    target.parent.mkdir(parents=True, exist_ok=True)
    source = fetch_local(uri, target)
    if source.resolve() != target.resolve():
        shutil.copyfile(source, target)


def train_model(argv: list[str], model_dir: str, work_uri: str, kfp_run_id: str, stage: int, experiment: str,
                parent_run_id: str) -> None:
    """``cal-pose train <argv> --out ... --resume``; the final ``model.pt`` ends up in ``model_dir``.

    Progress goes to the log (``--no-progress``: a tqdm bar is one unterminated line in pod logs).

    With ``work_uri`` the training folder is ``<work_uri>/<kfp_run_id>/stage<N>`` (it survives a
    retried pod, so ``--resume`` continues), else the artifact folder itself.
    """
    out = f"{work_uri.rstrip('/')}/{kfp_run_id}/stage{stage}" if work_uri else model_dir
    run_stage(["train", *argv, "--out", out, "--resume", "--no-progress", "--experiment", experiment,
               "--run-name", f"train-stage{stage}"], experiment, parent_run_id)
    if out != model_dir:
        copy_file(f"{out}/model.pt", f"{model_dir}/model.pt")
