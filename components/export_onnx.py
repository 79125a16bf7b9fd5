"""Component: the final checkpoint -> ONNX (raw heads and keypoints with in-graph decode) + parity report."""

from kfp import dsl
from kfp.dsl import Input, Model, Output

from components.images import image


@dsl.component(base_image=image("export"), install_kfp_package=False)
def export_onnx(checkpoint: Input[Model], flip_test: bool, experiment: str, parent_run_id: str,
                onnx_model: Output[Model]) -> None:
    """Export ``<checkpoint>/model.pt``; writes ``raw.onnx``, ``keypoints.onnx``, ``parity.json``."""
    from components.runtime import run_stage

    argv = ["export", "--checkpoint", f"{checkpoint.path}/model.pt", "--out", onnx_model.path]
    run_stage(argv + (["--flip"] if flip_test else []), experiment, parent_run_id)
    onnx_model.metadata.update({**checkpoint.metadata, "format": "onnx", "model_file": "keypoints.onnx"})
