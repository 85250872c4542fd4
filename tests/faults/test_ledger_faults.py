"""Fault injection on the shared ledger: a lock owned by a dead thread, a segment truncated or
replaced under a live process, a damaged segment, sizes that would wrap, and the bytes a SIGKILL
mid-allocation leaves (reclaimed). Real segments in /dev/shm, real processes and threads."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

from torch_arbiter import allocator as ta_alloc
from torch_arbiter.allocator import _lib
from torch_arbiter.errors import AllocatorError, InvalidRequestError

LIB = _lib.library()
_LOCK_OFFSET = 32  # the header's pthread_mutex_t (magic, layout, sizes, ready, pad come first)
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def ledger():
    ta_alloc.detach_ledgers()
    ta_alloc.set_backend("host")
    ta_alloc.set_enforce(True)
    prefix = f"ta_fault_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    ta_alloc.set_ledger_prefix(prefix)
    yield ta_alloc.Ledger(0)
    for device in (0, 1):
        LIB.torch_arbiter_ledger_unlink(device)
    ta_alloc.detach_ledgers()
    for name in os.listdir("/dev/shm"):
        if name.startswith(prefix):
            os.unlink(f"/dev/shm/{name}")


def _dead_tid() -> int:
    tids = []
    thread = threading.Thread(target=lambda: tids.append(threading.get_native_id()))
    thread.start()
    thread.join()
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{tids[0]}") and time.monotonic() < deadline:
        time.sleep(0.01)
    return tids[0]


def _poke_lock_word(ledger: ta_alloc.Ledger, value: int) -> None:
    with open(f"/dev/shm{ledger.name}", "r+b") as handle, mmap.mmap(handle.fileno(), 4096) as view:
        view[_LOCK_OFFSET:_LOCK_OFFSET + 4] = value.to_bytes(4, "little")


def _run(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_a_lock_owned_by_a_thread_that_no_longer_exists_is_recovered(ledger):
    _poke_lock_word(ledger, _dead_tid())
    start = time.monotonic()
    assert ledger.reap() == 0  # takes the lock
    ledger.set_limit(7, 1 << 20)  # and again, now consistent
    assert time.monotonic() - start < 2
    # A fresh process attaching (which registers under the lock) is not blocked either.
    _poke_lock_word(ledger, _dead_tid())
    child = _run(f"""
        from torch_arbiter import allocator as a
        a.set_ledger_prefix({ledger.name.split('.u')[0][1:]!r}); a.set_backend("host")
        print(a.Ledger(0).usage(7).limit)
    """)
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == str(1 << 20)


def test_a_lock_held_by_a_live_stopped_process_times_out_with_a_clear_error(ledger):
    holder = subprocess.Popen(["sleep", "60"])
    try:
        _poke_lock_word(ledger, holder.pid)  # a live thread "holds" it and never lets go
        start = time.monotonic()
        with pytest.raises(AllocatorError, match="held for over 5 s by thread"):
            ledger.reap()
        assert time.monotonic() - start < 10
    finally:
        holder.kill()
        holder.wait()
    _poke_lock_word(ledger, 0)


def test_a_segment_truncated_under_a_live_process_does_not_kill_it(ledger):
    # In a child: it allocates, the segment is truncated, and its next allocations touch it.
    child = _run(f"""
        import os
        from torch_arbiter import allocator as a
        from torch_arbiter.errors import AllocatorError
        import torch
        a.set_ledger_prefix({ledger.name.split('.u')[0][1:]!r}); a.set_backend("host")
        ledger = a.Ledger(0)
        block = a.HostBlock(4096)
        os.truncate("/dev/shm" + ledger.name, 0)
        refused = 0
        for _ in range(3):
            try:
                a.HostBlock(4096).free()
            except torch.OutOfMemoryError:
                refused += 1
        block.free()
        try:
            ledger.reap()
        except AllocatorError as exc:
            print("refused", refused, "truncated or replaced" in str(exc))
    """)
    assert child.returncode == 0, f"rc={child.returncode} {child.stderr[-2000:]}"
    assert child.stdout.split() == ["refused", "3", "True"]


def test_a_replaced_segment_is_noticed_and_detach_attaches_the_new_one(ledger):
    ledger.set_limit(3, 1000)
    ledger.unlink()
    other = _run(f"""
        from torch_arbiter import allocator as a
        a.set_ledger_prefix({ledger.name.split('.u')[0][1:]!r}); a.set_backend("host")
        a.Ledger(0).set_limit(3, 5000)
    """)
    assert other.returncode == 0, other.stderr
    with pytest.raises(AllocatorError, match="truncated or replaced"):
        ledger.reap()
    ta_alloc.detach_ledgers()
    fresh = ta_alloc.Ledger(0)
    assert fresh.reap() == 0
    fresh.set_limit(3, 4096)
    with ta_alloc.selected_workload(3):
        ta_alloc.HostBlock(4096).free()
        with pytest.raises(Exception, match="refused"):
            ta_alloc.HostBlock(4097)


def test_a_damaged_segment_fails_fast_every_time_until_replaced(ledger):
    name = ledger.name
    ledger.unlink()
    ta_alloc.detach_ledgers()
    with open(f"/dev/shm{name}", "wb") as handle:  # right size, never initialised
        handle.truncate(1 << 20)
    os.chmod(f"/dev/shm{name}", 0o600)
    with pytest.raises(AllocatorError, match="never initialised|too small"):
        ta_alloc.Ledger(0)
    start = time.monotonic()
    for _ in range(5):
        with pytest.raises(AllocatorError, match="remove /dev/shm"):
            ta_alloc.Ledger(0)
    assert time.monotonic() - start < 1.0, "a known-bad segment must not be waited for again"
    os.unlink(f"/dev/shm{name}")
    ta_alloc.Ledger(0).set_limit(1, 10)  # a new segment attaches at once


@pytest.mark.parametrize("nbytes", [2**64 + 100, 2**64, 2**63, -1, 0, True, 1.5])
def test_host_block_sizes_that_would_wrap_are_refused(ledger, nbytes):
    ta_alloc.set_backend("host")
    with pytest.raises(InvalidRequestError, match="nbytes"):
        ta_alloc.HostBlock(nbytes)
    assert ledger.usage(0) is None or ledger.usage(0).used == 0


def test_bytes_left_by_a_kill_inside_an_allocation_are_reclaimed(ledger):
    # Reproduce the window exactly: a process charges `used` then dies before its own entry is
    # credited (here: a slot's `used` raised by hand, which is what the window leaves).
    key = 11
    ledger.set_limit(key, 1 << 20)
    with ta_alloc.selected_workload(key):
        block = ta_alloc.HostBlock(4096)
    slot_used_offset = _slot_offset(ledger, key) + 24  # state, owner, key, limit, then used
    with open(f"/dev/shm{ledger.name}", "r+b") as handle, mmap.mmap(handle.fileno(), 1 << 16) as view:
        used = int.from_bytes(view[slot_used_offset:slot_used_offset + 8], "little")
        assert used == 4096
        view[slot_used_offset:slot_used_offset + 8] = (used + 777).to_bytes(8, "little")
    assert ledger.usage(key).used == 4096 + 777
    assert ledger.reclaim(key) == 777
    assert ledger.usage(key).used == 4096
    assert ledger.reclaim(key) == 0
    block.free()
    assert ledger.usage(key).used == 0
    ledger.remove(key)


def _slot_offset(ledger: ta_alloc.Ledger, key: int) -> int:
    """Byte offset of workload ``key``'s slot (slots are 64-byte lines after the header)."""
    with open(f"/dev/shm{ledger.name}", "rb") as handle, mmap.mmap(handle.fileno(), 1 << 16, prot=mmap.PROT_READ) as view:
        for offset in range(64, 1 << 16, 64):
            state = int.from_bytes(view[offset:offset + 4], "little")
            if state == 1 and int.from_bytes(view[offset + 8:offset + 16], "little") == key:
                return offset
    raise AssertionError(f"no slot for {key}")


def test_sigkill_storm_leaves_nothing_that_reap_and_reclaim_cannot_return(ledger):
    key = 21
    ledger.set_limit(key, 1 << 30)
    prefix = ledger.name.split(".u")[0][1:]
    # The children load the C library alone (no torch import) and loop alloc/free in C.
    children = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import ctypes
        lib = ctypes.CDLL({_lib.library_path()!r})
        lib.torch_arbiter_ledger_set_prefix({prefix.encode()!r})
        lib.torch_arbiter_set_backend(0)
        lib.torch_arbiter_set_thread_workload.argtypes = [ctypes.c_uint64]
        lib.torch_arbiter_set_thread_workload({key})
        assert lib.torch_arbiter_ledger_attach(0) == 0
        print("ready", flush=True)
        lib.torch_arbiter_exercise.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint32,
                                               ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_void_p]
        out = ctypes.create_string_buffer(4096)
        while True:
            lib.torch_arbiter_exercise(1, 0, 1 << 20, 8, 64, 8192, 1, out)
    """)], cwd=_ROOT, stdout=subprocess.PIPE, text=True) for _ in range(4)]
    for child in children:
        assert child.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    for child in children:
        child.send_signal(signal.SIGKILL)
        child.wait()
    ledger.reap()
    ledger.reclaim(key)
    assert ledger.usage(key).used == 0
