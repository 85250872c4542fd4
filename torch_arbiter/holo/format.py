"""The holo checkpoint: a directory with a versioned JSON index and safetensors files.

Layout of ``DST/``::

    holo_index.json          the index (below)
    fragments-00000.safetensors, fragments-00001.safetensors, ...

Each fragment is one safetensors tensor named ``"<tensor>::<fragment>"``. The index holds:

- ``format`` (``"torch-arbiter-holo"``), ``version`` (:data:`FORMAT_VERSION`), ``metadata`` (free
  JSON from the writer: source, model config, ...);
- ``tensors``: name -> the tensor's meta (shape, dtype, scheme, code parameters, ``levels`` each
  with exact ``bytes`` and measured ``fidelity``, and ``fragments`` each with level and kind), plus
  ``holo: false`` for tensors stored plain (buffers saved as they are);
- ``fragments``: fragment id -> ``{tensor, name, level, kind, file, offset, length, dtype, shape,
  sha256}``; ``offset``/``length`` are the absolute byte range inside ``file``, so a reader can
  fetch one fragment alone (a seek, or an HTTP range request) and check it.

Writes go to a temporary sibling directory that is renamed into place, so a crash never leaves a
half-written checkpoint under the destination name. Nothing is pickled.

Limits: a file holds at most :data:`SHARD_BYTES` of fragments (a single larger fragment gets a
file of its own); the index is read whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors.torch import save_file

from ..errors import CorruptFragmentError, FormatError, InvalidRequestError
from .codec import HoloTensor, _dtype_from_name, _dtype_name

__all__ = [
    "INDEX_NAME",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SHARD_BYTES",
    "save_holo",
    "HoloCheckpoint",
    "decode_fragment",
    "fragment_id",
]

INDEX_NAME = "holo_index.json"
FORMAT_NAME = "torch-arbiter-holo"
FORMAT_VERSION = 3
SHARD_BYTES = 1 << 30
_SEPARATOR = "::"


def fragment_id(tensor: str, fragment: str) -> str:
    """The id of fragment ``fragment`` of ``tensor``: ``"<tensor>::<fragment>"``."""
    return f"{tensor}{_SEPARATOR}{fragment}"


def _plain_meta(tensor: torch.Tensor) -> dict:
    return {"holo": False, "shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype),
            "full_bytes": tensor.numel() * tensor.element_size()}


def save_holo(path: str | os.PathLike, tensors: Mapping[str, HoloTensor | torch.Tensor],
              metadata: dict | None = None, *, overwrite: bool = False) -> Path:
    """Write a holo checkpoint atomically.

    Args:
        path: destination directory (created; its parent must exist).
        tensors: name -> HoloTensor (every fragment must be loaded) or a plain tensor (stored as
            is, e.g. a buffer).
        metadata: JSON-able dict stored in the index under ``metadata``.
        overwrite: replace an existing checkpoint at ``path`` (the old one is removed only after
            the new one is in place).

    Returns:
        The destination path.

    Raises:
        InvalidRequestError: ``path`` exists and ``overwrite`` is False, its parent is missing, a
            name contains ``"::"``, or the metadata is not JSON-able.
        FormatError: a HoloTensor lacks a fragment.
    """
    dest = Path(path)
    if dest.exists() and not overwrite:
        raise InvalidRequestError(f"{dest} already exists; choose another destination or pass overwrite=True")
    if not dest.parent.is_dir():
        raise InvalidRequestError(f"parent directory {dest.parent} does not exist; create it first")
    try:
        json.dumps(metadata or {})
    except TypeError as exc:
        raise InvalidRequestError(f"metadata must be JSON-able: {exc}") from None

    index = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "metadata": metadata or {},
             "tensors": {}, "fragments": {}}
    pending: list[tuple[str, str, str, torch.Tensor, dict]] = []
    for name, value in tensors.items():
        if _SEPARATOR in name:
            raise InvalidRequestError(f"tensor name {name!r} contains {_SEPARATOR!r}; rename it")
        if isinstance(value, HoloTensor):
            index["tensors"][name] = dict(value.meta, holo=True)
            for spec in value.fragment_specs():
                pending.append((name, spec.name, fragment_id(name, spec.name), value.fragment(spec.name),
                                {"level": spec.level, "kind": spec.kind}))
        elif isinstance(value, torch.Tensor):
            index["tensors"][name] = _plain_meta(value)
            pending.append((name, "plain", fragment_id(name, "plain"), value, {"level": 1, "kind": "exact"}))
        else:
            raise InvalidRequestError(f"tensor {name!r} is a {type(value).__name__}; pass HoloTensor or Tensor")

    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        for file_name, group in _shards(pending):
            payload = {fid: t.detach().to("cpu").contiguous() for _, _, fid, t, _ in group}
            save_file(payload, str(tmp / file_name))
            ranges = _safetensors_ranges(tmp / file_name)
            with open(tmp / file_name, "rb") as handle:
                for tensor_name, frag_name, fid, tensor, extra in group:
                    offset, length = ranges[fid]
                    handle.seek(offset)
                    digest = hashlib.sha256(handle.read(length)).hexdigest()
                    index["fragments"][fid] = {
                        "tensor": tensor_name, "name": frag_name, **extra, "file": file_name,
                        "offset": offset, "length": length, "dtype": _dtype_name(tensor.dtype),
                        "shape": list(tensor.shape), "sha256": digest,
                    }
        with open(tmp / INDEX_NAME, "w") as handle:
            json.dump(index, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        _move_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _shards(pending):
    group, size, number = [], 0, 0
    for item in pending:
        nbytes = item[3].numel() * item[3].element_size()
        if group and size + nbytes > SHARD_BYTES:
            yield f"fragments-{number:05d}.safetensors", group
            group, size, number = [], 0, number + 1
        group.append(item)
        size += nbytes
    if group or number == 0:
        yield f"fragments-{number:05d}.safetensors", group


def _move_into_place(tmp: Path, dest: Path) -> None:
    if not dest.exists():
        os.rename(tmp, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
    os.rename(dest, old / dest.name)
    os.rename(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def _safetensors_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """Absolute (offset, length) of every tensor in a safetensors file, from its header."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise FormatError(f"{path} is truncated (no safetensors header); re-convert the checkpoint")
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8:
            raise FormatError(f"{path} has a header length past the end of the file; it is truncated or corrupt")
        try:
            header = json.loads(handle.read(header_len))
        except ValueError as exc:
            raise FormatError(f"{path} has an unreadable safetensors header ({exc}); re-convert it") from None
    base = 8 + header_len
    return {name: (base + info["data_offsets"][0], info["data_offsets"][1] - info["data_offsets"][0])
            for name, info in header.items() if name != "__metadata__"}


def decode_fragment(entry: Mapping, raw: bytes, *, source: str) -> torch.Tensor:
    """Turn the raw bytes of one fragment into its tensor, after checking length and checksum.

    Every reader (local file, fragment cache, HTTP range request) goes through this.

    Args:
        entry: the fragment's index entry (``tensor``, ``length``, ``dtype``, ``shape``, ``sha256``).
        raw: exactly the fragment's bytes.
        source: where the bytes came from (a path or URL), for the error message.

    Returns:
        A new CPU tensor that owns its memory.

    Raises:
        CorruptFragmentError: wrong length or checksum, naming the source and tensor.
        FormatError: the entry's dtype or shape does not match its length.
    """
    tensor_name = entry.get("tensor", "?")
    if len(raw) != entry["length"]:
        raise CorruptFragmentError(
            f"fragment of tensor {tensor_name!r} from {source}: got {len(raw)} bytes, the index says "
            f"{entry['length']}; the file is truncated or the index is stale, re-convert or re-download it")
    if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
        raise CorruptFragmentError(
            f"fragment of tensor {tensor_name!r} from {source} fails its sha256 check; the file is "
            "corrupt, re-convert or re-download it")
    dtype = _dtype_from_name(entry["dtype"])
    shape = [int(d) for d in entry["shape"]]
    count = 1
    for d in shape:
        count *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    if count * itemsize != len(raw):
        raise FormatError(
            f"fragment of tensor {tensor_name!r} from {source}: shape {shape} x {entry['dtype']} needs "
            f"{count * itemsize} bytes but it has {len(raw)}; the index is inconsistent, re-convert it")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)


class HoloCheckpoint:
    """A holo checkpoint directory opened for reading. Create with :meth:`open`.

    Fragments are read one at a time by byte range (:meth:`read_fragment`), so a reader never
    loads more than it asks for.
    """

    def __init__(self, path: Path, index: dict):
        """Use :meth:`open`; this only stores an already-validated index."""
        self.path = path
        self.index = index

    @classmethod
    def open(cls, path: str | os.PathLike) -> "HoloCheckpoint":
        """Open and validate the index of a holo checkpoint.

        Args:
            path: the checkpoint directory.

        Returns:
            The checkpoint.

        Raises:
            FormatError: no index, unreadable JSON, wrong format or version, a fragment that names
                a missing tensor or file, or a byte range outside its file.
        """
        root = Path(path)
        index_path = root / INDEX_NAME
        if not index_path.is_file():
            raise FormatError(f"{root} is not a holo checkpoint (no {INDEX_NAME}); convert a model "
                              "with `torch-arbiter convert SRC DST` first")
        try:
            index = json.loads(index_path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise FormatError(f"{index_path} is not valid JSON ({exc}); re-convert the checkpoint") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
            raise FormatError(f"{index_path} is not a {FORMAT_NAME} index; re-convert the checkpoint")
        if index.get("version") != FORMAT_VERSION:
            raise FormatError(f"{index_path} has format version {index.get('version')!r}, this "
                              f"torch_arbiter reads version {FORMAT_VERSION}; re-convert or upgrade")
        for key in ("tensors", "fragments"):
            if not isinstance(index.get(key), dict):
                raise FormatError(f"{index_path} lacks its {key!r} table; re-convert the checkpoint")
        sizes: dict[str, int] = {}
        for fid, entry in index["fragments"].items():
            missing = {"tensor", "name", "level", "file", "offset", "length", "dtype", "shape",
                       "sha256"} - set(entry)
            if missing:
                raise FormatError(f"{index_path}: fragment {fid!r} lacks {sorted(missing)}; re-convert it")
            if entry["tensor"] not in index["tensors"]:
                raise FormatError(f"{index_path}: fragment {fid!r} names tensor {entry['tensor']!r} "
                                  "that the index does not list; re-convert the checkpoint")
            file_name = entry["file"]
            if Path(file_name).name != file_name:
                raise FormatError(f"{index_path}: fragment {fid!r} points to {file_name!r} outside the "
                                  "checkpoint directory; refusing to read it")
            if file_name not in sizes:
                file_path = root / file_name
                if not file_path.is_file():
                    raise FormatError(f"{index_path}: file {file_name} of tensor {entry['tensor']!r} "
                                      "is missing; copy the whole checkpoint directory")
                sizes[file_name] = file_path.stat().st_size
            offset, length = entry["offset"], entry["length"]
            if (not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 0
                    or offset + length > sizes[file_name]):
                raise FormatError(
                    f"{index_path}: fragment {fid!r} of tensor {entry['tensor']!r} has byte range "
                    f"{offset}+{length} outside {file_name} ({sizes[file_name]} bytes); the file is "
                    "truncated or the index is wrong, re-convert it")
        return cls(root, index)

    @property
    def metadata(self) -> dict:
        """The writer's free metadata (source, model config, ...)."""
        return self.index.get("metadata", {})

    def tensor_names(self) -> list[str]:
        """Names of all stored tensors, in the order they were written."""
        return list(self.index["tensors"])

    def tensor_meta(self, name: str) -> dict:
        """The index entry of tensor ``name`` (HoloTensor meta, or plain shape/dtype).

        Raises:
            FormatError: no such tensor.
        """
        try:
            return self.index["tensors"][name]
        except KeyError:
            raise FormatError(f"{self.path} holds no tensor {name!r}; see `torch-arbiter inspect "
                              f"{self.path}` for the names") from None

    def fragment_ids(self, tensor: str | None = None) -> list[str]:
        """Ids of all fragments (of one tensor when ``tensor`` is given), in file order."""
        if tensor is None:
            return list(self.index["fragments"])
        self.tensor_meta(tensor)
        return [fid for fid, e in self.index["fragments"].items() if e["tensor"] == tensor]

    def fragment_entry(self, fid: str) -> dict:
        """The index entry of fragment ``fid`` (``tensor``, ``level``, ``file``, ``offset``,
        ``length``, ``dtype``, ``shape``, ``sha256``, plus ``name`` and ``kind``).

        Raises:
            FormatError: no such fragment.
        """
        try:
            return self.index["fragments"][fid]
        except KeyError:
            raise FormatError(f"{self.path} holds no fragment {fid!r}") from None

    def read_fragment(self, fid: str) -> torch.Tensor:
        """Read one fragment by its byte range and verify its checksum.

        Raises:
            FormatError: unknown fragment.
            CorruptFragmentError: the bytes are short or fail the checksum.
        """
        entry = self.fragment_entry(fid)
        source = str(self.path / entry["file"])
        try:
            with open(source, "rb") as handle:
                handle.seek(entry["offset"])
                raw = handle.read(entry["length"])
        except OSError as exc:
            raise CorruptFragmentError(f"cannot read fragment of tensor {entry['tensor']!r} from "
                                       f"{source}: {exc}; check the checkpoint directory") from None
        return decode_fragment(entry, raw, source=source)

    def load_tensor(self, name: str, max_level: int | None = None) -> HoloTensor | torch.Tensor:
        """Load a tensor: a :class:`HoloTensor` (holo-encoded) or a plain tensor.

        Args:
            name: the tensor's name.
            max_level: load only the fragments of levels ``<= max_level`` (HoloTensor only);
                None loads them all.

        Returns:
            The tensor, with checksums verified.

        Raises:
            FormatError: unknown tensor, or fragments inconsistent with its meta.
            CorruptFragmentError: a fragment fails its checks.
        """
        meta = self.tensor_meta(name)
        ids = self.fragment_ids(name)
        if not meta.get("holo", False):
            if len(ids) != 1:
                raise FormatError(f"{self.path}: plain tensor {name!r} has {len(ids)} fragments, expected 1")
            tensor = self.read_fragment(ids[0])
            if list(tensor.shape) != meta["shape"] or _dtype_name(tensor.dtype) != meta["dtype"]:
                raise FormatError(f"{self.path}: tensor {name!r} is stored as {list(tensor.shape)} "
                                  f"{tensor.dtype}, the index says {meta['shape']} {meta['dtype']}")
            return tensor
        fragments = {}
        for fid in ids:
            entry = self.index["fragments"][fid]
            if max_level is None or entry["level"] <= max_level:
                fragments[entry["name"]] = self.read_fragment(fid)
        clean_meta = {k: v for k, v in meta.items() if k != "holo"}
        try:
            return HoloTensor.from_parts(clean_meta, fragments)
        except FormatError as exc:
            raise FormatError(f"{self.path}: tensor {name!r}: {exc}") from None

    def iter_tensors(self) -> Iterator[tuple[str, HoloTensor | torch.Tensor]]:
        """Yield ``(name, tensor)`` for every stored tensor (each fully loaded and checked)."""
        for name in self.tensor_names():
            yield name, self.load_tensor(name)
