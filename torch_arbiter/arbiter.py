"""The arbiter: grants memory to workloads and moves their quality at run time.

Unlike the seed crate, which never re-balanced running workloads and never read
the device after start-up, every grant, release, priority change and memory
change here recomputes the targets of *all* workloads (through the pure
:class:`~torch_arbiter.coordinator.Coordinator`) from a fresh device reading,
and pushes the changes to listeners (the hook layer), lowerings first so that
memory is freed before anyone grows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

from .allocation import Allocation, AllocationRequest, AllocationResult, AllocationState
from .coordinator import Coordinator, CoordinatorConfig
from .errors import (
    AllocationTimeoutError,
    ArbiterError,
    InsufficientMemoryError,
    InvalidRequestError,
    UnknownWorkloadError,
)
from .cache import CacheConfig, CacheStats, FragmentCache
from .cache.prefetch import Prefetcher
from .memory import GpuMemoryTracker, MemoryPressure
from .priority import Priority, WorkloadKind, WorkloadType, _kind_of
from .quality import QualityBudget, QualityPolicy

__all__ = [
    "Arbiter",
    "ArbiterConfig",
    "ArbiterState",
    "ArbiterStats",
    "ArbiterError",
    "QualityChange",
    "WorkloadInfo",
    "get_default_arbiter",
]

_GIB = 1 << 30
_log = logging.getLogger("torch_arbiter")


@dataclass(frozen=True)
class ArbiterConfig:
    """How an :class:`Arbiter` sees its device and shares it.

    Args:
        vram_bytes: bytes the arbiter plans with. Required for a virtual (CPU)
            device; on CUDA, None means the whole card, and a value larger than
            the card is refused.
        device: ``"cpu"`` (virtual device) or ``"cuda:N"``.
        reserve_bytes: head-room never granted (CUDA context, fragmentation).
        policy: the :class:`QualityPolicy`.
        fixed_quality: the quality under ``QualityPolicy.FIXED``.
        allow_preemption: a higher-priority request may suspend a lower one.
        monitor_interval_s: poll the device this often and rebalance when other
            processes take or free memory; None disables the monitor.
        metrics_port: serve Prometheus metrics on ``127.0.0.1:metrics_port`` from the start
            (0: a free port; see :meth:`Arbiter.serve_metrics`); None serves none. Needs the
            ``metrics`` extra.
        status_interval_s: publish this arbiter's status for ``torch-arbiter top`` (a 0600 JSON
            file, see :mod:`torch_arbiter.status`) after each change and at this interval; None
            publishes nothing.
        cache: the layout of the arbiter's fragment cache (``arbiter.cache``), which every
            patched model reads its fragments from; None: ``CacheConfig(device=device)``
            (unbounded HOST, a private spill directory). Bound RAM with
            ``CacheConfig(host_capacity_bytes=...)``.
        prefetch_workers: fetches in flight at once when fragments are brought into HOST ahead
            of a raise (``arbiter.prefetcher``).
    """

    vram_bytes: int | None = None
    device: str = "cpu"
    reserve_bytes: int = 0
    policy: QualityPolicy = QualityPolicy.ADAPTIVE
    fixed_quality: float = 1.0
    allow_preemption: bool = True
    monitor_interval_s: float | None = None
    metrics_port: int | None = None
    status_interval_s: float | None = 1.0
    cache: CacheConfig | None = None
    prefetch_workers: int = 4

    def __post_init__(self) -> None:
        if self.vram_bytes is not None and (not isinstance(self.vram_bytes, int) or self.vram_bytes <= 0):
            raise InvalidRequestError(f"vram_bytes must be a positive byte count, got {self.vram_bytes!r}")
        if not isinstance(self.reserve_bytes, int) or self.reserve_bytes < 0:
            raise InvalidRequestError(f"reserve_bytes must be >= 0, got {self.reserve_bytes!r}")
        if self.vram_bytes is not None and self.reserve_bytes >= self.vram_bytes:
            raise InvalidRequestError("reserve_bytes must be smaller than vram_bytes")
        if self.monitor_interval_s is not None and not self.monitor_interval_s > 0:
            raise InvalidRequestError("monitor_interval_s must be > 0 seconds or None")
        if self.metrics_port is not None and (isinstance(self.metrics_port, bool) or not isinstance(self.metrics_port, int)
                                              or not 0 <= self.metrics_port <= 65535):
            raise InvalidRequestError(f"metrics_port must be a TCP port in [0, 65535] or None, got {self.metrics_port!r}")
        if self.status_interval_s is not None and not self.status_interval_s > 0:
            raise InvalidRequestError("status_interval_s must be > 0 seconds or None")
        if self.cache is not None and not isinstance(self.cache, CacheConfig):
            raise InvalidRequestError(f"cache must be a torch_arbiter.CacheConfig or None, got {type(self.cache).__name__}")
        if isinstance(self.prefetch_workers, bool) or not isinstance(self.prefetch_workers, int) or self.prefetch_workers < 1:
            raise InvalidRequestError(f"prefetch_workers must be an int >= 1, got {self.prefetch_workers!r}")
        CoordinatorConfig(self.policy, self.fixed_quality, self.allow_preemption)

    @classmethod
    def for_vram_gb(cls, gb: float, **kwargs: object) -> "ArbiterConfig":
        """A config for a device of ``gb`` GiB (virtual on CPU unless ``device=`` says otherwise).

        Args:
            gb: device size in GiB (> 0).
            **kwargs: any other :class:`ArbiterConfig` field.

        Returns:
            The config.
        """
        if not (isinstance(gb, (int, float)) and math.isfinite(gb) and gb > 0):
            raise InvalidRequestError(f"vram size must be a positive number of GiB, got {gb!r}")
        return cls(vram_bytes=int(gb * _GIB), **kwargs)

    @classmethod
    def auto_detect(cls, *, virtual_gb: float = 16.0, **kwargs: object) -> "ArbiterConfig":
        """A config for the first GPU found by :class:`~torch_arbiter.gpu.GpuDetector`.

        Args:
            virtual_gb: size of the virtual device when no CUDA device is usable.
            **kwargs: any other :class:`ArbiterConfig` field.

        Returns:
            ``device="cuda:0"`` sized by the card when torch can use CUDA; else a
            virtual CPU device of ``virtual_gb`` GiB.

        Limits: an AMD or Apple GPU is detected but not managed (torch_arbiter
        drives CUDA only), so it yields the virtual device.
        """
        import torch

        from .gpu import GpuDetector, GpuVendor

        detected = GpuDetector().detect()
        if torch.cuda.is_available() and detected.gpus and detected.gpus[0].vendor is GpuVendor.NVIDIA:
            return cls(vram_bytes=int(detected.gpus[0].total_bytes), device="cuda:0", **kwargs)
        return cls.for_vram_gb(virtual_gb, **kwargs)


@dataclass(frozen=True)
class QualityChange:
    """One allocation's move in a rebalance, as given to listeners."""

    allocation: Allocation
    old_quality: float
    new_quality: float
    old_bytes: int
    new_bytes: int

    @property
    def lowered(self) -> bool:
        """True when the quality went down."""
        return self.new_quality < self.old_quality


@dataclass(frozen=True)
class WorkloadInfo:
    """A snapshot of one allocation inside :class:`ArbiterState`."""

    id: int
    name: str
    workload: str
    priority: Priority
    state: AllocationState
    quality: float
    granted_bytes: int
    full_bytes: int
    held_bytes: int = 0  # what its holder holds now (see Arbiter.held_bytes)


@dataclass(frozen=True)
class ArbiterState:
    """A snapshot of the arbiter (see :meth:`Arbiter.state`)."""

    capacity_bytes: int
    total_bytes: int
    granted_bytes: int
    external_bytes: int
    pressure: MemoryPressure
    policy: QualityPolicy
    workloads: tuple[WorkloadInfo, ...]

    @property
    def waiting(self) -> int:
        """Requests waiting for memory."""
        return sum(w.state is AllocationState.WAITING for w in self.workloads)


@dataclass
class ArbiterStats:
    """Counters since the arbiter was made; every one is counted where it happens (``cache``:
    a snapshot of the fragment cache's counters, per tier)."""

    grants: int = 0
    releases: int = 0
    waits: int = 0
    total_wait_s: float = 0.0
    quality_reductions: int = 0
    quality_increases: int = 0
    preemptions: int = 0
    resumptions: int = 0
    failures: int = 0
    timeouts: int = 0
    oom_recoveries: int = 0
    rebalances: int = 0
    last_rebalance_s: float = 0.0
    cache: CacheStats | None = None

    @property
    def average_wait_s(self) -> float:
        """Mean wait of the requests that had to wait (0 when none did)."""
        return self.total_wait_s / self.waits if self.waits else 0.0


@dataclass
class _Waiter:
    event: threading.Event = field(default_factory=threading.Event)
    loop: asyncio.AbstractEventLoop | None = None
    future: "asyncio.Future[None] | None" = None

    def wake(self) -> None:
        self.event.set()
        if self.loop is not None and self.future is not None:
            self.loop.call_soon_threadsafe(_resolve, self.future)


def _remaining(timeout: float | None, started: float) -> float | None:
    return None if timeout is None else timeout - (time.monotonic() - started)


def _resolve(future: "asyncio.Future[None]") -> None:
    if not future.done():
        future.set_result(None)


Listener = Callable[[list[QualityChange]], None]


class _Applier:
    """One thread per arbiter that applies new levels to models that are idle.

    A model that is running applies its new level itself, in its forward's thread, at its next
    safe point; one that is idle is moved here, never in the thread that caused the rebalance
    (a caller's event loop, another model's forward, the memory monitor). ``settle()``
    callables return True when their model has nothing left to apply; the others (a raise
    whose memory is still held by someone else, a model busy in a forward) are tried again at
    every wake-up. The thread holds no reference to the arbiter, so an arbiter stays collectable.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._settles: dict[int, Callable[[], bool]] = {}
        self._dirty: set[int] = set()
        self._blocked: set[int] = set()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._epoch = 0  # wake-ups so far: one that lands while settling is not lost

    def bind(self, key: int, settle: Callable[[], bool]) -> None:
        with self._cond:
            self._settles[key] = settle
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._run, name="torch_arbiter-applier", daemon=True)
                self._thread.start()

    def unbind(self, key: int) -> None:
        with self._cond:
            self._settles.pop(key, None)
            self._dirty.discard(key)
            self._blocked.discard(key)

    def wake(self, keys: "set[int] | None" = None) -> None:
        """Settle ``keys`` (None: memory was freed, so retry the blocked ones)."""
        with self._cond:
            if keys:
                self._dirty.update(k for k in keys if k in self._settles)
            self._epoch += 1
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def _run(self) -> None:
        seen = 0
        while True:
            with self._cond:
                while not self._dirty and self._epoch == seen and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                seen = self._epoch
                keys = self._dirty | self._blocked
                self._dirty, self._blocked = set(), set()
                work = [(k, self._settles[k]) for k in sorted(keys) if k in self._settles]
            for key, settle in work:
                try:
                    done = settle()
                except Exception:  # a model that fails to move must not stop the others
                    _log.exception("torch_arbiter: applying a new level to allocation %d failed", key)
                    done = True
                if not done:
                    with self._cond:
                        if key in self._settles:
                            self._blocked.add(key)


def _close_cache(cache: FragmentCache, prefetcher: Prefetcher) -> None:
    prefetcher.close()
    cache.close()


class Arbiter:
    """Grants device memory to workloads and keeps every workload's quality up to date.

    Args:
        config: device and policy; :meth:`ArbiterConfig.auto_detect` when None.
        tracker: the memory reader; built from ``config`` when None.

    Thread-safe: requests, releases and rebalances may come from any thread
    (generation threads, the event loop, the memory monitor). Listeners run
    outside the lock, in the thread that caused the rebalance.
    """

    def __init__(self, config: ArbiterConfig | None = None, *, tracker: GpuMemoryTracker | None = None) -> None:
        self.config = config or ArbiterConfig.auto_detect()
        self.tracker = tracker or GpuMemoryTracker(self.config.device, self.config.vram_bytes)
        total = self.tracker.read().total_bytes
        if self.config.vram_bytes is not None and self.config.vram_bytes > total:
            raise InvalidRequestError(
                f"the configured budget ({self.config.vram_bytes} bytes) is larger than the device "
                f"({total} bytes): use ArbiterConfig.for_vram_gb with at most {total / _GIB:.1f}"
            )
        self.coordinator = Coordinator(
            CoordinatorConfig(self.config.policy, self.config.fixed_quality, self.config.allow_preemption)
        )
        self._lock = threading.RLock()
        self._allocations: dict[int, Allocation] = {}
        self._budgets: dict[int, QualityBudget] = {}  # the coordinator's view of each allocation, rebuilt on change
        self._waiters: dict[int, _Waiter] = {}
        self._listeners: list[Listener] = []
        self._next_id = 1
        self._stats = ArbiterStats()
        self._closed = False
        # What each allocation holds now (weights + activation reserve), as its holder reported:
        # a patched model commits its bytes (see _settle_model); a bare allocation holds its
        # grant once the others made room. Raising waits for room, so the sum stays within the
        # capacity (up to an external process taking memory before the models lower).
        self._held: dict[int, int] = {}
        self._generation: dict[int, int] = {}  # bumps when an allocation's target changes
        self._applied: dict[int, int] = {}  # the generation each patched model last committed
        self._bound: set[int] = set()  # allocations whose holder is a patched model
        self._settled = threading.Condition(self._lock)
        self._applier = _Applier()
        self.cache = FragmentCache(self.config.cache or CacheConfig(device=self.config.device))
        self.prefetcher = Prefetcher(self.cache, workers=self.config.prefetch_workers)
        # Patched models may outlive close(): the cache goes when the arbiter object does.
        weakref.finalize(self, _close_cache, self.cache, self.prefetcher)
        self._metrics_servers: list = []
        if self.config.monitor_interval_s is not None:
            self.tracker.start_monitor(lambda _stats: self.rebalance(), self.config.monitor_interval_s)
        if self.config.metrics_port is not None:
            self.serve_metrics(self.config.metrics_port)
        self._status = None
        if self.config.status_interval_s is not None:
            from .status import StatusPublisher

            self._status = StatusPublisher(self, self.config.status_interval_s).start()
            self.add_listener(self._status.request)

    # ---- requests -------------------------------------------------------------------------

    async def request_allocation(
        self,
        workload: "WorkloadType | WorkloadKind",
        priority: "Priority | int | str" = Priority.NORMAL,
        **options: object,
    ) -> Allocation:
        """Ask for memory for a workload; wait (without blocking the loop) until it is granted.

        Args:
            workload: a :class:`WorkloadType` or custom :class:`WorkloadKind`.
            priority: a :class:`Priority`.
            **options: ``bytes`` (full-quality bytes; default the kind's typical size:
                8 GiB LLM, 6 GiB image, 12 GiB video), ``min_quality``, ``timeout``
                (seconds), ``wait`` (False: fail at once), ``name``, ``curve``,
                ``activation_bytes`` — see :class:`AllocationRequest`.

        Returns:
            The :class:`Allocation`, active, its ``quality`` live.

        Raises:
            InvalidRequestError: bad arguments (state unchanged).
            InsufficientMemoryError: the floor can never fit, or ``wait=False`` and it does not fit now.
            AllocationTimeoutError: not granted within ``timeout``.
        """
        request = AllocationRequest.build(workload, priority, **options)
        allocation, waiter = self._submit(request)
        if waiter is None:
            return allocation
        waiter.loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            while not self._claim(allocation, waiter, started):
                remaining = _remaining(request.timeout, started)
                if remaining is not None and remaining <= 0:
                    self._time_out(allocation, started)
                try:
                    await asyncio.wait_for(waiter.future, remaining)
                except asyncio.TimeoutError:
                    pass
        except AllocationTimeoutError:
            raise
        except BaseException:
            self._abandon(allocation, started, timed_out=False)
            raise
        return allocation

    def request_allocation_blocking(
        self,
        workload: "WorkloadType | WorkloadKind",
        priority: "Priority | int | str" = Priority.NORMAL,
        **options: object,
    ) -> Allocation:
        """The blocking twin of :meth:`request_allocation`, for code without an event loop.

        Same arguments, result and errors; blocks the calling thread while waiting.
        """
        return self._allocate_blocking(AllocationRequest.build(workload, priority, **options))

    def try_allocate(
        self,
        workload: "WorkloadType | WorkloadKind",
        priority: "Priority | int | str" = Priority.NORMAL,
        **options: object,
    ) -> AllocationResult:
        """Like :meth:`request_allocation_blocking`, but returns the outcome instead of raising.

        Returns:
            An :class:`AllocationResult` with the allocation or the ``ArbiterError``.
        """
        started = time.monotonic()
        request = None
        try:
            request = AllocationRequest.build(workload, priority, **options)
            allocation = self._allocate_blocking(request)
            return AllocationResult(request, allocation, None, time.monotonic() - started)
        except ArbiterError as exc:
            return AllocationResult(request, None, exc, time.monotonic() - started)

    def _request_bound_blocking(self, workload, priority, **options: object) -> Allocation:
        """:meth:`request_allocation_blocking` for a patched model, which commits its own bytes."""
        return self._allocate_blocking(AllocationRequest.build(workload, priority, **options), bound=True)

    def _allocate_blocking(self, request: AllocationRequest, *, bound: bool = False) -> Allocation:
        allocation, waiter = self._submit(request, bound=bound)
        if waiter is None:
            return allocation
        started = time.monotonic()
        while not self._claim(allocation, waiter, started):
            remaining = _remaining(request.timeout, started)
            if remaining is not None and remaining <= 0:
                self._time_out(allocation, started)
            waiter.event.wait(remaining)
        return allocation

    def _submit(self, request: AllocationRequest, *, bound: bool = False) -> tuple[Allocation, _Waiter | None]:
        with self._lock:
            self._check_open()
            limit = self._capacity_limit()
            floor_bytes = int(request.min_quality * request.bytes) + request.activation_bytes
            if floor_bytes > limit:
                self._stats.failures += 1
                raise InsufficientMemoryError(
                    f"{request.name}: its floor needs {floor_bytes} bytes (quality {request.min_quality:.2f} of "
                    f"{request.bytes} bytes + {request.activation_bytes} activation bytes) but the device offers "
                    f"at most {limit}: lower min_quality or bytes, or use a larger device"
                )
            allocation = Allocation(self, self._next_id, request, self._next_id)
            self._next_id += 1
            self._allocations[allocation.id] = allocation
            if bound:
                self._bound.add(allocation.id)
            changes = self._rebalance_locked()
            if self._holds_grant_locked(allocation):
                self._stats.grants += 1
                waiter = None
            elif not request.wait and allocation.state is not AllocationState.ACTIVE:
                del self._allocations[allocation.id]
                self._forget_locked(allocation.id)
                allocation.state = AllocationState.RELEASED
                self._stats.failures += 1
                changes += self._rebalance_locked()
                self._notify(changes)
                raise InsufficientMemoryError(
                    f"{request.name}: no room for its floor right now ({floor_bytes} bytes): "
                    "retry later, lower min_quality, or pass wait=True"
                )
            else:
                self._stats.waits += 1
                waiter = self._waiters[allocation.id] = _Waiter()
        self._notify(changes)
        return allocation, waiter

    def _claim(self, allocation: Allocation, waiter: _Waiter, started: float) -> bool:
        """Take the grant if the allocation is active and its bytes are free now; else re-arm the waiter.

        A wake-up is only a hint: between it and this check another rebalance may have
        suspended the allocation again, so the state is checked under the lock, and the
        waiter is cleared there too (wakes happen under the same lock, so none is lost).
        A bare allocation (no patched model behind it) is handed out only once the models
        lowered for it have passed their safe points, so its bytes are really free.
        """
        with self._lock:
            if self._holds_grant_locked(allocation):
                self._waiters.pop(allocation.id, None)
                self._stats.total_wait_s += time.monotonic() - started
                self._stats.grants += 1
                return True
            waiter.event.clear()
            if waiter.loop is not None:
                waiter.future = waiter.loop.create_future()
            return False

    def _time_out(self, allocation: Allocation, started: float) -> None:
        waited = time.monotonic() - started
        with self._lock:
            self._stats.total_wait_s += waited
        self._abandon(allocation, started, timed_out=True)
        raise AllocationTimeoutError(
            f"{allocation.name}: no memory within {allocation.request.timeout} s (waited {waited:.2f} s): "
            "raise the timeout, lower min_quality, or release other workloads"
        )

    def _abandon(self, allocation: Allocation, started: float, *, timed_out: bool) -> None:
        with self._lock:
            self._waiters.pop(allocation.id, None)
            self._allocations.pop(allocation.id, None)
            self._forget_locked(allocation.id)
            allocation.state = AllocationState.RELEASED
            allocation.quality, allocation.granted_bytes = 0.0, 0
            self._stats.failures += 1
            self._stats.timeouts += int(timed_out)
            changes = self._rebalance_locked()
        self._notify(changes)

    # ---- changes to running workloads -------------------------------------------------------

    def release(self, allocation: "Allocation | int") -> None:
        """Give an allocation's memory back and rebalance the others.

        Args:
            allocation: the :class:`Allocation` (or its id).

        Raises:
            UnknownWorkloadError: already released, or not granted by this arbiter (state unchanged).
        """
        with self._lock:
            target = self._resolve(allocation)
            del self._allocations[target.id]
            self._forget_locked(target.id)
            self._waiters.pop(target.id, None)
            target.state = AllocationState.RELEASED
            target.quality, target.granted_bytes = 0.0, 0
            self._stats.releases += 1
            changes = self._rebalance_locked()
        self._notify(changes)

    def update_priority(self, allocation: "Allocation | int", priority: "Priority | int | str") -> None:
        """Change a workload's priority and rebalance.

        Raises:
            UnknownWorkloadError: unknown or released allocation.
            InvalidRequestError: not a priority.
        """
        prio = Priority.coerce(priority)
        with self._lock:
            target = self._resolve(allocation)
            target.priority = prio
            changes = self._rebalance_locked()
        self._notify(changes)

    def reclaim(self, allocation: "Allocation | int", nbytes: int) -> bool:
        """Grow an active allocation's budget by ``nbytes`` by lowering lower-priority workloads.

        Used by out-of-memory recovery: the workload hit its budget in the middle of a
        forward, when its own weights cannot shrink, so its quality is held where it is and
        the bytes must come from others' quality above their floors. Nobody is suspended.

        Args:
            allocation: the allocation that ran out.
            nbytes: extra bytes needed (> 0); kept as part of its activation reserve.

        Returns:
            True when its ``granted_bytes`` grew by ``nbytes``; False when that cannot be
            done without breaking a floor or suspending someone (then nothing changed).
        """
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            raise InvalidRequestError(f"nbytes must be a positive byte count, got {nbytes!r}")
        with self._lock:
            target = self._resolve(allocation)
            if target.state is not AllocationState.ACTIVE:
                return False
            wanted = target.granted_bytes + nbytes
            target.activation_bytes += nbytes
            plan = self._plan_locked(hold={target.id: target.quality})
            active = [a.id for a in self._allocations.values() if a.state is AllocationState.ACTIVE]
            if not all(plan[k].admitted for k in active) or plan[target.id].granted_bytes < wanted:
                target.activation_bytes -= nbytes
                return False
            # In use now, by the forward that ran out: the others lower at their next safe point.
            if target.id in self._held:
                self._held[target.id] += nbytes
            changes = self._apply_locked(plan)
        self._notify(changes)
        return True

    def rebalance(self) -> list[QualityChange]:
        """Re-read the device and recompute every workload's target now.

        Called by the memory monitor; call it yourself after changing what else
        runs on the device. Returns the changes (also sent to listeners).
        """
        with self._lock:
            if self._closed:
                return []
            changes = self._rebalance_locked()
        self._notify(changes)
        return changes

    # ---- listeners, scopes, introspection ---------------------------------------------------

    def add_listener(self, callback: Listener) -> None:
        """Call ``callback(changes)`` after every rebalance that changed a quality.

        Lowerings come first in ``changes``, then raisings. The callback runs
        outside the arbiter's lock in the thread that caused the rebalance; an
        exception in it is logged and does not stop the others.
        """
        with self._lock:
            self._listeners.append(callback)

    def remove_listener(self, callback: Listener) -> None:
        """Stop calling ``callback`` (no error if it was not registered)."""
        with self._lock:
            with contextlib.suppress(ValueError):
                self._listeners.remove(callback)

    def workload(self, target: "Allocation | WorkloadType | WorkloadKind") -> contextlib.AbstractContextManager:
        """Route this thread's CUDA allocations to a workload's budget while the block runs.

        Args:
            target: an :class:`Allocation`, or a workload kind with exactly one active allocation.

        Returns:
            A context manager (see :func:`torch_arbiter.allocator.workload_scope`).
        """
        from .allocator import workload_scope

        if isinstance(target, Allocation):
            return workload_scope(self, self._resolve(target))
        kind = _kind_of(target)
        with self._lock:
            matches = [a for a in self._allocations.values() if a.workload == kind and a.state is AllocationState.ACTIVE]
        if len(matches) != 1:
            raise UnknownWorkloadError(
                f"{len(matches)} active allocations of kind {kind.name}: pass the Allocation itself"
            )
        return workload_scope(self, matches[0])

    def allocations(self) -> list[Allocation]:
        """The allocations not yet released (active, suspended or waiting), oldest first."""
        with self._lock:
            return sorted(self._allocations.values(), key=lambda a: a.sequence)

    def state(self) -> ArbiterState:
        """A consistent snapshot of the device and every workload."""
        with self._lock:
            reading = self.tracker.read()
            return ArbiterState(
                capacity_bytes=self._capacity(reading),
                total_bytes=reading.total_bytes,
                granted_bytes=sum(a.granted_bytes for a in self._allocations.values()),
                external_bytes=reading.external_bytes,
                pressure=reading.pressure,
                policy=self.config.policy,
                workloads=tuple(
                    WorkloadInfo(a.id, a.name, a.workload.name, a.priority, a.state, a.quality, a.granted_bytes, a.full_bytes,
                                 self._held.get(a.id, 0))
                    for a in sorted(self._allocations.values(), key=lambda a: a.sequence)
                ),
            )

    def stats(self) -> ArbiterStats:
        """A copy of the counters."""
        with self._lock:
            counters = dict(vars(self._stats), cache=self.cache.stats())
        return ArbiterStats(**counters)

    def serve_metrics(self, port: int, addr: str = "127.0.0.1"):
        """Serve this arbiter's Prometheus metrics on ``http://addr:port/metrics`` until :meth:`close`.

        Args:
            port: TCP port (0: a free one, read it from the result's ``port``).
            addr: address to bind; the default serves this machine only.

        Returns:
            The :class:`~torch_arbiter.metrics.MetricsServer`.

        Raises:
            OptionalDependencyError: ``prometheus_client`` is missing (the ``metrics`` extra).
            InvalidRequestError: bad or busy port.
        """
        from .metrics import serve_metrics

        server = serve_metrics(self, port, addr)
        with self._lock:
            self._metrics_servers.append(server)
        return server

    @property
    def metrics_urls(self) -> list[str]:
        """The scrape URLs of the metrics servers this arbiter runs (``metrics_port`` or :meth:`serve_metrics`)."""
        with self._lock:
            return [server.url for server in self._metrics_servers]

    def close(self) -> None:
        """Stop the memory monitor, the metrics servers and the status file; further requests fail.
        Allocations stay readable."""
        with self._lock:
            self._closed = True
            servers, self._metrics_servers = self._metrics_servers, []
        self._applier.stop()
        self.tracker.stop_monitor()
        for server in servers:
            server.close()
        if self._status is not None:
            self._status.close()

    def _repr_html_(self) -> str:
        """Jupyter's view: the device line and a table of every workload."""
        from ._display import arbiter_view

        return arbiter_view(self).html()

    def __rich__(self):
        """rich's view: the same table as :meth:`_repr_html_`."""
        from ._display import arbiter_view

        return arbiter_view(self).rich()

    def __enter__(self) -> "Arbiter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- internals ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ArbiterError("this arbiter is closed: make a new Arbiter")

    def _resolve(self, allocation: "Allocation | int") -> Allocation:
        key = allocation.id if isinstance(allocation, Allocation) else allocation
        found = self._allocations.get(key) if isinstance(key, int) else None
        if found is None or (isinstance(allocation, Allocation) and found is not allocation):
            raise UnknownWorkloadError(
                f"allocation {allocation!r} is not held by this arbiter (already released, or from another "
                "arbiter): keep the Allocation returned by request_allocation and release it once"
            )
        return found

    def _capacity_limit(self) -> int:
        return self.tracker.read().total_bytes - self.config.reserve_bytes

    def _capacity(self, reading) -> int:
        return max(0, reading.total_bytes - self.config.reserve_bytes - reading.external_bytes)

    def _plan_locked(self, hold: dict[int, float] | None = None):
        budgets = []
        for a in self._allocations.values():
            floor = max(a.min_quality, hold.get(a.id, 0.0)) if hold else a.min_quality
            budget = self._budgets.get(a.id)
            if budget is None or (budget.priority, budget.activation_bytes, budget.floor) != (a.priority, a.activation_bytes, floor):
                budget = QualityBudget(a.id, a.priority, floor, a.full_bytes, a.activation_bytes, a.sequence,
                                       a.workload.name, curve=a.request.curve)
                self._budgets[a.id] = budget
            budgets.append(budget)
        for stale in self._budgets.keys() - self._allocations.keys():
            del self._budgets[stale]
        active = [a.id for a in self._allocations.values() if a.state is AllocationState.ACTIVE]
        return self.coordinator.compute(budgets, self._capacity(self.tracker.read()), active)

    def _rebalance_locked(self) -> list[QualityChange]:
        return self._apply_locked(self._plan_locked())

    def _apply_locked(self, plan) -> list[QualityChange]:
        started = time.perf_counter()
        changes = []
        moved: set[int] = set()
        for alloc in self._allocations.values():
            target = plan[alloc.id]
            old_q, old_b, old_state = alloc.quality, alloc.granted_bytes, alloc.state
            if target.admitted:
                alloc.state = AllocationState.ACTIVE
                alloc.quality, alloc.granted_bytes = target.quality, target.granted_bytes
                if alloc.id in self._waiters:  # a request still waiting: admitted now (again)
                    self._waiters[alloc.id].wake()
                elif old_state is AllocationState.SUSPENDED:
                    self._stats.resumptions += 1
            elif old_state is AllocationState.ACTIVE:
                alloc.state = AllocationState.SUSPENDED
                alloc.quality, alloc.granted_bytes = 0.0, 0
                self._stats.preemptions += 1
            if alloc.state is not old_state or alloc.quality != old_q:
                self._generation[alloc.id] = self._generation.get(alloc.id, 0) + 1
                if alloc.id in self._bound:
                    moved.add(alloc.id)
            if old_state is AllocationState.WAITING or alloc.quality == old_q:
                continue
            if alloc.quality < old_q:
                self._stats.quality_reductions += 1
            else:
                self._stats.quality_increases += 1
            changes.append(QualityChange(alloc, old_q, alloc.quality, old_b, alloc.granted_bytes))
        self.tracker.set_granted(sum(a.granted_bytes for a in self._allocations.values()))
        self._sync_bare_locked()
        if moved:
            self._applier.wake(moved)
        self._stats.rebalances += 1
        self._stats.last_rebalance_s = time.perf_counter() - started
        changes.sort(key=lambda c: not c.lowered)
        return changes

    # ---- what each allocation holds (the live path) -------------------------------------------

    def _holds_grant_locked(self, allocation: Allocation) -> bool:
        if allocation.state is not AllocationState.ACTIVE:
            return False
        return allocation.id in self._bound or self._held.get(allocation.id, 0) >= allocation.granted_bytes

    def _forget_locked(self, key: int) -> None:
        freed = self._held.pop(key, 0)
        self._generation.pop(key, None)
        self._applied.pop(key, None)
        if key in self._bound:
            self._bound.discard(key)
            self._applier.unbind(key)
        if freed:
            self._sync_bare_locked()
            self._applier.wake()
        self._settled.notify_all()

    def _room_locked(self, key: int) -> int:
        """Bytes allocation ``key`` may hold now: the capacity minus what all the others hold."""
        return self._capacity(self.tracker.read()) - (sum(self._held.values()) - self._held.get(key, 0))

    def _sync_bare_locked(self) -> None:
        """Bare allocations hold their grant: at once when it shrank, once there is room when it grew."""
        bare = [a for a in self._allocations.values() if a.id not in self._bound]
        for a in bare:
            grant = a.granted_bytes if a.state is AllocationState.ACTIVE else 0
            if grant <= self._held.get(a.id, 0):
                self._held[a.id] = grant
        for a in sorted(bare, key=lambda a: (-a.priority, a.sequence)):
            if a.state is AllocationState.ACTIVE and self._held.get(a.id, 0) < a.granted_bytes:
                if a.granted_bytes <= self._room_locked(a.id):
                    self._held[a.id] = a.granted_bytes
                    if a.id in self._waiters:
                        self._waiters[a.id].wake()
        self._settled.notify_all()

    def _bind(self, allocation: Allocation, settle: Callable[[], bool]) -> None:
        """Let a patched model hold ``allocation``: it commits its own bytes, and ``settle()``
        (applies the newest target if the model is idle; True when nothing is left) is called
        by the applier thread whenever its target changes or memory is freed."""
        with self._lock:
            self._bound.add(allocation.id)
            self._applier.bind(allocation.id, settle)
            self._applier.wake({allocation.id})

    def _stale(self, allocation: Allocation) -> bool:
        """True when the allocation's target changed since its model last committed (lock-free read)."""
        key = allocation.id
        return key in self._allocations and self._applied.get(key) != self._generation.get(key)

    def _model_move(self, allocation: Allocation, held_at: Callable[["float | None"], int]):
        """Decide a patched model's next move, under the lock.

        Args:
            allocation: the model's allocation.
            held_at: bytes the model holds (weights + reserve) at a quality, or 0 at None (parked).

        Returns:
            ``(target quality or None when it must hold nothing, generation, bytes, allowed)``.
            A raise is allowed only when the others leave room, and its bytes are then held at
            once (before the model takes the memory); a lowering is always allowed. Either is
            committed as applied by :meth:`_commit_held` once the move is done.
        """
        with self._lock:
            key = allocation.id
            active = key in self._allocations and allocation.state is AllocationState.ACTIVE
            target = allocation.quality if active else None
            generation = self._generation.get(key, -1)
            nbytes = held_at(target)
            if nbytes <= self._held.get(key, 0):
                return target, generation, nbytes, True
            if key not in self._allocations or nbytes > self._room_locked(key):
                return target, generation, nbytes, False
            # The bytes are taken now; the target counts as applied only once the model commits
            # after its move (a move that reads fragments can take a while).
            self._held[key] = nbytes
            return target, generation, nbytes, True

    def _commit_held(self, allocation: Allocation, nbytes: int, generation: int | None) -> None:
        """A patched model now holds ``nbytes``, at target ``generation`` (None: its move failed,
        so its target stays due)."""
        with self._lock:
            key = allocation.id
            if key not in self._allocations:
                return
            freed = self._held.get(key, 0) > nbytes
            self._held[key] = nbytes
            if generation is not None:
                self._applied[key] = generation
            else:
                self._applied.pop(key, None)
            if freed:
                self._sync_bare_locked()
                self._applier.wake()
            self._settled.notify_all()

    def _update_held(self, allocation: Allocation, nbytes: int) -> None:
        """A patched model's charge grew without a move (an older holder of a fragment it shares
        let go of it): hold at least ``nbytes`` for it, keeping its applied target.

        Only ever raises: charges move *to* the remaining holders, and a model in the middle of a
        move holds a reservation for its raise that its own commit settles. It used to skip a
        model whose target was not applied (streaming in, or after a failed move), which then
        held more than the arbiter counted until its next move.
        """
        with self._lock:
            if allocation.id in self._allocations and nbytes > self._held.get(allocation.id, 0):
                self._held[allocation.id] = nbytes

    def _settled_locked(self) -> bool:
        for a in self._allocations.values():
            if a.id in self._bound:
                if self._applied.get(a.id) != self._generation.get(a.id):
                    return False
            elif a.state is AllocationState.ACTIVE and self._held.get(a.id, 0) != a.granted_bytes:
                return False
        return True

    def _wait_applied(self, allocation: Allocation, timeout: float | None,
                      enough: Callable[[], bool] | None = None) -> bool:
        """Wait until the model behind ``allocation`` committed its newest target (or it is gone),
        or, after any commit of its, until ``enough()`` is true (checked under the lock)."""
        key = allocation.id
        with self._lock:
            return self._settled.wait_for(
                lambda: key not in self._allocations or self._applied.get(key) == self._generation.get(key)
                or (enough is not None and enough()), timeout)

    def _count_oom_recovery(self) -> None:
        with self._lock:
            self._stats.oom_recoveries += 1

    def wait_until_settled(self, timeout: float | None = None) -> bool:
        """Block until every allocation holds what it was granted: each patched model at its
        granted level (or parked when suspended), each bare grant handed out.

        Args:
            timeout: seconds to wait at most (None: for ever).

        Returns:
            True when settled, False on timeout. Limits: a model whose forward never ends
            never reaches its safe point, so never settles.
        """
        with self._lock:
            return self._settled.wait_for(self._settled_locked, timeout)

    def held_bytes(self) -> dict[int, int]:
        """What each allocation holds now by id (weights + activation reserve), as committed by
        its holder: a patched model commits a raise before taking the memory and a lowering after
        freeing it, so the real bytes never exceed these. Their sum stays within the capacity,
        except while models lower after another process took memory."""
        with self._lock:
            return {key: self._held.get(key, 0) for key in self._allocations}

    def _notify(self, changes: list[QualityChange]) -> None:
        if not changes:
            return
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(changes)
            except Exception:  # a broken listener must not break the arbiter or the others
                _log.exception("torch_arbiter listener %r failed", listener)


_default_arbiter: Arbiter | None = None
_default_lock = threading.Lock()


def get_default_arbiter() -> Arbiter:
    """The process-wide arbiter used when ``patch()`` is given none.

    Returns:
        An :class:`Arbiter` built once with :meth:`ArbiterConfig.auto_detect`.
    """
    global _default_arbiter
    with _default_lock:
        if _default_arbiter is None or _default_arbiter._closed:
            _default_arbiter = Arbiter(ArbiterConfig.auto_detect())
        return _default_arbiter
