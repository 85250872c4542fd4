"""``FragmentCache``: HoloTensor fragments across DEVICE ← HOST ← DISK ← REMOTE.

Raising a model's quality promotes the fragments it now needs to the DEVICE tier; lowering
demotes them. The rule every operation keeps: **a fragment is never lost** — the last copy of a
fragment is written to a lower tier before it leaves its tier, and LRU eviction pushes copies
down instead of dropping them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

import torch

from ..errors import InsufficientMemoryError, InvalidRequestError, UnknownFragmentError
from .base import TierStore, tensor_nbytes
from .config import CacheConfig, CacheStats, CacheTier
from .device import DeviceTier
from .disk import DiskTier
from .host import HostTier
from .remote import RemoteTier

__all__ = ["FragmentCache"]


# where get(key, tier) looks: the tier itself, then each lower tier, then the tiers above (nearest first)
_SEARCH_ORDER = {
    tier: (*(CacheTier(t) for t in range(tier, len(CacheTier))), *(CacheTier(t) for t in range(tier - 1, -1, -1)))
    for tier in CacheTier
}


class FragmentCache:
    """A tiered, thread-safe cache of fragment tensors keyed by string ids.

    Args:
        config: tiers, capacities and sources (default: ``CacheConfig()``, i.e. unbounded memory
            tiers on the detected compute device, a private temporary spill directory, no holo
            checkpoint, no remote).

    Semantics:
        * ``put(key, t, tier)`` stores ``t`` at ``tier`` and drops other writable copies of
          ``key`` (they would be stale).
        * ``get(key, tier)`` returns the copy at ``tier``, copying it there from the nearest
          tier below (or above) when needed; lower copies are kept.
        * ``demote(key, tier)`` drops the copies above ``tier``; if that would leave none, the
          fragment is written to ``tier`` first.
        * ``evict(key, tier)`` drops the copy at ``tier``, pushing it down when it is the last.
        * When a tier would exceed its capacity, its least recently used copies are evicted
          (pushed down when they are the last copy); a copy that cannot go anywhere (the spill
          is the lowest writable tier) is skipped, and if nothing can make room the call fails
          with ``InsufficientMemoryError`` — having lost nothing.

    Limits: one lock guards the cache's state and its writable copies (memory, spill files);
    reads from the read-only sources (holo checkpoint, HTTP) happen outside it, so a slow fetch
    does not hold up other calls and ``get_many`` overlaps fetches. Tensors handed to ``put`` or
    returned by ``get`` may share storage with the cache's copies: do not modify them in place.
    """

    def __init__(self, config: CacheConfig | None = None) -> None:
        self.config = config if config is not None else CacheConfig()
        self._lock = threading.RLock()
        # the network is the likeliest failure: reach it before creating a private spill directory
        remote = (
            RemoteTier(self.config.remote_url, timeout=self.config.remote_timeout,
                       allow_insecure=self.config.allow_insecure,
                       allow_cross_host_redirects=self.config.allow_cross_host_redirects,
                       max_index_bytes=self.config.max_index_bytes,
                       max_fragment_bytes=self.config.max_fragment_bytes)
            if self.config.remote_url is not None
            else None
        )
        self._stores: dict[CacheTier, TierStore] = {
            CacheTier.DEVICE: DeviceTier(self.config.device),
            CacheTier.HOST: HostTier(pin=bool(self.config.pin_host_memory)),
            CacheTier.DISK: DiskTier(self.config.spill_dir, self.config.holo_dir,
                                     max_index_bytes=self.config.max_index_bytes,
                                     max_fragment_bytes=self.config.max_fragment_bytes),
        }
        if remote is not None:
            self._stores[CacheTier.REMOTE] = remote
        # writable copies per tier, least recently used first, with their byte sizes; and their sum
        self._lru: dict[CacheTier, OrderedDict[str, int]] = {tier: OrderedDict() for tier in CacheTier}
        self._used = dict.fromkeys(CacheTier, 0)
        for key, nbytes in self._stores[CacheTier.DISK].existing_copies().items():
            self._lru[CacheTier.DISK][key] = nbytes
            self._used[CacheTier.DISK] += nbytes
        self._hits = dict.fromkeys(CacheTier, 0)
        self._misses = dict.fromkeys(CacheTier, 0)
        self._promotions = self._demotions = self._evictions = 0
        self._bytes_promoted = self._bytes_demoted = 0
        self._closed = False

    # ------------------------------------------------------------------ public API

    def put(self, key: str, tensor: torch.Tensor, tier: CacheTier = CacheTier.HOST) -> None:
        """Store a fragment at ``tier``, replacing whatever the cache held under ``key``.

        Args:
            key: the fragment id (a non-empty string; a holo fragment id for source-backed ones).
            tensor: the fragment's data.
            tier: DEVICE, HOST or DISK (REMOTE is read-only).

        Raises:
            InvalidRequestError: bad key, not a tensor, REMOTE, or a key that a read-only source
                holds (its bytes are defined by that source: ``get`` it instead).
            InsufficientMemoryError: the tensor is larger than the tier's capacity, or the tier
                is full of copies that cannot move down.
        """
        tier = self._check_tier(tier)
        self._check_key(key)
        if not isinstance(tensor, torch.Tensor):
            raise InvalidRequestError(f"put({key!r}) needs a torch.Tensor, got {type(tensor).__name__}")
        if not self._writable(tier):
            raise InvalidRequestError(f"the {tier.name} tier is read-only; put fragments at DEVICE, HOST or DISK")
        with self._lock:
            self._check_open()
            sources = self._source_tiers(key)
            if sources:
                raise InvalidRequestError(
                    f"fragment {key!r} comes from the read-only {sources[0].name} source, which defines its bytes; "
                    "get() it to have it at a tier, or use another key for different data"
                )
            self._store(key, tensor, tier)
            for other in list(self._writable_tiers(key)):
                if other is not tier:
                    self._drop(key, other)

    def get(self, key: str, tier: CacheTier = CacheTier.DEVICE) -> torch.Tensor:
        """Return the fragment as held at ``tier``, promoting it there when needed.

        Looks at ``tier`` first, then each lower tier, then the tiers above; copies the first
        copy found to ``tier`` (DEVICE: onto the compute device) and keeps the copy it came from.
        A fragment fetched from REMOTE is also staged on DISK when
        ``CacheConfig.stage_remote_on_disk`` is set.

        Args:
            key: the fragment id.
            tier: where the caller wants it (REMOTE only reads, it never stores).

        Returns:
            The tensor at ``tier``.

        Raises:
            UnknownFragmentError: no tier holds ``key``.
            CorruptFragmentError: the copy read from DISK or REMOTE fails its checksum.
            InsufficientMemoryError: the fragment cannot fit at ``tier`` (the lower copy stays).
        """
        tier = self._check_tier(tier)
        self._check_key(key)
        with self._lock:
            self._check_open()
            source = self._find(key, tier)
            if key in self._lru[source]:  # a writable copy may move: read it under the lock
                return self._finish_get(key, tier, source, self._stores[source].read(key))
            store = self._stores[source]
        # read-only sources never change (put() refuses their keys), so they are read without the
        # lock: fetches of different fragments (``get_many``) overlap, other calls are not held up
        tensor = store.read_source(key)
        with self._lock:
            self._check_open()
            return self._finish_get(key, tier, source, tensor)

    def get_many(
        self, keys: Iterable[str], tier: CacheTier = CacheTier.DEVICE, *, max_workers: int = 8
    ) -> dict[str, torch.Tensor]:
        """``get`` several fragments, reading those from DISK/REMOTE sources in parallel.

        Raising a model's quality needs many fragments at once; over HTTP each costs a round
        trip, so overlapping them divides the wait by up to ``max_workers``.

        Args:
            keys: the fragment ids.
            tier: where the caller wants them.
            max_workers: most reads in flight at once.

        Returns:
            key → tensor at ``tier``, in the order of ``keys``.

        Raises:
            The first error any ``get`` raises (fragments fetched before it stay cached).
        """
        keys = list(keys)
        if not isinstance(max_workers, int) or max_workers < 1:
            raise InvalidRequestError(f"max_workers must be a positive int, got {max_workers!r}")
        if len(keys) <= 1 or max_workers == 1:
            return {key: self.get(key, tier) for key in keys}
        with ThreadPoolExecutor(max_workers=min(max_workers, len(keys)), thread_name_prefix="fragment-cache") as pool:
            return dict(zip(keys, pool.map(lambda key: self.get(key, tier), keys)))

    def _finish_get(self, key: str, tier: CacheTier, source: CacheTier, tensor: torch.Tensor) -> torch.Tensor:
        """Count the hit and copy ``tensor`` (read from ``source``) to ``tier``; lock held."""
        self._hits[source] += 1
        if source is tier or key in self._lru[tier]:  # the latter: another thread got it there first
            self._touch(key, tier)
            return tensor if source is tier else self._stores[tier].read(key)
        nbytes = tensor_nbytes(tensor)
        if source is CacheTier.REMOTE and self.config.stage_remote_on_disk and tier < CacheTier.DISK:
            self._stage_on_disk(key, tensor)
        if not self._writable(tier):
            return tensor
        self._store(key, tensor, tier)
        if source > tier:
            self._promotions += 1
            self._bytes_promoted += nbytes
        else:
            self._demotions += 1
            self._bytes_demoted += nbytes
        return self._stores[tier].read(key)

    def demote(self, key: str, tier: CacheTier) -> None:
        """Drop the copies of ``key`` above ``tier``, writing it to ``tier`` first if they are the
        only ones. Demoting to a tier at or above every copy does nothing.

        Args:
            key: the fragment id.
            tier: the highest tier that may keep a copy afterwards.

        Raises:
            UnknownFragmentError: no tier holds ``key``.
            InvalidRequestError: the only copies are above REMOTE's read-only tier and ``tier``
                is REMOTE (demote to DISK instead).
            InsufficientMemoryError: ``tier`` has no room for the copy (nothing is dropped then).
        """
        tier = self._check_tier(tier)
        self._check_key(key)
        with self._lock:
            self._check_open()
            held = self._tiers_holding(key)
            if not held:
                raise self._unknown(key)
            above = [t for t in held if t < tier]
            if not above:
                return
            if not any(t >= tier for t in held):
                if not self._writable(tier):
                    raise InvalidRequestError(
                        f"fragment {key!r} exists only above {tier.name}, which is read-only; "
                        "demote it to DISK so a copy is kept"
                    )
                self._push_to(key, above[-1], tier)
            for upper in above:
                self._drop(key, upper)

    def evict(self, key: str, tier: CacheTier) -> None:
        """Drop the copy of ``key`` at ``tier``; if it is the last copy, push it to the next
        writable tier below first. Does nothing when ``tier`` holds no writable copy.

        Raises:
            InsufficientMemoryError: it is the last copy and no lower tier can take it.
        """
        tier = self._check_tier(tier)
        self._check_key(key)
        with self._lock:
            self._check_open()
            if key in self._lru[tier]:
                self._evict_one(key, tier)

    def tiers_of(self, key: str) -> tuple[CacheTier, ...]:
        """The tiers holding a copy of ``key``, fastest first (empty when none does)."""
        with self._lock:
            return tuple(self._tiers_holding(key))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(self.tiers_of(key))

    def keys(self) -> Iterator[str]:
        """Every key some tier holds (writable copies and read-only sources), sorted."""
        with self._lock:
            seen: set[str] = set()
            for tier in CacheTier:
                seen.update(self._lru[tier])
                if tier in self._stores:
                    seen.update(self._stores[tier].source_keys())
            return iter(sorted(seen))

    def resident_bytes(self, tier: CacheTier) -> int:
        """Bytes of the writable copies held at ``tier`` now."""
        with self._lock:
            return self._used[self._check_tier(tier)]

    def stats(self) -> CacheStats:
        """A consistent snapshot of the counters (see ``CacheStats``)."""
        with self._lock:
            entries = {}
            for tier in CacheTier:
                store = self._stores.get(tier)
                sources = set(store.source_keys()) if store is not None else set()
                entries[tier] = len(sources | set(self._lru[tier]))
            return CacheStats(
                hits=dict(self._hits),
                misses=dict(self._misses),
                resident_bytes=dict(self._used),
                entries=entries,
                promotions=self._promotions,
                demotions=self._demotions,
                evictions=self._evictions,
                bytes_promoted=self._bytes_promoted,
                bytes_demoted=self._bytes_demoted,
            )

    def close(self) -> None:
        """Release memory copies and remove the private spill directory (a given one is kept).

        Limits: after ``close()`` every call raises ``InvalidRequestError``; fragments that lived
        only in memory or in a private spill directory are gone — that is what closing means.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for store in self._stores.values():
                store.close()

    def __enter__(self) -> "FragmentCache":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals (lock held)

    def _holds(self, tier: CacheTier, key: str) -> bool:
        return key in self._lru[tier] or self._source_has(tier, key)

    def _tiers_holding(self, key: str) -> list[CacheTier]:
        return [tier for tier in CacheTier if self._holds(tier, key)]

    def _source_has(self, tier: CacheTier, key: str) -> bool:
        store = self._stores.get(tier)
        return store is not None and store.source_has(key)

    def _source_tiers(self, key: str) -> list[CacheTier]:
        return [tier for tier in CacheTier if self._source_has(tier, key)]

    def _writable_tiers(self, key: str) -> list[CacheTier]:
        return [tier for tier in CacheTier if key in self._lru[tier]]

    def _find(self, key: str, tier: CacheTier) -> CacheTier:
        """The tier to read ``key`` from for a ``get`` at ``tier``, counting the misses on the way."""
        for candidate in _SEARCH_ORDER[tier]:
            if self._holds(candidate, key):
                return candidate
            if candidate >= tier:
                self._misses[candidate] += 1
        raise self._unknown(key)

    def _touch(self, key: str, tier: CacheTier) -> None:
        if key in self._lru[tier]:
            self._lru[tier].move_to_end(key)

    def _store(self, key: str, tensor: torch.Tensor, tier: CacheTier) -> None:
        """Write a copy at ``tier`` after making room; the copy becomes most recently used."""
        nbytes = tensor_nbytes(tensor)
        self._make_room(tier, nbytes - self._lru[tier].get(key, 0), keep=key)
        written = self._stores[tier].write(key, tensor)
        self._used[tier] += written - self._lru[tier].get(key, 0)
        self._lru[tier][key] = written
        self._lru[tier].move_to_end(key)

    def _make_room(self, tier: CacheTier, nbytes: int, *, keep: str) -> None:
        """Evict LRU copies from ``tier`` until ``nbytes`` more fit; never evicts ``keep``."""
        capacity = self.config.capacity(tier)
        if capacity is None:
            return
        if nbytes + self._lru[tier].get(keep, 0) > capacity:
            raise InsufficientMemoryError(
                f"fragment {keep!r} ({nbytes + self._lru[tier].get(keep, 0)} bytes) is larger than the whole "
                f"{tier.name} tier ({capacity} bytes); raise CacheConfig.{tier.name.lower()}_capacity_bytes"
            )
        for victim in list(self._lru[tier]):
            if self._used[tier] + nbytes <= capacity:
                return
            if victim != keep and self._can_leave(victim, tier):
                self._evict_one(victim, tier)
        if self._used[tier] + nbytes > capacity:
            raise InsufficientMemoryError(
                f"the {tier.name} tier ({capacity} bytes) is full of fragments that exist nowhere below it; "
                f"raise CacheConfig.{tier.name.lower()}_capacity_bytes or give the cache a lower tier to spill to"
            )

    def _can_leave(self, key: str, tier: CacheTier) -> bool:
        """True when the copy at ``tier`` may go: a lower copy exists or a lower tier can take it."""
        lower = [t for t in self._tiers_holding(key) if t > tier]
        return bool(lower) or self._next_writable_below(tier) is not None

    def _writable(self, tier: CacheTier) -> bool:
        store = self._stores.get(tier)
        return store is not None and store.writable

    def _next_writable_below(self, tier: CacheTier) -> CacheTier | None:
        for lower in range(tier + 1, len(CacheTier)):
            if self._writable(CacheTier(lower)):
                return CacheTier(lower)
        return None

    def _evict_one(self, key: str, tier: CacheTier) -> None:
        """Drop the copy at ``tier``, first pushing it down if no lower tier holds ``key``."""
        if not any(t > tier for t in self._tiers_holding(key)):
            target = self._next_writable_below(tier)
            if target is None:
                raise InsufficientMemoryError(
                    f"fragment {key!r} has its last copy in {tier.name}, the lowest writable tier, so it stays "
                    f"there; raise CacheConfig.{tier.name.lower()}_capacity_bytes if the tier is too small"
                )
            self._push_to(key, tier, target)
        self._drop(key, tier)
        self._evictions += 1

    def _push_to(self, key: str, source: CacheTier, target: CacheTier) -> None:
        """Copy ``key`` from ``source`` down to ``target`` (a demotion)."""
        tensor = self._stores[source].read(key)
        self._store(key, tensor, target)
        self._demotions += 1
        self._bytes_demoted += tensor_nbytes(tensor)

    def _drop(self, key: str, tier: CacheTier) -> None:
        nbytes = self._lru[tier].pop(key, None)
        if nbytes is not None:
            self._used[tier] -= nbytes
            self._stores[tier].delete(key)

    def _stage_on_disk(self, key: str, tensor: torch.Tensor) -> None:
        """Best-effort DISK copy of a fragment fetched over the network."""
        if key in self._lru[CacheTier.DISK] or self._source_has(CacheTier.DISK, key):
            return
        try:
            self._store(key, tensor, CacheTier.DISK)
        except InsufficientMemoryError:
            return
        self._promotions += 1
        self._bytes_promoted += tensor_nbytes(tensor)

    def _unknown(self, key: str) -> UnknownFragmentError:
        return UnknownFragmentError(
            f"fragment {key!r} is in no tier of this cache; put() it first or open the holo checkpoint that holds it"
        )

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidRequestError("this FragmentCache is closed; create a new one")

    @staticmethod
    def _check_tier(tier: CacheTier | int) -> CacheTier:
        try:
            return CacheTier(tier)
        except ValueError:
            raise InvalidRequestError(
                f"{tier!r} is not a cache tier; use CacheTier.DEVICE, HOST, DISK or REMOTE"
            ) from None

    @staticmethod
    def _check_key(key: object) -> None:
        if not isinstance(key, str) or not key:
            raise InvalidRequestError(f"fragment keys are non-empty strings, got {key!r}")
