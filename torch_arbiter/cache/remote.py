"""The REMOTE tier: a holo checkpoint served over HTTP(S), read one fragment at a time.

The server needs nothing special: any static file server that honours ``Range`` headers (nginx,
a CDN, object storage, ``ThreadingHTTPServer`` with a range-capable handler) serving the holo
checkpoint directory as is. The tier fetches ``holo_index.json`` once, then each fragment with
one ``Range: bytes=offset-end`` request, and decodes the bytes through
``torch_arbiter.holo.format.decode_fragment``, which checks the length and sha256 and names the
URL in its error.

A server is not trusted: each request has a deadline (``timeout`` seconds for the whole request,
connect to last byte, however slowly the server drips), a body is never read past what the index
says (the index itself past ``max_index_bytes``), protocol garbage becomes a typed error, plain
``http://`` is refused for hosts other than loopback unless ``allow_insecure=True``, and a
redirect to another host is refused unless ``allow_cross_host_redirects=True``.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Iterable

import torch

from ..errors import CorruptFragmentError, InvalidRequestError
from ..holo.format import INDEX_NAME, MAX_FRAGMENT_BYTES, MAX_INDEX_BYTES, decode_fragment, parse_index
from .base import TierStore
from .config import CacheTier

__all__ = ["RemoteTier"]

_CHUNK = 1 << 20
_MAX_REDIRECTS = 5
_MAX_HEADER_BYTES = 64 << 10


class RemoteTier(TierStore):
    """A read-only tier backed by a holo checkpoint over HTTP.

    Args:
        url: base URL of the checkpoint directory (``holo_index.json`` is fetched from there).
        timeout: seconds each request may take in all (connect, headers and body): a deadline,
            not a per-read timeout.
        allow_insecure: allow plain ``http://`` to a host other than loopback (the checksums
            still protect the data, but anyone on the path sees what is fetched).
        allow_cross_host_redirects: follow a redirect to another host (e.g. a CDN); same-host
            redirects are always followed (at most 5 hops).
        max_index_bytes: refuse a larger index.
        max_fragment_bytes: refuse an index entry for a larger fragment.

    Raises (at construction):
        InvalidRequestError: an insecure or malformed URL.
        CorruptFragmentError: the index cannot be fetched (server down, 404, timeout, garbage).
        FormatError: the index is not a valid holo index.

    Limits: one connection per request (no keep-alive pooling); a server that ignores ``Range``
    and answers 200 with the whole file still works, at the cost of streaming the file up to the
    fragment's end (within the deadline).
    """

    tier = CacheTier.REMOTE
    writable = False

    def __init__(self, url: str, *, timeout: float = 30.0, allow_insecure: bool = False,
                 allow_cross_host_redirects: bool = False, max_index_bytes: int = MAX_INDEX_BYTES,
                 max_fragment_bytes: int = MAX_FRAGMENT_BYTES) -> None:
        self.base_url = url if url.endswith("/") else url + "/"
        self.timeout = float(timeout)
        self.allow_insecure = bool(allow_insecure)
        self.allow_cross_host_redirects = bool(allow_cross_host_redirects)
        check_remote_url(self.base_url, allow_insecure=self.allow_insecure)
        index_url = urllib.parse.urljoin(self.base_url, INDEX_NAME)
        raw_index = self._get(index_url, None, max_index_bytes, what="the holo index")
        self.index = parse_index(raw_index, index_url, max_index_bytes=max_index_bytes,
                                 max_fragment_bytes=max_fragment_bytes)
        self._entries: dict[str, dict] = self.index["fragments"]

    def read(self, key: str) -> torch.Tensor:
        return self.read_source(key)

    def read_source(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        url = urllib.parse.urljoin(self.base_url, urllib.parse.quote(entry["file"]))
        offset, length = entry["offset"], entry["length"]
        raw = self._get(url, (offset, length), length, what=f"fragment {key!r} (bytes {offset}+{length})") if length else b""
        return decode_fragment(entry, raw, source=url)

    def write(self, key: str, tensor: torch.Tensor) -> int:
        raise InvalidRequestError("the REMOTE tier is read-only; put fragments at DEVICE, HOST or DISK")

    def delete(self, key: str) -> None:
        raise InvalidRequestError("the REMOTE tier is read-only; its fragments cannot be deleted from here")

    def source_has(self, key: str) -> bool:
        return key in self._entries

    def source_keys(self) -> Iterable[str]:
        return self._entries.keys()

    def fetch(self, url: str, limit: int, *, what: str) -> bytes:
        """GET a whole file under the same rules as fragments (deadline, redirects, size cap).

        Raises:
            CorruptFragmentError: no complete answer (the message names the HTTP status).
        """
        return self._get(url, None, limit, what=what)

    def _get(self, url: str, byte_range: tuple[int, int] | None, limit: int, *, what: str) -> bytes:
        """GET ``url`` (one byte range of it, or all of it up to ``limit`` bytes) by the deadline.

        Every failure, whatever the server does, is a :class:`CorruptFragmentError` naming the
        URL and what to do.
        """
        deadline = time.monotonic() + self.timeout
        try:
            for _ in range(_MAX_REDIRECTS + 1):
                location = self._request(url, byte_range, limit, deadline)
                if time.monotonic() >= deadline:  # the watchdog may have cut the body short
                    raise _Refused("the deadline passed")
                if isinstance(location, bytes):
                    return location
                url = self._follow(url, location)
            raise _Refused(f"more than {_MAX_REDIRECTS} redirects")
        except _Refused as exc:
            problem = str(exc)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            problem = f"{type(exc).__name__}: {exc}"[:300]
        if time.monotonic() >= deadline:
            problem = f"no complete answer within remote_timeout={self.timeout:g} s ({problem})"
        raise CorruptFragmentError(
            f"could not fetch {what} from {url}: {problem}; check that the server is up and serves the "
            "holo checkpoint directory it was converted to") from None

    def _follow(self, url: str, location: str) -> str:
        target = urllib.parse.urljoin(url, location)
        old, new = urllib.parse.urlsplit(url), urllib.parse.urlsplit(target)
        if new.scheme not in ("http", "https"):
            raise _Refused(f"redirect to {target!r}, which is not http(s)")
        if (new.hostname, new.port) != (old.hostname, old.port) and not self.allow_cross_host_redirects:
            raise _Refused(f"redirect to another host ({target}); pass allow_cross_host_redirects=True "
                           "(CacheConfig.allow_cross_host_redirects) to follow it")
        try:
            check_remote_url(target, allow_insecure=self.allow_insecure)
        except InvalidRequestError as exc:
            raise _Refused(str(exc)) from None
        return target

    def _request(self, url: str, byte_range: tuple[int, int] | None, limit: int, deadline: float) -> bytes | str:
        """One request: the body bytes, or the ``Location`` of a redirect."""
        parts = urllib.parse.urlsplit(url)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Refused("the deadline passed")
        connection_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        extra = {"context": ssl.create_default_context()} if parts.scheme == "https" else {}
        # An explicit port keeps http.client from parsing one out of an IPv6 literal.
        port = parts.port or (443 if parts.scheme == "https" else 80)
        connection = connection_type(parts.hostname, port, timeout=remaining, **extra)
        # The deadline: a timer shuts the socket down, which ends any blocked read at once.
        watchdog = threading.Timer(remaining, _abort, (connection,))
        watchdog.daemon = True
        watchdog.start()
        try:
            headers = {"Accept-Encoding": "identity"}
            if byte_range is not None:
                headers["Range"] = f"bytes={byte_range[0]}-{byte_range[0] + byte_range[1] - 1}"
            target = parts.path or "/"
            connection.request("GET", target + (f"?{parts.query}" if parts.query else ""), headers=headers)
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location or len(location) > 8192:
                    raise _Refused(f"HTTP {response.status} without a usable Location")
                return location
            if response.status == 206 and byte_range is not None:
                start = _content_range_start(response.getheader("Content-Range"))
                if start != byte_range[0]:
                    raise _Refused(f"the server answered the range starting at {start} instead of {byte_range[0]}; "
                                   "its Range support is broken")
                return _read_body(response, limit)
            if response.status == 200:
                if byte_range is None:
                    return _read_body(response, limit)
                # The server ignored Range and sends the whole file: skip to the fragment, read it.
                _read_upto(response, byte_range[0], keep=False)
                return _read_upto(response, limit, keep=True)
            raise _Refused(f"HTTP {response.status} {response.reason[:100]}")
        finally:
            watchdog.cancel()
            connection.close()


class _Refused(Exception):
    """A server answer this tier will not use (message says why)."""


def check_remote_url(url: object, *, allow_insecure: bool = False) -> str:
    """Check that ``url`` is an http(s) URL this tier may fetch from.

    Args:
        url: the URL.
        allow_insecure: allow plain ``http://`` to a host that is not loopback.

    Returns:
        The URL.

    Raises:
        InvalidRequestError: not an http(s) URL with a host, or plain http to a non-loopback host
            without ``allow_insecure``.
    """
    parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
    try:
        host = parts.hostname if parts is not None else None
        _ = parts.port if parts is not None else None
    except ValueError:
        host = None
    if parts is None or parts.scheme not in ("http", "https") or not host:
        raise InvalidRequestError(f"a remote checkpoint URL must be http:// or https:// with a host, got {url!r}")
    if parts.scheme == "http" and not allow_insecure and not _is_loopback(host):
        raise InvalidRequestError(
            f"{url} is plain http to {host}, which is not this machine: use https://, or pass "
            "allow_insecure=True (CacheConfig.allow_insecure) if this network is trusted")
    return url


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _abort(connection: http.client.HTTPConnection) -> None:
    sock = connection.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _read_body(response: http.client.HTTPResponse, limit: int) -> bytes:
    """The whole body, refused when it declares or turns out to be longer than ``limit`` bytes."""
    declared = response.getheader("Content-Length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise _Refused(f"Content-Length {declared[:40]!r} is not a number")
        if int(declared) > limit:
            raise _Refused(f"the server announces {int(declared)} bytes where at most {limit} are expected "
                           "(raise CacheConfig.max_index_bytes if the index is really that large)")
    body = _read_upto(response, limit, keep=True)
    if declared is not None and len(body) != int(declared):
        raise _Refused(f"IncompleteRead: the body ended after {len(body)} of its {int(declared)} bytes")
    if len(body) == limit and response.read(1):
        raise _Refused(f"the body is longer than the {limit} bytes expected")
    return body


def _read_upto(response: http.client.HTTPResponse, count: int, *, keep: bool) -> bytes:
    """Read at most ``count`` bytes of the body (fewer if it ends), keeping them or not."""
    chunks = []
    while count > 0:
        chunk = response.read(min(count, _CHUNK))
        if not chunk:
            break
        count -= len(chunk)
        if keep:
            chunks.append(chunk)
    return b"".join(chunks)


def _content_range_start(header: str | None) -> int | None:
    """The first byte of a ``Content-Range: bytes a-b/total`` header (``None`` if unparsable)."""
    if not header or not header.startswith("bytes "):
        return None
    try:
        return int(header[len("bytes ") :].split("-", 1)[0])
    except ValueError:
        return None
