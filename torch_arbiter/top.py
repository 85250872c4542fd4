"""``torch-arbiter top``: every arbiter running on this machine, per workload, live.

Reads the status files the arbiters publish (:mod:`torch_arbiter.status`); needs the ``demo``
extra (rich) for the table.
"""

from __future__ import annotations

import time
from pathlib import Path

from ._optional import import_optional
from .status import read_statuses, status_dir

__all__ = ["render_statuses", "run_top"]

_MIB = 1 << 20


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / _MIB:,.1f}"


def render_statuses(statuses: list[dict], directory: Path | None = None):
    """A rich renderable: one table per arbiter (its device line as the title), one row per workload.

    Args:
        statuses: from :func:`~torch_arbiter.status.read_statuses`.
        directory: shown when there is nothing to list.

    Returns:
        A ``rich`` renderable (a ``Group`` of tables, or a line of text).
    """
    import_optional("rich", "demo", "torch-arbiter top")
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    if not statuses:
        return Text(f"no arbiter is running on this machine (status files: {directory or status_dir()})")
    tables = []
    for status in statuses:
        title = (f"[bold]pid {status['pid']}[/] {status.get('command', '')} · {status['device']} · "
                 f"device {_mib(status['total_bytes'])} MiB · other processes {_mib(status['external_bytes'])} MiB · "
                 f"granted {_mib(status['granted_bytes'])} MiB · pressure {status['pressure']} · "
                 f"{status['stats']['rebalances']} rebalances, {status['stats']['preemptions']} preemptions")
        table = Table(title=title, title_justify="left")
        for column, justify in (("workload", "left"), ("kind", "left"), ("priority", "left"), ("state", "left"),
                                ("target q", "right"), ("in effect", "right"), ("resident / full MiB", "right"),
                                ("granted MiB", "right")):
            table.add_column(column, justify=justify)
        for w in status["workloads"]:
            table.add_row(w["name"], w["kind"], w["priority"], w["state"], f"{w['target_quality']:.3f}",
                          "-" if w["quality"] is None else f"{w['quality']:.3f}",
                          f"{_mib(w['resident_bytes'])} / {_mib(w['full_bytes'])}", _mib(w["granted_bytes"]))
        if not status["workloads"]:
            table.add_row("(no workload)", "", "", "", "", "", "", "")
        tables.append(table)
    return Group(*tables)


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
