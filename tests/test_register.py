"""cal-pose register: promotion logic against a real sqlite MLflow registry in tmp."""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from cal_core import register, tracking


def _onnx_file(path: Path, marker: str, input_size: str = "64x48", **props: str) -> Path:
    """A one-node ONNX model carrying cal-pose metadata and a ``marker`` to tell versions apart."""
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    helper.set_model_props(model, {"method": "cal", "input_size": input_size, "marker": marker, **props})
    onnx.save(model, str(path))
    return path


def _metrics(ap: float, digest: str = "val-A") -> dict:
    return {"metrics": {"AP": ap, "AP50": min(1.0, ap + 0.2)}, "val_digest": digest, "input_size": "64x48"}


@pytest.fixture()
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    monkeypatch.delenv(tracking.TRACKING_SWITCH_ENV, raising=False)
    return tmp_path


def test_decide_rules() -> None:
    assert register.decide(0.4, "d", None)[0] == "champion"
    champ = ("3", {"AP": "0.500000", "val_digest": "d"})
    assert register.decide(0.51, "d", champ)[0] == "champion"
    alias, why = register.decide(0.5, "d", champ)
    assert alias == "challenger" and "does not beat" in why
    # the champion's tag is rounded: the same AP again (a rerun) must not beat it
    alias, why = register.decide(0.010959306440472587, "d", ("1", {"AP": "0.010959", "val_digest": "d"}))
    assert alias == "challenger" and "does not beat" in why
    alias, why = register.decide(0.9, "other", champ)
    assert alias == "challenger" and "another validation set" in why
    alias, why = register.decide(0.9, "d", ("3", {"val_digest": "d", "AP": "0.5", "input_size": "256x192"}),
                                 "64x48")
    assert alias == "challenger" and "256x192" in why and "input shape" in why
    assert register.decide(0.9, "d", ("3", {"val_digest": "d", "AP": "0.5", "input_size": "64x48"}),
                           "64x48")[0] == "champion"
    alias, why = register.decide(0.9, "d", ("4", {"val_digest": "d"}))
    assert alias == "challenger" and "no AP tag" in why


def test_first_better_worse_and_loading_the_champion(registry: Path) -> None:
    first = register.register(_onnx_file(registry / "a.onnx", "first"), _metrics(0.50))
    assert (first.alias, first.version, first.previous_champion) == ("champion", "1", None)
    better = register.register(_onnx_file(registry / "b.onnx", "better"), _metrics(0.62))
    assert (better.alias, better.version, better.previous_champion) == ("champion", "2", "1")
    worse = register.register(_onnx_file(registry / "c.onnx", "worse"), _metrics(0.55))
    assert (worse.alias, worse.version) == ("challenger", "3")
    other_set = register.register(_onnx_file(registry / "d.onnx", "other"), _metrics(0.99, "val-B"))
    assert other_set.alias == "challenger" and "another validation set" in other_set.reason

    version, tags = tracking.alias_version("cal-pose", "champion")
    assert version == "2" and float(tags["AP"]) == pytest.approx(0.62)
    assert tags["method"] == "cal" and tags["input_size"] == "64x48" and tags["val_digest"] == "val-A"
    champion = tracking.load_registered_onnx("models:/cal-pose@champion")
    assert {p.key: p.value for p in champion.metadata_props}["marker"] == "better"
    challenger = tracking.load_registered_onnx("models:/cal-pose@challenger")
    assert {p.key: p.value for p in challenger.metadata_props}["marker"] == "other"


def test_loading_leaves_mlflow_globals_alone(registry: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    register.register(_onnx_file(registry / "a.onnx", "first"), _metrics(0.50))
    register.register(_onnx_file(registry / "b.onnx", "second"), _metrics(0.40))
    import mlflow

    def refuse(uri: str) -> None:
        raise AssertionError(f"a library call set mlflow's process-wide URI to {uri}")

    monkeypatch.setattr(mlflow, "set_tracking_uri", refuse)
    monkeypatch.setattr(mlflow, "set_registry_uri", refuse)
    by_number = tracking.load_registered_onnx("models:/cal-pose/2")
    assert {p.key: p.value for p in by_number.metadata_props}["marker"] == "second"
    for bad in ("models:/cal-pose", "models:/cal-pose/Production", "runs:/abc/model", "models:/@champion"):
        with pytest.raises(tracking.RegistryError, match="is not models:/NAME@ALIAS"):
            tracking.load_registered_onnx(bad)
    with pytest.raises(tracking.RegistryError, match="could not load models:/cal-pose@nobody"):
        tracking.load_registered_onnx("models:/cal-pose@nobody")


def test_cli_prints_decision_and_rejects_mismatched_size(registry: Path, capsys: pytest.CaptureFixture) -> None:
    (registry / "metrics.json").write_text(json.dumps(_metrics(0.3)))
    args = argparse.Namespace(model=str(_onnx_file(registry / "m.onnx", "m")),
                              metrics=str(registry / "metrics.json"), name="pose-x")
    assert register.run(args) == 0
    assert capsys.readouterr().out.startswith("champion: pose-x v1 - there is no champion yet")
    with pytest.raises(ValueError, match="128x96"):
        register.register(_onnx_file(registry / "n.onnx", "n", "128x96"), _metrics(0.3))
    (registry / "bad.onnx").write_bytes(b"\xff not a protobuf \x00\x01")
    with pytest.raises(ValueError, match="bad.onnx is not an ONNX model"):
        register.register(registry / "bad.onnx", _metrics(0.3))
    with pytest.raises(ValueError, match="model method cal does not match the evaluated method udp"):
        register.register(_onnx_file(registry / "u.onnx", "u"), {**_metrics(0.3), "method": "udp"})
    with pytest.raises(ValueError, match="no numeric metrics.AP"):  # was a KeyError traceback
        register.register(_onnx_file(registry / "a.onnx", "a"), {**_metrics(0.3), "metrics": {}})
    (registry / "report.md").write_text("# not json")
    with pytest.raises(ValueError, match=r"--metrics .*report.md is not a JSON file"):
        register.run(argparse.Namespace(model=str(registry / "m.onnx"), metrics=str(registry / "report.md"),
                                        name="pose-x"))
    no_flip = _onnx_file(registry / "k.onnx", "k", graph="keypoints", flip_test="false")
    with pytest.raises(ValueError, match="flip test false does not match the evaluated one \\(true\\)"):
        register.register(no_flip, {**_metrics(0.3), "method": "cal", "flip": True})


def test_metrics_of_another_file_of_a_train_split_and_raw_graphs_are_refused(registry: Path) -> None:
    """Each once registered: a wrong AP on the version (and a possible champion), or a graph deployments can't use."""
    import hashlib

    model = _onnx_file(registry / "m.onnx", "m", graph="keypoints", flip_test="true")
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    other = _onnx_file(registry / "o.onnx", "o", graph="keypoints", flip_test="true")
    with pytest.raises(ValueError, match="computed on another model file"):
        register.register(other, {**_metrics(0.3), "model_sha256": digest})
    with pytest.raises(ValueError, match="scored on a train split"):
        register.register(model, {**_metrics(0.3), "model_sha256": digest, "split": "train"})
    with pytest.raises(ValueError, match="this is the raw graph"):
        register.register(_onnx_file(registry / "r.onnx", "r", graph="raw"), _metrics(0.3))
    decision = register.register(model, {**_metrics(0.3), "model_sha256": digest, "split": "val", "flip": True})
    assert decision.alias == "champion"


def test_unreachable_registry_fails_the_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps(_metrics(0.3)))
    args = argparse.Namespace(model=str(_onnx_file(tmp_path / "m.onnx", "m")),
                              metrics=str(tmp_path / "metrics.json"), name="cal-pose")
    assert register.run(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("cal-pose register: ") and f"MLflow registry at http://127.0.0.1:{port} is unreachable" in err


def test_registering_the_same_model_again_reuses_its_version(registry: Path) -> None:
    """A retried register task (or a rerun) once added a twin version, which became its own challenger."""
    model = _onnx_file(registry / "a.onnx", "first")
    first = register.register(model, _metrics(0.50))
    again = register.register(model, _metrics(0.50))
    assert (again.version, again.alias) == (first.version, "champion") and "earlier attempt" in again.reason
    worse = register.register(_onnx_file(registry / "b.onnx", "worse"), _metrics(0.40))
    assert (worse.version, worse.alias) == ("2", "challenger")
    assert register.register(_onnx_file(registry / "b.onnx", "worse"), _metrics(0.40)).version == "2"
    on_other_set = register.register(model, _metrics(0.70, "val-B"))  # same file, another val set: a new version
    assert on_other_set.version == "3" and on_other_set.alias == "challenger"
    from mlflow import MlflowClient

    uri = tracking.tracking_uri()
    versions = MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions("name='cal-pose'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3], [(v.version, v.tags) for v in versions]
    with pytest.raises(ValueError, match="quotes are not allowed"):
        register.register(model, _metrics(0.5), name="it's")
