"""Submit the compiled pipeline to a Kubeflow Pipelines server and schedule recurring runs (``kfp.Client``).

Credentials come only from the environment: ``KFP_EXISTING_TOKEN`` (a bearer
token, e.g. from ``kubectl create token``) when the endpoint needs one, else
the projected service-account token file at ``$KF_PIPELINES_SA_TOKEN_PATH``
(default ``/var/run/secrets/kubeflow/pipelines/token``, what the chart's setup
Job mounts), re-read on every request as the kubelet refreshes it.
``kfp.Client`` does not look for that file itself once a host is given.

Cron: KFP's scheduler uses robfig/cron with a leading *seconds* field (six
fields, ``"0 30 2 * * *"`` = 02:30:00 daily). :func:`kfp_cron` accepts the
common five-field crontab form too and prepends ``0`` seconds, validates
every field, and passes ``@daily``-style descriptors through.
"""

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml

from pipelines.compile import DEFAULT_OUTPUT

#: Where the CA bundle for an HTTPS KFP host comes from, in order: our own variable, then the ones
#: requests and OpenSSL honour.
KFP_CA_SOURCES = ("KFP_SSL_CA_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")
TOKEN_ENV = "KFP_EXISTING_TOKEN"
#: kfp's own variable for the projected service-account token file, and kfp's default path.
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
DEFAULT_SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
#: (name, low, high) of the six robfig/cron fields.
CRON_FIELDS = (("second", 0, 59), ("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31),
               ("month", 1, 12), ("day of week", 0, 6))
CRON_NAMES = {
    4: {m: i + 1 for i, m in enumerate(["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"])},
    5: {d: i for i, d in enumerate(["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"])},
}
CRON_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
_RANGE = re.compile(r"^(\*|[0-9A-Za-z]+(?:-[0-9A-Za-z]+)?)(?:/(\d+))?$")


def _cron_value(text: str, index: int) -> int:
    """A number or month/weekday name of field ``index``, range-checked."""
    name, low, high = CRON_FIELDS[index]
    value = CRON_NAMES.get(index, {}).get(text.upper()) if not text.isdigit() else int(text)
    if value is None or not low <= value <= high:
        raise ValueError(f"cron {name} field: {text!r} is not in {low}-{high}")
    return value


def _check_cron_field(field: str, index: int) -> None:
    """Raise ValueError unless ``field`` is valid for robfig/cron field ``index``."""
    if field == "?" and index in (3, 5):
        return
    for part in field.split(","):
        match = _RANGE.match(part)
        if not match:
            raise ValueError(f"cron {CRON_FIELDS[index][0]} field: cannot parse {part!r}")
        span, step = match.groups()
        if step is not None and int(step) == 0:
            raise ValueError(f"cron {CRON_FIELDS[index][0]} field: step 0 in {part!r}")
        if span != "*":
            bounds = [_cron_value(v, index) for v in span.split("-")]
            if len(bounds) == 2 and bounds[0] > bounds[1]:
                raise ValueError(f"cron {CRON_FIELDS[index][0]} field: empty range {part!r}")


def kfp_cron(expression: str) -> str:
    """The six-field (seconds first) cron expression KFP expects, from a five- or six-field one."""
    text = " ".join(expression.split())
    if text.lower() in CRON_DESCRIPTORS:
        return text.lower()
    if text.lower().startswith("@every "):
        return text
    fields = text.split(" ")
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise ValueError(f"cron expression {expression!r}: expected 5 fields (minute hour day month weekday) "
                         f"or 6 (second first, KFP's form), got {len(fields)}")
    for index, field in enumerate(fields):
        _check_cron_field(field, index)
    return " ".join(fields)


def parameter_types(package: str | Path = DEFAULT_OUTPUT) -> dict[str, str]:
    """Pipeline parameter name -> KFP type (``STRING``, ``NUMBER_INTEGER``, ...) from the compiled YAML."""
    spec = next(yaml.safe_load_all(Path(package).read_text()))
    params = spec["root"]["inputDefinitions"]["parameters"]
    return {name: definition["parameterType"] for name, definition in params.items()}


def parse_arguments(pairs: list[str], package: str | Path = DEFAULT_OUTPUT) -> dict[str, Any]:
    """``["epochs_stage1=5", ...]`` -> typed pipeline arguments, checked against the pipeline's parameters."""
    types = parameter_types(package)
    casts = {"STRING": str, "NUMBER_INTEGER": _integer, "NUMBER_DOUBLE": float,
             "BOOLEAN": lambda v: {"true": True, "1": True, "false": False, "0": False}[v.lower()]}
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"pipeline argument {pair!r}: expected NAME=VALUE")
        if name not in types:
            raise ValueError(f"unknown pipeline parameter {name!r}; known: {', '.join(sorted(types))}")
        try:
            out[name] = casts[types[name]](value)
        except (KeyError, ValueError) as exc:
            raise ValueError(f"pipeline argument {name}={value!r} is not a valid {types[name]}") from exc
    return out


def _integer(value: str) -> int:
    """An integer argument; integral floats too, as Helm renders large integers (``2.0261124e+07``)."""
    try:
        return int(value)
    except ValueError:
        number = float(value)
        if not number.is_integer():
            raise
        return int(number)


def connect(host: str, namespace: str = "kubeflow") -> Any:
    """A ``kfp.Client`` for ``host``, authenticated as :func:`credentials` says, trusting :func:`ca_bundle`."""
    import kfp

    return kfp.Client(host=host, namespace=namespace, ssl_ca_cert=ca_bundle(), **credentials())


def ca_bundle() -> str | None:
    """The PEM CA bundle an ``https://`` KFP host is verified with: the first of :data:`KFP_CA_SOURCES` that is set.

    kfp's client reads none of the usual variables (it verifies with certifi's bundle), so a
    Kubeflow behind a private CA would fail verification where MLflow and S3 clients pass.
    """
    return next((os.environ[name] for name in KFP_CA_SOURCES if os.environ.get(name)), None)


def credentials() -> dict[str, Any]:
    """``kfp.Client`` auth arguments: ``$KFP_EXISTING_TOKEN``, else the service-account token file if present."""
    token = os.environ.get(TOKEN_ENV)
    if token:
        return {"existing_token": token}
    path = os.environ.get(SA_TOKEN_PATH_ENV) or DEFAULT_SA_TOKEN_PATH
    if os.path.isfile(path):
        from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

        return {"credentials": ServiceAccountTokenVolumeCredentials(path)}
    return {}


def submit(client: Any, arguments: dict[str, Any], run_name: str, experiment: str,
           package: str | Path = DEFAULT_OUTPUT, enable_caching: bool | None = None) -> str:
    """Start one run of the compiled pipeline; returns the KFP run id."""
    result = client.create_run_from_pipeline_package(str(package), arguments=arguments, run_name=run_name,
                                                     experiment_name=experiment, enable_caching=enable_caching)
    return result.run_id


def pipeline_id(client: Any, name: str, namespace: str | None) -> str | None:
    """Id of the pipeline called ``name`` in ``namespace`` (None: the shared pipelines), or None."""
    predicate = {"operation": "EQUALS", "key": "display_name", "stringValue": name}
    found = client.list_pipelines(filter=json.dumps({"predicates": [predicate]}), namespace=namespace,
                                  page_size=2).pipelines or []
    if len(found) > 1:
        raise ValueError(f"{len(found)} pipelines are called {name!r} in {namespace or 'the shared namespace'}")
    return found[0].pipeline_id if found else None


def upload(client: Any, name: str, version: str, package: str | Path = DEFAULT_OUTPUT,
           namespace: str | None = None) -> str:
    """Upload the pipeline as ``name`` (first time) or as a new version ``version`` of it; returns the pipeline id.

    ``namespace``: the profile namespace that owns the pipeline in multi-user
    Kubeflow (single-user servers ignore it); None uploads a shared pipeline,
    which every profile sees and multi-user servers may allow only admins to
    create. KFP's upload call names a new pipeline's first version after the
    pipeline itself, so ``version`` names the second and later uploads.
    """
    existing = pipeline_id(client, name, namespace)
    if existing is None:
        return client.upload_pipeline(str(package), pipeline_name=name, namespace=namespace).pipeline_id
    client.upload_pipeline_version(str(package), pipeline_version_name=version, pipeline_id=existing)
    return existing


def recurring_runs_named(client: Any, experiment_id: str, job_name: str) -> list[str]:
    """Ids of the recurring runs called ``job_name`` in the experiment (all pages)."""
    found, token = [], ""
    while True:
        page = client.list_recurring_runs(page_token=token, page_size=100, experiment_id=experiment_id)
        found += [r.recurring_run_id for r in page.recurring_runs or [] if r.display_name == job_name]
        token = page.next_page_token
        if not token:
            return found


def schedule(client: Any, cron: str, arguments: dict[str, Any], job_name: str, experiment: str,
             package: str | Path = DEFAULT_OUTPUT, enable_caching: bool = False, max_concurrency: int = 1,
             catchup: bool = False, replace: bool = False) -> str:
    """Create a recurring run on ``cron`` (5 or 6 fields); returns its id.

    Caching is off by default: a scheduled run exists to pick up new data at
    the same ``coco_uri``, which cached downsampling would not see. With
    ``replace``, recurring runs of the same name in the experiment are deleted
    first (so re-applying the Helm chart does not pile up schedules).
    """
    cron = kfp_cron(cron)
    experiment_id = client.create_experiment(experiment).experiment_id
    if replace:
        for old in recurring_runs_named(client, experiment_id, job_name):
            client.delete_recurring_run(old)
    recurring = client.create_recurring_run(experiment_id, job_name, cron_expression=cron,
                                            params=arguments, pipeline_package_path=str(package),
                                            enable_caching=enable_caching, max_concurrency=max_concurrency,
                                            no_catchup=not catchup)
    return recurring.recurring_run_id
