"""The Helm chart without helm: YAML parses, templates only use values that exist, names match the pipeline.

``helm`` is not installed here, so this is a static checker of the templates:
every ``.Values.x.y`` reference resolves in values.yaml, every ``include``
names a defined template, no credential has a value in values.yaml, and the
objects the pipeline tasks read (ConfigMap, Secret, their keys) are the ones
the chart creates. When a ``helm`` binary is on PATH, ``helm lint`` and
``helm template`` run too.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipelines import cal_pipeline, client

CHART = Path(__file__).resolve().parents[1] / "charts" / "cal-pose"
TEMPLATES = sorted((CHART / "templates").glob("*"))
VALUES_REF = re.compile(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
SECRET_KEY = re.compile(r"(?i)(secret|password|accesskey|token)")


@pytest.fixture(scope="module")
def values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def _lookup(values: dict, path: list[str]) -> bool:
    """True if ``path`` exists in the values tree."""
    node = values
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def test_chart_and_values_parse(values):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "cal-pose"
    assert {"images", "s3", "mlflow", "postgresql", "pipeline", "pipelineEnv"} <= set(values)


def test_every_values_reference_exists(values):
    missing = []
    for template in TEMPLATES:
        for match in VALUES_REF.finditer(template.read_text()):
            path = match.group(1).strip(".").split(".")
            if not _lookup(values, path):
                missing.append(f"{template.name}: .Values.{'.'.join(path)}")
    assert not missing, "templates reference values that values.yaml lacks:\n" + "\n".join(missing)
    assert sum(len(VALUES_REF.findall(t.read_text())) for t in TEMPLATES) > 30


def test_every_include_is_defined():
    text = "\n".join(t.read_text() for t in TEMPLATES)
    defined = set(re.findall(r'define "([^"]+)"', text))
    used = set(re.findall(r'include "([^"]+)"', text))
    assert used and used <= defined, f"undefined templates: {used - defined}"


def test_template_actions_are_balanced():
    for template in TEMPLATES:
        text = template.read_text()
        assert text.count("{{") == text.count("}}"), template.name
        opened = len(re.findall(r"{{-?\s*(if|range|with|define)\b", text))
        closed = len(re.findall(r"{{-?\s*end\b", text))
        assert opened == closed, f"{template.name}: {opened} blocks opened, {closed} closed"


def _walk(node, path=()):
    """(path, leaf) pairs of a nested dict."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, (*path, str(key)))
    else:
        yield path, node


def test_no_credentials_in_values(values):
    for path, leaf in _walk(values):
        if SECRET_KEY.search(path[-1]) and not path[-1].lower().endswith(("existingsecret", "secretname")):
            assert leaf in ("", None, []), f"values.yaml must not hold a credential: {'.'.join(path)}"


def test_objects_match_what_the_pipeline_reads(values):
    assert values["pipelineEnv"]["configMapName"] == cal_pipeline.CONFIG_MAP
    assert values["pipelineEnv"]["s3SecretName"] == cal_pipeline.S3_SECRET
    configmap = (CHART / "templates" / "configmap.yaml").read_text()
    assert set(re.findall(r"^  ([A-Z0-9_]+):", configmap, re.M)) == {*cal_pipeline.CONFIG_KEYS,
                                                                      *cal_pipeline.OPTIONAL_CONFIG_KEYS}
    secret = (CHART / "templates" / "secret-s3.yaml").read_text()
    assert set(re.findall(r"^  ([A-Z0-9_]+):", secret, re.M)) == set(cal_pipeline.S3_KEYS)


def test_schedule_values_are_valid_for_the_pipeline(values):
    schedule = values["pipeline"]["schedule"]
    assert client.kfp_cron(schedule["cron"]) == "0 0 2 * * 0"
    pairs = [f"{key}={value}" for key, value in schedule["arguments"].items()]
    assert set(client.parse_arguments(pairs)) == set(schedule["arguments"])


def test_setup_job_sets_only_compile_settings_the_pipeline_reads():
    """Every CAL_POSE_* variable the setup Job passes is read by the pipeline code (a typo would be ignored)."""
    job = (CHART / "templates" / "pipeline-job.yaml").read_text()
    passed = set(re.findall(r"- name: (CAL_POSE_[A-Z0-9_]+)", job))
    code = "\n".join(p.read_text() for p in (CHART.parents[1] / "pipelines").glob("*.py"))
    code += "\n".join(p.read_text() for p in (CHART.parents[1] / "components").glob("*.py"))
    read = set(re.findall(r"""["'](CAL_POSE_[A-Z0-9_]+)["']""", code))  # names as string literals in code
    assert {"CAL_POSE_GPU_TOLERATIONS", "CAL_POSE_TRAIN_TIMEOUT_S", "CAL_POSE_ACCELERATOR"} <= passed
    assert passed <= read, f"set by the Job but read by no pipeline code: {sorted(passed - read)}"
    assert "activeDeadlineSeconds:" in job and "resources:" in job


def test_mlflow_and_database_pods_opt_out_of_istio_and_migrate_the_schema(values):
    """KFP task pods have no sidecar: a profile's mTLS-only policy would refuse them at an injected MLflow."""
    for component in ("mlflow", "postgresql"):
        assert values[component]["podAnnotations"] == {"sidecar.istio.io/inject": "false"}
        text = (CHART / "templates" / f"{component}.yaml").read_text()
        assert f"with .Values.{component}.podAnnotations" in text
    mlflow = (CHART / "templates" / "mlflow.yaml").read_text()
    assert "initContainers:" in mlflow and "'db', 'upgrade', os.environ['MLFLOW_BACKEND_STORE_URI']" in mlflow
    assert mlflow.count('include "cal-pose.mlflowEnv"') == 2  # the migration sees the server's database


def test_every_pod_meets_pod_security_restricted():
    """Non-root, RuntimeDefault seccomp, and every container without privilege escalation or capabilities."""
    for name in ("mlflow.yaml", "postgresql.yaml", "pipeline-job.yaml"):
        text = (CHART / "templates" / name).read_text()
        assert "runAsNonRoot: true" in text and "type: RuntimeDefault" in text, name
        images = len(re.findall(r"^\s+image: ", text, re.M))
        assert images and text.count('include "cal-pose.containerSecurity"') == images, name
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    assert "allowPrivilegeEscalation: false" in helpers and 'drop: ["ALL"]' in helpers


def test_mlflow_is_database_backed_with_s3_artifacts(values):
    text = (CHART / "templates" / "mlflow.yaml").read_text() + (CHART / "templates" / "_helpers.tpl").read_text()
    assert "- name: MLFLOW_BACKEND_STORE_URI" in text  # read by `mlflow server` from the environment
    assert "--backend-store-uri" not in text  # an argument would put the DB password in the process list
    assert "postgresql+psycopg2://" in text and "secretKeyRef" in text
    url = re.search(r'"postgresql\+psycopg2://([^"]*)"', text).group(1)
    assert ":$(" not in url and "- name: PGPASSWORD" in text  # libpq reads it: no escaping of the password
    assert values["mlflow"]["artifactsDestination"].startswith("s3://")
    assert "kind: StatefulSet" in (CHART / "templates" / "postgresql.yaml").read_text()


def test_a_private_ca_bundle_reaches_the_tasks_and_the_mlflow_server(values):
    """pipelineEnv.caConfigMap: compiled into the tasks (setup Job) and mounted where the pipeline expects it."""
    assert values["pipelineEnv"]["caConfigMap"] == ""  # off by default: the images' trust store
    job = (CHART / "templates" / "pipeline-job.yaml").read_text()
    assert "- name: CAL_POSE_CA_CONFIG_MAP\n              value: {{ .Values.pipelineEnv.caConfigMap | quote }}" in job
    mlflow = (CHART / "templates" / "mlflow.yaml").read_text()
    assert f"mountPath: {cal_pipeline.CA_MOUNT}\n" in mlflow
    assert f"- name: AWS_CA_BUNDLE\n              value: {cal_pipeline.CA_MOUNT}/ca.crt" in mlflow  # boto3
    assert mlflow.count("with .Values.pipelineEnv.caConfigMap") == 3  # env, mount, volume


@pytest.mark.skipif(shutil.which("helm") is None, reason="helm is not installed")
def test_helm_lint_and_template():
    flags = ["--set", "s3.accessKeyId=test-id", "--set", "s3.secretAccessKey=test-key"]
    subprocess.run(["helm", "lint", str(CHART), *flags], check=True, capture_output=True)
    rendered = subprocess.run(["helm", "template", "demo", str(CHART), *flags], check=True,
                              capture_output=True, text=True).stdout
    kinds = [doc["kind"] for doc in yaml.safe_load_all(rendered) if doc]
    assert {"ConfigMap", "Secret", "Deployment", "Service", "StatefulSet", "Job"} <= set(kinds)


def test_setup_job_completes_in_an_istio_injected_profile_namespace():
    """A sidecar proxy never exits: without this annotation the hook Job hangs in a Kubeflow profile namespace."""
    job = (CHART / "templates" / "pipeline-job.yaml").read_text()
    template = job[job.index("  template:"):job.index("    spec:")]
    assert 'sidecar.istio.io/inject: "false"' in template


def test_network_policies_admit_only_the_pipeline_namespaces_to_mlflow_and_only_mlflow_to_the_database(values):
    """MLflow has no login and moves the registry's aliases: the chart fences it in (enforcing plugins only)."""
    assert values["networkPolicy"] == {"enabled": True, "allowedNamespaces": []}
    policy = (CHART / "templates" / "networkpolicy.yaml").read_text()
    pods = {c: (CHART / "templates" / f"{c}.yaml").read_text() for c in ("mlflow", "postgresql")}
    for component, text in pods.items():
        selector = f"app.kubernetes.io/instance: {{{{ .Release.Name }}}}\n      app.kubernetes.io/component: {component}"
        assert selector in policy, component  # the policy's podSelector ...
        assert f"app.kubernetes.io/component: {component}" in text.split("template:")[1]  # ... is the pods' label
    assert "port: {{ .Values.mlflow.port }}" in policy and "containerPort: {{ .Values.mlflow.port }}" in pods["mlflow"]
    assert "port: 5432" in policy and "containerPort: 5432" in pods["postgresql"]
    assert "(list .Release.Namespace (.Values.pipeline.namespace | default .Release.Namespace))" in policy
    assert 'kubernetes.io/metadata.name: {{ . | quote }}' in policy
    assert policy.count("policyTypes") == 2 and 'include "cal-pose.usePostgres"' in policy
