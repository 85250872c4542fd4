"""ctypes binding of ``holo_kernels.c``: the CPU kernels of the Holo modules' quantised levels.

The library is a plain C shared object built by ``pip install -e .`` next to this file (no torch
headers, so it works with any torch >= 2.6 and builds in seconds). It reads the fragments in
place through their ``data_ptr``; ctypes releases the GIL for each call, so a forward running in
one thread does not stall another. When it is missing or the CPU lacks AVX2+FMA,
:func:`available` is False and the modules keep their torch decode path.

Limits: CPU tensors only; group sizes that are multiples of 32 (the encoder's ``"auto"`` picks
32, 64 or 128); one thread per call.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import torch

from .._native import built_library

__all__ = ["Codes", "available", "codes_for", "decode_rows", "linear", "rotate_rows", "weight_rows"]

_ABI_VERSION = 2
_CODE_BLOCK = 32
#: ta_linear's shape needs: Kp a multiple of its 64-code blocks, out a multiple of its 8-row chunks.
_FUSED_BLOCK, _FUSED_COLUMNS = 64, 8
_lock = threading.Lock()
_state: dict[str, ctypes.CDLL | None] = {}


class Codes(ctypes.Structure):
    """``ta_codes``: one level's fragments as the kernels read them (pointers into ``tensors``)."""

    _fields_ = [
        ("out_features", ctypes.c_int64),
        ("in_features", ctypes.c_int64),
        ("padded", ctypes.c_int64),
        ("group_size", ctypes.c_int64),
        ("hi", ctypes.c_void_p),
        ("lo", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("pairs", ctypes.c_int64),
        ("lo_ratio", ctypes.c_void_p),
        ("signs", ctypes.c_void_p),
        ("block", ctypes.c_int64),
    ]


_p, _i64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "ta_linear": (ctypes.c_int, [ctypes.POINTER(Codes), _p, _i64, _p]),
    "ta_decode_rows": (None, [ctypes.POINTER(Codes), _i64, _i64, _p]),
    "ta_weight_rows": (ctypes.c_int, [ctypes.POINTER(Codes), _p, _i64, _i64, _p]),
    "ta_rotate_rows": (None, [_p, _i64, _i64, _p, _i64, _i64, _p]),
}


def _library() -> ctypes.CDLL | None:
    with _lock:
        if "lib" not in _state:
            _state["lib"] = _load(built_library(Path(__file__).resolve().parent, "_holo_kernels"))
        return _state["lib"]


def _load(path: Path | None) -> ctypes.CDLL | None:
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    # ta_isa() also fills the kernels' constant table, so it must run before any kernel; on other
    # CPUs the library exports nothing else.
    if lib.ta_abi_version() != _ABI_VERSION or lib.ta_isa() == 0:
        return None
    for name, (restype, argtypes) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib


def available() -> bool:
    """Whether the CPU kernels can run here (built, same ABI, AVX2+FMA CPU).

    Returns:
        False means the Holo modules decode with torch ops instead (slower, same values up to
        fp32 rounding).
    """
    return _library() is not None


def codes_for(resident: dict[str, torch.Tensor], meta: dict, level: int) -> Codes | None:
    """The kernels' view of a quantised level's resident fragments, or None when they cannot run it.

    Args:
        resident: the level's fragments (``hi``, ``scales``; ``lo``, ``lo_ratio`` at level 2).
        meta: the HoloTensor's meta.
        level: 1 or 2.

    Returns:
        A :class:`Codes` holding references to the tensors it points into (valid as long as it
        is; ``fused`` says whether :func:`linear` takes its shape), or None: kernels unavailable,
        tensors not on the CPU, or a group size the kernels do not take.
    """
    if not available() or meta["group_size"] % _CODE_BLOCK or resident["hi"].device.type != "cpu":
        return None
    names = ["hi", "scales", "signs"] + (["lo", "lo_ratio"] if level >= 2 else [])
    tensors = {name: resident[name].contiguous() for name in names}
    out_features, padded = int(resident["hi"].shape[0]), int(meta["padded_features"])
    codes = Codes(out_features, int(meta["in_features"]), padded, int(meta["group_size"]),
                  tensors["hi"].data_ptr(), tensors["lo"].data_ptr() if level >= 2 else None,
                  tensors["scales"].data_ptr(), int(tensors["scales"].shape[-1]),
                  tensors["lo_ratio"].data_ptr() if level >= 2 else None,
                  tensors["signs"].data_ptr(), int(meta["block"]))
    codes.tensors = tensors
    codes.fused = padded % _FUSED_BLOCK == 0 and out_features % _FUSED_COLUMNS == 0
    return codes


def rotate_rows(x: torch.Tensor, signs: torch.Tensor, padded: int, block: int) -> torch.Tensor:
    """``(x ⊙ s)·H`` blockwise on ``x`` zero-padded to ``padded`` columns (as ``rotate_input``).

    Args:
        x: ``[rows, K]`` fp32 CPU tensor.
        signs: the ``signs`` fragment (``uint8 [ceil(padded/8)]`` sign bits).
        padded: ``Kp``.
        block: the Hadamard block (1: signs only).

    Returns:
        A new ``[rows, padded]`` fp32 tensor.
    """
    x = x.contiguous()
    out = torch.empty(x.shape[0], padded, dtype=torch.float32)
    _library().ta_rotate_rows(x.data_ptr(), x.shape[0], x.shape[1], signs.data_ptr(), padded, block,
                              out.data_ptr())
    return out


def linear(codes: Codes, x: torch.Tensor) -> torch.Tensor:
    """``rot(x) · W_levelᵀ`` reading the codes in place (rotation included).

    Args:
        codes: from :func:`codes_for`, with ``codes.fused`` true.
        x: input rows ``[rows, in_features]``, contiguous fp32 CPU.

    Returns:
        ``[rows, out_features]`` fp32. The input is rounded to int16 per run of 32 rotated values
        (a relative error of at most 2^-16 of the run's largest value). Its cost grows with
        ``rows`` times the weight: for many rows decode with :func:`decode_rows` and use a matmul.

    Raises:
        MemoryError: the kernel could not allocate its scratch (about ``rows·Kp·2`` bytes).
    """
    out = torch.empty(x.shape[0], codes.out_features, dtype=torch.float32)
    if _library().ta_linear(ctypes.byref(codes), x.data_ptr(), x.shape[0], out.data_ptr()):
        raise MemoryError(f"ta_linear could not allocate scratch for {x.shape[0]} rows")
    return out


def decode_rows(codes: Codes, first: int = 0, count: int | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``first .. first+count-1`` of the rotated weight ``W_level`` (``[count, Kp]`` fp32).

    Args:
        codes: from :func:`codes_for`.
        first: first row.
        count: rows (default: all from ``first``).
        out: a contiguous fp32 tensor with room for the rows (reused between chunks); default a
            new one.

    Returns:
        The decoded rows (a view of ``out`` when given).
    """
    rows = codes.out_features - first if count is None else count
    if out is None:
        out = torch.empty(rows, codes.padded, dtype=torch.float32)
    target = out.view(-1)[: rows * codes.padded].view(rows, codes.padded)
    _library().ta_decode_rows(ctypes.byref(codes), first, rows, target.data_ptr())
    return target


def weight_rows(codes: Codes, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of ``W_level`` itself, un-rotated: an embedding lookup, or a conv's whole weight.

    Args:
        codes: from :func:`codes_for`.
        ids: row indices (any integer tensor); None for every row.

    Returns:
        ``[rows, in_features]`` fp32 (no rank branch).

    Raises:
        IndexError: an id is outside ``0 .. out_features-1`` (as ``F.embedding`` does).
    """
    index = None if ids is None else ids.reshape(-1).to(torch.int64).contiguous()
    rows = codes.out_features if index is None else index.numel()
    out = torch.empty(rows, codes.in_features, dtype=torch.float32)
    if _library().ta_weight_rows(ctypes.byref(codes), None if index is None else index.data_ptr(), 0, rows,
                                 out.data_ptr()):
        raise IndexError(f"index out of range: ids must be in 0..{codes.out_features - 1}")
    return out
