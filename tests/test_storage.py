"""cal_core.storage: local and S3 URIs, atomic writes, retries and clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cal_core import storage
from tests.s3server import s3_server  # noqa: F401  (pytest fixture)


def test_join_and_is_s3() -> None:
    assert storage.join("s3://b/pre/", "x", "/y.json") == "s3://b/pre/x/y.json"
    assert storage.join("s3://b", "k") == "s3://b/k"
    assert storage.join("/tmp/a", "b", "c") == "/tmp/a/b/c"
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/s3://x") and not storage.is_s3("file:///a")
    assert storage.split_s3("s3://bucket/a/b") == ("bucket", "a/b")
    with pytest.raises(ValueError, match="no bucket"):
        storage.split_s3("s3:///key")


def test_canonical_gives_one_spelling_per_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    want = str((tmp_path / "data").resolve())
    for spelling in ("data", "./data/", f"file://{tmp_path}/data", "alias", f"{tmp_path}/alias/../data"):
        assert storage.canonical(spelling) == want, spelling
    assert storage.canonical("s3://bucket/coco/") == "s3://bucket/coco"
    assert storage.canonical("s3://bucket/coco") == "s3://bucket/coco"


def test_temporaries_of_killed_writes_are_removed(tmp_path: Path) -> None:
    (tmp_path / "last.pt").write_bytes(b"good")
    for leftover in (".last.pt.0a1b2c3d4e5f.tmp", ".last.pt.ffffffffffff.tmp"):
        (tmp_path / leftover).write_bytes(b"partial")
    (tmp_path / ".model.pt.000000000000.tmp").write_bytes(b"other file's")
    assert storage.remove_temporaries(tmp_path, "last.pt") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.pt.000000000000.tmp", "last.pt"]
    assert storage.remove_temporaries("s3://bucket/run", "last.pt") == 0


def test_local_round_trip_is_atomic(tmp_path: Path) -> None:
    uri = str(tmp_path / "deep" / "dir" / "f.bin")
    storage.write_bytes(uri, b"one")
    storage.write_bytes(uri, b"two")
    assert storage.read_bytes(uri) == b"two"
    assert storage.read_bytes("file://" + uri) == b"two"
    assert storage.exists(uri) and not storage.exists(str(tmp_path / "nope"))
    assert os.listdir(tmp_path / "deep" / "dir") == ["f.bin"]  # no temp file left behind


def test_local_failed_write_leaves_old_content(tmp_path: Path) -> None:
    uri = tmp_path / "f.bin"
    storage.write_bytes(uri, b"old")
    with pytest.raises(TypeError):
        storage.write_bytes(uri, "not bytes")  # type: ignore[arg-type]
    assert uri.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_only_durable_local_writes_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    storage.write_bytes(tmp_path / "kept.bin", b"a")
    assert len(synced) == 1
    storage.write_bytes(tmp_path / "cheap.bin", b"b", durable=False)
    assert len(synced) == 1 and (tmp_path / "cheap.bin").read_bytes() == b"b"
    with pytest.raises(TypeError):
        storage.write_bytes(tmp_path / "cheap.bin", "not bytes", durable=False)  # type: ignore[arg-type]
    assert (tmp_path / "cheap.bin").read_bytes() == b"b"
    assert sorted(os.listdir(tmp_path)) == ["cheap.bin", "kept.bin"]


def test_local_missing_and_listing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        storage.read_bytes(tmp_path / "nope")
    for name in ("b/2.txt", "a.txt", "b/1.txt"):
        storage.write_bytes(tmp_path / "root" / name, name.encode())
    assert storage.list_prefix(tmp_path / "root") == [str(tmp_path / "root" / n) for n in ("a.txt", "b/1.txt", "b/2.txt")]
    assert storage.list_prefix(tmp_path / "missing") == []


def test_local_download_upload(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 3000)
    storage.upload(src, tmp_path / "up" / "copy.bin")
    assert storage.download(tmp_path / "up" / "copy.bin", tmp_path / "down" / "d.bin").read_bytes() == b"x" * 3000
    with pytest.raises(FileNotFoundError):
        storage.upload(tmp_path / "absent", tmp_path / "x")


def test_missing_endpoint_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("S3_ENDPOINT_URL", raising=False)
    with pytest.raises(storage.StorageError, match="S3_ENDPOINT_URL"):
        storage.read_bytes("s3://b/k")
    monkeypatch.setenv("S3_ENDPOINT_URL", "127.0.0.1:9")
    with pytest.raises(storage.StorageError, match="http://"):
        storage.read_bytes("s3://b/k")


def test_unreachable_endpoint_retries_then_names_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.setenv("CAL_POSE_S3_RETRIES", "2")
    with pytest.raises(storage.StorageError, match="after 2 attempts") as info:
        storage.write_bytes("s3://bucket/some/key.bin", b"data")
    assert "s3://bucket/some/key.bin" in str(info.value)
    assert "very-secret-value" not in str(info.value)


def test_s3_round_trip(s3_server, tmp_path: Path) -> None:  # noqa: F811
    base = f"s3://{s3_server.bucket}/data"
    storage.write_bytes(storage.join(base, "a.bin"), b"alpha")
    storage.write_bytes(storage.join(base, "sub", "b.bin"), b"beta")
    storage.write_bytes(f"s3://{s3_server.bucket}/data2/c.bin", b"not under data/")
    assert storage.read_bytes(f"{base}/a.bin") == b"alpha"
    assert storage.exists(f"{base}/sub/b.bin") and not storage.exists(f"{base}/zzz")
    assert storage.list_prefix(base) == [f"{base}/a.bin", f"{base}/sub/b.bin"]
    with pytest.raises(FileNotFoundError, match="zzz"):
        storage.read_bytes(f"{base}/zzz")
    big = os.urandom(6 * 1024 * 1024)  # above minio's default 5 MiB part size: still one PUT
    src = tmp_path / "big.bin"
    src.write_bytes(big)
    storage.upload(src, f"{base}/big.bin")
    assert storage.download(f"{base}/big.bin", tmp_path / "back.bin").read_bytes() == big
    assert sorted(os.listdir(tmp_path)) == ["back.bin", "big.bin"]


def test_s3_wrong_key_is_rejected(s3_server, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    with pytest.raises(storage.StorageError, match=f"s3://{s3_server.bucket}/k") as info:
        storage.write_bytes(f"s3://{s3_server.bucket}/k", b"x")
    assert "wrong-secret" not in str(info.value)


def test_s3_missing_bucket_is_a_clear_error(s3_server) -> None:  # noqa: F811
    with pytest.raises((storage.StorageError, FileNotFoundError), match="no-such-bucket-xyz"):
        storage.read_bytes("s3://no-such-bucket-xyz/k")


def test_local_writes_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    """Outputs must be readable by other users/steps as any file the process creates (0666 & ~umask)."""
    old = os.umask(0o022)
    try:
        storage.write_bytes(tmp_path / "out" / "a.bin", b"x")
        (tmp_path / "src.bin").write_bytes(b"y")
        storage.upload(tmp_path / "src.bin", str(tmp_path / "b.bin"))
    finally:
        os.umask(old)
    assert (tmp_path / "out" / "a.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o644
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_exclusive_refuses_a_second_holder_and_leaves_no_empty_folder(tmp_path: Path) -> None:
    """Two runs into one --out interleaved their checkpoints or shard journals; nothing stopped the second."""
    out = tmp_path / "runs" / "out"
    with storage.exclusive(out, "training"):
        assert out.is_dir()
        with pytest.raises(storage.FolderInUseError, match=r"out is in use by another running training"), \
                storage.exclusive(str(out), "training"):
            pass
    assert list(tmp_path.iterdir()) == []  # made for the lock and still empty: removed (a refused run leaves nothing)
    with storage.exclusive(out, "training"):  # released: the next run may take it
        (out / "last.pt").write_bytes(b"x")
    assert (out / "last.pt").read_bytes() == b"x"  # outputs and their folders stay
    with storage.exclusive("s3://bucket/prefix", "training"):  # S3 has no lock: nothing to take
        pass


def test_check_writable_probes_without_leaving_anything(tmp_path: Path) -> None:
    """A refused run must leave no folder behind; a file or a read-only folder as the output is named."""
    storage.check_writable(tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []  # the folders it made for the probe are gone again
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"cannot write to .*file"):
        storage.check_writable(tmp_path / "file" / "out")
    storage.check_writable("s3://bucket/prefix")  # not probed: that would leave an object
