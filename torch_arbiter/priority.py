"""Priorities and workload types.

``Priority`` orders workloads when memory is short; ``WorkloadType`` gives each
workload its default quality floor and typical size.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["Priority", "WorkloadType", "WorkloadKind"]

_GIB = 1 << 30


class Priority(enum.IntEnum):
    """How much a workload matters when memory is short. Higher wins.

    ``USER_FACING`` is an alias of ``HIGH`` (the seed's spelling for
    interactive work such as a chat box).
    """

    BACKGROUND = 0
    LOW = 1
    NORMAL = 2
    HIGH = 3
    CRITICAL = 4
    USER_FACING = 3

    @classmethod
    def coerce(cls, value: "Priority | int | str") -> "Priority":
        """Return ``value`` as a ``Priority``.

        Args:
            value: a ``Priority``, its integer value (0-4) or its name (any case).

        Returns:
            The matching ``Priority``.

        Raises:
            InvalidRequestError: ``value`` names no priority.
        """
        from .errors import InvalidRequestError

        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            try:
                return cls(value)
            except ValueError:
                pass
        raise InvalidRequestError(
            f"unknown priority {value!r}: use a torch_arbiter.Priority "
            f"({', '.join(p.name for p in cls)}) or an integer 0-4"
        )


@dataclass(frozen=True)
class WorkloadKind:
    """A kind of workload: its name, default quality floor and typical size.

    The three built-in kinds are the members of :class:`WorkloadType`; build a
    ``WorkloadKind`` yourself for anything else (an embedding server, a TTS model).

    Args:
        name: a short name shown in stats.
        floor: the lowest quality in [0, 1] the workload accepts by default.
        typical_bytes: the size asked for when a request names no byte count.
    """

    name: str
    floor: float
    typical_bytes: int

    def __post_init__(self) -> None:
        from .errors import InvalidRequestError

        if not (0.0 <= self.floor <= 1.0):
            raise InvalidRequestError(f"workload floor must be in [0, 1], got {self.floor!r}")
        if self.typical_bytes <= 0:
            raise InvalidRequestError(
                f"workload typical_bytes must be positive, got {self.typical_bytes!r}"
            )


class WorkloadType(enum.Enum):
    """The built-in workload kinds (floors 0.40 / 0.30 / 0.25, sizes 8 / 6 / 12 GiB)."""

    LLM_INFERENCE = WorkloadKind("llm_inference", 0.40, 8 * _GIB)
    IMAGE_GENERATION = WorkloadKind("image_generation", 0.30, 6 * _GIB)
    VIDEO_GENERATION = WorkloadKind("video_generation", 0.25, 12 * _GIB)

    @property
    def floor(self) -> float:
        """Default quality floor of this kind."""
        return self.value.floor

    @property
    def typical_bytes(self) -> int:
        """Bytes requested when a request names none."""
        return self.value.typical_bytes

    @staticmethod
    def custom(name: str, floor: float, typical_bytes: int) -> WorkloadKind:
        """Make a user-defined workload kind.

        Args:
            name: shown in stats.
            floor: default quality floor in [0, 1].
            typical_bytes: size of a request that names no byte count.

        Returns:
            A :class:`WorkloadKind` accepted wherever a ``WorkloadType`` is.
        """
        return WorkloadKind(name, floor, typical_bytes)


def _kind_of(workload_type: "WorkloadType | WorkloadKind") -> WorkloadKind:
    from .errors import InvalidRequestError

    if isinstance(workload_type, WorkloadType):
        return workload_type.value
    if isinstance(workload_type, WorkloadKind):
        return workload_type
    raise InvalidRequestError(
        f"unknown workload type {workload_type!r}: use a torch_arbiter.WorkloadType member "
        "or WorkloadType.custom(name, floor, typical_bytes)"
    )
