"""A loopback HTTP(S) server for client tests: KFP's health check answers, every other request is a 404.

The 404 (empty body) lets the S3 and MLflow clients report "not there"
once a connection (and TLS handshake) has worked; the health check lets
``kfp.Client`` connect. Each request's ``Authorization`` header is recorded.
"""

from __future__ import annotations

import http.server
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager


def _handler(seen: list[str | None]) -> type[http.server.BaseHTTPRequestHandler]:
    """A request handler class that appends each request's Authorization header to ``seen``."""

    class Stub(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            seen.append(self.headers.get("Authorization"))
            healthy = self.command == "GET" and self.path.startswith("/apis/v2beta1/healthz")
            body = b'{"multi_user": false}' if healthy else b""
            self.send_response(200 if healthy else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_HEAD = do_PUT = do_POST = _answer

        def log_message(self, *args: object) -> None:
            """Quiet."""

    return Stub


@contextmanager
def serve(tls: ssl.SSLContext | None = None) -> Iterator[tuple[str, list[str | None]]]:
    """(base URL, recorded Authorization headers) of a stub on 127.0.0.1, over TLS when ``tls`` is given."""
    seen: list[str | None] = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(seen))
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
