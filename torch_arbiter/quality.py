"""Quality policies and the coordinator's per-workload inputs and outputs.

A workload's *quality* ``q`` in [0, 1] is the share of its full-quality weight
bytes that may be resident on the device. A workload with a *curve* (what ``patch()``
registers: the exact ``(quality, bytes)`` steps of its model) is granted exactly the
bytes its model holds at ``q`` (the last step at or below ``q``) plus its activation
reserve; one without is granted ``q * full_bytes + activation_bytes``.
"""

from __future__ import annotations

import bisect
import enum
import math
from dataclasses import dataclass, field
from typing import NamedTuple

from .errors import InvalidRequestError
from .priority import Priority

__all__ = ["QualityPolicy", "QualityBudget", "QualityAllocation"]


class QualityPolicy(enum.Enum):
    """How the coordinator shares memory above the floors.

    Every policy first admits workloads at their floors in priority order
    (FIFO within a priority). Then the bytes left are given out as below, on each
    workload's *curve*: a workload with a step curve (a patched model) only ever
    gets the quality of one of its steps, so it is granted exactly what it will
    hold; when its next step does not fit, it stops there and the bytes that step
    leaves over go on to the others (in the same group first, then the next).

    * ``FIXED``: no adaptation; each workload runs at ``fixed_quality`` (its
      floor is raised to it) or waits.
    * ``ADAPTIVE``: priority classes are raised in turn, highest first; each
      class climbs to quality 1 before the next class gets anything above its
      floor. Within a class, quality is water-filled (equal quality, floors kept).
    * ``LLM_FIRST``: like ``ADAPTIVE``, but every LLM workload is raised before
      any other, whatever the priorities (priority orders within each group).
    * ``DIFFUSION_FIRST``: like ``LLM_FIRST`` with image and video workloads first.
    * ``BALANCED``: one water-fill over all admitted workloads: everyone gets
      the same quality (or their floor, if higher), priority only decides admission.
    """

    FIXED = "fixed"
    ADAPTIVE = "adaptive"
    LLM_FIRST = "llm_first"
    DIFFUSION_FIRST = "diffusion_first"
    BALANCED = "balanced"


@dataclass(frozen=True, slots=True)
class QualityBudget:
    """One workload as the coordinator sees it (an input of :meth:`Coordinator.compute`).

    Args:
        key: any hashable id, unique among the budgets of one call.
        priority: its :class:`Priority`.
        floor: the lowest quality it accepts, in [0, 1].
        full_bytes: its weight bytes at quality 1.
        activation_bytes: bytes it needs whatever its quality (activations, KV cache).
        sequence: arrival order; earlier wins within a priority (FIFO).
        group: the workload kind's name (``"llm_inference"``, ``"image_generation"``,
            ...), used by the ``*_FIRST`` policies.
        max_quality: the highest quality it can use (1 for a model, lower if capped).
        curve: optional sorted ``(quality, weight bytes)`` steps: the bytes its model holds
            from each quality on (``ManagedModel.curve``). Then ``bytes_at(q)`` is the last
            step at or below ``q`` (the first step below it) instead of ``q * full_bytes``.
    """

    key: object
    priority: Priority
    floor: float
    full_bytes: int
    activation_bytes: int = 0
    sequence: int = 0
    group: str = ""
    max_quality: float = 1.0
    curve: tuple[tuple[float, int], ...] = ()
    _curve_qualities: tuple[float, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "_curve_qualities", tuple(q for q, _ in self.curve))
        for name in ("floor", "max_quality"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
                raise InvalidRequestError(f"{name} must be a number in [0, 1], got {value!r}")
        if self.floor > self.max_quality:
            raise InvalidRequestError(
                f"floor {self.floor} is above max_quality {self.max_quality}: lower the floor"
            )
        if self.full_bytes < 0 or self.activation_bytes < 0:
            raise InvalidRequestError("full_bytes and activation_bytes must be >= 0")
        if any(a[0] > b[0] or a[1] > b[1] for a, b in zip(self.curve, self.curve[1:])):
            raise InvalidRequestError("curve must be sorted by quality with non-decreasing bytes")

    @property
    def floor_bytes(self) -> int:
        """Bytes granted at the floor: what admission needs."""
        return self.bytes_at(self.floor)

    def bytes_at(self, quality: float) -> int:
        """Bytes granted at ``quality``: weight bytes (the curve's step, else the share of
        ``full_bytes``) plus activations."""
        if self.curve:
            return self.curve[max(0, bisect.bisect_right(self._curve_qualities, quality) - 1)][1] + self.activation_bytes
        return int(quality * self.full_bytes) + self.activation_bytes


class QualityAllocation(NamedTuple):
    """The coordinator's decision for one workload (a named tuple: cheap to make in bulk).

    Attributes:
        key: the budget's key.
        admitted: False when the workload must wait (its floor does not fit).
        quality: the target quality (0 when not admitted).
        granted_bytes: ``bytes_at(quality)`` of its budget (0 when not admitted).
    """

    key: object
    admitted: bool
    quality: float
    granted_bytes: int
