"""Atomic file writes: a reader sees the old file or the new one, never a half-written one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(target: str | os.PathLike, data: bytes | str, mode: int | None = None) -> None:
    """Write ``data`` to ``target`` through a temporary file in the same directory and a rename.

    Args:
        target: the file to write (its directory must exist).
        data: bytes, or text written as UTF-8.
        mode: permission bits of the new file; None keeps the temporary file's 0600.

    Limits: no fsync (a crash may lose the new content, never leave a torn file); the rename
    replaces a file written concurrently by someone else.
    """
    target = Path(target)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(payload)
            if mode is not None:
                os.fchmod(out.fileno(), mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
