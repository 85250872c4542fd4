"""torch's int4 weight-only kernel for the Holo modules' quantised levels on CUDA.

A quantised level's codes are a uniform 4-bit grid per group, ``w = (q - 8)·scale + zero``: what
``torch.ops.aten._weight_int4pack_mm`` (tinygemm, CUDA sm80+) computes from its packed layout and
``[groups, out, 2]`` (scale, zero) pairs, the layout :func:`~torch_arbiter.holo.codec.kernel_scales`
already produces. Level 2 (8 bits) is two 4-bit stages of the same input, so its codes are packed
as one ``[out, 2·Kp]`` matrix (``hi`` then ``lo``) and the input is fed twice (``[x, x]``): one
kernel call for both stages, the layout of the int4 CPU path this package had before its C kernels.

The packed layout is made once per level change (:func:`pack`, by torch's own converter on the
device), in place of the nibble codes: the same bytes, so ``resident_bytes`` does not change.
Large batches decode it back (:func:`unpack`) for one bf16 matmul, which tinygemm does not beat
there. torch documents no inverse of its converter, so :func:`layout` finds the packed order of
one tile by packing probes through the converter and checks the round trip; where no such order
explains the converter's output the modules keep their nibble codes and the torch decode path.

CPU torch has the same kernel (``_convert_weight_to_int4pack_for_cpu`` /
``_weight_int4pack_mm_for_cpu``, another layout), so this module's numerics are tested on the CPU;
the Holo modules themselves use their C kernels there.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

__all__ = ["Layout", "available", "inner_k_tiles", "layout", "matmul", "pack", "supported", "unpack"]

#: Group sizes the kernel takes.
GROUPS = (32, 64, 128, 256)
_TILE_ROWS = (8, 16, 32, 64)  # the converter's row tile: 8 on CUDA, the CPU block (32 or 64)
_lock = threading.Lock()
_layouts: dict[tuple[str, int], "Layout | None"] = {}


@dataclass(frozen=True)
class Layout:
    """Where each code of a ``[rows, cols]`` tile sits in the packed bytes of that tile.

    Attributes:
        rows, cols: the tile; packed tiles follow each other in row-major tile order.
        order: ``int64 [rows·cols]``: the tile position (``r·cols + c``) of each packed nibble
            (low nibble of each byte first), on the device.
    """

    rows: int
    cols: int
    order: torch.Tensor


def _ops(device: torch.device):
    aten = torch.ops.aten
    if device.type == "cpu":
        return aten._convert_weight_to_int4pack_for_cpu, aten._weight_int4pack_mm_for_cpu
    return aten._convert_weight_to_int4pack, aten._weight_int4pack_mm


def available(device: torch.device) -> bool:
    """Whether torch's int4 kernel runs on ``device`` (CUDA: compute capability 8.0 or newer).

    Returns:
        False on a torch without the ops, or a GPU older than Ampere (the kernel uses bf16
        tensor cores); the modules then decode with torch ops.
    """
    if device.type == "cuda":
        if not (torch.cuda.is_available() and hasattr(torch.ops.aten, "_weight_int4pack_mm")):
            return False
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def inner_k_tiles(width: int) -> int:
    """The converter's ``innerKTiles`` for a code matrix ``width`` columns wide (0: none fits)."""
    return next((tiles for tiles in (8, 4, 2) if width % (tiles * 16) == 0), 0)


def supported(out_features: int, width: int, group_size: int) -> bool:
    """Whether an ``[out_features, width]`` code matrix in groups of ``group_size`` fits the kernel."""
    return out_features % 16 == 0 and group_size in GROUPS and inner_k_tiles(width) > 0


def pack(codes: torch.Tensor) -> torch.Tensor:
    """torch's packed layout of 4-bit ``codes`` (``uint8 [out, K]``, values 0..15, on the device).

    Args:
        codes: unpacked codes; :func:`supported` must hold for their shape.

    Returns:
        The converter's output (``K/2`` bytes per row however it is shaped), for :func:`matmul`.
    """
    convert, _ = _ops(codes.device)
    tiles = inner_k_tiles(codes.shape[1])
    if codes.device.type == "cpu":
        return convert(codes.to(torch.int32).contiguous(), tiles)
    # The CUDA converter reads two codes per byte, the even column in the high nibble.
    return convert(((codes[:, 0::2] << 4) | codes[:, 1::2]).contiguous(), tiles)


def matmul(x: torch.Tensor, packed: torch.Tensor, group_size: int, pairs: torch.Tensor) -> torch.Tensor:
    """``x · Wᵀ`` with ``W = (q - 8)·scale + zero`` read from the packed codes.

    Args:
        x: ``bf16 [rows, K]``.
        packed: from :func:`pack`.
        group_size: codes per (scale, zero) pair along K.
        pairs: ``bf16 [K/group_size, out, 2]``.

    Returns:
        ``bf16 [rows, out]``.
    """
    _, mm = _ops(x.device)
    return mm(x, packed, group_size, pairs)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Every 4-bit value of ``packed`` in memory order, low nibble of each byte first."""
    data = packed.contiguous().view(torch.uint8).reshape(-1)
    return torch.stack([data & 0x0F, data >> 4], dim=-1).reshape(-1)


def layout(device: torch.device, tiles: int) -> Layout | None:
    """The packed order of one tile for ``innerKTiles = tiles`` on ``device`` (found once, cached).

    Probes of two by two tiles whose codes spell each position's index within its tile, four
    bits at a time, are packed by torch's converter; a row tile is accepted when every packed
    tile spells the same permutation and random codes survive pack + :func:`unpack` exactly.

    Returns:
        The :class:`Layout`, or None when no row tile in 8/16/32/64 explains the converter's
        output (the modules then do not use the kernel).
    """
    key = (str(device), tiles)
    with _lock:
        if key not in _layouts:
            _layouts[key] = _find_layout(device, tiles)
        return _layouts[key]


def _find_layout(device: torch.device, tiles: int) -> Layout | None:
    cols = tiles * 16
    for rows in _TILE_ROWS:
        size = rows * cols
        r = torch.arange(2 * rows, device=device).view(-1, 1) % rows
        c = torch.arange(2 * cols, device=device).view(1, -1) % cols
        position = r * cols + c  # [2·rows, 2·cols]: the index within its tile
        spelled = torch.zeros(4 * size, dtype=torch.int64, device=device)
        try:
            for shift in range(0, max(1, (size - 1).bit_length()), 4):
                codes = ((position >> shift) & 0x0F).to(torch.uint8)
                spelled |= _nibbles(pack(codes)).to(torch.int64) << shift
        except RuntimeError:  # the converter refuses this shape
            continue
        per_tile = spelled.view(4, size)
        order = per_tile[0]
        if not (per_tile == order).all() or not torch.equal(order.sort().values, torch.arange(size, device=device)):
            continue
        found = Layout(rows, cols, order)
        sample = torch.randint(0, 16, (2 * rows, 2 * cols), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(0)).to(device)
        if torch.equal(unpack(pack(sample), 2 * rows, 2 * cols, found), sample):
            return found
    return None


def unpack(packed: torch.Tensor, out_features: int, width: int, found: Layout) -> torch.Tensor:
    """The codes ``uint8 [out_features, width]`` that :func:`pack` turned into ``packed``.

    Args:
        packed: from :func:`pack`.
        out_features, width: the code matrix's shape.
        found: the device's :func:`layout` for this width.

    Returns:
        A new tensor on ``packed``'s device (a transient: one byte per code).
    """
    tiles = _nibbles(packed).view(out_features // found.rows, width // found.cols, found.rows * found.cols)
    placed = torch.empty_like(tiles)
    placed[..., found.order] = tiles  # nibble s of a tile goes to position order[s]
    return placed.view(out_features // found.rows, width // found.cols, found.rows, found.cols).transpose(1, 2).reshape(
        out_features, width)
