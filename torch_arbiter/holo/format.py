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

A save killed half-way leaves a ``.DST.tmp-<pid>-*`` directory (removed by the next save to the
same place once that writer is dead); an overwrite killed between its two renames leaves the old
checkpoint in ``.DST.old-<pid>-*/DST``, which the next ``save_holo`` or ``HoloCheckpoint.open`` of
``DST`` puts back.

Limits: a file holds at most :data:`SHARD_BYTES` of fragments (a single larger fragment gets a
file of its own); the index is read whole, up to :data:`MAX_INDEX_BYTES` and
:data:`MAX_JSON_DEPTH` deep, and every value in it is type- and range-checked before use
(:func:`parse_index`); a fragment is at most :data:`MAX_FRAGMENT_BYTES`. Recovery of dead
writers' leftovers assumes writers on this host (a pid names the writer).
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors.torch import save_file

from ..errors import CorruptFragmentError, FormatError, InvalidRequestError
from .codec import _DTYPES as _DTYPE_NAMES
from .codec import HoloTensor, _dtype_from_name, _dtype_name, _expected_fragment_layout, _largest_block

__all__ = [
    "INDEX_NAME",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SHARD_BYTES",
    "save_holo",
    "HoloCheckpoint",
    "decode_fragment",
    "fragment_id",
    "parse_index",
    "MAX_INDEX_BYTES",
    "MAX_FRAGMENT_BYTES",
    "MAX_JSON_DEPTH",
]

INDEX_NAME = "holo_index.json"
FORMAT_NAME = "torch-arbiter-holo"
FORMAT_VERSION = 4
SHARD_BYTES = 1 << 30
#: Largest index a reader accepts by default (a 70B model's index is a few MB). Raise it with
#: ``HoloCheckpoint.open(..., max_index_bytes=)`` / ``CacheConfig.max_index_bytes``.
MAX_INDEX_BYTES = 64 << 20
#: Largest single fragment a reader accepts by default (a 256k x 8192 bf16 embedding is 4 GiB).
#: Raise it with ``HoloCheckpoint.open(..., max_fragment_bytes=)`` / ``CacheConfig.max_fragment_bytes``.
MAX_FRAGMENT_BYTES = 16 << 30
#: Deepest JSON nesting an index may have (a real one nests about 6 deep; metadata adds a few).
MAX_JSON_DEPTH = 64
_SEPARATOR = "::"
_MAX_DIMS = 8


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
    _recover_leftovers(dest)
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

    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}{_TMP_MARK}{os.getpid()}-", dir=dest.parent))
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
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}{_OLD_MARK}{os.getpid()}-", dir=dest.parent))
    os.rename(dest, old / dest.name)
    os.rename(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


_TMP_MARK = ".tmp-"
_OLD_MARK = ".old-"
_LEGACY_STALE_SECONDS = 3600


def _writer_is_dead(leftover: Path, mark: str, dest_name: str) -> bool:
    """Whether the save that made ``leftover`` (named ``.DST<mark><pid>-*``) can no longer finish."""
    pid_text = leftover.name[len(dest_name) + 1 + len(mark):].split("-", 1)[0]
    if not pid_text.isdigit():  # written before names carried the pid: stale once old
        try:
            return time.time() - leftover.stat().st_mtime > _LEGACY_STALE_SECONDS
        except OSError:
            return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False  # another thread of this process may be saving right now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _recover_leftovers(dest: Path) -> None:
    """Undo what killed saves to ``dest`` left: put back an old checkpoint an overwrite moved
    aside (when ``dest`` is missing), and remove the temporary directories of dead writers.

    Best effort on a read-only parent (nothing is removed there, and nothing is lost)."""
    parent = dest.parent
    if not parent.is_dir():
        return
    pattern = glob.escape(f".{dest.name}")
    for leftover in sorted(parent.glob(pattern + _OLD_MARK + "*")):
        if not _writer_is_dead(leftover, _OLD_MARK, dest.name):
            continue
        kept = leftover / dest.name
        try:
            if kept.is_dir() and not dest.exists():
                os.rename(kept, dest)
            if not kept.exists():
                shutil.rmtree(leftover)
        except OSError:
            pass
    for leftover in parent.glob(pattern + _TMP_MARK + "*"):
        if leftover.is_dir() and _writer_is_dead(leftover, _TMP_MARK, dest.name):
            shutil.rmtree(leftover, ignore_errors=True)


def parse_index(raw: bytes, where: str, *, max_index_bytes: int = MAX_INDEX_BYTES,
                max_fragment_bytes: int = MAX_FRAGMENT_BYTES) -> dict:
    """Parse and check a holo index read from a file or a server, before anything uses it.

    Every reader goes through this (``HoloCheckpoint.open``, the REMOTE tier), so an index from
    anywhere gets the same checks: size, JSON depth, format and version, and the type and range
    of every value a reader relies on (tensor metas, levels, fragment entries and their byte
    ranges, shapes and dtypes against their tensor's layout).

    Args:
        raw: the index bytes.
        where: the index's path or URL, for messages.
        max_index_bytes: refuse a larger index.
        max_fragment_bytes: refuse an entry whose fragment is larger.

    Returns:
        The index dict.

    Raises:
        FormatError: anything malformed, naming ``where`` and what to do.
    """
    if len(raw) > max_index_bytes:
        raise FormatError(f"{where} is {len(raw)} bytes, over the {max_index_bytes}-byte index limit; if the "
                          "checkpoint is really that large, raise max_index_bytes (CacheConfig.max_index_bytes)")
    try:
        index = json.loads(raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw)
    except RecursionError:
        raise FormatError(f"{where} nests its JSON too deeply to be a holo index; re-convert the checkpoint") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{where} is not a valid JSON holo index ({exc}); re-convert the checkpoint") from None
    _check_depth(index, where)
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
        raise FormatError(f"{where} is not a {FORMAT_NAME} index; point at a directory written by save_holo "
                          "(`torch-arbiter convert`)")
    if index.get("version") != FORMAT_VERSION:
        raise FormatError(f"{where} has format version {index.get('version')!r}, this torch_arbiter reads "
                          f"version {FORMAT_VERSION}; re-convert or upgrade")
    for key in ("tensors", "fragments"):
        if not isinstance(index.get(key), dict):
            raise FormatError(f"{where} lacks its {key!r} table; re-convert the checkpoint")
    if not isinstance(index.get("metadata", {}), dict):
        raise FormatError(f"{where}: 'metadata' is not a JSON object; re-convert the checkpoint")
    layouts = {name: _check_tensor_meta(name, meta, where) for name, meta in index["tensors"].items()}
    for fid, entry in index["fragments"].items():
        _check_fragment_entry(fid, entry, layouts, where, max_fragment_bytes)
    return index


def _check_depth(value: object, where: str) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise FormatError(f"{where} nests JSON deeper than {MAX_JSON_DEPTH} levels; it is not a holo index")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_shape(value: object) -> bool:
    return isinstance(value, list) and len(value) <= _MAX_DIMS and all(_is_count(d) for d in value)


def _nbytes(shape: list[int], dtype: str) -> int:
    return math.prod(shape) * _dtype_from_name(dtype).itemsize


def _check_tensor_meta(name: str, meta: object, where: str) -> dict[str, tuple[list[int], str]]:
    """Check one tensor's meta; return ``fragment name -> (shape, dtype name)`` it expects."""
    def bad(problem: str) -> FormatError:
        return FormatError(f"{where}: tensor {name!r} {problem}; re-convert the checkpoint")

    if not isinstance(meta, dict):
        raise bad("has no meta table")
    shape, dtype, full = meta.get("shape"), meta.get("dtype"), meta.get("full_bytes")
    if not _is_shape(shape):
        raise bad(f"has shape {shape!r}, expected a list of at most {_MAX_DIMS} ints >= 0")
    if not isinstance(dtype, str) or dtype not in _DTYPE_NAMES:
        raise bad(f"has dtype {dtype!r}, expected one of {sorted(_DTYPE_NAMES)}")
    if not _is_count(full) or full != _nbytes(shape, dtype):
        raise bad(f"has full_bytes {full!r}, but {shape} x {dtype} is {_nbytes(shape, dtype)} bytes")
    holo = meta.get("holo", False)
    if not isinstance(holo, bool):
        raise bad(f"has holo={holo!r}, expected true or false")
    if not holo:
        return {"plain": (shape, dtype)}
    scheme, levels, fragments = meta.get("scheme"), meta.get("levels"), meta.get("fragments")
    if scheme not in ("exact", "nested4x2"):
        raise bad(f"has scheme {scheme!r} (this torch_arbiter reads 'exact' and 'nested4x2'; upgrade it?)")
    if not isinstance(levels, list) or not (len(levels) == 1 if scheme == "exact" else 2 <= len(levels) <= 16):
        raise bad(f"has levels {levels!r:.80}, expected a list ({'one level' if scheme == 'exact' else '2 or more'})")
    previous = 0
    for number, level in enumerate(levels, 1):
        fidelity = level.get("fidelity") if isinstance(level, dict) else None
        size = level.get("bytes") if isinstance(level, dict) else None
        if not _is_count(size) or not previous <= size <= full:
            raise bad(f"level {number} has bytes {size!r}: levels must cost 0..full_bytes ({full}), sorted")
        previous = size
        if not isinstance(level.get("label"), str):
            raise bad(f"level {number} has label {level.get('label')!r:.40}, expected a string")
        if not isinstance(fidelity, dict) or not all(
                isinstance(fidelity[key], (int, float)) and not isinstance(fidelity[key], bool)
                and math.isfinite(fidelity[key]) and fidelity[key] >= 0
                for key in ("rel_error", "out_rel_error", "model_error") if key in fidelity) or "rel_error" not in fidelity:
            raise bad(f"level {number} has fidelity {fidelity!r:.80}, expected finite rel_error >= 0")
    if previous != full:
        raise bad(f"has a top level of {previous} bytes, not its full {full} bytes (the exact level)")
    if not isinstance(fragments, dict) or not all(
            isinstance(spec, dict) and _is_count(spec.get("level")) and 1 <= spec["level"] <= len(levels)
            and isinstance(spec.get("kind"), str) for spec in fragments.values()):
        raise bad(f"has a fragment table {fragments!r:.80} that is not name -> {{level 1..{len(levels)}, kind}}")
    if scheme == "nested4x2":
        keys = ("in_features", "padded_features", "group_size", "block", "seed", "rank")
        if not all(_is_count(meta.get(key)) for key in keys) or not all(
                isinstance(meta.get(key), bool) for key in ("rotated", "symmetric")):
            raise bad(f"lacks integer {list(keys)} or boolean rotated/symmetric")
        group, padded, block = meta["group_size"], meta["padded_features"], meta["block"]
        if (len(shape) < 2 or shape[0] < 1 or meta["in_features"] != math.prod(shape[1:])
                or group < 2 or group % 2 or padded < meta["in_features"] or padded % group
                or block != (_largest_block(padded) if meta["rotated"] else 1)
                or meta["rank"] > min(shape[0], meta["in_features"])):
            raise bad(f"has inconsistent code parameters (shape {shape}, in_features {meta['in_features']}, "
                      f"padded {padded}, group_size {group}, block {block}, rank {meta['rank']})")
    layout = _expected_fragment_layout(meta)
    if set(fragments) != set(layout):
        raise bad(f"lists fragments {sorted(fragments)}, a {scheme} tensor has {sorted(layout)}")
    # Each level below the top holds its fragments and those of the levels under it, no more.
    for number, level in enumerate(levels[:-1], 1):
        held = sum(_nbytes(frag_shape, _dtype_name(frag_dtype)) for frag, (frag_shape, frag_dtype) in layout.items()
                   if fragments[frag]["level"] <= number and fragments[frag]["kind"] != "exact")
        if held != level["bytes"]:
            raise bad(f"says level {number} holds {level['bytes']} bytes, its fragments are {held} bytes")
    return {frag: (frag_shape, _dtype_name(frag_dtype)) for frag, (frag_shape, frag_dtype) in layout.items()}


def _check_fragment_entry(fid: str, entry: object, layouts: dict, where: str, max_fragment_bytes: int) -> None:
    def bad(problem: str) -> FormatError:
        return FormatError(f"{where}: fragment {fid!r} {problem}; re-convert or re-download the checkpoint")

    if not isinstance(entry, dict):
        raise bad("is not a JSON object")
    missing = {"tensor", "name", "level", "file", "offset", "length", "dtype", "shape", "sha256"} - set(entry)
    if missing:
        raise bad(f"lacks {sorted(missing)}")
    tensor, name, file_name = entry["tensor"], entry["name"], entry["file"]
    if not isinstance(tensor, str) or tensor not in layouts:
        raise bad(f"names tensor {tensor!r} that the index does not list")
    if not isinstance(file_name, str) or Path(file_name).name != file_name or file_name in ("", ".", ".."):
        raise bad(f"points to {file_name!r} outside the checkpoint directory; refusing to read it")
    if not _is_count(entry["offset"]) or not _is_count(entry["length"]) or not _is_count(entry["level"]):
        raise bad(f"has byte range {entry['offset']!r}+{entry['length']!r} / level {entry['level']!r}, "
                  "expected ints >= 0")
    if entry["length"] > max_fragment_bytes:
        raise bad(f"is {entry['length']} bytes, over the {max_fragment_bytes}-byte fragment limit (raise "
                  "max_fragment_bytes / CacheConfig.max_fragment_bytes if it is real)")
    sha = entry["sha256"]
    if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise bad(f"has sha256 {sha!r:.80}, expected 64 lowercase hex digits")
    expected = layouts[tensor].get(name) if isinstance(name, str) else None
    if expected is None:
        raise bad(f"is named {name!r}, not a fragment of tensor {tensor!r} (have {sorted(layouts[tensor])})")
    if entry["shape"] != expected[0] or entry["dtype"] != expected[1]:
        raise bad(f"has shape {entry['shape']!r:.80} dtype {entry['dtype']!r:.40}, tensor {tensor!r} expected "
                  f"{expected[0]} {expected[1]}")
    if entry["length"] != _nbytes(expected[0], expected[1]):
        raise bad(f"has length {entry['length']}, but {expected[0]} x {expected[1]} is "
                  f"{_nbytes(expected[0], expected[1])} bytes")


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


def decode_fragment(entry: Mapping, raw: bytes | bytearray | torch.Tensor, *, source: str,
                    verify: bool = True) -> torch.Tensor:
    """Turn the raw bytes of one fragment into its tensor, after checking length and checksum.

    Every reader (local file, fragment cache, HTTP range request) goes through this.

    Args:
        entry: the fragment's index entry (``tensor``, ``length``, ``dtype``, ``shape``, ``sha256``).
        raw: exactly the fragment's bytes; a ``bytearray`` or a 1-D ``uint8`` CPU tensor becomes
            the tensor's memory (not copied: the caller hands it over), ``bytes`` are copied.
        source: where the bytes came from (a path or URL), for the error message.
        verify: check the sha256 (False only for bytes re-read from a local file whose same
            bytes were checked before: see ``HoloCheckpoint.read_fragment``).

    Returns:
        A CPU tensor that owns its memory.

    Raises:
        CorruptFragmentError: wrong length or checksum, naming the source and tensor.
        FormatError: the entry's dtype or shape does not match its length.
    """
    tensor_name = entry.get("tensor", "?")
    if isinstance(raw, torch.Tensor):
        held, raw = raw, raw.numpy()  # the buffer protocol for the checks below; ``held`` keeps the memory
    else:
        held = None
    if len(raw) != entry["length"]:
        raise CorruptFragmentError(
            f"fragment of tensor {tensor_name!r} from {source}: got {len(raw)} bytes, the index says "
            f"{entry['length']}; the file is truncated or the index is stale, re-convert or re-download it")
    if verify and hashlib.sha256(raw).hexdigest() != entry["sha256"]:
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
    if held is not None:
        return held.view(dtype).reshape(shape)
    return torch.frombuffer(raw if isinstance(raw, bytearray) else bytearray(raw), dtype=dtype).reshape(shape)


class HoloCheckpoint:
    """A holo checkpoint directory opened for reading. Create with :meth:`open`.

    Fragments are read one at a time by byte range (:meth:`read_fragment`), so a reader never
    loads more than it asks for.
    """

    def __init__(self, path: Path, index: dict):
        """Use :meth:`open`; this only stores an already-validated index."""
        self.path = path
        self.index = index
        self._verified: dict[str, tuple[int, int, int, int]] = {}  # fragment id -> its file as checked

    @classmethod
    def open(cls, path: str | os.PathLike, *, max_index_bytes: int = MAX_INDEX_BYTES,
             max_fragment_bytes: int = MAX_FRAGMENT_BYTES) -> "HoloCheckpoint":
        """Open and validate the index of a holo checkpoint (see :func:`parse_index`).

        An old checkpoint that an overwrite killed between its two renames left aside is put
        back first.

        Args:
            path: the checkpoint directory.
            max_index_bytes: refuse a larger index (default :data:`MAX_INDEX_BYTES`).
            max_fragment_bytes: refuse a larger fragment (default :data:`MAX_FRAGMENT_BYTES`).

        Returns:
            The checkpoint.

        Raises:
            FormatError: no index, unreadable JSON, wrong format or version, a fragment that names
                a missing tensor or file, or a byte range outside its file.
        """
        root = Path(path)
        _recover_leftovers(root)
        index_path = root / INDEX_NAME
        if not index_path.is_file():
            raise FormatError(f"{root} is not a holo checkpoint (no {INDEX_NAME}); convert a model "
                              "with `torch-arbiter convert SRC DST` first")
        try:
            with open(index_path, "rb") as handle:
                raw = handle.read(max_index_bytes + 1)
        except OSError as exc:
            raise FormatError(f"cannot read {index_path}: {exc}; check the checkpoint directory") from None
        index = parse_index(raw, str(index_path), max_index_bytes=max_index_bytes,
                            max_fragment_bytes=max_fragment_bytes)
        sizes: dict[str, int] = {}
        for fid, entry in index["fragments"].items():
            file_name = entry["file"]
            if file_name not in sizes:
                file_path = root / file_name
                if not file_path.is_file():
                    raise FormatError(f"{index_path}: file {file_name} of tensor {entry['tensor']!r} "
                                      "is missing; copy the whole checkpoint directory")
                sizes[file_name] = file_path.stat().st_size
            offset, length = entry["offset"], entry["length"]
            if offset + length > sizes[file_name]:
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
                status = os.fstat(handle.fileno())
                handle.seek(entry["offset"])
                # Read straight into the tensor's own memory: torch.empty does not zero it (a
                # bytearray would, touching every page once more before the read).
                raw = torch.empty(entry["length"], dtype=torch.uint8)
                got = handle.readinto(raw.numpy()) if entry["length"] else 0
                if got < entry["length"]:  # a short file: decode_fragment names it
                    raw = raw[:got]
        except OSError as exc:
            raise CorruptFragmentError(f"cannot read fragment of tensor {entry['tensor']!r} from "
                                       f"{source}: {exc}; check the checkpoint directory") from None
        # The checksum is checked at the first read in this process and again whenever the file
        # changed since (inode, size or mtime): hashing every re-read made a raise from DISK
        # several times slower than reading the bytes.
        identity = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)
        trusted = self._verified.get(fid) == identity
        tensor = decode_fragment(entry, raw, source=source, verify=not trusted)
        self._verified[fid] = identity
        return tensor

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
