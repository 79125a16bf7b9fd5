"""MLflow tracking for every stage: one run per stage, child of one pipeline run.

This is the only module that imports mlflow (docs/architecture.md). Stages use
:func:`stage_run`; the pipeline's local runner wraps the whole DAG in
:func:`pipeline_run`, which exports ``CAL_POSE_PARENT_RUN_ID`` so each stage's
run becomes its child (tag ``mlflow.parentRunId``).

Where runs go:
- ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<abs>/runs/mlflow.db``
  (created on demand; never mlflow's own cwd default).
- Experiment: argument, else ``MLFLOW_EXPERIMENT_NAME``, else ``"cal-pose"``.
- ``CAL_POSE_TRACKING=off`` skips MLflow altogether (tests, air-gapped runs).

Resilience: tracking must never kill a stage. HTTP servers are probed with a
short connect timeout and mlflow's own retries are bounded. When a server
that took the run stops answering (a restart, an upgrade), the tracker warns
once, records every event in a JSONL file (``mlflow-offline.jsonl`` in
``local_dir``) and queues it; it tries the server again after
:data:`RETRY_FIRST_S`, doubling up to :data:`RETRY_MAX_S`, and replays the
queue in order once it answers, so a long training survives an MLflow outage
with its whole curve. ``end()`` waits up to :data:`FINAL_WAIT_S` for the
server so the run's status lands too. A server that was never reached
(wrong URI, tracking off) is not retried: the JSONL file is the record. When
``local_dir`` is a remote URI (a stage writing to S3), the file is kept
locally and copied there at ``end()``, so it outlives the pod.

Secrets: parameters or tags whose names look like keys, tokens or passwords,
and any value equal to a secret-looking environment variable, are dropped
before logging.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cal_core.uris import is_remote, local_path

log = logging.getLogger(__name__)

PARENT_ENV = "CAL_POSE_PARENT_RUN_ID"
TRACKING_SWITCH_ENV = "CAL_POSE_TRACKING"
DEFAULT_EXPERIMENT = "cal-pose"
OFFLINE_FILE = "mlflow-offline.jsonl"
#: Client-side limits applied unless the environment already sets them.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
PROBE_TIMEOUT_S = 3.0
#: Wait before the first retry of a lost server; it doubles per failed retry up to RETRY_MAX_S.
RETRY_FIRST_S = 5.0
RETRY_MAX_S = 300.0
#: How long ``Tracker.end`` keeps retrying a lost server to deliver the queue and the run's status.
FINAL_WAIT_S = 60.0
_SECRET_NAME = re.compile(r"(secret|passw|passwd|token|api[_-]?key|access[_-]?key|credential|auth)", re.I)
_KEY_ID = re.compile(r"key[_-]?id$", re.I)
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")
_MAX_PARAM_CHARS = 6000
#: MLflow error codes that mean "this call was wrong", not "the server is gone".
_CLIENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST"}


def tracking_uri() -> str:
    """The tracking URI: ``MLFLOW_TRACKING_URI`` or an absolute sqlite file under ./runs/."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    runs = Path("runs").resolve()
    return f"sqlite:///{runs / 'mlflow.db'}"


def experiment_name(experiment: str | None = None) -> str:
    """The experiment: the argument, else ``MLFLOW_EXPERIMENT_NAME``, else ``cal-pose``."""
    return experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def is_secret_name(name: str) -> bool:
    """True for names that look like credentials (``aws_secret_access_key``, ``token``, ...)."""
    return bool(_SECRET_NAME.search(name))


def _secret_values() -> list[str]:
    """Values of secret-looking environment variables (never to be logged, whatever the key), longest first.

    Key *ids* (``AWS_ACCESS_KEY_ID``) are identifiers, not secrets: often short
    words such as Kubeflow MinIO's ``minio`` that also occur in bucket names.
    """
    values = {v for k, v in os.environ.items() if is_secret_name(k) and not _KEY_ID.search(k) and len(v) >= 4}
    return sorted(values, key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    """``text`` with any URI ``user:password@`` part and every secret value replaced by ``***``."""
    if "://" in text:
        text = " ".join(redact_uri(word) if "://" in word else word for word in text.split(" "))
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def clean_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Stringify params for MLflow: secret-named keys dropped, secrets in values masked, keys fixed, length cut."""
    secrets = _secret_values()
    out: dict[str, str] = {}
    for key, value in params.items():
        if is_secret_name(str(key)):
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        out[_BAD_KEY_CHARS.sub("_", str(key))] = scrub(text, secrets)[:_MAX_PARAM_CHARS]
    return out


def tracking_off() -> bool:
    """True when ``CAL_POSE_TRACKING`` switches MLflow off (tests, air-gapped runs)."""
    return os.environ.get(TRACKING_SWITCH_ENV, "").lower() in {"off", "0", "false"}


class TrackingUnavailableError(RuntimeError):
    """MLflow is configured but cannot be reached (after bounded retries) where a run must be recorded."""


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def _probe(uri: str) -> None:
    """Fail fast (OSError) if an HTTP tracking server does not accept connections."""
    parsed = urlparse(uri)
    if parsed.scheme not in {"http", "https"}:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    with socket.create_connection((parsed.hostname or "localhost", port), timeout=PROBE_TIMEOUT_S):
        pass


class Tracker:
    """One MLflow run (or its offline JSONL stand-in). Every method swallows tracking failures."""

    def __init__(self, name: str, local_dir: str | Path | None = None) -> None:
        self.name = name
        self.run_id: str | None = None
        self._client: Any = None
        remote = bool(local_dir) and is_remote(local_dir)
        self._copy_to = str(local_dir) if remote else None  # the offline file is copied there at end()
        self._local_dir = local_path(local_dir) if local_dir and not remote else Path("runs") / "offline"
        self._warned = False
        self._wrote_offline = False
        self._queue: list[tuple[str, Any]] = []  # (kind, action) waiting for a lost server
        self._retry_at = 0.0
        self._wait = RETRY_FIRST_S

    @property
    def online(self) -> bool:
        """True while events reach MLflow (a run on a server that answers, nothing queued)."""
        return self._connected and not self._queue

    @property
    def _connected(self) -> bool:
        """True once a run was created or attached: a lost server is retried, not given up."""
        return self._client is not None and self.run_id is not None

    @property
    def offline_path(self) -> Path:
        """The JSONL file that receives everything while MLflow is unreachable."""
        return self._local_dir / OFFLINE_FILE

    def _start(self, experiment: str, tags: dict[str, str]) -> None:
        """Create the MLflow run; on any failure fall back to the offline file."""
        if tracking_off():
            self._offline("start", {"experiment": experiment, "tags": tags}, reason="tracking is off")
            return
        try:
            uri = tracking_uri()
            for key, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)
            _probe(uri)
            self._client = _make_client(uri)
            exp_id = _experiment_id(self._client, uri, experiment)
            run = self._client.create_run(exp_id, run_name=self.name, tags=tags)
            self.run_id = run.info.run_id
            log.info("MLflow run %s (%s) in experiment %r at %s", self.run_id, self.name, experiment,
                     redact_uri(uri))
        except Exception as exc:  # noqa: BLE001 - tracking must never kill the stage
            self._client = None
            self._offline("start", {"experiment": experiment, "tags": tags}, reason=exc)

    def _call(self, kind: str, payload: dict[str, Any], action: Any) -> None:
        """Run ``action()`` against MLflow; while the server is lost, record ``payload`` offline and queue it."""
        if not self._connected:
            self._offline(kind, payload)
            return
        if self._queue and not self._replay():
            self._queue.append((kind, action))
            self._offline(kind, payload)
            return
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - tracking must never kill the stage
            if not self._outage(exc):
                log.warning("MLflow rejected %s for run %s: %s", kind, self.run_id, exc)
                self._offline(kind, payload, reason=exc, switch=False)
                return
            self._queue.append((kind, action))
            self._lost()
            self._offline(kind, payload, reason=exc)

    def _outage(self, exc: Exception) -> bool:
        """True if ``exc`` means the server is gone, not that it refused this one call."""
        if getattr(exc, "error_code", None) in _CLIENT_ERRORS:
            return False
        try:
            self._client.get_run(self.run_id)
        except Exception:  # noqa: BLE001
            return True
        return False

    def _lost(self) -> None:
        """Schedule the next retry of the server (the wait doubles up to :data:`RETRY_MAX_S`)."""
        self._retry_at = time.monotonic() + self._wait
        self._wait = min(2 * self._wait, RETRY_MAX_S)

    def _replay(self, force: bool = False) -> bool:
        """Send the queued events in order once the retry is due (``force``: now); True when none is left."""
        if not force and time.monotonic() < self._retry_at:
            return False
        sent = 0
        while self._queue:
            kind, action = self._queue[0]
            try:
                action()
                sent += 1
            except Exception as exc:  # noqa: BLE001
                if self._outage(exc):
                    self._lost()
                    return False
                log.warning("MLflow rejected the queued %s for run %s: %s (it stays in %s)", kind, self.run_id,
                            exc, self.offline_path)
            self._queue.pop(0)
        self._wait = RETRY_FIRST_S
        self._warned = False
        log.warning("MLflow is back: %d queued event(s) of run %r delivered", sent, self.name)
        self._offline("delivered", {"events": sent})
        return True

    def _drain(self, seconds: float) -> None:
        """Retry the lost server for up to ``seconds`` until the queue is delivered."""
        deadline = time.monotonic() + seconds
        while self._queue and not self._replay(force=True):
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("MLflow still unreachable: %d event(s) of run %r are only in %s", len(self._queue),
                            self.name, self.offline_path)
                return
            time.sleep(min(max(self._retry_at - time.monotonic(), 0.0), left))

    def _offline(self, kind: str, payload: dict[str, Any], reason: object = None, switch: bool = True) -> None:
        """Append one event to the offline JSONL file; warn once when switching to it."""
        if reason is not None and switch and not self._warned:
            self._warned = True
            log.warning("MLflow unavailable (%s); logging run %r to %s instead", reason, self.name,
                        self.offline_path)
        record = {"time": time.time(), "run": self.name, "run_id": self.run_id, "kind": kind, "data": payload}
        try:
            self.offline_path.parent.mkdir(parents=True, exist_ok=True)
            with self.offline_path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, default=str) + "\n")
            self._wrote_offline = True
        except OSError as exc:
            log.warning("could not write offline tracking file %s: %s", self.offline_path, exc)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters (secrets dropped, values stringified)."""
        clean = clean_params(params)
        if not clean:
            return
        from mlflow.entities import Param

        self._call("params", clean, lambda: self._client.log_batch(
            self.run_id, params=[Param(k, v) for k, v in clean.items()]))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log numeric metrics at ``step`` (non-numeric values are an error of the caller)."""
        clean = {_BAD_KEY_CHARS.sub("_", k): float(v) for k, v in metrics.items()}
        if not clean:
            return
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self._call("metrics", {"step": step, "values": clean}, lambda: self._client.log_batch(
            self.run_id, metrics=[Metric(k, v, stamp, step or 0) for k, v in clean.items()]))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (secret-looking names dropped)."""
        clean = clean_params(tags)
        if not clean:
            return
        from mlflow.entities import RunTag

        self._call("tags", clean, lambda: self._client.log_batch(
            self.run_id, tags=[RunTag(k, v) for k, v in clean.items()]))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a local file or folder as a run artifact."""
        path = Path(path)
        method = "log_artifacts" if path.is_dir() else "log_artifact"
        self._call("artifact", {"path": str(path.resolve()), "artifact_path": artifact_path},
                   lambda: getattr(self._client, method)(self.run_id, str(path), artifact_path))

    def log_figure(self, fig: Any, name: str) -> None:
        """Log a matplotlib figure as ``name`` (e.g. ``"plots/oks.png"``); offline: save it locally too."""
        if self._connected:
            self._call("figure", {"name": name}, lambda: self._client.log_figure(self.run_id, fig, name))
            if self.online:
                return
        target = self._local_dir / "figures" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(target)
        self._offline("figure", {"name": name, "path": str(target.resolve())})

    def log_text(self, text: str, name: str) -> None:
        """Log a text artifact (markdown report, JSON) under ``name``."""
        self._call("text", {"name": name, "text": text},
                   lambda: self._client.log_text(self.run_id, text, name))

    def end(self, status: str = "FINISHED") -> None:
        """Close the run with ``status`` (FINISHED, FAILED or KILLED), delivering what a lost server missed."""
        if self._queue:
            self._drain(FINAL_WAIT_S)
        self._call("end", {"status": status}, lambda: self._client.set_terminated(self.run_id, status))
        if self._copy_to and self._wrote_offline:
            self._publish_offline()

    def _publish_offline(self) -> None:
        """Copy the offline file to ``<local_dir URI>/mlflow-offline.jsonl`` (best effort)."""
        from cal_core import storage

        target = storage.join(self._copy_to, OFFLINE_FILE)
        try:
            storage.write_bytes(target, self.offline_path.read_bytes())
        except Exception as exc:  # noqa: BLE001 - tracking must never kill the stage
            log.warning("could not copy the offline tracking file %s to %s: %s", self.offline_path,
                        redact_uri(target), exc)


def redact_uri(uri: str) -> str:
    """The URI without any ``user:password@`` part, for log lines, summaries and params."""
    parsed = urlparse(uri)
    if parsed.password or parsed.username:
        return parsed._replace(netloc=parsed.hostname + (f":{parsed.port}" if parsed.port else "")).geturl()
    return uri


def _make_client(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri``; creates the folder of a sqlite database."""
    from mlflow import MlflowClient

    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiment_id(client: Any, uri: str, name: str) -> str:
    """Id of experiment ``name``, created if missing (sqlite: artifacts beside the database)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    db = _sqlite_path(uri)
    location = (db.parent / "artifacts").resolve().as_uri() if db is not None else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # noqa: BLE001 - another stage created it concurrently
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def start_run(name: str, experiment: str | None = None, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, Any] | None = None, local_dir: str | Path | None = None,
              parent_run_id: str | None = None) -> Tracker:
    """Start a run (child of ``parent_run_id`` or ``$CAL_POSE_PARENT_RUN_ID``); call ``end()``."""
    tracker = Tracker(name, local_dir)
    all_tags = clean_params(dict(tags or {}))
    parent = parent_run_id or os.environ.get(PARENT_ENV)
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    tracker._start(experiment_name(experiment), all_tags)
    if params:
        tracker.log_params(params)
    return tracker


def start_required_run(name: str, experiment: str | None = None, params: Mapping[str, Any] | None = None,
                       tags: Mapping[str, Any] | None = None, attempts: int = 3, wait_s: float = 5.0) -> str:
    """Start a run that must be recorded; its id ("" when tracking is off), else :class:`TrackingUnavailableError`.

    For the pipeline's parent run in a cluster: there the offline file would
    land in a pod that is thrown away, so a wrong tracking URI or an MLflow
    outage would let hours of training run unrecorded and fail only at the
    registry. Retries ``attempts`` times, ``wait_s`` doubling in between.
    """
    for attempt in range(attempts):
        tracker = start_run(name, experiment, params, tags)
        if tracker.run_id or tracking_off():
            return tracker.run_id or ""
        if attempt + 1 < attempts:
            time.sleep(wait_s * 2**attempt)
    raise TrackingUnavailableError(
        f"MLflow at {redact_uri(tracking_uri())} is unreachable after {attempts} attempts (see the warning above); "
        f"fix MLFLOW_TRACKING_URI (the chart's ConfigMap) or set {TRACKING_SWITCH_ENV}=off to run untracked")


def attach_run(run_id: str, name: str = "pipeline", local_dir: str | Path | None = None) -> Tracker:
    """A :class:`Tracker` on an existing run, e.g. the pipeline's parent run opened by another task.

    In a cluster the parent run is created by the pipeline's first task and every
    stage runs in its own pod, so the last task needs this to log the pipeline's
    headline metrics and close the run. Unreachable MLflow -> offline file, as always.
    """
    tracker = Tracker(name, local_dir)
    try:
        tracker._client = _make_client(tracking_uri())
        tracker.run_id = tracker._client.get_run(run_id).info.run_id
    except Exception as exc:  # noqa: BLE001 - tracking must never kill the stage
        tracker._client = None
        tracker._offline("attach", {"run_id": run_id}, reason=exc)
    return tracker


@contextlib.contextmanager
def stage_run(stage: str, experiment: str | None = None, run_name: str | None = None,
              params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None,
              local_dir: str | Path | None = None, resume_run_id: str = "") -> Iterator[Tracker]:
    """Context manager: one run for pipeline stage ``stage``; FAILED/KILLED if the body raises.

    ``resume_run_id`` continues that run (set back to RUNNING) instead of
    opening another: a training pod killed mid-run (preempted, out of
    memory) never ends its run, and its retry would otherwise leave it
    RUNNING beside a second run holding the rest of the curves.
    """
    tracker = attach_run(resume_run_id, run_name or stage, local_dir) if resume_run_id else None
    if tracker is not None and tracker.online:
        tracker._call("resume", {"run_id": resume_run_id},
                      lambda: tracker._client.update_run(resume_run_id, status="RUNNING"))
    else:  # a new run (also when the old one is gone, e.g. another tracking server)
        tracker = start_run(run_name or stage, experiment, params, {"cal_pose.stage": stage, **(tags or {})},
                            local_dir)
    try:
        yield tracker
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")


@contextlib.contextmanager
def pipeline_run(run_name: str, experiment: str | None = None, tags: Mapping[str, Any] | None = None,
                 local_dir: str | Path | None = None) -> Iterator[Tracker]:
    """The parent run of one pipeline run; exports ``CAL_POSE_PARENT_RUN_ID`` while it is open.

    Stage runs started inside (same process or subprocesses that inherit the
    environment) become its children. Its params are the pipeline's, logged
    by the DAG's first task (``components.mlflow_run``), as in a cluster.
    """
    previous = os.environ.get(PARENT_ENV)
    with stage_run("pipeline", experiment, run_name, None, tags, local_dir) as tracker:
        if tracker.run_id:
            os.environ[PARENT_ENV] = tracker.run_id
        try:
            yield tracker
        finally:
            if previous is None:
                os.environ.pop(PARENT_ENV, None)
            else:
                os.environ[PARENT_ENV] = previous


def defined_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The COCO metrics worth logging: numeric, finite, and not COCOeval's ``-1``.

    COCOeval writes -1 where a metric is undefined (no ground truth in that
    area range: APL on a set of small people); logged, it would plot as a
    real score below zero and pull down run comparisons and averages.
    ``metrics.json`` keeps the -1, as pycocotools prints it.
    """
    out = {}
    for key, value in metrics.items():
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
            out[key] = float(value)
    return out


class RegistryError(RuntimeError):
    """The model registry could not be used (MLflow offline or the call failed)."""


def _registry_client() -> Any:
    """A client for the registry at the tracking URI (raises RegistryError when unreachable)."""
    uri = tracking_uri()
    try:
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        _probe(uri)
        return _make_client(uri)
    except Exception as exc:  # noqa: BLE001
        raise RegistryError(f"MLflow registry at {redact_uri(uri)} is unreachable: {exc}") from exc


def register_onnx(tracker: Tracker, onnx_path: str | Path, name: str, tags: Mapping[str, Any]) -> str:
    """Log ``onnx_path`` as an MLflow ONNX model under ``tracker``'s run and register it.

    Returns the new version number (as a string). The model is stored in the
    MLflow ``onnx`` flavour, so ``mlflow.onnx.load_model("models:/NAME@ALIAS")``
    and :func:`load_registered_onnx` load it.
    """
    import tempfile

    import mlflow.onnx
    import onnx

    if not tracker.online:
        raise RegistryError(f"cannot register {onnx_path}: MLflow is offline (see {tracker.offline_path})")
    client = tracker._client
    model = onnx.load(str(onnx_path))
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.onnx.save_model(model, str(Path(tmp) / "model"), save_as_external_data=False)
        client.log_artifacts(tracker.run_id, str(Path(tmp) / "model"), "model")
    try:
        client.create_registered_model(name)
    except Exception as exc:  # noqa: BLE001
        if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
            raise RegistryError(f"could not create registered model {name!r}: {exc}") from exc
    version = client.create_model_version(name, source=f"runs:/{tracker.run_id}/model",
                                          run_id=tracker.run_id, tags=clean_params(tags))
    return str(version.version)


def find_version(name: str, tags: Mapping[str, str]) -> str | None:
    """The newest version of registered model ``name`` carrying all of ``tags``, or None (none, or no such model)."""
    client = _registry_client()
    terms = [f"name='{name}'"] + [f"tags.{key}='{value}'" for key, value in tags.items()]
    try:
        found = client.search_model_versions(" and ".join(terms))
    except Exception as exc:  # noqa: BLE001
        raise RegistryError(f"could not search the versions of {name!r}: {exc}") from exc
    return str(max(int(v.version) for v in found)) if found else None


def alias_version(name: str, alias: str) -> tuple[str, dict[str, str]] | None:
    """``(version, tags)`` of registered model ``name`` at ``alias``, or None when unset."""
    client = _registry_client()
    try:
        version = client.get_model_version_by_alias(name, alias)
    except Exception as exc:  # noqa: BLE001
        if getattr(exc, "error_code", None) in {"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"}:
            return None
        raise RegistryError(f"could not read alias {alias!r} of {name!r}: {exc}") from exc
    return str(version.version), dict(version.tags)


def set_alias(name: str, alias: str, version: str) -> None:
    """Point ``alias`` of registered model ``name`` at ``version``."""
    _registry_client().set_registered_model_alias(name, alias, version)


def load_registered_onnx(model_uri: str) -> Any:
    """The ``onnx.ModelProto`` behind ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``.

    Resolved with a client of its own (:func:`_registry_client`), so mlflow's
    process-wide tracking and registry URIs stay what the caller set:
    ``mlflow.onnx.load_model`` on a ``models:/`` URI reads them, and setting
    them here would redirect the caller's own runs.
    """
    import tempfile

    import mlflow.onnx

    name, alias, number = _parse_models_uri(model_uri)
    client = _registry_client()
    try:
        version = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
        with tempfile.TemporaryDirectory(prefix="cal-pose-model-") as tmp:
            local = client.download_artifacts(version.run_id, _run_path(version.source, version.run_id), tmp)
            return mlflow.onnx.load_model(local)
    except Exception as exc:  # noqa: BLE001
        raise RegistryError(f"could not load {model_uri}: {exc}") from exc


def _parse_models_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """``(name, alias, version)`` of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (one of the two is None)."""
    path = model_uri[len("models:/"):] if model_uri.startswith("models:/") else ""
    if "@" in path and "/" not in path:
        name, alias = path.split("@", 1)
        if name and alias:
            return name, alias, None
    parts = path.split("/")
    if len(parts) == 2 and parts[0] and parts[1].isdigit():
        return parts[0], None, parts[1]
    raise RegistryError(f"{model_uri!r} is not models:/NAME@ALIAS or models:/NAME/VERSION")


def _run_path(source: str, run_id: str) -> str:
    """The artifact path inside run ``run_id`` of a version's ``runs:/RUN_ID/PATH`` source (register_onnx's)."""
    prefix = f"runs:/{run_id}/"
    if not source.startswith(prefix):
        raise RegistryError(f"model source {source!r} is not an artifact of run {run_id} (not made by register)")
    return source[len(prefix):]
