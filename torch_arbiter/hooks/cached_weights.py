"""Put a patched model's fragments in the arbiter's ``FragmentCache``: the live path's one store.

:func:`apply_fragment_cache` moves the HoloTensors that :func:`~.holo_swap.apply_holo_swap` just
encoded in memory into ``cache`` under content keys (sha256, dtype, shape), so a Holo layer keeps
only its current level resident and the rest lives in HOST (spilled to DISK past the HOST
budget). :func:`holo_from_source` builds a layer's HoloTensor straight from an attached holo
checkpoint (directory or URL): nothing is read until a level is held. Identical fragments (the
same tensor in two models, or a checkpoint loaded twice) are one key: held once per tier.

Who is charged for a shared fragment: the cache's first (oldest) holder of its DEVICE copy; when
that holder lets it go while another still holds it, the charge moves to the next holder (see
``ManagedModel.resident_bytes``). A model's own copies (fragments put from memory) leave the cache
when the last model using them is unpatched; checkpoint and URL sources are never touched.
"""

from __future__ import annotations

import itertools
from typing import Iterable

import torch
from torch import nn

from ..cache import CacheTier, FragmentCache
from ..cache.base import tensor_nbytes
from ..cache.cached_fragments import CachedFragments
from ..cache.disk import tensor_sha256
from ..cache.sources import CheckpointSource, content_key
from ..errors import PatchError
from ..holo import HoloTensor
from ..holo.codec import _dtype_name
from .holo_swap import SwappedLayer

__all__ = ["FRAGMENT_CACHE_HOOK", "apply_fragment_cache", "holo_from_source", "new_holder", "tensor_key"]

FRAGMENT_CACHE_HOOK = "torch_arbiter_fragment_cache"
"""Tag of the technique (names the holders it creates)."""

_holder_ids = itertools.count(1)


def new_holder(name: str) -> str:
    """A fresh holder token for one patched model (``"<name>#<n>"``)."""
    return f"{name}#{next(_holder_ids)}"


def tensor_key(tensor: torch.Tensor) -> str:
    """The content key of an in-memory fragment (the same key its checkpoint entry would have)."""
    return content_key({"sha256": tensor_sha256(tensor), "dtype": _dtype_name(tensor.dtype),
                        "shape": list(tensor.shape)})


def apply_fragment_cache(layers: Iterable[SwappedLayer], cache: FragmentCache, holder: str) -> None:
    """Move the in-memory fragments of ``layers`` into ``cache`` (HOST tier) and read them back
    through it; each layer keeps its current level, now held at the cache's DEVICE tier.

    Args:
        layers: what ``apply_holo_swap`` returned (tied embeddings and layers already backed by
            a cache are skipped).
        cache: the arbiter's cache.
        holder: the model's holder token (:func:`new_holder`).

    Raises:
        InsufficientMemoryError: HOST and the spill directory are both full.
    """
    for layer in layers:
        holo = layer.holo.holo
        if layer.tied or hasattr(holo.fragments, "acquire"):
            continue
        keys = {}
        for name, tensor in holo.fragments.items():
            key = tensor_key(tensor)
            if key not in cache:
                room = cache.host_room()
                # Past the HOST budget a fragment goes straight to the spill directory.
                cache.put(key, tensor, CacheTier.HOST if room is None or room >= tensor_nbytes(tensor) else CacheTier.DISK)
            cache.own(key, holder)
            keys[name] = key
        holo.fragments = CachedFragments(cache, keys, holder)
        layer.holo.set_level(layer.holo.level)  # hold the current level through the cache


def holo_from_source(source: CheckpointSource, stored: str, module: nn.Module, cache: FragmentCache,
                     holder: str) -> HoloTensor:
    """The HoloTensor of checkpoint tensor ``stored``, read lazily through ``cache``.

    Args:
        source: the attached checkpoint (``cache.attach(location)``).
        stored: the tensor's name in it.
        module: the layer it replaces; a real weight must be the checkpoint's exact level
            (compared by sha256, nothing is read), a weight on the ``meta`` device is taken as is.
        cache: the cache ``source`` is attached to.
        holder: the model's holder token.

    Raises:
        PatchError: the tensor is not holo-encoded, or does not match the layer's weight.
    """
    meta = source.index["tensors"].get(stored)
    weight = module.weight
    if meta is None or not meta.get("holo", False):
        raise PatchError(f"tensor {stored!r} in {source.location} is not holo-encoded; convert this model again")
    if list(meta["shape"]) != list(weight.shape) or meta["dtype"] != _dtype_name(weight.dtype):
        raise PatchError(
            f"tensor {stored!r} in {source.location} is {meta['shape']} {meta['dtype']}, the model's weight is "
            f"{list(weight.shape)} {_dtype_name(weight.dtype)}; convert this model again")
    keys = {source.index["fragments"][fid]["name"]: source.keys[fid]
            for fid, entry in source.index["fragments"].items() if entry["tensor"] == stored}
    if weight.device.type != "meta" and tensor_key(weight.detach()) != keys.get("exact"):
        raise PatchError(
            f"tensor {stored!r} in {source.location} differs from the model's weight: the checkpoint "
            "was made from other weights; convert this model again")
    return HoloTensor({k: v for k, v in meta.items() if k != "holo"}, CachedFragments(cache, keys, holder))
