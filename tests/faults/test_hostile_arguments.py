"""Hostile arguments at the public entry points: encode options, NaN/inf weights and calibration,
curves, qualities, decode targets, patch(); and narrow layers whose levels would cost more than
exact. Every case is a typed error or a correct result."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torch_arbiter import Arbiter, ArbiterConfig, WorkloadType, patch
from torch_arbiter.allocation import AllocationRequest
from torch_arbiter.errors import ArbiterError, InvalidRequestError
from torch_arbiter.holo import HoloTensor, plan_quality

_ANY = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                 st.text(max_size=4), st.lists(st.integers(), max_size=2), st.just(torch.ones(1)),
                 st.sampled_from(["auto", 0, 1, 2, 3, 32, 64, 128, 7, True, False]))
_WEIGHT = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))


@settings(max_examples=60, deadline=None)
@given(options=st.dictionaries(st.sampled_from(["group_size", "rank", "rotate", "symmetric", "seed", "min_numel"]),
                               _ANY, max_size=3))
def test_any_encode_options_give_a_typed_error_or_a_faithful_encoding(options):
    try:
        holo = HoloTensor.encode(_WEIGHT, **options)
    except InvalidRequestError:
        return
    assert torch.equal(holo.decode(holo.num_levels), _WEIGHT)
    sizes = [holo.level_bytes(k) for k in range(holo.num_levels + 1)]
    assert sizes == sorted(sizes) and sizes[-1] == holo.full_bytes


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_keep_one_exact_level(bad):
    weight = _WEIGHT.clone()
    weight[3, 7] = bad
    holo = HoloTensor.encode(weight)
    assert holo.scheme == "exact" and holo.num_levels == 1
    assert torch.equal(holo.decode(1).view(torch.int32), weight.view(torch.int32))  # NaN bits too
    model = nn.Sequential(nn.Linear(96, 64))
    model[0].weight.data = weight
    managed = patch(model, register=False, progress=False)
    try:
        assert managed.min_quality == 1.0
    finally:
        managed.unpatch()


@pytest.mark.parametrize("calibration", [
    torch.full((8, 96), float("nan")), torch.cat([torch.randn(7, 96), torch.full((1, 96), float("inf"))]),
    torch.randint(0, 3, (8, 96)), "inputs", torch.randn(8, 95),
    torch.full((8, 96), 1e20)])  # finite, but XᵀX overflows: the damping loop must end
def test_bad_calibration_is_a_typed_error_and_never_hangs(calibration):
    outcome: list[BaseException | None] = []

    def run():
        try:
            HoloTensor.encode(_WEIGHT, calibration=calibration)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 -- the type is what is checked
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "encode hung on bad calibration"
    assert isinstance(outcome[0], InvalidRequestError), outcome


def test_patch_with_nan_calibration_is_a_typed_error_and_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Linear(96, 64))
    before = model[0].weight.detach().clone()
    with pytest.raises(InvalidRequestError, match="NaN or inf"):
        patch(model, register=False, progress=False, calibration=torch.full((4, 96), float("nan")))
    assert isinstance(model[0], nn.Linear) and torch.equal(model[0].weight, before)


@pytest.mark.parametrize("shape, dtype", [((4096, 2), torch.float32), ((2048, 8), torch.float32),
                                          ((512, 16), torch.bfloat16), ((300, 33), torch.float16)])
def test_narrow_layers_never_have_a_level_costlier_than_exact(shape, dtype):
    holo = HoloTensor.encode(torch.randn(*shape).to(dtype))
    assert all(holo.level_bytes(k) <= holo.full_bytes for k in range(holo.num_levels + 1))


def test_a_model_with_a_narrow_layer_registers_with_a_sorted_curve():
    model = nn.Sequential(nn.Linear(2, 4096), nn.ReLU(), nn.Linear(4096, 64))
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(2))
    managed = patch(model, arbiter, progress=False, activation_bytes=0)
    try:
        curve = managed.curve
        assert curve == sorted(curve) and curve[-1] == (1.0, managed.full_bytes)
        assert managed.levels["0.weight"] == 1  # the narrow layer: one exact level
    finally:
        managed.unpatch()


_POINT_PART = st.one_of(st.floats(allow_nan=True), st.integers(-5, 2**60), st.booleans(), st.text(max_size=3),
                        st.none(), st.just("0.5"))


@settings(max_examples=80, deadline=None)
@given(curve=st.one_of(st.lists(st.tuples(_POINT_PART, _POINT_PART), max_size=4),
                       st.lists(st.lists(_POINT_PART, max_size=3), max_size=3), _POINT_PART))
def test_any_curve_is_a_typed_error_or_validated_exactly(curve):
    try:
        request = AllocationRequest.build(WorkloadType.LLM_INFERENCE, bytes=1 << 20, curve=curve)
    except InvalidRequestError:
        return
    for (q, b), raw in zip(request.curve, curve or ()):
        assert not isinstance(raw[0], (bool, str)) and not isinstance(raw[1], (bool, str))
        assert 0.0 <= q <= 1.0 and b >= 0


@pytest.mark.parametrize("curve", [[("0.5", 10)], [(True, 10)], [(0.5, True)], [(0.5, "10")], "0.5", [(0.5,)],
                                   [(0.2, 10), (0.1, 20)], [(float("nan"), 1)]])
def test_named_bad_curves_are_refused(curve):
    with pytest.raises(InvalidRequestError):
        AllocationRequest.build(WorkloadType.LLM_INFERENCE, bytes=1 << 20, curve=curve)


@pytest.mark.parametrize("q", ["0.5", True, False, None, float("nan"), -0.1, 1.5, [0.5], torch.tensor(0.5)])
def test_plan_quality_refuses_what_set_quality_refuses(q):
    tensors = {"w": HoloTensor.encode(_WEIGHT)}
    with pytest.raises(InvalidRequestError):
        plan_quality(tensors, q)


@pytest.mark.parametrize("options", [dict(dtype="float32"), dict(dtype=torch.int8), dict(dtype=3),
                                     dict(device="cuda:7"), dict(device="nowhere"), dict(device=1.5)])
def test_decode_with_a_bad_target_is_a_typed_error(options):
    holo = HoloTensor.encode(_WEIGHT)
    for k in range(1, holo.num_levels + 1):
        with pytest.raises(InvalidRequestError):
            holo.decode(k, **options)


@pytest.mark.parametrize("kwargs, why", [
    (dict(arbiter="str"), "arbiter must be"), (dict(arbiter=42), "arbiter must be"),
    (dict(register=False, encode_options={"bogus": 1}), "unknown encode_options"),
    (dict(register=False, encode_options="rank"), "encode_options must be"),
    (dict(register=False, encode_options={"group_size": 3}), "group_size"),
    (dict(register=False, encode_options={"calibration": None}), "unknown encode_options"),
])
def test_patch_with_bad_arguments_is_a_typed_error_and_changes_nothing(kwargs, why):
    model = nn.Sequential(nn.Linear(96, 64))
    with pytest.raises(ArbiterError, match=why):
        patch(model, progress=False, **kwargs)
    assert isinstance(model[0], nn.Linear) and model[0].weight.numel() == 96 * 64

