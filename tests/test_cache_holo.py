"""FragmentCache over a real holo checkpoint: DISK through HoloCheckpoint, REMOTE through a real
HTTP server on 127.0.0.1 with Range support."""

from __future__ import annotations

import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from cache_invariants import run_and_check_never_lost, same_bytes
from range_server import serve as _serve
from torch_arbiter.cache import CacheConfig, CacheTier, FragmentCache
from torch_arbiter.errors import CorruptFragmentError, FormatError, InsufficientMemoryError, InvalidRequestError
from torch_arbiter.holo import HoloTensor
from torch_arbiter.holo.format import INDEX_NAME, HoloCheckpoint, save_holo

DEVICE, HOST, DISK, REMOTE = CacheTier.DEVICE, CacheTier.HOST, CacheTier.DISK, CacheTier.REMOTE


@pytest.fixture(scope="module")
def holo_dir(tmp_path_factory) -> Path:
    """A real holo checkpoint of two encoded weights and one plain tensor."""
    generator = torch.Generator().manual_seed(0)
    directory = tmp_path_factory.mktemp("holo") / "checkpoint"
    save_holo(
        directory,
        {
            "layer.weight": HoloTensor.encode(torch.randn(128, 96, generator=generator)),
            "head.weight": HoloTensor.encode(torch.randn(64, 128, generator=generator).to(torch.bfloat16)),
            "layer.bias": torch.randn(64, generator=generator),
        },
    )
    return directory


@pytest.fixture
def served(holo_dir):
    server, url = _serve(holo_dir)
    yield server, url
    server.shutdown()
    server.server_close()




def test_disk_tier_serves_the_holo_checkpoint_read_only(holo_dir, tmp_path):
    checkpoint = HoloCheckpoint.open(holo_dir)
    fragment_ids = list(checkpoint.fragment_ids())
    assert len(fragment_ids) > 3
    config = CacheConfig(device="cpu", holo_dir=holo_dir, spill_dir=tmp_path / "spill")
    with FragmentCache(config) as cache:
        assert set(cache.keys()) == set(fragment_ids)
        for fid in fragment_ids:
            assert cache.tiers_of(fid) == (DISK,)
            assert same_bytes(cache.get(fid, DEVICE), checkpoint.read_fragment(fid))
            assert cache.tiers_of(fid) == (DEVICE, DISK)
            cache.demote(fid, DISK)  # the checkpoint already holds it: nothing is written
            assert cache.tiers_of(fid) == (DISK,)
        assert not list((tmp_path / "spill").iterdir())
        assert cache.stats().resident_bytes[DISK] == 0
        assert cache.stats().entries[DISK] == len(fragment_ids)
        with pytest.raises(InvalidRequestError, match="read-only DISK source"):
            cache.put(fragment_ids[0], checkpoint.read_fragment(fragment_ids[0]), HOST)
    with pytest.raises(FormatError, match="not a holo checkpoint"):
        FragmentCache(CacheConfig(device="cpu", holo_dir=tmp_path / "spill"))


def test_remote_tier_fetches_each_fragment_with_one_range_request(holo_dir, served, tmp_path):
    server, url = served
    checkpoint = HoloCheckpoint.open(holo_dir)
    config = CacheConfig(device="cpu", remote_url=url, spill_dir=tmp_path / "spill", stage_remote_on_disk=False)
    with FragmentCache(config) as cache:
        assert server.requests == [(f"/{INDEX_NAME}", None)]
        for fid in checkpoint.fragment_ids():
            assert cache.tiers_of(fid) == (REMOTE,)
            assert same_bytes(cache.get(fid, HOST), checkpoint.read_fragment(fid))
            entry = checkpoint.fragment_entry(fid)
            path, byte_range = server.requests[-1]
            assert path == "/" + entry["file"]
            assert byte_range == f"bytes={entry['offset']}-{entry['offset'] + entry['length'] - 1}"
            assert cache.tiers_of(fid) == (HOST, REMOTE)
        assert len(server.requests) == 1 + len(list(checkpoint.fragment_ids()))
        fetched = cache.stats()
        assert fetched.hits[REMOTE] == len(list(checkpoint.fragment_ids())) and fetched.misses[DISK] == fetched.hits[REMOTE]


def test_remote_fragments_are_staged_on_disk_and_then_read_locally(holo_dir, served, tmp_path):
    server, url = served
    checkpoint = HoloCheckpoint.open(holo_dir)
    fid = next(iter(checkpoint.fragment_ids()))
    config = CacheConfig(device="cpu", remote_url=url, spill_dir=tmp_path / "spill")
    with FragmentCache(config) as cache:
        cache.get(fid, DEVICE)
        assert cache.tiers_of(fid) == (DEVICE, DISK, REMOTE)
        cache.demote(fid, DISK)
        requests_before = len(server.requests)
        assert same_bytes(cache.get(fid, DEVICE), checkpoint.read_fragment(fid))
        assert len(server.requests) == requests_before, "a staged fragment went back to the network"


def test_server_ignoring_range_still_gives_the_right_bytes(holo_dir, tmp_path):
    server, url = _serve(holo_dir, honour_range=False)
    try:
        checkpoint = HoloCheckpoint.open(holo_dir)
        with FragmentCache(CacheConfig(device="cpu", remote_url=url, spill_dir=tmp_path)) as cache:
            for fid in checkpoint.fragment_ids():
                assert same_bytes(cache.get(fid, HOST), checkpoint.read_fragment(fid))
    finally:
        server.shutdown()
        server.server_close()


def test_corrupted_remote_bytes_raise_corrupt_fragment_naming_the_url(holo_dir, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(holo_dir, damaged)
    checkpoint = HoloCheckpoint.open(damaged)
    fid = next(iter(checkpoint.fragment_ids()))
    entry = checkpoint.fragment_entry(fid)
    data_file = damaged / entry["file"]
    data = bytearray(data_file.read_bytes())
    data[entry["offset"] + entry["length"] // 2] ^= 0x5A
    data_file.write_bytes(bytes(data))
    server, url = _serve(damaged)
    try:
        with FragmentCache(CacheConfig(device="cpu", remote_url=url, spill_dir=tmp_path / "spill")) as cache:
            with pytest.raises(CorruptFragmentError, match=re.escape(url.rstrip("/"))):
                cache.get(fid, DEVICE)
            assert cache.tiers_of(fid) == (REMOTE,), "a corrupt fragment must not be cached"
    finally:
        server.shutdown()
        server.server_close()


def test_unreachable_or_wrong_servers_are_clear_errors(holo_dir, tmp_path):
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with pytest.raises(CorruptFragmentError, match="could not fetch the holo index"):
        FragmentCache(CacheConfig(device="cpu", remote_url=f"http://127.0.0.1:{closed_port}/", spill_dir=tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    server, url = _serve(empty)
    try:
        with pytest.raises(CorruptFragmentError, match="HTTP 404"):
            FragmentCache(CacheConfig(device="cpu", remote_url=url, spill_dir=tmp_path))
        (empty / INDEX_NAME).write_text("{not json")
        with pytest.raises(FormatError, match="holo index"):
            FragmentCache(CacheConfig(device="cpu", remote_url=url, spill_dir=tmp_path))
    finally:
        server.shutdown()
        server.server_close()


def test_slow_server_times_out_instead_of_hanging(holo_dir, tmp_path):
    server, url = _serve(holo_dir)
    try:
        with FragmentCache(CacheConfig(device="cpu", remote_url=url, remote_timeout=0.3, spill_dir=tmp_path)) as cache:
            fid = next(iter(cache.keys()))
            server.delay = 3.0
            started = time.perf_counter()
            with pytest.raises(CorruptFragmentError, match="could not fetch fragment"):
                cache.get(fid, HOST)
            assert time.perf_counter() - started < 2.5
    finally:
        server.shutdown()
        server.server_close()


def test_bounded_disk_drops_only_copies_the_remote_still_holds(holo_dir, served, tmp_path):
    _, url = served
    checkpoint = HoloCheckpoint.open(holo_dir)
    fids = sorted(checkpoint.fragment_ids(), key=lambda fid: checkpoint.fragment_entry(fid)["length"])
    capacity = checkpoint.fragment_entry(fids[-1])["length"]
    config = CacheConfig(device="cpu", remote_url=url, disk_capacity_bytes=capacity, spill_dir=tmp_path / "spill")
    with FragmentCache(config) as cache:
        unique = torch.arange(4, dtype=torch.uint8)
        for fid in fids:
            cache.get(fid, HOST)
            cache.demote(fid, DISK)  # REMOTE holds it: the HOST copy just goes
            assert cache.resident_bytes(DISK) <= capacity
        cache.put("local-only", unique, HOST)
        cache.demote("local-only", DISK)  # evicts staged remote copies to make room
        assert cache.tiers_of("local-only") == (DISK,)
        assert same_bytes(cache.get("local-only", HOST), unique)
        with pytest.raises(InsufficientMemoryError):
            cache.put("too-big", torch.zeros(capacity + 1, dtype=torch.uint8), DISK)
        for fid in fids:
            assert same_bytes(cache.get(fid, HOST), checkpoint.read_fragment(fid))


def test_get_many_overlaps_remote_fetches(holo_dir, tmp_path):
    server, url = _serve(holo_dir, delay=0.2)
    try:
        checkpoint = HoloCheckpoint.open(holo_dir)
        fids = checkpoint.fragment_ids()
        with FragmentCache(CacheConfig(device="cpu", remote_url=url, spill_dir=tmp_path)) as cache:
            got = cache.get_many(fids, DEVICE, max_workers=4)
            assert list(got) == fids
            assert all(same_bytes(got[fid], checkpoint.read_fragment(fid)) for fid in fids)
            assert server.max_in_flight > 1, "fetches ran one after another"
            assert all(cache.tiers_of(fid) == (DEVICE, DISK, REMOTE) for fid in fids)
            with pytest.raises(InvalidRequestError, match="max_workers"):
                cache.get_many(fids, max_workers=0)
    finally:
        server.shutdown()
        server.server_close()


def test_concurrent_gets_of_one_remote_fragment_share_one_request(holo_dir, tmp_path):
    server, url = _serve(holo_dir, delay=0.3)
    try:
        checkpoint = HoloCheckpoint.open(holo_dir)
        fid = checkpoint.fragment_ids()[0]
        config = CacheConfig(device="cpu", remote_url=url, spill_dir=tmp_path, stage_remote_on_disk=False)
        with FragmentCache(config) as cache:
            results: list[torch.Tensor] = []
            readers = [threading.Thread(target=lambda tier=tier: results.append(cache.get(fid, tier)))
                       for tier in (HOST, DEVICE, HOST)]
            for reader in readers:
                reader.start()
            for reader in readers:
                reader.join()
            assert len(results) == 3 and all(same_bytes(r, checkpoint.read_fragment(fid)) for r in results)
            assert [r for r in server.requests if r[1] is not None] == [server.requests[-1]], "fetched more than once"
            assert cache.tiers_of(fid) == (DEVICE, HOST, REMOTE)
    finally:
        server.shutdown()
        server.server_close()


def test_a_slow_fetch_does_not_block_other_calls(holo_dir, tmp_path):
    server, url = _serve(holo_dir)
    try:
        checkpoint = HoloCheckpoint.open(holo_dir)
        fid = checkpoint.fragment_ids()[0]
        config = CacheConfig(device="cpu", remote_url=url, spill_dir=tmp_path, stage_remote_on_disk=False)
        with FragmentCache(config) as cache:
            server.delay = 0.8
            result: list[torch.Tensor] = []
            fetcher = threading.Thread(target=lambda: result.append(cache.get(fid, HOST)))
            fetcher.start()
            while not server.in_flight:
                time.sleep(0.01)
            cache.put("local", torch.ones(4), DEVICE)
            assert same_bytes(cache.get("local", HOST), torch.ones(4))
            cache.demote("local", DISK)
            assert cache.tiers_of(fid) == (REMOTE,)
            assert fetcher.is_alive(), "the fetch finished before the calls above: the check proves nothing"
            fetcher.join()
            assert same_bytes(result[0], checkpoint.read_fragment(fid))
            assert cache.tiers_of(fid) == (HOST, REMOTE)
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def module_server(holo_dir):
    server, url = _serve(holo_dir)
    yield url
    server.shutdown()
    server.server_close()


_LOCAL_SIZES = {"local0": 64, "local1": 1024, "local2": 4096}  # float32 elements


@settings(max_examples=30, deadline=None)
@given(
    operations=st.lists(
        st.tuples(
            st.sampled_from(["put", "get", "demote", "evict"]),
            st.integers(0, 13),  # 11 checkpoint fragments, then the 3 local keys
            st.sampled_from([DEVICE, HOST, DISK]),
        ),
        min_size=1,
        max_size=20,
    ),
    source_over_http=st.booleans(),
)
def test_property_nothing_is_lost_with_checkpoint_sources(
    holo_dir, module_server, tmp_path_factory, operations, source_over_http
):
    """The never-lost invariant with a holo checkpoint as the DISK source or over HTTP as the
    REMOTE source, tiny tiers (the 48 KiB fragment fits none but DISK), a bounded spill and
    staging: every checkpoint fragment and every local fragment put stays readable, with the
    checkpoint's bytes or the bytes put, from every tier that claims it."""
    checkpoint = HoloCheckpoint.open(holo_dir)
    fids = checkpoint.fragment_ids()
    keys = [*fids, *_LOCAL_SIZES]
    capacities = {DEVICE: 20_000, HOST: 30_000, DISK: 24_000}
    config = CacheConfig(
        device="cpu",
        device_capacity_bytes=capacities[DEVICE],
        host_capacity_bytes=capacities[HOST],
        disk_capacity_bytes=capacities[DISK],
        spill_dir=tmp_path_factory.mktemp("spill"),
        holo_dir=None if source_over_http else holo_dir,
        remote_url=module_server if source_over_http else None,
    )
    expected = {fid: checkpoint.read_fragment(fid) for fid in fids}
    steps = []
    for step, (operation, key_index, tier) in enumerate(operations):
        key = keys[key_index]
        local = operation == "put" and key not in fids  # a checkpoint fragment is never put
        steps.append((operation, key, tier, torch.full((_LOCAL_SIZES[key],), float(step)) if local else None))
    with FragmentCache(config) as cache:
        run_and_check_never_lost(cache, steps, expected, capacities)


def test_patch_from_a_url_returns_at_its_floor_and_rises_as_the_rest_streams_in(tmp_path):
    from torch import nn

    from torch_arbiter import Arbiter, ArbiterConfig
    from torch_arbiter.hooks import patch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)).eval()
    reference = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)).eval()
    reference.load_state_dict(model.state_dict())
    save_holo(tmp_path / "holo", {name: HoloTensor.encode(model.get_parameter(name).detach())
                                  for name in ("0.weight", "2.weight")})
    server, url = _serve(tmp_path / "holo", delay=0.3)  # every fetch takes 0.3 s
    arbiter = Arbiter(ArbiterConfig(vram_bytes=64 << 20, status_interval_s=None))
    try:
        managed = patch(model, arbiter, activation_bytes=0, progress=False, holo_dir=url)
        # Granted the whole model, it returned once its floor was in: the rest is still on the server.
        assert managed.quality == managed.min_quality < 1.0 and managed.allocation.quality == 1.0
        x = torch.randn(2, 256)
        assert not torch.equal(model(x), reference(x))  # it runs, at its floor
        assert arbiter.wait_until_settled(30)
        assert managed.quality == 1.0 and torch.equal(model(x), reference(x))
        managed.unpatch()
    finally:
        arbiter.close()
        server.shutdown()
        server.server_close()
