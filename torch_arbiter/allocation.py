"""Requests, grants and their outcomes.

An :class:`Allocation` is the live handle a workload holds: its ``quality`` and
``granted_bytes`` change under it at every rebalance, so a model can read them
between steps. Release it explicitly, or use it as a (sync or async) context
manager.
"""

from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from .errors import InvalidRequestError
from .priority import Priority, WorkloadKind, WorkloadType, _kind_of

if TYPE_CHECKING:
    from .arbiter import Arbiter

__all__ = ["Allocation", "AllocationRequest", "AllocationResult", "AllocationState"]

_MAX_BYTES = 1 << 50  # 1 PiB: anything larger is a unit mistake, not a model


class AllocationState(enum.Enum):
    """Where an allocation stands."""

    WAITING = "waiting"
    ACTIVE = "active"
    SUSPENDED = "suspended"
    RELEASED = "released"


@dataclass(frozen=True)
class AllocationRequest:
    """A validated request for memory.

    Args:
        workload: a :class:`WorkloadType` member or a custom :class:`WorkloadKind`.
        priority: a :class:`Priority` (or its int / name).
        bytes: full-quality weight bytes; None takes the kind's typical size.
        min_quality: the floor; None takes the kind's floor.
        timeout: seconds to wait for memory; None waits for ever.
        wait: False fails at once when its floor does not fit (an admitted request still waits,
            up to ``timeout``, for models lowered for it to let go of the memory).
        name: shown in state and stats; defaults to the kind's name.
        curve: optional sorted ``(quality, bytes)`` points the model really needs;
            its first point raises the floor to the lowest quality the model can run at.
        activation_bytes: bytes needed at any quality (activations, KV cache);
            None takes the kind's typical activation bytes.

    Raises:
        InvalidRequestError: for any argument out of range (see each message).
    """

    workload: WorkloadKind
    priority: Priority
    bytes: int
    min_quality: float
    timeout: float | None = None
    wait: bool = True
    name: str = ""
    curve: tuple[tuple[float, int], ...] = ()
    activation_bytes: int = 0

    @classmethod
    def build(
        cls,
        workload: "WorkloadType | WorkloadKind",
        priority: "Priority | int | str" = Priority.NORMAL,
        *,
        bytes: int | None = None,
        min_quality: float | None = None,
        timeout: float | None = None,
        wait: bool = True,
        name: str | None = None,
        curve: Sequence[tuple[float, int]] | None = None,
        activation_bytes: int | None = None,
    ) -> "AllocationRequest":
        """Validate raw arguments into a request (see the class for their meaning)."""
        kind = _kind_of(workload)
        prio = Priority.coerce(priority)
        nbytes = kind.typical_bytes if bytes is None else bytes
        _check_bytes("bytes", nbytes, allow_zero=False)
        if activation_bytes is None:
            activation_bytes = kind.typical_activation_bytes
        _check_bytes("activation_bytes", activation_bytes, allow_zero=True)
        floor = kind.floor if min_quality is None else min_quality
        _check_quality("min_quality", floor)
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout >= 0 and not math.isnan(timeout)):
            raise InvalidRequestError(f"timeout must be None or seconds >= 0, got {timeout!r}")
        points = _check_curve(curve)
        if any(a[0] > b[0] or a[1] > b[1] for a, b in zip(points, points[1:])):
            raise InvalidRequestError("curve must be sorted by quality with non-decreasing bytes")
        if points and points[0][0] > floor:
            floor = points[0][0]
        return cls(kind, prio, int(nbytes), float(floor), timeout, bool(wait), name or kind.name, points, int(activation_bytes))


def _check_curve(curve: object) -> tuple[tuple[float, int], ...]:
    """The ``(quality, bytes)`` points of ``curve``, each checked before it is converted."""
    if curve is None:
        return ()
    if isinstance(curve, (str, bytes)) or not isinstance(curve, Sequence):
        raise InvalidRequestError(f"curve must be a sequence of (quality, bytes) pairs, got {type(curve).__name__}")
    points = []
    for point in curve:
        if isinstance(point, (str, bytes)) or not isinstance(point, Sequence) or len(point) != 2:
            raise InvalidRequestError(f"each curve point must be a (quality, bytes) pair, got {point!r}")
        q, b = point
        _check_quality("curve quality", q)
        _check_bytes("curve bytes", b, allow_zero=True)
        points.append((float(q), int(b)))
    return tuple(points)


def _check_bytes(what: str, value: object, *, allow_zero: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise InvalidRequestError(f"{what} must be a whole number of bytes, got {value!r}")
    low = 0 if allow_zero else 1
    if value < low:
        raise InvalidRequestError(f"{what} must be >= {low}, got {value}: pass a byte count")
    if value > _MAX_BYTES:
        raise InvalidRequestError(
            f"{what}={value} is over 1 PiB: pass bytes, not bits or a unit-less size"
        )


def _check_quality(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0.0 <= value <= 1.0):
        raise InvalidRequestError(f"{what} must be a number in [0, 1], got {value!r}")


class Allocation:
    """A workload's live grant from an :class:`~torch_arbiter.arbiter.Arbiter`.

    Attributes read live (they change at each rebalance): ``quality``,
    ``granted_bytes``, ``state``. Use ``with allocation:`` or
    ``async with allocation:`` to release on exit.
    """

    def __init__(self, arbiter: "Arbiter", allocation_id: int, request: AllocationRequest, sequence: int) -> None:
        self._arbiter = arbiter
        self.id = allocation_id
        self.request = request
        self.sequence = sequence
        self.priority = request.priority
        self.activation_bytes = request.activation_bytes
        self.quality = 0.0
        self.granted_bytes = 0
        self.state = AllocationState.WAITING

    @property
    def name(self) -> str:
        """The request's name."""
        return self.request.name

    @property
    def workload(self) -> WorkloadKind:
        """The workload kind."""
        return self.request.workload

    @property
    def full_bytes(self) -> int:
        """Weight bytes at quality 1."""
        return self.request.bytes

    @property
    def min_quality(self) -> float:
        """The floor this allocation is never lowered below while active."""
        return self.request.min_quality

    @property
    def released(self) -> bool:
        """True once released (explicitly, by a context exit, or after a timeout)."""
        return self.state is AllocationState.RELEASED

    @property
    def used_bytes(self) -> int:
        """Bytes the model really needs at the current quality (from ``curve``; else ``granted_bytes``)."""
        if not self.request.curve or self.state is not AllocationState.ACTIVE:
            return self.granted_bytes
        need = 0
        for q, b in self.request.curve:
            if q > self.quality + 1e-12:
                break
            need = b
        return need + self.activation_bytes

    def release(self) -> None:
        """Give the memory back; the arbiter rebalances everyone else.

        Raises:
            UnknownWorkloadError: already released, or not this arbiter's.
        """
        self._arbiter.release(self)

    def __enter__(self) -> "Allocation":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.released:
            self.release()

    async def __aenter__(self) -> "Allocation":
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self.released:
            self.release()

    def __repr__(self) -> str:
        return (
            f"Allocation(id={self.id}, name={self.name!r}, priority={self.priority.name}, "
            f"state={self.state.value}, quality={self.quality:.3f}, granted_bytes={self.granted_bytes})"
        )


@dataclass(frozen=True)
class AllocationResult:
    """The outcome of one request, for code that prefers a value to an exception.

    Attributes:
        request: the validated request (None when the arguments were invalid).
        allocation: the granted allocation, or None.
        error: the ``ArbiterError`` that was raised, or None.
        waited_s: seconds the request waited before the outcome.
    """

    request: AllocationRequest | None
    allocation: Allocation | None
    error: Exception | None
    waited_s: float

    @property
    def granted(self) -> bool:
        """True when an allocation was granted."""
        return self.allocation is not None
