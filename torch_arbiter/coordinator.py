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
   unless their floor is above it or their ``max_quality`` below it). A member
   with a step curve (a patched model) moves only from step to step, so it is
   granted exactly the bytes its model will hold; a step that does not fit stops
   it, and what it leaves over goes to the other members and then the next groups.

Consequences that the property tests check: granted bytes never exceed the
capacity; every admitted workload is at or above its floor; under ``ADAPTIVE``
a higher priority never gets a lower quality than a lower priority with the
same floor and size; and with the same admitted set, more capacity never lowers
anyone.
"""

from __future__ import annotations

import bisect
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

        Limits: O(s log s) in the number of workloads plus curve steps; a
        workload without a curve gets a real-valued quality (its granted bytes
        are ``int(q * full_bytes)``), one with a curve gets one of its steps.
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
    """Raise ``group`` towards a common level with at most ``left`` bytes; return the bytes charged.

    A member without a curve costs ``full_bytes`` per unit of quality (linear) up to its
    ``max_quality``; a member with a curve costs the jump of each step it reaches. Sweeping
    the sorted breakpoints once (O(n log n) in members and steps) raises the common level:
    linear members follow it, a curve member takes each of its steps as the level reaches it
    while the step fits. A step that does not fit stops that member for good (what is left
    only shrinks), and the sweep goes on, so the bytes it leaves over go to the members whose
    next steps are smaller. The linear members' level is solved exactly on the last piece.
    """
    members = [b for b in group if quality[b.key] < b.max_quality and (b.curve or b.full_bytes > 0)]
    if left <= 0 or not members:
        return 0
    events: list[tuple[float, int, int, int]] = []  # (level, 0 = slope change / 1 = step, member, bytes)
    linear = []
    for index, b in enumerate(members):
        start = quality[b.key]
        if b.curve:
            first = bisect.bisect_right(b._curve_qualities, start)
            held = b.curve[max(0, first - 1)][1]
            for q, nbytes in b.curve[first:]:
                if q > b.max_quality:
                    break
                events.append((q, 1, index, nbytes - held))  # a free step (same bytes) is taken too
                held = nbytes
        else:
            linear.append(b)
            events.append((start, 0, index, b.full_bytes))
            events.append((b.max_quality, 0, index, -b.full_bytes))
    events.sort()
    level = min(quality[b.key] for b in members)
    cost, slope = 0.0, 0
    stepped = 0
    stopped = [False] * len(members)
    for position, kind, index, delta in events:
        if slope:
            run = slope * (position - level)
            if cost + run > left:
                level += (left - cost) / slope
                cost = left
                break
            cost += run
        level = position
        if kind == 0:
            slope += delta
        elif not stopped[index]:
            if cost + delta <= left:
                cost += delta
                stepped += delta
                quality[members[index].key] = position
            else:
                stopped[index] = True
    if not linear:
        return stepped
    base = [(b, quality[b.key]) for b in linear]
    before = sum(b.bytes_at(q) for b, q in base)
    linear_left = left - stepped

    def raise_to(target: float) -> tuple[list, int]:
        raised = [(b, min(max(q, target), b.max_quality)) for b, q in base]
        return raised, sum(b.bytes_at(q) for b, q in raised) - before

    raised, granted = raise_to(level)
    if granted > linear_left:
        # The exact solution overshot (floating point, or integer grants a byte per member above
        # the real-valued cost): bisect down to the highest level that fits. The lowest starting
        # quality raises nobody, so it always fits; 64 halvings exhaust a double's precision.
        low, high = min(q for _, q in base), level
        raised, granted = raise_to(low)
        for _ in range(64):
            middle = (low + high) / 2
            candidate, charged = raise_to(middle)
            if charged <= linear_left:
                low, raised, granted = middle, candidate, charged
            else:
                high = middle
    for b, q in raised:
        quality[b.key] = q
    # Charge the group at least its real-valued cost, so that rounding crumbs never pass to a
    # lower group ahead of a higher one, and at least its integer grants (truncating the
    # starting quality can make those a byte per member more), so the total never overshoots.
    return min(left, max(stepped + granted, math.ceil(cost)))
