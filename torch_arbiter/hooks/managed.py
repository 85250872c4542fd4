"""``patch()``: one line turns a loaded model or pipeline into one whose quality the arbiter moves.

``patch(obj)`` swaps the weight layers of ``obj`` for Holo modules (encoding them, or reading a
converted holo checkpoint), guards every top module with a safe-point hook, registers the model
with an :class:`~torch_arbiter.arbiter.Arbiter` and returns a :class:`ManagedModel`.

Quality ``q`` is the share of the model's full weight bytes (every parameter and buffer, the
layers that stay exact included) that may be resident. The layers that are not swapped
(norms, biases, layers tied in unusual ways) are always resident at full size, so the Holo layers get
``q × full bytes − fixed bytes`` and :func:`torch_arbiter.holo.plan_quality` spends that on the
levels that measure best per byte. Below :attr:`ManagedModel.min_quality` (every Holo layer at
its lowest level) the model cannot shrink further: lower requests apply ``min_quality``.

The arbiter's targets reach the model in its own context: the thread running its forward
applies the newest target at its next safe point, and the arbiter's applier thread does so when
the model is idle (never the thread that caused the rebalance). A raise is made only once the
arbiter sees room (the others' lowerings have passed their safe points), so what the models
hold never exceeds what the arbiter granted. A suspended model holds nothing: every Holo layer
drops to level 0 and its other tensors go to host memory; its next forward waits until it is
re-admitted (or raises :class:`~torch_arbiter.errors.PreemptedError` after ``patch(timeout=)``)
and its fragments come back from host memory, not from disk. With ``enforce=True`` (default)
every top-module forward runs inside its allocation's workload scope and recovers an
out-of-memory error there (:func:`torch_arbiter.allocator.run_with_recovery`).
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..allocation import AllocationState
from ..cache import CacheConfig, CacheTier, FragmentCache
from ..cache.prefetch import Prefetcher, PrefetchStats
from ..errors import AllocationTimeoutError, InvalidRequestError, PatchError, PreemptedError
from ..holo import plan_bytes, plan_order, plan_quality
from ..holo.calibrate import collect_layer_inputs
from ..holo.sensitivity import RecordedCalls, record_calls, record_model_errors
from ..memory import trim_host_heap
from ..nn import HoloConv2d, HoloEmbedding, HoloLinear
from ..nn.modules import guard_dtype_changes
from ..priority import Priority, WorkloadKind, WorkloadType
from .cached_weights import apply_fragment_cache, new_holder
from .holo_swap import SwappedLayer, apply_holo_swap, remove_holo_swap
from .safe_point import SafePointHandle, SafePointSwitch, apply_safe_point_hook
from .self_calibration import self_calibration_run

__all__ = ["ManagedModel", "ModelCacheStats", "patch", "managed_model_of", "managed_models"]

_log = logging.getLogger(__name__)
_MARKER = "_torch_arbiter_managed"
#: Retries of a forward refused past its budget. Only the first refused allocation of a forward is
#: known, so one reclaim rarely covers the whole forward: retry k asks 2**k times the shortfall
#: (``run_with_recovery``'s own rule), and a retry happens only when the arbiter did reclaim.
_OOM_RETRIES = 3
_REGISTERED: "weakref.WeakSet[ManagedModel]" = weakref.WeakSet()  # every model attached to an arbiter


def _components(obj: Any) -> tuple[dict[str, nn.Module], str]:
    """The top modules of ``obj`` by component name, and the kind of object it is."""
    diffusers = sys.modules.get("diffusers")  # a pipeline exists only if diffusers was imported
    if diffusers is not None and isinstance(obj, diffusers.DiffusionPipeline):
        modules = {name: value for name, value in obj.components.items() if isinstance(value, nn.Module)}
        if not modules:
            raise PatchError(f"the {type(obj).__name__} has no nn.Module component to patch")
        return modules, "diffusers"
    if isinstance(obj, nn.Module):
        return {"": obj}, "transformers" if _is_transformers_model(obj) else "module"
    raise PatchError(
        f"patch() takes a transformers PreTrainedModel, a diffusers DiffusionPipeline or an "
        f"nn.Module, got {type(obj).__name__}")


def _is_transformers_model(obj: Any) -> bool:
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(obj, transformers.PreTrainedModel)


def _default_workload(kind: str) -> WorkloadType:
    return WorkloadType.IMAGE_GENERATION if kind == "diffusers" else WorkloadType.LLM_INFERENCE


def _tensor_bytes(tensors) -> int:
    seen: set[tuple] = set()
    total = 0
    for tensor in tensors:
        if tensor is None or tensor.numel() == 0:
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.device, tensor.storage_offset(), tensor.numel())
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def managed_model_of(obj: Any) -> "ManagedModel | None":
    """The live :class:`ManagedModel` of a patched model or pipeline, or None.

    Args:
        obj: what was passed to :func:`patch` (or one of its components).

    Returns:
        The handle while ``obj`` is patched, else None.
    """
    modules = obj.components.values() if hasattr(obj, "components") and not isinstance(obj, nn.Module) else [obj]
    for module in modules:
        ref = getattr(module, _MARKER, None) if isinstance(module, nn.Module) else None
        if ref is not None and ref() is not None:
            return ref()
    return None


def managed_models(arbiter: Any = None) -> "list[ManagedModel]":
    """The patched models registered with ``arbiter`` (with any arbiter when None), oldest first.

    Metrics, the status file of ``torch-arbiter top`` and the notebook views read each model's
    resident bytes and quality in effect through this, since the arbiter itself only knows
    allocations.

    Args:
        arbiter: an :class:`~torch_arbiter.arbiter.Arbiter`, or None for all.

    Returns:
        The live (still patched, not garbage-collected) models, ordered by allocation id.

    Limits: a model patched with ``register=False`` is not listed.
    """
    found = [m for m in list(_REGISTERED) if m.patched and (arbiter is None or m.arbiter is arbiter)]
    return sorted(found, key=lambda m: m.allocation.id if m.allocation is not None else 0)


@dataclass(frozen=True)
class ModelCacheStats:
    """One model's view of the arbiter's fragment cache (:meth:`ManagedModel.cache_stats`).

    Attributes:
        charged_bytes: DEVICE bytes of fragments this model holds and is charged for.
        shared_bytes: DEVICE bytes it holds that an older holder of the same content pays for.
        fragments: fragments of its Holo layers that live in the cache.
        ready_fragments: how many of them a raise can use now (see ``FragmentCache.ready``).
        available_quality: the highest quality its ready fragments allow.
        prefetch: what the prefetcher fetched, cancelled and failed for it, with latencies.
    """

    charged_bytes: int
    shared_bytes: int
    fragments: int
    ready_fragments: int
    available_quality: float
    prefetch: PrefetchStats


class ManagedModel:
    """A patched model or pipeline whose weight quality moves at run time.

    Made by :func:`patch`. Thread-safe: :meth:`set_quality` may be called from any thread while
    the model runs; new levels are applied only at safe points (see :mod:`.safe_point`), by the
    model's forward thread or, when it is idle, by the arbiter's applier thread.

    Attributes:
        model: the object that was patched (model or pipeline).
        allocation: the arbiter allocation (None when registered with no arbiter).
        arbiter: the arbiter it is registered with (None when none).
        full_bytes: weight bytes at quality 1 (all parameters and buffers).
        fixed_bytes: bytes of the tensors that stay exact at every quality.
        min_quality: the lowest quality the model can run at.
    """

    def __init__(self, model: Any, components: Mapping[str, nn.Module], swapped: list[SwappedLayer],
                 switch_hooks: list[SafePointHandle], switch: SafePointSwitch[float], *,
                 enforce: bool = True, timeout: float | None = None, cache: FragmentCache | None = None,
                 holder: str = "", prefetcher: Prefetcher | None = None):
        """Use :func:`patch`; this only wires already-swapped parts together."""
        self.model = model
        self.cache = cache
        self.holder = holder
        self._prefetcher = prefetcher
        self._listener = None
        self._frontier = -1  # steps of plan_order whose fragments are ready (-1: not computed)
        self._frontier_moved = False
        self._streaming = False  # runs below its target while the prefetcher brings the rest
        self._components = dict(components)
        self._swapped = swapped
        # A tied embedding holds nothing and follows its head: plan and count the weight once.
        self._layers = {layer.tensor_name: layer.holo for layer in swapped if not layer.tied}
        self._holos = {name: module.holo for name, module in self._layers.items()}
        self._switch_hooks = switch_hooks
        self._switch = switch
        self._lock = threading.RLock()
        self._quality = 1.0
        self._cap = 1.0  # the user's set_quality on a registered model: at most this, at most the grant
        self._parked: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None  # suspended: tensors on host
        self._patched = True
        self.enforce = enforce
        self.timeout = timeout
        self.allocation = None
        self.arbiter = None
        self._curve: list[tuple[float, int]] | None = None
        self._curve_qualities: list[float] = []
        self._plan_steps: list[tuple[str, int, int]] | None = None
        self.fixed_bytes = self._measure_fixed_bytes()
        holo_full = sum(h.full_bytes for h in self._holos.values())
        self.full_bytes = self.fixed_bytes + holo_full
        self._holo_full = holo_full
        lowest = self.fixed_bytes + sum(h.level_bytes(1) for h in self._holos.values())
        self.min_quality = self._quality_for_bytes(lowest)

    # -- what a quality means --------------------------------------------------------------------

    def _holo_quality(self, q: float) -> float:
        """The quality handed to plan_quality for the Holo layers: their share of what q leaves
        after the fixed bytes, in [0, 1]."""
        if self._holo_full == 0:
            return 0.0
        return min(1.0, max(0.0, (q * self.full_bytes - self.fixed_bytes) / self._holo_full))

    def _quality_for_bytes(self, nbytes: int) -> float:
        """Smallest float q whose plan affords ``nbytes`` (fixed bytes included)."""
        if self.full_bytes == 0:
            return 0.0
        q = min(1.0, nbytes / self.full_bytes)
        # plan_quality's own budget arithmetic (holo quality x holo bytes), so the plan agrees.
        while q < 1.0 and self._holo_quality(q) * self._holo_full < nbytes - self.fixed_bytes:
            q = math.nextafter(q, 2.0)
        return q

    def _plan(self, q: float) -> tuple[dict[str, int], int]:
        """(levels, resident bytes) at quality q (raised to min_quality)."""
        q = max(q, self.min_quality)
        if q >= 1.0 or self._holo_full == 0:
            levels = {name: h.num_levels for name, h in self._holos.items()}
        else:
            levels = plan_quality(self._holos, self._holo_quality(q), order=self._steps())
        return levels, self.fixed_bytes + plan_bytes(self._holos, levels)

    @staticmethod
    def _check(q: Any) -> float:
        if isinstance(q, bool) or not isinstance(q, (int, float)) or math.isnan(q) or not 0.0 <= q <= 1.0:
            raise InvalidRequestError(f"quality must be a number in [0, 1], got {q!r}")
        return float(q)

    def bytes_at(self, q: float) -> int:
        """Resident weight bytes at quality ``q`` (exact: the sum of the planned level sizes).

        Args:
            q: a quality in [0, 1]; below :attr:`min_quality` the model holds ``min_quality``'s bytes.

        Returns:
            Bytes; ``bytes_at(1) == full_bytes`` and ``bytes_at(q) <= q * full_bytes`` for
            ``q >= min_quality``.

        Raises:
            InvalidRequestError: ``q`` outside [0, 1] or NaN.
        """
        return self._plan(self._check(q))[1]

    def levels_at(self, q: float) -> dict[str, int]:
        """The level of every Holo layer at quality ``q`` (by the weight's state-dict name)."""
        return self._plan(self._check(q))[0]

    @property
    def curve(self) -> list[tuple[float, int]]:
        """The exact ``(quality, bytes)`` steps of this model, from ``min_quality`` to 1.

        Each point is the lowest quality at which the next step of the planner's fixed order
        (:func:`torch_arbiter.holo.plan_order`) becomes affordable, with the bytes then resident:
        what the arbiter is given as ``curve``. ``bytes_at(q)`` of each point's ``q`` is its bytes.
        """
        if self._curve is None:
            steps = self._steps()
            first = len(self._holos)
            spent = self.fixed_bytes + sum(extra for _, _, extra in steps[:first])
            points = [(self.min_quality, spent)]
            for _, _, extra in steps[first:]:
                spent += extra
                if extra == 0 or spent >= self.full_bytes:
                    continue
                points.append((self._quality_for_bytes(spent), spent))
            points.append((1.0, self.full_bytes))
            self._curve = points
            self._curve_qualities = [q for q, _ in points]
        return list(self._curve)

    def _weights_at(self, q: float) -> int:
        """``bytes_at(q)`` read off the curve (O(log steps): what the arbiter's gate asks under its lock)."""
        curve = self.curve if self._curve is None else self._curve
        return curve[max(0, bisect.bisect_right(self._curve_qualities, q) - 1)][1]

    # -- live state --------------------------------------------------------------------------------

    @property
    def suspended(self) -> bool:
        """True while the model holds nothing (its allocation is suspended): forwards wait."""
        return self._parked is not None

    @property
    def quality(self) -> float:
        """The quality in effect now (a requested one waiting for a safe point is not yet; 0 while
        suspended)."""
        with self._lock:
            return self._quality

    @property
    def pending_quality(self) -> float | None:
        """A requested quality waiting for the running forward to end, or None."""
        return self._switch.pending

    @property
    def levels(self) -> dict[str, int]:
        """The level each Holo layer holds now, by the weight's state-dict name."""
        return {name: module.level for name, module in self._layers.items()}

    @property
    def layers(self) -> dict[str, nn.Module]:
        """The Holo modules, by the weight's state-dict name."""
        return dict(self._layers)

    @property
    def resident_bytes(self) -> int:
        """Weight bytes held now and charged to this model, measured from the tensors: Holo
        layers' resident tensors plus every other parameter and buffer (shared storage counted
        once), less the fragments it shares with an older holder of the same content in the
        arbiter's cache (that holder is charged for them)."""
        shared = self.cache.shared_bytes(self.holder) if self.cache is not None else 0
        return self.fixed_bytes_measured() + sum(m.resident_bytes for m in self._layers.values()) - shared

    def cache_stats(self) -> ModelCacheStats:
        """This model's side of the fragment cache: bytes charged and shared, fragments ready for
        a raise, and what the prefetcher fetched for it (see :class:`ModelCacheStats`)."""
        keys = [key for name in self._holos for key in self._content_keys(name)]
        prefetched = self._prefetcher.stats(self.holder) if self._prefetcher is not None else PrefetchStats()
        cache = self.cache
        return ModelCacheStats(
            charged_bytes=cache.charged_bytes(self.holder) if cache is not None else 0,
            shared_bytes=cache.shared_bytes(self.holder) if cache is not None else 0,
            fragments=len(keys),
            ready_fragments=sum(cache.ready(key) for key in keys) if cache is not None else 0,
            available_quality=self.available_quality,
            prefetch=prefetched)

    @property
    def streaming(self) -> bool:
        """True while the model runs below its target because fragments are still on their way
        (the prefetcher brings them; the quality rises as they land)."""
        return self._streaming

    @property
    def available_quality(self) -> float:
        """The highest quality whose fragments are ready (in memory, or on local DISK when HOST
        has no room): the model never runs above it, whatever its grant. 1.0 for a model whose
        fragments all live in memory, and for one with no prefetcher (patched with
        ``register=False`` and no arbiter: its raises read what they need)."""
        steps = self._steps()
        frontier = self._ready_frontier()
        if frontier >= len(steps):
            return 1.0
        first = len(self._holos)
        spent = self.fixed_bytes + sum(extra for _, _, extra in steps[:max(first, frontier)])
        return max(self.min_quality, self._quality_for_bytes(spent))

    def _steps(self) -> list[tuple[str, int, int]]:
        if self._plan_steps is None:
            self._plan_steps = plan_order(self._holos)
        return self._plan_steps

    def _ready_frontier(self) -> int:
        """How many steps of the planner's order have every fragment ready."""
        cache, steps = self.cache, self._steps()
        if cache is None or self._prefetcher is None:  # nothing brings fragments ahead: a raise reads them
            return len(steps)
        index = 0
        while index < len(steps) and all(cache.ready(key) for key in self._content_keys(*steps[index][:2])):
            index += 1
        return index

    def _content_keys(self, name: str, level: int | None = None) -> list[str]:
        """Cache keys of Holo layer ``name``'s fragments at ``level`` (all levels when None);
        empty when its fragments are not in a cache."""
        holo = self._holos[name]
        fragments = holo.fragments
        if not hasattr(fragments, "acquire"):
            return []
        names = fragments.content_keys if level is None else holo.level_fragments(level)
        return [fragments.content_keys[f] for f in names]

    def _wanted_keys(self, q: float) -> list[str]:
        """Content keys of the fragments quality ``q`` holds, in the planner's order."""
        levels, _ = self._plan(q)
        ordered: list[str] = []
        for name, level, _ in self._steps():
            if level <= levels[name]:
                ordered.extend(self._content_keys(name, level))
        return ordered

    def _prefetch(self, q: float | None) -> None:
        """Ask the prefetcher for what quality ``q`` needs (cancelling what it no longer does)."""
        if self._prefetcher is None or self.cache is None or not self._patched:
            return
        target = 0.0 if q is None else max(self.min_quality, min(q, self._cap))
        keys = self._wanted_keys(target) if target > 0 else []
        self._prefetcher.want(self.holder, keys, self._on_landed)

    def _on_landed(self, _key: str) -> None:
        """A fragment arrived (or failed): when the ready prefix grew, or the model is still short
        of its target, let it rise.

        Readiness is not monotonic (with a bounded HOST, a fragment on DISK counts as ready only
        while HOST has no room for it), so the prefix is measured afresh each time: a prefix
        remembered from before could hide what became ready again.
        """
        if not self._patched:
            return
        frontier = self._ready_frontier()
        if frontier <= self._frontier and not self._streaming:
            return
        self._frontier = frontier
        self._wake_to_rise()

    def _wake_to_rise(self) -> None:
        """Have the model re-plan at its next safe point (the applier's, when it is idle)."""
        self._frontier_moved = True
        if self.arbiter is not None and self.allocation is not None:
            self.arbiter._applier.wake({self.allocation.id})
        else:
            self._switch.request(None)

    def fixed_bytes_measured(self) -> int:
        """Bytes of the parameters and buffers outside the Holo fragments, measured now."""
        return self._measure_fixed_bytes()

    def _measure_fixed_bytes(self) -> int:
        tensors = []
        for module in self._components.values():
            tensors.extend(module.parameters())
            tensors.extend(module.buffers())
        return _tensor_bytes(tensors)

    def set_quality(self, q: float, *, wait: bool = False, timeout: float | None = None) -> bool:
        """Move the model to quality ``q`` at the next safe point.

        Applied at once when no forward of the model is running, else when the running forward
        ends (between decode steps, between UNet calls); a newer request replaces a pending one.
        On a model registered with an arbiter, ``q`` is a cap: the model runs at the lower of
        ``q`` and its grant (``set_quality(1.0)`` follows the grant again).

        Args:
            q: a quality in [0, 1]; values below :attr:`min_quality` apply ``min_quality``.
            wait: block until it is applied.
            timeout: with ``wait``, give up after this many seconds.

        Returns:
            True when the quality is in effect on return, False when it is still pending.

        Raises:
            InvalidRequestError: ``q`` outside [0, 1] or NaN.
            PatchError: the model was unpatched.
        """
        q = self._check(q)
        if not self._patched:
            raise PatchError("this model was unpatched: patch() it again to manage its quality")
        applied = self._switch.request(q)
        if not applied and wait:
            applied = self._switch.wait_applied(timeout)
        return applied

    def _apply(self, requested: float | None) -> bool:
        """Move to the newest target (called by the switch at a safe point, no forward running).

        ``requested`` is a user's :meth:`set_quality` (None: follow the arbiter). Returns False
        when the move is a raise the arbiter has no room for yet (it stays pending).
        """
        with self._lock:
            if not self._patched:
                return True
            if requested is not None:
                self._cap = requested
            self._frontier_moved = False
            if self.arbiter is None or self.allocation is None:
                self._move(self._cap)  # an explicit set_quality reads what it needs now
                return True
            allocation, arbiter = self.allocation, self.arbiter
            reserve = allocation.activation_bytes
            wanted = allocation.quality if allocation.state is AllocationState.ACTIVE else None
            available = self.available_quality

            def held_at(target: float | None) -> int:
                if target is None:
                    return 0
                return self._weights_at(max(min(target, self._cap, available), self.min_quality)) + reserve

            holding = arbiter.held_bytes().get(allocation.id, 0)
            target, generation, nbytes, allowed = arbiter._model_move(allocation, held_at)
            if not allowed:
                self._prefetch(wanted)
                return False
            moved = False
            # Below its target only until the prefetcher lands the rest: the target stays due (the
            # arbiter is not settled) unless a fetch failed for good, then this is where it stays.
            waiting = (target is not None and available < min(target, self._cap)
                       and not (self._prefetcher is not None and self._prefetcher.failed(self.holder)))
            try:
                if target is None:
                    self._move(None)
                else:
                    with self._scope():  # on CUDA, fragments raised now are charged to this model
                        self._move(min(target, self._cap, available))
                moved = True
                self._streaming = waiting
            finally:  # what it really holds now; a failed move stays due (tried again at the next safe point)
                if moved and nbytes < holding:
                    if str(arbiter.config.device).startswith("cuda"):
                        from ..allocator import empty_pool_caches

                        empty_pool_caches(arbiter)  # freed blocks stay cached in the pool, charged to it, until emptied
                    else:
                        trim_host_heap()  # freed fragments stay in glibc's heap until trimmed
                arbiter._commit_held(allocation, 0 if self._parked is not None else self.resident_bytes + reserve,
                                     generation if moved and not waiting else None)
                if moved:
                    self._recommit_sharers()
            if moved and waiting and self.available_quality > available:
                self._wake_to_rise()  # the move itself made more ready (HOST room changed hands)
            # Asked after the move, so the fragments it reads itself (a model's floor, at load) do
            # not share the link with the prefetches of the levels above.
            self._prefetch(wanted)
            return True

    def _recommit_sharers(self) -> None:
        """Charges of shared fragments may have moved to other models: tell the arbiter what they
        hold now (the bytes in memory did not change, only who pays for them)."""
        if self.cache is None or self.arbiter is None:
            return
        for other in managed_models(self.arbiter):
            if other is self or other.cache is not self.cache or other.allocation is None or other.suspended:
                continue
            self.arbiter._update_held(other.allocation, other.resident_bytes + other.allocation.activation_bytes)

    def _move(self, q: float | None) -> None:
        """Hold the levels of quality ``q`` (None: hold nothing, every tensor to host memory)."""
        if q is None:
            for layer in self._layers.values():
                layer.set_level(0)
            self._park_fixed()
            self._quality = 0.0
            return
        self._unpark_fixed()
        levels, _ = self._plan(q)
        lowering = [(n, k) for n, k in levels.items() if k < self._layers[n].level]
        raising = [(n, k) for n, k in levels.items() if k > self._layers[n].level]
        for name, level in lowering:  # free memory before taking more
            self._layers[name].set_level(level)
        self._fetch_for(raising)
        for name, level in raising:
            self._layers[name].set_level(level)
        self._quality = max(q, self.min_quality)

    def _fetch_for(self, raising: list[tuple[str, int]]) -> None:
        """Bring the fragments of a raise in, in parallel: one round trip per fragment over HTTP,
        or one file read and page-faulting of fresh memory per fragment from DISK, would
        otherwise be paid one layer after another. Into HOST when it has room for them all,
        else, on a CPU device, straight to DEVICE, where the layers then take them (a bounded
        HOST is not flushed for a raise that would pass through it). On CUDA the layers read
        them in this thread: the allocator charges a CUDA allocation to the workload of the
        thread that makes it, and the cache's reader threads have none."""
        if self.cache is None:
            return
        self._read_ahead([key for name, level in raising for key in self._content_keys(name, level)], else_disk=False)

    def _fetch_floor(self) -> None:
        """Read the floor's fragments now, in the caller's thread, into HOST (or, without room
        there, onto DISK: a URL's are staged, a local checkpoint's are read and checked).

        Why here: the grant is applied by the arbiter's applier thread, which can only log a
        failure; a checkpoint or URL that cannot serve the floor must fail ``patch()`` with its
        error (naming the URL) instead of leaving it waiting for a level that never comes.
        """
        self._read_ahead([key for name in self._holos for key in self._content_keys(name, 1)], else_disk=True)

    def _read_ahead(self, keys: list[str], *, else_disk: bool) -> None:
        """Read those of ``keys`` not in DEVICE or HOST, in parallel: into HOST when it has room
        for all of them; else onto DISK (``else_disk``: a URL's are staged, a local checkpoint's
        are read and checked), or to DEVICE when it is the CPU (see :meth:`_fetch_for`)."""
        in_memory = {CacheTier.DEVICE, CacheTier.HOST}
        keys = [key for key in keys if not in_memory & set(self.cache.tiers_of(key))]
        if not keys:
            return
        room = self.cache.host_room()
        if room is None or room >= sum(self.cache.fragment_nbytes(key) for key in keys):
            self.cache.get_many(keys, CacheTier.HOST)
        elif else_disk:
            self.cache.get_many(keys, CacheTier.DISK)
        elif torch.device(self.cache.config.device).type == "cpu":
            self.cache.get_many(keys, CacheTier.DEVICE)

    def _fixed_tensors(self) -> list[torch.Tensor]:
        tensors: dict[int, torch.Tensor] = {}
        for module in self._components.values():
            for tensor in [*module.parameters(), *module.buffers()]:
                tensors.setdefault(id(tensor), tensor)
        return list(tensors.values())

    def _park_fixed(self) -> None:
        """Move every parameter and buffer outside the Holo fragments to host memory.

        On the CPU the host copy is the tensor's own data (nothing is copied); views of one
        storage are parked once and come back sharing it.
        """
        if self._parked is not None:
            return
        parked: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        hosts: dict[tuple, torch.Tensor] = {}
        for tensor in self._fixed_tensors():
            data = tensor.data
            if data.numel() == 0:
                continue
            key = (data.untyped_storage().data_ptr(), data.storage_offset(), tuple(data.shape), tuple(data.stride()))
            host = hosts.get(key)
            if host is None:
                host = hosts[key] = data if data.device.type == "cpu" else data.to("cpu")
            parked[id(tensor)] = (tensor, host)
            tensor.data = torch.empty(0, dtype=data.dtype, device=data.device)
        self._parked = parked

    def _unpark_fixed(self) -> None:
        if self._parked is None:
            return
        restored: dict[int, torch.Tensor] = {}
        for tensor, host in self._parked.values():
            device = tensor.device
            data = restored.get(id(host))
            if data is None:
                data = restored[id(host)] = host if host.device == device else host.to(device)
            tensor.data = data
        self._parked = None

    def _scope(self):
        """The allocation's workload scope when enforcing (a no-op context otherwise)."""
        allocation = self.allocation
        if not self.enforce or self.arbiter is None or allocation is None or allocation.released:
            return contextlib.nullcontext()
        return self.arbiter.workload(allocation)

    def _run_forward(self, forward, *args, **kwargs):
        """Run one top-module forward inside the allocation's workload scope, recovering from an
        out-of-memory error there (reclaim from lower priorities, empty the pool caches, retry, at
        most :data:`_OOM_RETRIES` times), then :class:`~torch_arbiter.errors.WorkloadOutOfMemoryError`."""
        allocation, arbiter = self.allocation, self.arbiter
        if not self.enforce or arbiter is None or allocation is None or allocation.released:
            return forward(*args, **kwargs)
        from ..allocator import run_with_recovery

        attempts = 0

        def attempt(*a, **k):
            nonlocal attempts
            attempts += 1
            return forward(*a, **k)

        result = run_with_recovery(arbiter, allocation, attempt, *args, retries=_OOM_RETRIES, **kwargs)
        if attempts > 1:
            arbiter._count_oom_recovery()
        return result

    def _runnable(self) -> bool:
        return not self._patched or self._parked is None

    def _stale(self) -> bool:
        allocation, arbiter = self.allocation, self.arbiter
        if not self._patched:
            return False
        if self._frontier_moved:
            return True
        if allocation is None or arbiter is None:
            return False
        return arbiter._stale(allocation) or (allocation.released and self._parked is None)

    def _preempted_error(self, waited: float) -> PreemptedError:
        name = self.allocation.name if self.allocation is not None else type(self.model).__name__
        return PreemptedError(
            f"{name}: suspended by the arbiter (a higher-priority workload needs its memory) and not "
            f"re-admitted within its timeout ({self.timeout} s, waited {waited:.2f} s): pass a larger "
            "patch(timeout=...) or None to wait, give it a higher priority, or release other workloads")

    # -- arbiter -------------------------------------------------------------------------------------

    def _attach(self, arbiter, allocation) -> None:
        self.arbiter, self.allocation = arbiter, allocation
        own = weakref.ref(self)  # the arbiter must not keep a dropped model alive

        def settle() -> bool:
            managed = own()
            return True if managed is None or not managed.patched else managed._switch.apply_if_idle()

        def prefetch_on_change(changes) -> None:  # prefetch as soon as the target moves, not at the switch
            managed = own()
            if managed is not None and managed.patched:
                for change in changes:
                    if change.allocation is managed.allocation:
                        managed._prefetch(change.new_quality)

        self._listener = prefetch_on_change
        arbiter.add_listener(prefetch_on_change)
        arbiter._bind(allocation, settle)
        _REGISTERED.add(self)

    # -- undo ------------------------------------------------------------------------------------------

    @property
    def patched(self) -> bool:
        """False once :meth:`unpatch` ran."""
        return self._patched

    def unpatch(self) -> None:
        """Restore the original layers bit for bit, remove the hooks, release the allocation.

        Waits for a running forward to end first. Calling it again does nothing. Works after
        the arbiter was closed or the allocation released elsewhere (then there is nothing to
        release).
        """
        with self._switch.idle():  # no forward runs while the layers are put back
            with self._lock:
                if not self._patched:
                    return
                self._patched = False
                self._switch.close()
                self._unpark_fixed()
                for handle in self._switch_hooks:
                    handle.remove()
                if self._prefetcher is not None:
                    self._prefetcher.forget(self.holder)
                try:  # a layer whose exact weight cannot be read back fails this, but lets go of the rest
                    remove_holo_swap(self._swapped)
                finally:
                    if self.cache is not None:
                        self.cache.disown(self.holder)
                    for module in self._components.values():
                        module.__dict__.pop(_MARKER, None)
        if self.arbiter is not None:
            self._recommit_sharers()  # fragments this model was charged for now cost their other holders
            if self._listener is not None:
                self.arbiter.remove_listener(self._listener)
            if self.allocation is not None and not self.allocation.released:
                try:
                    self.allocation.release()
                except Exception as exc:  # the arbiter already forgot it: nothing left to give back
                    _log.debug("allocation release after unpatch skipped: %s", exc)

    def _repr_html_(self) -> str:
        """Jupyter's view: quality, bytes, and how many layers hold each kind of level."""
        from .._display import managed_view

        return managed_view(self).html()

    def __rich__(self):
        """rich's view: the same table as :meth:`_repr_html_`."""
        from .._display import managed_view

        return managed_view(self).rich()

    def __repr__(self) -> str:
        state = f"quality={self.quality:.3f}" if self._patched else "unpatched"
        return (f"ManagedModel({type(self.model).__name__}, {len(self._layers)} holo layers, {state}, "
                f"{self.resident_bytes}/{self.full_bytes} bytes)")


def _measure_sensitivity(swapped: list[SwappedLayer], recorded: RecordedCalls, progress: bool) -> None:
    """Each encoded weight's model error at its lowest level, on the calibration run's own calls.

    Only for a transformers model, whose recorded calls give the model's output. A pipeline's
    output is the end of a whole denoising trajectory, which one UNet call does not show: on the
    digits DDPM the per-call errors kept a mid-block conv (the smallest) at its lowest level at
    quality 0.5, and the images measured 53.2 dB against 61.6 dB with every weight at level 2.
    """
    from tqdm.auto import tqdm

    layers = {layer.holo.holo: layer.holo.set_level for layer in swapped
              if not layer.tied and layer.holo.num_levels > 1}
    with tqdm(total=len(layers), desc="measuring sensitivity", unit="layer",
              disable=not progress or not layers or not recorded.calls) as bar:
        record_model_errors(recorded, layers, lambda: bar.update(1))


def patch(obj: Any, arbiter=None, *, workload: WorkloadType | WorkloadKind | None = None,
          priority: Priority | int | str = Priority.NORMAL, name: str | None = None,
          holo_dir: str | Path | None = None, encode_options: Mapping[str, Any] | None = None,
          min_quality: float | None = None, activation_bytes: int | None = None,
          timeout: float | None = None, register: bool = True, progress: bool = True,
          calibration: Any = "auto", enforce: bool = True) -> ManagedModel:
    """Make a loaded model's quality live and hand it to the arbiter. One line of user code.

    Args:
        obj: a transformers ``PreTrainedModel``, a diffusers ``DiffusionPipeline`` (every
            ``nn.Module`` component is patched) or any ``nn.Module``.
        arbiter: the :class:`~torch_arbiter.arbiter.Arbiter` to register with; None takes
            :func:`~torch_arbiter.arbiter.get_default_arbiter`.
        workload: the workload kind; default ``LLM_INFERENCE`` (``IMAGE_GENERATION`` for a pipeline).
        priority: the workload's priority.
        name: shown in the arbiter's state; default the model's class name.
        holo_dir: a holo checkpoint made by ``torch-arbiter convert`` from this model's weights:
            its fragments are used instead of encoding (each is checked against the weight).
        encode_options: passed to :meth:`HoloTensor.encode` when encoding (``group_size``, ``rank``).
        min_quality: the floor asked of the arbiter (raised to :attr:`ManagedModel.min_quality`).
        activation_bytes: bytes the workload needs at any quality (default: the kind's).
        timeout: seconds to wait for the arbiter's grant, and for re-admission when a forward
            starts while the model is suspended (preempted): past it the forward raises
            :class:`~torch_arbiter.errors.PreemptedError`. None waits for ever.
        register: False patches without registering (quality moves only by ``set_quality``).
        progress: show a tqdm bar while encoding.
        calibration: representative inputs, so that every ``nn.Linear`` and ``nn.Conv2d`` is encoded with GPTQ
            error feedback on its own inputs where that measures better on held-out rows (lower
            output error at the same bytes; encoding takes longer): a callable run once on ``obj``
            before any layer is swapped (``lambda m: m(input_ids)``), or a tensor / dict of inputs
            passed to the model. Not evaluation data. ``"auto"`` (default): the model calibrates
            on inputs it makes itself (:mod:`.self_calibration`: a causal LM samples 1024 tokens
            from BOS, another transformers model reads random token ids, a pipeline runs 8
            denoising steps; a plain ``nn.Module`` is not calibrated). For a transformers model
            the run's calls are then replayed once per encoded weight, that weight alone at its
            lowest level, so that the planner knows how much each weight moves the model's output
            (:mod:`torch_arbiter.holo.sensitivity`). ``False`` or None: no calibration
            (round-to-nearest on a refitted grid). Ignored with ``holo_dir``.
        enforce: run every top-module forward (and every level switch) inside the allocation's
            workload scope (``arbiter.workload(allocation)``: on CUDA its own memory pool and
            budget), and recover an out-of-memory error there: reclaim from lower priorities,
            empty the pool caches, retry (up to 3 times, while the arbiter can reclaim); then
            :class:`~torch_arbiter.errors.WorkloadOutOfMemoryError` naming who holds what.
            False runs forwards outside any scope (no budget is enforced per allocation). On
            the CPU the scope only selects the workload for the allocator's host backend.

    Returns:
        The :class:`ManagedModel`, already at the quality the arbiter granted (it holds nothing
        while asking, so the bytes others free for it are counted once); with ``holo_dir`` whose
        fragments are not in memory yet, at the level the fragments already read allow (at least
        its floor), rising in the background as the rest lands.

    Raises:
        PatchError: ``obj`` is already patched, is not a model or pipeline, has no layer to swap,
            or ``holo_dir`` does not match it. ``obj`` is left exactly as it was.
        ArbiterError: the arbiter refused the request (``obj`` is unpatched again).

    Limits: inference only (Holo layers carry no gradients); ``nn.Linear``, ``nn.Conv2d`` and
    ``nn.Embedding`` are swapped (a head tied to its embedding once, as one weight); other layers
    (norms, biases, odd convs) stay exact and count as fixed bytes. ``state_dict()`` /
    ``save_pretrained()`` save the original weights (bit for bit, at any quality);
    ``load_state_dict`` accepts only those same weights and ``.to(dtype)`` is refused (unpatch,
    change, patch again); resizing embeddings is not supported.
    """
    _check_arbiter(arbiter)
    components, kind = _components(obj)
    if managed_model_of(obj) is not None or any(
            isinstance(sub, (HoloLinear, HoloConv2d, HoloEmbedding)) for m in components.values() for sub in m.modules()):
        raise PatchError(f"this {type(obj).__name__} is already patched: use the ManagedModel "
                         "patch() returned, or unpatch() it first")
    arbiter_for_cache = arbiter if arbiter is not None or not register else _default_arbiter()
    cache = arbiter_for_cache.cache if arbiter_for_cache is not None else FragmentCache(CacheConfig(
        device=_model_device(components)))
    prefetcher = arbiter_for_cache.prefetcher if arbiter_for_cache is not None else None
    cache_holder = new_holder(name or type(obj).__name__)
    checkpoint = cache.attach(holo_dir) if holo_dir is not None else None
    inputs = None
    if checkpoint is not None or calibration is None or calibration is False:
        run = None
    elif isinstance(calibration, str) and calibration == "auto":
        run = self_calibration_run(obj, kind, progress)
    else:
        run = _calibration_run(obj, calibration)
    recorded = None
    if run is not None:
        # Only a transformers model's own calls show its output (see _measure_sensitivity).
        with record_calls(components.values() if kind == "transformers" else ()) as recorded:
            inputs = collect_layer_inputs(components.values(), run)
    swapped: list[SwappedLayer] = []
    hooks: list[SafePointHandle] = []
    managed: ManagedModel | None = None
    try:
        for component, module in components.items():
            prefix = f"{component}/" if kind == "diffusers" else ""  # the names `convert` gives
            swapped.extend(apply_holo_swap(
                module, prefix=prefix, checkpoint=checkpoint, cache=cache, holder=cache_holder,
                encode_options=encode_options, progress=progress,
                description=f"encoding {component or type(obj).__name__}", calibration=inputs))
        if not swapped:
            raise PatchError(f"this {type(obj).__name__} has no nn.Linear, nn.Conv2d or nn.Embedding layer "
                             "to make live; patch() has nothing to do for it")
        if checkpoint is None:
            if recorded is not None:
                _measure_sensitivity(swapped, recorded, progress)
            apply_fragment_cache(swapped, cache, cache_holder)
        holder: list[ManagedModel] = []
        switch: SafePointSwitch[float] = SafePointSwitch(
            lambda q: holder[0]._apply(q), refresh=lambda: holder[0]._stale(), ready=lambda: holder[0]._runnable(),
            timeout=timeout, timeout_error=lambda waited: holder[0]._preempted_error(waited))
        for module in components.values():
            hooks.append(apply_safe_point_hook(module, switch, run=lambda fn, *a, **k: holder[0]._run_forward(fn, *a, **k)))
            guard_dtype_changes(module)
        managed = ManagedModel(obj, components, swapped, hooks, switch, enforce=enforce, timeout=timeout,
                               cache=cache, holder=cache_holder, prefetcher=prefetcher)
        holder.append(managed)
        for module in components.values():
            object.__setattr__(module, _MARKER, weakref.ref(managed))
        if checkpoint is not None:
            managed._fetch_floor()
        if register:
            _register(managed, arbiter, workload or _default_workload(kind), priority,
                      name or type(obj).__name__, min_quality, activation_bytes, timeout)
    except BaseException:
        try:
            if managed is not None:
                managed.unpatch()
            else:
                for handle in hooks:
                    handle.remove()
                remove_holo_swap(swapped)
        except Exception as undo_failure:  # the error to report is the one that stopped patch()
            _log.warning("undoing the failed patch() failed too: %s", undo_failure)
        finally:
            cache.disown(cache_holder)
        raise
    if torch.device(cache.config.device).type == "cpu":
        trim_host_heap()  # encoding's transient buffers and the let-go dense weights
    return managed


def _default_arbiter():
    from ..arbiter import get_default_arbiter

    return get_default_arbiter()


def _model_device(components: Mapping[str, nn.Module]) -> torch.device:
    """The device of the first real parameter (the CPU when there is none)."""
    for module in components.values():
        for param in module.parameters():
            if param.device.type != "meta":
                return param.device
    return torch.device("cpu")


def _check_arbiter(arbiter: Any) -> None:
    from ..arbiter import Arbiter

    if arbiter is not None and not isinstance(arbiter, Arbiter):
        raise PatchError(f"arbiter must be a torch_arbiter.Arbiter or None (the default arbiter), got "
                         f"{type(arbiter).__name__}; pass it as patch(model, arbiter) or arbiter=...")


def _calibration_run(obj: Any, calibration: Any):
    """The no-argument callable that drives ``obj`` with the user's calibration inputs."""
    if callable(calibration) and not isinstance(calibration, (torch.Tensor, nn.Module)):
        return lambda: calibration(obj)
    if not isinstance(obj, nn.Module):
        raise PatchError(f"calibration for a {type(obj).__name__} must be a callable that runs it "
                         "(e.g. lambda pipe: pipe(num_inference_steps=10))")
    if isinstance(calibration, torch.Tensor):
        return lambda: obj(calibration)
    if isinstance(calibration, Mapping):
        return lambda: obj(**calibration)
    raise PatchError(f"calibration must be a callable, a tensor or a dict of model inputs, got "
                     f"{type(calibration).__name__}")


def _register(managed: ManagedModel, arbiter, workload, priority, name, min_quality, activation_bytes,
              timeout) -> None:
    from ..arbiter import get_default_arbiter

    arbiter = arbiter if arbiter is not None else get_default_arbiter()
    floor = managed.min_quality if min_quality is None else max(min_quality, managed.min_quality)
    options: dict[str, Any] = {"bytes": managed.full_bytes, "curve": managed.curve, "name": name,
                               "min_quality": floor, "timeout": timeout}
    if activation_bytes is not None:
        options["activation_bytes"] = activation_bytes
    started = time.monotonic()
    managed._move(None)  # hold nothing while asking: the grant is then taken like any raise
    allocation = arbiter._request_bound_blocking(workload, priority, **options)
    managed._attach(arbiter, allocation)
    remaining = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
    # A model whose fragments are still streaming in (a checkpoint or URL) commits its first move
    # at the level its ready fragments allow and rises as the rest lands: it is usable from then on.
    if not arbiter._wait_applied(allocation, remaining, enough=lambda: not managed.suspended):
        raise AllocationTimeoutError(
            f"{name}: granted, but the memory was not freed by the other models within {timeout} s "
            "(a forward that never reaches a safe point?): raise the timeout or stop the other models")
