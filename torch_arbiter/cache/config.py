"""The fragment cache's tiers, configuration and statistics."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InvalidRequestError
from ..holo.format import MAX_FRAGMENT_BYTES, MAX_INDEX_BYTES

__all__ = ["CacheTier", "CacheConfig", "CacheStats"]


class CacheTier(enum.IntEnum):
    """Where a fragment copy lives, fastest first (the seed's VRAM ← RAM ← NVMe ← CDN).

    Lower values are "above" (closer to compute): promoting moves a fragment to a lower value,
    demoting to a higher one.
    """

    DEVICE = 0
    HOST = 1
    DISK = 2
    REMOTE = 3


@dataclass
class CacheConfig:
    """How a ``FragmentCache`` is laid out.

    Args:
        device: the compute device the DEVICE tier holds tensors on; ``None`` picks ``cuda`` when
            available, else ``cpu`` (where DEVICE and HOST copies share storage: on a CPU machine
            the DEVICE tier is a budget, not a separate memory).
        device_capacity_bytes: most bytes the DEVICE tier may hold; ``None`` means unbounded
            (the arbiter bounds residency through quality; this is a safety cap).
        host_capacity_bytes: same for HOST (pinned RAM when the device is CUDA).
        disk_capacity_bytes: same for the DISK tier's spill directory (the read-only holo
            checkpoint is not counted: it is the original, never evicted).
        holo_dir: a holo checkpoint directory whose fragments the DISK tier serves (read-only,
            through ``HoloCheckpoint``); ``None`` for none.
        spill_dir: writable directory for fragments demoted to DISK (one safetensors file each,
            written atomically); ``None`` makes a private temporary directory removed by
            ``FragmentCache.close()``. A given directory is kept, and fragments already spilled
            there by an earlier cache are served again.
        remote_url: base URL of a holo checkpoint served over HTTP (``holo_index.json`` and the
            safetensors files under it, with Range support); ``None`` for no REMOTE tier.
        remote_timeout: seconds each HTTP request may take in all (connect, headers and the
            whole body) before it fails: a deadline, however slowly the server sends.
        allow_insecure: allow a plain ``http://`` ``remote_url`` (or redirect) to a host other
            than loopback; refused by default (anyone on the path sees what is fetched; the
            checksums still refuse altered bytes).
        allow_cross_host_redirects: follow a server's redirect to another host (e.g. a CDN);
            refused by default. Same-host redirects are followed (at most 5).
        max_index_bytes: largest ``holo_index.json`` read from ``holo_dir`` or ``remote_url``
            (default 64 MiB); raise it for a checkpoint whose index is really larger.
        max_fragment_bytes: largest single fragment an index may describe (default 16 GiB).
        stage_remote_on_disk: keep a DISK spill copy of every fragment fetched from REMOTE, so
            raising quality again reads NVMe rather than the network (best effort: skipped when
            the spill is full).
        pin_host_memory: pin HOST copies for fast device transfers; ``None`` pins when the device
            is CUDA.
    """

    device: torch.device | str | None = None
    device_capacity_bytes: int | None = None
    host_capacity_bytes: int | None = None
    disk_capacity_bytes: int | None = None
    holo_dir: str | Path | None = None
    spill_dir: str | Path | None = None
    remote_url: str | None = None
    remote_timeout: float = 30.0
    allow_insecure: bool = False
    allow_cross_host_redirects: bool = False
    max_index_bytes: int = MAX_INDEX_BYTES
    max_fragment_bytes: int = MAX_FRAGMENT_BYTES
    stage_remote_on_disk: bool = True
    pin_host_memory: bool | None = None

    def __post_init__(self) -> None:
        if self.device is None:
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            try:
                self.device = torch.device(self.device)
            except (RuntimeError, TypeError) as exc:
                raise InvalidRequestError(
                    f"CacheConfig.device {self.device!r} is not a torch device: {exc}; pass e.g. 'cpu' or 'cuda:0'"
                ) from None
        for name in ("device_capacity_bytes", "host_capacity_bytes", "disk_capacity_bytes",
                     "max_index_bytes", "max_fragment_bytes"):
            value = getattr(self, name)
            if value is None and name.endswith("capacity_bytes"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidRequestError(
                    f"CacheConfig.{name} must be a non-negative int of bytes or None (unbounded), got {value!r}"
                )
        if not isinstance(self.remote_timeout, (int, float)) or math.isnan(self.remote_timeout) or self.remote_timeout <= 0:
            raise InvalidRequestError(f"CacheConfig.remote_timeout must be a positive number of seconds, got {self.remote_timeout!r}")
        for name in ("allow_insecure", "allow_cross_host_redirects"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(f"CacheConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.remote_url is not None:
            from .remote import check_remote_url

            check_remote_url(self.remote_url, allow_insecure=self.allow_insecure)
        if self.pin_host_memory is None:
            self.pin_host_memory = self.device.type == "cuda"

    def capacity(self, tier: CacheTier) -> int | None:
        """The byte capacity of a tier (``None``: unbounded; REMOTE is always ``None``)."""
        field_name = _CAPACITY_FIELDS[tier]  # an int tier finds its IntEnum key too
        return None if field_name is None else getattr(self, field_name)


_CAPACITY_FIELDS = {CacheTier.DEVICE: "device_capacity_bytes", CacheTier.HOST: "host_capacity_bytes",
                    CacheTier.DISK: "disk_capacity_bytes", CacheTier.REMOTE: None}


def _per_tier() -> dict[CacheTier, int]:
    return {tier: 0 for tier in CacheTier}


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of a ``FragmentCache``'s counters (``FragmentCache.stats()``).

    Attributes:
        hits: per tier, the ``get`` calls that tier served.
        misses: per tier, the ``get`` calls that looked in that tier and did not find the key.
        resident_bytes: per tier, bytes of the copies the cache holds there now (DISK: the
            spill directory only; REMOTE: always 0).
        entries: per tier, how many keys have a copy there now (DISK and REMOTE include the
            fragments of their read-only sources).
        promotions: copies made to a tier above the one they came from (``get``).
        demotions: copies written to a lower tier because the last copy was leaving its tier
            (``demote``, ``evict``, LRU eviction), plus ``get`` calls served from above.
        evictions: copies dropped from a tier to make room (LRU) or by ``evict``.
        bytes_promoted: bytes copied upwards.
        bytes_demoted: bytes copied downwards.
        bytes_in: per tier, bytes written into it (from any other tier).
        bytes_out: per tier, bytes read out of it to be copied to another tier.
        fetch_p50_s: per tier, median seconds of one read from DISK or REMOTE (the newest 4096
            to 8192 reads; 0.0 when none and for the memory tiers).
        fetch_p99_s: per tier, the 99th percentile of the same.
    """

    hits: dict[CacheTier, int] = field(default_factory=_per_tier)
    misses: dict[CacheTier, int] = field(default_factory=_per_tier)
    resident_bytes: dict[CacheTier, int] = field(default_factory=_per_tier)
    entries: dict[CacheTier, int] = field(default_factory=_per_tier)
    promotions: int = 0
    demotions: int = 0
    evictions: int = 0
    bytes_promoted: int = 0
    bytes_demoted: int = 0
    bytes_in: dict[CacheTier, int] = field(default_factory=_per_tier)
    bytes_out: dict[CacheTier, int] = field(default_factory=_per_tier)
    fetch_p50_s: dict[CacheTier, float] = field(default_factory=lambda: dict.fromkeys(CacheTier, 0.0))
    fetch_p99_s: dict[CacheTier, float] = field(default_factory=lambda: dict.fromkeys(CacheTier, 0.0))

    @property
    def bytes_moved(self) -> int:
        """All bytes copied between tiers, either way."""
        return self.bytes_promoted + self.bytes_demoted

    def hit_rate(self, tier: CacheTier) -> float:
        """Hits over lookups of ``tier``: the share of ``get`` calls that found the key there
        (0.0 when the tier was never looked at)."""
        lookups = self.hits[tier] + self.misses[tier]
        return self.hits[tier] / lookups if lookups else 0.0
