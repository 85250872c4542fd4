"""Swap a model's ``nn.Linear`` / ``nn.Conv2d`` / ``nn.Embedding`` layers for Holo modules, and back.

:func:`apply_holo_swap` replaces every supported layer of a module tree with a
:class:`~torch_arbiter.nn.HoloLinear` / :class:`~torch_arbiter.nn.HoloConv2d` /
:class:`~torch_arbiter.nn.HoloEmbedding` whose weight is a :class:`~torch_arbiter.holo.HoloTensor`,
either encoded now or read from a converted holo checkpoint. A head tied to its embedding (one
``nn.Linear`` and one ``nn.Embedding`` sharing a weight, as in SmolLM2) becomes one HoloLinear and a
HoloEmbedding that reads the head's codes: the shared weight is encoded, planned and held once,
under the embedding's state-dict name (the one a saved checkpoint keeps).
:func:`remove_holo_swap` puts the original module objects back.

Memory: no second copy of a full weight is kept. The original layer object is kept (so its
identity, attributes and any hooks on it survive), but its weight and bias Parameters are
emptied; on removal they are refilled from the HoloTensor's exact top level, which is the
original tensor bit for bit. Parameter objects keep their identity too.

Skipped (kept as they are, counted as fixed bytes by the caller):

- layers whose weight is shared in any other way (with a module that is not swapped, or by more
  than two layers): swapping one side would keep the full weight resident and add codes on top;
- ``nn.Conv2d`` with a ``padding_mode`` other than ``"zeros"``, ``nn.Embedding`` with
  ``max_norm`` (it rewrites its table), and layers on the ``meta`` device (nothing to encode).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

import torch
from torch import nn

from ..errors import PatchError
from ..holo import HoloTensor
from ..nn import HoloConv2d, HoloEmbedding, HoloLinear

if TYPE_CHECKING:
    from ..cache import FragmentCache
    from ..cache.sources import CheckpointSource

__all__ = ["HOLO_SWAP_HOOK", "SwappedLayer", "find_swappable", "apply_holo_swap", "remove_holo_swap"]

HOLO_SWAP_HOOK = "torch_arbiter_holo_swap"
"""Tag of the swap technique (the name shown in progress bars and errors)."""

_HOLO_OF = {nn.Linear: HoloLinear, nn.Conv2d: HoloConv2d, nn.Embedding: HoloEmbedding}
_HOLO_TYPES = tuple(_HOLO_OF.values())


@dataclass
class SwappedLayer:
    """One swapped layer: where it sits, the emptied original and its Holo replacement.

    Attributes:
        tensor_name: the weight's name in the model's state dict, with the component prefix
            (``"model.layers.0.mlp.up_proj.weight"``, ``"unet/conv_in.weight"``); a tied head
            and its embedding both carry the embedding's name.
        parent: the module that holds the layer as attribute ``attribute``.
        attribute: the attribute name in ``parent``.
        original: the original layer object (its weight/bias emptied while swapped).
        holo: the Holo module in its place.
        tied: True for an embedding that reads a tied head's codes (it holds nothing itself:
            plan and count the weight through the head).
    """

    tensor_name: str
    parent: nn.Module
    attribute: str
    original: nn.Module
    holo: HoloLinear | HoloConv2d | HoloEmbedding
    tied: bool = False


def _is_supported(module: nn.Module, allow_meta: bool = False) -> bool:
    if isinstance(module, _HOLO_TYPES) or not hasattr(module, "weight"):
        return False
    if type(module) is nn.Linear:
        pass
    elif type(module) is nn.Conv2d:
        if module.padding_mode != "zeros":
            return False
    elif type(module) is nn.Embedding:
        if module.max_norm is not None:
            return False
    else:
        return False
    return allow_meta or module.weight.device.type != "meta"


@dataclass(frozen=True)
class _Target:
    """A layer to swap; ``head`` names the tied head whose codes an embedding reads."""

    name: str
    module: nn.Module
    head: str | None = None


def _targets(root: nn.Module, allow_meta: bool = False) -> list[_Target]:
    """What to swap, heads before the embeddings tied to them (``meta`` weights too when their
    fragments come from a checkpoint)."""
    candidates = [(name, m) for name, m in root.named_modules(remove_duplicate=True) if _is_supported(m, allow_meta)]
    by_id = {id(m): name for name, m in candidates}
    owners: dict[int, list[nn.Module]] = {}
    for module in root.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module)
    plain, tied = [], []
    for name, module in candidates:
        sharing = owners.get(id(module.weight), [module])
        if len(sharing) == 1:
            plain.append(_Target(name, module))
            continue
        kinds = sorted(type(m).__name__ for m in sharing)
        if len(sharing) != 2 or kinds != ["Embedding", "Linear"] or any(id(m) not in by_id for m in sharing):
            continue  # shared some other way: keep every owner exact
        if type(module) is nn.Linear:
            plain.append(_Target(name, module))
        else:
            head = next(m for m in sharing if m is not module)
            tied.append(_Target(name, module, by_id[id(head)]))
    return plain + tied


def find_swappable(root: nn.Module, allow_meta: bool = False) -> list[tuple[str, nn.Module]]:
    """The ``(qualified name, layer)`` pairs of ``root`` that :func:`apply_holo_swap` would swap.

    Args:
        root: any module tree.
        allow_meta: include layers whose weight is on the ``meta`` device (swapped only when
            their fragments come from a checkpoint).

    Returns:
        Exact ``nn.Linear``, ``nn.Conv2d`` and ``nn.Embedding`` instances (not subclasses, whose
        forward may differ), each once, heads before the embeddings tied to them; layers whose
        weight is shared in any other way are left out.
    """
    return [(target.name, target.module) for target in _targets(root, allow_meta)]


def _parent_of(root: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    parent_name, _, attribute = qualified.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), attribute


def _checkpoint_name(checkpoint: CheckpointSource, names: list[str]) -> str:
    """The first of ``names`` the checkpoint stores (directly or as a tied alias)."""
    aliases = checkpoint.metadata.get("tied", {})
    for name in names:
        if name in checkpoint.index["tensors"]:
            return name
        if aliases.get(name) in checkpoint.index["tensors"]:
            return aliases[name]
    raise PatchError(
        f"holo checkpoint {checkpoint.location} has no tensor {names[0]!r}: it was converted from "
        "another model; convert this model with `torch-arbiter convert` or pass holo_dir=None")


def _build_holo(module: nn.Module, holo: HoloTensor | None, encode_options: dict, device: torch.device | None):
    if holo is None:
        return _HOLO_OF[type(module)].from_encoded(module, HoloTensor.encode(module.weight.detach(), **encode_options))
    # From a checkpoint: nothing is held until the arbiter grants a level (a raise reads it then).
    return _HOLO_OF[type(module)].from_encoded(module, holo, level=0, device=device)


def _layer_device(module: nn.Module, device: torch.device | None, cache: "FragmentCache | None") -> torch.device:
    """Where a Holo layer lives: its weight's device, or (a ``meta`` weight) ``device`` / the cache's."""
    if module.weight.device.type != "meta":
        return module.weight.device
    if device is not None:
        return torch.device(device)
    return torch.device(cache.config.device) if cache is not None else torch.device("cpu")


def _check_encode_options(encode_options: object) -> dict:
    """A copy of ``encode_options`` after checking its keys (values are checked by the encoder)."""
    if encode_options is None:
        return {}
    if not isinstance(encode_options, Mapping):
        raise PatchError(f"encode_options must be a dict of HoloTensor.encode options, got "
                         f"{type(encode_options).__name__}")
    allowed = [name for name, p in inspect.signature(HoloTensor.encode).parameters.items()
               if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "calibration"]
    unknown = sorted(str(key) for key in encode_options if key not in allowed)
    if unknown:
        raise PatchError(f"unknown encode_options {unknown}; the options are {allowed} "
                         "(pass calibration= to patch() itself)")
    return dict(encode_options)


def _empty_like(param: nn.Parameter) -> torch.Tensor:
    return torch.empty(0, dtype=param.dtype, device=param.device)


def apply_holo_swap(root: nn.Module, *, prefix: str = "", checkpoint: "CheckpointSource | None" = None,
                    cache: "FragmentCache | None" = None, holder: str = "", device: torch.device | None = None,
                    encode_options: dict | None = None, progress: bool = True,
                    description: str | None = None,
                    calibration: Mapping[nn.Module, torch.Tensor] | None = None) -> list[SwappedLayer]:
    """Replace every swappable layer of ``root`` by a Holo module (all or nothing).

    Args:
        root: the module tree to change in place.
        prefix: prepended to each weight's state-dict name (``"unet/"`` for a pipeline component)
            to find it in ``checkpoint`` and to name it in plans.
        checkpoint: read the encoded weights from this holo checkpoint (attached to ``cache``)
            instead of encoding; each must hold exactly the model's weight (compared by sha256),
            or the weight is on the ``meta`` device (a model built without weights). The Holo
            layers then start at level 0, holding nothing.
        cache: the cache ``checkpoint`` is attached to (required with it).
        holder: the model's holder token in ``cache``.
        device: where layers built from a ``meta`` weight live (default: the cache's device).
        encode_options: passed to :meth:`HoloTensor.encode` (``group_size``, ``rank``, ...).
        progress: show a tqdm bar.
        description: the bar's label.
        calibration: input rows per layer (from
            :func:`~torch_arbiter.holo.calibrate.collect_layer_inputs`), passed to
            :meth:`HoloTensor.encode` as ``calibration=`` for the layers it has (ignored when
            reading a checkpoint).

    Returns:
        The swapped layers in module order, embeddings tied to a head last (empty when ``root``
        has none).

    Raises:
        PatchError: a checkpoint tensor is missing or does not match; any other failure while
            encoding is re-raised after every layer already swapped has been put back.
    """
    from tqdm.auto import tqdm

    options = _check_encode_options(encode_options)
    if checkpoint is not None and cache is None:
        raise PatchError("apply_holo_swap(checkpoint=...) needs the cache the checkpoint is attached to")
    targets = _targets(root, allow_meta=checkpoint is not None)
    tied_heads = {target.head for target in targets if target.head is not None}
    embedding_of = {target.head: target.name for target in targets if target.head is not None}
    swapped: list[SwappedLayer] = []
    by_name: dict[str, SwappedLayer] = {}
    try:
        for target in tqdm(targets, desc=description or f"{HOLO_SWAP_HOOK}: encoding",
                           unit="layer", disable=not progress or not targets):
            module = target.module
            if target.head is not None:  # reads the head's codes: nothing to encode or load
                head = by_name[target.head]
                # From a checkpoint the head was matched to the shared weight already (by sha256).
                replacement = HoloEmbedding.tied_to(head.holo, module, check=checkpoint is None)
                tensor_name = head.tensor_name
            else:
                # A tied head is named after its embedding: the name a saved checkpoint keeps.
                names = [f"{prefix}{embedding_of[target.name]}.weight"] if target.name in tied_heads else []
                names.append(f"{prefix}{target.name}.weight")
                tensor_name = names[0]
                holo = None
                if checkpoint is not None:
                    from .cached_weights import holo_from_source

                    holo = holo_from_source(checkpoint, _checkpoint_name(checkpoint, names), module, cache, holder)
                inputs = (calibration or {}).get(module)
                replacement = _build_holo(module, holo, options if inputs is None else {**options, "calibration": inputs},
                                          _layer_device(module, device, cache))
            parent, attribute = _parent_of(root, target.name)
            setattr(parent, attribute, replacement)
            layer = SwappedLayer(tensor_name, parent, attribute, module, replacement, tied=target.head is not None)
            swapped.append(layer)
            by_name[target.name] = layer
    except BaseException:
        remove_holo_swap(swapped)
        raise
    # Only now: a tied embedding is checked against the head's weight while it is swapped.
    for layer in swapped:
        layer.original.weight.data = _empty_like(layer.original.weight)
        if getattr(layer.original, "bias", None) is not None:
            layer.original.bias.data = _empty_like(layer.original.bias)
    return swapped


def remove_holo_swap(layers: Iterable[SwappedLayer]) -> None:
    """Put the original layers back, their weights refilled bit for bit from the exact level.

    Args:
        layers: what :func:`apply_holo_swap` returned (in any order).
    """
    rebuilt: dict[int, nn.Parameter] = {}  # a meta weight shared by a tied pair gets one new Parameter
    for layer in layers:
        original, holo = layer.original, layer.holo
        device = holo.bias.device if holo.bias is not None else holo._device_probe.device
        exact = holo.holo.fragment("exact")
        holo.set_level(0)  # let go of what it holds in a cache (the exact copy read above stays)
        # The HoloTensor is dropped after this, so its exact fragment can become the weight again.
        exact = exact if exact.device == device else exact.to(device)
        weight = original.weight
        if weight.device.type == "meta":  # built without weights (loaded from a checkpoint)
            if id(weight) not in rebuilt:
                rebuilt[id(weight)] = nn.Parameter(exact, requires_grad=weight.requires_grad)
            original.weight = rebuilt[id(weight)]
        else:
            weight.data = exact
        if getattr(original, "bias", None) is not None:
            original.bias.data = holo.bias.detach().clone()
        setattr(layer.parent, layer.attribute, original)
