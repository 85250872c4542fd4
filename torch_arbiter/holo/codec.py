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
   With ``rotate="auto"`` the encoder measures level 1 with and without the rotation (same bytes)
   and keeps the lower weight error: weights already on a 4-bit grid of the same groups (a
   dequantised GGUF) quantise better unrotated. Unrotated tensors record ``block`` 1 and
   all-plus signs, so every reader treats both alike.
2. *Nested 8-bit code per group* of ``group_size`` (64 by default) along the rotated input
   dimension. Level 1 is a 4-bit asymmetric round-to-nearest code (``hi`` nibble) with a scale and
   zero per group, stored in bf16 in exactly the ``[K/g, out, 2]`` layout of torch's int4 weight-only
   kernels (``w = (q - 8) * scale + zero``), so the fragment *is* the resident form. Level 2 adds
   the ``lo`` nibble, a 4-bit code of the level-1 residual on a step of ``scale / 16``; together
   ``hi·16 + lo`` is one uniform 8-bit code (step ``range / 240``), so level 2 moves only the ``lo``
   bytes and needs no new scales. Bits per weight: 4 + 32/g (4.5 at g=64) and 8 + 32/g (8.5).
3. *Rank fragments* (SVDQuant-style): optionally a rank-``r`` fp16 branch ``L·R`` taken from the
   top singular vectors of ``W`` before quantisation, so the quantised part is ``W - L·R``. The
   encoder builds it per tensor and keeps it only when it *measures* better per byte: its level-1
   error must fall by more than the same bytes would buy as extra precision (a factor 2 per extra
   bit per weight). When kept, the rank fragments belong to level 1 and every quantised level
   uses them.
4. *Exact top level*: the original tensor, bit for bit, in its original dtype. It is not a delta
   over the quantised levels (an exact level over a rotated quantiser is not a cheap residual), so
   stepping to the top moves the original bytes and drops the quantised fragments from residence.

Tensors not worth encoding (fewer than 2 dims, fewer than ``min_numel`` elements, non-float) get a
single exact level. Every level records its exact resident bytes and its measured fidelity
(``rel_error`` = ‖W - Ŵ‖/‖W‖; ``out_rel_error`` = ‖X(W - Ŵ)ᵀ‖/‖XWᵀ‖ when calibration inputs are
given). Fragments are plain tensors (``uint8`` nibbles, ``int8`` signs, ``bfloat16`` scales,
``float16`` rank factors, the original dtype for ``exact``) so they store as safetensors.

Limits: the 4-bit level is round-to-nearest (no GPTQ-style error feedback); bf16 scales cost a
little precision at level 2 (measured, and recorded in the fidelity).
"""

from __future__ import annotations

import math
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
    "dequantize_rotated",
    "dequantize_codes",
]

_MAX_BLOCK = 256
_LEVEL_INT4, _LEVEL_INT8 = 1, 2
_RANK_SEED_OFFSET = 0x5EED

#: Fragment kinds recorded in the index: how a fragment refines its tensor.
KIND_PRECISION = "precision"
KIND_RANK = "rank"
KIND_EXACT = "exact"

_hadamard_cache: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}


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


def rotate_input(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """Apply the incoherence rotation ``(x ⊙ s) · H`` along the last dimension, blockwise.

    The same function rotates a weight (rows are output channels) at encode time and a layer's
    input activations at forward time; it is its own inverse up to the sign flip (see
    :func:`unrotate`).

    Args:
        x: ``[..., Kp]`` tensor, float.
        signs: ``[Kp]`` of +-1 (any dtype; cast to ``x``'s).
        block: Hadamard block size dividing ``Kp``.

    Returns:
        The rotated tensor, same shape and dtype as ``x``.
    """
    flipped = x * signs.to(x.dtype)
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
    return x * signs.to(x.dtype)


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
                fragments are all present can be decoded).
        """
        self.meta = meta
        self.fragments = dict(fragments)

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
        """``"nested4x2"`` (rotated nested 4+4-bit code) or ``"exact"`` (stored as is)."""
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
        if k == 0:
            return []
        if k == self.num_levels:
            return ["exact"]
        return [s.name for s in self.fragment_specs() if s.level <= k and s.kind != KIND_EXACT]

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

    def __repr__(self) -> str:
        levels = ", ".join(
            f"{lv['label']}:{lv['bytes'] * 8 / max(1, self._numel()):.2f}bpw"
            f"/err={lv['fidelity']['rel_error']:.2e}" for lv in self.meta["levels"])
        return f"HoloTensor({tuple(self.shape)}, {self.meta['dtype']}, {self.scheme}, [{levels}])"

    # -- encode --------------------------------------------------------------------------------

    @classmethod
    def encode(cls, tensor: torch.Tensor, *, group_size: int = 64, rank: int | str = "auto",
               rotate: bool | str = True, seed: int = 0, min_numel: int = 4096,
               calibration: torch.Tensor | None = None) -> "HoloTensor":
        """Encode a weight into nested levels.

        Args:
            tensor: the weight (any device; work happens in fp32 on its device, fragments end on
                the CPU). Conv weights ``[out, in, kh, kw]`` are read as ``[out, in*kh*kw]``.
                A contiguous CPU tensor becomes the ``exact`` fragment without a copy: do not
                modify it in place afterwards.
            group_size: weights per (scale, zero) group along the input dimension, a multiple of
                2 (32, 64, 128, 256 keep torch's int4 kernels usable).
            rank: ``"auto"`` (build a low-rank branch and keep it only if it measures better per
                byte), ``0`` (never), or a positive rank to force.
            rotate: ``True`` (default), ``False``, or ``"auto"``: rotate unless quantising
                unrotated measures a lower level-1 weight error (weights already on a 4-bit grid
                of the same groups). Same bytes either way. Not the default because a lower weight
                error unrotated did not mean a better model: on SmolLM2 (g64) ``"auto"`` measured
                +49 % perplexity at level 1 against +36 % always rotated.
            seed: seed of the random signs of the rotation.
            min_numel: tensors smaller than this are kept exact only.
            calibration: optional ``[m, K]`` input activations of the layer; then every level
                also records ``out_rel_error`` (and the planner weighs by it).

        Returns:
            A :class:`HoloTensor` whose fragments are on the CPU.

        Raises:
            InvalidRequestError: bad ``group_size``/``rank``, or calibration of the wrong width.
        """
        if not isinstance(tensor, torch.Tensor):
            raise InvalidRequestError(f"HoloTensor.encode needs a torch.Tensor, got {type(tensor).__name__}")
        if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
            raise InvalidRequestError(f"group_size must be an even int >= 2, got {group_size!r}")
        if not (rank == "auto" or (isinstance(rank, int) and rank >= 0)):
            raise InvalidRequestError(f"rank must be 'auto' or an int >= 0, got {rank!r}")
        if rotate not in ("auto", True, False):
            raise InvalidRequestError(f"rotate must be 'auto', True or False, got {rotate!r}")
        original = tensor.detach()
        meta = {
            "shape": list(original.shape),
            "dtype": _dtype_name(original.dtype),
            "full_bytes": original.numel() * original.element_size(),
        }
        # The exact level shares the caller's CPU storage (no second copy of every weight); the
        # Holo modules replace the layer that owned it, so nothing else writes to it.
        exact = original.to("cpu").contiguous()
        if (original.dim() < 2 or original.numel() < min_numel or not original.is_floating_point()
                or original.shape[0] < 2):
            meta.update(scheme="exact", fragments={"exact": {"level": 1, "kind": KIND_EXACT}},
                        levels=[{"label": "exact", "bytes": meta["full_bytes"],
                                 "fidelity": {"rel_error": 0.0, **({"out_rel_error": 0.0}
                                                                  if calibration is not None else {})}}])
            return cls(meta, {"exact": exact})
        return cls(*_encode_nested(original, exact, meta, group_size, rank, rotate, seed, calibration))

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
            InvalidRequestError: ``k`` out of range (level 0 has no weight to decode).
            FormatError: a fragment that level needs is missing.
        """
        self._check_level(k)
        if k == 0:
            raise InvalidRequestError("level 0 holds nothing to decode; decode a level >= 1")
        dtype = dtype or self.dtype
        device = torch.device(device) if device is not None else torch.device("cpu")
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
        frags: at least ``scales``, ``hi`` (and ``lo`` for level 2), on the target device.
        meta: the tensor's meta.
        k: 1 (4-bit) or 2 (8-bit).
        dtype: compute/result dtype.

    Returns:
        ``[out, Kp]`` tensor in ``dtype``.
    """
    lo = unpack_nibbles(frags["lo"]) if k >= _LEVEL_INT8 else None
    return dequantize_codes(unpack_nibbles(frags["hi"]), lo, frags["scales"], meta["group_size"], dtype)


def dequantize_codes(hi: torch.Tensor, lo: torch.Tensor | None, scales: torch.Tensor, group_size: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """Values of the nested code from unpacked codes.

    Args:
        hi: ``uint8 [out, Kp]`` 4-bit codes of level 1.
        lo: ``uint8 [out, Kp]`` refining codes of level 2, or None for level 1.
        scales: ``[Kp/group_size, out, 2]`` (scale, zero) per group, torch's int4 convention.
        group_size: weights per group.
        dtype: compute/result dtype.

    Returns:
        ``[out, Kp]``: ``(hi - 8)·scale + zero (+ (lo - 7.5)·scale/16)``.
    """
    out = hi.shape[0]
    scales = scales.to(dtype)
    scale = scales[..., 0].t().unsqueeze(-1)
    zero = scales[..., 1].t().unsqueeze(-1)
    # Folded into one multiply-add per pass: (hi - 8)·s + z = hi·s + (z - 8s), (lo - 7.5)·s/16 likewise.
    offset = zero - 8 * scale
    if lo is not None:
        fine = scale / 16
        offset = offset - 7.5 * fine
        values = torch.addcmul(offset, lo.view(out, -1, group_size).to(dtype), fine)
        values.addcmul_(hi.view(out, -1, group_size).to(dtype), scale)
    else:
        values = torch.addcmul(offset, hi.view(out, -1, group_size).to(dtype), scale)
    return values.reshape(out, -1)


def _encode_nested(original: torch.Tensor, exact: torch.Tensor, meta: dict, group_size: int,
                   rank: int | str, rotate: bool | str, seed: int, calibration: torch.Tensor | None):
    weight = original.reshape(original.shape[0], -1).float()
    out, in_features = weight.shape
    padded = -(-in_features // group_size) * group_size
    block = _largest_block(padded)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    signs = (torch.randint(0, 2, (padded,), generator=generator, dtype=torch.int8) * 2 - 1)
    signs_dev = signs.to(weight.device)
    calib = None
    if calibration is not None:
        calib = calibration.detach().reshape(-1, calibration.shape[-1]).to(weight.device, torch.float32)
        if calib.shape[-1] != in_features:
            raise InvalidRequestError(
                f"calibration inputs have width {calib.shape[-1]}, the weight expects {in_features}; "
                "pass the layer's own input activations")
    weight_norm = torch.linalg.vector_norm(weight).item() or 1.0

    identity = torch.ones(padded, dtype=torch.int8)

    def rotated(matrix: torch.Tensor, turn: bool) -> torch.Tensor:
        """A new [rows, Kp] tensor (quantisation consumes it; never the caller's weight)."""
        if padded != in_features:
            matrix = torch.nn.functional.pad(matrix, (0, padded - in_features))
        elif not turn:
            return matrix.clone()
        return rotate_input(matrix, signs_dev, block) if turn else matrix

    r, left, right = 0, None, None
    if rank != 0:
        r = _auto_rank(out, in_features) if rank == "auto" else min(rank, out, in_features)
    if r:
        left, right = _low_rank(weight, r, seed)
    turn = rotate is not False
    if rotate == "auto" or (rank == "auto" and r):
        # Decide on a row sample (groups are row-local, so the error estimate is unbiased).
        rows = torch.arange(0, out, max(1, out // 2048), device=weight.device)
        sample = weight[rows]
        if rotate == "auto":  # same bytes either way: keep whichever measures lower error
            turn = _quantize_groups(rotated(sample, True), group_size)[3] <= \
                _quantize_groups(rotated(sample, False), group_size)[3]
        if rank == "auto" and r:
            # Keep the rank branch only if it beats spending its bytes on precision (1 bit = 2x error).
            plain_err = _quantize_groups(rotated(sample, turn), group_size)[3]
            rank_err = _quantize_groups(rotated(sample - left[rows].float() @ right.float(), turn), group_size)[3]
            extra_bits = r * (out + in_features) * 2 * 8 / (out * padded)
            if not rank_err < plain_err * 4.0 ** (-extra_bits):  # squared errors: 4x per bit
                r, left, right = 0, None, None
    if not turn:
        signs, signs_dev, block = identity, identity.to(weight.device), 1
    target = weight - left.float() @ right.float() if r else weight
    scales, hi, lo, err4, err8 = _quantize_groups(rotated(target, turn), group_size)
    del target

    fragments = {"signs": signs, "scales": scales.cpu(), "hi": pack_nibbles(hi).cpu()}
    specs = {"signs": (_LEVEL_INT4, KIND_PRECISION), "scales": (_LEVEL_INT4, KIND_PRECISION),
             "hi": (_LEVEL_INT4, KIND_PRECISION)}
    if r:
        fragments["rank_l"], fragments["rank_r"] = left.cpu(), right.cpu()
        specs["rank_l"] = specs["rank_r"] = (_LEVEL_INT4, KIND_RANK)
    fragments["lo"] = pack_nibbles(lo).cpu()
    specs["lo"] = (_LEVEL_INT8, KIND_PRECISION)
    fragments["exact"] = exact
    specs["exact"] = (3, KIND_EXACT)

    # The rotation is orthonormal, so errors are measured in the rotated space; padded columns carry
    # error there that never reaches the output, so with padding this slightly over-reports.
    fidelity = [{"rel_error": math.sqrt(e) / weight_norm} for e in (err4, err8)]
    if calib is not None:
        rotated_x = rotated(calib, turn)
        reference = torch.linalg.vector_norm(calib @ weight.t()).item() or 1.0
        target_out = rotated_x @ rotated(weight, turn).t()
        for fid, lo_codes in zip(fidelity, (None, lo)):
            approx = dequantize_codes(hi, lo_codes, scales, group_size, torch.float32)
            approx_out = rotated_x @ approx.t()
            if r:
                approx_out += (calib @ right.float().t()) @ left.float().t()
            fid["out_rel_error"] = torch.linalg.vector_norm(approx_out - target_out).item() / reference
    meta.update(
        scheme="nested4x2", in_features=in_features, padded_features=padded, group_size=group_size,
        block=block, rotated=turn, seed=seed, rank=r,
        fragments={name: {"level": level, "kind": kind} for name, (level, kind) in specs.items()},
    )
    level1 = sum(fragments[n].numel() * fragments[n].element_size()
                 for n, (lv, kind) in specs.items() if lv == _LEVEL_INT4)
    level2 = level1 + fragments["lo"].numel()
    meta["levels"] = [
        {"label": "int4", "bytes": level1, "fidelity": fidelity[0]},
        {"label": "int8", "bytes": level2, "fidelity": fidelity[1]},
        {"label": "exact", "bytes": meta["full_bytes"],
         "fidelity": {"rel_error": 0.0, **({"out_rel_error": 0.0} if calib is not None else {})}},
    ]
    return meta, fragments


def _quantize_groups(rotated: torch.Tensor, group_size: int):
    """Nested 4+4-bit code of ``rotated [out, Kp]`` (consumed: modified in place).

    Returns:
        bf16 scales ``[G, out, 2]``, ``hi`` and ``lo`` codes ``uint8 [out, Kp]``, and the squared
        Frobenius errors of levels 1 and 2.
    """
    out = rotated.shape[0]
    groups = rotated.view(out, -1, group_size)
    low, high = torch.aminmax(groups, dim=-1)
    zero = (low + (high - low) * (8 / 15)).to(torch.bfloat16).float()
    # Grid zero + (q - 8) * scale, q in 0..15, must cover [low, high] with the rounded zero.
    scale = torch.maximum((zero - low) / 8, (high - zero) / 7)
    scale = _round_up_bf16(torch.clamp_min(scale, 1e-30)).float()
    base = (zero - 8 * scale).unsqueeze(-1)
    step = scale.unsqueeze(-1)
    hi = torch.sub(groups, base).div_(step).round_().clamp_(0, 15)
    residual = groups.sub_(hi.mul(step).add_(base))  # groups now holds w - dec4
    err4 = torch.linalg.vector_norm(residual).item() ** 2
    fine = step / 16
    lo = torch.div(residual, fine).add_(7.5).round_().clamp_(0, 15)
    residual.sub_(lo.sub(7.5).mul_(fine))
    err8 = torch.linalg.vector_norm(residual).item() ** 2
    scales = torch.stack([scale, zero], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()
    return (scales, hi.to(torch.uint8).view(out, -1), lo.to(torch.uint8).view(out, -1), err4, err8)


def _auto_rank(out: int, in_features: int) -> int:
    smallest = min(out, in_features)
    if smallest < 64:
        return 0
    return max(8, (smallest // 32) // 8 * 8)


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


def _expected_fragment_layout(meta: dict) -> dict[str, tuple[list[int], torch.dtype]]:
    if meta["scheme"] == "exact":
        return {"exact": (list(meta["shape"]), _dtype_from_name(meta["dtype"]))}
    if meta["scheme"] != "nested4x2":
        raise FormatError(f"unknown HoloTensor scheme {meta['scheme']!r}; upgrade torch_arbiter")
    out, padded, group = meta["shape"][0], meta["padded_features"], meta["group_size"]
    layout = {
        "signs": ([padded], torch.int8),
        "scales": ([padded // group, out, 2], torch.bfloat16),
        "hi": ([out, padded // 2], torch.uint8),
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
