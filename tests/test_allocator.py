"""The pluggable allocator on the host backend: the built C library, its shared ledger, real threads
and real processes. Each test gets its own ledger segment (a unique prefix) and removes it after."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import uuid

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_arbiter import allocator as ta_alloc
from torch_arbiter.allocator import _lib
from torch_arbiter.errors import AllocatorError, InvalidRequestError

LIB = _lib.library()
MIB = 1 << 20


def _unique_prefix() -> str:
    return f"ta_test_{os.getpid()}_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def ledger():
    """A fresh ledger for device 0 on the host backend, removed (with device 1's) afterwards."""
    ta_alloc.detach_ledgers()
    ta_alloc.set_backend("host")
    ta_alloc.set_enforce(True)
    prefix = _unique_prefix()
    ta_alloc.set_ledger_prefix(prefix)
    yield ta_alloc.Ledger(0)
    assert ta_alloc.stats().live_allocs == 0, "a test leaked allocations"
    for device in (0, 1):
        LIB.torch_arbiter_ledger_unlink(device)
    ta_alloc.detach_ledgers()
    assert not [name for name in os.listdir("/dev/shm") if name.startswith(prefix)]


def _alloc(nbytes: int, device: int = 0) -> int | None:
    return LIB.torch_arbiter_alloc(nbytes, device, None)


def _free(ptr: int | None, nbytes: int = 0, device: int = 0) -> None:
    LIB.torch_arbiter_free(ptr, nbytes, device, None)


def _exercise(flags: int, iterations: int, ring: int, min_size: int, max_size: int, seed: int = 1):
    result = _lib.ExerciseResult()
    rc = LIB.torch_arbiter_exercise(flags, 0, iterations, ring, min_size, max_size, seed, ctypes.byref(result))
    assert rc == 0, LIB.torch_arbiter_last_error()
    return result


EXERCISE_CHECKED = 1 | 2 | 4  # through the ledger, check the limit, touch the memory


# ---- limits ----------------------------------------------------------------------------------


def test_limit_refuses_past_budget_and_free_credits_back(ledger):
    ledger.set_limit(7, 1000)
    with ta_alloc.selected_workload(7):
        first = ta_alloc.HostBlock(600)
        with pytest.raises(torch.OutOfMemoryError, match="600 of 1000"):
            ta_alloc.HostBlock(401)
        second = ta_alloc.HostBlock(400)  # exactly up to the limit is allowed
        usage = ledger.usage(7)
        assert (usage.used, usage.limit, usage.refused) == (1000, 1000, 1)
        assert usage.processes == {os.getpid(): 1000}
        refusal = ta_alloc.last_refusal()
        assert (refusal.key, refusal.requested, refusal.used, refusal.limit, refusal.reason) == (7, 401, 600, 1000, "limit")
        first.free()
        third = ta_alloc.HostBlock(600)
        third.free()
        second.free()
    usage = ledger.usage(7)
    assert (usage.used, usage.peak, usage.processes) == (0, 1000, {})


def test_lowered_limit_refuses_until_enough_is_freed(ledger):
    ledger.set_limit(3, 10 * MIB)
    with ta_alloc.selected_workload(3):
        blocks = [ta_alloc.HostBlock(MIB) for _ in range(8)]
        ledger.set_limit(3, 4 * MIB)  # nothing is taken back ...
        assert ledger.usage(3).used == 8 * MIB
        with pytest.raises(torch.OutOfMemoryError):
            ta_alloc.HostBlock(1)  # ... but nothing new fits
        for block in blocks[:5]:
            block.free()
        ta_alloc.HostBlock(MIB).free()
        for block in blocks[5:]:
            block.free()


def test_default_workload_is_unlimited_and_limit_none_clears(ledger):
    assert ta_alloc.thread_workload() == ta_alloc.DEFAULT_WORKLOAD
    block = ta_alloc.HostBlock(64 * MIB)
    assert ledger.usage(0).used == 64 * MIB and ledger.usage(0).limit is None
    block.free()
    ledger.set_limit(5, 10)
    ledger.set_limit(5, None)
    assert ledger.usage(5).limit is None
    assert ledger.usage(12345) is None


def test_zero_limit_refuses_everything(ledger):
    ledger.set_limit(9, 0)
    with ta_alloc.selected_workload(9):
        with pytest.raises(torch.OutOfMemoryError):
            ta_alloc.HostBlock(1)


# ---- attribution -----------------------------------------------------------------------------


def test_attribution_is_per_thread_and_free_credits_the_allocating_workload(ledger):
    sizes = {11: 3 * MIB, 22: 5 * MIB}
    blocks: dict[int, ta_alloc.HostBlock] = {}
    barrier = threading.Barrier(2)

    def worker(key: int) -> None:
        with ta_alloc.selected_workload(key):
            barrier.wait()  # both threads hold their selection at the same time
            blocks[key] = ta_alloc.HostBlock(sizes[key])
            barrier.wait()

    threads = [threading.Thread(target=worker, args=(key,)) for key in sizes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert ledger.usage(11).used == 3 * MIB and ledger.usage(22).used == 5 * MIB
    assert ledger.usage(0) is None or ledger.usage(0).used == 0  # the main thread charged nothing
    with ta_alloc.selected_workload(22):  # freeing under another selection credits the owner
        blocks[11].free()
    assert ledger.usage(11).used == 0 and ledger.usage(22).used == 5 * MIB
    blocks[22].free()


def test_selected_workload_nests_and_restores(ledger):
    with ta_alloc.selected_workload(1):
        with ta_alloc.selected_workload(2):
            assert ta_alloc.thread_workload() == 2
        assert ta_alloc.thread_workload() == 1
    assert ta_alloc.thread_workload() == 0
    with pytest.raises(InvalidRequestError):
        with ta_alloc.selected_workload(-1):
            pass


def test_two_threads_a_million_pairs_each_no_violation_no_leak(ledger):
    limit = 256 * 1024
    ledger.set_limit(42, limit)
    results = []

    def worker(seed: int) -> None:
        with ta_alloc.selected_workload(42):
            results.append(_exercise(EXERCISE_CHECKED, 1_000_000, 8, 1, 64 * 1024, seed))

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2
    for result in results:
        assert result.successes + result.refusals == 1_000_000
        assert result.violations == 0 and result.max_used_seen <= limit
        assert result.refusals > 0 and result.successes > 0  # the limit really was contended
    usage = ledger.usage(42)
    assert usage.used == 0 and usage.processes == {} and usage.peak <= limit
    assert usage.refused == sum(r.refusals for r in results)
    stats = ta_alloc.stats()
    assert stats.live_allocs == 0 and stats.live_bytes == 0


def test_many_live_blocks_freed_in_random_order(ledger):
    import random

    sizes = [random.Random(i).randint(1, 4096) for i in range(50_000)]
    with ta_alloc.selected_workload(31):
        ptrs = [_alloc(size) for size in sizes]
    assert all(ptrs) and len(set(ptrs)) == len(ptrs)
    assert ta_alloc.stats().live_allocs == len(ptrs) and ledger.usage(31).used == sum(sizes)
    order = list(range(len(ptrs)))
    random.Random(7).shuffle(order)
    unknown_before = ta_alloc.stats().unknown_frees
    for count, index in enumerate(order, start=1):
        _free(ptrs[index], sizes[index])
        if count % 10_000 == 0:  # one live block fewer per free, none lost or found twice
            assert ta_alloc.stats().live_allocs == len(ptrs) - count
    assert ta_alloc.stats().unknown_frees == unknown_before  # every pointer was found in the table
    assert ledger.usage(31).used == 0 and ta_alloc.stats().live_bytes == 0


# ---- garbage arguments -----------------------------------------------------------------------


def test_garbage_arguments_are_refused_or_ignored_without_a_crash(ledger):
    ledger.set_limit(4, MIB)
    before = ta_alloc.stats()
    with ta_alloc.selected_workload(4):
        assert not _alloc(0)  # nothing to allocate, not an error
        assert not _alloc(-1) and not _alloc(-(1 << 62))
        assert not _alloc(16, device=-1) and not _alloc(16, device=64)
        assert not _alloc(1 << 62)  # huge: over the limit
        assert ta_alloc.last_refusal().reason == "limit"
    with ta_alloc.selected_workload(5):  # no limit: the backend itself fails, the charge is undone
        assert not _alloc(1 << 62)
        assert ta_alloc.last_refusal().reason == "backend"
        assert ledger.usage(5).used == 0
    ptr = _alloc(100)
    _free(ptr, 999_999, device=3)  # wrong size and device: the recorded ones are used
    _free(ptr)  # double free
    foreign = ctypes.create_string_buffer(64)
    _free(ctypes.addressof(foreign))  # never ours
    _free(None)  # NULL is ignored silently
    after = ta_alloc.stats()
    assert after.invalid_args - before.invalid_args == 4
    assert after.unknown_frees - before.unknown_frees == 2
    assert after.backend_failures - before.backend_failures == 1
    assert after.live_allocs == 0 and ledger.usage(0).used == 0
    assert ledger.usage(4).used == 0


def test_bad_settings_raise_typed_errors(ledger, tmp_path, monkeypatch):
    with pytest.raises(InvalidRequestError):
        ta_alloc.set_backend("rocm")
    with pytest.raises(InvalidRequestError):
        ta_alloc.set_ledger_prefix("has/slash")
    with pytest.raises(AllocatorError, match="already attached"):
        ta_alloc.set_ledger_prefix("another_prefix")
    with pytest.raises(InvalidRequestError):
        ledger.set_limit(1, -5)
    with pytest.raises(InvalidRequestError):
        ta_alloc.Ledger(64)
    block = ta_alloc.HostBlock(10)
    with pytest.raises(AllocatorError, match="live"):
        ta_alloc.set_backend("cuda")
    with pytest.raises(AllocatorError, match="live"):
        ta_alloc.detach_ledgers()
    with pytest.raises(AllocatorError, match="still holds"):
        ledger.remove(0)
    block.free()
    ledger.remove(0)
    assert ledger.usage(0) is None
    monkeypatch.setattr(_lib, "_HERE", tmp_path)
    with pytest.raises(AllocatorError, match="pip install -e"):
        _lib.library_path()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure path of the CUDA backend")
def test_cuda_backend_without_a_gpu_fails_cleanly(ledger):
    ta_alloc.set_backend("cuda")
    try:
        before = ta_alloc.stats().backend_failures
        assert not _alloc(4096)
        assert ta_alloc.stats().backend_failures == before + 1
        assert ledger.usage(0).used == 0
        # either no runtime at all, or a real libcudart that finds no driver/device
        assert re.search(r"libcudart not found|cudaSetDevice\(0\) failed \(cudaError \d+\)|cuda allocation",
                         LIB.torch_arbiter_last_error().decode())
        assert ta_alloc.last_refusal().reason == "backend"
    finally:
        ta_alloc.set_backend("host")


# ---- the segment -----------------------------------------------------------------------------


def test_segment_is_private_to_the_user(ledger):
    info = os.stat("/dev/shm" + ledger.name)
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.geteuid()
    assert ledger.name.endswith(f".u{os.geteuid()}.d0")


def test_segment_with_loose_permissions_is_refused(ledger):
    name = ledger.name.replace(".d0", ".d1")
    path = "/dev/shm" + name
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.fchmod(fd, 0o644)  # what another (or careless) process could leave behind
    os.close(fd)
    with pytest.raises(AllocatorError, match="not private"):
        ta_alloc.Ledger(1)


def test_devices_have_separate_ledgers(ledger):
    ledger.set_limit(8, 100)
    other = ta_alloc.Ledger(1)
    assert other.usage(8) is None
    with ta_alloc.selected_workload(8):
        ptr = _alloc(1000, device=1)  # device 1 has no limit for workload 8
        assert ptr and other.usage(8).used == 1000 and ledger.usage(8).used == 0
        _free(ptr, 1000, device=1)


# ---- invariants under random sequences -------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    limits=st.lists(st.one_of(st.none(), st.integers(0, 4096)), min_size=1, max_size=3),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 2), st.integers(1, 2048)), max_size=60),
)
def test_used_always_equals_live_bytes_and_stays_under_limit(limits, ops):
    ta_alloc.detach_ledgers()
    ta_alloc.set_backend("host")
    ta_alloc.set_ledger_prefix(_unique_prefix())
    ledger = ta_alloc.Ledger(0)
    try:
        for key, limit in enumerate(limits, start=1):
            ledger.set_limit(key, limit)
        live: list[tuple[int, int, int]] = []
        for is_alloc, which, size in ops:
            key = which % len(limits) + 1
            if is_alloc or not live:
                with ta_alloc.selected_workload(key):
                    ptr = _alloc(size)
                held = sum(s for k, _, s in live if k == key)
                fits = limits[key - 1] is None or held + size <= limits[key - 1]
                assert bool(ptr) == fits
                if ptr:
                    live.append((key, ptr, size))
            else:
                k, ptr, size = live.pop(which % len(live))
                _free(ptr, size)
            for k in range(1, len(limits) + 1):
                usage = ledger.usage(k)
                assert usage.used == sum(s for kk, _, s in live if kk == k)
                assert usage.limit is None or usage.used <= usage.limit
        for _, ptr, size in live:
            _free(ptr, size)
        assert all(ledger.usage(k).used == 0 for k in range(1, len(limits) + 1))
    finally:
        ledger.unlink()
        ta_alloc.detach_ledgers()


# ---- processes -------------------------------------------------------------------------------

# Children load the built library with bare ctypes (no torch import: a child starts in tens of ms).
_CHILD = textwrap.dedent(
    """
    import ctypes, sys, time
    path, mode, key = sys.argv[1], sys.argv[2], int(sys.argv[3])
    lib = ctypes.CDLL(path)
    lib.torch_arbiter_set_thread_workload.argtypes = [ctypes.c_uint64]
    lib.torch_arbiter_set_thread_workload.restype = ctypes.c_uint64
    lib.torch_arbiter_alloc.argtypes = [ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p]
    lib.torch_arbiter_alloc.restype = ctypes.c_void_p
    lib.torch_arbiter_set_thread_workload(key)
    if mode == "exercise":
        print("ready", flush=True)
        sys.stdin.readline()  # start together with the others
        r = (ctypes.c_uint64 * 5)()  # ta_exercise_result: successes, refusals, violations, max_used_seen, ns
        u64 = ctypes.c_uint64
        lib.torch_arbiter_exercise.argtypes = [ctypes.c_int, ctypes.c_int, u64, ctypes.c_uint32, u64, u64, u64, ctypes.c_void_p]
        rc = lib.torch_arbiter_exercise(7, 0, int(sys.argv[4]), 8, 1, 64 * 1024, int(sys.argv[5]), r)
        print(rc, *list(r)[:4], flush=True)
    else:
        ptr = lib.torch_arbiter_alloc(int(sys.argv[4]), 0, None)
        print("ready" if ptr else "refused", flush=True)
        time.sleep(60)
    """
)


def _child(ledger, *args: object) -> subprocess.Popen:
    prefix = ledger.name.split(".u")[0].lstrip("/")
    env = dict(os.environ, TORCH_ARBITER_LEDGER_PREFIX=prefix, TORCH_ARBITER_ALLOC_BACKEND="host")
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, _lib.library_path(), *map(str, args)],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_four_processes_share_one_limit(ledger):
    limit = 512 * 1024
    ledger.set_limit(77, limit)
    children = [_child(ledger, "exercise", 77, 300_000, seed) for seed in range(1, 5)]
    for child in children:
        assert child.stdout.readline().strip() == "ready"
    for child in children:
        child.stdin.write("go\n")
        child.stdin.flush()
    reports = []
    for child in children:
        out, _ = child.communicate(timeout=120)
        assert child.returncode == 0
        reports.append([int(x) for x in out.split()])
    for rc, successes, refusals, violations, max_used in reports:
        assert rc == 0 and violations == 0 and max_used <= limit
        assert successes + refusals == 300_000 and successes > 0
    usage = ledger.usage(77)
    assert usage.used == 0 and usage.processes == {} and usage.peak <= limit
    assert usage.refused == sum(r[2] for r in reports) > 0  # the four really contended


def test_sigkilled_process_is_reaped(ledger):
    ledger.set_limit(55, 3 * MIB)
    child = _child(ledger, "hold", 55, 2 * MIB)
    try:
        assert child.stdout.readline().strip() == "ready"
        usage = ledger.usage(55)
        assert usage.used == 2 * MIB and usage.processes == {child.pid: 2 * MIB}
        assert ledger.reap() == 0  # alive: nothing to take back
        with ta_alloc.selected_workload(55):
            with pytest.raises(torch.OutOfMemoryError):
                ta_alloc.HostBlock(2 * MIB)  # the child's bytes stand in the way
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert ledger.reap() == 2 * MIB
    usage = ledger.usage(55)
    assert usage.used == 0 and usage.processes == {}


def test_refused_allocation_reaps_a_dead_holder_by_itself(ledger):
    ledger.set_limit(56, 3 * MIB)
    child = _child(ledger, "hold", 56, 2 * MIB)
    assert child.stdout.readline().strip() == "ready"
    child.kill()
    child.wait(timeout=30)
    child.stdout.close()
    with ta_alloc.selected_workload(56):
        ta_alloc.HostBlock(2 * MIB).free()  # refused at first, the dead child is reaped, retried
    assert ta_alloc.stats().reaped_bytes >= 2 * MIB
    assert ledger.usage(56).used == 0


def test_forked_child_is_a_new_process_in_the_ledger(ledger):
    ledger.set_limit(60, MIB)
    parent_block = ta_alloc.HostBlock(1000)
    pid = os.fork()
    if pid == 0:  # the child charges its own entry and dies without freeing
        code = 1
        try:
            with ta_alloc.selected_workload(60):
                code = 0 if _alloc(4000) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert ledger.usage(60).processes == {pid: 4000}
    assert ledger.reap() == 4000
    assert ledger.usage(0).processes == {os.getpid(): 1000}  # the parent's charge is untouched
    parent_block.free()
