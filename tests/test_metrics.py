"""Prometheus metrics: a real HTTP endpoint on 127.0.0.1, scraped and parsed with prometheus_client's parser."""

from __future__ import annotations

import socket
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from torch_arbiter import Arbiter, ArbiterConfig, CacheConfig, CacheTier, FragmentCache, Priority, WorkloadType
from torch_arbiter.errors import InvalidRequestError, UnknownFragmentError
from torch_arbiter.hooks import managed_models, patch
from torch_arbiter.metrics import serve_metrics

_MIB = 1 << 20


def _scrape(url: str) -> dict[str, list]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def _value(samples, name, **labels) -> float:
    found = [s.value for s in samples[name] if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 256), nn.GELU(), nn.Linear(256, 128)).eval()


def test_scraped_metrics_follow_the_arbiter_and_the_model(tmp_path):
    model = _model()
    full = sum(p.nbytes for p in model.parameters())
    device = full + full // 2  # the model's floor and part of its levels fit, not all of it
    with Arbiter(ArbiterConfig(vram_bytes=device, metrics_port=0)) as arbiter, \
            FragmentCache(CacheConfig(device="cpu", spill_dir=tmp_path)) as cache:
        [url] = arbiter.metrics_urls
        managed = patch(model, arbiter, workload=WorkloadType.LLM_INFERENCE, priority=Priority.HIGH,
                        name="chat", activation_bytes=0, progress=False)
        assert managed_models(arbiter) == [managed]
        cache.put("a", torch.ones(256), tier=CacheTier.HOST)
        cache.get("a")
        with pytest.raises(UnknownFragmentError):
            cache.get("missing")
        second = serve_metrics(arbiter, 0, cache=cache)
        try:
            samples = _scrape(second.url)
        finally:
            second.close()
        chat = {"workload": "chat", "kind": "llm_inference"}
        assert _value(samples, "torch_arbiter_workload_quality", **chat) == pytest.approx(managed.allocation.quality)
        assert _value(samples, "torch_arbiter_workload_quality_in_effect", **chat) == pytest.approx(managed.quality)
        assert _value(samples, "torch_arbiter_workload_resident_bytes", **chat) == managed.resident_bytes
        assert _value(samples, "torch_arbiter_workload_granted_bytes", **chat) == managed.allocation.granted_bytes
        assert _value(samples, "torch_arbiter_workload_priority", **chat) == int(Priority.HIGH)
        assert _value(samples, "torch_arbiter_device_total_bytes") == device
        assert _value(samples, "torch_arbiter_grants_total") == 1
        assert _value(samples, "torch_arbiter_oom_recoveries_total") == 0
        assert _value(samples, "torch_arbiter_cache_resident_bytes", tier="HOST") == 1024
        assert _value(samples, "torch_arbiter_cache_hits_total", tier="HOST") == 1
        assert _value(samples, "torch_arbiter_cache_misses_total", tier="HOST") == 1  # the "missing" lookup
        for tier in CacheTier:
            assert _value(samples, "torch_arbiter_cache_hit_rate", tier=tier.name) == cache.stats().hit_rate(tier)

        # Another process takes most of the device: the next scrape shows the model lowered.
        before = _value(samples, "torch_arbiter_workload_resident_bytes", **chat)
        arbiter.tracker.set_external_bytes(device // 2)
        arbiter.rebalance()
        after = _scrape(url)
        assert _value(after, "torch_arbiter_device_external_bytes") == device // 2
        assert _value(after, "torch_arbiter_workload_resident_bytes", **chat) < before
        assert _value(after, "torch_arbiter_quality_reductions_total") >= 1
        assert _value(after, "torch_arbiter_rebalances_total") > _value(samples, "torch_arbiter_rebalances_total")
        assert _value(after, "torch_arbiter_memory_pressure") == int(arbiter.state().pressure)
        # The arbiter's own cache: the patched model's fragments, resident at DEVICE.
        own = arbiter.cache.stats()
        assert _value(after, "torch_arbiter_cache_resident_bytes", tier="DEVICE") == own.resident_bytes[CacheTier.DEVICE] > 0
        assert _value(after, "torch_arbiter_cache_in_bytes_total", tier="DEVICE") == own.bytes_in[CacheTier.DEVICE] > 0
        assert _value(after, "torch_arbiter_cache_fetch_seconds", tier="DISK", quantile="0.99") == own.fetch_p99_s[CacheTier.DISK]
        managed.unpatch()
        assert _value(_scrape(url), "torch_arbiter_releases_total") == 1
    with pytest.raises(OSError):  # close() stopped the endpoint
        urllib.request.urlopen(url, timeout=2)


def test_bad_or_busy_ports_are_typed_errors():
    with pytest.raises(InvalidRequestError, match="metrics_port"):
        ArbiterConfig(vram_bytes=_MIB, metrics_port=70000)
    with Arbiter(ArbiterConfig(vram_bytes=_MIB)) as arbiter:
        with pytest.raises(InvalidRequestError, match="port"):
            arbiter.serve_metrics(-1)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            with pytest.raises(InvalidRequestError, match="free port"):
                arbiter.serve_metrics(taken.getsockname()[1])
