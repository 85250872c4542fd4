"""Shared checks of the fragment-cache tests: bit identity and the never-lost invariant."""

from __future__ import annotations

from typing import Iterable

import torch

from torch_arbiter.cache import CacheTier, FragmentCache
from torch_arbiter.errors import InsufficientMemoryError


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical: same dtype, shape and bytes (NaN-safe, unlike ==)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
    )


def run_and_check_never_lost(
    cache: FragmentCache,
    steps: Iterable[tuple[str, str, CacheTier, torch.Tensor | None]],
    expected: dict[str, torch.Tensor],
    capacities: dict[CacheTier, int | None],
) -> None:
    """Apply ``(operation, key, tier, tensor)`` steps; after each, nothing held is lost.

    ``operation`` is put / get / demote / evict; ``tensor`` is what a put stores (None skips the
    put). ``expected`` maps every key held to its bytes and is updated by puts. After each step,
    every expected key is on some tier with identical bytes on each tier that claims it, and no
    tier holds more than its capacity (None: unbounded). A refusal is allowed; a loss is not.
    """
    for operation, key, tier, tensor in steps:
        try:
            if operation == "put":
                if tensor is None:
                    continue
                cache.put(key, tensor, tier)
                expected[key] = tensor
            elif key not in expected:
                continue
            elif operation == "get":
                assert same_bytes(cache.get(key, tier), expected[key])
            elif operation == "demote":
                cache.demote(key, tier)
            else:
                cache.evict(key, tier)
        except InsufficientMemoryError:
            pass
        for held_key, held in expected.items():
            tiers = cache.tiers_of(held_key)
            assert tiers, f"{held_key} was lost after {operation} {key} {tier.name}"
            assert all(same_bytes(cache._stores[t].read(held_key), held) for t in tiers)
        for bounded_tier, capacity in capacities.items():
            assert capacity is None or cache.resident_bytes(bounded_tier) <= capacity
