"""Components: train a pose model (any method) - stage 1, and CAL's stage 2.

Two component functions over one ``cal-pose train`` call, because kfp.local
2.16 cannot run a component with an unconnected optional artifact input
(``KeyError`` in ``construct_executor_input``): stage 1 has no ``init``/``gmm``
inputs, stage 2 requires them.

Stage 2 exists only for ``method=cal`` (Eq. 15 with Mixed Gaussian Masks from
``fit_gmm``). The DAG is the same for every method, because kfp.local
2.16.1 cannot run ``dsl.If`` branches correctly (docs/parameters.md); for
other methods the stage-2 task passes the
stage-1 model through unchanged, so export/evaluate get the stage-1 model.

Retries resume: with ``work_uri`` set (cluster: an S3 prefix) a task trains
into ``<work_uri>/<kfp run id>/stage<N>/``, which outlives a failed pod, and
``--resume`` continues from its ``last.pt``; the final ``model.pt`` is then
copied into the output artifact. Without ``work_uri`` it trains straight into
the artifact folder (local runs).
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.images import image


@dsl.component(base_image=image("train"), install_kfp_package=False)
def train_stage1(shards: Input[Dataset], val_shards: Input[Dataset], input_size: str, method: str, backbone: str,
                 epochs: int, batch_size: int, lr: float, lr_steps: str, seed: int, amp: bool, workers: int,
                 val_every: int, flip_test: bool, work_uri: str, kfp_run_id: str, experiment: str,
                 parent_run_id: str, model: Output[Model], pretrained_weights: str = "") -> None:
    """Train ``method`` on the ``input_size`` shards (from scratch or ``pretrained_weights``); writes model.pt.

    Every ``val_every`` epochs (and after the last) the model is scored on the val shards (COCO AP).
    """
    from components.runtime import flag, train_model, validation_flags

    model.metadata.update({"method": method, "backbone": backbone, "input_size": input_size, "stage": 1})
    train_model(["--shards", f"{shards.path}/{input_size}", "--method", method, "--stage", "1",
                 "--backbone", backbone, "--epochs", str(epochs), "--batch-size", str(batch_size), "--lr", str(lr),
                 "--lr-steps", lr_steps, "--workers", str(workers), "--seed", str(seed)] + (["--amp"] if amp else [])
                + flag(pretrained_weights, "--weights")
                + validation_flags(val_shards.path, input_size, val_every, flip_test),
                model.path, work_uri, kfp_run_id, 1, experiment, parent_run_id)


@dsl.component(base_image=image("train"), install_kfp_package=False)
def train_stage2(shards: Input[Dataset], val_shards: Input[Dataset], init: Input[Model], gmm: Input[Artifact],
                 input_size: str, method: str, backbone: str, epochs: int, batch_size: int, lr: float,
                 mgm_update: str, seed: int, amp: bool, workers: int, val_every: int, flip_test: bool,
                 work_uri: str, kfp_run_id: str, experiment: str, parent_run_id: str, model: Output[Model]) -> None:
    """CAL stage 2 (Eq. 15, constant ``lr``) from the stage-1 model and the GMM; other methods: the stage-1 model."""
    from components.runtime import copy_file, train_model, validation_flags

    model.metadata.update({"method": method, "backbone": backbone, "input_size": input_size, "stage": 2})
    if method != "cal":
        copy_file(f"{init.path}/model.pt", f"{model.path}/model.pt")
        model.metadata["passthrough"] = f"stage 2 is CAL-only; this is the stage-1 model of {method}"
        return
    train_model(["--shards", f"{shards.path}/{input_size}", "--method", method, "--stage", "2",
                 "--backbone", backbone, "--epochs", str(epochs), "--batch-size", str(batch_size), "--lr", str(lr),
                 "--lr-steps", "", "--workers", str(workers), "--seed", str(seed),
                 "--init", f"{init.path}/model.pt", "--gmm", f"{gmm.path}/gmm.json", "--mgm-update", mgm_update]
                + (["--amp"] if amp else []) + validation_flags(val_shards.path, input_size, val_every, flip_test),
                model.path, work_uri, kfp_run_id, 2, experiment, parent_run_id)
