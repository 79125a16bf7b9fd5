"""Component: COCO (local or s3://) -> low-resolution parquet shards for one split and input size.

Output ``shards`` is the ``--out`` folder of ``cal-pose downsample``; the
shards of input size ``HxW`` are in ``<shards>/<HxW>/``. Cacheable: the same
inputs give the same shards, so it takes no per-run value (no MLflow parent
run id: in a cluster its MLflow run is a top-level run in the experiment;
under ``make run`` it inherits the parent from the environment).
"""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components.images import image


@dsl.component(base_image=image("data"), install_kfp_package=False)
def downsample(coco_uri: str, split: str, ann_file: str, image_dir: str, input_size: str, detections_uri: str,
               det_score_thr: float, max_image_pixels: int, workers: int, experiment: str,
               shards: Output[Dataset]) -> None:
    """Crop every person of ``split`` at ``input_size`` into parquet shards (+ manifest, GT annotations).

    ``ann_file`` / ``image_dir``: the split's annotation JSON and image folder, relative to ``coco_uri``
    unless absolute or URIs; empty = COCO 2017's layout.
    """
    from components.runtime import run_stage

    argv = ["downsample", "--coco", coco_uri, "--split", split, "--out", shards.path,
            "--input-size", input_size, "--workers", str(workers), "--max-image-pixels", str(max_image_pixels),
            "--no-progress"]
    argv += ["--ann-file", ann_file] if ann_file else []
    argv += ["--image-dir", image_dir] if image_dir else []
    if detections_uri:
        argv += ["--detections", detections_uri, "--det-score-thr", str(det_score_thr)]
    run_stage(argv, experiment, "")
    shards.metadata.update({"split": split, "input_size": input_size, "layout": "<path>/<HxW>/"})
