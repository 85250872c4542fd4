"""Holo checkpoints attached to a ``FragmentCache`` at run time, local or over HTTP.

The live path keys fragments by *content*, not by name: :func:`content_key` is the sha256 the
index already records, with the dtype and shape (two fragments with the same bytes but another
layout are different tensors). So the same tensor in two checkpoints, two pipelines or one
checkpoint loaded twice is one key, held once per tier.

A :class:`CheckpointSource` is one attached checkpoint: a local directory (read through
:class:`~torch_arbiter.holo.format.HoloCheckpoint`, one byte range per fragment, checksummed) or a
base URL (through :class:`~torch_arbiter.cache.remote.RemoteTier`: one Range request per fragment,
with its deadline and redirect rules). Either way the index is validated once on open, and side
files (``config.json``, tokenizer, pipeline configs) are read from the same place.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import CorruptFragmentError, FormatError
from ..holo.format import MAX_FRAGMENT_BYTES, MAX_INDEX_BYTES, HoloCheckpoint
from .config import CacheTier

__all__ = ["CheckpointSource", "content_key", "open_source", "SIDE_FILES_NAME", "MAX_SIDE_FILE_BYTES"]

#: The list of side files a converted checkpoint holds (path -> sha256), written by ``convert``
#: so a reader over HTTP knows what to fetch.
SIDE_FILES_NAME = "holo_files.json"
#: Largest side file read from a checkpoint (configs and tokenizers are a few MB).
MAX_SIDE_FILE_BYTES = 64 << 20


def content_key(entry: Mapping[str, Any]) -> str:
    """The cache key of a fragment from its index entry: ``sha256/dtype/shape``.

    Args:
        entry: a fragment entry of a holo index (``sha256``, ``dtype``, ``shape``).

    Returns:
        A string equal for every fragment with the same bytes, dtype and shape.
    """
    return f"{entry['sha256']}/{entry['dtype']}/{'x'.join(str(d) for d in entry['shape'])}"


class CheckpointSource:
    """One holo checkpoint a cache reads fragments from (never writes to).

    Attributes:
        location: the directory path or base URL, as given.
        tier: ``CacheTier.DISK`` for a directory, ``CacheTier.REMOTE`` for a URL.
        index: the validated index (``tensors``, ``fragments``, ``metadata``).
        keys: fragment id -> content key.
    """

    def __init__(self, location: str, tier: CacheTier, index: dict, reader: Any) -> None:
        """Use :func:`open_source`."""
        self.location = location
        self.tier = tier
        self.index = index
        self._reader = reader
        self.keys = {fid: content_key(entry) for fid, entry in index["fragments"].items()}

    @property
    def metadata(self) -> dict:
        """The writer's metadata (source, model config, tied names, ...)."""
        return self.index.get("metadata", {})

    def read_fragment(self, fid: str) -> torch.Tensor:
        """Read and verify one fragment.

        Raises:
            CorruptFragmentError: unreadable, short, or failing its checksum.
        """
        if self.tier is CacheTier.DISK:
            return self._reader.read_fragment(fid)
        return self._reader.read_source(fid)

    def read_side_file(self, name: str) -> bytes | None:
        """The bytes of a side file (``config.json``, ``unet/config.json``), or None if absent.

        Raises:
            CorruptFragmentError: the file exists but cannot be read (or fails the checksum the
                checkpoint's side-file list records for it).
        """
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise FormatError(f"side file name {name!r} leaves the checkpoint; the checkpoint is damaged")
        if self.tier is CacheTier.DISK:
            path = Path(self.location) / name
            if not path.is_file():
                return None
            with open(path, "rb") as handle:
                return handle.read(MAX_SIDE_FILE_BYTES)
        url = urllib.parse.urljoin(self._reader.base_url, urllib.parse.quote(name))
        try:
            return self._reader.fetch(url, MAX_SIDE_FILE_BYTES, what=f"side file {name}")
        except CorruptFragmentError as exc:
            if "HTTP 404" in str(exc):
                return None
            raise

    def side_files(self) -> list[str]:
        """The side files to fetch for a loader: the checkpoint's list, else the usual names."""
        raw = self.read_side_file(SIDE_FILES_NAME)
        if raw is not None:
            try:
                listed = json.loads(raw)
            except ValueError:
                raise FormatError(f"{self.location}: {SIDE_FILES_NAME} is not JSON; re-convert the checkpoint") from None
            if isinstance(listed, dict) and all(isinstance(k, str) for k in listed):
                return sorted(listed)
            raise FormatError(f"{self.location}: {SIDE_FILES_NAME} must map file names to checksums")
        return ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "model_index.json"]


def open_source(location: str | os.PathLike, *, timeout: float = 30.0, allow_insecure: bool = False,
                allow_cross_host_redirects: bool = False, max_index_bytes: int = MAX_INDEX_BYTES,
                max_fragment_bytes: int = MAX_FRAGMENT_BYTES) -> CheckpointSource:
    """Open a holo checkpoint directory or URL and validate its index.

    Args:
        location: a local directory, or an ``http(s)://`` base URL serving one.
        timeout, allow_insecure, allow_cross_host_redirects: the remote rules (see ``CacheConfig``).
        max_index_bytes, max_fragment_bytes: the index caps.

    Returns:
        The source.

    Raises:
        FormatError: not a holo checkpoint, or an invalid index.
        CorruptFragmentError: the URL cannot be fetched.
        InvalidRequestError: an insecure or malformed URL.
    """
    text = os.fspath(location)
    if text.startswith(("http://", "https://")):
        from .remote import RemoteTier

        remote = RemoteTier(text, timeout=timeout, allow_insecure=allow_insecure,
                            allow_cross_host_redirects=allow_cross_host_redirects,
                            max_index_bytes=max_index_bytes, max_fragment_bytes=max_fragment_bytes)
        return CheckpointSource(remote.base_url, CacheTier.REMOTE, remote.index, remote)
    checkpoint = HoloCheckpoint.open(text, max_index_bytes=max_index_bytes, max_fragment_bytes=max_fragment_bytes)
    return CheckpointSource(str(Path(text).resolve()), CacheTier.DISK, checkpoint.index, checkpoint)

