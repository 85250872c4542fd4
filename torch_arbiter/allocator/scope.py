"""Workload scopes, the global allocator mode, and out-of-memory recovery.

Two ways to put the library under PyTorch:

* **pool mode** (default, what ``arbiter.workload(...)`` uses): each arbiter allocation gets a
  ``torch.cuda.MemPool`` whose segments come from the library; inside
  ``with arbiter.workload(allocation):`` the thread's CUDA allocations go to that pool, and
  PyTorch's caching allocator still caches on top, so the library sees only segment
  allocations (cheap). Works any time, after CUDA started too. Needs torch >= 2.8 (the first
  release that routes one *thread* to a pool, ``torch._C._cuda_beginAllocateCurrentThreadToPool``;
  before it every thread of the process was routed): older torch gets an :class:`AllocatorError`
  at the first scope, with global mode as the fallback. Each thread of a workload gets its own
  pool (PyTorch refuses to route two threads, or one thread twice, into one pool), and a
  workload's pools are *retired* (dropped, their cached segments freed through the library and
  credited to its ledger) when it is lowered or released and by :func:`empty_pool_caches`; the
  next scope starts a fresh pool.
* **global mode** (:func:`install`): the library replaces PyTorch's CUDA allocator for the whole
  process. It must run before anything initialises CUDA, there is no caching on top (every
  tensor is a cudaMalloc), and ``torch.cuda.memory_stats()`` and friends are unsupported.
  PyTorch does not check the pointer a global pluggable allocator returns, so in this mode the
  shim never returns a null one: a refusal or a failed cudaMalloc throws PyTorch's own
  ``c10::OutOfMemoryError`` (from ``oom.cpp``, built at ``install()``), i.e.
  ``torch.OutOfMemoryError`` in the caller.

Either way the ledger limit of each workload follows its ``Allocation.granted_bytes``: set when
a scope is entered and updated by an arbiter listener after every rebalance.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import math
import os
import shutil
import subprocess
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

from ..errors import AllocatorError, InvalidRequestError, WorkloadOutOfMemoryError
from ._lib import ALLOC_SYMBOL, FREE_SYMBOL, library, library_path
from .ledger import Ledger, _out_of_memory_error, backend, clear_refusal, last_refusal, selected_workload, set_enforce, workload_key

if TYPE_CHECKING:
    from ..allocation import Allocation
    from ..arbiter import Arbiter, QualityChange

__all__ = [
    "empty_pool_caches",
    "install",
    "is_installed",
    "pluggable_allocator",
    "recover_from_oom",
    "run_with_recovery",
    "workload_scope",
]

_log = logging.getLogger("torch_arbiter")
_T = TypeVar("_T")
_lock = threading.Lock()
_installed = False
_pluggable: Any = None
_oom_library: ctypes.CDLL | None = None  # kept loaded: the shim holds a pointer into it
_syncs: "weakref.WeakKeyDictionary[Arbiter, _LimitSync]" = weakref.WeakKeyDictionary()


def _require_cuda_torch() -> Any:
    import torch

    if not hasattr(torch._C, "_cuda_customAllocator") or not torch.cuda.is_available():
        raise AllocatorError(
            "the CUDA allocator needs a CUDA build of PyTorch and a visible GPU; on a CPU machine "
            "use the host backend (set_backend('host')) to exercise the ledger"
        )
    return torch


def pluggable_allocator() -> Any:
    """The process's ``torch.cuda.memory.CUDAPluggableAllocator`` over the library (made once).

    Returns:
        The allocator object (its ``.allocator()`` feeds ``torch.cuda.MemPool``).

    Raises:
        AllocatorError: no CUDA build of PyTorch, or the library is not built.
    """
    global _pluggable
    torch = _require_cuda_torch()
    with _lock:
        if _pluggable is None:
            library()  # fail with the library's own message before PyTorch's AssertionError
            loaded = _loaded_cudart()
            if loaded and not os.environ.get("TORCH_ARBITER_CUDART"):
                os.environ["TORCH_ARBITER_CUDART"] = loaded  # the C side resolves this copy first
            _pluggable = torch.cuda.memory.CUDAPluggableAllocator(library_path(), ALLOC_SYMBOL, FREE_SYMBOL)
        return _pluggable


def _loaded_cudart() -> str | None:
    """Path of the libcudart this process already mapped (PyTorch's), so the library uses that copy."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if os.path.basename(path).startswith("libcudart.so"):
                    return path
    except OSError:
        pass
    return None


def install(*, enforce: bool = True) -> None:
    """Make the library PyTorch's CUDA allocator for this whole process (global mode).

    Call it first thing, before any tensor touches CUDA. Every CUDA allocation of the process is
    then charged to the calling thread's workload (the default workload 0 outside any scope).

    Args:
        enforce: refuse allocations past a limit (True) or only account for them (False). A
            refusal, like a failed cudaMalloc, becomes ``torch.OutOfMemoryError`` in the caller:
            PyTorch's ``CUDAPluggableAllocator::allocate`` does not check the pointer a global
            pluggable allocator returns, so the shim throws PyTorch's own ``c10::OutOfMemoryError``
            from a small C++ helper (``oom.cpp``) instead of returning a null pointer. The helper
            is built once per torch version against the running torch's headers, with the system
            C++ compiler, into ``$TORCH_ARBITER_CACHE`` (default ``~/.cache/torch_arbiter``).

    Limits: no caching on top (every tensor is a cudaMalloc/cudaFree: slow for many small
    tensors, and ``empty_cache()`` has nothing to release); ``torch.cuda.memory_stats()`` and the
    functions built on it are not supported by PyTorch for a pluggable allocator (read the
    :class:`Ledger` instead); ``torch.cuda.MemPool`` scopes are unavailable,
    so ``arbiter.workload(...)`` only selects the workload. Prefer pool mode (no ``install()``).

    Raises:
        AllocatorError: CUDA is already initialised (restart the process and call ``install()``
            before anything uses CUDA), no CUDA build of PyTorch, the backend is ``host``, or no
            C++ compiler could build the out-of-memory helper.
    """
    global _installed
    torch = _require_cuda_torch()
    if _installed:
        return
    if torch.cuda.is_initialized():
        raise AllocatorError(
            "CUDA is already initialised, so PyTorch's allocator can no longer be replaced: call "
            "torch_arbiter.allocator.install() at the very start of the process, before any tensor "
            "or model is moved to CUDA (or use pool mode: just use arbiter.workload(...))"
        )
    if backend() == "host":
        raise AllocatorError("the library is on the host backend: set_backend('cuda') before install()")
    allocator = pluggable_allocator()
    _set_oom_handler(_load_oom_helper(torch))
    set_enforce(enforce)
    torch.cuda.memory.change_current_allocator(allocator)
    _installed = True


def _load_oom_helper(torch: Any) -> ctypes.CDLL:
    """The loaded out-of-memory helper (``oom.cpp``), built against ``torch``'s headers once.

    Args:
        torch: the imported torch module (its headers, ``libc10`` and C++ ABI flag are used).

    Returns:
        The helper library; its ``torch_arbiter_throw_oom(const char*)`` throws
        ``c10::OutOfMemoryError``.

    Raises:
        AllocatorError: no C++ compiler (set ``CXX``), or the build failed (its output quoted).
    """
    global _oom_library
    with _lock:
        if _oom_library is None:
            _oom_library = ctypes.CDLL(str(_build_oom_helper(torch)))
        return _oom_library


def _build_oom_helper(torch: Any) -> Path:
    source = Path(__file__).with_name("oom.cpp")
    root = Path(torch.__file__).parent
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    digest = hashlib.sha256(f"{torch.__version__}|{abi}|{root}|".encode() + source.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("TORCH_ARBITER_CACHE") or Path.home() / ".cache" / "torch_arbiter")
    target = cache / f"oom-{digest}.so"
    if target.is_file():
        return target
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise AllocatorError(
            "global mode needs a C++ compiler once, to build its out-of-memory helper against torch's "
            "headers (install g++ or set CXX), or use pool mode (no install())"
        )
    cache.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    errors = []
    for standard in ("c++20", "c++17"):  # torch >= 2.10 headers need C++20, older ones C++17
        command = [compiler, "-shared", "-fPIC", "-O1", f"-std={standard}", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
                   "-I", str(root / "include"), str(source), "-o", str(partial),
                   "-L", str(root / "lib"), "-lc10", f"-Wl,-rpath,{root / 'lib'}"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode == 0:
            os.replace(partial, target)  # whole or absent: a concurrent build never sees half a file
            return target
        errors.append(done.stderr.strip()[-1500:])
    raise AllocatorError(f"building the out-of-memory helper {source} failed ({compiler}): {errors[-1]}")


def _set_oom_handler(helper: ctypes.CDLL | None) -> None:
    """Make the shim throw through ``helper`` (global mode) or return NULL (``None``: pool mode)."""
    setter = library().torch_arbiter_set_oom_handler
    setter.argtypes, setter.restype = [ctypes.c_void_p], None
    setter(None if helper is None else ctypes.cast(helper.torch_arbiter_throw_oom, ctypes.c_void_p))


def is_installed() -> bool:
    """True once :func:`install` replaced PyTorch's CUDA allocator in this process."""
    return _installed


def _device_index(arbiter: "Arbiter") -> tuple[int, bool]:
    """(ledger device index, uses CUDA) of an arbiter's configured device."""
    device = str(getattr(arbiter.config, "device", "cpu"))
    if not device.startswith("cuda"):
        return 0, False
    torch = _require_cuda_torch()
    _, _, index = device.partition(":")
    return (int(index) if index else torch.cuda.current_device()), True


#: The torch function pool mode needs: route the calling thread (only) to a pool (torch >= 2.8).
_THREAD_ROUTING = "_cuda_beginAllocateCurrentThreadToPool"
_POOL_MODE_FLOOR = "2.8"
_routing = threading.local()  # .stack: the pools this thread's scopes entered, innermost last
_expandable = {"scopes": 0, "restore": False}  # guarded by _lock


class _Pool:
    """One thread's ``torch.cuda.MemPool`` of one workload, with its users (open scopes)."""

    def __init__(self, memory_pool: Any, device: int) -> None:
        self.memory_pool = memory_pool
        self.id = memory_pool.id
        self.device = device
        self.users = 0
        self.retired = False


def _release_cached(device: int) -> None:
    """Free every unused cached segment PyTorch may free now (dropped pools' included)."""
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()


def _require_pool_mode(torch: Any) -> None:
    if not hasattr(torch._C, _THREAD_ROUTING) or not hasattr(torch.cuda, "MemPool"):
        raise AllocatorError(
            f"pool mode needs torch >= {_POOL_MODE_FLOOR} (per-thread routing to a MemPool); this is torch "
            f"{torch.__version__}: upgrade PyTorch, or use global mode (torch_arbiter.allocator.install() "
            "at start-up, before CUDA is used)"
        )


def _expandable_segments_requested() -> bool:
    conf = ",".join(os.environ.get(name, "") for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"))
    settings = dict(item.split(":", 1) for item in conf.replace(" ", "").split(",") if ":" in item)
    return settings.get("expandable_segments", "").lower() == "true"


def _begin_routing(pool: _Pool) -> None:
    import torch

    torch._C._cuda_beginAllocateCurrentThreadToPool(pool.device, pool.id)


def _end_routing(pool: _Pool) -> None:
    import torch

    torch._C._cuda_endAllocateToPool(pool.device, pool.id)
    torch._C._cuda_releasePool(pool.device, pool.id)


def _suspend_expandable_segments() -> None:
    """Turn expandable segments off while any pool scope is open (some torch releases refuse them
    with an active custom-allocator pool; the others never use them for such a pool)."""
    import torch

    with _lock:
        _expandable["scopes"] += 1
        if _expandable["scopes"] == 1 and _expandable_segments_requested():
            torch.cuda.memory._set_allocator_settings("expandable_segments:False")
            _expandable["restore"] = True


def _resume_expandable_segments() -> None:
    import torch

    with _lock:
        _expandable["scopes"] -= 1
        if _expandable["scopes"] == 0 and _expandable["restore"]:
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")
            _expandable["restore"] = False


@contextlib.contextmanager
def _routed_to(pool: _Pool) -> Iterator[None]:
    """Route the calling thread's CUDA allocations to ``pool`` while the block runs.

    PyTorch routes a thread to the *first* pool it was routed to and refuses to route into a pool
    twice, so a thread is routed to one pool at a time: the innermost scope's. Entering another
    pool suspends the outer one; re-entering the same pool changes nothing.
    """
    stack = _routing.__dict__.setdefault("stack", [])
    outer = stack[-1] if stack else None
    if outer is not pool:
        if outer is None:
            _suspend_expandable_segments()
        else:
            _end_routing(outer)
        try:
            _begin_routing(pool)
        except BaseException:
            if outer is None:
                _resume_expandable_segments()
            else:
                _begin_routing(outer)
            raise
    stack.append(pool)
    try:
        yield
    finally:
        stack.pop()
        if outer is not pool:
            _end_routing(pool)
            if outer is None:
                _resume_expandable_segments()
            else:
                _begin_routing(outer)


class _LimitSync:
    """Keeps the ledger limit of each allocation of one arbiter = its granted bytes.

    Tracks the allocations that entered a scope or moved in a rebalance since this was made.

    Registered once per arbiter as a listener. It also owns the allocations' memory pools
    (pool mode: one per workload and thread), retired when their allocation is lowered or
    released. On CPU a ledger that cannot be
    attached (no writable /dev/shm) only costs the limits: scopes still select the workload.
    """

    def __init__(self, arbiter: "Arbiter") -> None:
        self.device, self.cuda = _device_index(arbiter)
        self.ledger: Ledger | None = None
        try:
            self.ledger = Ledger(self.device)
        except AllocatorError as exc:
            if self.cuda:
                raise
            _log.warning("torch_arbiter: no allocator ledger (%s); CPU scopes keep no per-allocation limit", exc)
        self._lock = threading.Lock()
        # Weak: an Allocation refers to its arbiter, which must stay collectable.
        self._tracked: "dict[int, weakref.ref[Allocation]]" = {}
        self._pools: dict[tuple[int, int], _Pool] = {}  # (workload key, thread ident) -> its pool
        arbiter.add_listener(self)

    def track(self, allocation: "Allocation") -> int:
        key = workload_key(allocation.id)
        with self._lock:
            self._tracked[key] = weakref.ref(allocation)
        self._set_limit(key, int(allocation.granted_bytes))
        return key

    def sync(self, allocation: "Allocation") -> None:
        self._set_limit(workload_key(allocation.id), int(allocation.granted_bytes))

    def _set_limit(self, key: int, limit: int) -> None:
        if self.ledger is not None:
            self.ledger.set_limit(key, limit)

    def enter(self, key: int) -> "_Pool":
        """The calling thread's pool of workload ``key`` (made on this arbiter's device), marked in use."""
        import torch

        ident = threading.get_ident()
        with self._lock:
            pool = self._pools.get((key, ident))
            if pool is None:
                with torch.cuda.device(self.device):  # a MemPool belongs to the current device
                    memory_pool = torch.cuda.MemPool(allocator=pluggable_allocator().allocator())
                pool = self._pools[(key, ident)] = _Pool(memory_pool, self.device)
            pool.users += 1
            return pool

    def leave(self, pool: "_Pool") -> None:
        """Undo :meth:`enter`; a pool retired while in use is dropped by its last user."""
        with self._lock:
            pool.users -= 1
            drop = pool.retired and pool.users == 0
        if drop:
            pool.memory_pool = None
            _release_cached(self.device)

    def retire(self, key: int | None = None) -> None:
        """Drop the pools of workload ``key`` (all when None) and free their cached segments.

        PyTorch frees a private pool's cached segments only once no ``MemPool`` refers to it, so
        a live pool can never give memory back: retiring drops it (the next scope starts a new
        one) and ``empty_cache()`` then frees its unused segments through the library, which
        credits the ledger. Blocks still held by tensors go back when those are freed and the
        next :func:`empty_pool_caches` runs. A pool in use by a scope is dropped on its exit.
        """
        with self._lock:
            chosen = [k for k in self._pools if key is None or k[0] == key]
            retired = [self._pools.pop(k) for k in chosen]
            for pool in retired:
                pool.retired = True
            idle = [pool for pool in retired if pool.users == 0]
        for pool in idle:
            pool.memory_pool = None
        if self.cuda and not _installed:
            _release_cached(self.device)

    def __call__(self, changes: "list[QualityChange]") -> None:
        changed = {workload_key(c.allocation.id): c.new_bytes for c in changes}
        lowered = [workload_key(c.allocation.id) for c in changes if c.new_bytes < c.old_bytes]
        with self._lock:  # every allocation the arbiter moves gets a limit, scoped yet or not
            self._tracked.update((workload_key(c.allocation.id), weakref.ref(c.allocation)) for c in changes)
            tracked = [(key, ref()) for key, ref in self._tracked.items()]
        for key, allocation in tracked:
            if allocation is None or allocation.released:
                self._forget(key)
            else:
                self._set_limit(key, int(changed.get(key, allocation.granted_bytes)))
        for key in lowered:  # a lowered workload's cached segments go back now
            self.retire(key)

    def _forget(self, key: int) -> None:
        with self._lock:
            self._tracked.pop(key, None)
        self.retire(key)
        if self.ledger is None:
            return
        self.ledger.set_limit(key, 0)
        with contextlib.suppress(AllocatorError):  # still charged: stays at limit 0 until freed
            self.ledger.remove(key)

    def forget_released(self) -> None:
        with self._lock:
            released = [key for key, ref in self._tracked.items() if ref() is None or ref().released]
        for key in released:
            self._forget(key)


def _sync_for(arbiter: "Arbiter") -> _LimitSync:
    with _lock:
        sync = _syncs.get(arbiter)
    if sync is None:
        created = _LimitSync(arbiter)
        with _lock:
            sync = _syncs.setdefault(arbiter, created)
        if sync is not created:
            arbiter.remove_listener(created)
    return sync


@contextlib.contextmanager
def workload_scope(arbiter: "Arbiter", allocation: "Allocation") -> Iterator["Allocation"]:
    """Charge the calling thread's allocations to ``allocation`` while the block runs.

    What ``arbiter.workload(...)`` returns. On a CUDA arbiter (``config.device`` ``"cuda..."``)
    in pool mode, the thread's CUDA allocations go to the allocation's own ``torch.cuda.MemPool``
    backed by the library; in global mode (:func:`install`) or on CPU only the workload is
    selected (on CPU the host backend then charges it: see :class:`HostBlock`). The ledger limit
    is the allocation's ``granted_bytes``, kept current by an arbiter listener.

    Args:
        arbiter: the arbiter that granted ``allocation``.
        allocation: an active :class:`~torch_arbiter.allocation.Allocation`.

    Yields:
        ``allocation``.

    Limits: per thread: threads started inside the block (autograd's backward threads, data
    loader workers) are not routed, and each thread gets its own pool (cached blocks are not
    shared between the threads of a workload). Scopes nest, the same allocation's too; the
    inner one wins until it exits. Pool mode needs torch >= 2.8; with
    ``expandable_segments:True`` in ``PYTORCH_CUDA_ALLOC_CONF`` expandable segments are off for
    the whole process while any scope is open.

    Raises:
        InvalidRequestError: ``allocation`` is released.
        AllocatorError: the library is missing, a CUDA arbiter without a CUDA PyTorch, torch
            older than 2.8 (no per-thread pool routing), or the library is on the host backend
            while CUDA pools need device memory.
    """
    if getattr(allocation, "released", False):
        raise InvalidRequestError(f"{allocation!r} is released: request a new allocation")
    sync = _sync_for(arbiter)
    sync.forget_released()
    key = sync.track(allocation)
    if not sync.cuda or _installed:
        with selected_workload(key):
            yield allocation
        return
    import torch

    _require_pool_mode(torch)
    if backend() == "host":
        raise AllocatorError("CUDA workloads need the cuda backend, the library is on 'host': set_backend('cuda')")
    pool = sync.enter(key)
    try:
        with _routed_to(pool), selected_workload(key):
            yield allocation
    finally:
        sync.leave(pool)


def empty_pool_caches(arbiter: "Arbiter") -> None:
    """Give the cached but unused segments of an arbiter's workload pools back to the device.

    Segments PyTorch caches in a workload's pool stay charged to that workload until released,
    and PyTorch frees a private pool's cache only once the pool is no longer referenced. So this
    retires every pool of the arbiter (each workload's next scope starts a new one) and runs
    ``torch.cuda.empty_cache()``: the segments are freed through the library, which credits each
    workload's ledger. A no-op on CPU and in global mode.

    Args:
        arbiter: the arbiter whose workload pools to empty.

    Limits: segments still holding live tensors (weights loaded in a scope) stay charged until
    those tensors are freed and this runs again; a pool a scope is using right now is retired
    when that scope exits.
    """
    _empty_caches(_sync_for(arbiter))


def _empty_caches(sync: _LimitSync) -> None:
    if not sync.cuda or _installed:
        return
    sync.retire()


def recover_from_oom(
    arbiter: "Arbiter", allocation: "Allocation", error: BaseException | None = None, *, headroom: float = 1.0
) -> bool:
    """One recovery step after ``torch.OutOfMemoryError`` in a workload: make room, say if it did.

    Asks the arbiter to grow ``allocation``'s grant by what the refused allocation needed
    (``arbiter.reclaim``: lower-priority workloads drop quality and free fragments), raises the
    ledger limit to the new grant, and empties the pool caches. PyTorch's caching allocator does
    not free its cache and retry by itself when a user MemPool's allocator refuses (it does so
    only for its own cudaMalloc), so emptying them is this function's job.

    Args:
        arbiter: the arbiter.
        allocation: the workload that ran out.
        error: the caught error (only logged).
        headroom: ask for this multiple (>= 1) of the shortfall: a forward makes many
            allocations and only the first refused one is known, so later retries ask for more
            (falling back to the bare shortfall when the multiple cannot be reclaimed).

    Returns:
        True when retrying makes sense: memory was granted, or the refusal came from the device
        itself (caches emptied). False when the arbiter could not reclaim without breaking a
        floor, or the error did not come from this workload's allocations in the library.
    """
    if not headroom >= 1.0:
        raise InvalidRequestError(f"headroom must be >= 1, got {headroom!r}")
    refusal = last_refusal()
    key = workload_key(allocation.id)
    sync = _sync_for(arbiter)
    if refusal is None or refusal.key != key or refusal.reason not in ("limit", "backend"):
        _empty_caches(sync)
        return False
    if refusal.reason == "backend":
        # Within budget, but the device itself had no room: workloads lowered a moment ago free
        # their fragments at their next safe point, and cached segments can go back now.
        _empty_caches(sync)
        return True
    shortfall = max(1, refusal.used + refusal.requested - (refusal.limit or 0))
    needed = math.ceil(shortfall * headroom)
    _log.info("workload %s refused %d bytes (%s); reclaiming %d", allocation.name, refusal.requested, error, needed)
    granted = arbiter.reclaim(allocation, needed) or (needed > shortfall and arbiter.reclaim(allocation, shortfall))
    sync.sync(allocation)
    _empty_caches(sync)
    return granted


def _holders(ledger: Ledger | None, names: dict[int, str]) -> str:
    if ledger is None:
        return "unknown (no ledger)"
    lines = []
    for usage in sorted(ledger.workloads(), key=lambda u: -u.used):
        if usage.used == 0:
            continue
        limit = "no limit" if usage.limit is None else f"limit {usage.limit}"
        lines.append(f"{names.get(usage.key, f'workload {usage.key:#x}')}: {usage.used} bytes ({limit})")
    return "; ".join(lines) or "nothing charged"


def run_with_recovery(
    arbiter: "Arbiter", allocation: "Allocation", fn: Callable[..., _T], *args: Any, retries: int = 3, **kwargs: Any
) -> _T:
    """Run ``fn(*args, **kwargs)`` inside ``allocation``'s scope, recovering from budget refusals.

    This is the workload boundary of OOM recovery: when the workload's limit refuses an
    allocation, PyTorch raises ``torch.OutOfMemoryError``; this catches it, calls
    :func:`recover_from_oom` (the arbiter lowers lower-priority workloads, caches are emptied)
    and runs ``fn`` again, at most ``retries`` more times; retry k asks for 2**k times the
    shortfall of the allocation that was refused.

    Args:
        arbiter: the arbiter that granted ``allocation``.
        allocation: the workload the call belongs to.
        fn: the work (a forward pass, a denoising step). It must be safe to run again from the
            start after a failed attempt (forward passes are).
        retries: extra attempts after the first (>= 0).

    Returns:
        What ``fn`` returns.

    Raises:
        WorkloadOutOfMemoryError: still refused after the retries, or the arbiter could not
            reclaim; the message names this workload's use and limit and who holds what.
        Any other exception of ``fn`` unchanged.
    """
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise InvalidRequestError(f"retries must be an int >= 0, got {retries!r}")
    out_of_memory = _out_of_memory_error()
    attempt = 0
    while True:
        clear_refusal()
        try:
            with workload_scope(arbiter, allocation):
                return fn(*args, **kwargs)
        except out_of_memory as exc:
            refusal = last_refusal()
            if attempt < retries and recover_from_oom(arbiter, allocation, exc, headroom=2.0**attempt):
                attempt += 1
                continue
            raise _budget_error(arbiter, allocation, refusal, attempt, exc) from exc


def _budget_error(
    arbiter: "Arbiter", allocation: "Allocation", refusal: Any, attempts: int, exc: BaseException
) -> WorkloadOutOfMemoryError:
    sync = _sync_for(arbiter)
    key = workload_key(allocation.id)
    names = {workload_key(a.id): f"{a.name or 'workload'} (allocation {a.id})" for a in arbiter.allocations()}
    mine = sync.ledger.usage(key) if sync.ledger is not None else None
    detail = (
        f"{refusal.requested} bytes refused with {refusal.used} of {refusal.limit} in use"
        if refusal is not None and refusal.key == key
        else f"out of memory: {exc}"
    )
    return WorkloadOutOfMemoryError(
        f"workload {allocation.name or allocation.id!r} ran out of its budget after {attempts} "
        f"recoveries: {detail}; it holds {mine.used if mine else 0} bytes of a "
        f"{allocation.granted_bytes}-byte grant. Holders on device {sync.device}: "
        f"{_holders(sync.ledger, names)}. Lower its batch or sequence length, give it a higher "
        "priority, or free other workloads"
    )
