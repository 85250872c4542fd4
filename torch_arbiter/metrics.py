"""Prometheus metrics of an :class:`~torch_arbiter.arbiter.Arbiter`, read at scrape time.

:class:`ArbiterCollector` is a ``prometheus_client`` custom collector: it keeps no series of its
own and reads ``arbiter.state()``, ``arbiter.stats()``, every registered model's resident bytes
(:func:`~torch_arbiter.hooks.managed_models`) and the fragment cache's stats each time it is
scraped, so nothing needs updating on the hot path. :func:`serve_metrics` (also
``Arbiter.serve_metrics`` and ``ArbiterConfig(metrics_port=...)``) serves them over HTTP.

Every name starts with ``torch_arbiter_``; bytes are bytes, durations seconds. Per-workload
series carry the labels ``id`` (the allocation id: two models may share a name), ``workload``
(its name) and ``kind`` (``llm_inference``, ...). Cache series carry ``tier``.

``prometheus_client`` comes with the ``metrics`` extra (``pip install 'torch-arbiter[metrics]'``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Iterator

from ._optional import import_optional
from .errors import InvalidRequestError

__all__ = ["ArbiterCollector", "MetricsServer", "serve_metrics"]

_PREFIX = "torch_arbiter_"

_COUNTERS = (  # ArbiterStats field -> (metric name without _total, help)
    ("grants", "grants", "Allocations granted (at once or after waiting)."),
    ("releases", "releases", "Allocations released."),
    ("waits", "waits", "Requests that had to wait for memory."),
    ("total_wait_s", "wait_seconds", "Seconds requests spent waiting for memory."),
    ("quality_reductions", "quality_reductions", "Rebalances that lowered a workload's quality."),
    ("quality_increases", "quality_increases", "Rebalances that raised a workload's quality."),
    ("preemptions", "preemptions", "Active workloads suspended for a higher priority."),
    ("resumptions", "resumptions", "Suspended workloads admitted again."),
    ("failures", "failures", "Requests refused or abandoned."),
    ("timeouts", "timeouts", "Requests that timed out waiting for memory."),
    ("oom_recoveries", "oom_recoveries", "Out-of-memory errors recovered by reclaiming memory and retrying."),
    ("rebalances", "rebalances", "Times every workload's target was recomputed."),
)


def _prometheus():
    import_optional("prometheus_client.core", "metrics", "Prometheus metrics")
    return import_optional("prometheus_client", "metrics", "Prometheus metrics")


class ArbiterCollector:
    """A ``prometheus_client`` collector that reads one arbiter each time it is scraped.

    Args:
        arbiter: the :class:`~torch_arbiter.arbiter.Arbiter` to expose.
        cache: a :class:`~torch_arbiter.cache.FragmentCache` whose tiers to expose; default the
            arbiter's own ``cache`` attribute when it has one, else no cache series.

    Register it with ``prometheus_client.CollectorRegistry().register(ArbiterCollector(a))`` or
    use :func:`serve_metrics`.

    Limits: rebalance latency is the duration of the last rebalance (a gauge), not a histogram;
    resident bytes are those of models patched with ``register=True`` (see
    :func:`~torch_arbiter.hooks.managed_models`).
    """

    def __init__(self, arbiter: Any, cache: Any = None) -> None:
        _prometheus()
        self.arbiter = arbiter
        self.cache = cache

    def describe(self) -> list:
        """No fixed description: registering the collector must not read the arbiter."""
        return []

    def collect(self) -> Iterator[Any]:
        """Yield the metric families of one consistent reading (called by ``prometheus_client``).

        Returns:
            An iterator of ``GaugeMetricFamily`` / ``CounterMetricFamily``.
        """
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from .hooks import managed_models

        state = self.arbiter.state()
        stats = self.arbiter.stats()
        models = {m.allocation.id: m for m in managed_models(self.arbiter) if m.allocation is not None}

        def gauge(name: str, doc: str, value: float | None = None, labels: tuple[str, ...] = ()) -> Any:
            return GaugeMetricFamily(_PREFIX + name, doc, value=value, labels=labels or None)

        yield gauge("device_total_bytes", "Size of the device the arbiter plans with (virtual on CPU).", state.total_bytes)
        yield gauge("device_capacity_bytes", "Bytes the arbiter may grant now: total minus reserve minus external.",
                    state.capacity_bytes)
        yield gauge("device_external_bytes", "Bytes held on the device by other processes.", state.external_bytes)
        yield gauge("device_granted_bytes", "Bytes granted to this arbiter's workloads.", state.granted_bytes)
        yield gauge("memory_pressure", "Device memory pressure: 0 LOW, 1 MODERATE, 2 HIGH, 3 CRITICAL.",
                    int(state.pressure))
        yield gauge("waiting_requests", "Requests waiting for memory now.", state.waiting)
        yield gauge("rebalance_last_seconds", "Duration of the last rebalance.", stats.last_rebalance_s)

        labels = ("id", "workload", "kind")
        per_workload = {
            "quality": gauge("workload_quality", "Quality the arbiter grants (share of full weight bytes).", labels=labels),
            "effect": gauge("workload_quality_in_effect", "Quality the model runs at now (applied at safe points).",
                            labels=labels),
            "granted": gauge("workload_granted_bytes", "Bytes granted to the workload (weights and activations).",
                             labels=labels),
            "resident": gauge("workload_resident_bytes", "Weight bytes the model holds now, measured from its tensors.",
                              labels=labels),
            "full": gauge("workload_full_bytes", "Weight bytes of the workload at quality 1.", labels=labels),
            "priority": gauge("workload_priority", "Priority: 0 BACKGROUND, 1 LOW, 2 NORMAL, 3 HIGH, 4 CRITICAL.",
                              labels=labels),
            "suspended": gauge("workload_suspended", "1 while the workload is preempted or waiting, else 0.",
                               labels=labels),
        }
        for info in state.workloads:
            values = [str(info.id), info.name, info.workload]
            model = models.get(info.id)
            per_workload["quality"].add_metric(values, info.quality)
            per_workload["granted"].add_metric(values, info.granted_bytes)
            per_workload["full"].add_metric(values, info.full_bytes)
            per_workload["priority"].add_metric(values, int(info.priority))
            per_workload["suspended"].add_metric(values, 0 if info.state.name == "ACTIVE" else 1)
            if model is not None:
                per_workload["effect"].add_metric(values, model.quality)
                per_workload["resident"].add_metric(values, model.resident_bytes)
        yield from per_workload.values()

        for field_name, name, doc in _COUNTERS:
            yield CounterMetricFamily(_PREFIX + name, doc, value=getattr(stats, field_name, 0))

        cache = self.cache if self.cache is not None else getattr(self.arbiter, "cache", None)
        if cache is not None:
            yield from self._cache_families(cache.stats(), GaugeMetricFamily, CounterMetricFamily)

    @staticmethod
    def _cache_families(cache_stats: Any, gauge_family: Any, counter_family: Any) -> Iterator[Any]:
        resident = gauge_family(_PREFIX + "cache_resident_bytes", "Bytes of fragment copies held in each tier.",
                                labels=["tier"])
        entries = gauge_family(_PREFIX + "cache_entries", "Fragments with a copy in each tier.", labels=["tier"])
        hit_rate = gauge_family(_PREFIX + "cache_hit_rate", "Share of lookups of a tier that found the fragment there.",
                                labels=["tier"])
        hits = counter_family(_PREFIX + "cache_hits", "Lookups served by each tier.", labels=["tier"])
        misses = counter_family(_PREFIX + "cache_misses", "Lookups of each tier that missed.", labels=["tier"])
        bytes_in = counter_family(_PREFIX + "cache_in_bytes", "Bytes written into each tier.", labels=["tier"])
        bytes_out = counter_family(_PREFIX + "cache_out_bytes", "Bytes read out of each tier to another.",
                                   labels=["tier"])
        fetch = gauge_family(_PREFIX + "cache_fetch_seconds", "Seconds per read from a DISK or REMOTE tier.",
                             labels=["tier", "quantile"])
        for tier in cache_stats.resident_bytes:
            label = [tier.name]
            resident.add_metric(label, cache_stats.resident_bytes[tier])
            entries.add_metric(label, cache_stats.entries[tier])
            hit_rate.add_metric(label, cache_stats.hit_rate(tier))
            hits.add_metric(label, cache_stats.hits[tier])
            misses.add_metric(label, cache_stats.misses[tier])
            bytes_in.add_metric(label, cache_stats.bytes_in[tier])
            bytes_out.add_metric(label, cache_stats.bytes_out[tier])
            fetch.add_metric([tier.name, "0.5"], cache_stats.fetch_p50_s[tier])
            fetch.add_metric([tier.name, "0.99"], cache_stats.fetch_p99_s[tier])
        yield from (resident, entries, hit_rate, hits, misses, bytes_in, bytes_out, fetch)
        yield counter_family(_PREFIX + "cache_promoted_bytes", "Bytes copied to a higher tier.",
                             value=cache_stats.bytes_promoted)
        yield counter_family(_PREFIX + "cache_demoted_bytes", "Bytes copied to a lower tier.",
                             value=cache_stats.bytes_demoted)
        yield counter_family(_PREFIX + "cache_evictions", "Copies dropped from a tier.", value=cache_stats.evictions)


@dataclass
class MetricsServer:
    """A running metrics endpoint (made by :func:`serve_metrics`).

    Attributes:
        addr: the address it listens on.
        port: the port it listens on (the one the OS chose when 0 was asked).
    """

    addr: str
    port: int
    _server: Any
    _thread: threading.Thread

    @property
    def url(self) -> str:
        """The scrape URL, ``http://addr:port/metrics``."""
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and free the port (calling it again does nothing)."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5.0)


def serve_metrics(arbiter: Any, port: int, addr: str = "127.0.0.1", cache: Any = None) -> MetricsServer:
    """Serve an arbiter's Prometheus metrics over HTTP from a daemon thread.

    Args:
        arbiter: the arbiter to expose.
        port: TCP port; 0 lets the OS choose (read it from the result).
        addr: address to bind; the default serves this machine only. Pass ``"0.0.0.0"`` to let a
            Prometheus on another host scrape it (the metrics hold workload names).
        cache: a ``FragmentCache`` to expose too (default: the arbiter's own, if any).

    Returns:
        A :class:`MetricsServer`; call ``close()`` to stop it (``Arbiter.close`` does for the
        server it started).

    Raises:
        OptionalDependencyError: ``prometheus_client`` is not installed.
        InvalidRequestError: the port is out of range or already in use.

    Limits: each server has its own registry holding only this arbiter (no process or Python
    runtime metrics).
    """
    prometheus_client = _prometheus()
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidRequestError(f"metrics port must be an integer in [0, 65535], got {port!r}")
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    registry.register(ArbiterCollector(arbiter, cache=cache))
    try:
        server, thread = prometheus_client.start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        raise InvalidRequestError(
            f"cannot serve metrics on {addr}:{port} ({exc.strerror or exc}): pick a free port, or 0 for any"
        ) from exc
    return MetricsServer(addr, server.server_port, server, thread)
