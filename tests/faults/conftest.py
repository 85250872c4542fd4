"""Shared pieces of the fault-injection suite: a small real holo checkpoint and an HTTP server on
127.0.0.1 that answers each request with whatever bytes a test scripts (it lies on purpose)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from torch_arbiter.holo import HoloTensor
from torch_arbiter.holo.format import save_holo


@pytest.fixture(scope="session")
def small_holo_dir(tmp_path_factory) -> Path:
    """A real holo checkpoint: one encoded weight and one plain tensor."""
    generator = torch.Generator().manual_seed(0)
    directory = tmp_path_factory.mktemp("fault_holo") / "checkpoint"
    save_holo(directory, {"layer.weight": HoloTensor.encode(torch.randn(64, 64, generator=generator)),
                          "layer.bias": torch.randn(64, generator=generator)})
    return directory


class LyingServer:
    """A TCP server on 127.0.0.1: each connection reads one request, then ``respond(request, send)``
    writes whatever it likes through ``send(bytes)`` (and may sleep between writes)."""

    def __init__(self, respond: Callable[[bytes, Callable[[bytes], None]], None]):
        self.respond = respond
        self.requests: list[bytes] = []
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.1)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._socket.accept()
            except OSError:
                continue
            thread = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            request = b""
            try:
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    request += chunk
                self.requests.append(request)

                def send(data: bytes) -> None:
                    if self._stop.is_set():
                        raise ConnectionAbortedError
                    conn.sendall(data)

                self.respond(request, send)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._socket.close()
        self._accept.join(timeout=5)
        for thread in self._threads:
            thread.join(timeout=5)


@pytest.fixture
def lying_server():
    servers: list[LyingServer] = []

    def start(respond) -> LyingServer:
        server = LyingServer(respond)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def serve_file_range(directory: Path, request: bytes, send, *, honour_range: bool = True) -> None:
    """Answer ``request`` honestly from ``directory`` (a minimal range-capable file server)."""
    line, _, rest = request.decode("latin-1").partition("\r\n")
    path = directory / line.split(" ")[1].lstrip("/").split("?")[0]
    if not path.is_file():
        send(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        return
    data = path.read_bytes()
    for header in rest.split("\r\n"):
        if honour_range and header.lower().startswith("range: bytes="):
            start, end = (int(v) for v in header.split("=", 1)[1].split("-"))
            body = data[start:end + 1]
            send(f"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{end}/{len(data)}\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            return
    send(f"HTTP/1.1 200 OK\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data)


def drip(send, data: bytes, every: float) -> None:
    for byte in data:
        send(bytes([byte]))
        time.sleep(every)
