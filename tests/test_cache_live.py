"""The live path through the arbiter's FragmentCache, with real parts: a converted tiny Llama served
by a real HTTP server on 127.0.0.1 (Range support), the arbiter's prefetcher, real threads.

What is shown: a model loaded from a URL or a directory runs at its floor while the rest streams in,
never above what has arrived nor above its grant, and ends bit-identical to the dense model; a
checkpoint of other weights is refused; identical fragments are one key, held and charged once,
and the charge follows when a sharer leaves; a bounded HOST spills and loses nothing; a lowered
target cancels queued fetches; the counters say what moved; concurrent readers agree; and the
cache's holder bookkeeping keeps its invariants under any sequence of operations.
"""

from __future__ import annotations

import random
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cache_invariants import same_bytes
from range_server import floor_ranges, serve, stop
from torch_arbiter import Arbiter, ArbiterConfig, CacheConfig, Priority, WorkloadType
from torch_arbiter.cache import CacheTier, FragmentCache
from torch_arbiter.errors import PatchError
from torch_arbiter.holo.format import HoloCheckpoint
from torch_arbiter.hooks import HoloTensorConfig, from_holo_pretrained, managed_model_of, patch

DEVICE, HOST, DISK, REMOTE = CacheTier.DEVICE, CacheTier.HOST, CacheTier.DISK, CacheTier.REMOTE


@pytest.fixture
def make_arbiter(tmp_path):
    """``make_arbiter(**cache_options)``: an arbiter on a virtual 4 GiB CPU device (room for two
    LLMs' 1 GiB activation reserves) whose cache spills under ``tmp_path``; closed after the test."""
    made = []

    def make(gb: float = 4, **cache_options) -> Arbiter:
        options = {"device": "cpu", "spill_dir": tmp_path / f"spill{len(made)}", **cache_options}
        arbiter = Arbiter(ArbiterConfig.for_vram_gb(gb, cache=CacheConfig(**options)))
        made.append(arbiter)
        return arbiter

    yield make
    for arbiter in made:
        arbiter.close()


def _floor_only_until(gate: threading.Event, holo_dir):
    """A server ``intercept`` that holds back every fragment above the floor until ``gate`` is set."""
    floor = floor_ranges(holo_dir)

    def hold_back(path, start):
        if start is not None and (path, start) not in floor:
            gate.wait(30)
        return None

    return hold_back


@pytest.fixture
def gated(tiny_llama_holo):
    """The converted tiny Llama served over HTTP, its non-floor fragments held back until
    ``gate.set()``: ``(server, url, gate)``."""
    gate = threading.Event()
    server, url = serve(tiny_llama_holo, intercept=_floor_only_until(gate, tiny_llama_holo))
    yield server, url, gate
    gate.set()
    stop(server)


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def _load(location, arbiter, **config):
    model = from_holo_pretrained(location, quantization_config=HoloTensorConfig(arbiter=arbiter, **config))
    return model, managed_model_of(model)


def _sample_while_streaming(managed, stop_event: threading.Event) -> list[tuple[float, float, float]]:
    """Sample (quality, available quality, grant) until ``stop_event``; quality is read first, so
    a sample is consistent (availability only grows while streaming)."""
    samples = []
    while not stop_event.is_set():
        quality = managed.quality
        samples.append((quality, managed.available_quality, managed.allocation.quality))
    return samples


def test_from_a_url_the_model_runs_at_its_floor_then_streams_to_its_grant(tiny_llama_dir, gated, make_arbiter):
    _, tokens, expected = tiny_llama_dir
    server, url, gate = gated
    arbiter = make_arbiter()
    model, managed = _load(url, arbiter)
    try:
        # Returned with only the floor's fragments in: it runs there, and nothing else arrives.
        assert managed.quality == managed.min_quality == managed.available_quality < 1.0
        assert managed.allocation.quality == 1.0
        floor_logits = _logits(model, tokens)
        assert not torch.equal(floor_logits, expected)
        assert torch.nn.functional.cosine_similarity(floor_logits.flatten(), expected.flatten(), dim=0) > 0.9
        assert not arbiter.wait_until_settled(0.2), "settled below its grant with fragments still missing"
        assert managed.quality == managed.min_quality

        done = threading.Event()
        sampler_result: list = []
        sampler = threading.Thread(target=lambda: sampler_result.extend(_sample_while_streaming(managed, done)))
        sampler.start()
        server.delay = 0.003  # a slow stream, so the sampler sees it rise
        gate.set()
        assert arbiter.wait_until_settled(30)
        done.set()
        sampler.join()
        qualities = [q for q, _, _ in sampler_result]
        assert all(q <= available and q <= grant for q, available, grant in sampler_result)
        assert len(set(qualities)) > 2, "the quality did not rise step by step as fragments landed"
        assert qualities == sorted(qualities)

        assert managed.quality == managed.allocation.quality == 1.0
        assert torch.equal(_logits(model, tokens), expected)

        stats = managed.cache_stats()
        assert stats.fragments == stats.ready_fragments > 0 and stats.available_quality == 1.0
        assert stats.charged_bytes == managed.resident_bytes - managed.fixed_bytes_measured() > 0
        assert stats.shared_bytes == 0
        assert stats.prefetch.fetched > 0 and stats.prefetch.fetched_bytes > 0 and stats.prefetch.failed == 0
        assert 0 < stats.prefetch.fetch_p50_s <= stats.prefetch.fetch_p99_s
        cache = arbiter.stats().cache
        assert cache.hits[REMOTE] > 0 and cache.misses[DEVICE] > 0
        assert cache.bytes_out[REMOTE] > 0 and cache.bytes_in[DEVICE] > 0 and cache.bytes_in[HOST] > 0
        assert 0 < cache.fetch_p50_s[REMOTE] <= cache.fetch_p99_s[REMOTE]
        assert cache.resident_bytes[DEVICE] == stats.charged_bytes
        # the grant is what it holds
        held = arbiter.held_bytes()[managed.allocation.id]
        assert held == managed.resident_bytes + managed.allocation.activation_bytes
    finally:
        gate.set()  # unpatch() reads the exact weights back
        managed.unpatch()


def test_from_a_directory_it_settles_at_its_grant_bit_identical(tiny_llama_dir, tiny_llama_holo, make_arbiter):
    _, tokens, expected = tiny_llama_dir
    arbiter = make_arbiter()
    model, managed = _load(tiny_llama_holo, arbiter)
    try:
        assert managed.min_quality <= managed.quality <= managed.available_quality
        assert arbiter.wait_until_settled(30)
        assert managed.quality == managed.allocation.quality == 1.0
        assert torch.equal(_logits(model, tokens), expected)
        # nothing of a local checkpoint is staged on DISK: the checkpoint is the copy
        assert arbiter.cache.resident_bytes(DISK) == 0
    finally:
        managed.unpatch()


def test_a_raise_without_host_room_reads_its_fragments_in_parallel_straight_to_device(
        tiny_llama_dir, tiny_llama_holo, make_arbiter, monkeypatch):
    _, tokens, expected = tiny_llama_dir
    arbiter = make_arbiter(host_capacity_bytes=0)
    model, managed = _load(tiny_llama_holo, arbiter, register=False, quality=0.0)
    readers = []
    read = HoloCheckpoint.read_fragment

    def recorded(self, fid):
        readers.append(threading.current_thread().name)
        return read(self, fid)

    monkeypatch.setattr(HoloCheckpoint, "read_fragment", recorded)
    try:
        assert managed.set_quality(1.0) and managed.quality == 1.0
        assert torch.equal(_logits(model, tokens), expected)
        assert len(readers) > 1 and all(name.startswith("fragment-cache") for name in readers)
        assert arbiter.cache.resident_bytes(HOST) == 0 and arbiter.cache.resident_bytes(DISK) == 0
        assert managed.set_quality(0.0) and managed.quality == managed.min_quality
        assert arbiter.cache.resident_bytes(HOST) == 0
    finally:
        managed.unpatch()


def test_patch_a_loaded_model_from_a_url_and_refuse_other_weights(tiny_llama_dir, tiny_llama_holo, make_arbiter):
    from transformers import LlamaForCausalLM

    path, tokens, expected = tiny_llama_dir
    server, url = serve(tiny_llama_holo)
    arbiter = make_arbiter()
    try:
        model = LlamaForCausalLM.from_pretrained(path, local_files_only=True).eval()
        managed = patch(model, arbiter, holo_dir=url, progress=False)
        try:
            assert arbiter.wait_until_settled(30)
            assert managed.quality == 1.0
            assert torch.equal(_logits(model, tokens), expected)
            assert any(r[1] is not None for r in server.requests), "no fragment came over HTTP"
        finally:
            managed.unpatch()

        torch.manual_seed(5)
        other = LlamaForCausalLM(model.config).eval()
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(PatchError, match="other weights"):
            patch(other, arbiter, holo_dir=url, progress=False)
        assert managed_model_of(other) is None
        assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
        assert arbiter.state().workloads == ()
    finally:
        stop(server)


def test_one_checkpoint_loaded_twice_is_held_and_charged_once(tiny_llama_dir, tiny_llama_holo, make_arbiter):
    _, tokens, expected = tiny_llama_dir
    arbiter = make_arbiter()
    first_model, first = _load(tiny_llama_holo, arbiter, name="first")
    assert arbiter.wait_until_settled(30)  # the first holds every fragment before the second comes
    second_model, second = _load(tiny_llama_holo, arbiter, name="second")
    try:
        assert arbiter.wait_until_settled(30)
        assert first.quality == second.quality == 1.0
        weights = first.cache_stats().charged_bytes
        assert weights > 0
        assert arbiter.cache.resident_bytes(DEVICE) == weights  # one copy at DEVICE, not two
        assert second.cache_stats().charged_bytes == 0 and second.cache_stats().shared_bytes == weights
        assert first.cache_stats().shared_bytes == 0
        assert second.resident_bytes == second.fixed_bytes_measured()
        assert torch.equal(_logits(first_model, tokens), expected)
        assert torch.equal(_logits(second_model, tokens), expected)
        held = arbiter.held_bytes()
        assert held[second.allocation.id] == second.resident_bytes + second.allocation.activation_bytes

        first.unpatch()  # the charge moves to the other holder; the bytes stay where they are
        assert arbiter.wait_until_settled(30)
        assert second.cache_stats().charged_bytes == weights and second.cache_stats().shared_bytes == 0
        assert arbiter.cache.resident_bytes(DEVICE) == weights
        held = arbiter.held_bytes()
        assert held[second.allocation.id] == second.resident_bytes + second.allocation.activation_bytes
        assert second.resident_bytes == second.fixed_bytes_measured() + weights
        assert torch.equal(_logits(second_model, tokens), expected)
    finally:
        first.unpatch()
        second.unpatch()
    assert arbiter.cache.resident_bytes(DEVICE) == 0


def test_a_model_patched_from_memory_shares_its_exact_weights_with_its_checkpoint(
        tiny_llama_dir, tiny_llama_holo, make_arbiter):
    from transformers import LlamaForCausalLM

    path, tokens, expected = tiny_llama_dir
    arbiter = make_arbiter()
    model = LlamaForCausalLM.from_pretrained(path, local_files_only=True).eval()
    in_memory = patch(model, arbiter, name="memory", calibration=False, progress=False)
    assert arbiter.wait_until_settled(30)
    loaded_model, loaded = _load(tiny_llama_holo, arbiter, name="loaded")
    try:
        assert arbiter.wait_until_settled(30)
        assert in_memory.quality == loaded.quality == 1.0
        exact = in_memory.cache_stats().charged_bytes
        assert all(layer.level == layer.num_levels for layer in in_memory.layers.values())
        assert exact == sum(layer.holo.full_bytes for layer in in_memory.layers.values())
        assert loaded.cache_stats().charged_bytes == 0 and loaded.cache_stats().shared_bytes == exact
        assert arbiter.cache.resident_bytes(DEVICE) == exact
        assert torch.equal(_logits(loaded_model, tokens), expected)

        in_memory.unpatch()
        assert arbiter.wait_until_settled(30)
        assert loaded.cache_stats().charged_bytes == exact
        assert arbiter.held_bytes()[loaded.allocation.id] == loaded.resident_bytes + loaded.allocation.activation_bytes
        assert torch.equal(_logits(loaded_model, tokens), expected)
    finally:
        in_memory.unpatch()
        loaded.unpatch()


def test_a_bounded_host_spills_and_follows_quality_without_losing_anything(tiny_llama_dir, make_arbiter):
    from transformers import LlamaForCausalLM

    path, tokens, expected = tiny_llama_dir
    host_budget = 64 << 10
    arbiter = make_arbiter(host_capacity_bytes=host_budget)
    model = LlamaForCausalLM.from_pretrained(path, local_files_only=True).eval()
    managed = patch(model, arbiter, calibration=False, progress=False)
    cache = arbiter.cache
    try:
        assert arbiter.wait_until_settled(30) and managed.quality == 1.0
        keys = {key for holo in managed._holos.values() for key in holo.fragments.content_keys.values()}
        assert cache.resident_bytes(HOST) <= host_budget
        assert cache.resident_bytes(DISK) > 0, "nothing was spilled past the HOST budget"
        assert torch.equal(_logits(model, tokens), expected)

        managed.set_quality(managed.min_quality, wait=True)
        floor_weights = managed.bytes_at(managed.min_quality) - managed.fixed_bytes
        # (identical fragments of two layers, e.g. equal rotation signs, are one key: held once)
        assert cache.resident_bytes(DEVICE) == cache.charged_bytes(managed.holder) <= floor_weights
        assert cache.resident_bytes(DEVICE) + cache.resident_bytes(HOST) <= floor_weights + host_budget
        assert all(cache.tiers_of(key) for key in keys), "a fragment was lost"

        # a raise reads what HOST lacks back from the spill (the prefetcher), then settles
        managed.set_quality(1.0, wait=True)
        assert arbiter.wait_until_settled(30) and managed.quality == 1.0
        assert torch.equal(_logits(model, tokens), expected)
        managed.set_quality(managed.min_quality, wait=True)
        floor_logits = _logits(model, tokens)
        managed.set_quality(1.0, wait=True)
        assert arbiter.wait_until_settled(30)
        managed.set_quality(managed.min_quality, wait=True)
        assert torch.equal(_logits(model, tokens), floor_logits)
    finally:
        managed.unpatch()
    assert cache.resident_bytes(DEVICE) == cache.resident_bytes(HOST) == cache.resident_bytes(DISK) == 0


def test_a_lowered_grant_cancels_queued_prefetches(tiny_llama_holo, make_arbiter):
    server, url = serve(tiny_llama_holo, delay=0.05)
    arbiter = make_arbiter()
    arbiter.prefetcher = type(arbiter.prefetcher)(arbiter.cache, workers=1)  # one fetch at a time
    try:
        model, managed = _load(url, arbiter, priority="low")
        try:
            assert managed.quality < 1.0
            # a critical job takes all but the model's floor: its grant drops while it streams
            floor = managed.bytes_at(managed.min_quality) + managed.allocation.activation_bytes
            bare = arbiter.request_allocation_blocking(
                WorkloadType.IMAGE_GENERATION, Priority.CRITICAL, bytes=arbiter.state().capacity_bytes - floor,
                min_quality=1.0, activation_bytes=0)
            try:
                assert managed.allocation.quality == pytest.approx(managed.min_quality)
                assert arbiter.prefetcher.idle(managed.holder, 30)
                assert arbiter.prefetcher.stats(managed.holder).cancelled > 0
                assert managed.cache_stats().prefetch.cancelled > 0
                assert arbiter.wait_until_settled(30)
                assert managed.quality == managed.min_quality
            finally:
                bare.release()
        finally:
            managed.unpatch()
    finally:
        stop(server)


def test_concurrent_readers_of_one_attached_checkpoint_agree(tiny_llama_holo, tmp_path):
    server, url = serve(tiny_llama_holo)
    checkpoint = HoloCheckpoint.open(tiny_llama_holo)
    try:
        with FragmentCache(CacheConfig(device="cpu", spill_dir=tmp_path / "spill")) as cache:
            source = cache.attach(url)
            expected = {source.keys[fid]: checkpoint.read_fragment(fid) for fid in source.keys}
            keys = sorted(expected)
            errors: list[BaseException] = []
            calls = [0] * 8
            start = threading.Barrier(8)

            def reader(worker: int) -> None:
                rng = random.Random(worker)
                holder = f"reader{worker % 3}"  # holders shared by several threads, like two models' layers
                start.wait()
                try:
                    for _ in range(60):
                        key = keys[0] if rng.random() < 0.3 else rng.choice(keys)  # one hot key for all
                        if rng.random() < 0.5:
                            got = cache.acquire(key, holder)
                            assert DEVICE in cache.tiers_of(key), "a held fragment is not at DEVICE"
                            assert same_bytes(got, expected[key])
                            cache.release(key, holder)
                        else:
                            assert same_bytes(cache.get(key, rng.choice([DEVICE, HOST, DISK])), expected[key])
                        calls[worker] += 1
                except BaseException as exc:  # reported by the main thread
                    errors.append(exc)

            threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert not errors, errors[0]
            stats = cache.stats()
            # one hit per call (an acquire that lost its copy to a concurrent release reads again)
            assert sum(calls) <= sum(stats.hits.values()) <= sum(calls) * 1.1
            ranges = [r for _, r in server.requests if r is not None]
            served = sum(int(end) - int(start) + 1 for start, end in (r[6:].split("-") for r in ranges))
            # later readers found a copy above REMOTE; what left REMOTE is what the server sent
            assert len(ranges) < sum(calls) // 4
            assert 0 < stats.bytes_out[REMOTE] <= served
            assert all(cache.charged_bytes(f"reader{i}") == 0 for i in range(3))
            for key in keys:
                assert same_bytes(cache.read(key), expected[key])
    finally:
        stop(server)


# -- the holder bookkeeping, under any sequence of operations ---------------------------------------------

_KEYS = [f"k{i}" for i in range(5)]
_OWNERS = ["a", "b", "c"]
_operations = st.lists(st.tuples(st.sampled_from(["put", "acquire", "release", "disown"]),
                                 st.sampled_from(_KEYS), st.sampled_from(_OWNERS)), max_size=40)


@settings(max_examples=60, deadline=None)
@given(_operations)
def test_acquire_release_own_disown_keep_the_cache_invariants(steps):
    tensors = {key: torch.full((16 * (i + 1),), float(i), dtype=torch.float32) for i, key in enumerate(_KEYS)}
    held: dict[str, list[str]] = {}  # key -> holders, one entry per acquire not yet released
    owned: dict[str, set[str]] = {}
    with FragmentCache(CacheConfig(device="cpu", host_capacity_bytes=400)) as cache:
        for operation, key, who in steps:
            if operation == "put":
                if key not in cache:
                    cache.put(key, tensors[key], HOST)
                cache.own(key, who)
                owned.setdefault(key, set()).add(who)
            elif operation == "acquire":
                if key not in cache:
                    continue
                assert same_bytes(cache.acquire(key, who), tensors[key])
                held.setdefault(key, []).append(who)
            elif operation == "release":
                cache.release(key, who)
                if who in held.get(key, []):
                    held[key].remove(who)
            else:
                cache.disown(who)
                for owners in owned.values():
                    owners.discard(who)
            held = {k: v for k, v in held.items() if v}
            owned = {k: v for k, v in owned.items() if v}
            for key, holders in held.items():  # a held fragment is at DEVICE, with its bytes
                assert DEVICE in cache.tiers_of(key)
                assert same_bytes(cache._stores[DEVICE].read(key), tensors[key])
            # charged once: over all holders, the DEVICE bytes of the held keys
            held_bytes = sum(cache.fragment_nbytes(key) for key in held)
            assert sum(cache.charged_bytes(who) for who in _OWNERS) == held_bytes
            assert sum(cache.charged_bytes(w) + cache.shared_bytes(w) for w in _OWNERS) == sum(
                cache.fragment_nbytes(key) * len(set(holders)) for key, holders in held.items())
            for key in owned:  # an owned fragment always has a copy somewhere, with its bytes
                tiers = cache.tiers_of(key)
                assert tiers, f"{key} has owners {owned[key]} and no copy"
                assert all(same_bytes(cache._stores[t].read(key), tensors[key]) for t in tiers)
            assert cache.resident_bytes(HOST) <= 400


@pytest.mark.slow
def test_a_converted_diffusers_pipeline_streams_from_a_url_to_the_dense_images(
        digits_ddpm, sample_digits, make_arbiter, tmp_path):
    import numpy as np

    from torch_arbiter.demo import models
    from torch_arbiter.holo.convert import convert

    holo = tmp_path / "ddpm_holo"
    convert(models.DIGITS_DDPM_DIR, holo, progress=False)
    gate = threading.Event()
    server, url = serve(holo, intercept=_floor_only_until(gate, holo))
    arbiter = make_arbiter()
    try:
        pipeline, managed = _load(url, arbiter)
        try:
            assert type(pipeline).__name__ == "DDPMPipeline"
            assert managed.quality == managed.min_quality < 1.0  # the UNet runs at its floor
            pipeline.set_progress_bar_config(disable=True)
            assert np.isfinite(sample_digits(pipeline, batch_size=1, steps=2)).all()
            gate.set()
            assert arbiter.wait_until_settled(60) and managed.quality == 1.0
            assert np.array_equal(sample_digits(pipeline), sample_digits(digits_ddpm))
        finally:
            gate.set()
            managed.unpatch()
    finally:
        stop(server)
