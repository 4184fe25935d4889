"""A tiny local HTTP server with Range support, request counting and fault injection.

Shipped for tests and plugin authors: readers of remote formats (COGs over
``/vsicurl/``, Zarr over HTTP) can be tested against real HTTP on the loopback
interface, with the number of requests and bytes measured and failures
injected. Only the standard library is used.

Example
-------
>>> import os, tempfile, urllib.request
>>> d = tempfile.mkdtemp(); _ = open(os.path.join(d, "a.bin"), "wb").write(bytes(range(100)))
>>> with serve_directory(d) as srv:
...     req = urllib.request.Request(srv.url("a.bin"), headers={"Range": "bytes=10-19"})
...     body = urllib.request.urlopen(req).read()
...     stats = srv.stats.snapshot()
>>> list(body) == list(range(10, 20)), stats["get"], stats["bytes"]
(True, 1, 10)
"""

from __future__ import annotations

import os
import posixpath
import re
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["Faults", "HttpStats", "LocalHttpServer", "serve_directory"]

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass
class HttpStats:
    """Counters of what the server answered (thread-safe through :attr:`lock`)."""

    get: int = 0
    head: int = 0
    bytes: int = 0
    ranges: list[tuple[str, int, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def snapshot(self) -> dict[str, Any]:
        """A copy of the counters: ``get``, ``head``, ``bytes`` and ``ranges`` (path, start, end)."""
        with self.lock:
            return {"get": self.get, "head": self.head, "bytes": self.bytes, "ranges": list(self.ranges)}

    def reset(self) -> None:
        """Set every counter back to zero."""
        with self.lock:
            self.get = self.head = self.bytes = 0
            self.ranges.clear()


@dataclass
class Faults:
    """Faults to inject.

    Attributes
    ----------
    missing : set of str
        URL paths (``"/a.tif"``) answered with 404 although the file exists.
    drop_first_gets : int
        The next this-many GET requests send their headers and half the body,
        then the connection is closed (a server dying mid-read).
    """

    missing: set[str] = field(default_factory=set)
    drop_first_gets: int = 0


class _Handler(BaseHTTPRequestHandler):
    server: LocalHttpServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # quiet: tests read the counters instead

    def _file(self) -> str | None:
        path = urllib.parse.urlsplit(self.path).path
        if path in self.server.faults.missing:
            return None
        rel = posixpath.normpath(urllib.parse.unquote(path)).lstrip("/")
        if rel.startswith("..") or not rel:
            return None
        full = os.path.join(self.server.root, *rel.split("/"))
        return full if os.path.isfile(full) else None

    def _not_found(self) -> None:
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self) -> None:  # noqa: N802 - stdlib name
        with self.server.stats.lock:
            self.server.stats.head += 1
        full = self._file()
        if full is None:
            return self._not_found()
        self.send_response(200)
        self.send_header("Content-Length", str(os.path.getsize(full)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        stats, faults = self.server.stats, self.server.faults
        with stats.lock:
            stats.get += 1
            drop = faults.drop_first_gets > 0
            if drop:
                faults.drop_first_gets -= 1
        full = self._file()
        if full is None:
            return self._not_found()
        size = os.path.getsize(full)
        start, end, status = 0, size - 1, 200
        match = _RANGE.match(self.headers.get("Range", "").replace(" ", ""))
        if match and (match.group(1) or match.group(2)):
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            else:  # suffix range: the last N bytes
                start = max(size - int(match.group(2)), 0)
            if start >= size or start > end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        length = end - start + 1
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        with open(full, "rb") as fh:
            fh.seek(start)
            body = fh.read(length)
        if drop:
            body = body[: len(body) // 2]
        with stats.lock:  # counted before the body leaves: a client that has read it sees the count
            stats.bytes += len(body)
            stats.ranges.append((urllib.parse.urlsplit(self.path).path, start, start + len(body)))
        self.wfile.write(body)
        if drop:
            self.wfile.flush()
            self.close_connection = True
            self.connection.close()


class LocalHttpServer(ThreadingHTTPServer):
    """A threaded HTTP server serving ``root`` on ``127.0.0.1`` (see :func:`serve_directory`)."""

    daemon_threads = True

    def __init__(self, root: str, faults: Faults | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = os.path.abspath(root)
        self.stats = HttpStats()
        self.faults = faults or Faults()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, relpath: str) -> str:
        """The URL of a file below the served directory."""
        return f"{self.base_url}/{urllib.parse.quote(relpath.lstrip('/'))}"


@contextmanager
def serve_directory(root: str, faults: Faults | None = None) -> Iterator[LocalHttpServer]:
    """Serve ``root`` over HTTP on a free loopback port for the duration of the block.

    Parameters
    ----------
    root : str
        Directory to serve (files only, no listings).
    faults : Faults, optional
        Faults to inject; they can also be changed on ``server.faults`` later.

    Yields
    ------
    LocalHttpServer
        Use ``server.url("a.tif")`` for URLs and ``server.stats`` for counters.
    """
    server = LocalHttpServer(root, faults)
    thread = threading.Thread(target=server.serve_forever, name="tileseg-http", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
