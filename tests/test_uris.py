"""cal_core.uris: local staging of URI inputs and outputs, local and on a real S3 server."""

from __future__ import annotations

from pathlib import Path

import pytest

from cal_core import storage, uris
from tests.s3server import s3_server  # noqa: F401  (pytest fixture)


def test_local_uris_are_used_in_place(tmp_path: Path) -> None:
    src = tmp_path / "a.json"
    src.write_text("{}")
    assert uris.fetch_local(str(src), tmp_path / "unused") == src
    assert uris.fetch_local(f"file://{src}", tmp_path / "unused") == src
    assert uris.output_dir(str(tmp_path / "out"), tmp_path / "staging") == tmp_path / "out"
    assert not (tmp_path / "out").exists() and not (tmp_path / "staging").exists()  # the writer creates it
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        uris.fetch_local(str(tmp_path / "missing.onnx"), tmp_path / "x")


def test_s3_outputs_are_staged_then_published(s3_server, tmp_path: Path) -> None:  # noqa: F811
    target = f"s3://{s3_server.bucket}/run/eval"
    out = uris.output_dir(target, tmp_path / "staging")
    assert out == tmp_path / "staging"
    (out / "overlays").mkdir(parents=True)
    (out / "metrics.json").write_text('{"AP": 0.5}')
    (out / "overlays" / "000.png").write_bytes(b"\x89PNG")
    uris.publish(out, target)
    assert storage.read_bytes(f"{target}/metrics.json") == b'{"AP": 0.5}'
    assert storage.read_bytes(f"{target}/overlays/000.png") == b"\x89PNG"
    fetched = uris.fetch_local(f"{target}/metrics.json", tmp_path / "in" / "metrics.json")
    assert fetched == tmp_path / "in" / "metrics.json" and fetched.read_text() == '{"AP": 0.5}'
