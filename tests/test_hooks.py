"""patch(), ManagedModel and the safe-point switch on small real modules (fast tests).

The real-model tests (SmolLM2, the digits DDPM) are in test_hooks_smollm2.py and
test_hooks_ddpm.py.
"""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torch_arbiter import Arbiter, ArbiterConfig, Priority, WorkloadType
from torch_arbiter.errors import InvalidRequestError, PatchError
from torch_arbiter.holo import save_holo
from torch_arbiter.hooks import (
    SAFE_POINT_HOOK,
    SafePointSwitch,
    apply_safe_point_hook,
    managed_model_of,
    patch,
)
from torch_arbiter.nn import HoloConv2d, HoloEmbedding, HoloLinear


class _Small(nn.Module):
    """A conv, two linears, a norm and an embedding: every case the swap must handle."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.conv = nn.Conv2d(4, 64, 3, padding=1)
        self.up = nn.Linear(64, 256)
        self.norm = nn.LayerNorm(256)
        self.down = nn.Linear(256, 64, bias=False)

    def forward(self, tokens, image):
        hidden = self.embed(tokens) + self.conv(image).mean(dim=(2, 3))[:, None, :]
        return self.down(torch.nn.functional.gelu(self.norm(self.up(hidden))))


def _small_model(seed: int = 0) -> _Small:
    torch.manual_seed(seed)
    return _Small().eval()


def _inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 50, (2, 5), generator=generator), torch.randn(2, 4, 8, 8, generator=generator)


def _state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)


@pytest.fixture(scope="module")
def managed_small():
    """A patched _Small (not registered with an arbiter) and its unpatched twin."""
    model = _small_model()
    reference = copy.deepcopy(model)
    managed = patch(model, register=False, progress=False)
    yield managed, reference
    managed.unpatch()


# -- the safe-point switch --------------------------------------------------------------------------


def test_switch_applies_at_once_when_no_forward_runs():
    applied = []
    switch = SafePointSwitch(applied.append)
    assert switch.request(0.5) is True
    assert applied == [0.5] and not switch.has_pending


def test_switch_waits_for_the_running_forward_and_keeps_only_the_newest_request():
    applied = []
    switch = SafePointSwitch(applied.append)
    entered, release = threading.Event(), threading.Event()
    module = nn.Identity()
    apply_safe_point_hook(module, switch)

    def slow_forward(_module, _args):
        entered.set()
        assert release.wait(10)

    module.register_forward_pre_hook(slow_forward)
    runner = threading.Thread(target=module, args=(torch.zeros(1),))
    runner.start()
    assert entered.wait(10)
    assert switch.request(0.3) is False
    assert switch.request(0.7) is False
    assert applied == [] and switch.pending == 0.7 and switch.running == 1
    release.set()
    runner.join(10)
    assert applied == [0.7] and switch.running == 0 and not switch.has_pending


def test_switch_is_released_when_the_forward_raises():
    applied = []
    switch = SafePointSwitch(applied.append)

    class Failing(nn.Module):
        def forward(self, x):
            switch.request(0.25)  # requested mid-forward: must wait
            assert applied == []
            raise RuntimeError("boom")

    module = Failing()
    apply_safe_point_hook(module, switch)
    with pytest.raises(RuntimeError, match="boom"):
        module(torch.zeros(1))
    assert switch.running == 0 and applied == [0.25]


def test_safe_point_hook_composes_with_diffusers_hooks_and_is_removed_cleanly():
    from diffusers import UNet2DModel
    from diffusers.hooks import HookRegistry, ModelHook

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()
    calls = []

    class Counting(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append("other")
            return args, kwargs

    switch = SafePointSwitch(lambda value: calls.append(("applied", value)))

    class Probe(ModelHook):  # registered before ours, so it runs inside our guard
        def pre_forward(self, module, *args, **kwargs):
            calls.append(("running", switch.running))
            return args, kwargs

    registry = HookRegistry.check_if_exists_or_initialize(unet)
    registry.register_hook(Counting(), "other_hook")
    registry.register_hook(Probe(), "probe")
    handle = apply_safe_point_hook(unet, switch)
    assert registry.get_hook(SAFE_POINT_HOOK) is not None
    with torch.no_grad():
        unet(torch.zeros(1, 1, 8, 8), 3)
    assert ("running", 1) in calls and "other" in calls and switch.running == 0
    handle.remove()
    assert registry.get_hook(SAFE_POINT_HOOK) is None and registry.get_hook("other_hook") is not None
    calls.clear()
    with torch.no_grad():
        unet(torch.zeros(1, 1, 8, 8), 3)
    assert calls == [("running", 0), "other"]  # the other hooks still run, ours is gone
    handle.remove()  # a second remove does nothing


# -- patch / ManagedModel ---------------------------------------------------------------------------


def test_patch_swaps_supported_layers_and_is_exact_at_quality_one(managed_small):
    managed, reference = managed_small
    model = managed.model
    managed.set_quality(1.0)
    assert isinstance(model.up, HoloLinear) and isinstance(model.down, HoloLinear)
    assert isinstance(model.conv, HoloConv2d) and isinstance(model.embed, HoloEmbedding)
    assert isinstance(model.norm, nn.LayerNorm)
    assert set(managed.levels) == {"embed.weight", "conv.weight", "up.weight", "down.weight"}
    with torch.no_grad():
        assert torch.equal(model(*_inputs()), reference(*_inputs()))
    assert managed.resident_bytes == managed.full_bytes == managed.bytes_at(1.0)
    assert managed.full_bytes == sum(t.numel() * t.element_size() for t in reference.state_dict().values())


def test_resident_bytes_are_measured_equal_the_plan_and_drop_with_quality(managed_small):
    managed, reference = managed_small
    seen = []
    for q in (1.0, 0.8, 0.6, 0.4, managed.min_quality):
        assert managed.set_quality(q) is True
        assert managed.quality == pytest.approx(q)
        assert managed.resident_bytes == managed.bytes_at(q)
        assert managed.bytes_at(q) <= q * managed.full_bytes + 1e-6
        seen.append(managed.resident_bytes)
        with torch.no_grad():
            out, expected = managed.model(*_inputs()), reference(*_inputs())
        assert (out - expected).norm() / expected.norm() < 0.2
    assert seen == sorted(seen, reverse=True) and seen[-1] < seen[0] // 2
    managed.set_quality(1.0)


def test_below_min_quality_the_lowest_runnable_plan_applies(managed_small):
    managed, _ = managed_small
    managed.set_quality(0.0)
    assert managed.quality == managed.min_quality
    assert all(level == 1 for level in managed.levels.values())
    assert managed.bytes_at(0.0) == managed.bytes_at(managed.min_quality) == managed.resident_bytes
    managed.set_quality(1.0)


@settings(max_examples=40, deadline=None)
@given(st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_plan_is_monotone_and_fits(managed_small, a, b):
    managed, _ = managed_small
    low, high = sorted((a, b))
    assert managed.bytes_at(low) <= managed.bytes_at(high)
    levels_low, levels_high = managed.levels_at(low), managed.levels_at(high)
    assert all(levels_low[name] <= levels_high[name] for name in levels_low)
    if high >= managed.min_quality:
        assert managed.bytes_at(high) <= high * managed.full_bytes


def test_curve_points_are_the_exact_bytes_of_each_step(managed_small):
    managed, _ = managed_small
    curve = managed.curve
    assert curve[0] == (managed.min_quality, managed.bytes_at(managed.min_quality))
    assert curve[-1] == (1.0, managed.full_bytes)
    for (q0, b0), (q1, b1) in zip(curve, curve[1:]):
        assert q0 < q1 and b0 < b1
    for q, nbytes in curve:
        assert managed.bytes_at(q) == nbytes
        below = math.nextafter(q, -1.0)
        if q > managed.min_quality:
            assert managed.bytes_at(below) < nbytes  # q is the lowest quality with those bytes


@pytest.mark.parametrize("bad", [float("nan"), -0.01, 1.01, "high", None, True])
def test_set_quality_rejects_bad_values(managed_small, bad):
    managed, _ = managed_small
    before = managed.levels
    with pytest.raises(InvalidRequestError):
        managed.set_quality(bad)
    with pytest.raises(InvalidRequestError):
        managed.bytes_at(bad)
    assert managed.levels == before


def test_patching_twice_is_refused(managed_small):
    managed, _ = managed_small
    with pytest.raises(PatchError, match="already patched"):
        patch(managed.model, register=False, progress=False)
    assert managed_model_of(managed.model) is managed


def test_patching_a_model_without_supported_layers_is_refused_and_leaves_it_alone():
    model = nn.Sequential(nn.Embedding(10, 8, max_norm=1.0), nn.LayerNorm(8))
    before = copy.deepcopy(model)
    with pytest.raises(PatchError, match="no nn.Linear, nn.Conv2d or nn.Embedding"):
        patch(model, register=False, progress=False)
    assert _state_equal(model, before) and managed_model_of(model) is None
    with pytest.raises(PatchError, match="takes a transformers"):
        patch("not a model", register=False)


def test_unpatch_restores_modules_and_parameters_bit_for_bit():
    model = _small_model(3)
    reference = copy.deepcopy(model)
    up, up_weight, conv_bias = model.up, model.up.weight, model.conv.bias
    managed = patch(model, register=False, progress=False)
    assert up.weight.numel() == 0  # no hidden full copy kept in the original layer
    managed.set_quality(0.5)
    managed.unpatch()
    assert model.up is up and model.up.weight is up_weight and model.conv.bias is conv_bias
    assert _state_equal(model, reference)
    with torch.no_grad():
        assert torch.equal(model(*_inputs()), reference(*_inputs()))
    assert managed_model_of(model) is None and not managed.patched
    managed.unpatch()  # a second unpatch does nothing
    with pytest.raises(PatchError, match="unpatched"):
        managed.set_quality(0.5)
    patch(model, register=False, progress=False).unpatch()  # and it can be patched again


def test_a_head_tied_to_its_embedding_is_one_weight_and_other_sharing_stays_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(64, 64), nn.Linear(64, 64), nn.Linear(64, 64, bias=False))
    model[2].weight = model[0].weight  # a head tied to the embedding, as in SmolLM2
    reference = copy.deepcopy(model)
    tokens = torch.randint(0, 64, (2, 7))
    managed = patch(model, register=False, progress=False)
    try:
        assert set(managed.levels) == {"0.weight", "1.weight"}  # the pair is planned once, by its embedding name
        assert isinstance(model[0], HoloEmbedding) and isinstance(model[2], HoloLinear)
        assert model[0].resident_bytes == 0 and model[0].holo is model[2].holo
        with torch.no_grad():
            assert torch.equal(model(tokens), reference(tokens))
        managed.set_quality(managed.min_quality)
        assert model[0].level == model[2].level == 1
        assert managed.resident_bytes == managed.bytes_at(managed.min_quality)
        with torch.no_grad():
            lowered, expected = model(tokens), reference(tokens)
        assert 0 < float((lowered - expected).norm() / expected.norm()) < 0.3
    finally:
        managed.unpatch()
    assert model[2].weight is model[0].weight and _state_equal(model, reference)

    shared = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    shared[1].weight = shared[0].weight  # two linears sharing: not a head/embedding pair
    with pytest.raises(PatchError, match="nothing to do"):
        patch(shared, register=False, progress=False)


def test_a_mismatching_holo_dir_is_refused_and_nothing_stays_half_patched(tmp_path):
    source = _small_model(0)
    from torch_arbiter.holo import HoloTensor

    save_holo(tmp_path / "holo", {name: HoloTensor.encode(source.get_parameter(name).detach())
                                  for name in ("embed.weight", "conv.weight", "up.weight")})
    other = _small_model(0)
    reference = copy.deepcopy(other)
    with pytest.raises(PatchError, match="no tensor 'down.weight'"):
        patch(other, holo_dir=tmp_path / "holo", register=False, progress=False)
    assert _state_equal(other, reference) and type(other.up) is nn.Linear and type(other.embed) is nn.Embedding
    different = _small_model(1)
    with pytest.raises(PatchError, match="differs from the model's weight"):
        patch(different, holo_dir=tmp_path / "holo", register=False, progress=False)
    assert type(different.embed) is nn.Embedding


def test_patch_reads_a_matching_holo_dir_without_encoding(tmp_path):
    from torch_arbiter.holo import HoloTensor

    source = _small_model(0)
    tensors = {name: HoloTensor.encode(source.get_parameter(name).detach())
               for name in ("embed.weight", "conv.weight", "up.weight", "down.weight")}
    save_holo(tmp_path / "holo", tensors)
    model = _small_model(0)
    reference = copy.deepcopy(model)
    managed = patch(model, holo_dir=tmp_path / "holo", register=False, progress=False)
    try:
        for name, holo in tensors.items():
            assert managed.layers[name].holo.meta == holo.meta
        managed.set_quality(managed.min_quality)
        with torch.no_grad():
            assert not torch.equal(model(*_inputs()), reference(*_inputs()))
        managed.set_quality(1.0)
        with torch.no_grad():
            assert torch.equal(model(*_inputs()), reference(*_inputs()))
    finally:
        managed.unpatch()


# -- the arbiter moves the quality ------------------------------------------------------------------


def test_arbiter_rebalances_move_the_model_and_unpatch_releases_it():
    model = _small_model(5)
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(0.01))  # a 10 MiB virtual device
    managed = patch(model, arbiter, workload=WorkloadType.custom("small", 0.1, 1 << 20),
                    priority=Priority.LOW, activation_bytes=0, progress=False)
    allocation = managed.allocation
    assert allocation.full_bytes == managed.full_bytes and managed.quality == 1.0
    assert allocation.min_quality == pytest.approx(managed.min_quality)
    capacity = arbiter.state().capacity_bytes
    # A high-priority workload that leaves room for only part of the small model.
    squeeze = capacity - int(managed.full_bytes * 0.5)
    big = arbiter.request_allocation_blocking(WorkloadType.custom("big", 1.0, squeeze), Priority.HIGH,
                                              bytes=squeeze, activation_bytes=0)
    assert allocation.quality < 1.0
    assert managed.quality == pytest.approx(max(allocation.quality, managed.min_quality))
    assert managed.resident_bytes == managed.bytes_at(allocation.quality) <= managed.full_bytes * 0.5 + 1
    big.release()
    assert arbiter.wait_until_settled(5)  # the idle model is raised by the arbiter's applier thread
    assert allocation.quality == 1.0 and managed.quality == 1.0
    assert managed.resident_bytes == managed.full_bytes
    managed.unpatch()
    assert allocation.released and arbiter.state().workloads == ()


def test_unpatch_after_the_arbiter_is_closed_is_fine():
    model = _small_model(6)
    reference = copy.deepcopy(model)
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(0.01))
    managed = patch(model, arbiter, workload=WorkloadType.custom("small", 0.1, 1 << 20),
                    activation_bytes=0, progress=False)
    arbiter.close()
    managed.unpatch()
    assert _state_equal(model, reference)


def test_a_refused_registration_leaves_the_model_unpatched():
    from torch_arbiter.errors import InsufficientMemoryError

    model = _small_model(7)
    reference = copy.deepcopy(model)
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(0.00001))  # 10 KiB: the floor cannot fit
    with pytest.raises(InsufficientMemoryError):
        patch(model, arbiter, activation_bytes=0, progress=False)
    assert _state_equal(model, reference) and managed_model_of(model) is None
    assert type(model.up) is nn.Linear


def test_calibration_encodes_each_linear_and_conv_on_its_own_inputs():
    model, reference = _small_model(), _small_model()
    tokens, image = _inputs()
    seen = []
    managed = patch(model, register=False, progress=False,
                    calibration=lambda m: seen.append(m) or m(tokens, image))
    assert seen == [model]  # run once, on the model itself, before any layer was swapped
    calibrated = [m for m in model.modules() if isinstance(m, (HoloLinear, HoloConv2d))]
    embeddings = [m for m in model.modules() if isinstance(m, HoloEmbedding)]
    # Calibrated levels record the output error on those inputs; uncalibrated ones do not.
    assert all("out_rel_error" in m.holo.level_fidelity(1) for m in calibrated)
    assert embeddings and not any("out_rel_error" in m.holo.level_fidelity(1) for m in embeddings)
    managed.unpatch()
    assert _state_equal(model, reference)


def test_bad_calibration_is_refused_and_leaves_the_model_alone():
    model, reference = _small_model(), _small_model()
    with pytest.raises(PatchError, match="callable, a tensor or a dict"):
        patch(model, register=False, progress=False, calibration=3.5)
    with pytest.raises(InvalidRequestError, match="reached no nn.Linear"):
        patch(model, register=False, progress=False, calibration=lambda m: None)
    assert managed_model_of(model) is None and _state_equal(model, reference)
    assert not any(isinstance(m, HoloLinear) for m in model.modules())


def test_collect_weight_inputs_names_each_weight_once():
    from torch_arbiter.holo import collect_weight_inputs

    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10, bias=False))
    model[2].weight = model[0].weight  # a head tied to the embedding
    ids = torch.tensor([[1, 2, 3]])
    inputs = collect_weight_inputs(model, lambda: model(ids), max_rows=2)
    assert set(inputs) == {"1.weight", "0.weight"}  # the tied head's rows under the table's name
    assert inputs["1.weight"].shape == (2, 8) and inputs["0.weight"].dtype == torch.float32
