"""Quality policies and the coordinator's per-workload inputs and outputs.

A workload's *quality* ``q`` in [0, 1] is the share of its full-quality weight
bytes that may be resident on the device. The coordinator grants each admitted
workload ``q * full_bytes + activation_bytes``; the model then picks, within that
budget, the best levels of its HoloTensors (so it may use slightly less).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import NamedTuple

from .errors import InvalidRequestError
from .priority import Priority

__all__ = ["QualityPolicy", "QualityBudget", "QualityAllocation"]


class QualityPolicy(enum.Enum):
    """How the coordinator shares memory above the floors.

    Every policy first admits workloads at their floors in priority order
    (FIFO within a priority). Then:

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
    """

    key: object
    priority: Priority
    floor: float
    full_bytes: int
    activation_bytes: int = 0
    sequence: int = 0
    group: str = ""
    max_quality: float = 1.0

    def __post_init__(self) -> None:
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

    @property
    def floor_bytes(self) -> int:
        """Bytes granted at the floor: what admission needs."""
        return self.bytes_at(self.floor)

    def bytes_at(self, quality: float) -> int:
        """Bytes granted at ``quality`` (weights share plus activations)."""
        return int(quality * self.full_bytes) + self.activation_bytes


class QualityAllocation(NamedTuple):
    """The coordinator's decision for one workload (a named tuple: cheap to make in bulk).

    Attributes:
        key: the budget's key.
        admitted: False when the workload must wait (its floor does not fit).
        quality: the target quality (0 when not admitted).
        granted_bytes: ``quality * full_bytes + activation_bytes`` (0 when not admitted).
    """

    key: object
    admitted: bool
    quality: float
    granted_bytes: int
