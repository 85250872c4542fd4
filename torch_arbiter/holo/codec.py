"""HoloTensor: one weight as an ordered list of nested levels made of fragments.

The code (what a level is, and why)
-----------------------------------
A weight of shape ``[out, ...]`` is viewed as a matrix ``W`` of ``[out, K]`` (a conv weight
``[out, in/groups, kh, kw]`` becomes ``[out, in/groups*kh*kw]``; an embedding ``[vocab, dim]`` is
read the same way). ``K`` is zero-padded to ``Kp``, a multiple of the group size.

1. *Incoherence rotation* (QuIP#-style): ``W_rot = (W ⊙ s) · H`` along the input dimension, where
   ``s`` are seeded random signs and ``H`` is the orthonormal Sylvester Hadamard matrix applied in
   blocks of ``b`` = the largest power of two <= 256 that divides ``Kp``. The rotation spreads
   outliers over the group so a uniform grid fits it; being orthonormal it keeps the Frobenius
   error, and a layer can rotate its *input* instead of un-rotating the weight:
   ``x · W^T = ((x ⊙ s) · H) · W_rot^T``.
   With ``rotate="auto"`` (default) the encoder measures level 1 with and without the rotation
   (same bytes) and keeps the lower weight error: weights already on a 4-bit grid of the same
   groups (a dequantised GGUF) quantise better unrotated. Unrotated tensors record ``block`` 1
   and all-plus signs, so every reader treats both alike. The signs are stored as bits
   (:func:`pack_signs`): one byte per sign measured 0.19 of the digits DDPM's 12.95 bits per
   weight at level 1 (its layers have 16-64 outputs, so a sign per input column is 1/16-1/64 of a
   layer's weights).
2. *Two 4-bit stages per group* of ``group_size`` weights along the rotated input dimension
   (``"auto"``, the default, picks 32, 64 or 128 per tensor). Level 1 is a 4-bit code (``hi``
   nibble) on a per-group grid: symmetric (one bf16 scale, ``w = (q - 7.5)·scale``) or asymmetric
   (bf16 scale and zero, ``w = (q - 8)·scale + zero``). Rotation, grid and group size are chosen
   together per tensor by measured round-to-nearest error on a row sample, each candidate's extra
   bits priced at 4x squared error per bit (:func:`_choose_grid`).
   Level 1's grid starts from each group's whole range (see :data:`_RESIDUAL_CLIPS`) and is
   refitted without data by alternating least squares, per group only where that lowers the error
   of both levels (:func:`_refit_level1`). The codes are rounded to nearest, or, given calibration
   inputs, with GPTQ error feedback: each column's rounding error is pushed onto the columns not
   yet rounded through the inverse of the inputs' ``XᵀX``, which lowers the layer's output error;
   each stage keeps GPTQ only where it measures no worse on held-out rows of those inputs at
   either level (:func:`_calibrated_stages`). Both stages are stored in the ``[K/g, out, 1|2]`` layout of
   torch's int4 weight-only kernels (:func:`kernel_scales` adds the implied zero of a symmetric
   stage), so the fragments *are* the resident form. Level 2 adds a *residual stage*: a symmetric
   4-bit code (``lo`` nibble) of ``W_rot - level 1`` whose step per group is level 1's scale times
   a ratio stored as one uint8 log code (``lo_ratio``: half the bytes of a bf16 scale; the
   residual's range follows level 1's step), rounded the same way as level 1 (GPTQ given
   calibration); going up moves only those bytes. Bits per weight at g=64: 4.25 (symmetric) or
   4.5, then +4.125.
3. *Rank fragments* (SVDQuant-style): optionally a rank-``r`` fp16 branch ``L·R`` taken from the
   top singular vectors of ``W`` before quantisation, so the quantised part is ``W - L·R``. With
   ``rank="auto"`` the encoder tries no branch, the auto rank and half of it, together with the
   grid candidates, and keeps what *measures* best per byte: its level-1 error must fall by more
   than the same bytes would buy as extra precision (a factor 2 per extra bit per weight). When
   kept, the rank fragments belong to level 1 and every quantised level uses them.
4. *Exact top level*: the original tensor, bit for bit, in its original dtype. It is not a delta
   over the quantised levels (an exact level over a rotated quantiser is not a cheap residual), so
   stepping to the top moves the original bytes and drops the quantised fragments from residence.

Tensors not worth encoding (fewer than 2 dims, fewer than ``min_numel`` elements, non-float) get a
single exact level. Every level records its exact resident bytes and its measured fidelity
(``rel_error`` = ‖W - Ŵ‖/‖W‖; ``out_rel_error`` = ‖X(W - Ŵ)ᵀ‖/‖XWᵀ‖ when calibration inputs are
given). Fragments are plain tensors (``uint8`` nibbles, ratio codes and sign bits,
``bfloat16`` scales, ``float16`` rank factors, the original dtype for ``exact``) so they store as safetensors.

Limits: GPTQ runs only when calibration inputs are given (a Python loop over input columns, each
step vectorised over rows, three times per tensor for the held-out choice: about a second per run
on a 384x1536 matrix on one CPU thread, far slower when torch's threads compete with other
processes); without them both stages are round-to-nearest on the refitted grid. bf16 scales cost a little precision (measured, and recorded in the fidelity).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Mapping

import torch

from ..errors import FormatError, InvalidRequestError

__all__ = [
    "HoloTensor",
    "FragmentSpec",
    "hadamard_matrix",
    "rotate_input",
    "unrotate",
    "unpack_nibbles",
    "pack_nibbles",
    "pack_signs",
    "unpack_signs",
    "dequantize_rotated",
    "dequantize_codes",
    "kernel_scales",
    "residual_scales",
]

_MAX_BLOCK = 256
#: Group sizes ``group_size="auto"`` chooses among (all usable by torch's int4 kernels).
_AUTO_GROUPS = (32, 64, 128)
_LEVEL_INT4, _LEVEL_INT8 = 1, 2
_RANK_SEED_OFFSET = 0x5EED

#: Fragment kinds recorded in the index: how a fragment refines its tensor.
KIND_PRECISION = "precision"
KIND_RANK = "rank"
KIND_EXACT = "exact"

_hadamard_cache: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}
_sign_table_cache: dict[tuple[str, torch.dtype], torch.Tensor] = {}


@dataclass(frozen=True)
class FragmentSpec:
    """Where a fragment sits in its tensor: its level and kind (``precision``, ``rank``, ``exact``)."""

    name: str
    level: int
    kind: str


def hadamard_matrix(block: int, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix of size ``block`` (a power of two), cached.

    Args:
        block: matrix size, a power of two (1 gives ``[[1]]``).
        device: where the matrix lives.
        dtype: its dtype.

    Returns:
        A symmetric ``[block, block]`` tensor ``H`` with ``H @ H == I``. It is shared by every
        tensor using that block size (a constant, not counted as any weight's resident bytes).
    """
    key = (block, str(torch.device(device)), dtype)
    cached = _hadamard_cache.get(key)
    if cached is None:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < block:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        cached = (h / math.sqrt(block)).to(device=device, dtype=dtype)
        _hadamard_cache[key] = cached
    return cached


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """Pack rotation signs ``[Kp]`` of +-1 into the ``signs`` fragment: ``uint8 [ceil(Kp/8)]``.

    Bit ``k % 8`` of byte ``k // 8`` is set where sign ``k`` is -1 (so an unrotated tensor's
    fragment is all zeros); bits past ``Kp`` are 0.

    Args:
        signs: ``[Kp]`` of +-1, any dtype.

    Returns:
        The packed bits, one byte per 8 signs (an eighth of one ``int8`` per sign).
    """
    flat = signs.reshape(-1)
    negative = torch.nn.functional.pad((flat < 0).to(torch.uint8), (0, -flat.numel() % 8)).view(-1, 8)
    weights = torch.tensor([1 << bit for bit in range(8)], dtype=torch.uint8, device=flat.device)
    return (negative * weights).sum(-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, padded: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: the ``[padded]`` signs of +-1 in ``dtype``, on ``packed``'s device.

    One table lookup (a byte's 8 signs, cached per device and dtype like the Hadamard matrix), so
    the Holo layers unpack per forward rather than keep a second, unaccounted copy resident.
    """
    key = (str(packed.device), dtype)
    table = _sign_table_cache.get(key)
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = (1 - 2 * bits).to(device=packed.device, dtype=dtype)
        _sign_table_cache[key] = table
    return table.index_select(0, packed.int()).view(-1)[:padded]


def _sign_values(signs: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """``signs`` (the packed ``uint8`` fragment, or +-1 values) as +-1 of ``dtype``."""
    if signs.dtype == torch.uint8:
        return unpack_signs(signs, width, dtype)
    return signs.to(dtype)


def rotate_input(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """Apply the incoherence rotation ``(x ⊙ s) · H`` along the last dimension, blockwise.

    The same function rotates a weight (rows are output channels) at encode time and a layer's
    input activations at forward time; it is its own inverse up to the sign flip (see
    :func:`unrotate`).

    Args:
        x: ``[..., Kp]`` tensor, float.
        signs: the ``signs`` fragment (``uint8 [ceil(Kp/8)]``, see :func:`pack_signs`), or
            ``[Kp]`` of +-1 in any other dtype (cast to ``x``'s).
        block: Hadamard block size dividing ``Kp``.

    Returns:
        The rotated tensor, same shape and dtype as ``x``.
    """
    flipped = x * _sign_values(signs, x.shape[-1], x.dtype)
    if block == 1:
        return flipped
    h = hadamard_matrix(block, x.device, x.dtype)
    shape = flipped.shape
    return (flipped.reshape(*shape[:-1], shape[-1] // block, block) @ h).reshape(shape)


def unrotate(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """Inverse of :func:`rotate_input`: ``(x · H) ⊙ s`` blockwise (``H`` is its own inverse)."""
    if block > 1:
        h = hadamard_matrix(block, x.device, x.dtype)
        shape = x.shape
        x = (x.reshape(*shape[:-1], shape[-1] // block, block) @ h).reshape(shape)
    return x * _sign_values(signs, x.shape[-1], x.dtype)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes ``[..., 2n]`` (values 0..15) into bytes ``[..., n]``: even index low nibble."""
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: ``uint8 [..., n]`` to codes ``uint8 [..., 2n]``."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)


def _largest_block(width: int) -> int:
    block = 1
    while block < _MAX_BLOCK and width % (block * 2) == 0:
        block *= 2
    return block


def _round_up_bf16(x: torch.Tensor) -> torch.Tensor:
    # bf16 round-to-nearest has relative error <= 2**-9, so inflating by 2**-8 first rounds up.
    return (x * (1 + 2.0 ** -8)).to(torch.bfloat16)


def _signs(padded: int, seed: int) -> torch.Tensor:
    """The rotation's seeded random signs ``int8 [padded]`` of +-1."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, 2, (padded,), generator=generator, dtype=torch.int8) * 2 - 1


def _grid_bits(in_features: int, group: int, symmetric: bool, zero_price: float = 1.0) -> float:
    """Level-1 bits per original weight: 4-bit codes and bf16 scale (and zero) over padded groups.

    ``zero_price``: what each bit of an asymmetric grid's zeros counts for (1: its real bytes).
    """
    padded = -(-in_features // group) * group
    return (4 + (16 if symmetric else 16 + 16 * zero_price) / group) * padded / in_features


#: What a bit of per-group zeros counts for in :func:`_choose_grid`, against a bit of precision.
#: Weight error undervalues the zeros: on SmolLM2's tied embedding (rank 8 branch, the rest of
#: the model exact) the symmetric g64 grid measured 1.30x the squared weight error of the
#: asymmetric one for 0.25 bit less (within the 4x-per-bit price) but a KL to the reference
#: model of 0.081 against 0.057 nats/token on GPL-3 text. On the digits DDPM, at 0.5 the encoder
#: kept 14 of its 19 tensors on symmetric g32 grids, which measured 36.4 dB PSNR at level 1 (mean
#: of 8 rotation seeds x 3 image batches) where the asymmetric grids it takes at 0.3 measured
#: 37.6 dB, for 0.23 bit per weight more. The grids of MiniLM (asymmetric g128) and SmolLM2 are the
#: same at 0.5 and 0.3; below 0.3 MiniLM starts taking g64 grids.
_ZERO_PRICE = 0.3


#: What keeping a tensor unrotated is priced at, in bits per weight, when ``rotate="auto"``. A lower
#: weight error unrotated did not mean a better model on natural weights: on the digits DDPM the
#: per-tensor choice by weight error alone measured 31.1 dB PSNR at level 1 where always rotating
#: (g32) measured 37.1 dB, its quantisation error being structured rather than spread. Weights
#: already on a 4-bit grid (SmolLM2's dequantised Q4_1) measure several times lower unrotated and
#: still keep their grid.
_UNROTATED_BITS = 1.0


def _choose_grid(sample_at, in_features: int, rotations, symmetries, groups, ranks=((0, 0.0),)):
    """The level-1 grid (rotate?, symmetric?, group size) and rank of lowest error per bit on a row sample.

    Each candidate's round-to-nearest squared error is priced at 4x per extra bit per weight (what
    one more bit buys a uniform quantiser), so a finer group, a zero per group or a rank branch is
    kept only when it measures better than spending the same bytes on precision (the zeros' bits
    count :data:`_ZERO_PRICE` each); an unrotated candidate also pays :data:`_UNROTATED_BITS`. Grid and rank are chosen *together*: chosen one
    after the other, SmolLM2's tied embedding took a symmetric g64 grid (cheapest without a rank
    branch) plus rank 16, where the asymmetric g64 grid with rank 8 measured a lower error at the
    same bytes (relative error 0.0585 against 0.0657) and a lower KL to the reference model
    (0.057 against 0.072 nats/token on GPL-3 text, the rest of the model exact).

    Args:
        sample_at: ``(rotate, group, rank) -> [rows, Kp]`` sample rows ready to quantise (the
            rank branch, if any, already subtracted).
        in_features: the weight's input width (prices padding).
        rotations, symmetries, groups: the grid candidates to try.
        ranks: ``(rank, bits per weight of its branch)`` candidates.

    Returns:
        ``(rotate, symmetric, group, rank)`` of the best candidate.
    """
    best = None
    for group in groups:
        for turn in rotations:
            for rank, rank_bits in ranks:
                sample = sample_at(turn, group, rank)
                for sym in symmetries:
                    err = _level1_error(sample, group, sym, None if turn else in_features)
                    bits = _grid_bits(in_features, group, sym, _ZERO_PRICE) + rank_bits + (0 if turn else _UNROTATED_BITS)
                    score = err * 4.0 ** bits
                    if best is None or score < best[0]:
                        best = (score, turn, sym, group, rank)
    return best[1:]


class HoloTensor:
    """A weight held as nested levels of fragments (see the module docstring for the code).

    Build one with :meth:`encode`; rebuild one from stored fragments with :meth:`from_parts`.
    Levels are ``1..num_levels`` (0 means nothing resident); ``decode(num_levels)`` returns the
    original tensor bit for bit.

    Limits: the object holds every fragment it was given (all levels, on the CPU after
    :meth:`encode`); what a layer keeps *resident* at a level is ``level_bytes(k)``.
    """

    def __init__(self, meta: dict, fragments: Mapping[str, torch.Tensor]):
        """Wrap already-made fragments. Prefer :meth:`encode` or :meth:`from_parts`.

        Args:
            meta: the JSON-able description (``shape``, ``dtype``, ``scheme`` and code parameters,
                ``levels`` with bytes and fidelity, ``fragments`` with level and kind).
            fragments: fragment name -> tensor; may be a subset (then only the levels whose
                fragments are all present can be decoded), or a
                :class:`~torch_arbiter.cache.CachedFragments` read through a fragment cache.
        """
        self.meta = meta
        # A cache-backed mapping (``CachedFragments``) is kept as is: reading it all would load
        # every level, which is what the cache is there to avoid.
        self.fragments = fragments if hasattr(fragments, "acquire") else dict(fragments)
        self._level_names: dict[int, tuple[str, ...]] = {}

    # -- description ---------------------------------------------------------------------------

    @property
    def shape(self) -> torch.Size:
        """The original tensor's shape."""
        return torch.Size(self.meta["shape"])

    @property
    def dtype(self) -> torch.dtype:
        """The original tensor's dtype."""
        return _dtype_from_name(self.meta["dtype"])

    @property
    def num_levels(self) -> int:
        """How many levels there are; the top one is exact."""
        return len(self.meta["levels"])

    @property
    def full_bytes(self) -> int:
        """Bytes of the original tensor (``numel * element_size``)."""
        return int(self.meta["full_bytes"])

    @property
    def scheme(self) -> str:
        """``"nested4x2"`` (rotated two-stage 4+4-bit code) or ``"exact"`` (stored as is)."""
        return self.meta["scheme"]

    @property
    def rank(self) -> int:
        """Rank of the fp16 low-rank branch kept at the quantised levels (0: none)."""
        return int(self.meta.get("rank", 0))

    def fragment_specs(self) -> list[FragmentSpec]:
        """Every fragment of the tensor (present or not) with its level and kind, in level order."""
        return [FragmentSpec(name, int(spec["level"]), spec["kind"])
                for name, spec in self.meta["fragments"].items()]

    def level_fragments(self, k: int) -> list[str]:
        """Names of the fragments resident at level ``k`` (``[]`` for level 0).

        Args:
            k: a level in ``0..num_levels``.

        Returns:
            The fragment names. At the exact top level that is only ``exact``: the quantised
            fragments are not needed there.
        """
        self._check_level(k)
        names = self._level_names.get(k)
        if names is None:  # asked at every level switch of every layer: the meta never changes
            if k == 0:
                names = ()
            elif k == self.num_levels:
                names = ("exact",)
            else:
                names = tuple(s.name for s in self.fragment_specs() if s.level <= k and s.kind != KIND_EXACT)
            self._level_names[k] = names
        return list(names)

    def level_bytes(self, k: int) -> int:
        """Exact resident bytes at level ``k`` (``level_bytes(0) == 0``).

        Args:
            k: a level in ``0..num_levels``.

        Returns:
            The bytes a layer holds for its forward at that level (the same tensors a
            :class:`torch_arbiter.nn.HoloLinear` keeps), recorded at encode time.
        """
        self._check_level(k)
        return 0 if k == 0 else int(self.meta["levels"][k - 1]["bytes"])

    def level_fidelity(self, k: int) -> dict:
        """Measured fidelity of level ``k``: ``rel_error`` and ``bits_per_weight`` at least.

        Args:
            k: a level in ``0..num_levels``; level 0 reports ``rel_error`` 1 (nothing resident).

        Returns:
            A copy of the recorded dict (``rel_error``, ``bits_per_weight``, ``label`` and
            ``out_rel_error`` when calibration inputs were given).
        """
        self._check_level(k)
        if k == 0:
            return {"rel_error": 1.0, "bits_per_weight": 0.0, "label": "none"}
        level = self.meta["levels"][k - 1]
        return dict(level["fidelity"], bits_per_weight=level["bytes"] * 8 / max(1, self._numel()),
                    label=level["label"])

    def _numel(self) -> int:
        return math.prod(self.meta["shape"])

    def _check_level(self, k: int) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= self.num_levels:
            raise InvalidRequestError(
                f"level {k!r} is outside 0..{self.num_levels} for this HoloTensor "
                f"{tuple(self.shape)}; pick a level in that range")

    def _repr_html_(self) -> str:
        """Jupyter's view: a table of the levels (bytes, bits per weight, measured error)."""
        from .._display import holo_view

        return holo_view(self).html()

    def __rich__(self):
        """rich's view: the same levels table as :meth:`_repr_html_`."""
        from .._display import holo_view

        return holo_view(self).rich()

    def __repr__(self) -> str:
        levels = ", ".join(
            f"{lv['label']}:{lv['bytes'] * 8 / max(1, self._numel()):.2f}bpw"
            f"/err={lv['fidelity']['rel_error']:.2e}" for lv in self.meta["levels"])
        return f"HoloTensor({tuple(self.shape)}, {self.meta['dtype']}, {self.scheme}, [{levels}])"

    # -- encode --------------------------------------------------------------------------------

    @classmethod
    def encode(cls, tensor: torch.Tensor, *, group_size: int | str = "auto", rank: int | str = "auto",
               rotate: bool | str = "auto", symmetric: bool | str = "auto", seed: int = 0,
               min_numel: int = 4096, calibration: torch.Tensor | None = None) -> "HoloTensor":
        """Encode a weight into nested levels.

        Args:
            tensor: the weight (any device; work happens in fp32 on its device, fragments end on
                the CPU). Conv weights ``[out, in, kh, kw]`` are read as ``[out, in*kh*kw]``.
                A contiguous CPU tensor becomes the ``exact`` fragment without a copy: do not
                modify it in place afterwards.
            group_size: weights per (scale, zero) group along the input dimension: ``"auto"``
                (default: 32, 64 or 128, whichever measures the lowest error per bit), or an even
                int (32, 64, 128, 256 keep torch's int4 kernels usable).
            rank: ``"auto"`` (build a low-rank branch and keep it only if it measures better per
                byte), ``0`` (never), or a positive rank to force.
            rotate: ``"auto"`` (default: rotate unless quantising unrotated measures a lower
                level-1 weight error, as for weights already on a 4-bit grid of the same groups),
                ``True`` or ``False``. Same bytes either way.
            symmetric: level 1's grid per group: ``True`` scale only (4 + 16/g bits per weight),
                ``False`` scale and zero (4 + 32/g), ``"auto"`` (default) the one whose measured
                weight error is lower once the zero's bits are priced (:data:`_ZERO_PRICE` x 4x
                squared error per bit: weight error undervalues a zero's effect on outputs).
            seed: seed of the random signs of the rotation.
            min_numel: tensors smaller than this are kept exact only.
            calibration: optional ``[m, K]`` input activations of the layer (for a conv, the
                patches of its input, ``K = in*kh*kw``: see :mod:`torch_arbiter.holo.calibrate`); then level 1 is
                rounded with error feedback (GPTQ, on the rotated weight with the inputs'
                ``XᵀX``) to lower the layer's output error, and every level also records
                ``out_rel_error`` (the planner weighs by it). Without it level 1 is
                round-to-nearest.

        Returns:
            A :class:`HoloTensor` whose fragments are on the CPU.

            Tensors that cannot be quantised usefully keep one exact level only: 1-D, smaller than
            ``min_numel``, non-float, with a NaN or inf (a quantised level of such a tensor is
            meaningless; the exact level reproduces it bit for bit), or too narrow for a group
            (when the int8 level would cost as many bytes as the original, e.g. ``Linear(2, 4096)``).
            So no level ever costs more than the exact one, and a model's curve is sorted.

        Raises:
            InvalidRequestError: bad ``group_size``/``rank``/``rotate``/``symmetric``/``seed``/
                ``min_numel``, or calibration that is not a finite float tensor of the layer's width.
        """
        if not isinstance(tensor, torch.Tensor):
            raise InvalidRequestError(f"HoloTensor.encode needs a torch.Tensor, got {type(tensor).__name__}")
        if group_size != "auto" and (not isinstance(group_size, int) or isinstance(group_size, bool)
                                     or group_size < 2 or group_size % 2):
            raise InvalidRequestError(f"group_size must be 'auto' or an even int >= 2, got {group_size!r}")
        if not (rank == "auto" or (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 0)):
            raise InvalidRequestError(f"rank must be 'auto' or an int >= 0, got {rank!r}")
        if rotate not in ("auto", True, False):
            raise InvalidRequestError(f"rotate must be 'auto', True or False, got {rotate!r}")
        if symmetric not in ("auto", True, False):
            raise InvalidRequestError(f"symmetric must be 'auto', True or False, got {symmetric!r}")
        for name, value in (("seed", seed), ("min_numel", min_numel)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidRequestError(f"{name} must be an int >= 0, got {value!r}")
        original = tensor.detach()
        meta = {
            "shape": list(original.shape),
            "dtype": _dtype_name(original.dtype),
            "full_bytes": original.numel() * original.element_size(),
        }
        # The exact level shares the caller's CPU storage (no second copy of every weight); the
        # Holo modules replace the layer that owned it, so nothing else writes to it.
        if calibration is not None:
            _check_calibration(calibration)
        exact = original.to("cpu").contiguous()
        if (original.dim() < 2 or original.numel() < min_numel or not original.is_floating_point()
                or original.shape[0] < 2 or not bool(torch.isfinite(original).all())):
            return cls(*_exact_only(meta, exact, calibration is not None))
        nested = cls(*_encode_nested(original, exact, meta, group_size, rank, rotate, symmetric, seed,
                                      calibration))
        if nested.level_bytes(nested.num_levels - 1) >= nested.full_bytes:
            # Too narrow for its groups (e.g. Linear(2, 4096)): quantising costs more than exact.
            return cls(*_exact_only(dict(meta), exact, calibration is not None))
        return nested

    # -- decode --------------------------------------------------------------------------------

    def decode(self, k: int, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        """The dense weight at level ``k``.

        Args:
            k: a level in ``1..num_levels``; ``num_levels`` is bit-exact.
            dtype: result dtype (default: the original dtype).
            device: result device (default: the CPU; work happens there).

        Returns:
            A new tensor of the original shape (the top level is a copy of the original).

        Raises:
            InvalidRequestError: ``k`` out of range (level 0 has no weight to decode), ``dtype``
                not a floating torch dtype, or ``device`` not a device torch knows.
            FormatError: a fragment that level needs is missing.
        """
        self._check_level(k)
        if k == 0:
            raise InvalidRequestError("level 0 holds nothing to decode; decode a level >= 1")
        dtype, device = _check_decode_target(dtype, device, self.dtype)
        if k == self.num_levels:
            return self.fragment("exact").to(device=device, dtype=dtype, copy=True)
        frags = {name: self.fragment(name).to(device) for name in self.level_fragments(k)}
        matrix = dequantize_rotated(frags, self.meta, k, torch.float32)
        matrix = unrotate(matrix, frags["signs"], self.meta["block"])[:, : self.meta["in_features"]]
        if self.rank:
            matrix = matrix + frags["rank_l"].float() @ frags["rank_r"].float()
        return matrix.reshape(self.shape).to(dtype)

    def fragment(self, name: str) -> torch.Tensor:
        """The stored fragment ``name``.

        Raises:
            FormatError: the fragment is not part of this tensor or was not loaded.
        """
        try:
            return self.fragments[name]
        except KeyError:
            raise FormatError(
                f"fragment {name!r} of a {tuple(self.shape)} HoloTensor is not loaded "
                f"(have: {sorted(self.fragments)}); load the levels you decode") from None

    @classmethod
    def from_parts(cls, meta: dict, fragments: Mapping[str, torch.Tensor]) -> "HoloTensor":
        """Rebuild a HoloTensor from its ``meta`` (as in the index) and loaded fragments.

        Args:
            meta: the dict :attr:`meta` of the encoded tensor.
            fragments: fragment name -> tensor (a subset is allowed).

        Returns:
            The HoloTensor.

        Raises:
            FormatError: meta lacks required keys, names unknown fragments, or a fragment has the
                wrong shape or dtype.
        """
        for key in ("shape", "dtype", "full_bytes", "scheme", "levels", "fragments"):
            if key not in meta:
                raise FormatError(f"HoloTensor meta lacks {key!r}; re-convert the checkpoint")
        _dtype_from_name(meta["dtype"])
        expected = _expected_fragment_layout(meta)
        for name, tensor in fragments.items():
            if name not in expected:
                raise FormatError(f"fragment {name!r} is not part of a {meta['scheme']} tensor "
                                  f"(expected one of {sorted(expected)})")
            shape, dtype = expected[name]
            if list(tensor.shape) != shape or tensor.dtype != dtype:
                raise FormatError(
                    f"fragment {name!r} has shape {list(tensor.shape)} dtype {tensor.dtype}, "
                    f"expected {shape} {dtype}; the checkpoint is inconsistent, re-convert it")
        return cls(meta, fragments)


def dequantize_rotated(frags: Mapping[str, torch.Tensor], meta: dict, k: int,
                       dtype: torch.dtype) -> torch.Tensor:
    """Dense rotated weight ``[out, Kp]`` of a quantised level (no un-rotation, no rank branch).

    Shared by :meth:`HoloTensor.decode` and the Holo modules' decode-then-matmul path.

    Args:
        frags: at least ``scales``, ``hi`` (and ``lo_ratio``, ``lo`` for level 2), on the target
            device.
        meta: the tensor's meta.
        k: 1 (4-bit) or 2 (8-bit).
        dtype: compute/result dtype.

    Returns:
        ``[out, Kp]`` tensor in ``dtype``.
    """
    lo = (unpack_nibbles(frags["lo"]), frags["lo_ratio"]) if k >= _LEVEL_INT8 else None
    return dequantize_codes(unpack_nibbles(frags["hi"]), frags["scales"], lo, meta["group_size"], dtype)


def dequantize_codes(hi: torch.Tensor, scales: torch.Tensor,
                     lo: tuple[torch.Tensor, torch.Tensor] | None, group_size: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """Values of the two-stage code from unpacked codes.

    Args:
        hi: ``uint8 [out, Kp]`` 4-bit codes of level 1.
        scales: level 1's stored scales ``[Kp/group_size, out, 1|2]`` (see :func:`kernel_scales`).
        lo: level 2's ``(codes uint8 [out, Kp], lo_ratio uint8 [G, out])``, or None for level 1.
        group_size: weights per group.
        dtype: compute/result dtype.

    Returns:
        ``[out, Kp]``: ``(hi - 8)·scale + zero (+ (lo - 8)·scale₂ + zero₂)``.
    """
    out = hi.shape[0]
    values = None
    stages = [(hi, scales)]
    if lo is not None:
        stages.append((lo[0], residual_scales(scales.to(dtype), lo[1])))
    for codes, stage in stages:
        stage = kernel_scales(stage.to(dtype))
        scale = stage[..., 0].t().unsqueeze(-1)
        # One multiply-add per stage: (q - 8)·s + z = q·s + (z - 8s).
        offset = stage[..., 1].t().unsqueeze(-1) - 8 * scale
        term = torch.addcmul(offset, codes.view(out, -1, group_size).to(dtype), scale)
        values = term if values is None else values.add_(term)
    return values.reshape(out, -1)


def _encode_nested(original: torch.Tensor, exact: torch.Tensor, meta: dict, group_size: int | str,
                   rank: int | str, rotate: bool | str, symmetric: bool | str, seed: int,
                   calibration: torch.Tensor | None):
    weight = original.reshape(original.shape[0], -1).float()
    out, in_features = weight.shape
    calib = None
    if calibration is not None:
        calib = calibration.detach().reshape(-1, calibration.shape[-1]).to(weight.device, torch.float32)
        if calib.shape[-1] != in_features:
            raise InvalidRequestError(
                f"calibration inputs have width {calib.shape[-1]}, the weight expects {in_features}; "
                "pass the layer's own input activations")
    weight_norm = torch.linalg.vector_norm(weight).item() or 1.0

    def rotated(matrix: torch.Tensor, turn: bool, group: int) -> torch.Tensor:
        """A new [rows, Kp] tensor (quantisation consumes it; never the caller's weight)."""
        padded = -(-in_features // group) * group
        if padded != in_features:
            matrix = torch.nn.functional.pad(matrix, (0, padded - in_features))
        if turn:
            return rotate_input(matrix, _signs(padded, seed).to(weight.device), _largest_block(padded))
        return matrix if padded != in_features else matrix.clone()

    r, left, right = 0, None, None
    if rank != 0:
        r = _auto_rank(out, in_features) if rank == "auto" else min(rank, out, in_features)
    if r:
        left, right = _low_rank(weight, r, seed)
    # Rank candidates: the top singular directions come first, so a smaller rank is a prefix.
    ranks = [r] if rank != "auto" else sorted({0, r // 2 if r // 2 >= _MIN_AUTO_RANK else 0, r})
    ranks = [(k, k * (out + in_features) * 2 * 8 / (out * in_features)) for k in ranks]
    # Decide on a row sample (groups are row-local, so the error estimate is unbiased).
    rows = torch.arange(0, out, max(1, out // 2048), device=weight.device)
    sample = weight[rows]

    def sample_at(turn: bool, group: int, k: int) -> torch.Tensor:
        return rotated(sample - left[rows, :k].float() @ right[:k].float() if k else sample, turn, group)

    turn, sym, group, r = _choose_grid(
        sample_at, in_features,
        (True, False) if rotate == "auto" else (rotate,),
        (True, False) if symmetric == "auto" else (symmetric,),
        _AUTO_GROUPS if group_size == "auto" else (group_size,), ranks)
    padded = -(-in_features // group) * group
    if r:
        left, right = left[:, :r].contiguous(), right[:r].contiguous()
    else:
        left = right = None
    signs = pack_signs(_signs(padded, seed) if turn else torch.ones(padded, dtype=torch.int8))
    block = _largest_block(padded) if turn else 1
    target = weight - left.float() @ right.float() if r else weight
    columns = None if turn else in_features
    rotated_x = rotated(calib, turn, group) if calib is not None else None
    if rotated_x is None:
        scale, zero, hi, residual = _level1_stage(rotated(target, turn, group), group, sym)
        level2 = _level2_stage(residual, scale, group, None, columns)
    else:
        scale, zero, hi, residual, level2 = _calibrated_stages(rotated(target, turn, group), group, sym,
                                                               rotated_x, columns)
    scales, hi, lo_ratio, lo, err4, err8 = _combine_stages(scale, zero, sym, hi, residual, level2, columns, out)
    del target

    fragments = {"signs": signs, "scales": scales.cpu(), "hi": pack_nibbles(hi).cpu()}
    specs = {"signs": (_LEVEL_INT4, KIND_PRECISION), "scales": (_LEVEL_INT4, KIND_PRECISION),
             "hi": (_LEVEL_INT4, KIND_PRECISION)}
    if r:
        fragments["rank_l"], fragments["rank_r"] = left.cpu(), right.cpu()
        specs["rank_l"] = specs["rank_r"] = (_LEVEL_INT4, KIND_RANK)
    fragments["lo_ratio"], fragments["lo"] = lo_ratio.cpu(), pack_nibbles(lo).cpu()
    specs["lo_ratio"] = specs["lo"] = (_LEVEL_INT8, KIND_PRECISION)
    fragments["exact"] = exact
    specs["exact"] = (3, KIND_EXACT)

    # The rotation is orthonormal, so errors are measured in the rotated space; a rotated weight's
    # padded columns carry error there that never reaches the output, so with padding this
    # slightly over-reports (unrotated weights count their real columns only).
    fidelity = [{"rel_error": math.sqrt(e) / weight_norm} for e in (err4, err8)]
    if calib is not None:
        # Output error X·(W - Ŵ)ᵀ, in the rotated space (the rank branch is common to both sides).
        reference = torch.linalg.vector_norm(calib @ weight.t()).item() or 1.0
        for fid, left in zip(fidelity, (residual, level2[2])):
            fid["out_rel_error"] = torch.linalg.vector_norm(rotated_x @ left.reshape(out, -1).t()).item() / reference
    meta.update(
        scheme="nested4x2", in_features=in_features, padded_features=padded, group_size=group,
        block=block, rotated=turn, symmetric=sym, seed=seed, rank=r,
        fragments={name: {"level": level, "kind": kind} for name, (level, kind) in specs.items()},
    )
    level1 = sum(fragments[n].numel() * fragments[n].element_size()
                 for n, (lv, kind) in specs.items() if lv == _LEVEL_INT4)
    level2 = level1 + sum(fragments[n].numel() * fragments[n].element_size()
                          for n, (lv, kind) in specs.items() if lv == _LEVEL_INT8)
    meta["levels"] = [
        {"label": "int4", "bytes": level1, "fidelity": fidelity[0]},
        {"label": "int8", "bytes": level2, "fidelity": fidelity[1]},
        {"label": "exact", "bytes": meta["full_bytes"],
         "fidelity": {"rel_error": 0.0, **({"out_rel_error": 0.0} if calib is not None else {})}},
    ]
    return meta, fragments


_GPTQ_BLOCK = 128
_GPTQ_DAMP = 0.01
_GPTQ_MAX_DAMPINGS = 16


def kernel_scales(scales: torch.Tensor) -> torch.Tensor:
    """A stage's stored scales in torch's int4 kernel layout ``[G, out, 2]`` (scale, zero).

    The kernel reads ``w = (q - 8)·scale + zero``. Asymmetric stages store exactly that; symmetric
    stages store only the scale (``[G, out, 1]``, half the bytes) and mean ``w = (q - 7.5)·scale``,
    i.e. ``zero = scale / 2``, built here on the fly (a transient, like an activation).

    Args:
        scales: ``[G, out, 2]`` or ``[G, out, 1]``.

    Returns:
        ``[G, out, 2]`` in the same dtype (the input itself when already asymmetric).
    """
    if scales.shape[-1] == 2:
        return scales
    flat = scales.reshape(scales.shape[:-1])
    if flat.dtype != torch.bfloat16 or sys.byteorder != "little":
        return torch.stack([flat, flat / 2], dim=-1)
    # Writing an innermost dimension of 2 element by element measured ~50 us per call on the CPU,
    # a third of a small layer's whole forward. So build each (scale, zero) pair as one int32:
    # scales are positive normal bf16 (the encoder keeps them >= 1e-30), so their int16 bits are
    # non-negative, halving one is its exponent minus one (bits - 0x80), and on little-endian
    # machines the low half (the scale) comes first.
    pairs = flat.view(torch.int16).to(torch.int32).mul_(0x10001).sub_(0x80 << 16)
    return pairs.view(torch.bfloat16).view(*flat.shape, 2)


#: Shrink factors of a group's range tried when fitting the *residual* stage's grid. Level 1 is
#: never clipped: clipping a group's outliers there measured a slightly lower level-1 error at
#: g=64 but left level 2 a residual as wide as the clipped part, doubling its error (MiniLM: level
#: 2 at 0.0133 relative error clipped, 0.0067 not; level 1 within 1 % either way at g=128).
#: Level 2 has no quantised level above it, so it may clip.
_RESIDUAL_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8)


def _fit_groups(groups: torch.Tensor, symmetric: bool,
                clips: tuple[float, ...] = (1.0,)) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group grid ``(q - 8)·scale + zero``, q in 0..15, of lowest round-to-nearest error.

    Args:
        groups: ``[out, G, g]`` values.
        symmetric: scale-only grid centred on 0 (``zero = scale / 2``), else scale and zero.
        clips: shrink factors of each group's range to try (1.0: the grid covers the whole range).

    Returns:
        ``scale`` and ``zero``, each ``[out, G]`` fp32 holding bf16-representable values (what is
        stored), the best factor chosen per group.
    """
    if symmetric:
        amax = groups.abs().amax(-1)
        centre, half = torch.zeros_like(amax), amax
    else:
        low, high = torch.aminmax(groups, dim=-1)
        centre, half = (low + high) / 2, (high - low) / 2
    best_scale = best_zero = best_err = None
    for factor in clips:
        low, high = centre - half * factor, centre + half * factor
        if symmetric:
            scale = _round_up_bf16(torch.clamp_min(high / 7.5, 1e-30)).float()
            zero = scale / 2
        else:
            zero = (low + (high - low) * (8 / 15)).to(torch.bfloat16).float()
            # The grid must cover [low, high] around the rounded zero.
            scale = _round_up_bf16(torch.clamp_min(torch.maximum((zero - low) / 8, (high - zero) / 7),
                                                   1e-30)).float()
        if len(clips) == 1:
            return scale, zero
        err = _grid_values(_grid_codes(groups, scale, zero), scale, zero).sub_(groups).square_().sum(-1)
        if best_err is None:
            best_scale, best_zero, best_err = scale, zero, err
        else:
            better = err < best_err
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
            best_err = torch.minimum(err, best_err)
    return best_scale, best_zero


def _grid_codes(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest codes (float, 0..15) of ``groups [out, G, g]`` on the grids ``[out, G]``."""
    return torch.sub(groups, (zero - 8 * scale).unsqueeze(-1)).div_(scale.unsqueeze(-1)).round_().clamp_(0, 15)


def _grid_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """A new tensor of the values ``(q - 8)·scale + zero`` of ``codes [out, G, g]``."""
    return codes.mul(scale.unsqueeze(-1)).add_((zero - 8 * scale).unsqueeze(-1))


def _stored_scales(scale: torch.Tensor, zero: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """``[out, G]`` fp32 scale/zero to the stored bf16 ``[G, out, 1 or 2]`` layout."""
    parts = [scale] if symmetric else [scale, zero]
    return torch.stack(parts, dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()


def _level1_error(rotated: torch.Tensor, group_size: int, symmetric: bool, columns: int | None = None) -> float:
    """Squared Frobenius error of the round-to-nearest level-1 code of ``rotated [out, Kp]``.

    ``columns``: count only the first ones (an unrotated weight's zero padding is never decoded).
    """
    groups = rotated.view(rotated.shape[0], -1, group_size)
    scale, zero = _fit_groups(groups, symmetric)
    approx = _grid_values(_grid_codes(groups, scale, zero), scale, zero)
    return torch.linalg.vector_norm(approx.sub_(groups).view(rotated.shape)[:, :columns]).item() ** 2


def _gptq_codes(rotated: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                hessian: torch.Tensor) -> torch.Tensor:
    """Error-compensated 4-bit codes (GPTQ) of ``rotated [out, Kp]`` on fixed group grids.

    Columns are rounded in order; each column's rounding error, weighted by the inverse Hessian
    ``(XᵀX)⁻¹`` of the calibration inputs, is pushed onto the columns not yet rounded, so the
    layer's *output* error falls (not the weight error). Blocks of :data:`_GPTQ_BLOCK` columns are
    updated lazily; the loop runs over columns, each step vectorised over the output rows.

    Args:
        rotated: the rotated weight (consumed: modified in place).
        scale, zero: ``[out, G]`` fixed grids (from :func:`_fit_groups`).
        group_size: columns per group.
        hessian: ``[Kp, Kp]`` ``XᵀX`` of the rotated calibration inputs.

    Returns:
        ``float32 [out, Kp]`` codes in 0..15.
    """
    columns = rotated.shape[1]
    upper = _inverse_cholesky(hessian)
    rotated[:, hessian.diagonal() <= 0] = 0.0
    step = scale.repeat_interleave(group_size, 1)
    base = zero.repeat_interleave(group_size, 1) - 8 * step
    codes = torch.empty_like(rotated)
    for start in range(0, columns, _GPTQ_BLOCK):
        stop = min(start + _GPTQ_BLOCK, columns)
        block = rotated[:, start:stop]
        errors = torch.empty_like(block)
        for j in range(stop - start):
            c = start + j
            q = torch.sub(block[:, j], base[:, c]).div_(step[:, c]).round_().clamp_(0, 15)
            codes[:, c] = q
            err = (block[:, j] - (q * step[:, c] + base[:, c])) / upper[c, c]
            block[:, j:].sub_(err.unsqueeze(1) * upper[c, start + j:stop].unsqueeze(0))
            errors[:, j] = err
        rotated[:, stop:].sub_(errors @ upper[start:stop, stop:])
    return codes


def _inverse_cholesky(hessian: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` in fp32, computed in fp64.

    Real activations have outlier channels that leave ``XᵀX`` badly conditioned, so the damping
    ``λ`` starts at :data:`_GPTQ_DAMP` x the mean diagonal and grows tenfold until both
    factorisations succeed (at most :data:`_GPTQ_MAX_DAMPINGS` tries, then a typed error: a
    Hessian with inf entries never factorises); unused input columns (zero diagonal) get a unit
    diagonal.
    """
    hessian = hessian.double()
    dead = hessian.diagonal() <= 0
    hessian[dead, dead] = 1.0
    mean = hessian.diagonal().mean()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    damp = _GPTQ_DAMP
    for _ in range(_GPTQ_MAX_DAMPINGS):
        damped = hessian + eye * (damp * mean)
        if not torch.linalg.cholesky_ex(damped).info:
            # inv of an SPD matrix measured ~10x faster than cholesky_inverse here.
            upper, info = torch.linalg.cholesky_ex(torch.linalg.inv(damped), upper=True)
            if not info:
                return upper.float()
        damp *= 10
    raise InvalidRequestError(
        f"the calibration inputs' XᵀX cannot be factorised even damped by {damp / 10:g}x its mean "
        "diagonal (overflowing or degenerate activations); pass other calibration inputs or none")


def _residual_grid(residual: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Level 2's grid of a level-1 ``residual [out, G, g]``: its uint8 ratio codes and fp32 step ``[out, G]``."""
    fitted, _ = _fit_groups(residual, True, _RESIDUAL_CLIPS)
    ratio = _ratio_code(fitted / scale)
    return ratio, scale * _ratio_value(ratio, torch.float32)


def _residual_error(residual: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
    """Per-group squared error ``[out, G]`` left by level 2's round-to-nearest code of ``residual``."""
    codes = torch.div(residual, fine.unsqueeze(-1)).add_(7.5).round_().clamp_(0, 15)
    return codes.sub_(7.5).mul_(fine.unsqueeze(-1)).sub_(residual).square_().sum(-1)


#: Alternating least-squares rounds of :func:`_refit_level1`.
_REFIT_ROUNDS = 8


def _refit_level1(groups: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Level 1's grid per group, refitted without data: ``(scale, zero)`` ``[out, G]`` fp32 (bf16 values).

    Starts from the full-range grid of :func:`_fit_groups` and alternates the two half-problems of
    a half-quadratic fit: codes by rounding on the grid, then the grid by least squares on those
    codes (``w ≈ q·s + b``: a line fit per group; symmetric: ``s`` alone), rounded to the stored
    bf16. A group takes the refitted grid only where it lowers *both* its level-1 error and the
    error of level 2 built on it (a narrower level-1 grid that leaves a wider residual would cost
    level 2 more than level 1 gains), so no group measures worse than round-to-nearest at either
    level. On MiniLM's rotated weights that lowered level-1 squared error 4-7 % and level 2's
    5-8 %; HQQ's proximal lp-norm fit of the zero alone aims at outliers, which the rotation
    already spread.

    Args:
        groups: ``[out, G, g]`` values (not modified).
        symmetric: fit a scale-only grid (``zero = scale / 2``).

    Returns:
        ``scale`` and ``zero`` as :func:`_fit_groups` returns them.
    """
    def errors(scale, zero):
        residual = torch.sub(groups, _grid_values(_grid_codes(groups, scale, zero), scale, zero))
        return residual.square().sum(-1), residual

    start_scale, start_zero = _fit_groups(groups, symmetric)
    start_err, start_residual = errors(start_scale, start_zero)
    best_scale, best_zero, best_err = start_scale, start_zero, start_err
    scale, zero = start_scale, start_zero
    for _ in range(_REFIT_ROUNDS):
        codes = _grid_codes(groups, scale, zero)
        if symmetric:
            centred = codes.sub_(7.5)
            fitted = (groups * centred).sum(-1) / centred.square().sum(-1).clamp_min(1e-30)
            scale = fitted.clamp_min(1e-30).to(torch.bfloat16).float()
            zero = scale / 2
        else:
            code_mean, value_mean = codes.mean(-1), groups.mean(-1)
            centred = codes.sub_(code_mean.unsqueeze(-1))
            spread = centred.square().sum(-1)
            slope = (centred * groups).sum(-1) / spread.clamp_min(1e-30)
            slope = torch.where(spread > 0, slope, scale).clamp_min(1e-30).to(torch.bfloat16).float()
            zero = (value_mean - slope * code_mean + 8 * slope).to(torch.bfloat16).float()
            scale = slope
        err, _ = errors(scale, zero)
        better = err < best_err
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        best_err = torch.minimum(err, best_err)
    _, start_fine = _residual_grid(start_residual, start_scale)
    best_residual = errors(best_scale, best_zero)[1]
    _, best_fine = _residual_grid(best_residual, best_scale)
    take = (best_err < start_err) & (_residual_error(best_residual, best_fine)
                                     <= _residual_error(start_residual, start_fine))
    return torch.where(take, best_scale, start_scale), torch.where(take, best_zero, start_zero)


def _level1_stage(rotated: torch.Tensor, group_size: int, symmetric: bool,
                  hessian: torch.Tensor | None = None):
    """Level 1 of ``rotated [out, Kp]`` (not modified): ``(scale, zero, codes, residual)``.

    The grid comes from :func:`_refit_level1`; codes are rounded to nearest on it, or with GPTQ
    error feedback when ``hessian`` is given. ``codes`` and ``residual`` are ``[out, G, g]`` fp32.
    """
    out = rotated.shape[0]
    groups = rotated.view(out, -1, group_size)
    scale, zero = _refit_level1(groups, symmetric)
    if hessian is not None:
        codes = _gptq_codes(rotated.clone(), scale, zero, group_size, hessian).view_as(groups)
    else:
        codes = _grid_codes(groups, scale, zero)
    return scale, zero, codes, torch.sub(groups, _grid_values(codes, scale, zero))


def _level2_stage(residual: torch.Tensor, scale: torch.Tensor, group_size: int,
                  hessian: torch.Tensor | None = None, columns: int | None = None):
    """Level 2 (a symmetric 4-bit code of level 1's ``residual [out, G, g]``): ``(ratio, codes, left)``.

    Rounded to nearest, or with GPTQ when ``hessian`` is given; ``left`` is what remains
    (``[out, G, g]``). Columns past ``columns`` (an unrotated weight's padding, never decoded) are
    not fitted.
    """
    out = residual.shape[0]
    residual = residual.clone()
    if columns is not None:
        residual.view(out, -1)[:, columns:] = 0.0
    ratio, fine = _residual_grid(residual, scale)
    if hessian is not None:
        codes = _gptq_codes(residual.reshape(out, -1).clone(), fine, fine / 2, group_size,
                            hessian).view_as(residual)
    else:
        codes = torch.div(residual, fine.unsqueeze(-1)).add_(7.5).round_().clamp_(0, 15)
    return ratio, codes, residual.sub_(codes.sub(7.5).mul_(fine.unsqueeze(-1)))


def _quantize_groups(rotated: torch.Tensor, group_size: int, symmetric: bool,
                     hessians: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
                     columns: int | None = None):
    """Two-stage 4+4-bit code of ``rotated [out, Kp]`` (not modified).

    Level 1 (``hi``): a 4-bit code per group on a fitted grid (symmetric or not). Level 2 (``lo``):
    a symmetric 4-bit code of the level-1 residual with its own scale per group, so level 2 adds
    only its own bytes whatever level 1 did. Each stage is rounded to nearest, or error-compensated
    (GPTQ) when its entry of ``hessians`` (level 1, level 2) is given.

    Returns:
        ``scales`` bf16 ``[G, out, 1|2]``, ``hi`` uint8 ``[out, Kp]``, ``lo_ratio`` uint8
        ``[G, out]``, ``lo`` uint8 ``[out, Kp]``, and the squared Frobenius errors of levels 1
        and 2 over the first ``columns`` columns (all by default).
    """
    out = rotated.shape[0]
    scale, zero, hi, residual = _level1_stage(rotated, group_size, symmetric, hessians[0])
    return _combine_stages(scale, zero, symmetric, hi, residual,
                           _level2_stage(residual, scale, group_size, hessians[1], columns), columns, out)


def _combine_stages(scale, zero, symmetric, hi, residual, level2, columns, out):
    """The stored fragments and errors of :func:`_quantize_groups` from its two stages."""
    ratio, lo, left = level2
    err4 = torch.linalg.vector_norm(residual.reshape(out, -1)[:, :columns]).item() ** 2
    err8 = torch.linalg.vector_norm(left.reshape(out, -1)[:, :columns]).item() ** 2
    return (_stored_scales(scale, zero, symmetric), hi.to(torch.uint8).view(out, -1),
            ratio.t().contiguous(), lo.to(torch.uint8).view(out, -1), err4, err8)


def _calibrated_stages(rotated: torch.Tensor, group_size: int, symmetric: bool, inputs: torch.Tensor,
                       columns: int | None):
    """Both stages of a calibrated weight, each GPTQ-rounded only where that measures better.

    Calibration fitted to one text can lose fidelity on another (MiniLM at 8.4 bits per weight:
    GPTQ on licence sentences measured cosine 0.9996 on other text, round-to-nearest 0.9998), so
    GPTQ is fitted on the first three quarters of the rows and judged on the last quarter, held
    out: of the four ways to round the two stages (nearest or GPTQ, each), the one with the lowest
    held-out level-1 output error is kept among those whose held-out output error is no higher
    than round-to-nearest's at *either* level (ties: lower level-2 error). With fewer than 8 rows
    nothing can be held out and the same rows judge.

    Args:
        rotated: the rotated weight ``[out, Kp]`` (not modified).
        group_size, symmetric: level 1's grid.
        inputs: the rotated calibration inputs ``[m, Kp]``.
        columns: real columns of an unrotated weight (its padding is not fitted), else None.

    Returns:
        ``(scale, zero, hi codes, level-1 residual, level-2 stage)`` as :func:`_level1_stage` and
        :func:`_level2_stage` give them.
    """
    rows = inputs.shape[0]
    split = rows - rows // 4 if rows >= 8 else rows
    fit, judge = inputs[:split], inputs[split:] if split < rows else inputs
    hessian = fit.t() @ fit
    out = rotated.shape[0]

    def held_out_error(left: torch.Tensor) -> float:
        return torch.linalg.vector_norm(judge @ left.reshape(out, -1).t()).item()

    best = None
    for level1_hessian in (None, hessian):
        scale, zero, hi, residual = _level1_stage(rotated, group_size, symmetric, level1_hessian)
        error1 = held_out_error(residual)
        for level2_hessian in (None, hessian):
            level2 = _level2_stage(residual, scale, group_size, level2_hessian, columns)
            errors = (error1, held_out_error(level2[2]))
            if best is None:
                plain = errors  # round-to-nearest at both levels comes first
            elif errors[0] > plain[0] or errors[1] > plain[1] or errors >= best[0]:
                continue
            best = (errors, (scale, zero, hi, residual, level2))
    return best[1]


#: Level 2's step is level 1's scale times ``2 ** (code / _RATIO_STEPS - _RATIO_OFFSET)`` for a
#: uint8 ``code`` per group: half the bytes of a bf16 scale, steps of 2.2 %, ratios 2^-8 .. 2^0.
_RATIO_STEPS, _RATIO_OFFSET = 32, 8


def _ratio_code(ratio: torch.Tensor) -> torch.Tensor:
    """uint8 codes of the nearest representable level-2/level-1 scale ratios."""
    logs = torch.log2(ratio.clamp_min(2.0 ** -_RATIO_OFFSET))
    return logs.add_(_RATIO_OFFSET).mul_(_RATIO_STEPS).round_().clamp_(0, 255).to(torch.uint8)


def _ratio_value(code: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.exp2(code.to(torch.float32) / _RATIO_STEPS - _RATIO_OFFSET).to(dtype)


def residual_scales(scales: torch.Tensor, lo_ratio: torch.Tensor) -> torch.Tensor:
    """Level 2's symmetric stage scales ``[G, out, 1]`` from level 1's scales and the ratio codes.

    Args:
        scales: level 1's stored scales ``[G, out, 1|2]`` (any float dtype; the result has it).
        lo_ratio: the ``lo_ratio`` fragment, ``uint8 [G, out]``.

    Returns:
        ``[G, out, 1]`` scales of the residual stage (``w₂ = (lo - 7.5)·scale₂``), a transient.
    """
    return (scales[..., 0] * _ratio_value(lo_ratio, scales.dtype)).unsqueeze(-1)


#: The smallest rank ``rank="auto"`` builds or tries.
_MIN_AUTO_RANK = 8


def _auto_rank(out: int, in_features: int) -> int:
    smallest = min(out, in_features)
    if smallest < 64:
        return 0
    return max(_MIN_AUTO_RANK, (smallest // 32) // 8 * 8)


def _low_rank(weight: torch.Tensor, rank: int, seed: int):
    """Balanced fp16 factors ``L [out, r]``, ``R [r, in]`` of the top-``rank`` SVD of ``weight``."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed + _RANK_SEED_OFFSET)
    try:
        u, s, v = torch.svd_lowrank(weight, q=min(rank + 8, *weight.shape), niter=2)
    finally:
        torch.random.set_rng_state(state)
    root = s[:rank].sqrt()
    left = (u[:, :rank] * root).to(torch.float16)
    right = (v[:, :rank] * root).t().to(torch.float16).contiguous()
    return left, right


def _exact_only(meta: dict, exact: torch.Tensor, calibrated: bool) -> tuple[dict, dict]:
    """(meta, fragments) of a tensor kept as one exact level."""
    meta = {key: meta[key] for key in ("shape", "dtype", "full_bytes")}
    meta.update(scheme="exact", fragments={"exact": {"level": 1, "kind": KIND_EXACT}},
                levels=[{"label": "exact", "bytes": meta["full_bytes"],
                         "fidelity": {"rel_error": 0.0, **({"out_rel_error": 0.0} if calibrated else {})}}])
    return meta, {"exact": exact}


def _check_calibration(calibration: object) -> None:
    if not isinstance(calibration, torch.Tensor) or not calibration.is_floating_point() or calibration.dim() < 1:
        raise InvalidRequestError(
            f"calibration must be a float tensor [..., in_features] of the layer's inputs, got "
            f"{type(calibration).__name__}{'' if not isinstance(calibration, torch.Tensor) else ' ' + str(calibration.dtype)}")
    if not bool(torch.isfinite(calibration).all()):
        raise InvalidRequestError(
            "calibration inputs contain NaN or inf; run the calibration in a dtype that does not "
            "overflow (e.g. fp32), drop the bad rows, or patch without calibration")


def _check_decode_target(dtype: object, device: object, default: torch.dtype) -> tuple[torch.dtype, torch.device]:
    if dtype is None:
        dtype = default
    elif not isinstance(dtype, torch.dtype) or not (dtype.is_floating_point or dtype == default):
        raise InvalidRequestError(f"dtype must be a floating torch.dtype (e.g. torch.float32) or None, got {dtype!r}")
    if device is None:
        return dtype, torch.device("cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise InvalidRequestError(f"device {device!r} is not a torch device ({exc}); pass e.g. 'cpu' or 'cuda:0'") from None
    if target.type == "cuda" and not (torch.cuda.is_available() and (target.index or 0) < torch.cuda.device_count()):
        raise InvalidRequestError(f"device {device!r} is not available on this machine; decode to 'cpu' or a CUDA "
                                  "device that exists")
    return dtype, target


def _expected_fragment_layout(meta: dict) -> dict[str, tuple[list[int], torch.dtype]]:
    if meta["scheme"] == "exact":
        return {"exact": (list(meta["shape"]), _dtype_from_name(meta["dtype"]))}
    if meta["scheme"] != "nested4x2":
        raise FormatError(f"unknown HoloTensor scheme {meta['scheme']!r}; upgrade torch_arbiter")
    out, padded, group = meta["shape"][0], meta["padded_features"], meta["group_size"]
    layout = {
        "signs": ([-(-padded // 8)], torch.uint8),
        "scales": ([padded // group, out, 1 if meta["symmetric"] else 2], torch.bfloat16),
        "hi": ([out, padded // 2], torch.uint8),
        "lo_ratio": ([padded // group, out], torch.uint8),
        "lo": ([out, padded // 2], torch.uint8),
        "exact": (list(meta["shape"]), _dtype_from_name(meta["dtype"])),
    }
    if meta.get("rank", 0):
        layout["rank_l"] = ([out, meta["rank"]], torch.float16)
        layout["rank_r"] = ([meta["rank"], meta["in_features"]], torch.float16)
    return layout


_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16,
    "int32": torch.int32, "int64": torch.int64, "bool": torch.bool,
}


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise InvalidRequestError(f"dtype {dtype} is not supported by the holo format; cast the tensor "
                                  f"to one of {sorted(_DTYPES)}")
    return name


def _dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise FormatError(f"unknown dtype {name!r} in holo metadata; re-convert the checkpoint") from None
