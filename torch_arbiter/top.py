"""``torch-arbiter top``: every arbiter running on this machine, per workload, live.

Reads the status files the arbiters publish (:mod:`torch_arbiter.status`); needs the ``demo``
extra (rich) for the table.
"""

from __future__ import annotations

import time
from pathlib import Path

from ._display import status_view
from ._optional import import_optional
from .status import read_statuses, status_dir

__all__ = ["render_statuses", "run_top"]


def render_statuses(statuses: list[dict], directory: Path | None = None):
    """A rich renderable: one table per arbiter (pid, command and device line as the title), one row per workload.

    Args:
        statuses: from :func:`~torch_arbiter.status.read_statuses`.
        directory: shown when there is nothing to list.

    Returns:
        A ``rich`` renderable (a ``Group`` of tables, or a line of text).
    """
    import_optional("rich", "demo", "torch-arbiter top")
    from rich.console import Group
    from rich.text import Text

    if not statuses:
        return Text(f"no arbiter is running on this machine (status files: {directory or status_dir()})")
    return Group(*(status_view(s, prefix=f"pid {s['pid']} ({s.get('command', '')}): ").rich() for s in statuses))


def run_top(once: bool = False, interval_s: float = 1.0) -> int:
    """Show the arbiters of this machine until Ctrl-C (or once).

    Args:
        once: print one view and return.
        interval_s: seconds between refreshes.

    Returns:
        0.

    Limits: in a terminal the view redraws in place; otherwise (a pipe, a log) a new view is
    printed every ``interval_s``.
    """
    import_optional("rich", "demo", "torch-arbiter top")
    from rich.console import Console
    from rich.live import Live

    console = Console()
    directory = status_dir()
    if once:
        console.print(render_statuses(read_statuses(directory), directory))
        return 0
    if not console.is_terminal:
        while True:
            console.print(render_statuses(read_statuses(directory), directory))
            time.sleep(interval_s)
    with Live(render_statuses(read_statuses(directory), directory), console=console, screen=False,
              auto_refresh=False) as live:
        while True:
            time.sleep(interval_s)
            live.update(render_statuses(read_statuses(directory), directory), refresh=True)
