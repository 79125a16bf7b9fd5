"""Component: the pipeline's MLflow parent run, so every stage's run is its child.

Locally, ``make run`` opens the parent run itself and exports
``CAL_POSE_PARENT_RUN_ID``; this component then just hands that id on. In a
cluster nothing has opened one, so it starts a run named after the KFP run
(tag ``kfp.run_id``) and returns its id; every stage receives it as a
parameter. It returns "" when MLflow is unreachable (stages then log offline).
"""

from kfp import dsl

from components.images import image


@dsl.component(base_image=image("data"), install_kfp_package=False)
def open_pipeline_run(experiment: str, kfp_run_id: str, kfp_run_name: str, coco_uri: str, input_size: str,
                      method: str, backbone: str, epochs_stage1: int, epochs_stage2: int, batch_size: int,
                      lr: float, lr_stage2: float, mgm_update: str, seed: int) -> str:
    """Return the MLflow parent run id for this pipeline run (existing or new, with the main arguments as params).

    The params (the pipeline's own parameter names, as ``make run`` logs them)
    let parent runs be compared by method, input size and schedule in MLflow.
    """
    import os

    from cal_core import tracking

    existing = os.environ.get(tracking.PARENT_ENV, "")
    if existing:
        return existing
    params = {"coco_uri": coco_uri, "input_size": input_size, "method": method, "backbone": backbone,
              "epochs_stage1": epochs_stage1, "epochs_stage2": epochs_stage2, "batch_size": batch_size,
              "lr": lr, "lr_stage2": lr_stage2, "mgm_update": mgm_update, "seed": seed}
    run = tracking.start_run(f"pipeline {kfp_run_name}", experiment, params=params,
                             tags={"cal_pose.stage": "pipeline", "kfp.run_id": kfp_run_id})
    return run.run_id or ""
