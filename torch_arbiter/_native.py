"""Where the package's C shared objects are built (one place for the allocator and the kernels)."""

from __future__ import annotations

import importlib.machinery
from pathlib import Path

__all__ = ["built_library"]


def built_library(directory: Path, stem: str) -> Path | None:
    """The shared object ``stem<extension suffix>`` that ``pip install -e .`` built in ``directory``.

    Args:
        directory: the package folder the build writes the file into.
        stem: the file name without the suffix (``_arbiter_alloc``, ``_holo_kernels``).

    Returns:
        Its path, or None when it was not built (no C compiler at install time, or a source tree
        used without installing).
    """
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = directory / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None
