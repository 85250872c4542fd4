"""Pool mode on a CPU machine: workload scopes against a stand-in for PyTorch's CUDA caching
allocator whose pool rules are those of ``c10/cuda/CUDACachingAllocator.cpp`` (a thread is routed
to the first pool it was routed to; routing into a pool already routed is refused; a private
pool's cached segments are freed by ``empty_cache()`` only once no ``MemPool`` refers to it; a
``MemPool`` belongs to the current device; some releases refuse expandable segments with an
active custom-allocator pool). Its segments are real blocks of the library's host backend, so
charges and credits go through the same ledger calls as on CUDA."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
from test_allocator import ledger  # noqa: F401  (the isolated-ledger fixture, used by name)

from torch_arbiter import Priority, WorkloadType
from torch_arbiter import allocator as ta_alloc
from torch_arbiter.allocator import scope
from torch_arbiter.arbiter import Arbiter, ArbiterConfig
from torch_arbiter.errors import AllocatorError
from torch_arbiter.memory import GpuMemoryTracker

MIB = 1 << 20


class _PrivatePool:
    def __init__(self, device: int) -> None:
        self.device, self.use_count, self.cached, self.live = device, 1, [], 0


class FakeCachingAllocator:
    """The pool rules of PyTorch's caching allocator, with host-backend blocks as segments."""

    def __init__(self) -> None:
        self.pools: dict[tuple[int, int], _PrivatePool] = {}
        self.captures: list[tuple[tuple[int, int], int]] = []  # (pool id, routed thread), in order
        self.current_device = 0
        self.expandable = False
        self.next_id = 1
        self.lock = threading.RLock()

    # torch._C's pool functions
    def begin(self, device: int, pool_id) -> None:
        with self.lock:
            self.pools[pool_id].use_count += 1
            if any(routed == pool_id for routed, _ in self.captures):
                raise RuntimeError("beginAllocateToPool: already recording to mempool_id")
            self.captures.append((pool_id, threading.get_ident()))

    def end(self, device: int, pool_id) -> None:
        with self.lock:
            index = next(i for i, (routed, _) in enumerate(self.captures) if routed == pool_id)
            del self.captures[index]

    def release(self, device: int, pool_id) -> None:
        with self.lock:
            self.pools[pool_id].use_count -= 1

    def empty_cache(self) -> None:
        with self.lock:
            for pool_id, pool in list(self.pools.items()):
                if pool.use_count == 0:  # only pools no MemPool refers to any more
                    for block in pool.cached:
                        block.free()
                    pool.cached = []
                    if pool.live == 0:
                        del self.pools[pool_id]

    def set_settings(self, text: str) -> None:
        key, value = text.split(":")
        assert key == "expandable_segments"
        self.expandable = value == "True"

    # what a tensor allocation does
    def allocate(self, nbytes: int):
        with self.lock:
            ident = threading.get_ident()
            pool_id = next((routed for routed, thread in self.captures if thread == ident), None)
            if pool_id is None:
                return None, None  # the default pool: not the library's
            if self.expandable:
                raise RuntimeError("expandable_segments not supported with a custom-allocator MemPool")
            pool = self.pools[pool_id]
            block = next((b for b in pool.cached if b.nbytes >= nbytes), None)
            if block is not None:
                pool.cached.remove(block)
            else:
                block = ta_alloc.HostBlock(nbytes, device=pool.device)  # charged to the thread's workload
            pool.live += 1
            return pool_id, block

    def deallocate(self, pool_id, block) -> None:
        with self.lock:
            pool = self.pools[pool_id]
            pool.live -= 1
            pool.cached.append(block)


class FakeMemPool:
    """``torch.cuda.MemPool``: made on the current device, released when dropped."""

    def __init__(self, fake: FakeCachingAllocator, allocator=None) -> None:
        self.fake = fake
        self.device = fake.current_device
        self.id = (0, fake.next_id)
        fake.next_id += 1
        fake.pools[self.id] = _PrivatePool(self.device)

    def __del__(self) -> None:
        self.fake.release(self.device, self.id)


@pytest.fixture
def fake_cuda(ledger, monkeypatch):  # noqa: F811
    fake = FakeCachingAllocator()

    @contextlib.contextmanager
    def device(index):
        previous, fake.current_device = fake.current_device, int(index)
        try:
            yield
        finally:
            fake.current_device = previous

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch._C, "_cuda_customAllocator", object(), raising=False)
    monkeypatch.setattr(scope, "pluggable_allocator", lambda: type("P", (), {"allocator": lambda self: None})())
    monkeypatch.setattr(scope, "backend", lambda: "cuda")
    monkeypatch.setattr(torch.cuda, "MemPool", lambda allocator=None: FakeMemPool(fake, allocator))
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: fake.current_device)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", fake.empty_cache)
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", fake.set_settings)
    for module in (torch._C, torch.cuda.memory):  # torch.cuda.memory imported them by name
        monkeypatch.setattr(module, "_cuda_beginAllocateCurrentThreadToPool", fake.begin)
        monkeypatch.setattr(module, "_cuda_endAllocateToPool", fake.end)
        monkeypatch.setattr(module, "_cuda_releasePool", fake.release)
    yield fake
    scope._syncs.clear()


def _arbiter(device: str = "cuda:0") -> Arbiter:
    budget = 1 << 30
    return Arbiter(ArbiterConfig(vram_bytes=budget, device=device), tracker=GpuMemoryTracker("cpu", budget))


def _request(arb: Arbiter, kind: WorkloadType, priority: Priority, mib: int, name: str):
    return arb.request_allocation_blocking(kind, priority, bytes=mib * MIB, activation_bytes=10 * MIB, name=name)


@contextlib.contextmanager
def _tensor(fake: FakeCachingAllocator, nbytes: int):
    """A tensor's lifetime: its block is taken from the routed pool and cached back on exit."""
    pool_id, block = fake.allocate(nbytes)
    try:
        yield pool_id
    finally:
        if block is not None:
            fake.deallocate(pool_id, block)


def test_nested_scopes_of_one_workload_reuse_its_pool(fake_cuda, ledger):  # noqa: F811
    arb = _arbiter()
    chat = _request(arb, WorkloadType.LLM_INFERENCE, Priority.HIGH, 100, "chat")
    key = ta_alloc.workload_key(chat.id)
    with arb.workload(chat):
        with _tensor(fake_cuda, MIB) as outer_pool:
            with arb.workload(chat):
                with _tensor(fake_cuda, 2 * MIB) as inner_pool:
                    assert inner_pool == outer_pool
            with _tensor(fake_cuda, MIB) as after:  # still routed once the inner scope closed
                assert after == outer_pool
    assert fake_cuda.captures == []
    assert ledger.usage(key).used == 3 * MIB  # cached in the pool, still charged
    ta_alloc.empty_pool_caches(arb)
    arb.close()


def test_inner_scope_of_another_workload_wins_then_the_outer_resumes(fake_cuda, ledger):  # noqa: F811
    arb = _arbiter()
    chat = _request(arb, WorkloadType.LLM_INFERENCE, Priority.HIGH, 100, "chat")
    image = _request(arb, WorkloadType.IMAGE_GENERATION, Priority.LOW, 100, "image")
    with arb.workload(chat):
        with _tensor(fake_cuda, MIB) as chat_pool:
            pass
        with arb.workload(image):
            with _tensor(fake_cuda, 4 * MIB) as image_pool:
                assert image_pool != chat_pool
        with _tensor(fake_cuda, MIB) as again:
            assert again == chat_pool
    assert ledger.usage(ta_alloc.workload_key(image.id)).used == 4 * MIB
    assert ledger.usage(ta_alloc.workload_key(chat.id)).used == MIB
    ta_alloc.empty_pool_caches(arb)
    arb.close()


def test_threads_of_one_workload_enter_its_scope_at_once(fake_cuda, ledger):  # noqa: F811
    arb = _arbiter()
    chat = _request(arb, WorkloadType.LLM_INFERENCE, Priority.HIGH, 100, "chat")
    inside, errors = threading.Barrier(3), []

    def worker():
        try:
            with arb.workload(chat):
                inside.wait(timeout=10)  # all three routed at the same time
                with _tensor(fake_cuda, MIB):
                    pass
                inside.wait(timeout=10)
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)
            inside.abort()

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert ledger.usage(ta_alloc.workload_key(chat.id)).used == 3 * MIB
    ta_alloc.empty_pool_caches(arb)
    assert ledger.usage(ta_alloc.workload_key(chat.id)).used == 0
    arb.close()


def test_empty_pool_caches_returns_cached_segments_and_credits_the_ledger(fake_cuda, ledger):  # noqa: F811
    arb = _arbiter()
    chat = _request(arb, WorkloadType.LLM_INFERENCE, Priority.HIGH, 100, "chat")
    key = ta_alloc.workload_key(chat.id)
    with arb.workload(chat):
        with _tensor(fake_cuda, 8 * MIB), _tensor(fake_cuda, 2 * MIB):
            pass
    assert ledger.usage(key).used == 10 * MIB
    ta_alloc.empty_pool_caches(arb)
    assert ledger.usage(key).used == 0 and ta_alloc.stats().live_allocs == 0
    with arb.workload(chat):  # a fresh pool for the next scope
        with _tensor(fake_cuda, MIB):
            pass
    assert ledger.usage(key).used == MIB
    ta_alloc.empty_pool_caches(arb)
    arb.close()


def test_a_pool_in_use_is_retired_when_its_scope_exits(fake_cuda, ledger):  # noqa: F811
    arb = _arbiter()
    chat = _request(arb, WorkloadType.LLM_INFERENCE, Priority.HIGH, 100, "chat")
    key = ta_alloc.workload_key(chat.id)
    with arb.workload(chat):
        with _tensor(fake_cuda, 4 * MIB):
            pass
        ta_alloc.empty_pool_caches(arb)  # the scope still routes into it: nothing freed yet
        assert ledger.usage(key).used == 4 * MIB
        with _tensor(fake_cuda, MIB):  # the cached block is reused, no new charge
            pass
    assert ledger.usage(key).used == 0  # dropped on exit, its segments freed


def test_lowered_and_released_workloads_give_their_segments_back(fake_cuda, ledger):  # noqa: F811
    arb = _arbiter()
    chat = _request(arb, WorkloadType.LLM_INFERENCE, Priority.LOW, 800, "chat")
    chat_key = ta_alloc.workload_key(chat.id)
    with arb.workload(chat):
        with _tensor(fake_cuda, 64 * MIB):
            pass
    assert ledger.usage(chat_key).used == 64 * MIB
    image = _request(arb, WorkloadType.IMAGE_GENERATION, Priority.HIGH, 600, "image")  # lowers chat
    assert ledger.usage(chat_key).used == 0
    with arb.workload(image):
        with _tensor(fake_cuda, 32 * MIB):
            pass
    image_key = ta_alloc.workload_key(image.id)
    assert ledger.usage(image_key).used == 32 * MIB
    image.release()
    with arb.workload(chat):  # entering a scope sweeps released allocations
        pass
    assert ledger.usage(image_key) is None
    ta_alloc.empty_pool_caches(arb)
    arb.close()


def test_pools_are_made_on_the_arbiters_device(fake_cuda, ledger):  # noqa: F811
    arb = _arbiter("cuda:1")
    chat = _request(arb, WorkloadType.LLM_INFERENCE, Priority.HIGH, 100, "chat")
    with arb.workload(chat):
        with _tensor(fake_cuda, MIB) as pool_id:
            assert fake_cuda.pools[pool_id].device == 1 and fake_cuda.current_device == 0
    assert ta_alloc.Ledger(1).usage(ta_alloc.workload_key(chat.id)).used == MIB
    ta_alloc.empty_pool_caches(arb)
    arb.close()


def test_expandable_segments_are_off_while_a_pool_scope_is_open(fake_cuda, ledger, monkeypatch):  # noqa: F811
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64,expandable_segments:True")
    fake_cuda.expandable = True
    arb = _arbiter()
    chat = _request(arb, WorkloadType.LLM_INFERENCE, Priority.HIGH, 100, "chat")
    with arb.workload(chat):
        with _tensor(fake_cuda, MIB):
            assert not fake_cuda.expandable
    assert fake_cuda.expandable  # restored for the rest of the process
    ta_alloc.empty_pool_caches(arb)
    arb.close()


def test_pool_mode_needs_per_thread_routing(fake_cuda, ledger, monkeypatch):  # noqa: F811
    for module in (torch._C, torch.cuda.memory):
        monkeypatch.delattr(module, "_cuda_beginAllocateCurrentThreadToPool")
    arb = _arbiter()
    chat = _request(arb, WorkloadType.LLM_INFERENCE, Priority.HIGH, 100, "chat")
    with pytest.raises(AllocatorError, match=r"torch >= 2\.8.*install\(\)"):
        with arb.workload(chat):
            pass
    assert fake_cuda.captures == []
    arb.close()
