"""The coordinator: a pure function from workloads and capacity to quality targets.

It holds no state and does no I/O, so the same inputs always give the same
targets, and it can be property-tested and benchmarked on its own. The arbiter
calls it on every grant, release, priority change and memory change, for *all*
active and waiting workloads at once.

The rule, in two phases:

1. **Admission.** Workloads are taken by priority (highest first), FIFO within
   a priority (``sequence``). Each is admitted at its floor if its floor bytes
   fit in what is left; otherwise it waits. A waiting request blocks later
   waiting requests of the *same* priority (FIFO), not lower ones that fit.
   With ``allow_preemption=False`` the active workloads are admitted before any
   new request, so a new request never un-admits a running one.
2. **Raising.** What is left is given out by the policy (see
   :class:`~torch_arbiter.quality.QualityPolicy`): groups are raised in order,
   each by an exact water-fill (all members of a group reach the same quality
   unless their floor is above it or their ``max_quality`` below it).

Consequences that the property tests check: granted bytes never exceed the
capacity; every admitted workload is at or above its floor; under ``ADAPTIVE``
a higher priority never gets a lower quality than a lower priority with the
same floor and size; and with the same admitted set, more capacity never lowers
anyone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from .errors import InvalidRequestError
from .quality import QualityAllocation, QualityBudget, QualityPolicy

__all__ = ["Coordinator", "CoordinatorConfig"]

_LLM_GROUPS = frozenset({"llm_inference"})
_DIFFUSION_GROUPS = frozenset({"image_generation", "video_generation"})


@dataclass(frozen=True)
class CoordinatorConfig:
    """Settings of the :class:`Coordinator`.

    Args:
        policy: how memory above the floors is shared.
        fixed_quality: the quality every workload runs at under ``FIXED``.
        allow_preemption: let a higher-priority request un-admit (suspend) a
            running lower-priority workload whose floor would not leave room.
    """

    policy: QualityPolicy = QualityPolicy.ADAPTIVE
    fixed_quality: float = 1.0
    allow_preemption: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.policy, QualityPolicy):
            raise InvalidRequestError(
                f"policy must be a QualityPolicy, got {self.policy!r}"
            )
        q = self.fixed_quality
        if not (isinstance(q, (int, float)) and math.isfinite(q) and 0.0 <= q <= 1.0):
            raise InvalidRequestError(f"fixed_quality must be in [0, 1], got {q!r}")


class Coordinator:
    """Computes quality targets for every workload (pure: no state, no I/O).

    Args:
        config: the policy and its settings; ``CoordinatorConfig()`` when None.
    """

    def __init__(self, config: CoordinatorConfig | None = None) -> None:
        self.config = config or CoordinatorConfig()

    def compute(
        self,
        budgets: Sequence[QualityBudget],
        capacity_bytes: int,
        active_keys: Iterable[object] = (),
    ) -> dict[object, QualityAllocation]:
        """Decide who runs and at which quality.

        Args:
            budgets: every active and waiting workload, keys unique.
            capacity_bytes: bytes the workloads may hold together (device total
                minus the reserve and what other processes use).
            active_keys: keys of the workloads already running (matters only
                when ``allow_preemption`` is False).

        Returns:
            A :class:`QualityAllocation` per key.

        Raises:
            InvalidRequestError: duplicate keys or a negative capacity.

        Limits: O(n log n) in the number of workloads; qualities are real
        numbers, the model layer rounds them down to its levels.
        """
        if capacity_bytes < 0:
            raise InvalidRequestError(f"capacity must be >= 0, got {capacity_bytes}")
        keys = [b.key for b in budgets]
        if len(set(keys)) != len(keys):
            raise InvalidRequestError("workload keys passed to the coordinator must be unique")

        admitted, quality, used = self._admit(budgets, capacity_bytes, frozenset(active_keys))
        left = capacity_bytes - used
        if self.config.policy is not QualityPolicy.FIXED:
            for group in self._raise_order(admitted):
                left -= _water_fill(group, quality, left)

        result = {}
        for b in budgets:
            q = quality.get(b.key)
            if q is None:
                result[b.key] = QualityAllocation(b.key, False, 0.0, 0)
            else:
                result[b.key] = QualityAllocation(b.key, True, q, b.bytes_at(q))
        return result

    def _admit(
        self, budgets: Sequence[QualityBudget], capacity: int, active: frozenset
    ) -> tuple[list[QualityBudget], dict[object, float], int]:
        if self.config.allow_preemption:
            order = sorted(budgets, key=lambda b: (-b.priority, b.sequence))
        else:
            order = sorted(budgets, key=lambda b: (b.key not in active, -b.priority, b.sequence))
        fixed = self.config.policy is QualityPolicy.FIXED
        fixed_quality = self.config.fixed_quality
        used = 0
        admitted = []
        quality: dict[object, float] = {}
        blocked_priorities = set()
        for b in order:
            waiting = b.key not in active
            if waiting and b.priority in blocked_priorities:
                continue
            start = min(max(b.floor, fixed_quality), b.max_quality) if fixed else b.floor
            need = b.bytes_at(start)
            if used + need <= capacity:
                admitted.append(b)
                quality[b.key] = start
                used += need
            elif waiting:
                blocked_priorities.add(b.priority)
        return admitted, quality, used

    def _raise_order(self, admitted: list[QualityBudget]) -> list[list[QualityBudget]]:
        policy = self.config.policy
        if policy is QualityPolicy.BALANCED:
            return [admitted]
        if policy is QualityPolicy.LLM_FIRST:
            rank = lambda b: (b.group not in _LLM_GROUPS, -b.priority)  # noqa: E731
        elif policy is QualityPolicy.DIFFUSION_FIRST:
            rank = lambda b: (b.group not in _DIFFUSION_GROUPS, -b.priority)  # noqa: E731
        else:
            rank = lambda b: (-b.priority,)  # noqa: E731
        groups: dict[tuple, list[QualityBudget]] = {}
        for b in admitted:
            groups.setdefault(rank(b), []).append(b)
        return [groups[k] for k in sorted(groups)]


def _water_fill(group: list[QualityBudget], quality: dict[object, float], left: int) -> int:
    """Raise ``group`` to a common level with at most ``left`` bytes; return the bytes charged.

    Each member's cost is linear in quality (``full_bytes`` per unit) between its
    current quality and its ``max_quality``, so the group's cost is piecewise
    linear in the common level: sweep the sorted breakpoints once, keeping the
    slope, and solve the last piece exactly (O(n log n)).
    """
    members = [b for b in group if b.full_bytes > 0 and quality[b.key] < b.max_quality]
    if left <= 0 or not members:
        return 0
    events = sorted(
        [(quality[b.key], b.full_bytes) for b in members] + [(b.max_quality, -b.full_bytes) for b in members],
        key=lambda e: e[0],
    )
    level, cost, slope = events[0][0], 0.0, 0
    for position, delta in events:
        step = slope * (position - level)
        if cost + step > left:
            level += (left - cost) / slope
            cost = left
            break
        cost += step
        level = position
        slope += delta
    base = [(b, quality[b.key]) for b in members]
    before = sum(b.bytes_at(q) for b, q in base)

    def raise_to(target: float) -> tuple[list, int]:
        raised = [(b, min(max(q, target), b.max_quality)) for b, q in base]
        return raised, sum(b.bytes_at(q) for b, q in raised) - before

    raised, granted = raise_to(level)
    if granted > left:
        # The exact solution overshot (floating point, or integer grants a byte per member above
        # the real-valued cost): bisect down to the highest level that fits. The lowest starting
        # quality raises nobody, so it always fits; 64 halvings exhaust a double's precision.
        low, high = min(q for _, q in base), level
        raised, granted = raise_to(low)
        for _ in range(64):
            middle = (low + high) / 2
            candidate, charged = raise_to(middle)
            if charged <= left:
                low, raised, granted = middle, candidate, charged
            else:
                high = middle
    for b, q in raised:
        quality[b.key] = q
    # Charge the group at least its real-valued cost, so that rounding crumbs never pass to a
    # lower group ahead of a higher one, and at least its integer grants (truncating the
    # starting quality can make those a byte per member more), so the total never overshoots.
    return min(left, max(granted, math.ceil(cost)))
