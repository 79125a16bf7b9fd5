"""Component: the final checkpoint -> ONNX (raw heads and keypoints with in-graph decode) + parity report.

The parity check runs on random inputs and on the first real crops of the
validation shards (``<shards>/<input_size>``): on noise the heatmaps are
nearly flat, so most joints are too ambiguous to compare keypoints.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import image


@dsl.component(base_image=image("export"), install_kfp_package=False)
def export_onnx(checkpoint: Input[Model], shards: Input[Dataset], input_size: str, flip_test: bool,
                experiment: str, parent_run_id: str, onnx_model: Output[Model]) -> None:
    """Export ``<checkpoint>/model.pt``; writes ``raw.onnx``, ``keypoints.onnx``, ``parity.json``.

    Parity is checked on random inputs and on real crops of ``<shards>/<input_size>``.
    """
    from components.runtime import run_stage

    argv = ["export", "--checkpoint", f"{checkpoint.path}/model.pt", "--shards", f"{shards.path}/{input_size}",
            "--out", onnx_model.path]
    run_stage(argv + (["--flip"] if flip_test else []), experiment, parent_run_id)
    onnx_model.metadata.update({**checkpoint.metadata, "format": "onnx", "model_file": "keypoints.onnx"})
