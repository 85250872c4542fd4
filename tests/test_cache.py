"""FragmentCache core: tiers, promotion, demotion, LRU push-down, spill files, threads, invariants."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_invariants import run_and_check_never_lost, same_bytes
from torch_arbiter.cache import CacheConfig, CacheTier, FragmentCache
from torch_arbiter.errors import (
    ArbiterError,
    CorruptFragmentError,
    InsufficientMemoryError,
    InvalidRequestError,
    UnknownFragmentError,
)

DEVICE, HOST, DISK, REMOTE = CacheTier.DEVICE, CacheTier.HOST, CacheTier.DISK, CacheTier.REMOTE


def _fragment(seed: int, numel: int = 16, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(numel, generator=generator).to(dtype)




@pytest.fixture
def cache(tmp_path):
    with FragmentCache(CacheConfig(device="cpu", spill_dir=tmp_path / "spill")) as fragment_cache:
        yield fragment_cache


def test_get_promotes_to_the_device_and_keeps_the_lower_copy(cache):
    fragment = _fragment(1)
    cache.put("w/0", fragment, HOST)
    assert cache.tiers_of("w/0") == (HOST,)
    got = cache.get("w/0")
    assert same_bytes(got, fragment) and got.device == cache.config.device
    assert cache.tiers_of("w/0") == (DEVICE, HOST)
    stats = cache.stats()
    assert (stats.misses[DEVICE], stats.hits[HOST], stats.promotions, stats.bytes_promoted) == (1, 1, 1, 64)
    cache.get("w/0")
    assert cache.stats().hits[DEVICE] == 1 and cache.stats().hit_rate(DEVICE) == 0.5


def test_unknown_keys_and_bad_arguments_are_typed_errors(cache):
    assert cache.tiers_of("nope") == () and "nope" not in cache
    with pytest.raises(UnknownFragmentError, match="put\\(\\) it first") as raised:
        cache.get("nope")
    assert isinstance(raised.value, KeyError) and isinstance(raised.value, ArbiterError)
    with pytest.raises(UnknownFragmentError):
        cache.demote("nope", DISK)
    with pytest.raises(InvalidRequestError, match="non-empty strings"):
        cache.put("", _fragment(0), HOST)
    with pytest.raises(InvalidRequestError, match="non-empty strings"):
        cache.get(3)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="not a cache tier"):
        cache.put("k", _fragment(0), 7)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="torch.Tensor"):
        cache.put("k", [1, 2, 3], HOST)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="read-only"):
        cache.put("k", _fragment(0), REMOTE)
    assert list(cache.keys()) == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"device_capacity_bytes": -1}, "device_capacity_bytes"),
        ({"host_capacity_bytes": 1.5}, "host_capacity_bytes"),
        ({"disk_capacity_bytes": True}, "disk_capacity_bytes"),
        ({"remote_url": "ftp://example.org/holo"}, "http"),
        ({"remote_timeout": float("nan")}, "remote_timeout"),
        ({"device": "no-such-device"}, "torch device"),
    ],
)
def test_bad_config_is_rejected_with_what_to_do(kwargs, match):
    with pytest.raises(InvalidRequestError, match=match):
        CacheConfig(**kwargs)


def test_demote_writes_the_only_copy_down_before_dropping_it(cache, tmp_path):
    fragment = _fragment(2, dtype=torch.bfloat16)
    cache.put("only-on-device", fragment, DEVICE)
    cache.demote("only-on-device", HOST)
    assert cache.tiers_of("only-on-device") == (HOST,)
    cache.demote("only-on-device", DISK)
    assert cache.tiers_of("only-on-device") == (DISK,)
    assert len(list((tmp_path / "spill").glob("*.safetensors"))) == 1
    assert not list((tmp_path / "spill").glob(".*tmp")), "the atomic write left a temporary file"
    assert same_bytes(cache.get("only-on-device", DEVICE), fragment)
    cache.demote("only-on-device", HOST)  # drops DEVICE, keeps DISK: no write needed
    assert cache.tiers_of("only-on-device") == (DISK,)
    assert cache.stats().demotions == 2


def test_demote_to_read_only_remote_refuses_and_keeps_everything(cache):
    cache.put("k", _fragment(3), HOST)
    with pytest.raises(InvalidRequestError, match="demote it to DISK"):
        cache.demote("k", REMOTE)
    assert cache.tiers_of("k") == (HOST,)


def test_put_replaces_stale_copies_everywhere(cache):
    cache.put("k", _fragment(4), DISK)
    cache.get("k", DEVICE)
    newer = _fragment(5)
    cache.put("k", newer, HOST)
    assert cache.tiers_of("k") == (HOST,)
    assert same_bytes(cache.get("k", DEVICE), newer)


def test_lru_eviction_pushes_down_and_respects_recency(tmp_path):
    config = CacheConfig(device="cpu", device_capacity_bytes=128, host_capacity_bytes=128, spill_dir=tmp_path)
    with FragmentCache(config) as cache:
        a, b, c = _fragment(10), _fragment(11), _fragment(12)  # 64 bytes each
        cache.put("a", a, DEVICE)
        cache.put("b", b, DEVICE)
        cache.get("a", DEVICE)  # a is now the most recently used
        cache.put("c", c, DEVICE)  # evicts b, the least recently used, down to HOST
        assert cache.tiers_of("b") == (HOST,)
        assert cache.tiers_of("a") == (DEVICE,) and cache.tiers_of("c") == (DEVICE,)
        cache.put("d", _fragment(13, numel=32), HOST)  # 128 bytes: b must go to DISK
        assert cache.tiers_of("b") == (DISK,)
        for key, tensor in {"a": a, "b": b, "c": c}.items():
            assert same_bytes(cache.get(key, HOST), tensor)
        stats = cache.stats()
        assert stats.resident_bytes[DEVICE] <= 128 and stats.resident_bytes[HOST] <= 128
        assert stats.evictions >= 2 and stats.demotions >= 2


def test_a_fragment_larger_than_a_tier_is_refused_without_side_effects(tmp_path):
    with FragmentCache(CacheConfig(device="cpu", device_capacity_bytes=100, spill_dir=tmp_path)) as cache:
        cache.put("small", _fragment(20), DEVICE)
        with pytest.raises(InsufficientMemoryError, match="device_capacity_bytes"):
            cache.put("big", _fragment(21, numel=64), DEVICE)
        cache.put("big", _fragment(21, numel=64), HOST)
        with pytest.raises(InsufficientMemoryError):
            cache.get("big", DEVICE)
        assert cache.tiers_of("big") == (HOST,) and cache.tiers_of("small") == (DEVICE,)


def test_a_full_spill_of_unique_fragments_refuses_instead_of_losing_one(tmp_path):
    config = CacheConfig(device="cpu", host_capacity_bytes=64, disk_capacity_bytes=64, spill_dir=tmp_path)
    with FragmentCache(config) as cache:
        first, second = _fragment(30), _fragment(31)
        cache.put("first", first, DISK)
        cache.put("second", second, HOST)
        with pytest.raises(InsufficientMemoryError, match="nowhere below"):
            cache.put("third", _fragment(32), HOST)  # second would have to go to the full disk
        assert cache.tiers_of("first") == (DISK,) and cache.tiers_of("second") == (HOST,)
        assert cache.tiers_of("third") == ()
        assert same_bytes(cache.get("second", HOST), second) and same_bytes(cache.get("first", DISK), first)


def test_evict_drops_one_copy_and_pushes_the_last_one_down(cache):
    fragment = _fragment(40)
    cache.put("k", fragment, HOST)
    cache.get("k", DEVICE)
    cache.evict("k", DEVICE)
    assert cache.tiers_of("k") == (HOST,)
    cache.evict("k", HOST)
    assert cache.tiers_of("k") == (DISK,)
    with pytest.raises(InsufficientMemoryError, match="lowest writable tier"):
        cache.evict("k", DISK)  # nothing below can take the last copy: it stays
    assert cache.tiers_of("k") == (DISK,)
    assert same_bytes(cache.get("k"), fragment)


def test_spill_directory_survives_the_cache_and_is_served_again(tmp_path):
    fragment = _fragment(50, dtype=torch.float16)
    flags = torch.tensor([True, False, True])
    with FragmentCache(CacheConfig(device="cpu", spill_dir=tmp_path)) as cache:
        cache.put("half", fragment, DISK)
        cache.put("flags", flags, DISK)
        cache.put("scalar", torch.tensor(7, dtype=torch.int8), DISK)
    with FragmentCache(CacheConfig(device="cpu", spill_dir=tmp_path)) as reopened:
        assert set(reopened.keys()) == {"half", "flags", "scalar"}
        assert reopened.tiers_of("half") == (DISK,)
        assert same_bytes(reopened.get("half"), fragment) and same_bytes(reopened.get("flags"), flags)
        assert same_bytes(reopened.get("scalar"), torch.tensor(7, dtype=torch.int8))
        assert reopened.stats().resident_bytes[DISK] == 32 + 3 + 1


def test_corrupted_spill_file_raises_corrupt_fragment(tmp_path):
    with FragmentCache(CacheConfig(device="cpu", spill_dir=tmp_path)) as cache:
        cache.put("k", _fragment(60, numel=256), DISK)
        (path,) = tmp_path.glob("*.safetensors")
        data = bytearray(path.read_bytes())
        data[-10] ^= 0xFF  # flip bits inside the tensor bytes
        path.write_bytes(bytes(data))
        with pytest.raises(CorruptFragmentError, match="sha256"):
            cache.get("k", HOST)
        assert cache.tiers_of("k") == (DISK,)


def test_private_spill_directory_is_removed_on_close():
    cache = FragmentCache(CacheConfig(device="cpu"))
    cache.put("k", _fragment(70), DISK)
    spill_dir = cache._stores[DISK].spill_dir
    assert spill_dir.is_dir()
    cache.close()
    assert not spill_dir.exists()
    with pytest.raises(InvalidRequestError, match="closed"):
        cache.get("k")


def test_threads_hammering_the_cache_lose_nothing(tmp_path):
    config = CacheConfig(device="cpu", device_capacity_bytes=256, host_capacity_bytes=512, spill_dir=tmp_path)
    fragments = {f"f{i}": _fragment(100 + i) for i in range(24)}  # 64 bytes each
    errors: list[BaseException] = []
    with FragmentCache(config) as cache:
        for key, tensor in fragments.items():
            cache.put(key, tensor, DISK)

        def worker(offset: int) -> None:
            try:
                for step in range(60):
                    key = f"f{(offset * 7 + step * 5) % 24}"
                    if step % 3 == 2:
                        cache.demote(key, CacheTier(1 + step % 2))
                    else:
                        assert same_bytes(cache.get(key, CacheTier(step % 2)), fragments[key])
            except BaseException as exc:  # surfaced below: a thread's assert is otherwise silent
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert cache.resident_bytes(DEVICE) <= 256 and cache.resident_bytes(HOST) <= 512
        for key, tensor in fragments.items():
            assert same_bytes(cache.get(key, HOST), tensor)


_operation = st.tuples(
    st.sampled_from(["put", "get", "demote", "evict"]),
    st.integers(0, 5),  # key
    st.sampled_from([DEVICE, HOST, DISK]),
    st.sampled_from([4, 16, 40]),  # numel of a put (16 / 64 / 160 bytes)
)


@settings(max_examples=40, deadline=None)
@given(operations=st.lists(_operation, min_size=1, max_size=25), bounded_disk=st.booleans())
def test_property_a_fragment_is_never_lost(tmp_path_factory, operations, bounded_disk):
    """After any sequence of put/get/demote/evict (LRU eviction included, as capacities are
    tiny), every fragment ever put successfully is readable from some tier with identical bytes,
    and no tier holds more than its capacity."""
    capacities = {DEVICE: 160, HOST: 224, DISK: 400 if bounded_disk else None}
    config = CacheConfig(
        device="cpu",
        device_capacity_bytes=capacities[DEVICE],
        host_capacity_bytes=capacities[HOST],
        disk_capacity_bytes=capacities[DISK],
        spill_dir=tmp_path_factory.mktemp("spill"),
    )
    steps = [(operation, f"k{key_index}", tier, _fragment(version, numel) if operation == "put" else None)
             for version, (operation, key_index, tier, numel) in enumerate(operations)]
    with FragmentCache(config) as cache:
        run_and_check_never_lost(cache, steps, {}, capacities)
