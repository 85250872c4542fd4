"""A lying HTTP server on 127.0.0.1 against the REMOTE tier: slow drips, huge or endless bodies,
protocol garbage, wrong ranges, redirects, plain http. Every case ends in a typed error within the
deadline, or in correct bytes."""

from __future__ import annotations

import json
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torch_arbiter.cache import CacheConfig, CacheTier, FragmentCache
from torch_arbiter.cache.remote import RemoteTier
from torch_arbiter.errors import ArbiterError, CorruptFragmentError, FormatError, InvalidRequestError
from torch_arbiter.holo.format import FORMAT_VERSION, INDEX_NAME, HoloCheckpoint

from .conftest import drip, serve_file_range


def _remote(url: str, **options) -> RemoteTier:
    return RemoteTier(url, **{"timeout": 2.0, **options})


def _header(status: str = "200 OK", **fields) -> bytes:
    lines = [f"HTTP/1.1 {status}"] + [f"{k.replace('_', '-')}: {v}" for k, v in fields.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_remote_timeout_is_a_deadline_for_the_whole_request(lying_server, small_holo_dir):
    index = (small_holo_dir / INDEX_NAME).read_bytes()

    def respond(request, send):  # a valid answer, one byte every 0.2 s: each read is fast
        send(_header(Content_Length=len(index)))
        drip(send, index, 0.2)

    server = lying_server(respond)
    start = time.monotonic()
    with pytest.raises(CorruptFragmentError, match="within remote_timeout=1 s"):
        _remote(server.url, timeout=1.0)
    assert time.monotonic() - start < 2.0


def test_slow_headers_are_bounded_too(lying_server):
    server = lying_server(lambda request, send: drip(send, b"HTTP/1.1 200 OK\r\nX: " + b"y" * 1000, 0.1))
    start = time.monotonic()
    with pytest.raises(CorruptFragmentError, match="remote_timeout"):
        _remote(server.url, timeout=0.8)
    assert time.monotonic() - start < 1.8


@pytest.mark.parametrize("length", [2**62, 2**50, 64 << 20 + 1])
def test_a_huge_declared_index_is_refused_before_reading(lying_server, length):
    server = lying_server(lambda request, send: send(_header(Content_Length=length) + b"{" * 1000))
    with pytest.raises(CorruptFragmentError, match="announces"):
        _remote(server.url)


def test_an_endless_close_delimited_index_stops_at_the_cap(lying_server):
    def respond(request, send):
        send(_header(Connection="close"))
        for _ in range(10_000):
            send(b" " * 65536)

    server = lying_server(respond)
    with pytest.raises(CorruptFragmentError, match="longer than the 1048576 bytes"):
        _remote(server.url, max_index_bytes=1 << 20)


@pytest.mark.parametrize("raw, why", [
    (b"garbage\r\n\r\n", "BadStatusLine"),
    (b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 100_000 + b"\r\n\r\n", "LineTooLong"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"a\": 1", "IncompleteRead"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: lots\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "IncompleteRead|ValueError"),
    (b"", "RemoteDisconnected"),
    (b"HTTP/1.1 302 Found\r\nContent-Length: 0\r\n\r\n", "Location"),
    (b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n", "HTTP 500"),
    (b"HTTP/1.1 200 OK\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(200)) + b"\r\n", "headers"),
])
def test_http_garbage_is_a_typed_error(lying_server, raw, why):
    server = lying_server(lambda request, send: send(raw))
    with pytest.raises(CorruptFragmentError, match=why):
        _remote(server.url)


def test_a_hostile_index_from_a_server_is_a_format_error(lying_server):
    bodies = [b"[" * 200_000 + b"]" * 200_000, json.dumps({"format": "torch-arbiter-holo", "version": FORMAT_VERSION,
                                                          "tensors": {}, "fragments": {"x": 1}}).encode()]
    for body in bodies:
        server = lying_server(lambda request, send, body=body: send(_header(Content_Length=len(body)) + body))
        with pytest.raises(FormatError):
            _remote(server.url)


def _honest_then(small_holo_dir, lie):
    """Serve the index honestly and every fragment request through ``lie(request, send, data)``."""
    def respond(request, send):
        if INDEX_NAME.encode() in request.split(b"\r\n", 1)[0]:
            serve_file_range(small_holo_dir, request, send)
        else:
            lie(request, send)
    return respond


def _fragment_range(request: bytes) -> tuple[int, int]:
    header = next(line for line in request.decode().split("\r\n") if line.lower().startswith("range:"))
    start, end = (int(v) for v in header.split("=", 1)[1].split("-"))
    return start, end


@pytest.mark.parametrize("lie, why", [
    ("wrong_start", "instead of"), ("longer", "announces"), ("short", "got .* bytes"),
    ("flipped", "sha256"), ("stall", "remote_timeout"),
])
def test_lying_fragment_answers_are_typed_errors_and_never_cached(lying_server, small_holo_dir, tmp_path, lie, why):
    data = (small_holo_dir / "fragments-00000.safetensors").read_bytes()

    def answer(request, send):
        start, end = _fragment_range(request)
        body = data[start:end + 1]
        if lie == "wrong_start":
            send(_header("206 Partial Content", Content_Range=f"bytes {start + 1}-{end}/{len(data)}",
                         Content_Length=len(body)) + body)
        elif lie == "longer":
            send(_header("206 Partial Content", Content_Range=f"bytes {start}-{end}/{len(data)}",
                         Content_Length=len(body) + 10) + body + b"x" * 10)
        elif lie == "short":
            send(_header("206 Partial Content", Content_Range=f"bytes {start}-{end}/{len(data)}",
                         Connection="close") + body[:-3])
        elif lie == "flipped":
            send(_header("206 Partial Content", Content_Range=f"bytes {start}-{end}/{len(data)}",
                         Content_Length=len(body)) + bytes([body[0] ^ 1]) + body[1:])
        else:
            send(_header("206 Partial Content", Content_Range=f"bytes {start}-{end}/{len(data)}",
                         Content_Length=len(body)))
            time.sleep(3)

    server = lying_server(_honest_then(small_holo_dir, answer))
    config = CacheConfig(device="cpu", remote_url=server.url, remote_timeout=1.0, spill_dir=tmp_path)
    with FragmentCache(config) as cache:
        key = next(k for k in cache.keys() if k.endswith("::hi"))
        with pytest.raises(CorruptFragmentError, match=why):
            cache.get(key, CacheTier.DEVICE)
        assert cache.tiers_of(key) == (CacheTier.REMOTE,)


def test_a_server_that_ignores_range_still_gives_the_right_bytes(lying_server, small_holo_dir, tmp_path):
    server = lying_server(lambda request, send: serve_file_range(small_holo_dir, request, send, honour_range=False))
    checkpoint = HoloCheckpoint.open(small_holo_dir)
    with FragmentCache(CacheConfig(device="cpu", remote_url=server.url, spill_dir=tmp_path)) as cache:
        for fid in checkpoint.fragment_ids():
            assert torch.equal(cache.get(fid, CacheTier.DEVICE), checkpoint.read_fragment(fid))


def test_plain_http_is_refused_for_other_hosts_unless_allowed():
    for url in ("http://example.com/ckpt/", "http://10.0.0.1:8000/", "http://[2001:db8::1]/x/"):
        with pytest.raises(InvalidRequestError, match="allow_insecure"):
            CacheConfig(device="cpu", remote_url=url)
        CacheConfig(device="cpu", remote_url=url, allow_insecure=True)  # the user opted in
    for url in ("http://127.0.0.1:1/", "http://localhost:1/", "http://[::1]:1/", "https://example.com/"):
        CacheConfig(device="cpu", remote_url=url)
    for url in ("ftp://x/", "http://", "file:///etc/", "http://h:notaport/", 42):
        with pytest.raises(InvalidRequestError):
            CacheConfig(device="cpu", remote_url=url)
    with pytest.raises(InvalidRequestError, match="allow_insecure"):
        CacheConfig(device="cpu", allow_insecure="yes")


def test_cross_host_redirects_are_refused_unless_allowed(lying_server, small_holo_dir):
    honest = lying_server(lambda request, send: serve_file_range(small_holo_dir, request, send))
    elsewhere = f"http://localhost:{honest.port}/"  # same machine, another host name

    def redirect(request, send):
        path = request.split(b" ")[1].decode()
        send(_header("302 Found", Location=elsewhere.rstrip("/") + path, Content_Length=0))

    server = lying_server(redirect)
    with pytest.raises(CorruptFragmentError, match="allow_cross_host_redirects"):
        _remote(server.url)
    remote = _remote(server.url, allow_cross_host_redirects=True)
    assert set(remote.source_keys()) == set(HoloCheckpoint.open(small_holo_dir).fragment_ids())
    loop = lying_server(lambda request, send: send(_header("302 Found", Location="/again", Content_Length=0)))
    with pytest.raises(CorruptFragmentError, match="redirects"):
        _remote(loop.url)
    insecure = lying_server(lambda request, send: send(_header("302 Found", Location="http://example.com/",
                                                               Content_Length=0)))
    with pytest.raises(CorruptFragmentError, match="allow_insecure"):
        _remote(insecure.url, allow_cross_host_redirects=True)


_STATUS = st.sampled_from([b"HTTP/1.1 200 OK", b"HTTP/1.1 206 Partial Content", b"HTTP/1.0 404 Nope",
                           b"HTTP/1.1 301 Moved", b"HTTP/9.9 200 OK", b"ICY 200 OK", b"HTTP/1.1 abc"])
_HEADER = st.one_of(
    st.sampled_from([b"Content-Length: 0", b"Content-Length: 5", b"Content-Length: 99999999999999999999",
                     b"Transfer-Encoding: chunked", b"Content-Range: bytes 0-1/2", b"Location: /x",
                     b"Location: http://evil.example/", b"Connection: close"]),
    st.binary(max_size=40).filter(lambda b: b"\r\n\r\n" not in b))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(status=_STATUS, headers=st.lists(_HEADER, max_size=4), body=st.binary(max_size=300))
def test_any_http_answer_to_the_index_request_is_a_typed_error_or_an_index(lying_server, status, headers, body):
    raw = b"\r\n".join([status, *headers]) + b"\r\n\r\n" + body
    server = lying_server(lambda request, send: send(raw))
    try:
        _remote(server.url, timeout=1.0)
    except ArbiterError:
        pass
    finally:
        server.close()


def test_an_ipv6_loopback_server_is_reached():
    import socket
    import threading

    try:
        server = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback here")

    def answer():
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 404 Not Here\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    with server, pytest.raises(CorruptFragmentError, match="HTTP 404"):
        _remote(f"http://[::1]:{server.getsockname()[1]}/")
    thread.join(timeout=5)
