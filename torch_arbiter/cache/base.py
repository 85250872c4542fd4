"""What every tier of the fragment cache provides, and the in-memory store DEVICE and HOST share."""

from __future__ import annotations

import abc
from typing import Iterable

import torch

from .config import CacheTier

__all__ = ["TierStore", "MemoryTierStore", "tensor_nbytes"]


def tensor_nbytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor's elements (what the cache accounts; a view is counted by its own size)."""
    return tensor.numel() * tensor.element_size()


class TierStore(abc.ABC):
    """The storage behind one ``CacheTier``.

    A tier holds two kinds of copies: *writable* copies that ``FragmentCache`` puts, counts
    against the tier's capacity and may drop (LRU, demotion), and optionally a *read-only source*
    (a holo checkpoint on disk, the same served over HTTP) whose fragments are never dropped or
    counted. The cache keeps the LRU order and byte counts; a store only stores.
    """

    tier: CacheTier
    writable: bool = True

    @abc.abstractmethod
    def read(self, key: str) -> torch.Tensor:
        """The tensor of ``key`` (writable copy first, then the source).

        Raises:
            KeyError: neither a writable copy nor the source holds ``key``.
            CorruptFragmentError: the stored bytes fail their checksum or cannot be read.
        """

    @abc.abstractmethod
    def write(self, key: str, tensor: torch.Tensor) -> int:
        """Store a writable copy of ``tensor`` under ``key`` (replacing one); return its bytes."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Drop the writable copy of ``key`` (the source, if any, is untouched)."""

    def read_source(self, key: str) -> torch.Tensor:
        """The tensor of ``key`` from the read-only source, skipping writable copies. Sources never
        change, so the cache calls this without holding its lock.

        Raises:
            KeyError: the tier has no source or the source lacks ``key``.
            CorruptFragmentError: the stored bytes fail their checksum or cannot be read.
        """
        raise KeyError(key)

    def source_has(self, key: str) -> bool:
        """True when the read-only source holds ``key`` (never for tiers without a source)."""
        return False

    def source_keys(self) -> Iterable[str]:
        """Every key of the read-only source."""
        return ()

    def existing_copies(self) -> dict[str, int]:
        """Writable copies already present when the cache opens (key → bytes): a reused spill dir."""
        return {}

    def close(self) -> None:
        """Release what the store holds open (files, temporary directories)."""


class MemoryTierStore(TierStore):
    """Tensors held in memory on one torch device: the DEVICE and HOST tiers.

    Args:
        tier: which tier this store is.
        device: where copies live; a tensor already there is kept as is (no copy), so on a CPU
            machine the DEVICE and HOST copies of a fragment share one storage.
        pin: pin copies in page-locked memory (HOST tier in front of a CUDA device).

    Limits: the store keeps a reference to the tensor it is given when no copy is needed; do
    not modify a tensor in place after handing it to the cache. A view of a larger tensor is
    cloned so the tier's byte count is the memory it really keeps alive.
    """

    def __init__(self, tier: CacheTier, device: torch.device, *, pin: bool = False) -> None:
        self.tier = tier
        self.device = torch.device(device)
        self.pin = pin
        self._tensors: dict[str, torch.Tensor] = {}

    def read(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def write(self, key: str, tensor: torch.Tensor) -> int:
        source = tensor.detach()
        if source.device == self.device and not self.pin:
            stored = source  # no copy: on a CPU machine DEVICE and HOST copies share this storage
        else:
            # From pinned memory the copy to the device is asynchronous: later kernels on the
            # stream wait for it, and torch's pinned allocator keeps the source block until done.
            stored = source.to(self.device, non_blocking=source.device.type == "cpu" and source.is_pinned())
        if stored.untyped_storage().nbytes() != tensor_nbytes(stored):
            stored = stored.clone()
        if self.pin and stored.device.type == "cpu" and not stored.is_pinned():
            stored = stored.pin_memory()
        self._tensors[key] = stored
        return tensor_nbytes(stored)

    def delete(self, key: str) -> None:
        self._tensors.pop(key, None)

    def close(self) -> None:
        self._tensors.clear()
