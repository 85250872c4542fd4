"""The DISK tier: a read-only holo checkpoint plus a writable spill directory.

The holo checkpoint (``CacheConfig.holo_dir``) is the original: its fragments are read one byte
range at a time through ``HoloCheckpoint.read_fragment`` (which verifies each checksum) and are
never written or deleted. Fragments demoted to DISK that the checkpoint does not hold go to the
spill directory, one safetensors file per fragment, written to a temporary name, flushed and
renamed, so a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import CorruptFragmentError
from ..holo.format import MAX_FRAGMENT_BYTES, MAX_INDEX_BYTES, HoloCheckpoint
from .base import TierStore, tensor_nbytes
from .config import CacheTier

__all__ = ["DiskTier", "tensor_sha256"]

_SPILL_SUFFIX = ".safetensors"
_SPILL_TENSOR = "fragment"


def tensor_sha256(tensor: torch.Tensor) -> str:
    """Hex sha256 of a tensor's element bytes (native byte order, row-major)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()


class DiskTier(TierStore):
    """Fragments on local disk.

    Args:
        spill_dir: writable directory for spilled fragments; ``None`` makes a private temporary
            directory that ``close()`` removes. An existing directory is kept and the fragments
            already in it (from an earlier cache) are served again.
        holo_dir: a holo checkpoint directory served read-only, or ``None``.
        max_index_bytes, max_fragment_bytes: the checkpoint's caps (see ``HoloCheckpoint.open``).

    Limits: spill file names are the sha256 of the key, so any string key works; a spill file
    whose checksum fails is reported (``CorruptFragmentError``), never silently deleted.
    """

    tier = CacheTier.DISK

    def __init__(self, spill_dir: str | os.PathLike | None = None, holo_dir: str | os.PathLike | None = None,
                 *, max_index_bytes: int = MAX_INDEX_BYTES, max_fragment_bytes: int = MAX_FRAGMENT_BYTES) -> None:
        # open the checkpoint first: if it is invalid, no temporary directory is left behind
        self.checkpoint = (HoloCheckpoint.open(holo_dir, max_index_bytes=max_index_bytes,
                                               max_fragment_bytes=max_fragment_bytes)
                           if holo_dir is not None else None)
        self._owns_spill_dir = spill_dir is None
        self.spill_dir = Path(tempfile.mkdtemp(prefix="torch-arbiter-spill-")) if spill_dir is None else Path(spill_dir)
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        self._source_ids = frozenset(self.checkpoint.fragment_ids()) if self.checkpoint is not None else frozenset()

    def _spill_path(self, key: str) -> Path:
        return self.spill_dir / (hashlib.sha256(key.encode("utf-8")).hexdigest() + _SPILL_SUFFIX)

    def read(self, key: str) -> torch.Tensor:
        path = self._spill_path(key)
        if path.exists():
            return _read_spill_file(path, key)
        return self.read_source(key)

    def write(self, key: str, tensor: torch.Tensor) -> int:
        tensor = tensor.detach().to("cpu").contiguous()
        path = self._spill_path(key)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        metadata = {"key": key, "sha256": tensor_sha256(tensor), "nbytes": str(tensor_nbytes(tensor))}
        try:
            save_file({_SPILL_TENSOR: tensor}, str(temporary), metadata=metadata)
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        return tensor_nbytes(tensor)

    def delete(self, key: str) -> None:
        self._spill_path(key).unlink(missing_ok=True)

    def read_source(self, key: str) -> torch.Tensor:
        if key not in self._source_ids:
            raise KeyError(key)
        return self.checkpoint.read_fragment(key)

    def source_has(self, key: str) -> bool:
        return key in self._source_ids

    def source_keys(self) -> Iterable[str]:
        return self._source_ids

    def existing_copies(self) -> dict[str, int]:
        """Fragments spilled here before (key → bytes); unreadable files are left alone."""
        found = {}
        for path in sorted(self.spill_dir.glob("*" + _SPILL_SUFFIX)):
            try:
                with safe_open(str(path), framework="pt") as handle:
                    metadata = handle.metadata() or {}
                key, nbytes = metadata["key"], int(metadata["nbytes"])
            except (SafetensorError, OSError, KeyError, ValueError):
                continue
            if path == self._spill_path(key):
                found[key] = nbytes
        return found

    def close(self) -> None:
        if self._owns_spill_dir:
            shutil.rmtree(self.spill_dir, ignore_errors=True)


def _read_spill_file(path: Path, key: str) -> torch.Tensor:
    """Load one spilled fragment and check it against the checksum written with it."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            expected = (handle.metadata() or {}).get("sha256")
            tensor = handle.get_tensor(_SPILL_TENSOR)
    except (SafetensorError, OSError) as exc:
        raise CorruptFragmentError(
            f"spilled fragment {key!r} in {path} cannot be read ({exc}); "
            "the file is damaged: put the fragment into the cache again from its source"
        ) from None
    if expected is None or tensor_sha256(tensor) != expected:
        raise CorruptFragmentError(
            f"spilled fragment {key!r} in {path} fails its sha256 check; "
            "the file is damaged: put the fragment into the cache again from its source"
        )
    return tensor
