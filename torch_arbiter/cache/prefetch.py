"""``Prefetcher``: a bounded pool that brings fragments into HOST ahead of a raise.

A model whose target quality rises needs the fragments of its new levels; reading them from
DISK or REMOTE inside the switch would stall the forward that reaches the safe point. The
prefetcher reads them in the background, in the planner's order, into the HOST tier (within its
budget; a fragment fetched over HTTP is also staged on DISK), and tells the model as each one
lands, so the raise itself is a copy from memory. A newer wish replaces an older one: fragments
no longer wanted (the target dropped) are cancelled before they start. A failed fetch is retried
with exponential backoff; if it still fails the fragment is reported failed and the model stays
at the level it has.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable

from ..errors import ArbiterError, InsufficientMemoryError
from .fragment_cache import FragmentCache, _percentile

__all__ = ["Prefetcher", "PrefetchStats"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefetchStats:
    """What the prefetcher did for one owner (a model).

    Attributes:
        fetched: fragments it brought up (from DISK or REMOTE).
        fetched_bytes: their bytes.
        cancelled: fragments dropped from the queue because the target fell.
        failed: fragments that still failed after every retry.
        fetch_p50_s: median seconds per fetched fragment (retries included).
        fetch_p99_s: the 99th percentile of the same.
    """

    fetched: int = 0
    fetched_bytes: int = 0
    cancelled: int = 0
    failed: int = 0
    fetch_p50_s: float = 0.0
    fetch_p99_s: float = 0.0


@dataclass
class _Owner:
    on_landed: Callable[[str], None]
    queued: dict[str, Future] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)
    fetched: int = 0
    fetched_bytes: int = 0
    cancelled: int = 0
    latencies: list[float] = field(default_factory=list)


class Prefetcher:
    """Fetch fragments into a cache's HOST tier with a bounded pool of threads.

    Args:
        cache: the fragment cache.
        workers: most fetches in flight at once (over HTTP each costs a round trip).
        retries: extra attempts of a failed fetch.
        backoff_s: wait before the first retry; doubled at each next one.

    Limits: a fetch already running is not interrupted (its fragment lands and stays cached);
    only queued ones are cancelled.
    """

    def __init__(self, cache: FragmentCache, *, workers: int = 4, retries: int = 3, backoff_s: float = 0.1) -> None:
        self.cache = cache
        self.retries = retries
        self.backoff_s = backoff_s
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="torch_arbiter-prefetch")
        self._lock = threading.Lock()
        self._owners: dict[str, _Owner] = {}
        self._closed = False

    def want(self, owner: str, keys: Iterable[str], on_landed: Callable[[str], None]) -> int:
        """Fetch ``keys`` (in this order) for ``owner``, replacing its previous wish.

        Keys already in memory are skipped; queued keys of the previous wish that are not in
        ``keys`` are cancelled. ``on_landed(key)`` is called from a pool thread as each lands.

        Returns:
            How many fetches were queued.
        """
        wanted = list(dict.fromkeys(keys))
        with self._lock:
            if self._closed:
                return 0
            state = self._owners.setdefault(owner, _Owner(on_landed))
            state.on_landed = on_landed
            keep = set(wanted)
            for key, future in list(state.queued.items()):
                if key not in keep and future.cancel():
                    del state.queued[key]
                    state.cancelled += 1
            queued = 0
            for key in wanted:
                if key in state.queued or key in state.failed or self.cache.ready(key):
                    continue
                state.queued[key] = self._pool.submit(self._fetch, owner, key)
                queued += 1
            return queued

    def forget(self, owner: str) -> None:
        """Cancel everything queued for ``owner`` and drop its counters."""
        with self._lock:
            state = self._owners.pop(owner, None)
        if state is not None:
            for future in state.queued.values():
                future.cancel()

    def retry_failed(self, owner: str) -> None:
        """Let fragments that failed for ``owner`` be wanted again (e.g. after the server is back)."""
        with self._lock:
            state = self._owners.get(owner)
            if state is not None:
                state.failed.clear()

    def failed(self, owner: str) -> set[str]:
        """The keys that failed every retry for ``owner``."""
        with self._lock:
            state = self._owners.get(owner)
            return set(state.failed) if state is not None else set()

    def stats(self, owner: str) -> PrefetchStats:
        """The counters of ``owner`` (zeros when it never wanted anything)."""
        with self._lock:
            state = self._owners.get(owner)
            if state is None:
                return PrefetchStats()
            return PrefetchStats(state.fetched, state.fetched_bytes, state.cancelled, len(state.failed),
                                 _percentile(state.latencies, 0.50), _percentile(state.latencies, 0.99))

    def idle(self, owner: str, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or running for ``owner``; True when so."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                state = self._owners.get(owner)
                pending = [f for f in state.queued.values() if not f.done()] if state is not None else []
            if not pending:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    def close(self) -> None:
        """Cancel what is queued and stop the pool (running fetches finish)."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _fetch(self, owner: str, key: str) -> None:
        started = time.perf_counter()
        error: BaseException | None = None
        nbytes = 0
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                nbytes = self.cache.prefetch(key)
                error = None
                break
            except InsufficientMemoryError:
                error = None  # no room anywhere above: it stays where it is, which is not a failure
                break
            except ArbiterError as exc:
                error = exc
        elapsed = time.perf_counter() - started
        with self._lock:
            state = self._owners.get(owner)
            if state is None:
                return
            state.queued.pop(key, None)
            if error is not None:
                state.failed.add(key)
            elif nbytes:
                state.fetched += 1
                state.fetched_bytes += nbytes
                state.latencies.append(elapsed)
            callback = state.on_landed
        if error is not None:
            _log.warning("torch_arbiter: fragment %s could not be fetched after %d attempts (%s); the model "
                         "stays at the levels it has", key, self.retries + 1, error)
        callback(key)

