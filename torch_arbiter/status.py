"""The status channel behind ``torch-arbiter top``: each arbiter publishes a small JSON file.

Every :class:`~torch_arbiter.arbiter.Arbiter` (unless ``ArbiterConfig(status_interval_s=None)``)
writes ``<pid>-<n>.json`` into :func:`status_dir` after each rebalance that changed a quality and
every ``status_interval_s`` seconds (so qualities applied later at safe points show up too), from
a thread of its own, and
removes it on ``close()``. A write is atomic (a temporary file renamed into place), the file is
mode 0600 and the directory 0700: only the same user reads them. :func:`read_statuses` skips the
files of processes that are gone (and deletes them) and files that cannot be parsed.

Limits: one machine, one user; a file of a process that was killed stays until the next reader
sees that its pid is dead (a reused pid keeps it listed until its ``updated`` time goes stale).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import stat
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from ._fileio import atomic_write
from .errors import InvalidRequestError

__all__ = ["STATUS_DIR_ENV_VAR", "StatusPublisher", "read_statuses", "status_dir", "status_of"]

STATUS_DIR_ENV_VAR = "TORCH_ARBITER_STATUS_DIR"
"""Environment variable overriding :func:`status_dir` (tests, or several users' separate views)."""

_log = logging.getLogger(__name__)
_counter = itertools.count(1)
_STALE_AFTER_S = 60.0


def status_dir(create: bool = False) -> Path:
    """Where the status files live.

    Args:
        create: make the directory (mode 0700) if it does not exist.

    Returns:
        ``$TORCH_ARBITER_STATUS_DIR`` if set, else ``$XDG_RUNTIME_DIR/torch-arbiter`` when that
        runtime directory exists, else ``<tmp>/torch-arbiter-<uid>``.

    Raises:
        InvalidRequestError: the directory exists but belongs to another user or is writable by
            others (someone could plant or read status files): remove it or set the variable.
    """
    configured = os.environ.get(STATUS_DIR_ENV_VAR)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if configured:
        directory = Path(configured)
    elif runtime and Path(runtime).is_dir():
        directory = Path(runtime) / "torch-arbiter"
    else:
        directory = Path(tempfile.gettempdir()) / f"torch-arbiter-{os.getuid()}"
    if create:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if directory.is_dir():
        info = directory.stat()
        if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise InvalidRequestError(
                f"the status directory {directory} belongs to another user or is writable by others: remove it, "
                f"or set {STATUS_DIR_ENV_VAR} to a private directory")
    return directory


def status_of(arbiter: Any) -> dict:
    """One arbiter's status as the JSON-ready dict that is published.

    Args:
        arbiter: an :class:`~torch_arbiter.arbiter.Arbiter`.

    Returns:
        ``pid``, ``command``, ``updated`` (Unix time), the device's bytes and pressure, the
        counters, and per workload its priority, state, target and in-effect quality, granted,
        resident and full bytes (resident and in-effect only for models patched with this arbiter).
    """
    from .hooks import managed_models

    state = arbiter.state()
    stats = arbiter.stats()
    models = {m.allocation.id: m for m in managed_models(arbiter) if m.allocation is not None}
    workloads = []
    for info in state.workloads:
        model = models.get(info.id)
        workloads.append({
            "id": info.id, "name": info.name, "kind": info.workload, "priority": info.priority.name,
            "state": info.state.name, "target_quality": info.quality,
            "quality": model.quality if model is not None else None,
            "granted_bytes": info.granted_bytes,
            "resident_bytes": model.resident_bytes if model is not None else None,
            "full_bytes": info.full_bytes,
        })
    return {
        "pid": os.getpid(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200] if sys.argv and sys.argv[0] else "python",
        "updated": time.time(),
        "device": arbiter.config.device,
        "total_bytes": state.total_bytes,
        "capacity_bytes": state.capacity_bytes,
        "external_bytes": state.external_bytes,
        "granted_bytes": state.granted_bytes,
        "pressure": state.pressure.name,
        "policy": state.policy.name,
        "waiting": state.waiting,
        "stats": {"rebalances": stats.rebalances, "preemptions": stats.preemptions, "waits": stats.waits,
                  "oom_recoveries": getattr(stats, "oom_recoveries", 0)},
        "workloads": workloads,
    }


class StatusPublisher:
    """Keeps one arbiter's status file up to date (started by the arbiter itself).

    Args:
        arbiter: the arbiter to publish.
        interval_s: seconds between periodic writes (> 0).

    The thread holds the arbiter weakly: it ends when the arbiter is closed or collected.
    A failed write (full disk, a directory refused by :func:`status_dir`) is logged once and
    the arbiter goes on without a status file.
    """

    def __init__(self, arbiter: Any, interval_s: float = 1.0) -> None:
        if not interval_s > 0:
            raise InvalidRequestError(f"status interval must be > 0 seconds, got {interval_s!r}")
        self.interval_s = interval_s
        self.path: Path | None = None
        self._arbiter = weakref.ref(arbiter)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._write_lock = threading.Lock()
        self._failed = False
        try:
            self.path = status_dir(create=True) / f"{os.getpid()}-{next(_counter)}.json"
        except (OSError, InvalidRequestError) as exc:
            self._fail(exc)
        self._thread = threading.Thread(target=self._run, name="torch-arbiter-status", daemon=True)

    def start(self) -> "StatusPublisher":
        """Write the first status and start the periodic writer; returns self."""
        self.publish()
        self._thread.start()
        return self

    def request(self, _changes: object = None) -> None:
        """Ask the writer thread for a write now (the arbiter's listener: it must not slow the
        thread that rebalanced, so the file is written by the publisher's own thread)."""
        self._wake.set()

    def publish(self) -> None:
        """Write the status now, in the calling thread."""
        arbiter = self._arbiter()
        if arbiter is None or self.path is None or self._failed or self._stop.is_set():
            return
        try:
            payload = json.dumps(status_of(arbiter))
            with self._write_lock:
                if not self._stop.is_set():
                    atomic_write(self.path, payload, 0o600)
        except Exception as exc:  # a status file must never break the arbiter
            self._fail(exc)

    def close(self) -> None:
        """Stop writing and remove the file."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        with self._write_lock:
            if self.path is not None:
                self.path.unlink(missing_ok=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._arbiter() is None:  # dropped without close(): its file goes with it
                self.close()
                return
            self.publish()

    def _fail(self, exc: BaseException) -> None:
        if not self._failed:
            _log.warning("torch_arbiter: no status file for `torch-arbiter top` (%s)", exc)
        self._failed = True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def read_statuses(directory: Path | None = None) -> list[dict]:
    """The statuses published by live arbiters on this machine, oldest process first.

    Args:
        directory: where to look; default :func:`status_dir`.

    Returns:
        One dict per arbiter (see :func:`status_of`), each with ``file`` added. Files of dead
        processes are deleted and skipped; unreadable, half-written or stale (not updated for
        60 s) files are skipped.
    """
    directory = directory if directory is not None else status_dir()
    if not directory.is_dir():
        return []
    found = []
    for path in sorted(directory.glob("*.json")):
        try:
            pid = int(path.name.split("-", 1)[0])
        except ValueError:
            continue
        if not _alive(pid):
            path.unlink(missing_ok=True)
            continue
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(status, dict) or time.time() - status.get("updated", 0) > _STALE_AFTER_S:
            continue
        status["file"] = str(path)
        found.append(status)
    return sorted(found, key=lambda s: (s.get("pid", 0), s["file"]))
