"""The shared ledger and the library's process-wide settings, from Python.

One POSIX shared-memory segment per user and device (``/dev/shm/<prefix>.u<uid>.d<device>``,
mode 0600) holds, for every workload key, its limit and the bytes charged to it by every
process; all processes of the user that share the device see and enforce the same numbers.
A workload key is a 64-bit integer: ``0`` is the default workload (threads that selected none);
:func:`workload_key` derives a process-unique key from an arbiter allocation.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from dataclasses import dataclass, field
from typing import Iterator

from ..errors import AllocatorError, InvalidRequestError
from ._lib import UNLIMITED, Refusal, Stats, WorkloadInfo, check, library

__all__ = [
    "AllocatorStats",
    "HostBlock",
    "Ledger",
    "RefusedAllocation",
    "WorkloadUsage",
    "DEFAULT_WORKLOAD",
    "backend",
    "clear_refusal",
    "detach_ledgers",
    "last_refusal",
    "selected_workload",
    "set_backend",
    "set_enforce",
    "set_ledger_prefix",
    "stats",
    "thread_workload",
    "workload_key",
]

DEFAULT_WORKLOAD = 0
_BACKENDS = {"host": 0, "cuda": 1, "cuda_async": 2}
_MAX_KEY = (1 << 64) - 1
_MAX_PROCESSES = 256
_MAX_BLOCK = (1 << 63) - 1
_REFUSAL_REASONS = {1: "limit", 2: "backend", 3: "ledger", 4: "invalid"}


def _check_key(key: object) -> int:
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key <= _MAX_KEY:
        raise InvalidRequestError(f"a workload key is an integer in [0, 2**64), got {key!r}")
    return key


def _check_device(device: object) -> int:
    if isinstance(device, bool) or not isinstance(device, int) or not 0 <= device < 64:
        raise InvalidRequestError(f"device must be a CUDA device index in [0, 64), got {device!r}")
    return device


def workload_key(allocation_id: int, pid: int | None = None) -> int:
    """The ledger key of an arbiter allocation: unique per process and allocation.

    Args:
        allocation_id: the ``Allocation.id`` (non-negative int).
        pid: the owning process; default this one.

    Returns:
        ``2**62 | pid << 32 | allocation_id`` (ids are taken modulo 2**32), never 0, so it
        cannot collide with the default workload or with small keys chosen by hand.
    """
    if isinstance(allocation_id, bool) or not isinstance(allocation_id, int) or allocation_id < 0:
        raise InvalidRequestError(f"allocation id must be a non-negative int, got {allocation_id!r}")
    pid = os.getpid() if pid is None else pid
    return (1 << 62) | ((pid & 0x3FFFFFFF) << 32) | (allocation_id & 0xFFFFFFFF)


@dataclass(frozen=True)
class WorkloadUsage:
    """One workload's line in a ledger.

    Attributes:
        key: the workload key.
        limit: its limit in bytes, None when unlimited.
        used: bytes charged to it now, by all processes.
        peak: the highest ``used`` seen since the slot was created.
        refused: allocations refused because of the limit.
        owner_pid: the process that created the slot.
        processes: ``{pid: bytes}`` of every process charged for it now.
    """

    key: int
    limit: int | None
    used: int
    peak: int
    refused: int
    owner_pid: int
    processes: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class AllocatorStats:
    """This process's allocator counters (see ``ta_stats`` in ``arbiter_alloc.h``)."""

    live_allocs: int
    live_bytes: int
    invalid_args: int
    unknown_frees: int
    refused: int
    backend_failures: int
    ledger_errors: int
    reaped_bytes: int


@dataclass(frozen=True)
class RefusedAllocation:
    """The calling thread's last refused allocation.

    Attributes:
        key: the workload charged.
        requested: bytes asked for.
        used: the workload's use at that moment.
        limit: its limit then (None when unlimited).
        device: the device.
        reason: ``"limit"``, ``"backend"`` (the device itself is out of memory), ``"ledger"``
            (segment unavailable or full) or ``"invalid"`` (bad arguments).
    """

    key: int
    requested: int
    used: int
    limit: int | None
    device: int
    reason: str


class Ledger:
    """The ledger of one device, shared by every process of this user.

    Args:
        device: the CUDA device index the segment belongs to (the host backend uses the same
            numbering).

    Attaching creates the segment on first use and registers this process in it (a dead
    process's charges are returned by :meth:`reap`, which allocations also run by themselves
    when a limit refuses them).

    Limits: one pid namespace per segment (processes in different containers that share
    ``/dev/shm`` would reap each other); 256 workloads and 256 live processes per device.

    Raises:
        AllocatorError: the segment cannot be created or is not private to this user.
    """

    def __init__(self, device: int = 0) -> None:
        self.device = _check_device(device)
        self._lib = library()
        check(self._lib.torch_arbiter_ledger_attach(self.device), f"attaching the ledger of device {device}")

    @property
    def name(self) -> str:
        """The segment's POSIX name (``/dev/shm`` + this is its path)."""
        buf = ctypes.create_string_buffer(256)
        check(self._lib.torch_arbiter_ledger_name(self.device, buf, len(buf)), "naming the ledger")
        return buf.value.decode()

    def set_limit(self, key: int, limit: int | None) -> None:
        """Set a workload's limit (creating its slot when new).

        Args:
            key: the workload key.
            limit: bytes (>= 0), or None for no limit. Lowering it under the current use
                refuses new allocations until enough is freed; nothing is taken back.
        """
        _check_key(key)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise InvalidRequestError(f"a limit is a byte count >= 0 or None, got {limit!r}")
        value = UNLIMITED if limit is None else min(limit, UNLIMITED - 1)
        check(self._lib.torch_arbiter_ledger_set_limit(self.device, key, value), f"setting the limit of workload {key}")

    def usage(self, key: int) -> WorkloadUsage | None:
        """A workload's limit and use, with the bytes of each process; None when unknown."""
        _check_key(key)
        info = WorkloadInfo()
        rc = self._lib.torch_arbiter_ledger_get(self.device, key, ctypes.byref(info))
        if rc == -2:  # ENOENT
            return None
        check(rc, f"reading workload {key}")
        pids = (ctypes.c_int32 * _MAX_PROCESSES)()
        nbytes = (ctypes.c_uint64 * _MAX_PROCESSES)()
        count = self._lib.torch_arbiter_ledger_process_bytes(self.device, key, pids, nbytes, _MAX_PROCESSES)
        processes = {} if count == -2 else {pids[i]: nbytes[i] for i in range(min(check(count, "reading processes"), _MAX_PROCESSES))}
        return WorkloadUsage(
            key=info.key,
            limit=None if info.limit == UNLIMITED else info.limit,
            used=info.used,
            peak=info.peak,
            refused=info.refused,
            owner_pid=info.owner_pid,
            processes=processes,
        )

    def workloads(self) -> list[WorkloadUsage]:
        """Every workload in this device's ledger, all processes included."""
        keys = (ctypes.c_uint64 * 256)()
        count = check(self._lib.torch_arbiter_ledger_list(self.device, keys, len(keys)), "listing workloads")
        found = (self.usage(keys[i]) for i in range(min(count, len(keys))))
        return [usage for usage in found if usage is not None]

    def reap(self) -> int:
        """Return the bytes of dead processes to their workloads now.

        Returns:
            The bytes returned.
        """
        return check(self._lib.torch_arbiter_ledger_reap(self.device), "reaping the ledger")

    def reclaim(self, key: int) -> int:
        """Return to workload ``key`` the bytes charged to it that no live process accounts for.

        A process SIGKILLed inside an allocation or a free, between the two stores that charge
        the workload and its own entry (a few instructions apart), leaves exactly that one
        allocation's size charged to the workload forever: limits get stricter, never looser,
        and the reaper cannot see those bytes. This returns them. It first reaps dead processes,
        then returns only what stays unaccounted, with the workload's use unchanged, across 50 ms;
        call it when the workload is quiet (e.g. after its processes ended), since an allocation
        running at that instant is indistinguishable from a leak for a few nanoseconds.

        Returns:
            The bytes returned (0 when nothing leaked).

        Raises:
            AllocatorError: the workload is unknown or the ledger cannot be attached.
        """
        _check_key(key)
        return check(self._lib.torch_arbiter_ledger_reclaim(self.device, key), f"reclaiming workload {key}")

    def remove(self, key: int) -> None:
        """Free a workload's slot. Only when nothing is charged to it.

        Raises:
            AllocatorError: bytes are still charged to it, or it is unknown.
        """
        _check_key(key)
        check(self._lib.torch_arbiter_ledger_remove(self.device, key), f"removing workload {key}")

    def unlink(self) -> None:
        """Remove the segment's name (processes attached keep their mapping; new ones start afresh)."""
        check(self._lib.torch_arbiter_ledger_unlink(self.device), "removing the ledger segment")

    def __repr__(self) -> str:
        return f"Ledger(device={self.device}, name={self.name!r})"


def set_backend(name: str) -> None:
    """Choose what the library allocates with: ``"cuda"`` (default), ``"cuda_async"`` or ``"host"``.

    ``TORCH_ARBITER_ALLOC_BACKEND`` sets the same thing before the first allocation. ``host``
    (plain malloc) exists to test the ledger on machines without a GPU: never give its pointers
    to PyTorch as CUDA memory.

    Raises:
        InvalidRequestError: unknown name.
        AllocatorError: allocations of another backend are still live.
    """
    if name not in _BACKENDS:
        raise InvalidRequestError(f"unknown backend {name!r}: use one of {sorted(_BACKENDS)}")
    check(library().torch_arbiter_set_backend(_BACKENDS[name]), f"switching to the {name} backend")


def backend() -> str:
    """The backend in use (``"cuda"``, ``"cuda_async"`` or ``"host"``)."""
    code = library().torch_arbiter_backend()
    return next(name for name, value in _BACKENDS.items() if value == code)


def set_enforce(enforce: bool) -> None:
    """Refuse allocations past a limit (True, default) or only account for them (False).

    Accounting-only mode exists for the global allocator mode, where PyTorch does not check
    the pointer it gets back (see :func:`torch_arbiter.allocator.install`).
    """
    library().torch_arbiter_set_enforce(1 if enforce else 0)


def set_ledger_prefix(prefix: str) -> None:
    """Name the segments ``/<prefix>.u<uid>.d<device>`` (default ``torch_arbiter``).

    ``TORCH_ARBITER_LEDGER_PREFIX`` sets the same thing for a whole process tree. Processes
    that must share budgets must use the same prefix; tests use a unique one each.

    Raises:
        InvalidRequestError: not 1-96 characters of ``[A-Za-z0-9_.-]``.
        AllocatorError: a ledger is already attached (call :func:`detach_ledgers` first).
    """
    if not isinstance(prefix, str):
        raise InvalidRequestError(f"ledger prefix must be a string, got {prefix!r}")
    rc = library().torch_arbiter_ledger_set_prefix(prefix.encode())
    if rc == -22:  # EINVAL
        raise InvalidRequestError(f"ledger prefix {prefix!r} must be 1-96 characters of [A-Za-z0-9_.-]")
    check(rc, "setting the ledger prefix")


def detach_ledgers() -> None:
    """Unmap every ledger segment of this process (its slots and others' data stay).

    Raises:
        AllocatorError: this process still has live allocations, which the ledger must keep
            accounting for.
    """
    check(library().torch_arbiter_ledger_detach_all(), "detaching the ledgers")


def stats() -> AllocatorStats:
    """This process's counters: live blocks, refusals, ignored frees, bad arguments."""
    raw = Stats()
    library().torch_arbiter_get_stats(ctypes.byref(raw))
    return AllocatorStats(**{name: getattr(raw, name) for name, _ in Stats._fields_})


def last_refusal() -> RefusedAllocation | None:
    """The calling thread's last refused allocation, or None if it never had one."""
    raw = Refusal()
    if not library().torch_arbiter_last_refusal(ctypes.byref(raw)):
        return None
    return RefusedAllocation(
        key=raw.key,
        requested=raw.requested,
        used=raw.used,
        limit=None if raw.limit == UNLIMITED else raw.limit,
        device=raw.device,
        reason=_REFUSAL_REASONS.get(raw.reason, "unknown"),
    )


def clear_refusal() -> None:
    """Forget the calling thread's last refusal (so the next :func:`last_refusal` is fresh)."""
    library().torch_arbiter_clear_refusal()


def thread_workload() -> int:
    """The workload key the calling thread's allocations are charged to."""
    return library().torch_arbiter_thread_workload()


@contextlib.contextmanager
def selected_workload(key: int) -> Iterator[int]:
    """Charge the calling thread's allocations to ``key`` inside the block.

    The selection is per OS thread (a C thread-local), so other threads keep theirs; the
    previous key is restored on exit, so scopes nest.

    Yields:
        ``key``.
    """
    _check_key(key)
    lib = library()
    previous = lib.torch_arbiter_set_thread_workload(key)
    try:
        yield key
    finally:
        lib.torch_arbiter_set_thread_workload(previous)


class HostBlock:
    """A block of host memory charged to the calling thread's workload through the library.

    This is the host backend seen from Python: the same ``torch_arbiter_alloc`` /
    ``torch_arbiter_free`` pair PyTorch calls on CUDA, and the same failure PyTorch raises
    there, so code and tests written against it behave like CUDA code on a CPU machine.

    Args:
        nbytes: size (> 0).
        device: the ledger (device index) to charge.

    Raises:
        InvalidRequestError: ``nbytes`` is not an int in ``1..2**63-1`` (never wrapped by ctypes).
        torch.OutOfMemoryError: the workload's limit refused it (as PyTorch does on CUDA).
        AllocatorError: the library is not on the host backend.
    """

    def __init__(self, nbytes: int, device: int = 0) -> None:
        self.ptr = None
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or not 0 < nbytes <= _MAX_BLOCK:
            raise InvalidRequestError(f"nbytes must be an int in 1..2**63-1 (the allocator's ssize_t), got {nbytes!r}")
        if backend() != "host":
            raise AllocatorError("HostBlock needs the host backend: call set_backend('host') first")
        self._lib = library()
        self.nbytes, self.device = nbytes, _check_device(device)
        self.ptr = self._lib.torch_arbiter_alloc(nbytes, self.device, None)
        if not self.ptr:
            refusal = last_refusal()
            detail = f" ({refusal.used} of {refusal.limit} bytes in use)" if refusal and refusal.reason == "limit" else ""
            raise _out_of_memory_error()(f"torch_arbiter: {nbytes} bytes refused for workload {thread_workload()}{detail}")

    def free(self) -> None:
        """Give the block back (idempotent)."""
        if self.ptr:
            self._lib.torch_arbiter_free(self.ptr, self.nbytes, self.device, None)
            self.ptr = None

    def __enter__(self) -> "HostBlock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()

    def __del__(self) -> None:
        self.free()


def _out_of_memory_error() -> type[BaseException]:
    import torch

    return getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
