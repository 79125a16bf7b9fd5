"""Component: register the ONNX model in MLflow; alias ``champion`` only if it beats the champion."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model

from components.images import image


@dsl.component(base_image=image("eval"), install_kfp_package=False)
def register(onnx_model: Input[Model], evaluation: Input[Artifact], model_name: str, experiment: str,
             parent_run_id: str) -> str:
    """Register ``keypoints.onnx`` with its metrics; returns the registry decision line.

    As the pipeline's last task it also closes the MLflow parent run when the
    pipeline itself opened it (in a cluster), with the evaluation's metrics on it.
    """
    import contextlib
    import io

    from components.runtime import finish_pipeline_run, pipeline_opened_parent_run, run_stage

    close_parent = pipeline_opened_parent_run()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run_stage(["register", "--model", f"{onnx_model.path}/keypoints.onnx",
                   "--metrics", f"{evaluation.path}/metrics.json", "--name", model_name],
                  experiment, parent_run_id)
    decision = printed.getvalue().strip().splitlines()[-1]
    print(decision)
    if close_parent:
        finish_pipeline_run(parent_run_id, f"{evaluation.path}/metrics.json", decision)
    return decision
