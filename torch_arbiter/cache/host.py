"""The HOST tier: fragments in system RAM, one copy away from the device."""

from __future__ import annotations

import torch

from .base import MemoryTierStore
from .config import CacheTier

__all__ = ["HostTier"]


class HostTier(MemoryTierStore):
    """Fragments in CPU memory, pinned when they feed a CUDA device (pinned pages copy to the
    GPU asynchronously and about twice as fast as pageable ones).

    Args:
        pin: pin every copy in page-locked memory.

    Limits: pinned memory is a scarce OS resource; bound the tier with
    ``CacheConfig.host_capacity_bytes`` on machines with little RAM.
    """

    def __init__(self, *, pin: bool = False) -> None:
        super().__init__(CacheTier.HOST, torch.device("cpu"), pin=pin)
