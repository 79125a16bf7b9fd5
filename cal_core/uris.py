"""Local staging for stages that read and write URIs (local paths or s3://).

Export, evaluate and register work on local files (onnxruntime, pycocotools
and mlflow want paths). These helpers fetch remote inputs into a temporary
folder and publish a finished local output folder to its URI, through
:mod:`cal_core.storage` (the only module that talks to S3).
"""

from __future__ import annotations

from pathlib import Path


def is_remote(uri: str | Path) -> bool:
    """True for ``scheme://`` URIs other than ``file://`` (e.g. ``s3://bucket/key``)."""
    text = str(uri)
    return "://" in text and not text.startswith("file://")


def local_path(uri: str | Path) -> Path:
    """The filesystem path of a local URI (plain path or ``file://``)."""
    text = str(uri)
    return Path(text[len("file://"):]) if text.startswith("file://") else Path(text)


def fetch_local(uri: str | Path, dst: Path) -> Path:
    """A local path holding ``uri``'s bytes: the path itself if local, else a download to ``dst``."""
    if not is_remote(uri):
        path = local_path(uri)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        return path
    from cal_core import storage

    return storage.download(str(uri), dst)  # streamed to disk: a large model is never held in memory


def sha256_of(path: str | Path) -> str:
    """sha256 hex digest of a local file's bytes, read in chunks (fetch a remote one first: :func:`fetch_local`)."""
    import hashlib

    digest = hashlib.sha256()
    with local_path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def output_dir(uri: str | Path, staging: Path) -> Path:
    """Where to write outputs for ``uri``: the folder itself if local, else ``staging``.

    Not created here: the writer creates it with its first output, so a run
    refused for bad input leaves no empty folder behind (probe a local one
    first with :func:`cal_core.storage.check_writable`).
    """
    return staging if is_remote(uri) else local_path(uri)


def publish(local_dir: Path, uri: str | Path) -> None:
    """Upload every file under ``local_dir`` to ``uri`` (no-op when ``uri`` is that local folder)."""
    if not is_remote(uri):
        return
    from cal_core import storage

    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        storage.write_bytes(storage.join(str(uri), path.relative_to(local_dir).as_posix()), path.read_bytes())
