"""GpuMemoryTracker on a virtual device, MemoryPressure thresholds, priorities."""

import threading

import pytest
import torch

from torch_arbiter import GpuMemoryTracker, InvalidRequestError, MemoryPressure, Priority, WorkloadType

GIB = 1 << 30


@pytest.mark.parametrize(
    "fraction, pressure",
    [(0.0, MemoryPressure.LOW), (0.4999, MemoryPressure.LOW), (0.5, MemoryPressure.MODERATE),
     (0.7499, MemoryPressure.MODERATE), (0.75, MemoryPressure.HIGH), (0.8999, MemoryPressure.HIGH),
     (0.9, MemoryPressure.CRITICAL), (1.0, MemoryPressure.CRITICAL)],
)
def test_pressure_thresholds(fraction, pressure):
    assert MemoryPressure.from_fraction(fraction) is pressure


def test_virtual_reading_merges_granted_and_external_bytes():
    t = GpuMemoryTracker("cpu", 10 * GIB)
    t.set_granted(3 * GIB)
    t.set_external_bytes(2 * GIB)
    s = t.read()
    assert (s.total_bytes, s.used_bytes, s.free_bytes, s.external_bytes, s.granted_bytes, s.source) == (
        10 * GIB, 5 * GIB, 5 * GIB, 2 * GIB, 3 * GIB, "virtual")
    assert s.pressure is MemoryPressure.MODERATE
    t.set_external_bytes(5 * GIB)
    assert t.pressure is MemoryPressure.HIGH


def test_virtual_device_needs_a_size_and_rejects_bad_values():
    with pytest.raises(InvalidRequestError, match="for_vram_gb"):
        GpuMemoryTracker("cpu")
    with pytest.raises(InvalidRequestError):
        GpuMemoryTracker("cpu", 0)
    with pytest.raises(InvalidRequestError):
        GpuMemoryTracker("cpu", GIB).set_external_bytes(-1)


def test_monitor_reports_changes_above_the_threshold_only():
    t = GpuMemoryTracker("cpu", 10 * GIB)
    seen = []
    changed = threading.Event()

    def on_change(stats):
        seen.append(stats.external_bytes)
        changed.set()

    t.start_monitor(on_change, interval_s=0.01, threshold_bytes=GIB)
    try:
        t.set_external_bytes(GIB // 2)
        assert not changed.wait(0.1)
        t.set_external_bytes(2 * GIB)
        assert changed.wait(5)
        assert seen[-1] == 2 * GIB and t.monitoring()
    finally:
        t.stop_monitor()
    assert not t.monitoring()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_reading_is_live():
    s = GpuMemoryTracker("cuda:0").read()
    assert s.total_bytes > 0 and s.source in ("nvml", "torch")


def test_priority_order_alias_and_coercion():
    assert Priority.BACKGROUND < Priority.LOW < Priority.NORMAL < Priority.HIGH < Priority.CRITICAL
    assert Priority.USER_FACING is Priority.HIGH
    assert Priority.coerce("critical") is Priority.CRITICAL and Priority.coerce(0) is Priority.BACKGROUND
    for bad in ("urgent", 7, True, None):
        with pytest.raises(InvalidRequestError):
            Priority.coerce(bad)


def test_workload_type_defaults():
    assert [w.floor for w in WorkloadType] == [0.40, 0.30, 0.25]
    assert [w.typical_bytes // GIB for w in WorkloadType] == [8, 6, 12]
    with pytest.raises(InvalidRequestError):
        WorkloadType.custom("x", 1.5, GIB)


def test_global_mode_reading_does_not_ask_torch_for_reserved_memory(monkeypatch):
    """Under install() PyTorch's memory_reserved() raises: the tracker reads the library's live bytes."""
    from torch_arbiter import allocator
    from torch_arbiter.allocator import ledger, scope

    def unsupported(device=None):
        raise RuntimeError("memory_stats is not supported by the CUDAPluggableAllocator")

    live = ledger.AllocatorStats(live_allocs=3, live_bytes=5 * GIB, invalid_args=0, unknown_frees=0,
                                 refused=0, backend_failures=0, ledger_errors=0, reaped_bytes=0)
    monkeypatch.setattr(scope, "_installed", True)
    monkeypatch.setattr(allocator, "stats", lambda: live)
    monkeypatch.setattr(torch.cuda, "memory_reserved", unsupported)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * GIB, 24 * GIB))
    tracker = GpuMemoryTracker("cuda:0", use_nvml=False)
    s = tracker.read()
    assert (s.total_bytes, s.used_bytes, s.external_bytes, s.source) == (24 * GIB, 14 * GIB, 9 * GIB, "torch")
