"""The DEVICE tier: fragments resident on the compute device, ready for a forward pass."""

from __future__ import annotations

import torch

from .base import MemoryTierStore
from .config import CacheTier

__all__ = ["DeviceTier"]


class DeviceTier(MemoryTierStore):
    """Fragments held on the compute device (``cuda:N``, or ``cpu`` on a machine without a GPU).

    Args:
        device: the compute device.

    Limits: on ``cpu`` the tier shares storage with HOST copies (``Tensor.to`` does not copy),
    so its byte count is a residency budget, not extra memory.
    """

    def __init__(self, device: torch.device | str) -> None:
        super().__init__(CacheTier.DEVICE, torch.device(device))
