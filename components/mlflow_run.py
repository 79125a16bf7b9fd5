"""Component: the pipeline's MLflow parent run, so every stage's run is its child.

Locally, ``make run`` opens the parent run itself and exports
``CAL_POSE_PARENT_RUN_ID``; this component then logs the params on it and
hands that id on. In a cluster nothing has opened one, so it starts a run
named after the KFP run (tag ``kfp.run_id``) and returns its id; every stage
receives it as a parameter. Either way the parent carries every pipeline
parameter (the same code path, the same names), so parent runs of both
compare column by column in MLflow. When it must open the run and MLflow
cannot be reached (after bounded retries) the task fails, before any GPU
time is spent unrecorded; ``CAL_POSE_TRACKING=off`` runs untracked ("").
"""

from kfp import dsl

from components.images import image


@dsl.component(base_image=image("data"), install_kfp_package=False)
def open_pipeline_run(experiment: str, kfp_run_id: str, kfp_run_name: str, coco_uri: str, train_ann_file: str,
                      train_image_dir: str, val_ann_file: str, val_image_dir: str, input_size: str,
                      method: str, backbone: str, pretrained_weights: str, epochs_stage1: int, epochs_stage2: int,
                      batch_size: int, lr: float, lr_steps: str, lr_stage2: float, gmm_components: str,
                      max_gmm_components: int, mgm_update: str, flip_test: bool, amp: bool, seed: int,
                      workers: int, val_every: int, detections_uri: str, det_score_thr: float,
                      max_image_pixels: int, work_uri: str,
                      model_name: str) -> str:
    """Return the MLflow parent run id for this pipeline run (existing or new), with every pipeline parameter.

    Every argument but the first three is a pipeline parameter under its own
    name; all of them become params (the MLflow experiment is the run's
    experiment), so runs that differ in, say, flip test or box source are
    told apart in the runs table.
    """
    params = {name: value for name, value in locals().items()
              if name not in ("experiment", "kfp_run_id", "kfp_run_name")}
    import os

    from cal_core import tracking

    existing = os.environ.get(tracking.PARENT_ENV, "")
    if existing:
        tracking.attach_run(existing).log_params(params)
        return existing
    return tracking.start_required_run(f"pipeline {kfp_run_name}", experiment, params=params,
                                       tags={"cal_pose.stage": "pipeline", "kfp.run_id": kfp_run_id})
