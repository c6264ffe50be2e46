"""A small HTTP file server for download tests: loopback, a free port, faults on request.

It serves one object with `Range` / `If-Range` support and counts the body bytes it sends per
request. `plan` holds what the next requests do, one entry each: `("status", 500)`,
`("drop", n)` (send the headers and n body bytes, then cut the connection), `("stall", s)`
(wait s seconds before answering). Knobs: `honour_range`, `etag`, `last_modified`,
`send_length`, `always_status`, `redirect_to`, `tls` (https with this certificate and key).
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

__all__ = ["Action", "FileServer", "Served", "file_server"]

Action = tuple[Literal["status", "drop", "stall"], float]
_BLOCK = 64 * 1024


@dataclass(slots=True)
class Served:
    """One request as the server saw it."""

    path: str
    headers: dict[str, str]
    status: int = 0
    body_bytes: int = 0


@dataclass(slots=True)
class FileServer:
    content: bytes
    etag: str | None = '"v1"'
    last_modified: str | None = None
    honour_range: bool = True
    send_length: bool = True
    always_status: int | None = None
    redirect_to: str | None = None
    tls: tuple[Path, Path] | None = None  # (certificate, key): serve https
    plan: list[Action] = field(default_factory=list)
    requests: list[Served] = field(default_factory=list)
    port: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}/models/m.blob"

    @property
    def served(self) -> int:
        """Body bytes sent in all."""
        with self.lock:
            return sum(r.body_bytes for r in self.requests)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # the stdlib's name
        """Quiet: pytest shows failures, not access logs."""

    def do_GET(self) -> None:  # the stdlib's name
        files = self.server.files
        served = Served(path=self.path, headers={k.lower(): v for k, v in self.headers.items()})
        with files.lock:
            files.requests.append(served)
            action = files.plan.pop(0) if files.plan else None
        if action is not None and action[0] == "stall":
            time.sleep(action[1])
        status = files.always_status
        if action is not None and action[0] == "status":
            status = int(action[1])
        if files.redirect_to is not None and status is None:
            self._answer(302, extra={"Location": files.redirect_to}, served=served)
            return
        if status is not None:
            self._answer(status, body=b"no", served=served)
            return
        content = files.content
        start, code = 0, 200
        wanted = re.fullmatch(r"bytes=(\d+)-", served.headers.get("range", ""))
        if wanted is not None and files.honour_range:
            if_range = served.headers.get("if-range")
            if if_range is None or if_range in (files.etag, files.last_modified):
                start, code = int(wanted.group(1)), 206
                if start >= len(content):
                    self._answer(
                        416, extra={"Content-Range": f"bytes */{len(content)}"}, served=served
                    )
                    return
        headers = {}
        if files.etag is not None:
            headers["ETag"] = files.etag
        if files.last_modified is not None:
            headers["Last-Modified"] = files.last_modified
        if code == 206:
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
        body = content[start:]
        limit = len(body)
        if action is not None and action[0] == "drop":
            limit = min(limit, int(action[1]))
        self._answer(code, body=body, limit=limit, extra=headers, served=served)
        if limit < len(body):
            self._cut()

    def _answer(
        self,
        code: int,
        *,
        served: Served,
        body: bytes = b"",
        limit: int | None = None,
        extra: dict[str, str] | None = None,
    ) -> None:
        served.status = code
        self.send_response(code)
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        if self.server.files.send_length or code != 200:
            self.send_header("Content-Length", str(len(body)))
        else:  # no length: the body ends when the connection closes
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        end = len(body) if limit is None else limit
        try:
            for at in range(0, end, _BLOCK):
                block = body[at : min(at + _BLOCK, end)]
                self.wfile.write(block)
                with self.server.files.lock:
                    served.body_bytes += len(block)
            self.wfile.flush()
        except OSError:  # the client went away
            self.close_connection = True

    def _cut(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    files: FileServer


@contextlib.contextmanager
def file_server(content: bytes, **knobs: Any) -> Iterator[FileServer]:
    """Serve `content` on 127.0.0.1 on a free port until the block ends."""
    files = FileServer(content=content, **knobs)
    server = _Server(("127.0.0.1", 0), _Handler)
    server.files = files
    files.port = server.server_address[1]
    if files.tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*files.tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, name="test-http", daemon=True)
    thread.start()
    try:
        yield files
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
