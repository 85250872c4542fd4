"""A HoloTensor's fragments held in the arbiter's ``FragmentCache`` instead of a private dict.

``HoloTensor(meta, CachedFragments(cache, keys, holder))`` reads like any HoloTensor (``fragment``,
``decode``, ``"exact" in holo.fragments``) but keeps nothing itself: each read goes to the
cache, and the Holo module that owns it holds the fragments of its current level through
:meth:`CachedFragments.acquire` / :meth:`CachedFragments.release`, so what is resident follows the
level and the rest lives in HOST, DISK or REMOTE as the cache's budgets say.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import torch

from .fragment_cache import FragmentCache

__all__ = ["CachedFragments"]


class CachedFragments(Mapping[str, torch.Tensor]):
    """Fragment name -> tensor, read through a :class:`FragmentCache` by content key.

    Args:
        cache: the cache (an arbiter's ``arbiter.cache``).
        keys: fragment name -> content key in ``cache`` (kept as ``content_keys``).
        holder: who holds the acquired fragments (a model's token: the cache charges shared
            fragments to their first holder).

    Limits: ``cached[name]`` returns the fastest copy without promoting it (a DISK or REMOTE read
    each time when nothing above holds it): for residency use :meth:`acquire`.
    """

    def __init__(self, cache: FragmentCache, keys: Mapping[str, str], holder: str) -> None:
        self.cache = cache
        self.content_keys = dict(keys)
        self.holder = holder

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.cache.read(self.content_keys[name])

    def __contains__(self, name: object) -> bool:
        return name in self.content_keys

    def __iter__(self) -> Iterator[str]:
        return iter(self.content_keys)

    def __len__(self) -> int:
        return len(self.content_keys)

    def serves(self, device: torch.device) -> bool:
        """True when the cache's DEVICE tier is ``device`` (else the module copies from HOST)."""
        own = self.cache.config.device
        return own.type == device.type and (own.index or 0) == (device.index or 0)

    def acquire(self, name: str) -> torch.Tensor:
        """Fragment ``name`` at the cache's DEVICE tier, held until :meth:`release`."""
        return self.cache.acquire(self.content_keys[name], self.holder)

    def release(self, name: str) -> None:
        """Stop holding fragment ``name`` at DEVICE."""
        self.cache.release(self.content_keys[name], self.holder)
