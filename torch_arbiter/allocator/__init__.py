"""The pluggable CUDA allocator: per-workload budgets on every allocation, shared across processes.

A small C library (``arbiter_alloc.c``, ``ledger.c``; built by ``pip install -e .`` with the
system C compiler, no CUDA needed at build time) exports ``torch_arbiter_alloc`` /
``torch_arbiter_free`` with the signatures ``torch.cuda.memory.CUDAPluggableAllocator`` loads.
Each allocation is charged to the calling thread's workload in a ledger kept in POSIX shared
memory (one segment per user and device, mode 0600), refused past the workload's limit, and
credited back on free; the bytes of a process that dies are reaped.

Use it through the arbiter::

    with arbiter.workload(allocation):      # pool mode: this thread's CUDA tensors go to
        out = model(**inputs)               # the allocation's MemPool, charged to its budget

    out = run_with_recovery(arbiter, allocation, model, **inputs)  # + OOM recovery and retry

Pool mode needs torch >= 2.8 (per-thread routing to a ``MemPool``); each thread of a workload
gets its own pool, and a workload's pools are retired (cached segments freed, ledger credited)
when it is lowered or released and by :func:`empty_pool_caches`. Or globally with
:func:`install` at start-up (limits documented there; a refusal there is
``torch.OutOfMemoryError`` too, never a null pointer). On a machine without a
GPU the host backend (``set_backend("host")``) runs the same code path on malloc, so the
ledger, attribution and cross-process logic are tested everywhere.

PyTorch limits designed around: inside a user MemPool the caching allocator does not empty its
cache and retry when the pool's allocator refuses (:func:`recover_from_oom` does it), and
``torch.cuda.memory_stats()`` is not supported with a global pluggable allocator (read the
:class:`Ledger` instead).
"""

from __future__ import annotations

from ._lib import library_path
from .ledger import (
    DEFAULT_WORKLOAD,
    AllocatorStats,
    HostBlock,
    Ledger,
    RefusedAllocation,
    WorkloadUsage,
    backend,
    clear_refusal,
    detach_ledgers,
    last_refusal,
    selected_workload,
    set_backend,
    set_enforce,
    set_ledger_prefix,
    stats,
    thread_workload,
    workload_key,
)
from .scope import empty_pool_caches, install, is_installed, pluggable_allocator, recover_from_oom, run_with_recovery, workload_scope

__all__ = [
    "DEFAULT_WORKLOAD",
    "AllocatorStats",
    "HostBlock",
    "Ledger",
    "RefusedAllocation",
    "WorkloadUsage",
    "backend",
    "clear_refusal",
    "detach_ledgers",
    "empty_pool_caches",
    "install",
    "is_installed",
    "last_refusal",
    "library_path",
    "pluggable_allocator",
    "recover_from_oom",
    "run_with_recovery",
    "selected_workload",
    "set_backend",
    "set_enforce",
    "set_ledger_prefix",
    "stats",
    "thread_workload",
    "workload_key",
    "workload_scope",
]
