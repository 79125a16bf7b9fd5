"""Bytes in and out of URIs: local paths (or ``file://``) and ``s3://bucket/key``.

This is the only module that talks to object storage (the ``minio`` client).
The endpoint and keys come from the environment, never from arguments or
logs: ``S3_ENDPOINT_URL`` (``http://host:port`` or ``https://host``),
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and optionally
``AWS_REGION`` (default ``us-east-1``, which also spares a location lookup).

Writes are atomic, so a reader never sees half an object: a local write goes to
a temporary file in the destination folder, is fsynced and then renamed over
the target; an S3 write is one PUT of the finished bytes (S3 makes an object
visible only once its upload completes). Transient S3 failures (connection
errors, 5xx, throttling) are retried a bounded number of times with
exponential back-off (``CAL_POSE_S3_RETRIES``, default 4 attempts), then
raise :class:`StorageError` naming the URI.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import io
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

T = TypeVar("T")
log = logging.getLogger(__name__)

#: Largest single PUT S3 allows; bigger objects go up as one multipart upload
#: (still atomic: the object appears only when the upload completes).
_MAX_SINGLE_PUT = 5 * 1024**3
#: S3 error codes worth another attempt (server side or throttling).
_RETRY_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling"}
_CLIENTS: dict[tuple[int, str, str], Any] = {}


class StorageError(RuntimeError):
    """An object store operation failed for good (after retries, or misconfiguration)."""


class FolderInUseError(OSError):
    """Another process holds :func:`exclusive` on the output folder (a second run into the same --out)."""


def is_s3(uri: str | Path) -> bool:
    """True for ``s3://bucket/key`` URIs."""
    return str(uri).startswith("s3://")


def _local(uri: str | Path) -> Path:
    """The filesystem path of a local URI (plain path or ``file://``)."""
    text = str(uri)
    return Path(text[len("file://"):]) if text.startswith("file://") else Path(text)


def canonical(uri: str | Path) -> str:
    """One spelling per location: a local path made absolute with symlinks resolved, an S3 URI without a trailing ``/``.

    Manifests record source URIs and reuse earlier output only when they
    match, so ``coco``, ``./coco/``, ``file:///abs/coco`` and a symlink to it
    must be the same source.
    """
    if is_s3(uri):
        return str(uri).rstrip("/")
    return os.path.realpath(_local(uri))


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; raises ``ValueError`` without a bucket."""
    rest = str(uri)[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"S3 URI has no bucket: {uri!r}")
    return bucket, key


def join(base: str | Path, *parts: str) -> str:
    """``base`` with ``parts`` appended as path components (``/``-separated for S3)."""
    if is_s3(base):
        text = str(base).rstrip("/")
        for part in parts:
            text = f"{text}/{part.strip('/')}" if part else text
        return text
    return str(_local(base).joinpath(*parts))


def _client() -> Any:
    """The minio client for the environment's endpoint (one per process: safe after fork)."""
    endpoint = os.environ.get("S3_ENDPOINT_URL", "")
    if not endpoint:
        raise StorageError("S3_ENDPOINT_URL is not set (e.g. http://127.0.0.1:8333)")
    parsed = urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise StorageError(f"S3_ENDPOINT_URL must be http://host[:port] or https://host[:port], got {endpoint!r}")
    access = os.environ.get("AWS_ACCESS_KEY_ID", "")
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    key = (os.getpid(), endpoint, hashlib.sha256(f"{access}\0{secret}".encode()).hexdigest())
    if key not in _CLIENTS:
        import urllib3
        from minio import Minio

        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=10, read=120), retries=False, maxsize=8)
        _CLIENTS[key] = Minio(parsed.netloc, access_key=access or None,
                              secret_key=secret or None,
                              secure=parsed.scheme == "https",
                              region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                              http_client=http)
    return _CLIENTS[key]


def _is_missing(exc: Exception) -> bool:
    """True for the S3 errors that mean "no such object"."""
    return getattr(exc, "code", None) in ("NoSuchKey", "NoSuchObject", "NotFound", "ResourceNotFound")


def _transient(exc: Exception) -> bool:
    """True for failures another attempt may fix: network errors, 5xx, throttling."""
    from minio.error import S3Error, ServerError
    from urllib3.exceptions import HTTPError

    if isinstance(exc, ServerError | HTTPError | ConnectionError | TimeoutError):
        return True
    return isinstance(exc, S3Error) and exc.code in _RETRY_CODES


def _with_retries(what: str, uri: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` with bounded retries on transient errors; raise :class:`StorageError` naming ``uri``."""
    attempts = max(1, int(os.environ.get("CAL_POSE_S3_RETRIES", "4")))
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if _is_missing(exc):
                raise FileNotFoundError(f"no such object: {uri}") from exc
            if not _transient(exc):
                raise StorageError(f"{what} {uri} failed: {type(exc).__name__}: {exc}") from exc
            if attempt == attempts:
                raise StorageError(f"{what} {uri} failed after {attempts} attempts: "
                                   f"{type(exc).__name__}: {exc}") from exc
            time.sleep(min(8.0, 0.5 * 2 ** (attempt - 1)))
    raise AssertionError("unreachable")


def read_bytes(uri: str | Path) -> bytes:
    """The whole content of ``uri``; ``FileNotFoundError`` naming it when absent."""
    if not is_s3(uri):
        path = _local(uri)
        try:
            with open(path, "rb") as file:
                return file.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise FileNotFoundError(f"no such file: {path}") from exc
    bucket, key = split_s3(str(uri))

    def get() -> bytes:
        response = _client().get_object(bucket, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    return _with_retries("read", str(uri), get)


def temp_beside(path: Path) -> tuple[int, str]:
    """``(fd, name)`` of a new, empty temporary file next to ``path``, to be renamed onto it.

    Created with mode ``0666`` less the umask, as ``open`` would create
    ``path`` itself; ``tempfile.mkstemp`` makes ``0600`` files, which would
    leave every output unreadable to other users after the rename.
    """
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name next to {path}")


def check_writable(folder: str | Path) -> None:
    """Write (then delete) a probe file in the local ``folder``; ValueError naming it if that fails.

    Stages call this before any work, so an output that is a file, on a
    read-only mount or not ours fails at once instead of after an epoch or
    a decoding pass. Folders it had to create are removed again: a refused
    run leaves nothing. S3 prefixes are not probed (that would leave an object).
    """
    if is_s3(folder):
        return
    try:
        with _made_for_the_block(_local(folder).absolute()) as (path, _):
            fd, tmp = temp_beside(path / "write-probe")
            os.close(fd)
            os.unlink(tmp)
    except OSError as exc:
        raise ValueError(f"cannot write to {folder}: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def _made_for_the_block(path: Path) -> Iterator[tuple[Path, list[Path]]]:
    """Create the folder ``path`` (and missing parents) for the block; remove those it made if still empty.

    Yields ``(path, made)``: clearing ``made`` keeps them (a folder that has
    become another run's). Deepest first, so parents go once empty too.
    """
    made = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        yield path, made
    finally:
        for new in made:
            with contextlib.suppress(OSError):  # a folder with outputs in it stays
                new.rmdir()


@contextlib.contextmanager
def exclusive(folder: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on the local ``folder`` (created if needed) while the block runs.

    Two runs writing one output folder at once (a command started twice)
    interleave their checkpoints or shard journals and corrupt both; the
    second now fails at once with :class:`FolderInUseError`. The lock is
    ``flock(2)`` on the folder itself: no lock file to go stale, the kernel
    drops it when the process dies. Folders made for it are removed again
    if still empty at the end, so a refused run leaves nothing. S3 prefixes
    are not locked (S3 has none; KFP never runs two attempts of a task at
    once), nor folders on filesystems without ``flock`` (a warning).
    """
    if is_s3(folder):
        yield
        return
    with _made_for_the_block(_local(folder).absolute()) as (path, made):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                _lock(fd, folder, what)
            except FolderInUseError:
                made.clear()  # made at the same moment by the run holding it: its folder now
                raise
            yield
        finally:
            with contextlib.suppress(OSError):  # explicitly: forked workers share the descriptor
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _lock(fd: int, folder: str | Path, what: str) -> None:
    """``flock`` ``fd`` exclusively without waiting; :class:`FolderInUseError` if another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        raise FolderInUseError(f"{folder} is in use by another running {what}: two runs into one output "
                               "folder would corrupt it (wait for it to end, or choose another --out)") from exc
    except OSError as exc:  # e.g. NFS without lock support
        log.warning("could not lock %s (%s): nothing stops a second run from writing there", folder, exc)


def remove_temporaries(folder: str | Path, name: str) -> int:
    """Delete what killed atomic writes of ``<folder>/<name>`` left behind; how many (S3 writes leave none).

    A SIGKILL between :func:`temp_beside` and the rename skips the clean-up,
    and each such file is a full copy (a checkpoint: hundreds of MB).
    """
    if is_s3(folder):
        return 0
    stale = list(_local(folder).glob(f".{glob.escape(name)}.*.tmp"))
    for tmp in stale:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return len(stale)


@contextlib.contextmanager
def _atomic_local(path: Path, durable: bool = True) -> Iterator[io.BufferedWriter]:
    """A file object whose content replaces ``path`` only if the block completes (fsynced first if ``durable``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(uri: str | Path, data: bytes, durable: bool = True) -> None:
    """Atomically store ``data`` at ``uri`` (local: temp file + rename; S3: one PUT).

    ``durable=False`` skips the local fsync, for files that are cheap to
    regenerate and written by the thousand (the synthetic set's images): a
    crash can then lose them, but never leaves a partial file.
    """
    if not is_s3(uri):
        with _atomic_local(_local(uri), durable) as handle:
            handle.write(data)
        return
    bucket, key = split_s3(str(uri))
    part = _MAX_SINGLE_PUT if len(data) <= _MAX_SINGLE_PUT else 0
    _with_retries("write", str(uri),
                  lambda: _client().put_object(bucket, key, io.BytesIO(data), len(data), part_size=part))


def exists(uri: str | Path) -> bool:
    """True if a file (local) or object (S3) exists at ``uri``."""
    if not is_s3(uri):
        return _local(uri).is_file()
    bucket, key = split_s3(str(uri))
    try:
        _with_retries("stat", str(uri), lambda: _client().stat_object(bucket, key))
    except FileNotFoundError:
        return False
    return True


def list_prefix(uri: str | Path) -> list[str]:
    """Sorted URIs of every file under the folder (local) or key prefix (S3) ``uri``, recursively.

    The prefix is taken as a folder: ``s3://b/data`` lists ``data/...``, not
    ``data2/...``. A missing folder lists as empty.
    """
    if not is_s3(uri):
        root = _local(uri)
        return sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    bucket, key = split_s3(str(uri))
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""

    def listing() -> list[str]:
        objects = _client().list_objects(bucket, prefix=prefix, recursive=True)
        return sorted(f"s3://{bucket}/{obj.object_name}" for obj in objects if not obj.is_dir)

    return _with_retries("list", str(uri), listing)


def download(uri: str | Path, local_path: str | Path) -> Path:
    """Copy ``uri`` to the local file ``local_path`` atomically; returns the path."""
    dst = Path(local_path)
    if not is_s3(uri):
        src = _local(uri)
        if not src.is_file():
            raise FileNotFoundError(f"no such file: {src}")
        with _atomic_local(dst) as handle, src.open("rb") as source:
            shutil.copyfileobj(source, handle)
        return dst
    bucket, key = split_s3(str(uri))

    def fetch() -> None:
        response = _client().get_object(bucket, key)
        try:
            with _atomic_local(dst) as handle:
                for chunk in response.stream(1 << 20):
                    handle.write(chunk)
        finally:
            response.close()
            response.release_conn()

    _with_retries("download", str(uri), fetch)
    return dst


def upload(local_path: str | Path, uri: str | Path) -> None:
    """Copy the local file ``local_path`` to ``uri`` atomically (S3: the object appears when complete)."""
    src = Path(local_path)
    if not src.is_file():
        raise FileNotFoundError(f"no such file: {src}")
    if not is_s3(uri):
        with _atomic_local(_local(uri)) as handle, src.open("rb") as source:
            shutil.copyfileobj(source, handle)
        return
    bucket, key = split_s3(str(uri))
    size = src.stat().st_size
    part = _MAX_SINGLE_PUT if size <= _MAX_SINGLE_PUT else 0

    def put() -> None:
        with src.open("rb") as source:
            _client().put_object(bucket, key, source, size, part_size=part)

    _with_retries("upload", str(uri), put)


def delete(uri: str | Path) -> None:
    """Remove the file or object at ``uri``; absent is fine (idempotent)."""
    if not is_s3(uri):
        with contextlib.suppress(FileNotFoundError):
            _local(uri).unlink()
        return
    bucket, key = split_s3(str(uri))
    _with_retries("delete", str(uri), lambda: _client().remove_object(bucket, key))
