"""The cal-pose DAG (DESIGN.md §3): downsample -> train stage 1 -> fit GMM -> train stage 2 -> export -> evaluate -> register.

The DAG is plain on purpose - no ``dsl.If`` or ``dsl.ParallelFor`` - because
the same pipeline must run locally (``make run``) and in a cluster, and
kfp.local 2.16.1 runs both branches of ``dsl.If``/``dsl.Else``, always skips
a root-level ``dsl.If`` on a parameter, and has no ``dsl.OneOf`` to merge
them (docs/parameters.md). For methods other than ``cal`` the fit-GMM and
stage-2 tasks pass through (see components/).

Cluster settings live on the tasks and are ignored by kfp.local: GPU
(``nvidia.com/gpu``, with optional tolerations and node selector) and memory
requests, a deadline per task attempt, an in-memory ``/dev/shm`` for the
tasks whose DataLoader workers pass batches through shared memory (a pod's
default is 64 MiB), retries for training (which resumes), caching for
downsampling, image pull Secrets, and the environment from Kubernetes: S3 and
MLflow credentials from Secrets, endpoints from a ConfigMap (names below; the
Helm chart in charts/cal-pose creates them), optionally a private CA bundle
from another ConfigMap. No credential is ever a
parameter. Compile-time settings come from the environment (the chart's setup
Job sets them from its values).
"""


import json
import os
from typing import Any

from kfp import dsl, kubernetes

from components.downsample import downsample
from components.evaluate import evaluate
from components.export_onnx import export_onnx
from components.fit_gmm import fit_gmm
from components.mlflow_run import open_pipeline_run
from components.register import register
from components.train import train_stage1, train_stage2

PIPELINE_NAME = "cal-pose"
#: Kubernetes objects the tasks read their environment from (override at compile time).
S3_SECRET = os.environ.get("CAL_POSE_S3_SECRET", "cal-pose-s3")
MLFLOW_SECRET = os.environ.get("CAL_POSE_MLFLOW_SECRET", "cal-pose-mlflow")
CONFIG_MAP = os.environ.get("CAL_POSE_CONFIG_MAP", "cal-pose-config")
S3_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
#: The MLflow login: basic auth (username + password) or a bearer token; the Secret holds either (optional).
MLFLOW_KEYS = {"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
               "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN": "MLFLOW_TRACKING_TOKEN"}
CONFIG_KEYS = {"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI", "S3_ENDPOINT_URL": "S3_ENDPOINT_URL"}
#: ConfigMap keys a task reads when present (a ConfigMap made by hand may lack them): the S3 signing region.
OPTIONAL_CONFIG_KEYS = {"AWS_REGION": "AWS_REGION"}
#: Accelerator resource of the GPU stages; "none" compiles a CPU-only pipeline (with CPU-only images).
ACCELERATOR = os.environ.get("CAL_POSE_ACCELERATOR", "nvidia.com/gpu")
#: Comma-separated docker-registry Secret names every task pulls its image with (empty: none).
IMAGE_PULL_SECRETS = [n.strip() for n in os.environ.get("CAL_POSE_IMAGE_PULL_SECRETS", "").split(",") if n.strip()]
#: Retries of a training task (each resumes from the last checkpoint).
TRAIN_RETRIES = 3
#: ConfigMap with a PEM CA bundle (key ``ca.crt``) that every task trusts for HTTPS to S3 and MLflow, for
#: endpoints whose certificates a private CA signed (empty: the images' default trust store). The bundle
#: replaces that store, so it must also hold any public CA the tasks need.
CA_CONFIG_MAP = os.environ.get("CAL_POSE_CA_CONFIG_MAP", "").strip()
CA_MOUNT = "/etc/cal-pose/ca"
#: Variables that point the tasks' TLS clients at the bundle: OpenSSL's default store (Python's ``ssl``,
#: so the minio client) and ``requests`` (MLflow's client).
CA_ENV = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")


def _json_setting(name: str, default: str, kind: type) -> Any:
    """A compile-time setting given as JSON in the environment variable ``name``; a clear error if malformed."""
    text = os.environ.get(name, "").strip() or default
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} must be JSON ({kind.__name__}), got {text!r}: {exc}") from exc
    if not isinstance(value, kind):
        raise ValueError(f"{name} must be a JSON {kind.__name__}, got {text!r}")
    return value


_TOLERATION_FIELDS = {"key": "key", "operator": "operator", "value": "value", "effect": "effect",
                      "tolerationSeconds": "toleration_seconds"}


def _toleration(toleration: Any) -> dict[str, Any]:
    """A Kubernetes toleration object as ``kubernetes.add_toleration`` keyword arguments."""
    unknown = set(toleration) - set(_TOLERATION_FIELDS) if isinstance(toleration, dict) else {"(not an object)"}
    if unknown:
        raise ValueError(f"CAL_POSE_GPU_TOLERATIONS: {toleration!r} has unknown fields {sorted(unknown)}")
    return {_TOLERATION_FIELDS[k]: v for k, v in toleration.items()}


def _label_value(label: str, value: Any) -> str:
    """A node-label value as Kubernetes writes it: strings as given, JSON true/false/numbers as JSON text.

    ``str(True)`` would give ``"True"``, which matches no node labelled ``true`` (values are case-sensitive).
    """
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return json.dumps(value)
    raise ValueError(f"CAL_POSE_GPU_NODE_SELECTOR: label {label!r} needs a string value, got {value!r}")


#: Tolerations of the GPU tasks (JSON list of Kubernetes tolerations), e.g. for GPU nodes tainted
#: ``nvidia.com/gpu:NoSchedule`` on clusters without the ExtendedResourceToleration admission plugin.
GPU_TOLERATIONS = [_toleration(t) for t in _json_setting("CAL_POSE_GPU_TOLERATIONS", "[]", list)]
#: Node labels the GPU tasks must run on (JSON object), e.g. ``{"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}``.
GPU_NODE_SELECTOR = {label: _label_value(label, value)
                     for label, value in _json_setting("CAL_POSE_GPU_NODE_SELECTOR", "{}", dict).items()}
#: Seconds one attempt of a training task may run before Kubernetes stops it (a retry resumes from
#: ``last.pt`` when ``work_uri`` is set, else starts over), and of any other task (0: no limit). A hung
#: loader or S3 stall then frees the GPU and the schedule, whose runs otherwise queue behind it
#: (maxConcurrency).
TRAIN_TIMEOUT_S = int(os.environ.get("CAL_POSE_TRAIN_TIMEOUT_S", str(72 * 3600)))
TASK_TIMEOUT_S = int(os.environ.get("CAL_POSE_TASK_TIMEOUT_S", str(12 * 3600)))


def _environment(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """Endpoints (and S3 region) from the ConfigMap, S3 keys from their Secret, optional MLflow login from its Secret.

    With ``CAL_POSE_CA_CONFIG_MAP`` also the CA bundle, mounted read-only, and the variables that make
    the task's TLS clients trust it.
    """
    kubernetes.use_config_map_as_env(task, CONFIG_MAP, CONFIG_KEYS)
    kubernetes.use_config_map_as_env(task, CONFIG_MAP, OPTIONAL_CONFIG_KEYS, optional=True)
    kubernetes.use_secret_as_env(task, S3_SECRET, S3_KEYS)
    kubernetes.use_secret_as_env(task, MLFLOW_SECRET, MLFLOW_KEYS, optional=True)
    if CA_CONFIG_MAP:
        kubernetes.use_config_map_as_volume(task, CA_CONFIG_MAP, mount_path=CA_MOUNT)
        for name in CA_ENV:
            task.set_env_variable(name, f"{CA_MOUNT}/ca.crt")
    return task


def _resources(task: dsl.PipelineTask, cpu: str, memory: str, gpu: bool = False, shm: str = "",
               timeout_s: int = TASK_TIMEOUT_S) -> dsl.PipelineTask:
    """CPU/memory requests (memory also as limit), one accelerator for GPU stages, ``/dev/shm`` of ``shm``.

    The shared memory counts against the memory limit (emptyDir ``Memory``).
    GPU stages also get the GPU tolerations and node selector; every task a
    deadline of ``timeout_s`` per attempt (0: none).
    """
    task.set_cpu_request(cpu).set_memory_request(memory).set_memory_limit(memory)
    if gpu and ACCELERATOR != "none":
        task.set_accelerator_type(ACCELERATOR).set_accelerator_limit(1)
        _gpu_placement(task)
    if timeout_s > 0:
        kubernetes.set_timeout(task, timeout_s)
    if shm:
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=shm)
    if IMAGE_PULL_SECRETS:
        kubernetes.set_image_pull_secrets(task, IMAGE_PULL_SECRETS)
    return _environment(task)


def _gpu_placement(task: dsl.PipelineTask) -> None:
    """The GPU tasks' tolerations and node selector (``CAL_POSE_GPU_TOLERATIONS`` / ``_NODE_SELECTOR``)."""
    for toleration in GPU_TOLERATIONS:
        kubernetes.add_toleration(task, **toleration)
    for label, value in GPU_NODE_SELECTOR.items():
        kubernetes.add_node_selector(task, label, value)


@dsl.pipeline(name=PIPELINE_NAME, description="Low-resolution human pose estimation with Confidence-Aware "
              "Learning (CAL): COCO -> low-res shards -> two-stage training with Mixed Gaussian Masks -> "
              "ONNX -> COCO keypoint AP -> MLflow registry.")
def cal_pipeline(
    coco_uri: str = "s3://cal-pose/coco",
    train_ann_file: str = "",
    train_image_dir: str = "",
    val_ann_file: str = "",
    val_image_dir: str = "",
    input_size: str = "64x48",
    method: str = "cal",
    backbone: str = "hrnet_w32",
    pretrained_weights: str = "",
    epochs_stage1: int = 210,
    epochs_stage2: int = 40,
    batch_size: int = 64,
    lr: float = 0.001,
    lr_steps: str = "auto",
    lr_stage2: float = 0.0001,
    gmm_components: str = "auto",
    max_gmm_components: int = 3,
    mgm_update: str = "static",
    flip_test: bool = True,
    amp: bool = True,
    seed: int = 0,
    workers: int = 4,
    val_every: int = 10,
    detections_uri: str = "",
    det_score_thr: float = 0.0,
    max_image_pixels: int = 178956970,
    work_uri: str = "",
    mlflow_experiment: str = "cal-pose",
    model_name: str = "cal-pose",
) -> str:
    """Train and evaluate one low-resolution pose model; returns the registry decision.

    Args:
        coco_uri: COCO-layout dataset (local folder or s3://bucket/prefix) with
            annotations/person_keypoints_{train,val}2017.json and the image folders train2017/, val2017/.
        train_ann_file: the train annotation JSON in another layout (relative to coco_uri unless absolute or a
            URI, e.g. "annotations/train.json"); empty = COCO 2017's.
        train_image_dir: the folder train file_name values are relative to (same rules); empty = train2017.
        val_ann_file: as train_ann_file, for val.
        val_image_dir: as train_image_dir, for val (empty = val2017).
        input_size: network input "HxW": 64x48, 128x96 or 256x192 (heatmaps are input/4).
        method: heatmap, dark, udp or cal. Only cal runs fit-GMM and stage 2; the others pass through them.
        backbone: tiny, hrnet_w18_small, hrnet_w32, hrnet_w48 or resnet50.
        pretrained_weights: optional state dict (local or s3://) stage 1 starts from, e.g. ImageNet HRNet/ResNet
            backbone weights as the paper's models use; empty = from scratch.
        epochs_stage1: epochs of stage 1 (every method).
        epochs_stage2: epochs of CAL stage 2 (Eq. 15, with Mixed Gaussian Masks).
        batch_size: training batch size per GPU.
        lr: Adam learning rate of stage 1.
        lr_steps: comma-separated epochs of stage 1 at which the learning rate drops x0.1 ("" = never;
            "auto" = the paper's 170,200 of 210 scaled to epochs_stage1).
        lr_stage2: Adam learning rate of CAL stage 2 (constant).
        gmm_components: GMM components for the masks: "auto" (lowest BIC), "paper" (1 below 256x192 input, 2 from it up) or a number.
        max_gmm_components: BIC is computed over 1..this many components ("auto" picks among them).
        mgm_update: stage-2 masks: "static" (the fitted GMM) or "batch" (refit per mini-batch, as in the paper).
        flip_test: average the prediction with the mirrored image's at export/evaluation.
        amp: mixed-precision training on the GPU.
        seed: random seed of training.
        workers: worker processes for downsampling and data loading.
        val_every: score the model on the val set (COCO AP, logged to the training's MLflow run) every
            this many epochs of each training stage and after its last epoch; 0 = never.
        detections_uri: optional COCO-format person detections (JSON) for the val split; empty = ground-truth boxes.
        det_score_thr: minimum detection score kept when detections_uri is set.
        max_image_pixels: images with more pixels are skipped as too_large (a decompression-bomb guard,
            PIL's ~179 MP); 0 = no limit, e.g. for gigapixel frames.
        work_uri: optional s3:// prefix for resumable training folders (a retried training task resumes
            from <work_uri>/<run id>/stage<N>/last.pt); empty = train inside the artifact folder.
        mlflow_experiment: MLflow experiment of the pipeline run and its stage runs.
        model_name: MLflow registered model name (alias "champion" moves only to a better model).
    """
    parent = _resources(open_pipeline_run(
        experiment=mlflow_experiment, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        kfp_run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, coco_uri=coco_uri, train_ann_file=train_ann_file,
        train_image_dir=train_image_dir, val_ann_file=val_ann_file, val_image_dir=val_image_dir,
        input_size=input_size, method=method,
        backbone=backbone, pretrained_weights=pretrained_weights, epochs_stage1=epochs_stage1,
        epochs_stage2=epochs_stage2, batch_size=batch_size, lr=lr, lr_steps=lr_steps, lr_stage2=lr_stage2,
        gmm_components=gmm_components, max_gmm_components=max_gmm_components, mgm_update=mgm_update,
        flip_test=flip_test, amp=amp, seed=seed, workers=workers, val_every=val_every, detections_uri=detections_uri,
        det_score_thr=det_score_thr, max_image_pixels=max_image_pixels, work_uri=work_uri,
        model_name=model_name), "250m", "512Mi")
    parent.set_caching_options(False).set_display_name("mlflow-parent-run")
    tracking = {"experiment": mlflow_experiment, "parent_run_id": parent.output}

    shards = {}
    # train never reads detections: a constant threshold keeps det_score_thr out of its cache key
    splits = (("train", train_ann_file, train_image_dir, "", 0.0),
              ("val", val_ann_file, val_image_dir, detections_uri, det_score_thr))
    for split, ann_file, image_dir, detections, threshold in splits:
        task = downsample(coco_uri=coco_uri, split=split, ann_file=ann_file, image_dir=image_dir,
                          input_size=input_size, detections_uri=detections, det_score_thr=threshold,
                          max_image_pixels=max_image_pixels, workers=workers, experiment=mlflow_experiment)
        _resources(task, "4", "8Gi").set_caching_options(True).set_display_name(f"downsample-{split}")
        shards[split] = task.outputs["shards"]

    training = {"input_size": input_size, "method": method, "backbone": backbone, "batch_size": batch_size,
                "seed": seed, "amp": amp, "workers": workers, "val_shards": shards["val"], "val_every": val_every,
                "flip_test": flip_test, "work_uri": work_uri, "kfp_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER, **tracking}
    stage1 = train_stage1(shards=shards["train"], epochs=epochs_stage1, lr=lr, lr_steps=lr_steps,
                          pretrained_weights=pretrained_weights, **training)
    _resources(stage1, "8", "32Gi", gpu=True, shm="4Gi", timeout_s=TRAIN_TIMEOUT_S).set_retry(TRAIN_RETRIES)
    stage1.set_display_name("train-stage1")

    gmm = fit_gmm(checkpoint=stage1.outputs["model"], shards=shards["train"], input_size=input_size, method=method,
                  components=gmm_components, max_components=max_gmm_components, **tracking)
    _resources(gmm, "4", "16Gi", gpu=True).set_display_name("fit-gmm")

    stage2 = train_stage2(shards=shards["train"], init=stage1.outputs["model"], gmm=gmm.outputs["gmm"],
                          epochs=epochs_stage2, lr=lr_stage2, mgm_update=mgm_update, **training)
    _resources(stage2, "8", "32Gi", gpu=True, shm="4Gi", timeout_s=TRAIN_TIMEOUT_S).set_retry(TRAIN_RETRIES)
    stage2.set_display_name("train-stage2")

    exported = export_onnx(checkpoint=stage2.outputs["model"], shards=shards["val"], input_size=input_size,
                           flip_test=flip_test, **tracking)
    _resources(exported, "2", "8Gi").set_display_name("export-onnx")

    evaluated = evaluate(onnx_model=exported.outputs["onnx_model"], shards=shards["val"], input_size=input_size,
                         flip_test=flip_test, detections_uri=detections_uri, **tracking)
    _resources(evaluated, "4", "8Gi").set_display_name("evaluate")

    registered = register(onnx_model=exported.outputs["onnx_model"], evaluation=evaluated.outputs["evaluation"],
                          model_name=model_name, **tracking)
    _resources(registered, "1", "2Gi").set_caching_options(False).set_display_name("register")
    return registered.output
