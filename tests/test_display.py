"""Jupyter (_repr_html_) and rich (__rich__) views of an Arbiter, a ManagedModel and a HoloTensor."""

from __future__ import annotations

import torch
from rich.console import Console
from torch import nn

from torch_arbiter import Arbiter, ArbiterConfig, HoloTensor, Priority, WorkloadType
from torch_arbiter.hooks import patch


def _text(renderable) -> str:
    console = Console(width=250, record=True, file=open("/dev/null", "w"))
    console.print(renderable)
    return console.export_text()


def test_holo_tensor_shows_its_levels_with_bytes_bits_and_measured_error():
    torch.manual_seed(0)
    holo = HoloTensor.encode(torch.randn(64, 128))
    html, text = holo._repr_html_(), _text(holo)
    for k in range(1, holo.num_levels + 1):
        fidelity = holo.level_fidelity(k)
        for view in (html, text):
            assert f"{holo.level_bytes(k):,}" in view
            assert f"{fidelity['bits_per_weight']:.3f}" in view and f"{fidelity['rel_error']:.3e}" in view
    assert html.count("<tr>") == holo.num_levels + 1  # header + one row per level


def test_arbiter_and_managed_model_show_the_live_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 64)).eval()
    with Arbiter(ArbiterConfig(vram_bytes=8 << 20, status_interval_s=None)) as arbiter:
        managed = patch(model, arbiter, workload=WorkloadType.LLM_INFERENCE, priority=Priority.HIGH, name="net<1>",
                        activation_bytes=0, progress=False)
        managed.set_quality(0.5)
        html, text = arbiter._repr_html_(), _text(arbiter)
        assert "net&lt;1&gt;" in html and "<1>" not in html  # names are escaped
        for view in (html, text):
            assert "HIGH" in view and "0.500" in view and "1.000" in view  # in effect 0.5, granted 1.0
            assert f"{managed.resident_bytes / 2**20:,.2f}" in view
        html, text = managed._repr_html_(), _text(managed)
        for view in (html, text):
            assert "quality 0.500" in view and "granted 1.000" in view
            assert all(module.holo.level_fidelity(module.level)["label"] in view for module in managed.layers.values())
        managed.unpatch()
        assert "unpatched" in managed._repr_html_() and "net" not in arbiter._repr_html_()
