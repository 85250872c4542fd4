"""``FragmentCache``: HoloTensor fragments across DEVICE ← HOST ← DISK ← REMOTE.

Raising a model's quality promotes the fragments it now needs to the DEVICE tier; lowering
demotes them. The rule every operation keeps: **a fragment is never lost** — the last copy of a
fragment is written to a lower tier before it leaves its tier, and LRU eviction pushes copies
down instead of dropping them.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import torch

from ..errors import InsufficientMemoryError, InvalidRequestError, UnknownFragmentError
from .base import TierStore, tensor_nbytes
from .config import CacheConfig, CacheStats, CacheTier
from .device import DeviceTier
from .disk import DiskTier
from .host import HostTier
from .remote import RemoteTier
from .sources import CheckpointSource, content_key, open_source

__all__ = ["FragmentCache"]

#: Fetch latencies kept per tier for the p50/p99 in ``CacheStats`` (the newest ones).
_LATENCY_WINDOW = 4096


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
    does not hold up other calls and ``get_many`` overlaps fetches; concurrent ``get`` calls of
    one fragment from a source share one read (a prefetch and a raise never fetch it twice). Tensors handed to ``put`` or
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
        self._bytes_in = dict.fromkeys(CacheTier, 0)
        self._bytes_out = dict.fromkeys(CacheTier, 0)
        self._latencies: dict[CacheTier, list[float]] = {tier: [] for tier in CacheTier}
        # Checkpoints attached at run time (the live path): content key -> (source, fragment id),
        # per tier (DISK: local directories, REMOTE: URLs); the first source of a key serves it.
        self._registry: dict[CacheTier, dict[str, tuple[CheckpointSource, str]]] = {
            CacheTier.DISK: {}, CacheTier.REMOTE: {}}
        self._attached: dict[str, CheckpointSource] = {}
        # Who uses each key (owners: their copies live while one remains) and who holds it at
        # DEVICE now, oldest first (the first holder is charged for it).
        self._owners: dict[str, set[str]] = {}
        self._holders: dict[str, OrderedDict[str, int]] = {}
        # Reads from a read-only source under way: (tier, key) -> the read's result, which a second
        # caller of the same fragment waits for instead of fetching it again.
        self._in_flight: dict[tuple[CacheTier, str], Future] = {}
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
                return self._finish_get(key, tier, source, self._timed_read(source, key))
            read = self._source_reader(source, key)
            flight = self._in_flight.get((source, key))
            leader = flight is None
            if leader:
                flight = self._in_flight[(source, key)] = Future()
        if not leader:  # the same fragment is being read for another caller: one read, not two
            tensor = flight.result()
            with self._lock:
                self._check_open()
                return self._finish_get(key, tier, source, tensor, read_out=False)
        # read-only sources never change (put() refuses their keys), so they are read without the
        # lock: fetches of different fragments (``get_many``) overlap, other calls are not held up
        started = time.perf_counter()
        try:
            tensor = read()
        except BaseException as exc:
            with self._lock:
                del self._in_flight[(source, key)]
            flight.set_exception(exc)
            raise
        try:
            with self._lock:
                self._check_open()
                self._record_latency(source, time.perf_counter() - started)
                return self._finish_get(key, tier, source, tensor)
        finally:
            with self._lock:
                del self._in_flight[(source, key)]
            flight.set_result(tensor)

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


    # ------------------------------------------------------------------ the live path

    def attach(self, location: str | os.PathLike) -> CheckpointSource:
        """Serve the fragments of a holo checkpoint (directory or URL) under their content keys.

        Attaching the same location again returns the source already attached. A fragment whose
        content another attached checkpoint already serves keeps that first source (it is one
        fragment: same bytes, dtype and shape).

        Args:
            location: a holo checkpoint directory (served by the DISK tier) or an ``http(s)://``
                base URL (the REMOTE tier), read with this cache's remote rules and caps.

        Returns:
            The :class:`~torch_arbiter.cache.sources.CheckpointSource`; its ``keys`` map each
            fragment id to the content key to ``get`` / ``acquire``.

        Raises:
            FormatError, CorruptFragmentError, InvalidRequestError: as ``open_source``.
        """
        text = os.fspath(location)
        lookup = text if text.startswith(("http://", "https://")) else str(Path(text).resolve())
        with self._lock:
            self._check_open()
            known = self._attached.get(lookup) or self._attached.get(lookup.rstrip("/") + "/")
            if known is not None:
                return known
        config = self.config
        source = open_source(text, timeout=config.remote_timeout, allow_insecure=config.allow_insecure,
                             allow_cross_host_redirects=config.allow_cross_host_redirects,
                             max_index_bytes=config.max_index_bytes, max_fragment_bytes=config.max_fragment_bytes)
        with self._lock:
            self._check_open()
            known = self._attached.get(source.location)
            if known is not None:
                return known
            registry = self._registry[source.tier]
            for fid, key in source.keys.items():
                registry.setdefault(key, (source, fid))
            self._attached[source.location] = source
            return source

    def read(self, key: str) -> torch.Tensor:
        """The fragment from the fastest tier holding it, without keeping a new copy anywhere.

        For reads that must not disturb residency (saving a model's original weights, checking a
        weight against a checkpoint).

        Raises:
            UnknownFragmentError: no tier holds ``key``.
            CorruptFragmentError: the copy read from DISK or REMOTE fails its checksum.
        """
        self._check_key(key)
        with self._lock:
            self._check_open()
            tiers = self._tiers_holding(key)
            if not tiers:
                raise self._unknown(key)
            tier = tiers[0]
            self._hits[tier] += 1
            if key in self._lru[tier]:
                return self._timed_read(tier, key)
            read = self._source_reader(tier, key)
        started = time.perf_counter()
        tensor = read()
        with self._lock:
            self._record_latency(tier, time.perf_counter() - started)
        return tensor

    def ready(self, key: str) -> bool:
        """True when a raise can use ``key`` without waiting on a read: a copy is in DEVICE or
        HOST, or it is on local DISK and the HOST tier is bounded with no room for it (then the
        raise reads it from DISK: prefetching it could only evict other fragments). A fragment
        only a URL holds is never ready: fetch it first (the ``Prefetcher`` does)."""
        with self._lock:
            if key in self._lru[CacheTier.DEVICE] or key in self._lru[CacheTier.HOST]:
                return True
            if not self._holds(CacheTier.DISK, key):
                return False
            capacity = self.config.capacity(CacheTier.HOST)
            return capacity is not None and capacity - self._used[CacheTier.HOST] < self._nbytes_locked(key)

    def prefetch(self, key: str) -> int:
        """Bring ``key`` into HOST ahead of a raise (staging a network-only fragment on DISK when
        HOST has no room for it); nothing when it is already in DEVICE or HOST.

        Unlike ``get(key, HOST)`` this never makes a second memory copy of a fragment that
        reaches DEVICE meanwhile (a raise may take it while the read is under way).

        Returns:
            The bytes read (0 when nothing had to be).

        Raises:
            UnknownFragmentError, CorruptFragmentError: as :meth:`get`.
        """
        self._check_key(key)
        with self._lock:
            self._check_open()
            if key in self._lru[CacheTier.DEVICE] or key in self._lru[CacheTier.HOST]:
                return 0
            nbytes = self._nbytes_locked(key)
            capacity = self.config.capacity(CacheTier.HOST)
            to_host = capacity is None or capacity - self._used[CacheTier.HOST] >= nbytes
            if not to_host and self._holds(CacheTier.DISK, key):
                return 0  # stays on local DISK: a raise reads it there
            source = self._find(key, CacheTier.DISK)
            if key in self._lru[source]:
                tensor = self._timed_read(source, key)
                read = None
            else:
                read = self._source_reader(source, key)
        if read is not None:
            started = time.perf_counter()
            tensor = read()
        with self._lock:
            self._check_open()
            if read is not None:
                self._record_latency(source, time.perf_counter() - started)
            if key in self._lru[CacheTier.DEVICE] or key in self._lru[CacheTier.HOST]:
                return 0
            self._finish_get(key, CacheTier.HOST if to_host else CacheTier.DISK, source, tensor)
            return tensor_nbytes(tensor)

    def fragment_nbytes(self, key: str) -> int:
        """Bytes of fragment ``key`` (from a copy, or from its source's index).

        Raises:
            UnknownFragmentError: no tier holds ``key``.
        """
        with self._lock:
            if not self._tiers_holding(key):
                raise self._unknown(key)
            return self._nbytes_locked(key)

    def _nbytes_locked(self, key: str) -> int:
        for tier in CacheTier:
            if key in self._lru[tier]:
                return self._lru[tier][key]
            attached = self._registry.get(tier, {}).get(key)
            if attached is not None:
                source, fid = attached
                return int(source.index["fragments"][fid]["length"])
        return 0

    def host_room(self) -> int | None:
        """Bytes the HOST tier can take without evicting anything (None: unbounded)."""
        capacity = self.config.capacity(CacheTier.HOST)
        with self._lock:
            return None if capacity is None else max(0, capacity - self._used[CacheTier.HOST])

    def own(self, key: str, owner: str) -> None:
        """Record that ``owner`` (a model) uses ``key``: its writable copies live while some
        owner remains (see :meth:`disown`)."""
        self._check_key(key)
        with self._lock:
            self._owners.setdefault(key, set()).add(owner)

    def disown(self, owner: str) -> None:
        """``owner`` is gone: drop the writable copies of the keys no other owner uses.

        The read-only sources (checkpoints, URLs) are untouched, and a key still held at DEVICE
        by someone keeps its copies. Fragments put by a model patched from memory leave with it.
        """
        with self._lock:
            for key in [k for k, owners in self._owners.items() if owner in owners]:
                owners = self._owners[key]
                owners.discard(owner)
                if owners or self._holders.get(key):
                    continue
                del self._owners[key]
                for tier in self._writable_tiers(key):
                    self._drop(key, tier)

    def acquire(self, key: str, holder: str) -> torch.Tensor:
        """The fragment at DEVICE for a forward, held by ``holder`` until :meth:`release`.

        The DEVICE copy is shared by every holder of the same content key; the first holder
        (oldest) is the one charged for it (:meth:`charged_bytes`). A HOST copy is dropped once
        the fragment is at DEVICE when a copy below HOST exists (HOST holds what is *not*
        resident: prefetched and recently lowered fragments).

        Raises:
            UnknownFragmentError, CorruptFragmentError, InsufficientMemoryError: as :meth:`get`.
        """
        fetched = False
        while True:
            with self._lock:  # in memory already (a switch's usual case): one lock, no search
                self._check_open()
                if key in self._lru[CacheTier.DEVICE]:
                    if not fetched:  # else get() below counted this call's hit, where it found the copy
                        self._hits[CacheTier.DEVICE] += 1
                    self._touch(key, CacheTier.DEVICE)
                elif key in self._lru[CacheTier.HOST]:
                    self._misses[CacheTier.DEVICE] += 1  # counted as get() would
                    self._finish_get(key, CacheTier.DEVICE, CacheTier.HOST, self._stores[CacheTier.HOST].read(key))
                if key in self._lru[CacheTier.DEVICE]:
                    holders = self._holders.setdefault(key, OrderedDict())
                    holders[holder] = holders.get(holder, 0) + 1
                    if (key in self._lru[CacheTier.HOST]
                            and any(self._holds(t, key) for t in (CacheTier.DISK, CacheTier.REMOTE))):
                        self._drop(key, CacheTier.HOST)
                    return self._stores[CacheTier.DEVICE].read(key)
            # Read from DISK or REMOTE without the lock; the last holder of another model may
            # release the DEVICE copy before this one registers, so look again.
            self.get(key, CacheTier.DEVICE)
            fetched = True

    def release(self, key: str, holder: str) -> None:
        """``holder`` no longer needs ``key`` at DEVICE. When no holder is left the DEVICE copy
        goes: to HOST while the HOST tier has free room (a cheap raise later), else it is
        dropped if a lower copy exists, else written down (HOST, spilling to DISK)."""
        with self._lock:
            holders = self._holders.get(key)
            if not holders or holder not in holders:
                return
            holders[holder] -= 1
            if holders[holder] <= 0:
                del holders[holder]
            if holders:
                return
            del self._holders[key]
            if self._closed or key not in self._lru[CacheTier.DEVICE]:
                return
            nbytes = self._lru[CacheTier.DEVICE][key]
            room = self.config.capacity(CacheTier.HOST)
            if key not in self._lru[CacheTier.HOST] and (room is None or self._used[CacheTier.HOST] + nbytes <= room):
                self._push_to(key, CacheTier.DEVICE, CacheTier.HOST)
                self._drop(key, CacheTier.DEVICE)
            else:
                self._evict_one(key, CacheTier.DEVICE)

    def charged_bytes(self, holder: str) -> int:
        """DEVICE bytes charged to ``holder``: the fragments it holds and was the first to hold."""
        with self._lock:
            return sum(self._lru[CacheTier.DEVICE].get(key, 0) for key, holders in self._holders.items()
                       if next(iter(holders)) == holder)

    def shared_bytes(self, holder: str) -> int:
        """DEVICE bytes ``holder`` holds that another, older holder is charged for."""
        with self._lock:
            return sum(self._lru[CacheTier.DEVICE].get(key, 0) for key, holders in self._holders.items()
                       if holder in holders and next(iter(holders)) != holder)

    def _finish_get(self, key: str, tier: CacheTier, source: CacheTier, tensor: torch.Tensor,
                    read_out: bool = True) -> torch.Tensor:
        """Count the hit and copy ``tensor`` (read from ``source``; ``read_out`` False when another
        caller's read of it is shared) to ``tier``; lock held."""
        self._hits[source] += 1
        if source is tier or key in self._lru[tier]:  # the latter: another thread got it there first
            self._touch(key, tier)
            return tensor if source is tier else self._stores[tier].read(key)
        nbytes = tensor_nbytes(tensor)
        if read_out:
            self._bytes_out[source] += nbytes
        if source is CacheTier.REMOTE and self.config.stage_remote_on_disk and tier < CacheTier.DISK:
            self._stage_on_disk(key, tensor)
        if not self._writable(tier):
            return tensor
        self._store(key, tensor, tier)
        self._bytes_in[tier] += nbytes
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
                seen.update(self._all_source_keys(tier))
            return iter(sorted(seen))

    def resident_bytes(self, tier: CacheTier) -> int:
        """Bytes of the writable copies held at ``tier`` now."""
        with self._lock:
            return self._used[self._check_tier(tier)]

    def stats(self) -> CacheStats:
        """A consistent snapshot of the counters (see ``CacheStats``)."""
        with self._lock:
            entries = {tier: len(self._all_source_keys(tier) | set(self._lru[tier])) for tier in CacheTier}
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
                bytes_in=dict(self._bytes_in),
                bytes_out=dict(self._bytes_out),
                fetch_p50_s={tier: _percentile(self._latencies[tier], 0.50) for tier in CacheTier},
                fetch_p99_s={tier: _percentile(self._latencies[tier], 0.99) for tier in CacheTier},
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
        if key in self._registry.get(tier, ()):
            return True
        store = self._stores.get(tier)
        return store is not None and store.source_has(key)

    def _all_source_keys(self, tier: CacheTier) -> set[str]:
        store = self._stores.get(tier)
        return set(self._registry.get(tier, ())) | (set(store.source_keys()) if store is not None else set())

    def _source_reader(self, tier: CacheTier, key: str):
        """A no-argument callable reading ``key`` from ``tier``'s read-only source."""
        attached = self._registry.get(tier, {}).get(key)
        if attached is not None:
            source, fid = attached
            return lambda: source.read_fragment(fid)
        store = self._stores[tier]
        return lambda: store.read_source(key)

    def _timed_read(self, tier: CacheTier, key: str) -> torch.Tensor:
        """Read the writable copy at ``tier`` (lock held), timing reads from DISK."""
        started = time.perf_counter()
        tensor = self._stores[tier].read(key)
        if tier >= CacheTier.DISK:
            self._record_latency(tier, time.perf_counter() - started)
        return tensor

    def _record_latency(self, tier: CacheTier, seconds: float) -> None:
        latencies = self._latencies[tier]
        latencies.append(seconds)
        if len(latencies) > 2 * _LATENCY_WINDOW:
            del latencies[:-_LATENCY_WINDOW]

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
        self._bytes_out[source] += tensor_nbytes(tensor)
        self._bytes_in[target] += tensor_nbytes(tensor)

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
        self._bytes_in[CacheTier.DISK] += tensor_nbytes(tensor)

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


def _percentile(values: list[float], share: float) -> float:
    """The ``share`` quantile of ``values`` (nearest rank; 0.0 when empty)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]
