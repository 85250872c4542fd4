"""Typed errors of torch_arbiter.

Every error raised on bad input or an unmet request is an :class:`ArbiterError`
subclass whose message says what happened *and what to do about it*. Catch
``ArbiterError`` to handle them all. They are re-exported from
``torch_arbiter.arbiter`` and ``torch_arbiter``.
"""

from __future__ import annotations

__all__ = [
    "ArbiterError",
    "InvalidRequestError",
    "UnknownWorkloadError",
    "InsufficientMemoryError",
    "AllocationTimeoutError",
    "PreemptedError",
    "CorruptFragmentError",
    "FormatError",
    "PatchError",
    "AllocatorError",
    "WorkloadOutOfMemoryError",
    "ModelNotAvailableError",
    "UnknownFragmentError",
    "OptionalDependencyError",
]


class ArbiterError(Exception):
    """Base class of every error torch_arbiter raises on purpose."""


class InvalidRequestError(ArbiterError, ValueError):
    """An argument is out of range or of the wrong kind (negative bytes, NaN quality, ...)."""


class UnknownWorkloadError(ArbiterError, KeyError):
    """A workload or allocation id the arbiter does not know (never granted, or already released)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class InsufficientMemoryError(ArbiterError):
    """The request can never fit: its floor is larger than the device's capacity."""


class AllocationTimeoutError(ArbiterError, TimeoutError):
    """A request waited for memory longer than its ``timeout``."""


class PreemptedError(ArbiterError):
    """A workload was suspended for a higher-priority one and not re-admitted in time: a patched
    model's forward waited past its ``patch(timeout=...)`` while the model held no memory."""


class CorruptFragmentError(ArbiterError):
    """A stored fragment failed its checksum or could not be read."""


class FormatError(ArbiterError):
    """A holo checkpoint (index or safetensors file) is malformed or inconsistent."""


class PatchError(ArbiterError):
    """A model cannot be patched or unpatched as asked."""


class AllocatorError(ArbiterError):
    """The pluggable allocator library cannot be loaded, installed or configured."""


class WorkloadOutOfMemoryError(ArbiterError):
    """A workload ran out of its budget even after the arbiter reclaimed memory and retried."""


class ModelNotAvailableError(ArbiterError):
    """A model or file the project loads locally is not installed (the message names the pip command)."""


class UnknownFragmentError(InvalidRequestError, KeyError):
    """A fragment key that no tier of the ``FragmentCache`` holds (never put, not in its sources)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class OptionalDependencyError(ArbiterError, ImportError):
    """A feature needs a package from one of torch_arbiter's extras that is not installed (the message
    names the pip command)."""
