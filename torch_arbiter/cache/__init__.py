"""The fragment cache: HoloTensor fragments across DEVICE ← HOST ← DISK ← REMOTE tiers.

``FragmentCache`` is the cache; ``CacheConfig`` lays out its tiers, ``CacheStats`` is a snapshot
of its counters and ``CacheTier`` names the tiers. One module per tier holds its storage:
``device`` (the compute device), ``host`` (RAM), ``disk`` (a holo checkpoint plus a spill
directory) and ``remote`` (a holo checkpoint over HTTP).
"""

from .config import CacheConfig, CacheStats, CacheTier
from .device import DeviceTier
from .disk import DiskTier
from .fragment_cache import FragmentCache
from .host import HostTier
from .remote import RemoteTier

__all__ = [
    "FragmentCache",
    "CacheConfig",
    "CacheStats",
    "CacheTier",
    "DeviceTier",
    "HostTier",
    "DiskTier",
    "RemoteTier",
]
