"""`cal-pose register`: put an ONNX model in the MLflow registry; promote it only if it is better.

The new version always gets registered with its metrics, input size and
method as tags. Alias ``champion`` moves to it only when its AP beats the
current champion's AP *on the same validation set* (tag ``val_digest``) *at
the same input size* (tag ``input_size``: a deployment loading
``@champion`` must not get another input shape), or when there is no
champion yet; otherwise it gets alias ``challenger``. Read-then-write:
MLflow has no compare-and-set, so of two registrations at the same moment
the later write wins (docs/cluster.md).

Rerunning is safe: a version is tagged with the ONNX file's sha256 and the
val digest, and a registration that finds such a version (an earlier
attempt that failed after creating it, a retried task) reuses it instead of
adding a twin, which, scoring the champion's own AP, would only become its
challenger.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cal_core import tracking
from cal_core.uris import fetch_local, sha256_of

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"


@dataclass
class Decision:
    """Which alias a new model version got, and why."""

    name: str
    version: str
    alias: str
    reason: str
    ap: float
    previous_champion: str | None


def metric_tag(value: float) -> str:
    """A metric as a registry tag: 6 decimals (what :func:`decide` compares, both sides alike)."""
    return f"{float(value):.6f}"


def decide(ap: float, val_digest: str, champion: tuple[str, dict[str, str]] | None,
           input_size: str | None = None) -> tuple[str, str]:
    """``(alias, reason)`` for a model with ``ap`` on val set ``val_digest`` given the current champion."""
    if champion is None:
        return CHAMPION, "there is no champion yet"
    version, tags = champion
    if input_size and tags.get("input_size") and tags["input_size"] != input_size:
        return CHALLENGER, (f"champion v{version} takes {tags['input_size']} inputs, this model {input_size}: "
                            "promoting it would change the deployed input shape (register each input size "
                            "under its own model name)")
    if tags.get("val_digest") != val_digest:
        return CHALLENGER, (f"champion v{version} was scored on another validation set "
                            f"({tags.get('val_digest', 'unknown')} vs {val_digest}): APs are not comparable")
    if "AP" not in tags:
        return CHALLENGER, f"champion v{version} has no AP tag to compare with (registered by hand?)"
    best = float(tags["AP"])
    if float(metric_tag(ap)) > best:  # at the tag's precision: the same AP again is no improvement
        return CHAMPION, f"AP {metric_tag(ap)} beats champion v{version} AP {metric_tag(best)} on the same val set"
    return CHALLENGER, f"AP {metric_tag(ap)} does not beat champion v{version} AP {metric_tag(best)}"


def _model_tags(metrics_doc: dict[str, Any], metadata: dict[str, str]) -> dict[str, str]:
    """Registry tags: every COCO metric, the val digest, method, input size and provenance."""
    tags = {name: metric_tag(value) for name, value in metrics_doc["metrics"].items()}
    tags["val_digest"] = metrics_doc["val_digest"]
    for key in ("method", "backbone", "input_size", "training_run_id", "code_version"):
        if metadata.get(key):
            tags[key] = metadata[key]
    return tags


def _check_same_model(metadata: dict[str, str], metrics_doc: dict[str, Any], onnx_sha256: str) -> None:
    """Refuse metrics of another model or set, and a raw graph.

    Metrics of another file (``model_sha256``, which `cal-pose evaluate`
    records), of a train split, or whose input size, method or (keypoints
    graphs) flip test differ would put a wrong AP on the version and could
    make it champion; so would a raw graph, which is not what deployments
    loading ``@champion`` expect (the keypoints graph decodes inside).
    """
    if metadata.get("graph") == "raw":
        raise ValueError("this is the raw graph (heatmaps and offsets out): register the keypoints graph, "
                         "keypoints.onnx, which deployments loading the registry expect")
    if metrics_doc.get("model_sha256") and metrics_doc["model_sha256"] != onnx_sha256:
        raise ValueError(f"the metrics were computed on another model file (sha256 "
                         f"{metrics_doc['model_sha256'][:12]}..., this ONNX {onnx_sha256[:12]}...): evaluate this "
                         "file and register it with that metrics.json")
    if metrics_doc.get("split", "val") != "val":
        raise ValueError(f"the metrics were scored on a {metrics_doc['split']} split: register a model with "
                         "its metrics on the val split")
    for key, what in (("input_size", "input size"), ("method", "method")):
        if metrics_doc.get(key) and metadata.get(key) != metrics_doc[key]:
            raise ValueError(f"model {what} {metadata.get(key)} does not match the evaluated {what} "
                             f"{metrics_doc[key]} (metrics of another model?)")
    if metadata.get("graph") == "keypoints" and "flip" in metrics_doc \
            and (metadata.get("flip_test") == "true") != bool(metrics_doc["flip"]):
        raise ValueError(f"model flip test {metadata.get('flip_test')} does not match the evaluated one "
                         f"({str(bool(metrics_doc['flip'])).lower()}): metrics of another export?")


def register(onnx_path: str | Path, metrics_doc: dict[str, Any], name: str = "cal-pose") -> Decision:
    """Register ``onnx_path`` as a new version of ``name`` and set its alias; returns the decision."""
    from cal_core.export import read_metadata

    for key in ("metrics", "val_digest"):
        if not isinstance(metrics_doc, dict) or key not in metrics_doc:
            raise ValueError(f"metrics file lacks {key!r} (is it the metrics.json of `cal-pose evaluate`?)")
    if not isinstance(metrics_doc["metrics"], dict) or not isinstance(metrics_doc["metrics"].get("AP"), int | float):
        raise ValueError("metrics file has no numeric metrics.AP (is it the metrics.json of `cal-pose evaluate`?)")
    metadata = read_metadata(onnx_path)
    onnx_sha256 = sha256_of(onnx_path)
    _check_same_model(metadata, metrics_doc, onnx_sha256)
    if "'" in name:
        raise ValueError(f"registered model name {name!r}: quotes are not allowed (MLflow search filters)")
    ap = float(metrics_doc["metrics"]["AP"])
    tags = {**_model_tags(metrics_doc, metadata), "onnx_sha256": onnx_sha256}
    with tracking.stage_run("register", tags={"model_name": name}) as run:
        run.log_metrics({"AP": ap})
        identity = {key: tags[key] for key in ("onnx_sha256", "val_digest")}
        version = tracking.find_version(name, identity) or tracking.register_onnx(run, onnx_path, name, tags)
        champion = tracking.alias_version(name, CHAMPION)
        if champion is not None and champion[0] == version:
            alias, reason = CHAMPION, f"v{version} is this model, made champion by an earlier attempt"
        else:
            alias, reason = decide(ap, metrics_doc["val_digest"], champion, metadata.get("input_size"))
        tracking.set_alias(name, alias, version)
        decision = Decision(name, version, alias, reason, ap, champion[0] if champion else None)
        run.set_tags({"alias": alias, "reason": reason, "model_version": version})
    return decision


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI flags of `cal-pose register`."""
    parser.add_argument("--model", required=True, help="ONNX model (local path or s3://), e.g. keypoints.onnx")
    parser.add_argument("--metrics", required=True, help="metrics.json written by `cal-pose evaluate`")
    parser.add_argument("--name", default="cal-pose", help="registered model name")


def run(args: argparse.Namespace) -> int:
    """Register, set the alias, print ``champion|challenger: why``; 1 if the registry is unusable."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model = fetch_local(args.model, Path(tmp) / "model.onnx")
        try:
            metrics_doc = json.loads(fetch_local(args.metrics, Path(tmp) / "metrics.json").read_text())
        except ValueError as exc:  # not JSON (UnicodeDecodeError is a ValueError too)
            raise ValueError(f"--metrics {args.metrics} is not a JSON file ({exc})") from exc
        try:
            decision = register(model, metrics_doc, args.name)
        except tracking.RegistryError as exc:
            print(f"cal-pose register: {exc}", file=sys.stderr)
            return 1
    print(f"{decision.alias}: {decision.name} v{decision.version} - {decision.reason}")
    log.info("registry decision %s", json.dumps(asdict(decision)))
    return 0
