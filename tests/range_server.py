"""A real HTTP file server on 127.0.0.1 with single-range support, shared by the cache tests.

``serve(directory)`` starts it on a free port and returns ``(server, base_url)``; stop it with
``stop(server)``. The server records every request and can be slowed (``delay``), told to ignore
``Range`` (``honour_range=False``), or given an ``intercept(path, range_start)`` callable that runs
before each answer: it may block (to hold a fragment back), and it returns None to serve the file or
an HTTP status to answer instead (e.g. 500).
"""

from __future__ import annotations

import functools
import json
import re
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

from torch_arbiter.holo.format import INDEX_NAME

__all__ = ["RangeHandler", "serve", "stop", "floor_ranges"]

_CHUNK = 64 << 10


class RangeHandler(SimpleHTTPRequestHandler):
    """Static files with single ``bytes=a-b`` ranges; records every request on the server."""

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        server = self.server
        byte_range = self.headers.get("Range")
        with server.lock:
            server.requests.append((self.path, byte_range))
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
        try:
            time.sleep(server.delay)
            match = re.fullmatch(r"bytes=(\d+)-(\d+)", byte_range or "")
            status = server.intercept(self.path, int(match[1]) if match else None) if server.intercept else None
            if status is not None:
                self.send_error(status, "refused by the test")
                return
            self._send_file()
        finally:
            with server.lock:
                server.in_flight -= 1

    def _send_file(self) -> None:
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404, "no such file")
            return
        size = path.stat().st_size
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range") or "")
        if match is None or not self.server.honour_range:
            start, end, status = 0, size - 1, 200
        else:
            start, end, status = int(match[1]), min(int(match[2]), size - 1), 206
            if start >= size:
                self.send_error(416, "range not satisfiable")
                return
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        throttle = self.server.throttle
        left = end - start + 1
        with open(path, "rb") as handle:
            handle.seek(start)
            try:
                while left:
                    chunk = handle.read(min(left, _CHUNK) if throttle else left)
                    if throttle:
                        throttle(len(chunk))
                    self.wfile.write(chunk)
                    left -= len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client had what it needed (a range read from a 200) or gave up (timeout)


def serve(directory: Path, *, delay: float = 0.0, honour_range: bool = True,
          intercept: Callable[[str, int | None], int | None] | None = None,
          throttle: Callable[[int], None] | None = None):
    """Serve ``directory`` on 127.0.0.1; returns ``(server, base_url)`` (stop it with :func:`stop`).

    ``throttle(nbytes)`` is called before each 64 KiB of a body is written (it may sleep: a
    bandwidth-limited link, as ``bench/bench_switch.py`` uses)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(directory)))
    server.daemon_threads = True
    server.requests = []
    server.lock = threading.Lock()
    server.in_flight = server.max_in_flight = 0
    server.delay = delay
    server.honour_range = honour_range
    server.intercept = intercept
    server.throttle = throttle
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def stop(server) -> None:
    server.shutdown()
    server.server_close()


def floor_ranges(holo_dir: Path) -> set[tuple[str, int]]:
    """``(url path, first byte)`` of every level-1 fragment of a holo checkpoint: what a model
    loaded from it reads to run at its floor (the lowest level of each Holo layer and the exact
    tensors that are not swapped, whose only level is 1)."""
    index = json.loads((Path(holo_dir) / INDEX_NAME).read_text())
    return {(f"/{entry['file']}", entry["offset"]) for entry in index["fragments"].values() if entry["level"] == 1}
