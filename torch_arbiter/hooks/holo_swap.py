"""Swap a model's ``nn.Linear`` / ``nn.Conv2d`` layers for Holo modules, and swap them back.

:func:`apply_holo_swap` replaces every supported layer of a module tree with a
:class:`~torch_arbiter.nn.HoloLinear` / :class:`~torch_arbiter.nn.HoloConv2d` whose weight is a
:class:`~torch_arbiter.holo.HoloTensor`, either encoded now or read from a converted holo
checkpoint. :func:`remove_holo_swap` puts the original module objects back.

Memory: no second copy of a full weight is kept. The original layer object is kept (so its
identity, attributes and any hooks on it survive), but its weight and bias Parameters are
emptied; on removal they are refilled from the HoloTensor's exact top level, which is the
original tensor bit for bit. Parameter objects keep their identity too.

Skipped (kept as they are, counted as fixed bytes by the caller):

- layers whose weight is shared with a module that is not swapped (a head tied to an
  embedding): swapping one side would keep the full weight resident anyway and add codes on top;
- ``nn.Conv2d`` with a ``padding_mode`` other than ``"zeros"``, and layers already on the
  ``meta`` device (nothing to encode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from ..errors import PatchError
from ..holo import HoloCheckpoint, HoloTensor
from ..nn import HoloConv2d, HoloLinear

__all__ = ["HOLO_SWAP_HOOK", "SwappedLayer", "find_swappable", "apply_holo_swap", "remove_holo_swap"]

HOLO_SWAP_HOOK = "torch_arbiter_holo_swap"
"""Tag of the swap technique (the name shown in progress bars and errors)."""

_HOLO_TYPES = (HoloLinear, HoloConv2d)


@dataclass
class SwappedLayer:
    """One swapped layer: where it sits, the emptied original and its Holo replacement.

    Attributes:
        tensor_name: the weight's name in the model's state dict, with the component prefix
            (``"model.layers.0.mlp.up_proj.weight"``, ``"unet/conv_in.weight"``).
        parent: the module that holds the layer as attribute ``attribute``.
        attribute: the attribute name in ``parent``.
        original: the original layer object (its weight/bias emptied while swapped).
        holo: the Holo module in its place.
    """

    tensor_name: str
    parent: nn.Module
    attribute: str
    original: nn.Module
    holo: HoloLinear | HoloConv2d


def _is_supported(module: nn.Module) -> bool:
    if isinstance(module, _HOLO_TYPES):
        return False
    if type(module) is nn.Linear:
        return module.weight.device.type != "meta"
    if type(module) is nn.Conv2d:
        return module.padding_mode == "zeros" and module.weight.device.type != "meta"
    return False


def find_swappable(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``(qualified name, layer)`` pairs of ``root`` that :func:`apply_holo_swap` would swap.

    Args:
        root: any module tree.

    Returns:
        Exact ``nn.Linear`` and ``nn.Conv2d`` instances (not subclasses, whose forward may
        differ), each once, minus layers whose weight is shared with a layer that is not swapped.
    """
    candidates = [(name, m) for name, m in root.named_modules(remove_duplicate=True) if _is_supported(m)]
    candidate_ids = {id(m) for _, m in candidates}
    owners: dict[int, set[int]] = {}
    for module in root.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), set()).add(id(module))
    chosen = []
    seen_weights: set[int] = set()
    for name, module in candidates:
        weight_owners = owners.get(id(module.weight), set())
        if not weight_owners <= candidate_ids or id(module.weight) in seen_weights:
            continue  # tied to a module we keep, or to another layer already chosen
        if len(weight_owners) > 1:
            continue  # one weight in several layers: keep them all, a HoloTensor is per layer
        seen_weights.add(id(module.weight))
        chosen.append((name, module))
    return chosen


def _parent_of(root: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    parent_name, _, attribute = qualified.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), attribute


def _holo_from_checkpoint(checkpoint: HoloCheckpoint, tensor_name: str, module: nn.Module) -> HoloTensor:
    if tensor_name not in checkpoint.index["tensors"]:
        raise PatchError(
            f"holo checkpoint {checkpoint.path} has no tensor {tensor_name!r}: it was converted from "
            "another model; convert this model with `torch-arbiter convert` or pass holo_dir=None")
    holo = checkpoint.load_tensor(tensor_name)
    weight = module.weight.detach()
    if not isinstance(holo, HoloTensor) or tuple(holo.shape) != tuple(weight.shape) \
            or holo.dtype != weight.dtype:
        raise PatchError(
            f"tensor {tensor_name!r} in {checkpoint.path} does not match the model's "
            f"{tuple(weight.shape)} {weight.dtype} weight; convert this model again")
    if not torch.equal(holo.fragment("exact"), weight.to("cpu")):
        raise PatchError(
            f"tensor {tensor_name!r} in {checkpoint.path} differs from the model's weight: the "
            "checkpoint was made from other weights; convert this model again")
    return holo


def _build_holo(module: nn.Module, holo: HoloTensor | None, encode_options: dict) -> HoloLinear | HoloConv2d:
    if isinstance(module, nn.Linear):
        if holo is None:
            return HoloLinear.from_linear(module, **encode_options)
        built = HoloLinear(holo, module.bias, weight_requires_grad=module.weight.requires_grad)
    else:
        if holo is None:
            return HoloConv2d.from_conv(module, **encode_options)
        options = {key: getattr(module, key) for key in
                   ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                    "groups", "padding_mode")}
        built = HoloConv2d(holo, module.bias, options, weight_requires_grad=module.weight.requires_grad)
    return built.to(module.weight.device)


def _empty_like(param: nn.Parameter) -> torch.Tensor:
    return torch.empty(0, dtype=param.dtype, device=param.device)


def apply_holo_swap(root: nn.Module, *, prefix: str = "", checkpoint: HoloCheckpoint | None = None,
                    encode_options: dict | None = None, progress: bool = True,
                    description: str | None = None) -> list[SwappedLayer]:
    """Replace every swappable layer of ``root`` by a Holo module (all or nothing).

    Args:
        root: the module tree to change in place.
        prefix: prepended to each weight's state-dict name (``"unet/"`` for a pipeline component)
            to find it in ``checkpoint`` and to name it in plans.
        checkpoint: read the encoded weights from this holo checkpoint instead of encoding;
            each must hold exactly the model's weight (checked).
        encode_options: passed to :meth:`HoloTensor.encode` (``group_size``, ``rank``, ...).
        progress: show a tqdm bar.
        description: the bar's label.

    Returns:
        The swapped layers, in module order (empty when ``root`` has none).

    Raises:
        PatchError: a checkpoint tensor is missing or does not match; any other failure while
            encoding is re-raised after every layer already swapped has been put back.
    """
    from tqdm.auto import tqdm

    options = dict(encode_options or {})
    targets = find_swappable(root)
    swapped: list[SwappedLayer] = []
    try:
        for name, module in tqdm(targets, desc=description or f"{HOLO_SWAP_HOOK}: encoding",
                                 unit="layer", disable=not progress or not targets):
            tensor_name = f"{prefix}{name}.weight"
            holo = _holo_from_checkpoint(checkpoint, tensor_name, module) if checkpoint is not None else None
            replacement = _build_holo(module, holo, options)
            parent, attribute = _parent_of(root, name)
            setattr(parent, attribute, replacement)
            swapped.append(SwappedLayer(tensor_name, parent, attribute, module, replacement))
            module.weight.data = _empty_like(module.weight)
            if module.bias is not None:
                module.bias.data = _empty_like(module.bias)
    except BaseException:
        remove_holo_swap(swapped)
        raise
    return swapped


def remove_holo_swap(layers: Iterable[SwappedLayer]) -> None:
    """Put the original layers back, their weights refilled bit for bit from the exact level.

    Args:
        layers: what :func:`apply_holo_swap` returned (in any order).
    """
    for layer in layers:
        original, holo = layer.original, layer.holo
        device = holo.bias.device if holo.bias is not None else holo._device_probe.device
        exact = holo.holo.fragment("exact")
        # The HoloTensor is dropped after this, so its exact fragment can become the weight again.
        original.weight.data = exact if exact.device == device else exact.to(device)
        if original.bias is not None:
            original.bias.data = holo.bias.detach().clone()
        setattr(layer.parent, layer.attribute, original)
