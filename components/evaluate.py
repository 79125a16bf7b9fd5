"""Component: COCO keypoint AP (pycocotools) of the ONNX model on the validation shards.

Writes the evaluation folder (metrics.json, report.md, overlays), the KFP
Metrics (every defined number of metrics.json's ``metrics``: COCOeval's -1
for an empty area range is left out) and the report as a Markdown artifact
shown in the KFP UI.
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components.images import image


@dsl.component(base_image=image("eval"), install_kfp_package=False)
def evaluate(onnx_model: Input[Model], shards: Input[Dataset], input_size: str, flip_test: bool,
             detections_uri: str, experiment: str, parent_run_id: str, evaluation: Output[Artifact],
             metrics: Output[Metrics], report: Output[Markdown]) -> None:
    """Evaluate ``keypoints.onnx`` on ``<shards>/<input_size>`` (instance rescoring + OKS-NMS, as HRNet)."""
    import json
    import shutil
    from pathlib import Path

    from cal_core.tracking import defined_metrics
    from components.runtime import flag, run_stage

    argv = ["evaluate", "--model", f"{onnx_model.path}/keypoints.onnx", "--shards", f"{shards.path}/{input_size}",
            "--out", evaluation.path]
    argv += ([] if flip_test else ["--no-flip"]) + flag(detections_uri, "--detections")
    run_stage(argv, experiment, parent_run_id)
    doc = json.loads((Path(evaluation.path) / "metrics.json").read_text())
    for name, value in defined_metrics(doc["metrics"]).items():
        metrics.log_metric(name, value)
    shutil.copyfile(Path(evaluation.path) / "report.md", report.path)
