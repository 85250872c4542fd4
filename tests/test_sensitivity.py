"""Sensitivity: recorded top-level calls, each weight's model error, and the planner using it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from torch_arbiter.holo import HoloTensor, plan_quality, record_calls, record_model_errors
from torch_arbiter.holo.calibrate import not_recorded
from torch_arbiter.holo.plan import _error


class _Amplified(nn.Module):
    """Two equal linears; the first one's output reaches the result 30x larger than the second's."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.loud, self.quiet = nn.Linear(128, 128), nn.Linear(128, 128)
        with torch.no_grad():
            for layer in (self.loud, self.quiet):
                layer.weight.copy_(torch.randn(128, 128, generator=generator) * 0.05)

    def forward(self, x, scale=1.0, cache=None):
        return 30 * self.loud(x) * scale + self.quiet(x)


def _inputs(rows=64, seed=1):
    return torch.randn(rows, 128, generator=torch.Generator().manual_seed(seed))


def test_only_top_level_plain_calls_are_recorded_cut_to_the_batch_items_kept():
    model = _Amplified()
    x = _inputs(8)
    with record_calls([model], max_calls=2, max_items=3) as recorded:
        model(x, scale=2.0)
        with not_recorded():
            model(x)
        model(x, cache=SimpleNamespace())  # not plain data (a cache object): a replay could change it
        model(x[:1])
        model(x)  # past max_calls
    assert [call[1][0].shape[0] for call in recorded.calls] == [3, 1]
    assert recorded.calls[0][2] == {"scale": 2.0} and recorded.calls[0][0] is model
    x.add_(1.0)  # the recorded inputs are copies
    assert not torch.equal(recorded.calls[1][1][0], x[:1])
    model(x)  # the hooks are gone
    assert len(recorded.calls) == 2


def test_model_errors_rank_the_amplified_weight_first_and_leave_the_weights_exact():
    model = _Amplified()
    with record_calls([model], max_items=64) as recorded:
        model(_inputs())
    holos = {name: HoloTensor.encode(getattr(model, name).weight.detach().clone(), rank=0)
             for name in ("loud", "quiet")}
    before = model(_inputs(seed=2)).detach()

    def setter(name):
        def set_level(k):
            with torch.no_grad():
                getattr(model, name).weight.copy_(holos[name].decode(k))
        return set_level

    record_model_errors(recorded, {holos[n]: setter(n) for n in holos})
    assert torch.equal(model(_inputs(seed=2)).detach(), before)  # every weight back at its exact level
    loud, quiet = (holos[n].level_fidelity(1)["model_error"] for n in ("loud", "quiet"))
    assert loud > 100 * quiet > 0  # 30x in amplitude: about 900x in squared error
    # The per-layer errors of the two weights are alike, so only the model error tells them apart:
    # with room for one weight's next level, the planner raises the loud one.
    assert _error(holos["loud"], 1) == pytest.approx(loud)
    assert _error(holos["loud"], 2) < _error(holos["loud"], 1)
    step = holos["loud"].level_bytes(2) - holos["loud"].level_bytes(1)
    full = sum(h.full_bytes for h in holos.values())
    plan = plan_quality(holos, (sum(h.level_bytes(1) for h in holos.values()) + step) / full)
    assert plan == {"loud": 2, "quiet": 1}


def test_without_recorded_calls_nothing_is_measured():
    holo = HoloTensor.encode(torch.randn(64, 128), rank=0)
    with record_calls([nn.Linear(2, 2)]) as recorded:
        pass
    record_model_errors(recorded, {holo: lambda k: pytest.fail("nothing to replay")})
    assert "model_error" not in holo.level_fidelity(1)


def test_patch_measures_every_encoded_weight_on_its_self_calibration_and_stays_exact():
    from transformers import BertConfig, BertModel

    from torch_arbiter.hooks import patch

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=128)).eval()
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids).last_hidden_state
    managed = patch(model, register=False, progress=False)
    try:
        encoded = [m.holo for m in managed.layers.values() if m.holo.num_levels > 1]
        assert encoded and all(h.level_fidelity(1)["model_error"] > 0 for h in encoded)
        with torch.no_grad():
            assert torch.equal(model(ids).last_hidden_state, expected)
    finally:
        managed.unpatch()
    plain = patch(model, register=False, progress=False, calibration=False)
    try:
        assert not any("model_error" in m.holo.level_fidelity(1) for m in plain.layers.values())
    finally:
        plain.unpatch()


def test_a_pipeline_is_planned_by_its_per_layer_errors():
    # One UNet call's output error misranks a denoising loop's weights (see _measure_sensitivity).
    from torch_arbiter.demo.models import load_digits_ddpm
    from torch_arbiter.hooks import patch

    managed = patch(load_digits_ddpm(), register=False, progress=False)
    try:
        encoded = [m.holo for m in managed.layers.values() if m.holo.num_levels > 1]
        assert encoded and all("out_rel_error" in h.level_fidelity(1) for h in encoded)
        assert not any("model_error" in h.level_fidelity(1) for h in encoded)
    finally:
        managed.unpatch()
