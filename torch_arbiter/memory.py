"""Device memory readings for the arbiter.

:class:`GpuMemoryTracker` merges what the device really holds (NVML, or
``torch.cuda.mem_get_info``) with the arbiter's own ledger of granted bytes,
so that memory taken by *other* processes shrinks what the arbiter hands out.
On a machine without a GPU it models a virtual device of a configured size.

A background monitor thread re-reads the device at a fixed interval and calls
back when the memory used by others moves by more than a threshold: the seed
crate read the device only at start-up, so it never noticed a second process
filling the card.
"""

from __future__ import annotations

import enum
import os
import threading

from dataclasses import dataclass
from typing import Callable

from .errors import InvalidRequestError

__all__ = ["GpuMemoryTracker", "MemoryStats", "MemoryPressure", "trim_host_heap"]


class MemoryPressure(enum.IntEnum):
    """How full the device is: ``used / total`` below 0.50 / 0.75 / 0.90, or above."""

    LOW = 0
    MODERATE = 1
    HIGH = 2
    CRITICAL = 3

    @classmethod
    def from_fraction(cls, used_fraction: float) -> "MemoryPressure":
        """Classify a used fraction of the device.

        Args:
            used_fraction: used bytes / total bytes.

        Returns:
            ``LOW`` (< 0.50), ``MODERATE`` (< 0.75), ``HIGH`` (< 0.90) or ``CRITICAL``.
        """
        if used_fraction < 0.50:
            return cls.LOW
        if used_fraction < 0.75:
            return cls.MODERATE
        if used_fraction < 0.90:
            return cls.HIGH
        return cls.CRITICAL


@dataclass(frozen=True)
class MemoryStats:
    """One reading of the device.

    Attributes:
        total_bytes: device size (the configured capacity on a virtual device).
        used_bytes: bytes in use by anyone (the granted bytes plus others' on a virtual device).
        free_bytes: ``total_bytes - used_bytes``.
        external_bytes: bytes held by other processes or outside the arbiter.
        granted_bytes: bytes the arbiter has granted to its workloads.
        own_bytes: bytes this process holds on the device (torch reserved or NVML per-process).
        source: ``"nvml"``, ``"torch"`` or ``"virtual"``.
    """

    total_bytes: int
    used_bytes: int
    free_bytes: int
    external_bytes: int
    granted_bytes: int
    own_bytes: int
    source: str

    @property
    def used_fraction(self) -> float:
        """``used_bytes / total_bytes`` (0 for an empty device)."""
        return self.used_bytes / self.total_bytes if self.total_bytes else 0.0

    @property
    def pressure(self) -> MemoryPressure:
        """The :class:`MemoryPressure` of this reading."""
        return MemoryPressure.from_fraction(self.used_fraction)


class GpuMemoryTracker:
    """Reads device memory and tracks the bytes the arbiter granted.

    Args:
        device: ``"cpu"`` for a virtual device, or a CUDA device (``"cuda:0"``, 0, ...).
        capacity_bytes: size of the virtual device; on CUDA, caps the total the
            arbiter plans with (None: the card's size).
        use_nvml: on CUDA, try NVML (total/used and this process's share) before torch.

    Limits: on CUDA without NVML, ``own_bytes`` is torch's reserved memory only
    (the CUDA context itself, a few hundred MiB, counts as external).
    """

    def __init__(
        self,
        device: "str | int | object" = "cpu",
        capacity_bytes: int | None = None,
        *,
        use_nvml: bool = True,
    ) -> None:
        import torch

        self.device = torch.device(device if not isinstance(device, int) else f"cuda:{device}")
        if capacity_bytes is not None and capacity_bytes <= 0:
            raise InvalidRequestError(f"capacity_bytes must be positive, got {capacity_bytes}")
        if self.device.type != "cuda" and capacity_bytes is None:
            raise InvalidRequestError(
                "a virtual (non-CUDA) device needs capacity_bytes: "
                "use ArbiterConfig.for_vram_gb(...) or pass capacity_bytes"
            )
        self.capacity_bytes = capacity_bytes
        self._lock = threading.Lock()
        self._granted = 0
        self._simulated_external = 0
        self._nvml_handle = self._open_nvml() if (use_nvml and self.device.type == "cuda") else None
        self._monitor: threading.Thread | None = None
        self._monitor_stop = threading.Event()

    def _open_nvml(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            index = self.device.index or 0
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            if visible:
                index = int(visible.split(",")[index])
            return pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:  # no driver, no library, a MIG or UUID device list: fall back to torch
            return None

    def set_granted(self, granted_bytes: int) -> None:
        """Record the bytes the arbiter currently grants (called after every rebalance)."""
        with self._lock:
            self._granted = int(granted_bytes)

    def set_external_bytes(self, external_bytes: int) -> None:
        """Simulate memory held by another process on a virtual device.

        Args:
            external_bytes: bytes to treat as taken by others (>= 0).

        Raises:
            InvalidRequestError: on a CUDA device (real readings are used there) or for a negative value.
        """
        if self.device.type == "cuda":
            raise InvalidRequestError("set_external_bytes only applies to a virtual device; CUDA is read live")
        if external_bytes < 0:
            raise InvalidRequestError(f"external_bytes must be >= 0, got {external_bytes}")
        with self._lock:
            self._simulated_external = int(external_bytes)

    def read(self) -> MemoryStats:
        """Take one reading.

        Returns:
            A :class:`MemoryStats`. On CUDA, ``total`` and ``used`` come from NVML
            or ``torch.cuda.mem_get_info``; ``external = used - own``.
        """
        with self._lock:
            granted = self._granted
            simulated = self._simulated_external
        if self.device.type != "cuda":
            total = self.capacity_bytes
            used = min(total, granted + simulated)
            return MemoryStats(total, used, total - used, simulated, granted, granted, "virtual")
        total, used, own, source = self._read_cuda()
        if self.capacity_bytes is not None and self.capacity_bytes < total:
            total = self.capacity_bytes
        external = max(0, used - own)
        used = min(total, max(used, external + granted))
        return MemoryStats(total, used, total - used, external, granted, own, source)

    def _read_cuda(self) -> tuple[int, int, int, str]:
        import torch

        if self._nvml_handle is not None:
            try:
                import pynvml

                info = pynvml.nvmlDeviceGetMemoryInfo(self._nvml_handle)
                own = 0
                for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(self._nvml_handle):
                    if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                        own += proc.usedGpuMemory
                own = own or self._own_reserved()
                return int(info.total), int(info.used), int(own), "nvml"
            except Exception:
                pass
        free, total = torch.cuda.mem_get_info(self.device)
        return int(total), int(total - free), int(self._own_reserved()), "torch"

    def _own_reserved(self) -> int:
        """Bytes this process holds on the device through its CUDA allocator.

        In global mode (``allocator.install()``) PyTorch's ``memory_reserved()`` raises (a
        pluggable allocator has no memory stats), so the library's own count of live bytes is read.
        """
        import torch

        from . import allocator

        if allocator.is_installed():
            return allocator.stats().live_bytes
        return torch.cuda.memory_reserved(self.device)

    @property
    def pressure(self) -> MemoryPressure:
        """Pressure of a fresh reading."""
        return self.read().pressure

    def start_monitor(
        self,
        on_change: Callable[[MemoryStats], None],
        interval_s: float = 1.0,
        threshold_bytes: int | None = None,
    ) -> None:
        """Poll the device in a daemon thread; call ``on_change`` when others' use moves.

        Args:
            on_change: called from the monitor thread with the new reading.
            interval_s: seconds between readings (> 0).
            threshold_bytes: smallest change of ``external_bytes`` that triggers a
                call; default 1 % of the device.

        Limits: a change shorter than ``interval_s`` can be missed; one monitor per tracker.
        """
        if interval_s <= 0:
            raise InvalidRequestError(f"interval_s must be > 0, got {interval_s}")
        self.stop_monitor()
        first = self.read()
        threshold = threshold_bytes if threshold_bytes is not None else max(1, first.total_bytes // 100)
        self._monitor_stop = stop = threading.Event()

        def _poll() -> None:
            last = first.external_bytes
            while not stop.wait(interval_s):
                stats = self.read()
                if abs(stats.external_bytes - last) >= threshold:
                    last = stats.external_bytes
                    on_change(stats)

        self._monitor = threading.Thread(target=_poll, name="torch-arbiter-memory-monitor", daemon=True)
        self._monitor.start()

    def stop_monitor(self) -> None:
        """Stop the monitor thread, if any, and wait for it."""
        self._monitor_stop.set()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(timeout=5.0)
        self._monitor = None

    def monitoring(self) -> bool:
        """Whether the monitor thread runs."""
        return self._monitor is not None and self._monitor.is_alive()


def trim_host_heap() -> bool:
    """Give the process's freed heap memory back to the OS (glibc ``malloc_trim``).

    Why: glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), so
    later fragment-sized blocks come from the heap, and freeing them leaves them in the heap, not
    returned: a CPU process that lowered its models would keep its RSS. This is the CPU's
    ``torch.cuda.empty_cache()``, called after a model lowers on a CPU arbiter.

    Returns:
        True when memory was returned; False when nothing was, or the C library is not glibc
        (then this does nothing).

    Limits: walks the heap (about a millisecond per GiB of heap); other allocators (jemalloc,
    tcmalloc via ``LD_PRELOAD``) keep their own policy.
    """
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


_TRIM: list = []


def _malloc_trim():
    if not _TRIM:
        import ctypes
        import ctypes.util

        try:
            _TRIM.append(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim)
        except (OSError, AttributeError):
            _TRIM.append(None)
    return _TRIM[0]

