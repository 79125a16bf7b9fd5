"""The compiled pipeline: up to date, six stages, GPU/retry/caching settings, secrets only from Kubernetes."""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines import cal_pipeline, client
from pipelines.compile import DEFAULT_OUTPUT
from tests import http_stub

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"downsample", "train-stage1", "fit-gmm", "train-stage2", "export-onnx", "evaluate", "register"}
TRAINING = ("train-stage1", "train-stage2")


def _compile_process(out: Path, **env: str) -> subprocess.CompletedProcess:
    """Compile to ``out`` in a fresh interpreter (settings are read at import) with only ``env`` as CAL_POSE_*."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CAL_POSE_")}
    return subprocess.run([sys.executable, "-m", "pipelines.compile", "--output", str(out)], cwd=ROOT,
                          env={**clean, **env}, capture_output=True, text=True)


def _compile(tmp_path: Path, **env: str) -> Path:
    """The compiled YAML's path (the compile must succeed)."""
    out = tmp_path / "pipeline.yaml"
    done = _compile_process(out, **env)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def _spec(package: Path = DEFAULT_OUTPUT) -> dict:
    """The pipeline spec (the compiled file's first YAML document)."""
    return next(yaml.safe_load_all(package.read_text()))


@pytest.fixture(scope="module")
def spec() -> dict:
    """The committed, compiled pipeline spec."""
    return _spec()


def _tasks(spec: dict) -> dict[str, dict]:
    """Root DAG tasks by display name (falling back to the task key)."""
    tasks = spec["root"]["dag"]["tasks"]
    return {task["taskInfo"]["name"]: task for task in tasks.values()}


def _executor(spec: dict, task: dict) -> dict:
    """The container spec behind a task."""
    component = spec["components"][task["componentRef"]["name"]]
    return spec["deploymentSpec"]["executors"][component["executorLabel"]]["container"]


def _platform(package: Path = DEFAULT_OUTPUT) -> dict:
    """Kubernetes platform config per executor label (the compiled file's second YAML document)."""
    docs = list(yaml.safe_load_all(package.read_text()))
    assert len(docs) == 2, "expected the pipeline spec and its Kubernetes platform spec"
    return docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_committed_yaml_is_up_to_date(tmp_path):
    fresh = _compile(tmp_path)
    assert fresh.read_text() == DEFAULT_OUTPUT.read_text(), (
        "pipelines/cal_pipeline.yaml is stale: run `make compile` and commit it")


def test_compile_is_deterministic_and_image_registry_is_overridable(tmp_path):
    first = _compile(tmp_path).read_text()
    assert _compile(tmp_path).read_text() == first
    custom = _compile(tmp_path, CAL_POSE_IMAGE_REGISTRY="registry.example.com/ml", CAL_POSE_IMAGE_TAG="1.2.3")
    images = set(re.findall(r"image: (\S+)", custom.read_text()))
    assert images == {f"registry.example.com/ml/{name}:1.2.3" for name in ("data", "train", "gmm", "export", "eval")}


def test_dag_has_the_six_stages_in_order(spec):
    tasks = _tasks(spec)
    names = {re.sub(r"-(train|val)$", "", name) for name in tasks}
    assert names >= STAGES
    assert {"downsample-train", "downsample-val"} <= set(tasks)
    deps = {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()}
    keys = {task["taskInfo"]["name"]: key for key, task in spec["root"]["dag"]["tasks"].items()}
    for later, earlier in (("train-stage1", "downsample-train"), ("fit-gmm", "train-stage1"),
                           ("train-stage2", "fit-gmm"), ("export-onnx", "train-stage2"),
                           ("export-onnx", "downsample-val"), ("evaluate", "export-onnx"),
                           ("evaluate", "downsample-val"), ("register", "evaluate")):
        assert keys[earlier] in deps[later], f"{later} must consume {earlier}'s output"


@pytest.mark.parametrize("name", ["export-onnx", "evaluate"])
def test_val_shards_and_input_size_feed_export_and_evaluate(spec, name):
    """Export checks parity on real val crops (``<shards>/<input_size>``), the same ones evaluate scores."""
    keys = {task["taskInfo"]["name"]: key for key, task in spec["root"]["dag"]["tasks"].items()}
    inputs = _tasks(spec)[name]["inputs"]
    assert inputs["artifacts"]["shards"]["taskOutputArtifact"] == {
        "producerTask": keys["downsample-val"], "outputArtifactKey": "shards"}
    assert inputs["parameters"]["input_size"] == {"componentInputParameter": "input_size"}


def test_gpu_memory_and_retries_on_training(spec):
    tasks = _tasks(spec)
    for name in TRAINING:
        resources = _executor(spec, tasks[name])["resources"]
        assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert int(resources["accelerator"]["resourceCount"]) == 1
        assert resources["memoryRequest"] > 0
        assert tasks[name]["retryPolicy"]["maxRetryCount"] >= 1
    for name in ("downsample-train", "downsample-val", "export-onnx", "evaluate", "register"):
        assert "accelerator" not in _executor(spec, tasks[name]).get("resources", {})


def test_training_pods_get_shared_memory_for_loader_workers(spec):
    """DataLoader workers pass batches through /dev/shm, 64 MiB by default in a pod."""
    executors, tasks = _platform(), _tasks(spec)
    for name in TRAINING:
        label = spec["components"][tasks[name]["componentRef"]["name"]]["executorLabel"]
        mounts = executors[label]["emptyDirMounts"]
        assert [(m["mountPath"], m["medium"]) for m in mounts] == [("/dev/shm", "Memory")], name
        assert mounts[0]["sizeLimit"] == "4Gi"


def test_cpu_only_and_pull_secrets_are_compile_time_settings(tmp_path):
    package = _compile(tmp_path, CAL_POSE_ACCELERATOR="none", CAL_POSE_IMAGE_PULL_SECRETS="regcred, other")
    executors = _spec(package)["deploymentSpec"]["executors"]
    assert not [label for label, e in executors.items() if "accelerator" in e["container"].get("resources", {})]
    platform = _platform(package)
    assert set(platform) == set(executors)
    for config in platform.values():
        assert [s["secretName"] for s in config["imagePullSecret"]] == ["regcred", "other"]
    assert not [c for c in _platform().values() if "imagePullSecret" in c]


def test_task_deadlines_and_gpu_placement_are_compile_time_settings(tmp_path, spec):
    """Every attempt has a deadline (training's longer); GPU tasks alone get the tolerations and node labels."""
    labels = {name: spec["components"][task["componentRef"]["name"]]["executorLabel"]
              for name, task in _tasks(spec).items()}
    default = _platform()
    for name, label in labels.items():
        want = cal_pipeline.TRAIN_TIMEOUT_S if name in TRAINING else cal_pipeline.TASK_TIMEOUT_S
        assert int(default[label]["activeDeadlineSeconds"]) == want > 0, name
        assert "tolerations" not in default[label] and "nodeSelector" not in default[label], name
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    platform = _platform(_compile(
        tmp_path, CAL_POSE_GPU_TOLERATIONS=json.dumps([toleration]), CAL_POSE_GPU_NODE_SELECTOR='{"pool": "h100"}',
        CAL_POSE_TRAIN_TIMEOUT_S="7200", CAL_POSE_TASK_TIMEOUT_S="0"))
    for name, label in labels.items():
        gpu = name in (*TRAINING, "fit-gmm")
        assert platform[label].get("tolerations") == ([toleration] if gpu else None), name
        assert platform[label].get("nodeSelector") == ({"labels": {"pool": "h100"}} if gpu else None), name
        deadline = "7200" if name in TRAINING else None
        assert platform[label].get("activeDeadlineSeconds") == deadline, name


def test_a_private_ca_bundle_is_mounted_into_every_task(tmp_path, spec):
    """CAL_POSE_CA_CONFIG_MAP: every task mounts the bundle and points its TLS clients at it (tests/test_tls.py)."""
    package = _compile(tmp_path, CAL_POSE_CA_CONFIG_MAP="corp-ca")
    platform = _platform(package)
    bundle = f"{cal_pipeline.CA_MOUNT}/ca.crt"
    for label, executor in _spec(package)["deploymentSpec"]["executors"].items():
        volumes = platform[label]["configMapAsVolume"]
        assert [(v["configMapName"], v["mountPath"]) for v in volumes] == [("corp-ca", cal_pipeline.CA_MOUNT)]
        env = {e["name"]: e["value"] for e in executor["container"].get("env", [])}
        assert {name: env.get(name) for name in cal_pipeline.CA_ENV} == dict.fromkeys(cal_pipeline.CA_ENV, bundle)
    assert set(cal_pipeline.CA_ENV) == {"SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"}
    default = spec["deploymentSpec"]["executors"].values()
    assert not [c for c in _platform().values() if "configMapAsVolume" in c]
    assert not [e for e in default if set(cal_pipeline.CA_ENV) & {v["name"] for v in e["container"].get("env", [])}]


@pytest.mark.parametrize(("env", "error"), [
    ({"CAL_POSE_GPU_TOLERATIONS": "[{key: x}]"}, "CAL_POSE_GPU_TOLERATIONS must be JSON (list)"),
    ({"CAL_POSE_GPU_NODE_SELECTOR": '["pool", "h100"]'}, "CAL_POSE_GPU_NODE_SELECTOR must be a JSON dict"),
    ({"CAL_POSE_GPU_NODE_SELECTOR": '{"pool": ["a"]}'}, "CAL_POSE_GPU_NODE_SELECTOR: label 'pool' needs a string"),
    ({"CAL_POSE_GPU_TOLERATIONS": '[{"key": "x", "operator": "Exists", "efect": "NoSchedule"}]'},
     "CAL_POSE_GPU_TOLERATIONS: {'key': 'x', 'operator': 'Exists', 'efect': 'NoSchedule'} has unknown fields"),
])
def test_bad_gpu_placement_settings_fail_the_compile_naming_the_variable(tmp_path, env, error):
    done = _compile_process(tmp_path / "p.yaml", **env)
    assert done.returncode != 0 and error in done.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "p.yaml").exists()


def test_node_selector_values_are_written_as_kubernetes_labels(tmp_path):
    """JSON true must become the label text "true" (GPU Feature Discovery's), not Python's "True"."""
    platform = _platform(_compile(
        tmp_path, CAL_POSE_GPU_NODE_SELECTOR='{"nvidia.com/gpu.present": true, "gpus": 8, "pool": "h100"}'))
    labels = platform["exec-train-stage1"]["nodeSelector"]["labels"]
    assert labels == {"nvidia.com/gpu.present": "true", "gpus": "8", "pool": "h100"}


def test_caching_downsample_yes_register_no(spec):
    tasks = _tasks(spec)
    assert tasks["downsample-train"]["cachingOptions"].get("enableCache") is True
    assert not tasks["register"]["cachingOptions"].get("enableCache", False)


def test_the_training_split_cache_key_leaves_out_the_detection_threshold(spec):
    """downsample-train reads no detections: a pipeline det_score_thr there re-cut the training shards."""
    tasks = _tasks(spec)
    train = tasks["downsample-train"]["inputs"]["parameters"]["det_score_thr"]
    val = tasks["downsample-val"]["inputs"]["parameters"]["det_score_thr"]
    assert train == {"runtimeValue": {"constant": 0.0}}
    assert val == {"componentInputParameter": "det_score_thr"}


def test_each_split_reads_its_own_layout_parameters(spec, tmp_path, monkeypatch):
    """downsample-train gets train_ann_file/train_image_dir, downsample-val the val ones; empty adds no flag."""
    from kfp import dsl

    from components import runtime
    from components.downsample import downsample

    tasks = _tasks(spec)
    for split in ("train", "val"):
        params = tasks[f"downsample-{split}"]["inputs"]["parameters"]
        assert params["ann_file"] == {"componentInputParameter": f"{split}_ann_file"}
        assert params["image_dir"] == {"componentInputParameter": f"{split}_image_dir"}
    calls = []
    monkeypatch.setattr(runtime, "run_stage", lambda argv, experiment, parent_run_id: calls.append(argv))
    for ann_file, image_dir in (("labels/val.json", "images"), ("", "")):
        downsample.python_func(coco_uri="s3://d/x", split="val", ann_file=ann_file, image_dir=image_dir,
                               input_size="64x48", detections_uri="", det_score_thr=0.0, max_image_pixels=0,
                               workers=1, experiment="x", shards=dsl.Dataset(uri=str(tmp_path / "s")))
    named, default = calls
    assert named[named.index("--max-image-pixels") + 1] == "0"
    assert named[named.index("--ann-file") + 1] == "labels/val.json"
    assert named[named.index("--image-dir") + 1] == "images"
    assert "--ann-file" not in default and "--image-dir" not in default


def test_secrets_come_from_kubernetes_secrets_not_parameters(spec):
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert not [name for name in params if re.search(r"secret|password|token|access_key", name, re.I)]
    executors = _platform()
    assert executors, "no Kubernetes platform config"
    for label, config in executors.items():
        env = {key["envVar"] for secret in config["secretAsEnv"] for key in secret["keyToEnv"]}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= env, label
        names = {secret["secretName"] for secret in config["secretAsEnv"]}
        assert names == {"cal-pose-s3", "cal-pose-mlflow"}


def test_no_secret_values_in_the_yaml():
    text = DEFAULT_OUTPUT.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert not re.search(r"(?i)(secret_access_key|password)\s*[:=]\s*['\"]?[A-Za-z0-9/+]{8,}", text)


def test_every_parameter_has_a_description_and_default(spec):
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"coco_uri", "input_size", "method", "backbone", "epochs_stage1", "epochs_stage2", "batch_size", "lr",
            "gmm_components", "mgm_update", "mlflow_experiment", "detections_uri"} <= set(params)
    for name, definition in params.items():
        assert definition.get("description"), f"parameter {name} lacks a description"
        assert "defaultValue" in definition or definition.get("isOptional"), f"parameter {name} lacks a default"
    from cal_core.data.crops import DEFAULT_MAX_PIXELS

    assert params["max_image_pixels"]["defaultValue"] == DEFAULT_MAX_PIXELS  # the CLI's guard, not a copy drifting


def test_every_parameter_is_documented(spec):
    doc = (ROOT / "docs" / "parameters.md").read_text()
    for name in spec["root"]["inputDefinitions"]["parameters"]:
        assert f"| `{name}` |" in doc, f"docs/parameters.md does not document {name}"


@pytest.mark.parametrize(("given", "expected"), [
    ("30 2 * * *", "0 30 2 * * *"),
    ("0 30 2 * * *", "0 30 2 * * *"),
    ("0 0 9 ? * 2-6", "0 0 9 ? * 2-6"),
    ("*/15  * * * MON-FRI", "0 */15 * * * MON-FRI"),
    ("@Daily", "@daily"),
    ("@every 6h", "@every 6h"),
])
def test_cron_is_converted_to_kfp_six_fields(given, expected):
    assert client.kfp_cron(given) == expected


@pytest.mark.parametrize("bad", ["61 * * * *", "* * *", "0 0 32 * *", "*/0 * * * *", "0 0 * * 7-1", "x * * * *",
                                 "0 0 0 * * * *"])
def test_bad_cron_is_rejected(bad):
    with pytest.raises(ValueError):
        client.kfp_cron(bad)


def test_arguments_are_typed_from_the_compiled_pipeline():
    args = client.parse_arguments(["epochs_stage1=5", "lr=1e-4", "flip_test=false", "input_size=128x96"])
    assert args == {"epochs_stage1": 5, "lr": 1e-4, "flip_test": False, "input_size": "128x96"}
    with pytest.raises(ValueError, match="unknown pipeline parameter"):
        client.parse_arguments(["aws_secret_access_key=x"])
    with pytest.raises(ValueError, match="NUMBER_INTEGER"):
        client.parse_arguments(["epochs_stage1=many"])
    # Helm renders big integer values as floats ("%v" of 20261124): integral floats are integers
    assert client.parse_arguments(["seed=2.0261124e+07"]) == {"seed": 20261124}
    with pytest.raises(ValueError, match="NUMBER_INTEGER"):
        client.parse_arguments(["epochs_stage1=2.5"])


def test_submitted_runs_get_distinct_default_names(monkeypatch: pytest.MonkeyPatch):
    """The run name also names the MLflow parent run: a constant default made every parent 'pipeline cal-pose'."""
    import argparse

    from pipelines import cli

    names = []
    monkeypatch.setattr(client, "connect", lambda host, namespace: object())
    monkeypatch.setattr(client, "submit", lambda c, arguments, run_name, *a, **k: names.append(run_name) or "r")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.run(parser.parse_args(["submit", "--host", "http://kfp"])) == 0
    assert cli.run(parser.parse_args(["submit", "--host", "http://kfp", "--run-name", "nightly"])) == 0
    assert re.fullmatch(r"cal-pose-20\d{6}-\d{6}-[0-9a-f]{4}", names[0]) and names[1] == "nightly"
    assert len({cli.default_run_name() for _ in range(50)}) == 50  # within one second, too


class FakeClient:
    """Records the kfp.Client calls made by submit/schedule."""

    def __init__(self):
        self.calls = []

    def create_run_from_pipeline_package(self, package, **kwargs):
        self.calls.append(("run", package, kwargs))
        return argparse.Namespace(run_id="run-1")

    def create_experiment(self, name):
        self.calls.append(("experiment", name))
        return argparse.Namespace(experiment_id="exp-1")

    def create_recurring_run(self, experiment_id, job_name, **kwargs):
        self.calls.append(("recurring", experiment_id, job_name, kwargs))
        return argparse.Namespace(recurring_run_id="job-1")

    def list_recurring_runs(self, page_token, page_size, experiment_id):
        pages = {"": (["weekly", "other"], "p2"), "p2": (["weekly"], "")}
        names, token = pages[page_token]
        runs = [argparse.Namespace(display_name=n, recurring_run_id=f"{page_token or 'p1'}-{n}") for n in names]
        return argparse.Namespace(recurring_runs=runs, next_page_token=token)

    def delete_recurring_run(self, recurring_run_id):
        self.calls.append(("delete", recurring_run_id))

    def list_pipelines(self, page_token="", page_size=10, sort_by="", filter=None, namespace=None):
        name = json.loads(filter)["predicates"][0]["stringValue"]
        owned = {("cal-pose", "team-a"): "pipe-1", ("cal-pose", None): "pipe-shared"}
        found = [argparse.Namespace(pipeline_id=owned[name, namespace])] if (name, namespace) in owned else []
        return argparse.Namespace(pipelines=found or None)

    def upload_pipeline(self, pipeline_package_path, pipeline_name=None, description=None, namespace=None):
        self.calls.append(("upload", pipeline_package_path, pipeline_name, namespace))
        return argparse.Namespace(pipeline_id="pipe-new")

    def upload_pipeline_version(self, pipeline_package_path, pipeline_version_name, pipeline_id):
        self.calls.append(("version", pipeline_version_name, pipeline_id))


def test_submit_and_schedule_call_kfp_client():
    fake = FakeClient()
    assert client.submit(fake, {"epochs_stage1": 3}, "r", "cal-pose") == "run-1"
    assert fake.calls[0][2]["arguments"] == {"epochs_stage1": 3}
    assert client.schedule(fake, "0 3 * * 1", {"coco_uri": "s3://d/coco"}, "weekly", "cal-pose") == "job-1"
    _, experiment_id, name, kwargs = fake.calls[-1]
    assert (experiment_id, name, kwargs["cron_expression"]) == ("exp-1", "weekly", "0 0 3 * * 1")
    assert kwargs["enable_caching"] is False and kwargs["no_catchup"] is True
    assert kwargs["pipeline_package_path"] == str(DEFAULT_OUTPUT)


def test_schedule_replace_deletes_same_name_recurring_runs_only():
    fake = FakeClient()
    client.schedule(fake, "@weekly", {}, "weekly", "cal-pose", replace=True)
    assert [c for c in fake.calls if c[0] == "delete"] == [("delete", "p1-weekly"), ("delete", "p2-weekly")]
    assert fake.calls[-1][0] == "recurring"


def test_bad_cron_fails_before_anything_is_deleted():
    fake = FakeClient()
    with pytest.raises(ValueError):
        client.schedule(fake, "0 25 * * *", {}, "weekly", "cal-pose", replace=True)
    assert fake.calls == []


@pytest.mark.parametrize("source", ["token-file", "env-token", "none"])
def test_connect_sends_the_token_kfp_client_would_not_find_itself(source, tmp_path, monkeypatch):
    """With a host given, kfp.Client ignores the projected service-account token: connect() passes it."""
    token_file = tmp_path / "token"
    token_file.write_text("sa-token-1")
    monkeypatch.delenv(client.TOKEN_ENV, raising=False)
    monkeypatch.setenv(client.SA_TOKEN_PATH_ENV, str(token_file if source == "token-file" else tmp_path / "absent"))
    if source == "env-token":
        monkeypatch.setenv(client.TOKEN_ENV, "user-token")
    with http_stub.serve() as (url, seen):
        client.connect(url)
    expected = {"token-file": "Bearer sa-token-1", "env-token": "Bearer user-token", "none": None}[source]
    assert seen and seen[-1] == expected


def test_upload_creates_the_pipeline_or_a_new_version_in_the_profile_namespace():
    fake = FakeClient()
    assert client.upload(fake, "new-pipeline", "v1", namespace="team-a") == "pipe-new"
    assert fake.calls[-1] == ("upload", str(DEFAULT_OUTPUT), "new-pipeline", "team-a")
    assert client.upload(fake, "cal-pose", "0.1.0-r2", namespace="team-a") == "pipe-1"
    assert fake.calls[-1] == ("version", "0.1.0-r2", "pipe-1")
    assert client.upload(fake, "cal-pose", "0.1.0-r3") == "pipe-shared"  # --shared: the shared pipeline
    assert client.upload(fake, "cal-pose", "v1", namespace="team-b") == "pipe-new"  # another profile's own


def test_the_fake_kfp_client_has_kfp_clients_signatures():
    """The fakes above stand for kfp.Client: a call they accept must be one kfp.Client accepts."""
    import inspect

    import kfp

    for name in ("list_pipelines", "upload_pipeline", "upload_pipeline_version", "create_experiment",
                 "list_recurring_runs", "delete_recurring_run"):
        ours = [p for p in inspect.signature(getattr(FakeClient, name)).parameters.values()]
        real = inspect.signature(getattr(kfp.Client, name)).parameters
        assert all(p.name in real for p in ours), name


def test_training_validates_on_the_val_shards_every_val_every_epochs(spec, monkeypatch):
    """Both training tasks read the val shards of their input size; the flags follow val_every and flip_test."""
    from components import runtime

    tasks, by_key = _tasks(spec), spec["root"]["dag"]["tasks"]
    for name in TRAINING:
        val = tasks[name]["inputs"]["artifacts"]["val_shards"]["taskOutputArtifact"]
        assert by_key[val["producerTask"]]["inputs"]["parameters"]["split"]["runtimeValue"]["constant"] == "val"
        assert tasks[name]["inputs"]["parameters"]["val_every"]["componentInputParameter"] == "val_every"
    assert runtime.validation_flags("/a/val", "64x48", 10, True) == ["--val-shards", "/a/val/64x48", "--val-every", "10"]
    assert runtime.validation_flags("/a/val", "64x48", 5, False)[-1] == "--no-val-flip"
    assert runtime.validation_flags("/a/val", "64x48", 0, True) == ["--val-every", "0"]


def test_non_cal_methods_pass_through_fit_gmm_and_stage2(tmp_path):
    """The component bodies (called directly) skip the GMM and copy the stage-1 model for non-CAL methods."""
    from kfp import dsl

    from components.fit_gmm import fit_gmm
    from components.train import train_stage2

    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    (stage1 / "model.pt").write_bytes(b"stage-1 weights")
    gmm = dsl.Artifact(uri=str(tmp_path / "gmm"))
    fit_gmm.python_func(checkpoint=dsl.Model(uri=str(stage1)), shards=dsl.Dataset(uri=str(tmp_path / "none")),
                        input_size="64x48", method="udp", components="auto", max_components=3,
                        experiment="x", parent_run_id="", gmm=gmm)
    assert json.loads((tmp_path / "gmm" / "gmm.json").read_text())["skipped"] is True
    model = dsl.Model(uri=str(tmp_path / "stage2"))
    train_stage2.python_func(shards=dsl.Dataset(uri=str(tmp_path / "none")), val_shards=dsl.Dataset(uri="none"),
                             init=dsl.Model(uri=str(stage1)), gmm=gmm, input_size="64x48", method="udp",
                             backbone="tiny", epochs=1, batch_size=2, lr=1e-4, mgm_update="static", seed=0,
                             amp=False, workers=0, val_every=10, flip_test=True, work_uri="", kfp_run_id="r",
                             experiment="x", parent_run_id="", model=model)
    assert (tmp_path / "stage2" / "model.pt").read_bytes() == b"stage-1 weights"
    assert "passthrough" in model.metadata


def test_export_component_checks_parity_on_the_shards_of_its_input_size(tmp_path, monkeypatch):
    """The component body (called directly) passes ``--shards <shards>/<input_size>`` to `cal-pose export`."""
    from kfp import dsl

    from components import runtime
    from components.export_onnx import export_onnx

    calls = []
    monkeypatch.setattr(runtime, "run_stage", lambda argv, experiment, parent_run_id: calls.append(argv))
    model = dsl.Model(uri=str(tmp_path / "onnx"))
    export_onnx.python_func(checkpoint=dsl.Model(uri=str(tmp_path / "stage2")),
                            shards=dsl.Dataset(uri=str(tmp_path / "val")), input_size="64x48", flip_test=True,
                            experiment="x", parent_run_id="", onnx_model=model)
    [argv] = calls
    assert argv[0] == "export" and "--flip" in argv
    assert argv[argv.index("--shards") + 1] == f"{tmp_path}/val/64x48"
    assert argv[argv.index("--checkpoint") + 1] == f"{tmp_path}/stage2/model.pt"
    assert model.metadata["model_file"] == "keypoints.onnx"


def test_cluster_parent_run_records_every_pipeline_parameter(tmp_path, monkeypatch):
    """In a cluster the first task opens the parent run: it carries params, so parent runs compare in MLflow."""
    from mlflow import MlflowClient

    from cal_core import tracking
    from components.mlflow_run import open_pipeline_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    monkeypatch.delenv(tracking.TRACKING_SWITCH_ENV, raising=False)
    run_id = open_pipeline_run.python_func(
        experiment="x", kfp_run_id="kfp-1", kfp_run_name="nightly", coco_uri="s3://d/coco", train_ann_file="",
        train_image_dir="", val_ann_file="labels/val.json", val_image_dir="images", input_size="128x96",
        method="cal", backbone="hrnet_w32", pretrained_weights="", epochs_stage1=210, epochs_stage2=40, batch_size=64,
        lr=1e-3, lr_steps="auto", lr_stage2=1e-4, gmm_components="auto", max_gmm_components=3, mgm_update="static",
        flip_test=True, amp=True, seed=0, workers=4, val_every=10, detections_uri="s3://d/dets.json", det_score_thr=0.5,
        max_image_pixels=0, work_uri="", model_name="cal-pose")
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params["input_size"] == "128x96" and run.data.params["method"] == "cal"
    assert run.data.params["epochs_stage1"] == "210" and run.data.tags["kfp.run_id"] == "kfp-1"
    assert run.data.params["flip_test"] == "true" and run.data.params["detections_uri"] == "s3://d/dets.json"
    assert run.data.params["val_ann_file"] == "labels/val.json" and run.data.params["train_ann_file"] == ""
    assert run.info.run_name == "pipeline nightly"
    # every pipeline parameter but the experiment (the run's own), under its own name
    pipeline_parameters = set(client.parameter_types(DEFAULT_OUTPUT))
    assert set(run.data.params) == pipeline_parameters - {"mlflow_experiment"}
