"""Load the allocator's C library through ctypes and declare its functions.

The library is built by the package build (``pip install -e .``) next to this
file as ``_arbiter_alloc<ext-suffix>``. It is a plain C shared object (no
Python module inside), loaded once per process: ctypes and
``CUDAPluggableAllocator`` both ``dlopen`` the same path, so they share one
copy of its globals and thread-locals. The structs mirror ``arbiter_alloc.h``.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

from .._native import built_library
from ..errors import AllocatorError

__all__ = [
    "ABI_VERSION",
    "ALLOC_SYMBOL",
    "FREE_SYMBOL",
    "UNLIMITED",
    "ExerciseResult",
    "Refusal",
    "Stats",
    "WorkloadInfo",
    "check",
    "library",
    "library_path",
]

ABI_VERSION = 1
ALLOC_SYMBOL = "torch_arbiter_alloc"
FREE_SYMBOL = "torch_arbiter_free"
UNLIMITED = (1 << 64) - 1

_HERE = Path(__file__).resolve().parent
_lock = threading.Lock()
_library: ctypes.CDLL | None = None


class WorkloadInfo(ctypes.Structure):
    """``ta_workload_info``: one workload's slot in a ledger."""

    _fields_ = [
        ("key", ctypes.c_uint64),
        ("limit", ctypes.c_uint64),
        ("used", ctypes.c_uint64),
        ("peak", ctypes.c_uint64),
        ("refused", ctypes.c_uint64),
        ("owner_pid", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
    ]


class Stats(ctypes.Structure):
    """``ta_stats``: this process's counters."""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "live_allocs",
            "live_bytes",
            "invalid_args",
            "unknown_frees",
            "refused",
            "backend_failures",
            "ledger_errors",
            "reaped_bytes",
        )
    ]


class Refusal(ctypes.Structure):
    """``ta_refusal``: the calling thread's last refused allocation."""

    _fields_ = [
        ("key", ctypes.c_uint64),
        ("requested", ctypes.c_uint64),
        ("used", ctypes.c_uint64),
        ("limit", ctypes.c_uint64),
        ("device", ctypes.c_int32),
        ("reason", ctypes.c_int32),
    ]


class ExerciseResult(ctypes.Structure):
    """``ta_exercise_result``: what one run of the C test/benchmark loop saw."""

    _fields_ = [
        ("successes", ctypes.c_uint64),
        ("refusals", ctypes.c_uint64),
        ("violations", ctypes.c_uint64),
        ("max_used_seen", ctypes.c_uint64),
        ("elapsed_ns", ctypes.c_int64),
    ]


_u64, _i32, _i64, _p = ctypes.c_uint64, ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
_SIGNATURES = {
    "torch_arbiter_alloc": (_p, [ctypes.c_ssize_t, _i32, _p]),
    "torch_arbiter_free": (None, [_p, ctypes.c_size_t, _i32, _p]),
    "torch_arbiter_abi_version": (_i32, []),
    "torch_arbiter_last_error": (ctypes.c_char_p, []),
    "torch_arbiter_last_refusal": (_i32, [ctypes.POINTER(Refusal)]),
    "torch_arbiter_clear_refusal": (None, []),
    "torch_arbiter_get_stats": (None, [ctypes.POINTER(Stats)]),
    "torch_arbiter_set_backend": (_i32, [_i32]),
    "torch_arbiter_backend": (_i32, []),
    "torch_arbiter_set_enforce": (_i32, [_i32]),
    "torch_arbiter_enforce": (_i32, []),
    "torch_arbiter_set_thread_workload": (_u64, [_u64]),
    "torch_arbiter_thread_workload": (_u64, []),
    "torch_arbiter_ledger_set_prefix": (_i32, [ctypes.c_char_p]),
    "torch_arbiter_ledger_name": (_i32, [_i32, ctypes.c_char_p, ctypes.c_size_t]),
    "torch_arbiter_ledger_attach": (_i32, [_i32]),
    "torch_arbiter_ledger_detach_all": (_i32, []),
    "torch_arbiter_ledger_unlink": (_i32, [_i32]),
    "torch_arbiter_ledger_set_limit": (_i32, [_i32, _u64, _u64]),
    "torch_arbiter_ledger_get": (_i32, [_i32, _u64, ctypes.POINTER(WorkloadInfo)]),
    "torch_arbiter_ledger_list": (_i32, [_i32, ctypes.POINTER(_u64), _i32]),
    "torch_arbiter_ledger_process_bytes": (
        _i32,
        [_i32, _u64, ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(_u64), _i32],
    ),
    "torch_arbiter_ledger_reap": (_i64, [_i32]),
    "torch_arbiter_ledger_remove": (_i32, [_i32, _u64]),
    "torch_arbiter_ledger_reclaim": (_i64, [_i32, _u64]),
    "torch_arbiter_exercise": (
        _i32,
        [_i32, _i32, _u64, ctypes.c_uint32, _u64, _u64, _u64, ctypes.POINTER(ExerciseResult)],
    ),
}


def library_path() -> str:
    """Path of the built allocator library (what ``CUDAPluggableAllocator`` loads).

    Returns:
        The absolute path of ``_arbiter_alloc<suffix>`` next to this package.

    Raises:
        AllocatorError: the library was not built; the message says how to build it.
    """
    path = built_library(_HERE, "_arbiter_alloc")
    if path is not None:
        return str(path)
    raise AllocatorError(
        f"the allocator library is not built in {_HERE}: run `pip install -e .` (or `make venv`) "
        "in the torch_arbiter checkout; it needs a C compiler, not CUDA"
    )


def library() -> ctypes.CDLL:
    """The loaded library, with every function's argument and return types declared.

    Returns:
        The ``ctypes.CDLL`` (loaded once per process).

    Raises:
        AllocatorError: not built, not loadable, or built from other sources than this Python
            side (ABI version mismatch: rebuild).
    """
    global _library
    with _lock:
        if _library is not None:
            return _library
        path = library_path()
        try:
            lib = ctypes.CDLL(path)
        except OSError as exc:
            raise AllocatorError(f"cannot load the allocator library {path}: {exc}; rebuild it with `pip install -e .`") from exc
        for name, (restype, argtypes) in _SIGNATURES.items():
            try:
                function = getattr(lib, name)
            except AttributeError as exc:
                raise AllocatorError(f"{path} lacks {name}: it is stale, rebuild it with `pip install -e .`") from exc
            function.restype = restype
            function.argtypes = argtypes
        if lib.torch_arbiter_abi_version() != ABI_VERSION:
            raise AllocatorError(
                f"{path} has ABI {lib.torch_arbiter_abi_version()}, this Python side expects {ABI_VERSION}: "
                "rebuild it with `pip install -e .`"
            )
        _library = lib
        return lib


def check(rc: int, what: str) -> int:
    """Turn a negative return code of the library into an :class:`AllocatorError`.

    Args:
        rc: the function's return value (negative errno on failure).
        what: what was being done, for the message.

    Returns:
        ``rc`` when it is not an error.

    Raises:
        AllocatorError: ``rc < 0``; the message carries the library's own explanation.
    """
    if rc >= 0:
        return rc
    detail = (library().torch_arbiter_last_error() or b"").decode(errors="replace")
    raise AllocatorError(f"{what} failed ({os.strerror(-rc)}): {detail or 'no detail'}")
