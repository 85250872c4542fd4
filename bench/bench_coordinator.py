"""Rebalance cost: the pure coordinator and a full Arbiter.rebalance(), 4 to 256 workloads.

Target (issues 2 and 10): a rebalance of 64 workloads in < 1 ms, also when every workload
plans with a 10-step ``(quality, bytes)`` curve (what ``patch()`` registers). The baseline in the same
run is the coordinator's own admission phase alone (sorting by priority and
summing floors: the least any rebalance must do), so the ratio shows what the
policy's water-fill adds on top.

    .venv/bin/python bench/bench_coordinator.py
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import time_call, write_results  # noqa: E402

from torch_arbiter import (  # noqa: E402
    Arbiter,
    ArbiterConfig,
    Coordinator,
    CoordinatorConfig,
    Priority,
    QualityBudget,
    QualityPolicy,
    WorkloadType,
)

GIB = 1 << 30


def _curve(full: int, floor: float, steps: int, rng: random.Random) -> tuple[tuple[float, int], ...]:
    """``steps`` sorted (quality, bytes) points from the floor to (1, full), each bytes <= q * full."""
    qualities = sorted([floor] + [rng.uniform(floor, 1.0) for _ in range(steps - 2)]) + [1.0]
    points, held = [], 0
    for q in qualities:
        held = full if q >= 1.0 else max(held, int(q * full * rng.uniform(0.9, 1.0)))
        points.append((q, held))
    return tuple(points)


def _budgets(n: int, rng: random.Random, steps: int = 0) -> list[QualityBudget]:
    kinds = list(WorkloadType)
    out = []
    for i in range(n):
        kind = rng.choice(kinds)
        full = rng.randrange(1, 4 * GIB)
        curve = _curve(full, kind.floor, steps, rng) if steps else ()
        out.append(QualityBudget(i, Priority(rng.randrange(5)), kind.floor, full,
                                 rng.randrange(0, GIB // 4), sequence=i, group=kind.value.name, curve=curve))
    return out


def main() -> None:
    rng = random.Random(0)
    rows, data = [], {"cases": []}
    for n, steps in ((4, 0), (16, 0), (64, 0), (256, 0), (4, 10), (16, 10), (64, 10), (256, 10)):
        budgets = _budgets(n, rng, steps)
        capacity = sum(b.floor_bytes for b in budgets) + sum(b.full_bytes for b in budgets) // 3
        for policy in (QualityPolicy.ADAPTIVE, QualityPolicy.BALANCED, QualityPolicy.LLM_FIRST):
            coord = Coordinator(CoordinatorConfig(policy))
            admission = time_call(lambda: coord._admit(budgets, capacity, frozenset()), repeat=31, number=20)
            full = time_call(lambda: coord.compute(budgets, capacity), repeat=31, number=20)
            with Arbiter(ArbiterConfig.for_vram_gb(capacity / GIB, policy=policy)) as arb:
                for b in budgets:
                    arb.request_allocation_blocking(WorkloadType.IMAGE_GENERATION, b.priority, bytes=b.full_bytes,
                                                    activation_bytes=b.activation_bytes, min_quality=b.floor,
                                                    curve=b.curve or None)
                rebalance = time_call(arb.rebalance, repeat=31, number=20)
            case = {"workloads": n, "curve_steps": steps, "policy": policy.name, "admission_only_us": admission["median_s"] * 1e6,
                    "coordinator_us": full["median_s"] * 1e6, "arbiter_rebalance_us": rebalance["median_s"] * 1e6,
                    "arbiter_rebalance_p90_us": rebalance["p90_s"] * 1e6}
            data["cases"].append(case)
            rows.append(f"| {n} | {steps or 'linear'} | {policy.name} | {case['admission_only_us']:.1f} | {case['coordinator_us']:.1f} | "
                        f"{case['coordinator_us'] / case['admission_only_us']:.2f}x | {case['arbiter_rebalance_us']:.1f} | "
                        f"{case['arbiter_rebalance_p90_us']:.1f} | {'yes' if case['arbiter_rebalance_us'] < 1000 else 'NO'} |")
    table = ("| workloads | curve steps | policy | admission only (µs, baseline) | coordinator (µs) | ratio | Arbiter.rebalance() median (µs) | p90 (µs) | median < 1 ms |\n"
             "|---:|---|---|---:|---:|---:|---:|---:|---|\n" + "\n".join(rows))
    path = write_results("coordinator", "Rebalance cost", table, data,
                         "Medians of 31 rounds of 20 calls. `Arbiter.rebalance()` includes the device reading, "
                         "applying the targets to every allocation and the listener fan-out (no listeners here).")
    print(path.read_text())


if __name__ == "__main__":
    main()
