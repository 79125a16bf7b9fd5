"""Component: register the ONNX model in MLflow; alias ``champion`` only if it beats the champion."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model

from components.images import image


@dsl.component(base_image=image("eval"), install_kfp_package=False)
def register(onnx_model: Input[Model], evaluation: Input[Artifact], model_name: str, experiment: str,
             parent_run_id: str) -> str:
    """Register ``keypoints.onnx`` with its metrics; returns the registry decision line."""
    import contextlib
    import io

    from components.runtime import run_stage

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run_stage(["register", "--model", f"{onnx_model.path}/keypoints.onnx",
                   "--metrics", f"{evaluation.path}/metrics.json", "--name", model_name],
                  experiment, parent_run_id)
    decision = printed.getvalue().strip().splitlines()[-1]
    print(decision)
    return decision
