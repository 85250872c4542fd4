"""Holo modules: ``nn.Linear`` / ``nn.Conv2d`` replacements whose weight sits at a live level.

A Holo module holds its :class:`~torch_arbiter.holo.HoloTensor` (all fragments, on the CPU: the
store the fragment cache reads from) and, for the current level, the *resident* tensors its
forward uses, on the module's device. ``resident_bytes`` is the sum of ``nbytes`` of those
tensors and equals ``level_bytes(level)``; nothing else is cached between forwards.

How each level runs (chosen by measurement, see ``bench/bench_nn.py``):

- top level (exact): the original weight tensor and ``F.linear`` / ``F.conv2d``, as the original
  module does (on the CPU the resident weight *is* the HoloTensor's exact fragment, no copy).
- quantised levels on the CPU (AVX2+FMA, see :func:`cpu_kernels_available`): the C kernels of
  ``holo_kernels.c`` read the fragments in place. ``HoloLinear`` below :data:`_DENSE_ROWS` input
  rows runs the fused kernel (the input is rotated, ``(x ⊙ s)·H``, instead of un-rotating the
  weight, and the codes are multiplied as integers against the input rounded to int16); from
  there on it decodes the weight in fp32 chunks for torch's matmul. Convs decode their weight,
  embeddings only the rows looked up.
- quantised levels of ``HoloLinear`` on CUDA (sm80+, shapes the kernel takes): torch's int4
  weight-only kernel (``_weight_int4pack_mm``, see ``_int4.py``) on the rotated input, its packed
  layout made once in :meth:`set_level` in place of the nibble codes (level 2: both 4-bit stages
  in one call); from :data:`_INT4_ROWS` input rows on, the level is decoded to a transient bf16
  weight for one matmul.
- everything else (convs and embeddings on CUDA, a CPU without AVX2, odd shapes):
  decode-then-compute with torch ops from the fragments, the transient dense weight freed after
  the call.
- the optional fp16 low-rank branch adds ``(x·Rᵀ)·Lᵀ``.

Limits: inference only (no gradients reach the fragments); the level changes only through
:meth:`set_level`, which the hook layer calls between forwards; safe-point logic is not here.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidRequestError, PatchError
from ..holo.codec import (HoloTensor, dequantize_codes, dequantize_rotated, kernel_scales, residual_scales,
                          rotate_input, unpack_nibbles, unrotate)
from . import _int4, _kernels

__all__ = ["HoloLinear", "HoloConv2d", "HoloEmbedding", "cpu_kernels_available", "guard_dtype_changes",
           "refuse_dtype_change"]

#: From this many input rows on, a quantised ``HoloLinear`` on the CPU decodes its weight (fp32,
#: in chunks) for torch's matmul instead of running the fused kernel, whose cost grows with the
#: rows times the weight while a matmul's per-row cost falls. Measured on one thread of the
#: development machine (``bench/bench_nn.py`` keeps the figures).
_DENSE_ROWS = 10

#: From this many input rows on, a quantised ``HoloLinear`` on CUDA decodes its level to bf16 for
#: one matmul instead of running torch's int4 kernel (tinygemm is built for few rows). An estimate
#: not yet measured on a GPU: ``scripts/gpu_check.py`` prints both sides at 1 and 2048 rows.
_INT4_ROWS = 32

#: Device types whose quantised ``HoloLinear`` levels run torch's int4 kernel.
_INT4_DEVICE_TYPES = ("cuda",)

#: Bytes of fp32 weight rows decoded at a time on that dense path (a 49152x576 head is decoded
#: in 4 MiB pieces, not as one 113 MB transient).
_DENSE_CHUNK_BYTES = 4 << 20


def cpu_kernels_available() -> bool:
    """Whether quantised levels run the C kernels on this CPU.

    Returns:
        True when the kernels library was built (``pip install -e .``) and the CPU has AVX2 and
        FMA; False means the torch decode path (same values up to fp32 rounding, several times
        slower per call).
    """
    return _kernels.available()


def _dense_matmul(codes: _kernels.Codes, x_rot: torch.Tensor) -> torch.Tensor:
    """``x_rot · W_levelᵀ`` ``[rows, out]`` with the weight decoded chunk by chunk for ``torch.mm``."""
    out_features, padded = codes.out_features, codes.padded
    per_chunk = max(8, _DENSE_CHUNK_BYTES // (4 * padded))
    if per_chunk >= out_features:
        return x_rot @ _kernels.decode_rows(codes).t()
    out_t = torch.empty(out_features, x_rot.shape[0], dtype=torch.float32)
    buffer = torch.empty(per_chunk * padded, dtype=torch.float32)
    for first in range(0, out_features, per_chunk):
        count = min(per_chunk, out_features - first)
        weight = _kernels.decode_rows(codes, first=first, count=count, out=buffer)
        torch.mm(weight, x_rot.t(), out=out_t[first:first + count])
    return out_t.t()


class _HoloModule(nn.Module):
    """Shared residency logic: which tensors are held at a level, and device moves."""

    def __init__(self, holo: HoloTensor, bias: torch.Tensor | None, weight_requires_grad: bool,
                 level: int | None):
        super().__init__()
        if not isinstance(holo, HoloTensor):
            raise InvalidRequestError(f"expected a HoloTensor, got {type(holo).__name__}")
        self.holo = holo
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        else:
            self.register_parameter("bias", None)
        self._weight_requires_grad = weight_requires_grad
        self.register_buffer("_device_probe", torch.empty(0), persistent=False)
        self._resident: dict[str, torch.Tensor] = {}
        self._acquired: dict[str, torch.Tensor] = {}  # fragments held at the cache's DEVICE tier
        self._codes: _kernels.Codes | None = None
        self._level = 0
        self.set_level(holo.num_levels if level is None else level)

    # -- level ---------------------------------------------------------------------------------

    @property
    def level(self) -> int:
        """The current level (``num_levels`` = exact original weight)."""
        return self._level

    @property
    def num_levels(self) -> int:
        """Number of levels of the weight."""
        return self.holo.num_levels

    def level_bytes(self, k: int) -> int:
        """Exact bytes held for forward at level ``k`` (same as ``holo.level_bytes(k)``)."""
        return self.holo.level_bytes(k)

    @property
    def resident_bytes(self) -> int:
        """Bytes of the weight tensors held for forward right now (``sum(t.nbytes)``)."""
        return sum(t.numel() * t.element_size() for t in self._resident.values())

    def set_level(self, k: int) -> None:
        """Hold the tensors of level ``k`` (now) and release the others.

        Args:
            k: a level in ``0..num_levels``; level 0 holds nothing (a suspended model) and a
                forward at level 0 raises until a level >= 1 is set again.

        Raises:
            InvalidRequestError: ``k`` out of range.
        """
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= self.num_levels:
            raise InvalidRequestError(
                f"level {k!r} is outside 0..{self.num_levels} (0 releases the weight, 1.. hold a level)")
        self._hold(k, self._device_probe.device)
        self.__dict__["_level"] = k

    def _check_runnable(self, level: int) -> None:
        if level == 0:
            raise InvalidRequestError(
                "this Holo layer holds no weight (level 0: its model is suspended): set a level >= 1 "
                "(a patched model does so itself when the arbiter re-admits it)")

    def _apply(self, fn, *args, **kwargs):
        refuse_dtype_change(self, fn)
        result = super()._apply(fn, *args, **kwargs)
        if self._resident:
            device = self._device_probe.device
            if next(iter(self._resident.values())).device != device:
                self._hold(self._level, device)
        return result

    # -- nn.Module citizenship: state_dict holds the original weight ------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Save ``weight`` as the original tensor (the exact level), bit for bit, whatever the level.

        A patched model's ``state_dict()`` / ``save_pretrained()`` therefore write the model as it
        was before ``patch()``, under the original names (the tensor lives on the CPU).
        """
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if "exact" not in self.holo.fragments:
            raise PatchError(
                f"{prefix}weight: the exact level of this Holo layer is not loaded, so its original "
                "weight cannot be saved; patch from the full holo checkpoint (or the original model) "
                "and save again, or save the holo checkpoint itself with `torch-arbiter convert`")
        exact = self.holo.fragment("exact")
        destination[prefix + "weight"] = exact if keep_vars else exact.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Accept the layer's own original weight (a no-op); refuse any other.

        A Holo layer's levels are encoded from its weight, so new weights need a new encoding:
        ``unpatch()``, load them into the plain model, and ``patch()`` again.
        """
        key = prefix + "weight"
        if key in state_dict:
            value = state_dict[key]
            exact = self.holo.fragment("exact") if "exact" in self.holo.fragments else None
            if not (isinstance(value, torch.Tensor) and exact is not None and value.shape == exact.shape
                    and value.dtype == exact.dtype and torch.equal(value.detach().to(exact.device), exact)):
                raise PatchError(
                    f"{key}: loading a different weight into a patched layer is not supported (its "
                    "levels were encoded from the old one); unpatch() the model, load_state_dict() into "
                    "it, and patch() it again")
        elif strict:
            missing_keys.append(key)
        super()._load_from_state_dict({k: v for k, v in state_dict.items() if k != key}, prefix,
                                      local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _hold(self, k: int, device: torch.device) -> None:
        # Plain state, set through __dict__: nn.Module.__setattr__ looks for parameters, buffers
        # and modules on every assignment, which a switch of a few hundred layers pays for.
        state = self.__dict__
        state["_resident"], state["_codes"] = {}, None  # release first: old and new levels never held together
        cached = self._cached(device)
        keep = set(self.holo.level_fragments(k)) if k > 0 and cached else set()
        for name in [n for n in self._acquired if n not in keep]:
            self._let_go(name)
        state["_resident"] = self._build(k, device, cached) if k > 0 else {}
        if k < self.num_levels and "hi" in self._resident:
            state["_codes"] = _kernels.codes_for(self._resident, self.holo.meta, k)

    def _cached(self, device: torch.device) -> bool:
        """True when the fragments come from the arbiter's cache at this device's tier."""
        fragments = self.holo.fragments
        return hasattr(fragments, "acquire") and fragments.serves(device)

    def _fetch(self, name: str, device: torch.device, cached: bool) -> torch.Tensor:
        """Fragment ``name`` on ``device``: held at the cache's DEVICE tier (``cached``), or a copy."""
        if cached:
            if name not in self._acquired:
                self._acquired[name] = self.holo.fragments.acquire(name)
            return self._acquired[name]
        tensor = self.holo.fragment(name)
        return tensor if tensor.device == device else tensor.to(device)

    def _let_go(self, name: str) -> None:
        """Stop holding an acquired fragment (the cache keeps or moves its copy)."""
        if self._acquired.pop(name, None) is not None:
            self.holo.fragments.release(name)

    def _build(self, k: int, device: torch.device, cached: bool) -> dict[str, torch.Tensor]:
        if k == self.num_levels:
            return {"weight": self._fetch("exact", device, cached)}
        return {name: self._fetch(name, device, cached) for name in self.holo.level_fragments(k)}

    # -- shared compute ------------------------------------------------------------------------

    def _dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """Transient dense weight in the original shape at the current quantised level."""
        matrix = self._weight_rows(None)
        if self.holo.rank:
            matrix = matrix + self._resident["rank_l"].float() @ self._resident["rank_r"].float()
        return matrix.to(dtype).reshape(self.holo.shape)

    def _weight_rows(self, ids: torch.Tensor | None) -> torch.Tensor:
        """fp32 rows ``ids`` (all when None) of the current quantised level, without the rank branch."""
        codes = self._codes
        if codes is not None:
            return _kernels.weight_rows(codes, ids)
        meta, resident = self.holo.meta, self._resident
        hi, lo = self._nibble_codes()
        scales, ratio = resident["scales"], resident.get("lo_ratio")
        if ids is not None:
            if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < hi.shape[0]:
                raise IndexError(f"index out of range: ids must be in 0..{hi.shape[0] - 1}")
            hi, scales = hi[ids], scales[:, ids]
            lo, ratio = (lo[ids], ratio[:, ids]) if lo is not None else (None, None)
        lo_stage = (lo, ratio) if lo is not None else None
        values = dequantize_codes(hi, scales, lo_stage, meta["group_size"], torch.float32)
        return unrotate(values, resident["signs"], meta["block"])[:, : meta["in_features"]]

    def _nibble_codes(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Unpacked 4-bit codes ``uint8 [out, Kp]`` of the level's stages (``lo`` None at level 1)."""
        resident, padded = self._resident, self.holo.meta["padded_features"]
        if "int4_codes" not in resident:
            lo = resident.get("lo")
            return unpack_nibbles(resident["hi"]), (unpack_nibbles(lo) if lo is not None else None)
        codes = resident["int4_codes"]
        width = padded * (2 if self._level >= 2 else 1)
        codes = _int4.unpack(codes, self.holo.shape[0], width, _int4.layout(codes.device, _int4.inner_k_tiles(width)))
        return codes[:, :padded], (codes[:, padded:] if self._level >= 2 else None)

    def _original_weight(self) -> nn.Parameter:
        # The exact fragment itself (no copy): restoring a model must not double its memory.
        return nn.Parameter(self.holo.fragment("exact"), requires_grad=self._weight_requires_grad)

    def _original_bias(self) -> nn.Parameter | None:
        if self.bias is None:
            return None
        return nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)


class HoloLinear(_HoloModule):
    """A ``nn.Linear`` whose weight is a :class:`HoloTensor` at a live level.

    Build with :meth:`from_linear`. ``forward`` matches ``nn.Linear`` (bit for bit at the top level).
    """

    def __init__(self, holo: HoloTensor, bias: torch.Tensor | None = None, *,
                 weight_requires_grad: bool = True, level: int | None = None):
        """Wrap an encoded weight ``[out_features, in_features]``.

        Args:
            holo: the encoded weight.
            bias: optional bias ``[out_features]`` (kept exact).
            weight_requires_grad: the original weight's flag, restored by :meth:`to_original`.
            level: starting level (default: the top, exact).

        Raises:
            InvalidRequestError: the weight is not 2-D or the bias does not match.
        """
        if len(holo.shape) != 2:
            raise InvalidRequestError(f"HoloLinear needs a 2-D weight, got shape {tuple(holo.shape)}")
        if bias is not None and tuple(bias.shape) != (holo.shape[0],):
            raise InvalidRequestError(f"bias shape {tuple(bias.shape)} does not match {holo.shape[0]} outputs")
        self.out_features, self.in_features = int(holo.shape[0]), int(holo.shape[1])
        super().__init__(holo, bias, weight_requires_grad, level)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **encode_options) -> "HoloLinear":
        """Encode an ``nn.Linear`` (its device is kept; the original is left untouched).

        Args:
            linear: the layer.
            **encode_options: passed to :meth:`HoloTensor.encode` (``group_size``, ``rank``, ...).

        Returns:
            A HoloLinear at the top level on the linear's device.
        """
        if not isinstance(linear, nn.Linear):
            raise InvalidRequestError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        return cls.from_encoded(linear, HoloTensor.encode(linear.weight.detach(), **encode_options))

    @classmethod
    def from_encoded(cls, linear: nn.Linear, holo: HoloTensor, *, level: int | None = None,
                     device: torch.device | None = None) -> "HoloLinear":
        """Wrap ``holo``, the already encoded weight of ``linear``, with its bias and flags.

        Args:
            linear: the layer the weight came from (left untouched).
            holo: its encoded weight (made now or read from a holo checkpoint).
            level: the level to start at (default: the top, exact; 0 holds nothing).
            device: where the layer lives (default: the linear's weight's device).

        Returns:
            A HoloLinear at ``level`` on that device.
        """
        if not isinstance(linear, nn.Linear):
            raise InvalidRequestError(f"from_encoded needs an nn.Linear, got {type(linear).__name__}")
        module = cls(holo, linear.bias, weight_requires_grad=linear.weight.requires_grad, level=level)
        return module.to(device if device is not None else linear.weight.device)

    def to_original(self) -> nn.Linear:
        """An ``nn.Linear`` bit-identical to the one encoded, on this module's device.

        On the CPU its weight shares storage with the exact fragment (no copy).
        """
        exact = self.holo.fragment("exact")
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta", dtype=exact.dtype)
        linear.weight = self._original_weight()
        linear.bias = self._original_bias()
        return linear.to(self._device_probe.device)

    def _build(self, k: int, device: torch.device, cached: bool) -> dict[str, torch.Tensor]:
        resident = super()._build(k, device, cached)
        if k == self.num_levels or device.type not in _INT4_DEVICE_TYPES:
            return resident
        meta = self.holo.meta
        width = meta["padded_features"] * (2 if k >= 2 else 1)
        if (not _int4.available(device)
                or not _int4.supported(self.out_features, width, meta["group_size"])
                or _int4.layout(device, _int4.inner_k_tiles(width)) is None):
            return resident
        # torch's packed layout replaces the nibble codes (same bytes); both stages side by side.
        codes = unpack_nibbles(resident.pop("hi"))
        if "lo" in resident:
            codes = torch.cat([codes, unpack_nibbles(resident.pop("lo"))], dim=1)
        resident["int4_codes"] = _int4.pack(codes)
        for name in ("hi", "lo"):  # the packed copy is this layer's own: the cache's goes back
            self._let_go(name)
        return resident

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W_level.T + bias`` over the last dimension of ``x``."""
        self._check_runnable(self._level)
        if self._level == self.num_levels:
            return F.linear(x, _as(self._resident["weight"], x.dtype), _as(self.bias, x.dtype))
        meta = self.holo.meta
        flat = x.reshape(-1, self.in_features)
        codes = self._codes
        if "int4_codes" in self._resident:
            out = self._int4_forward(flat).to(x.dtype)
        elif codes is not None:
            rows = flat.float().contiguous()
            if rows.shape[0] < _DENSE_ROWS and codes.fused:
                out = _kernels.linear(codes, rows)
            else:
                rotated = _kernels.rotate_rows(rows, codes.tensors["signs"], meta["padded_features"], meta["block"])
                out = _dense_matmul(codes, rotated)
            out = out.to(x.dtype)
        else:
            # Rotate the input rather than un-rotate the weight (fewer flops per call).
            rotated = rotate_input(_padded(flat, meta["padded_features"]), self._resident["signs"], meta["block"])
            out = F.linear(rotated, dequantize_rotated(self._resident, meta, self._level, x.dtype))
        out = self._add_rank_and_bias(out, flat)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _int4_forward(self, flat: torch.Tensor) -> torch.Tensor:
        """``rot(x) · W_levelᵀ`` in bf16 from the packed codes: the int4 kernel, or decode + matmul."""
        meta, resident = self.holo.meta, self._resident
        padded, group = meta["padded_features"], meta["group_size"]
        rotated = rotate_input(_padded(flat, padded), resident["signs"], meta["block"]).to(torch.bfloat16)
        if flat.shape[0] < _INT4_ROWS:
            scales = resident["scales"].to(torch.bfloat16)
            pairs = kernel_scales(scales)
            if self._level >= 2:  # the second stage reads the same input: [x, x] against [hi | lo]
                pairs = torch.cat([pairs, kernel_scales(residual_scales(scales, resident["lo_ratio"]))])
                rotated = torch.cat([rotated, rotated], dim=-1)
            return _int4.matmul(rotated, resident["int4_codes"], group, pairs.contiguous())
        hi, lo = self._nibble_codes()
        lo_stage = (lo, resident["lo_ratio"]) if lo is not None else None
        return F.linear(rotated, dequantize_codes(hi, resident["scales"], lo_stage, group, torch.bfloat16))

    def _add_rank_and_bias(self, out: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        if self.holo.rank:
            out = out + F.linear(F.linear(flat, self._resident["rank_r"].to(flat.dtype)),
                                 self._resident["rank_l"].to(flat.dtype))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, level={self._level}/{self.num_levels}")


class HoloConv2d(_HoloModule):
    """A ``nn.Conv2d`` whose weight is a :class:`HoloTensor` at a live level.

    Build with :meth:`from_conv`. Quantised levels decode a transient dense weight per call (no
    quantised conv kernel exists in torch); the top level is the original ``F.conv2d``.
    """

    def __init__(self, holo: HoloTensor, bias: torch.Tensor | None, conv_options: dict, *,
                 weight_requires_grad: bool = True, level: int | None = None):
        """Wrap an encoded conv weight ``[out, in/groups, kh, kw]``.

        Args:
            holo: the encoded weight.
            bias: optional bias ``[out]`` (kept exact).
            conv_options: ``in_channels``, ``out_channels``, ``kernel_size``, ``stride``,
                ``padding``, ``dilation``, ``groups``, ``padding_mode`` of the original conv.
            weight_requires_grad: the original weight's flag, restored by :meth:`to_original`.
            level: starting level (default: the top, exact).
        """
        if len(holo.shape) != 4:
            raise InvalidRequestError(f"HoloConv2d needs a 4-D weight, got shape {tuple(holo.shape)}")
        if conv_options.get("padding_mode", "zeros") != "zeros":
            raise InvalidRequestError("HoloConv2d supports padding_mode='zeros' only; keep this conv unpatched")
        self.conv_options = dict(conv_options)
        super().__init__(holo, bias, weight_requires_grad, level)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **encode_options) -> "HoloConv2d":
        """Encode an ``nn.Conv2d`` (device kept, original untouched).

        Args:
            conv: the layer (``padding_mode='zeros'``).
            **encode_options: passed to :meth:`HoloTensor.encode`.

        Returns:
            A HoloConv2d at the top level on the conv's device.
        """
        if not isinstance(conv, nn.Conv2d):
            raise InvalidRequestError(f"from_conv needs an nn.Conv2d, got {type(conv).__name__}")
        return cls.from_encoded(conv, HoloTensor.encode(conv.weight.detach(), **encode_options))

    @classmethod
    def from_encoded(cls, conv: nn.Conv2d, holo: HoloTensor, *, level: int | None = None,
                     device: torch.device | None = None) -> "HoloConv2d":
        """Wrap ``holo``, the already encoded weight of ``conv``, with its bias, options and flags.

        Args:
            conv: the layer the weight came from (left untouched).
            holo: its encoded weight (made now or read from a holo checkpoint).
            level: the level to start at (default: the top, exact; 0 holds nothing).
            device: where the layer lives (default: the conv's weight's device).

        Returns:
            A HoloConv2d at ``level`` on that device.
        """
        if not isinstance(conv, nn.Conv2d):
            raise InvalidRequestError(f"from_encoded needs an nn.Conv2d, got {type(conv).__name__}")
        options = {key: getattr(conv, key) for key in
                   ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                    "groups", "padding_mode")}
        module = cls(holo, conv.bias, options, weight_requires_grad=conv.weight.requires_grad, level=level)
        return module.to(device if device is not None else conv.weight.device)

    def to_original(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` bit-identical to the one encoded, on this module's device."""
        exact = self.holo.fragment("exact")
        options = dict(self.conv_options, bias=self.bias is not None)
        conv = nn.Conv2d(**options, device="meta", dtype=exact.dtype)
        conv.weight = self._original_weight()
        conv.bias = self._original_bias()
        return conv.to(self._device_probe.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``F.conv2d`` with the weight of the current level."""
        self._check_runnable(self._level)
        if self._level == self.num_levels:
            weight = _as(self._resident["weight"], x.dtype)
        else:
            weight = self._dense_weight(x.dtype)
        o = self.conv_options
        return F.conv2d(x, weight, _as(self.bias, x.dtype), o["stride"], o["padding"],
                        o["dilation"], o["groups"])

    def extra_repr(self) -> str:
        o = self.conv_options
        return (f"{o['in_channels']}, {o['out_channels']}, kernel_size={o['kernel_size']}, "
                f"stride={o['stride']}, level={self._level}/{self.num_levels}")


class HoloEmbedding(_HoloModule):
    """An ``nn.Embedding`` whose table is a :class:`HoloTensor` at a live level.

    A lookup decodes only the rows it needs (gather codes, dequantise, un-rotate), so a quantised
    table costs its codes, not a dense copy. Two ways to build one:

    - :meth:`from_embedding`: its own HoloTensor and resident tensors;
    - :meth:`tied_to`: shares a :class:`HoloLinear` head's HoloTensor *and* resident tensors (a
      head tied to the embedding, as in SmolLM2): it holds nothing itself
      (``resident_bytes == level_bytes(k) == 0``), follows the head's level, and ``set_level``
      moves the head. Plan its bytes once, through the head.

    Limits: ``max_norm`` is refused (it writes into the table); no gradients reach the codes.
    """

    def __init__(self, holo: HoloTensor, embedding_options: dict, *, weight_requires_grad: bool = True,
                 level: int | None = None, tied_head: "HoloLinear | None" = None):
        """Wrap an encoded table ``[num_embeddings, embedding_dim]``.

        Args:
            holo: the encoded table (the head's HoloTensor when ``tied_head`` is given).
            embedding_options: ``num_embeddings``, ``embedding_dim``, ``padding_idx``,
                ``scale_grad_by_freq``, ``sparse`` of the original.
            weight_requires_grad: the original weight's flag, restored by :meth:`to_original`.
            level: starting level (default: the top; ignored when tied).
            tied_head: share this HoloLinear's resident tensors and level.
        """
        if len(holo.shape) != 2:
            raise InvalidRequestError(f"HoloEmbedding needs a 2-D table, got shape {tuple(holo.shape)}")
        self.embedding_options = dict(embedding_options)
        # Not a registered child: the head belongs to its own parent (moves, state_dict) already.
        object.__setattr__(self, "_tied_head", tied_head)
        super().__init__(holo, None, weight_requires_grad, level if tied_head is None else tied_head.level)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, **encode_options) -> "HoloEmbedding":
        """Encode an ``nn.Embedding`` (device kept, original untouched).

        Raises:
            InvalidRequestError: not an ``nn.Embedding``, or it uses ``max_norm``.
        """
        cls._options_of(embedding)  # refuse before spending time on encoding
        return cls.from_encoded(embedding, HoloTensor.encode(embedding.weight.detach(), **encode_options))

    @classmethod
    def from_encoded(cls, embedding: nn.Embedding, holo: HoloTensor, *, level: int | None = None,
                     device: torch.device | None = None) -> "HoloEmbedding":
        """Wrap ``holo``, the already encoded table of ``embedding``, with its options and flags.

        Args:
            embedding: the layer the table came from (left untouched).
            holo: its encoded table (made now or read from a holo checkpoint).
            level: the level to start at (default: the top, exact; 0 holds nothing).
            device: where the layer lives (default: the embedding's weight's device).

        Returns:
            A HoloEmbedding at ``level`` on that device.

        Raises:
            InvalidRequestError: not an ``nn.Embedding``, or it uses ``max_norm``.
        """
        module = cls(holo, cls._options_of(embedding), weight_requires_grad=embedding.weight.requires_grad,
                     level=level)
        return module.to(device if device is not None else embedding.weight.device)

    @classmethod
    def tied_to(cls, head: "HoloLinear", embedding: nn.Embedding, *, check: bool = True) -> "HoloEmbedding":
        """An embedding that reads ``head``'s codes (for a head tied to ``embedding``).

        Args:
            head: the HoloLinear of the shared weight.
            embedding: the embedding that shares it.
            check: compare the head's exact level with the table (False when the caller already
                matched both to the same checkpoint tensor: reading it would load the whole table).

        Raises:
            InvalidRequestError: the head's weight is not the embedding's table (shape or values).
        """
        options = cls._options_of(embedding)
        if tuple(head.holo.shape) != tuple(embedding.weight.shape) or check and not torch.equal(
                head.holo.fragment("exact"), embedding.weight.detach().to(head.holo.fragment("exact").device)):
            raise InvalidRequestError("the head's weight is not this embedding's table; tie only shared weights")
        return cls(head.holo, options, weight_requires_grad=embedding.weight.requires_grad, tied_head=head)

    @staticmethod
    def _options_of(embedding: nn.Embedding) -> dict:
        if not isinstance(embedding, nn.Embedding):
            raise InvalidRequestError(f"needs an nn.Embedding, got {type(embedding).__name__}")
        if embedding.max_norm is not None:
            raise InvalidRequestError("HoloEmbedding does not support max_norm (it rewrites the table); "
                                      "keep this embedding unpatched")
        return {key: getattr(embedding, key) for key in
                ("num_embeddings", "embedding_dim", "padding_idx", "scale_grad_by_freq", "sparse")}

    @property
    def level(self) -> int:
        """The current level (the head's, when tied)."""
        return self._tied_head.level if self._tied_head is not None else self._level

    def set_level(self, k: int) -> None:
        """Hold the tensors of level ``k`` (moves the head when tied)."""
        if self._tied_head is not None:
            if k != self._tied_head.level:
                self._tied_head.set_level(k)
        else:
            super().set_level(k)

    def level_bytes(self, k: int) -> int:
        """Bytes held at level ``k``: 0 when tied (the head holds them)."""
        return 0 if self._tied_head is not None else super().level_bytes(k)

    def _build(self, k, device, cached):
        return {} if self._tied_head is not None else super()._build(k, device, cached)

    def to_original(self) -> nn.Embedding:
        """An ``nn.Embedding`` bit-identical to the one encoded (weight shares the exact fragment)."""
        exact = self.holo.fragment("exact")
        embedding = nn.Embedding(**self.embedding_options, device="meta", dtype=exact.dtype)
        embedding.weight = self._original_weight()
        return embedding.to(self._device_probe.device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the table at the current level for integer ``ids`` of any shape."""
        owner = self._tied_head if self._tied_head is not None else self
        resident, level = owner._resident, owner._level
        self._check_runnable(level)
        if level == self.num_levels:
            return F.embedding(ids, resident["weight"], self.embedding_options["padding_idx"])
        flat = ids.reshape(-1)
        values = owner._weight_rows(flat)
        if self.holo.rank:
            values = values + resident["rank_l"][flat].float() @ resident["rank_r"].float()
        return values.to(self.holo.dtype).reshape(*ids.shape, -1)

    def extra_repr(self) -> str:
        o = self.embedding_options
        tied = ", tied to a head" if self._tied_head is not None else ""
        return f"{o['num_embeddings']}, {o['embedding_dim']}, level={self.level}/{self.num_levels}{tied}"


def refuse_dtype_change(module: nn.Module, fn) -> None:
    """Raise before ``fn`` (what ``module.to(...)`` / ``.half()`` apply) changes a Holo weight's dtype.

    A Holo layer's levels, byte counts and bit-exact top level belong to the weight's dtype, so a
    dtype change is refused, never ignored. Device moves pass.

    Args:
        module: a Holo module, or a module tree holding some (checked before anything changes).
        fn: the per-tensor function of ``nn.Module._apply``.

    Raises:
        PatchError: ``fn`` would change the dtype of some Holo layer's weight.
    """
    holos = [module] if isinstance(module, _HoloModule) else [m for m in module.modules() if isinstance(m, _HoloModule)]
    for dtype in {m.holo.dtype for m in holos}:
        if not dtype.is_floating_point:
            continue
        converted = fn(torch.empty(0, dtype=dtype))
        if isinstance(converted, torch.Tensor) and converted.dtype != dtype:
            raise PatchError(
                f"this model's Holo layers hold {dtype} weights and cannot be cast to {converted.dtype} in "
                "place (their levels are encoded from the original dtype); unpatch() the model, cast it, and "
                "patch() it again (or convert a checkpoint of the cast model)")


def guard_dtype_changes(root: nn.Module) -> None:
    """Make ``root.to(dtype)`` / ``root.half()`` refuse before converting anything when ``root`` holds Holo layers.

    ``nn.Module._apply`` converts children one by one, so a refusal raised by a Holo layer alone
    would leave the layers converted before it changed; this checks the whole tree first. The
    guard stays harmless once the layers are gone (``unpatch()``): it then checks nothing.

    Args:
        root: the module ``patch()`` swapped layers in.
    """
    if "_apply" in vars(root):
        return
    root._apply = types.MethodType(_guarded_apply, root)


def _guarded_apply(self: nn.Module, fn, *args, **kwargs):
    refuse_dtype_change(self, fn)
    return type(self)._apply(self, fn, *args, **kwargs)


def _padded(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` zero-padded on its last dimension to ``width`` (``x`` itself when already that wide)."""
    return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))


def _as(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if tensor is None or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)

