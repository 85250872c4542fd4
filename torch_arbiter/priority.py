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
    """A kind of workload: its name, default quality floor and typical sizes.

    The three built-in kinds are the members of :class:`WorkloadType`; build a
    ``WorkloadKind`` yourself for anything else (an embedding server, a TTS model).

    Args:
        name: a short name shown in stats.
        floor: the lowest quality in [0, 1] the workload accepts by default.
        typical_bytes: the weight bytes asked for when a request names no byte count.
        typical_activation_bytes: the quality-independent bytes (activations, KV
            cache) asked for when a request names none.
    """

    name: str
    floor: float
    typical_bytes: int
    typical_activation_bytes: int = 0

    def __post_init__(self) -> None:
        from .errors import InvalidRequestError

        if not (0.0 <= self.floor <= 1.0):
            raise InvalidRequestError(f"workload floor must be in [0, 1], got {self.floor!r}")
        if self.typical_activation_bytes < 0:
            raise InvalidRequestError("typical_activation_bytes must be >= 0")
        if self.typical_bytes <= 0:
            raise InvalidRequestError(
                f"workload typical_bytes must be positive, got {self.typical_bytes!r}"
            )


class WorkloadType(enum.Enum):
    """The built-in workload kinds.

    Floors 0.40 / 0.30 / 0.25; weights 8 / 6 / 12 GiB; activations 1 / 1.5 / 3 GiB
    (a KV cache of a few thousand tokens; a VAE decode at 1024 px; a video latent
    batch). The sizes are only defaults for requests that name none: ``patch()``
    passes a model's real sizes.
    """

    LLM_INFERENCE = WorkloadKind("llm_inference", 0.40, 8 * _GIB, 1 * _GIB)
    IMAGE_GENERATION = WorkloadKind("image_generation", 0.30, 6 * _GIB, 3 * _GIB // 2)
    VIDEO_GENERATION = WorkloadKind("video_generation", 0.25, 12 * _GIB, 3 * _GIB)

    @property
    def floor(self) -> float:
        """Default quality floor of this kind."""
        return self.value.floor

    @property
    def typical_bytes(self) -> int:
        """Bytes requested when a request names none."""
        return self.value.typical_bytes

    @property
    def typical_activation_bytes(self) -> int:
        """Activation bytes requested when a request names none."""
        return self.value.typical_activation_bytes

    @staticmethod
    def custom(name: str, floor: float, typical_bytes: int, typical_activation_bytes: int = 0) -> WorkloadKind:
        """Make a user-defined workload kind.

        Args:
            name: shown in stats.
            floor: default quality floor in [0, 1].
            typical_bytes: weight bytes of a request that names no byte count.
            typical_activation_bytes: activation bytes of a request that names none.

        Returns:
            A :class:`WorkloadKind` accepted wherever a ``WorkloadType`` is.
        """
        return WorkloadKind(name, floor, typical_bytes, typical_activation_bytes)


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
