"""The main job, ``torch-arbiter demo``: workloads share one device under one arbiter.

On a machine without a GPU the device is virtual (``ArbiterConfig.for_vram_gb``):
quality is enforced by weight residency, not per CUDA allocation.
"""

from __future__ import annotations

import time

from .arbiter import Arbiter, ArbiterConfig
from .memory import GpuMemoryTracker
from .priority import Priority, WorkloadType

__all__ = ["run_demo"]

_GIB = 1 << 30


def _print_state(arbiter: Arbiter, label: str) -> None:
    state = arbiter.state()
    print(f"\n== {label}")
    print(f"   device {state.total_bytes / _GIB:.1f} GiB, others {state.external_bytes / _GIB:.1f} GiB, "
          f"granted {state.granted_bytes / _GIB:.2f} GiB, pressure {state.pressure.name}")
    for w in state.workloads:
        weights = int(w.quality * w.full_bytes)
        print(f"   {w.name:<8} {w.priority.name:<10} {w.state.value:<9} quality {w.quality:5.3f}  "
              f"weights {weights / _GIB:5.2f} of {w.full_bytes / _GIB:.1f} GiB + activations "
              f"{(w.granted_bytes - weights) / _GIB:.1f} GiB")


def run_demo(vram_gb: float | None = None, quick: bool = False) -> int:
    """Run the scripted arbitration scenario and print each workload's quality at every step.

    Args:
        vram_gb: size of the virtual device (default 16 GiB).
        quick: accepted for the tests; the scenario is short either way.

    Returns:
        0 on success.
    """
    gb = vram_gb or 16.0
    tracker = GpuMemoryTracker("cpu", int(gb * _GIB))
    config = ArbiterConfig.for_vram_gb(gb, monitor_interval_s=0.02)
    print(f"torch-arbiter demo: one virtual {gb:g} GiB device (no GPU here: the budget is enforced by "
          "weight residency; on CUDA the pluggable allocator enforces it per allocation)")
    with Arbiter(config, tracker=tracker) as arbiter:
        chat = arbiter.request_allocation_blocking(WorkloadType.LLM_INFERENCE, Priority.USER_FACING, name="chat")
        _print_state(arbiter, "a chat model asks for memory (USER_FACING)")
        image = arbiter.request_allocation_blocking(WorkloadType.IMAGE_GENERATION, Priority.BACKGROUND, name="image")
        _print_state(arbiter, "an image model joins at BACKGROUND: it is lowered, the chat keeps its quality")
        tracker.set_external_bytes(4 * _GIB)
        _wait_for(lambda: arbiter.stats().rebalances >= 3)
        _print_state(arbiter, "another process takes 4 GiB: the monitor notices and lowers the image model")
        arbiter.update_priority(image, Priority.CRITICAL)
        _print_state(arbiter, "the user clicks 'generate': the image model becomes CRITICAL")
        tracker.set_external_bytes(0)
        _wait_for(lambda: arbiter.stats().rebalances >= 5)
        _print_state(arbiter, "the other process exits")
        chat.release()
        _print_state(arbiter, "the chat session ends: the image model climbs back")
        image.release()
        stats = arbiter.stats()
        print(f"\nstats: {stats.grants} grants, {stats.releases} releases, {stats.rebalances} rebalances, "
              f"{stats.quality_reductions} reductions, {stats.quality_increases} increases, "
              f"{stats.preemptions} preemptions, {stats.failures} failures")
    return 0


def _wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
