"""transformers glue: ``from_pretrained(..., quantization_config=HoloTensorConfig(...))``.

Importing this module registers the quantization method ``"holo"`` with transformers
(``register_quantization_config`` / ``register_quantizer``). Then

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=HoloTensorConfig())

loads the weights as usual and, once they are in place, runs :func:`torch_arbiter.patch` on the
model: its layers become Holo modules and it is registered with the arbiter. The
:class:`~torch_arbiter.hooks.ManagedModel` is reached with
:func:`~torch_arbiter.hooks.managed_model_of`.

With ``HoloTensorConfig(holo_dir=...)`` (the model's ``torch-arbiter convert`` checkpoint) the
layers' weights never exist densely: transformers builds the model on ``meta`` and reads the
checkpoint tensor by tensor, and each weight a Holo layer will replace is checked against the
holo checkpoint (sha256) and dropped as it is read, leaving the layer on ``meta`` until
``patch()`` fills it from the fragments. That needs transformers' per-tensor quantize operations
(transformers >= 5); older versions load the dense model first.

A directory made by ``torch-arbiter convert`` holds fragments, not a transformers weight file, so
:func:`from_holo_pretrained` loads it on its own: built on ``meta``, only the exact tensors read,
the Holo layers filled from the fragments (nothing is encoded again).

Limits: a patched model cannot be saved with ``save_pretrained`` (convert the source instead);
the arbiter object itself is not part of the serialisable config (pass it as ``arbiter=``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from torch import nn

from ..errors import InvalidRequestError, PatchError
from ..priority import Priority, WorkloadType

__all__ = ["HOLO_QUANT_METHOD", "HoloTensorConfig", "HoloQuantizer", "from_holo_pretrained"]

HOLO_QUANT_METHOD = "holo"
"""The ``quant_method`` name registered with transformers."""


class HoloTensorConfig(QuantizationConfigMixin):
    """Quantization config that makes a transformers model's quality live (method ``"holo"``).

    Args:
        workload: a ``WorkloadType`` name (``"llm_inference"``, ...) or member.
        priority: a ``Priority`` name, value or member.
        name: the workload's name in the arbiter's state.
        holo_dir: read fragments from this converted checkpoint instead of encoding.
        group_size: encode option (weights per scale group).
        rank: encode option (``"auto"``, 0 or a rank).
        register: False patches without registering with an arbiter.
        quality: with ``register=False``, the quality to start at (default 1).
        arbiter: the arbiter to register with (not serialised); None takes the default one.

    Raises:
        InvalidRequestError: an unknown workload or priority, or a quality outside [0, 1].
    """

    def __init__(self, workload: Any = "llm_inference", priority: Any = "normal", name: str | None = None,
                 holo_dir: str | os.PathLike | None = None, group_size: int | str = "auto", rank: Any = "auto",
                 register: bool = True, quality: float | None = None, arbiter=None, **unused: Any):
        self.quant_method = HOLO_QUANT_METHOD
        self.workload = _workload_name(workload)
        self.priority = Priority.coerce(priority).name.lower()
        self.name = name
        self.holo_dir = str(holo_dir) if holo_dir is not None else None
        self.group_size = group_size
        self.rank = rank
        self.register = bool(register)
        if quality is not None and not (isinstance(quality, (int, float)) and 0.0 <= quality <= 1.0):
            raise InvalidRequestError(f"HoloTensorConfig quality must be in [0, 1], got {quality!r}")
        self.quality = quality
        self._arbiter = arbiter

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able fields (the arbiter object is left out)."""
        return {key: value for key, value in self.__dict__.items() if not key.startswith("_")}

    def __deepcopy__(self, memo):
        clone = self.__class__(**self.to_dict())
        clone._arbiter = self._arbiter  # one arbiter per process: share it, never copy it
        return clone


def _workload_name(workload: Any) -> str:
    if isinstance(workload, WorkloadType):
        return workload.value.name
    names = {member.value.name: member for member in WorkloadType}
    if isinstance(workload, str) and workload.lower() in names:
        return workload.lower()
    raise InvalidRequestError(
        f"unknown workload {workload!r} for HoloTensorConfig: use one of {sorted(names)}")


class HoloQuantizer(HfQuantizer):
    """transformers quantizer for :class:`HoloTensorConfig`: patch the model after its weights load."""

    requires_calibration = False

    def __init__(self, quantization_config: HoloTensorConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        # A config read back from config.json says "holo" but must not be re-applied blindly:
        # weights saved from a patched model do not exist (is_serializable is False).
        self.pre_quantized = False
        self._swappable: set[str] | None = None
        self._read_keys: dict[str, str] = {}

    def validate_environment(self, *args: Any, device_map=None, **kwargs: Any) -> None:
        """Refuse device maps that split the model: the safe points guard one top module."""
        if isinstance(device_map, dict) and len(set(device_map.values())) > 1:
            raise PatchError("HoloTensorConfig needs the whole model on one device; drop device_map "
                             "or map every module to the same device")

    def param_needs_quantization(self, model, param_name: str, **kwargs: Any) -> bool:
        """True for the weight of a layer that a checkpoint's fragments will fill (``holo_dir``
        set): transformers then hands it to :meth:`get_quantize_ops` instead of keeping it."""
        if not self._leaves_layers_on_meta():
            return False
        from .holo_swap import find_swappable

        module_name, _, leaf = param_name.rpartition(".")
        if leaf != "weight":
            return False
        if self._swappable is None:
            self._swappable = {name for name, _ in find_swappable(model, allow_meta=True)}
        return module_name in self._swappable

    def get_quantize_ops(self):
        """The operation transformers runs on each weight :meth:`param_needs_quantization` picked."""
        return _leave_on_meta_op(self)

    def _process_model_before_weight_loading(self, model, **kwargs: Any):
        self._swappable = None
        self._read_keys = {}
        if self._leaves_layers_on_meta():
            # transformers >= 5.25 kernelizes (hub kernels, on by default) before the quantizer's
            # post-processing, on the device of the model's first parameter: a layer weight this
            # quantizer leaves on meta, which `kernels` refuses. Name the device patch() puts the
            # layers on, as transformers itself does for weights a device map offloads to meta.
            model._kernels_device = str(self._arbiter().config.device)
        return model

    def _leaves_layers_on_meta(self) -> bool:
        """True when the layer weights are not loaded but filled from ``holo_dir`` (transformers >= 5)."""
        return self.quantization_config.holo_dir is not None and _has_quantize_ops()

    def _arbiter(self):
        from ..arbiter import get_default_arbiter

        return getattr(self.quantization_config, "_arbiter", None) or get_default_arbiter()

    def _check_read_weights(self, cache) -> None:
        """The weights dropped while loading must be the ones the holo checkpoint was made from."""
        if not self._read_keys:
            return
        source = cache.attach(self.quantization_config.holo_dir)
        exact = {entry["tensor"]: source.keys[fid] for fid, entry in source.index["fragments"].items()
                 if entry.get("name") == "exact"}
        differing = sorted(name for name, key in self._read_keys.items() if name in exact and exact[name] != key)
        if differing:
            raise PatchError(
                f"{len(differing)} weight(s) of this checkpoint differ from {self.quantization_config.holo_dir} "
                f"(first: {differing[0]!r}): the holo checkpoint was converted from other weights; pass the "
                "holo_dir converted from this model, or convert it again")

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        from .managed import patch

        config: HoloTensorConfig = self.quantization_config
        self._check_read_weights(self._arbiter().cache)
        workload = next(m for m in WorkloadType if m.value.name == config.workload)
        managed = patch(model, getattr(config, "_arbiter", None), workload=workload, priority=config.priority,
                        name=config.name, holo_dir=config.holo_dir,
                        encode_options={"group_size": config.group_size, "rank": config.rank},
                        register=config.register)
        if not config.register and config.quality is not None:
            managed.set_quality(config.quality)
        return model

    @property
    def is_serializable(self) -> bool:
        """False: save the source model and convert it; fragments are not a transformers format."""
        return False

    @property
    def is_trainable(self) -> bool:
        """False: Holo layers are inference only."""
        return False


def _has_quantize_ops() -> bool:
    try:
        from transformers.core_model_loading import ConversionOps  # noqa: F401  (transformers >= 5)
    except ImportError:
        return False
    return True


def _leave_on_meta_op(quantizer: HoloQuantizer):
    """A transformers ``ConversionOps`` that records each weight's content key and returns an
    empty ``meta`` tensor of the model's dtype in its place: the dense bytes are dropped as soon
    as they are read, one tensor at a time, and ``patch()`` builds the layer from the fragments."""
    import torch
    from transformers.core_model_loading import ConversionOps

    from .cached_weights import tensor_key

    class LeaveOnMeta(ConversionOps):
        def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
            placeholders = {}
            for name, value in input_dict.items():
                value = value[0] if isinstance(value, list) else value
                quantizer._read_keys[name] = tensor_key(value)
                dtype = model.get_parameter_or_buffer(name).dtype if model is not None else value.dtype
                placeholders[name] = torch.empty(value.shape, dtype=dtype, device="meta")
            return placeholders

    return LeaveOnMeta()


def _register() -> None:
    if HOLO_QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(HOLO_QUANT_METHOD)(HoloTensorConfig)
    if HOLO_QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(HOLO_QUANT_METHOD)(HoloQuantizer)


_register()


def from_holo_pretrained(holo_dir: str | os.PathLike, model_class=None, *,
                         quantization_config: HoloTensorConfig | None = None, **kwargs: Any):
    """Load a model (or diffusers pipeline) converted by ``torch-arbiter convert``, live and
    progressively: it runs as soon as its floor fragments are in.

    The model is built on the ``meta`` device from the configs beside the checkpoint; only the
    tensors that stay exact are read, the Holo layers start empty, and the arbiter's grant brings
    the floor in before this returns. The rest of the fragments stream in the background (the
    arbiter's prefetcher, planner order) and the quality rises as they land, never above the grant.

    Args:
        holo_dir: the converted directory, or an ``http(s)://`` URL serving it (Range requests).
        model_class: a transformers auto class or model class (default ``AutoModelForCausalLM``;
            ignored for a pipeline, whose ``model_index.json`` names its classes).
        quantization_config: a :class:`HoloTensorConfig` (workload, priority, name, register,
            quality, arbiter); its ``holo_dir`` is set to ``holo_dir``.
        **kwargs: ``dtype`` (default: the checkpoint's).

    Returns:
        The patched model or pipeline; ``managed_model_of(obj)`` gives its :class:`ManagedModel`.

    Raises:
        FormatError: ``holo_dir`` is not a holo checkpoint.
        CorruptFragmentError: the URL cannot be fetched.
        PatchError: it has no ``config.json`` / ``model_index.json`` (it was not converted from a
            transformers model or a diffusers pipeline), or lacks a tensor the model needs.

    Limits: other ``from_pretrained`` keyword arguments are refused (there is no dense load to
    pass them to); a tokenizer is loaded by the caller (from the directory, or the URL's files).
    """
    from ..arbiter import get_default_arbiter
    from .holo_loading import load_from_holo
    from .managed import patch

    unknown = sorted(set(kwargs) - {"dtype", "torch_dtype"})
    if unknown:
        raise InvalidRequestError(f"from_holo_pretrained takes no {unknown}: it builds the model from the "
                                  "checkpoint's own config (pass dtype= to choose the dtype)")
    config = quantization_config or HoloTensorConfig()
    config.holo_dir = str(holo_dir)
    arbiter = getattr(config, "_arbiter", None) or get_default_arbiter()
    obj, _ = load_from_holo(holo_dir, arbiter.cache, model_class=model_class,
                            dtype=kwargs.get("dtype", kwargs.get("torch_dtype")))
    workload = next(m for m in WorkloadType if m.value.name == config.workload)
    diffusers_pipeline = not isinstance(obj, nn.Module)
    managed = patch(obj, arbiter, workload=WorkloadType.IMAGE_GENERATION if diffusers_pipeline else workload,
                    priority=config.priority, name=config.name, holo_dir=holo_dir, register=config.register,
                    progress=False)
    if not config.register and config.quality is not None:
        managed.set_quality(config.quality)
    if isinstance(obj, nn.Module) and hasattr(obj, "config"):
        obj.config.quantization_config = config
    return obj
