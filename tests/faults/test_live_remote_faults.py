"""Lying servers and killed downloads through the live path: ``from_holo_pretrained(url)`` of a
converted tiny Llama, with the arbiter's cache and prefetcher, against a real server on 127.0.0.1.

A lie about a floor fragment fails the load with a typed error naming the URL, within the
deadline, leaving nothing registered; a lie after the floor leaves the model running at the level
it has, with a warning, the failure counted and the arbiter settled; a server that ignores Range
still works; a process killed in the middle of a download leaves nothing a new cache takes as valid.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from cache_invariants import same_bytes
from range_server import floor_ranges, serve, stop
from torch_arbiter import Arbiter, ArbiterConfig, CacheConfig
from torch_arbiter.cache import CacheTier, FragmentCache
from torch_arbiter.errors import CorruptFragmentError, InvalidRequestError
from torch_arbiter.holo.format import INDEX_NAME, HoloCheckpoint
from torch_arbiter.hooks import HoloTensorConfig, from_holo_pretrained, managed_model_of

from .conftest import serve_file_range

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def arbiter(request, tmp_path):
    """A virtual 2 GiB CPU arbiter whose prefetcher retries quickly (the backoff is not what these
    tests measure). Its remote reads have a deadline of ``request.param`` seconds: 30 unless a
    test sets it (indirect parametrisation), as a loaded 2-core machine can take over a second
    to answer a read that nothing holds back."""
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(2, cache=CacheConfig(
        device="cpu", spill_dir=tmp_path / "spill", remote_timeout=getattr(request, "param", 30.0))))
    arbiter.prefetcher.backoff_s = 0.01
    yield arbiter
    arbiter.close()


def _requested(request: bytes) -> tuple[str, int | None]:
    """The path and first byte of a GET (None without a Range header)."""
    head = request.decode("latin-1").split("\r\n")
    path = head[0].split(" ")[1]
    for line in head[1:]:
        if line.lower().startswith("range: bytes="):
            return path, int(line.split("=", 1)[1].split("-")[0])
    return path, None


def _layer_floor(holo_dir: Path) -> set[tuple[str, int]]:
    """The floor fragments of the swapped layers (2-D weights): read by ``patch()`` itself."""
    index = json.loads((holo_dir / INDEX_NAME).read_text())
    return {(f"/{e['file']}", e["offset"]) for e in index["fragments"].values()
            if e["level"] == 1 and len(index["tensors"][e["tensor"]]["shape"]) == 2}


def _wrong_bytes(holo_dir, request, send, path, start):
    line = [h for h in request.decode("latin-1").split("\r\n") if h.lower().startswith("range:")][0]
    end = int(line.split("-")[-1])
    data = (holo_dir / path.lstrip("/")).read_bytes()
    body = bytes([data[start] ^ 0xFF]) + data[start + 1:end + 1]
    send(f"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{end}/{len(data)}\r\n"
         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)


def _short_body(holo_dir, request, send, path, start):
    line = [h for h in request.decode("latin-1").split("\r\n") if h.lower().startswith("range:")][0]
    end = int(line.split("-")[-1])
    data = (holo_dir / path.lstrip("/")).read_bytes()
    send(f"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{end}/{len(data)}\r\n"
         f"Content-Length: {end - start + 1}\r\nConnection: close\r\n\r\n".encode() + data[start:start + 8])


def _status_500(holo_dir, request, send, path, start):
    send(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


def _hang(holo_dir, request, send, path, start):
    for _ in range(40):  # says nothing for 4 s (the deadline is 1 s); ends when the server closes
        time.sleep(0.1)
        send(b"")


LIES = {  # how the server lies, what the error says, the deadline of the reads
    "wrong bytes": (_wrong_bytes, "sha256|checksum", 30.0),
    "short body": (_short_body, "IncompleteRead|ended after", 30.0),
    "HTTP 500": (_status_500, "HTTP 500", 30.0),
    "hang past the timeout": (_hang, "within remote_timeout=1 s", 1.0),
}


def _lying_about(lying_server, holo_dir, targets, lie):
    def respond(request, send):
        path, start = _requested(request)
        if start is not None and (path, start) in targets:
            lie(holo_dir, request, send, path, start)
        else:
            serve_file_range(holo_dir, request, send)

    return lying_server(respond)


@pytest.mark.parametrize(("lie", "arbiter"), [(lie, LIES[lie][2]) for lie in sorted(LIES)],
                         ids=sorted(LIES), indirect=["arbiter"])
def test_a_lie_about_a_floor_fragment_fails_the_load_naming_the_url(lie, lying_server, tiny_llama_holo, arbiter):
    respond, message, _ = LIES[lie]
    server = _lying_about(lying_server, tiny_llama_holo, _layer_floor(tiny_llama_holo), respond)
    started = time.monotonic()
    with pytest.raises(CorruptFragmentError, match=message) as caught:
        from_holo_pretrained(server.url, quantization_config=HoloTensorConfig(arbiter=arbiter))
    assert server.url.rstrip("/") in str(caught.value)
    assert time.monotonic() - started < 10
    assert arbiter.state().workloads == ()  # nothing left registered, nothing held
    assert arbiter.cache.resident_bytes(CacheTier.DEVICE) == 0


def test_a_lie_about_an_exact_tensor_fails_the_load_too(lying_server, tiny_llama_holo, arbiter):
    norms = floor_ranges(tiny_llama_holo) - _layer_floor(tiny_llama_holo)
    server = _lying_about(lying_server, tiny_llama_holo, norms, _status_500)
    with pytest.raises(CorruptFragmentError, match="HTTP 500") as caught:
        from_holo_pretrained(server.url, quantization_config=HoloTensorConfig(arbiter=arbiter))
    assert server.url.rstrip("/") in str(caught.value)
    assert arbiter.state().workloads == ()


def test_the_floor_error_is_reported_when_undoing_the_patch_fails_too(lying_server, tiny_llama_holo, arbiter):
    """Every fragment of the swapped layers fails: the floor read stops ``patch()``, and undoing
    it cannot read the exact weights back either. The floor's error is the one raised, and the
    cache and the arbiter are left with nothing of the model."""
    index = json.loads((tiny_llama_holo / INDEX_NAME).read_text())
    layers = {(f"/{e['file']}", e["offset"]) for e in index["fragments"].values()
              if len(index["tensors"][e["tensor"]]["shape"]) == 2}
    server = _lying_about(lying_server, tiny_llama_holo, layers, _status_500)
    with pytest.raises(CorruptFragmentError, match="HTTP 500") as caught:
        from_holo_pretrained(server.url, quantization_config=HoloTensorConfig(arbiter=arbiter))
    assert "::exact" not in str(caught.value), "the undo's error hid the floor's"
    assert arbiter.state().workloads == ()
    assert arbiter.cache.resident_bytes(CacheTier.DEVICE) == 0
    assert arbiter.cache.resident_bytes(CacheTier.HOST) == 0


def test_a_redirect_to_another_host_is_refused_naming_both(lying_server, tiny_llama_holo, arbiter):
    other, other_url = serve(tiny_llama_holo)  # a real server with the same files, elsewhere

    def redirect(holo_dir, request, send, path, start):
        send(f"HTTP/1.1 302 Found\r\nLocation: {other_url.rstrip('/')}{path}\r\nContent-Length: 0\r\n"
             "Connection: close\r\n\r\n".encode())

    try:
        server = _lying_about(lying_server, tiny_llama_holo, _layer_floor(tiny_llama_holo), redirect)
        with pytest.raises(CorruptFragmentError, match="another host") as caught:
            from_holo_pretrained(server.url, quantization_config=HoloTensorConfig(arbiter=arbiter))
        assert server.url.rstrip("/") in str(caught.value) and "allow_cross_host_redirects" in str(caught.value)
        assert not [r for r in other.requests if r[1] is not None], "the redirect was followed"
        assert arbiter.state().workloads == ()
    finally:
        stop(other)


def test_plain_http_to_another_host_is_refused_before_any_request(arbiter):
    with pytest.raises(InvalidRequestError, match="allow_insecure"):
        from_holo_pretrained("http://example.invalid/holo/", quantization_config=HoloTensorConfig(arbiter=arbiter))


def test_a_server_that_ignores_range_still_loads_the_model(tiny_llama_dir, tiny_llama_holo, arbiter):
    _, tokens, expected = tiny_llama_dir
    server, url = serve(tiny_llama_holo, honour_range=False)
    try:
        model = from_holo_pretrained(url, quantization_config=HoloTensorConfig(arbiter=arbiter))
        managed = managed_model_of(model)
        try:
            assert arbiter.wait_until_settled(30) and managed.quality == 1.0
            with torch.no_grad():
                assert torch.equal(model(tokens).logits, expected)
        finally:
            managed.unpatch()
    finally:
        stop(server)


def test_a_failure_after_the_floor_leaves_the_model_running_where_it_is(
        tiny_llama_dir, tiny_llama_holo, arbiter, caplog):
    _, tokens, expected = tiny_llama_dir
    floor = floor_ranges(tiny_llama_holo)
    server, url = serve(tiny_llama_holo,
                        intercept=lambda path, start: 500 if start is not None and (path, start) not in floor else None)
    try:
        with caplog.at_level(logging.WARNING, logger="torch_arbiter.cache.prefetch"):
            model = from_holo_pretrained(url, quantization_config=HoloTensorConfig(arbiter=arbiter))
            managed = managed_model_of(model)
            try:
                assert arbiter.prefetcher.idle(managed.holder, 30)
                assert arbiter.wait_until_settled(10), "the arbiter is stuck on a grant that cannot land"
                failed = arbiter.prefetcher.failed(managed.holder)
                assert failed and managed.cache_stats().prefetch.failed == len(failed)
                assert managed.quality == managed.available_quality == managed.min_quality
                assert managed.allocation.quality == 1.0  # granted, but it runs at what it has
                held = arbiter.held_bytes()[managed.allocation.id]
                assert held == managed.resident_bytes + managed.allocation.activation_bytes
                assert managed.resident_bytes == managed.bytes_at(managed.min_quality)
                with torch.no_grad():
                    logits = model(tokens).logits
                assert torch.isfinite(logits).all() and not torch.equal(logits, expected)
            finally:
                server.intercept = None  # unpatch() reads the exact weights back
                managed.unpatch()
        assert any("could not be fetched" in r.getMessage() and url.rstrip("/") in r.getMessage()
                   for r in caplog.records)
    finally:
        stop(server)


_STAGER = """
import sys
from torch_arbiter.cache import CacheConfig, CacheTier, FragmentCache
cache = FragmentCache(CacheConfig(device="cpu", spill_dir=sys.argv[1]))
source = cache.attach(sys.argv[2])
for key in source.keys.values():
    cache.get(key, CacheTier.DISK)
    print("staged", key, flush=True)
"""


def test_a_process_killed_mid_download_leaves_nothing_taken_as_valid(lying_server, tiny_llama_holo, tmp_path):
    complete = 3
    fragment_requests = []
    dripping = threading.Event()

    def respond(request, send):
        path, start = _requested(request)
        if start is None:
            serve_file_range(tiny_llama_holo, request, send)
            return
        fragment_requests.append(start)
        if len(fragment_requests) <= complete:
            serve_file_range(tiny_llama_holo, request, send)
            return
        data = (tiny_llama_holo / path.lstrip("/")).read_bytes()
        end = int(request.decode("latin-1").split("Range: bytes=")[1].split("\r\n")[0].split("-")[1])
        send(f"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{end}/{len(data)}\r\n"
             f"Content-Length: {end - start + 1}\r\nConnection: close\r\n\r\n".encode())
        send(data[start:start + (end - start + 1) // 2])  # half of it, then a drip
        dripping.set()
        for byte in data[start + (end - start + 1) // 2:end + 1]:
            send(bytes([byte]))
            time.sleep(0.05)

    server = lying_server(respond)
    spill = tmp_path / "spill"
    child = subprocess.Popen([sys.executable, "-c", _STAGER, str(spill), server.url], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert dripping.wait(60), child.stderr.read() if child.poll() is not None else "no drip started"
        time.sleep(0.2)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        staged = [line.split()[1] for line in child.stdout.read().splitlines() if line.startswith("staged")]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    assert len(staged) == complete

    checkpoint = HoloCheckpoint.open(tiny_llama_holo)
    honest, url = serve(tiny_llama_holo)
    try:
        with FragmentCache(CacheConfig(device="cpu", spill_dir=spill)) as cache:
            # exactly the fragments that were complete are taken from the spill; nothing else
            assert {k for k in cache.keys()} == set(staged)
            assert cache.resident_bytes(CacheTier.DISK) == sum(cache.fragment_nbytes(k) for k in staged)
            source = cache.attach(url)
            for fid, key in source.keys.items():
                assert same_bytes(cache.get(key, CacheTier.HOST), checkpoint.read_fragment(fid))
            fetched = [r for r in honest.requests if r[1] is not None]
            assert len(fetched) == len(set(source.keys.values())) - complete  # the rest came again
    finally:
        stop(honest)
