"""Load a converted model or pipeline from a holo checkpoint, progressively, through the cache.

:func:`load_from_holo` builds the model (transformers) or every model component of a pipeline
(diffusers) on the ``meta`` device from the configs beside the checkpoint, reads only the tensors
that stay exact (norms, biases, buffers), and patches it with its Holo layers at level 0: no
dense copy of a weight ever exists. The arbiter's grant then holds the floor at once (the call
returns when the floor fragments are in) and the rest arrives in the background, in the planner's
order, through the arbiter's prefetcher; the model's quality rises as it lands. The checkpoint
may be a directory (read by byte range) or a URL (one Range request per fragment).

Why ``accelerate.init_empty_weights``: it puts parameters on ``meta`` while buffers computed at
construction (rotary frequencies) stay real; a plain ``torch.device("meta")`` context would make
those meta too, and they are not in any checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..cache import FragmentCache
from ..cache.sources import SIDE_FILES_NAME, CheckpointSource
from ..errors import PatchError
from ..holo.format import fragment_id
from .holo_swap import find_swappable

__all__ = ["load_from_holo", "fetch_side_files"]


def fetch_side_files(source: CheckpointSource, dest: Path) -> Path:
    """The directory holding the checkpoint's side files: the checkpoint itself when local, else
    ``dest`` with each listed file fetched there (and checked against the listed sha256).

    Raises:
        CorruptFragmentError: a listed file fails its checksum or cannot be fetched.
    """
    from ..cache.config import CacheTier
    from ..errors import CorruptFragmentError

    if source.tier is CacheTier.DISK:
        return Path(source.location)
    listed = source.read_side_file(SIDE_FILES_NAME)
    checksums = json.loads(listed) if listed is not None else {}
    for name in source.side_files():
        raw = source.read_side_file(name)
        if raw is None:
            continue
        expected = checksums.get(name)
        if expected is not None and hashlib.sha256(raw).hexdigest() != expected:
            raise CorruptFragmentError(f"side file {name} from {source.location} fails its sha256 check; "
                                       "the server holds another checkpoint's file")
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(raw)
    return dest


def load_from_holo(location: Any, cache: FragmentCache, *, model_class: Any = None,
                   dtype: torch.dtype | None = None) -> tuple[Any, CheckpointSource]:
    """Build the model or pipeline a holo checkpoint was converted from, without its Holo weights.

    Args:
        location: the checkpoint directory or URL.
        cache: the cache to attach it to (the arbiter's).
        model_class: for a transformers checkpoint, the class or auto class to build (default
            ``AutoModelForCausalLM``).
        dtype: the dtype to build in (default: the checkpoint's).

    Returns:
        ``(model or pipeline, source)``: every tensor that stays exact is loaded, the weights of
        the layers ``patch()`` swaps are still on ``meta``; pass the result to
        ``patch(obj, holo_dir=location)``.

    Raises:
        PatchError: the checkpoint has no config (it was not converted from a transformers model
            or diffusers pipeline), or lacks a tensor the model needs.
    """
    source = cache.attach(location)
    with tempfile.TemporaryDirectory(prefix="torch-arbiter-side-") as scratch:
        side = fetch_side_files(source, Path(scratch))
        if (side / "model_index.json").is_file():
            return _load_pipeline(side, source, cache, dtype), source
        if not (side / "config.json").is_file():
            raise PatchError(f"{source.location} has no config.json: convert a transformers model directory to "
                             "load it with from_holo_pretrained")
        return _load_transformers(side, source, cache, model_class, dtype), source


def _checkpoint_dtype(source: CheckpointSource, prefix: str = "") -> torch.dtype:
    from ..holo.codec import _dtype_from_name

    for name, meta in source.index["tensors"].items():
        if name.startswith(prefix) and meta.get("dtype", "").startswith(("float", "bfloat")):
            return _dtype_from_name(meta["dtype"])
    return torch.float32


def _load_transformers(side: Path, source: CheckpointSource, cache: FragmentCache, model_class: Any,
                       dtype: torch.dtype | None) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, GenerationConfig

    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    config = AutoConfig.from_pretrained(side, local_files_only=True)
    if hasattr(model_class, "_model_mapping"):  # an Auto class: pick the concrete class from the config
        try:
            model_class = model_class._model_mapping[type(config)]
        except KeyError:
            raise PatchError(f"{model_class.__name__} cannot build a {type(config).__name__} "
                             f"({source.location}); pass the right model_class") from None
    with init_empty_weights():
        model = model_class._from_config(config, dtype=dtype or _checkpoint_dtype(source))
    model.tie_weights()
    _load_exact_tensors(model, source, cache, prefix="")
    if (side / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(side, local_files_only=True)
    return model.eval()


def _load_pipeline(side: Path, source: CheckpointSource, cache: FragmentCache, dtype: torch.dtype | None):
    from accelerate import init_empty_weights

    index = json.loads((side / "model_index.json").read_text())
    library = importlib.import_module("diffusers")
    pipeline_class = getattr(library, index["_class_name"])
    weighted = set(source.metadata.get("components", []))
    components = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        component_class = getattr(importlib.import_module(spec[0]), spec[1])
        if name in weighted:
            with init_empty_weights():
                component = component_class.from_config(component_class.load_config(side / name))
            wanted = dtype or _checkpoint_dtype(source, f"{name}/")
            if next(component.parameters()).dtype != wanted:
                component = component.to(wanted)
            _load_exact_tensors(component, source, cache, prefix=f"{name}/")
            components[name] = component.eval()
        else:
            components[name] = component_class.from_pretrained(side / name)
    return pipeline_class(**components)


def _load_exact_tensors(root: nn.Module, source: CheckpointSource, cache: FragmentCache, *, prefix: str) -> None:
    """Fill every parameter and persistent buffer of ``root`` that ``patch()`` will not swap."""
    swapped = {f"{name}.weight" for name, _ in find_swappable(root, allow_meta=True)}
    aliases = source.metadata.get("tied", {})
    wanted = []
    for name, tensor in list(root.state_dict(keep_vars=True).items()):
        if name in swapped:
            continue
        stored = f"{prefix}{name}"
        stored = aliases.get(stored, stored)
        meta = source.index["tensors"].get(stored)
        if meta is None:
            if tensor.device.type == "meta":
                raise PatchError(f"{source.location} holds no tensor {stored!r} that the model needs; "
                                 "convert this model again")
            continue
        fid = fragment_id(stored, "exact" if meta.get("holo", False) else "plain")
        wanted.append((name, tensor, stored, source.keys[fid]))
    # Many small tensors (norms, biases): over HTTP each is a round trip, so they are read in parallel.
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="torch_arbiter-load") as pool:
        values = list(pool.map(cache.read, [key for *_, key in wanted]))
    for (name, tensor, stored, _), value in zip(wanted, values):
        if list(value.shape) != list(tensor.shape):
            raise PatchError(f"{source.location}: tensor {stored!r} is {list(value.shape)}, the model expects "
                             f"{list(tensor.shape)}; convert this model again")
        _assign(root, name, value.to(tensor.dtype))


def _assign(root: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attribute = name.rpartition(".")
    module = root.get_submodule(module_name) if module_name else root
    if attribute in module._parameters:
        old = module._parameters[attribute]
        module._parameters[attribute] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[attribute] = value
