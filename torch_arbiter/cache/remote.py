"""The REMOTE tier: a holo checkpoint served over HTTP(S), read one fragment at a time.

The server needs nothing special: any static file server that honours ``Range`` headers (nginx,
a CDN, object storage, ``ThreadingHTTPServer`` with a range-capable handler) serving the holo
checkpoint directory as is. The tier fetches ``holo_index.json`` once, then each fragment with
one ``Range: bytes=offset-end`` request, and decodes the bytes through
``torch_arbiter.holo.format.decode_fragment``, which checks the length and sha256 and names the
URL in its error.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Iterable

import torch

from ..errors import CorruptFragmentError, FormatError, InvalidRequestError
from ..holo.format import FORMAT_NAME, FORMAT_VERSION, INDEX_NAME, decode_fragment
from .base import TierStore
from .config import CacheTier

__all__ = ["RemoteTier"]

_CHUNK = 1 << 20


class RemoteTier(TierStore):
    """A read-only tier backed by a holo checkpoint over HTTP.

    Args:
        url: base URL of the checkpoint directory (``holo_index.json`` is fetched from there).
        timeout: seconds each request (connect and each read) may take.

    Raises (at construction):
        CorruptFragmentError: the index cannot be fetched (server down, 404, timeout).
        FormatError: the index is not a valid holo index.

    Limits: one connection per fragment (no keep-alive pooling); a server that ignores
    ``Range`` and answers 200 with the whole file still works, at the cost of streaming the file
    up to the fragment's end.
    """

    tier = CacheTier.REMOTE
    writable = False

    def __init__(self, url: str, *, timeout: float = 30.0) -> None:
        self.base_url = url if url.endswith("/") else url + "/"
        self.timeout = float(timeout)
        index_url = urllib.parse.urljoin(self.base_url, INDEX_NAME)
        raw_index = self._fetch(index_url, what="the holo index")
        try:
            index = json.loads(raw_index.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(
                f"{index_url} is not a JSON holo index ({exc}); point CacheConfig.remote_url at a directory "
                "written by save_holo"
            ) from None
        self._entries: dict[str, dict] = _fragment_entries(index, index_url)

    def read(self, key: str) -> torch.Tensor:
        return self.read_source(key)

    def read_source(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        url = urllib.parse.urljoin(self.base_url, urllib.parse.quote(entry["file"]))
        offset, length = int(entry["offset"]), int(entry["length"])
        raw = self._fetch_range(url, offset, length, key) if length else b""
        return decode_fragment(entry, raw, source=url)

    def write(self, key: str, tensor: torch.Tensor) -> int:
        raise InvalidRequestError("the REMOTE tier is read-only; put fragments at DEVICE, HOST or DISK")

    def delete(self, key: str) -> None:
        raise InvalidRequestError("the REMOTE tier is read-only; its fragments cannot be deleted from here")

    def source_has(self, key: str) -> bool:
        return key in self._entries

    def source_keys(self) -> Iterable[str]:
        return self._entries.keys()

    def _fetch(self, url: str, *, what: str) -> bytes:
        """GET a whole (small) resource, turning every network failure into a typed error."""
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as response:
                return response.read()
        except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as exc:
            raise CorruptFragmentError(
                f"could not fetch {what} from {url}: {_reason(exc)}; check that the server is up and "
                "serves the holo checkpoint directory"
            ) from None

    def _fetch_range(self, url: str, offset: int, length: int, key: str) -> bytes:
        """Bytes ``[offset, offset + length)`` of ``url`` with one Range request."""
        request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-{offset + length - 1}"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                if response.status == 206:
                    start = _content_range_start(response.headers.get("Content-Range"))
                    if start != offset:
                        raise CorruptFragmentError(
                            f"fragment {key!r}: {url} answered the range starting at {start} instead of {offset}; "
                            "the server's Range support is broken"
                        )
                    return response.read(length)
                _skip(response, offset)  # 200: the server ignored Range and sends the whole file
                return response.read(length)
        except CorruptFragmentError:
            raise
        except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as exc:
            raise CorruptFragmentError(
                f"could not fetch fragment {key!r} (bytes {offset}-{offset + length - 1}) from {url}: "
                f"{_reason(exc)}; check the server and that it serves the same checkpoint as its index"
            ) from None


_ENTRY_KEYS = frozenset({"tensor", "file", "offset", "length", "dtype", "shape", "sha256"})


def _fragment_entries(index: object, index_url: str) -> dict[str, dict]:
    """The fragment table of a fetched index, checked enough to issue safe range requests.

    ``HoloCheckpoint.open`` validates a local index against its files; a remote one has no local
    files, so this checks what a reader over HTTP relies on: format and version, every entry's
    keys, non-negative integer ranges, and file names that stay inside the checkpoint (no
    ``../``). Length, checksum, dtype and shape are checked per fragment by ``decode_fragment``.
    """
    if (
        not isinstance(index, dict)
        or index.get("format") != FORMAT_NAME
        or index.get("version") != FORMAT_VERSION
        or not isinstance(index.get("fragments"), dict)
    ):
        raise FormatError(
            f"{index_url} is not a {FORMAT_NAME} version {FORMAT_VERSION} holo index; point "
            "CacheConfig.remote_url at a directory written by save_holo with this torch_arbiter"
        )
    for fid, entry in index["fragments"].items():
        problem = None
        if not isinstance(entry, dict) or not _ENTRY_KEYS <= set(entry):
            problem = f"lacks {sorted(_ENTRY_KEYS - set(entry if isinstance(entry, dict) else ()))}"
        elif not all(isinstance(entry[k], int) and entry[k] >= 0 for k in ("offset", "length")):
            problem = f"has byte range {entry['offset']!r}+{entry['length']!r}"
        elif not isinstance(entry["file"], str) or "/" in entry["file"] or entry["file"] in ("", ".", ".."):
            problem = f"points to {entry['file']!r} outside the checkpoint directory"
        if problem is not None:
            raise FormatError(f"{index_url}: fragment {fid!r} {problem}; re-convert or re-upload the checkpoint")
    return dict(index["fragments"])


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return f"{type(exc).__name__}: {exc}"


def _content_range_start(header: str | None) -> int | None:
    """The first byte of a ``Content-Range: bytes a-b/total`` header (``None`` if unparsable)."""
    if not header or not header.startswith("bytes "):
        return None
    try:
        return int(header[len("bytes ") :].split("-", 1)[0])
    except ValueError:
        return None


def _skip(response, count: int) -> None:
    """Read and discard ``count`` bytes of a response body."""
    while count > 0:
        chunk = response.read(min(count, _CHUNK))
        if not chunk:
            return
        count -= len(chunk)
