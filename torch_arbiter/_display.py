"""Tables for Jupyter (``_repr_html_``) and rich (``__rich__``) of an Arbiter, a ManagedModel, a HoloTensor.

Each object is turned into one :class:`_View` (a title and rows); the HTML and the rich table are
two renderings of the same view, so they never disagree.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

_MIB = 1 << 20


@dataclass(frozen=True)
class _View:
    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    right: frozenset[str] = frozenset()  # columns aligned right (numbers)

    def html(self) -> str:
        head = "".join(f"<th style='text-align:{self._align(c)}'>{html.escape(c)}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(f"<td style='text-align:{self._align(c)}'>{html.escape(v)}</td>"
                             for c, v in zip(self.columns, row)) + "</tr>"
            for row in self.rows)
        return (f"<div><p><b>{html.escape(self.title)}</b></p>"
                f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")

    def rich(self):
        from rich.table import Table

        table = Table(title=self.title, title_justify="left")
        for column in self.columns:
            table.add_column(column, justify=self._align(column))
        for row in self.rows:
            table.add_row(*row)
        return table

    def _align(self, column: str) -> str:
        return "right" if column in self.right else "left"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / _MIB:,.2f}"


def holo_view(holo: Any) -> _View:
    """The levels of a HoloTensor: bytes, bits per weight and the error measured when encoding."""
    rows = []
    for k in range(1, holo.num_levels + 1):
        fidelity = holo.level_fidelity(k)
        out_error = fidelity.get("out_rel_error")
        rows.append((str(k), fidelity["label"], f"{holo.level_bytes(k):,}", f"{fidelity['bits_per_weight']:.3f}",
                     f"{fidelity['rel_error']:.3e}", "-" if out_error is None else f"{out_error:.3e}"))
    title = (f"HoloTensor {tuple(holo.shape)} {str(holo.dtype).removeprefix('torch.')}, scheme {holo.scheme}"
             + (f", rank {holo.rank}" if holo.rank else "") + f", {holo.num_levels} levels, full {holo.full_bytes:,} bytes")
    columns = ("level", "label", "bytes", "bits/weight", "weight rel. error", "output rel. error")
    return _View(title, columns, tuple(rows), frozenset(columns[2:]))


def managed_view(model: Any) -> _View:
    """A patched model: its quality, its bytes, and how many layers hold each kind of level."""
    if not model.patched:
        return _View(f"ManagedModel({type(model.model).__name__}): unpatched", ("",), ())
    by_label: dict[str, list[int]] = {}
    for name, module in model.layers.items():
        level = module.level
        label = module.holo.level_fidelity(level)["label"] if level else "none"
        counts = by_label.setdefault(label, [0, 0])
        counts[0] += 1
        counts[1] += module.resident_bytes
    pending = model.pending_quality
    allocation = model.allocation
    title = (f"ManagedModel({type(model.model).__name__}): quality {model.quality:.3f}"
             + (f" (pending {pending:.3f})" if pending is not None else "")
             + (f", granted {allocation.quality:.3f} as {allocation.name!r} ({allocation.priority.name})"
                if allocation is not None and not allocation.released else "")
             + f", resident {_mib(model.resident_bytes)} of {_mib(model.full_bytes)} MiB, runs from q={model.min_quality:.3f}")
    rows = [(label, str(count), _mib(nbytes)) for label, (count, nbytes) in sorted(by_label.items())]
    rows.append(("fixed (not Holo)", "-", _mib(model.fixed_bytes)))
    return _View(title, ("level held", "layers", "resident MiB"), tuple(rows), frozenset({"layers", "resident MiB"}))


def status_view(status: dict, prefix: str = "") -> _View:
    """An arbiter's published status (:func:`torch_arbiter.status.status_of`): the device line and one
    row per workload. Used for a live arbiter in Jupyter and for each process in ``torch-arbiter top``."""
    stats = status["stats"]
    title = (f"{prefix}Arbiter on {status['device']}: device {_mib(status['total_bytes'])} MiB, other processes "
             f"{_mib(status['external_bytes'])} MiB, granted {_mib(status['granted_bytes'])} MiB, pressure "
             f"{status['pressure']}, policy {status['policy']}; {stats['rebalances']} rebalances, "
             f"{stats['preemptions']} preemptions, {stats['waits']} waits")
    rows = []
    for w in status["workloads"]:
        rows.append((w["name"], w["kind"], w["priority"], w["state"], f"{w['target_quality']:.3f}",
                     "-" if w["quality"] is None else f"{w['quality']:.3f}", _mib(w["resident_bytes"]),
                     _mib(w["granted_bytes"]), _mib(w["full_bytes"])))
    columns = ("workload", "kind", "priority", "state", "target q", "in effect", "resident MiB", "granted MiB",
               "full MiB")
    return _View(title, columns, tuple(rows), frozenset(columns[4:]))


def arbiter_view(arbiter: Any) -> _View:
    """A live arbiter, as :func:`status_view` of its current status."""
    from .status import status_of

    return status_view(status_of(arbiter))
