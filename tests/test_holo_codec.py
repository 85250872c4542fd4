"""HoloTensor codec and model-level planning: round trips, exact top, measured fidelity, monotone plans."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_arbiter.errors import FormatError, InvalidRequestError
from torch_arbiter.holo import HoloTensor, min_quality, plan_bytes, plan_quality
from torch_arbiter.holo.codec import pack_signs, rotate_input, unpack_signs, unrotate


def _rel(a, b):
    return (a.float() - b.float()).norm().item() / b.float().norm().item()


@settings(max_examples=25, deadline=None)
@given(
    out=st.integers(2, 80),
    inp=st.integers(1, 300),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    group=st.sampled_from([32, 64]),
    seed=st.integers(0, 3),
    rotate=st.sampled_from(["auto", True, False]),
)
def test_round_trip_any_shape_and_dtype(out, inp, dtype, group, seed, rotate):
    weight = (torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)
    before = weight.clone()
    holo = HoloTensor.encode(weight, group_size=group, min_numel=64, rank=0, seed=seed,
                             rotate=rotate)
    assert torch.equal(weight, before), "encode must not modify its input"
    top = holo.num_levels
    assert torch.equal(holo.decode(top), before)
    assert holo.decode(top).dtype == dtype
    assert holo.full_bytes == weight.numel() * weight.element_size()
    assert holo.level_bytes(0) == 0
    assert holo.level_bytes(top) == holo.full_bytes
    for k in range(1, top):
        decoded = holo.decode(k)
        assert decoded.shape == weight.shape and decoded.dtype == dtype
        recorded = holo.level_fidelity(k)["rel_error"]
        measured = _rel(decoded, weight)
        # The record is measured in the rotated padded space: equal, or an upper bound with padding.
        assert measured <= recorded * 1.01 + 5e-3
    if top == 3:
        errors = [holo.level_fidelity(k)["rel_error"] for k in (1, 2, 3)]
        assert errors[0] > errors[1] > errors[2] == 0.0
        # Widths far below the group are mostly padding, which prices a zero per group high.
        assert errors[0] < (0.2 if inp >= group else 0.25) and errors[1] < 0.02


@settings(max_examples=50, deadline=None)
@given(signs=st.lists(st.sampled_from([-1, 1]), min_size=1, max_size=300), block=st.sampled_from([1, 2, 4]))
def test_packed_signs_round_trip_and_rotate_like_the_signs_themselves(signs, block):
    values = torch.tensor(signs, dtype=torch.int8)
    packed = pack_signs(values)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-len(signs) // 8)
    assert torch.equal(unpack_signs(packed, len(signs), torch.int8), values)
    assert torch.equal(pack_signs(torch.ones(len(signs))), torch.zeros_like(packed))  # unrotated: all zero
    block = block if len(signs) % block == 0 else 1
    x = torch.randn(3, len(signs), generator=torch.Generator().manual_seed(len(signs)))
    assert torch.equal(rotate_input(x, packed, block), rotate_input(x, values, block))
    assert torch.allclose(unrotate(rotate_input(x, packed, block), packed, block), x, atol=1e-5)


def test_levels_bytes_and_fidelity_of_a_linear_weight():
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(6)) * 0.02
    holo = HoloTensor.encode(weight, rank=0, group_size=64, symmetric=True)
    assert holo.scheme == "nested4x2" and holo.num_levels == 3
    # The symmetric grid: one bf16 scale per group of 64.
    assert holo.meta["symmetric"] is True
    # ... and the rotation's signs, one bit per input column.
    assert holo.level_fidelity(1)["bits_per_weight"] == pytest.approx(4 + 0.25 + 512 / weight.numel())
    assert holo.level_fidelity(2)["bits_per_weight"] == pytest.approx(8 + 0.375 + 512 / weight.numel())
    assert _rel(holo.decode(1), weight) == pytest.approx(holo.level_fidelity(1)["rel_error"], rel=1e-4)
    assert _rel(holo.decode(2), weight) == pytest.approx(holo.level_fidelity(2)["rel_error"], rel=1e-4)
    # Going up a level moves only the residual stage: lo nibbles and one uint8 ratio per group.
    assert holo.level_bytes(2) - holo.level_bytes(1) == weight.numel() // 2 + weight.numel() // 64
    assert set(holo.level_fragments(2)) - set(holo.level_fragments(1)) == {"lo", "lo_ratio"}
    assert holo.level_fragments(3) == ["exact"]


def test_round_to_nearest_is_not_better_at_the_same_bytes():
    weight = torch.randn(512, 512, generator=torch.Generator().manual_seed(5)) * 0.02
    weight[:, 7] *= 40  # an outlier input channel: what the rotation is for
    holo = HoloTensor.encode(weight, rank=0)
    groups = weight.reshape(-1, 64)
    low, high = groups.amin(1, keepdim=True), groups.amax(1, keepdim=True)
    step = (high - low) / 15
    rtn = (((groups - low) / step).round().clamp(0, 15) * step + low).reshape(weight.shape)
    assert holo.level_fidelity(1)["rel_error"] < _rel(rtn, weight)


def test_weights_on_a_4bit_grid_are_kept_unrotated():
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (128, 256), generator=gen).float()
    scale = torch.rand(128, 4, 1, generator=gen).add(0.5).repeat_interleave(64, 1).reshape(128, 256) * 0.01
    weight = (codes - 7.3) * scale  # a dequantised 4-bit code, groups of 64 along the input
    before = weight.clone()
    holo = HoloTensor.encode(weight, rank=0, rotate="auto")
    assert torch.equal(weight, before)
    assert holo.meta["rotated"] is False and holo.meta["block"] == 1
    assert holo.level_fidelity(1)["rel_error"] < 0.01
    assert _rel(holo.decode(1), weight) < 0.01
    assert HoloTensor.encode(weight, rank=0, rotate=True).level_fidelity(1)["rel_error"] > 0.05
    outliers = torch.randn(128, 256, generator=gen)
    outliers[:, 3] *= 30  # an outlier input channel: the rotation measures better
    assert HoloTensor.encode(outliers, rank=0, rotate="auto").meta["rotated"] is True


def test_auto_grid_finds_the_group_size_a_weight_was_quantised_with():
    # A dequantised Q4_1-like weight: asymmetric 4-bit blocks of 32 along the input.
    gen = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 16, (96, 512), generator=gen).float()
    blocks = torch.rand(96, 16, 1, generator=gen).add(0.5) * 0.01
    offsets = torch.randn(96, 16, 1, generator=gen) * 0.01
    weight = (codes.view(96, 16, 32) * blocks + offsets).view(96, 512)
    holo = HoloTensor.encode(weight, rank=0)
    assert (holo.meta["group_size"], holo.meta["rotated"], holo.meta["symmetric"]) == (32, False, False)
    # Back on its own grid, up to the bf16 rounding of scale and zero.
    assert holo.level_fidelity(1)["rel_error"] < 0.02
    assert HoloTensor.encode(weight, rank=0, group_size=64, rotate=True).level_fidelity(1)["rel_error"] > 0.05
    # A gaussian weight with an outlier input channel has no such grid: it is rotated, and a
    # coarser group is not worse per bit than the 32 above.
    natural = torch.randn(96, 512, generator=gen)
    natural[:, 5] *= 20
    plain = HoloTensor.encode(natural, rank=0)
    assert plain.meta["rotated"] is True
    assert plain.meta["group_size"] in (64, 128)
    with pytest.raises(InvalidRequestError, match="group_size"):
        HoloTensor.encode(weight, group_size="big")


def test_rank_branch_kept_when_it_pays_and_decodes():
    gen = torch.Generator().manual_seed(1)
    low_rank = torch.randn(384, 4, generator=gen) @ torch.randn(4, 384, generator=gen)
    weight = low_rank + 0.01 * torch.randn(384, 384, generator=gen)
    holo = HoloTensor.encode(weight, rank="auto")
    assert holo.rank > 0
    kinds = {spec.name: spec.kind for spec in holo.fragment_specs()}
    assert kinds["rank_l"] == kinds["rank_r"] == "rank" and kinds["hi"] == "precision"
    plain = HoloTensor.encode(weight, rank=0)
    assert holo.level_fidelity(1)["rel_error"] < plain.level_fidelity(1)["rel_error"] / 2
    assert _rel(holo.decode(1), weight) == pytest.approx(holo.level_fidelity(1)["rel_error"], rel=1e-3)
    assert torch.equal(holo.decode(3), weight)
    # A gaussian weight has no structure for a rank branch to absorb: auto drops it.
    assert HoloTensor.encode(torch.randn(384, 384, generator=gen), rank="auto").rank == 0


def test_calibration_records_output_error():
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(128, 256, generator=gen)
    inputs = torch.randn(64, 256, generator=gen)
    holo = HoloTensor.encode(weight, calibration=inputs, rank=0)
    measured = _rel(inputs @ holo.decode(1).t(), inputs @ weight.t())
    assert holo.level_fidelity(1)["out_rel_error"] == pytest.approx(measured, rel=1e-3)
    with pytest.raises(InvalidRequestError, match="width"):
        HoloTensor.encode(weight, calibration=torch.randn(4, 10))


def test_calibration_rounds_with_error_feedback_only_where_it_measures_better():
    # Correlated inputs (as real activations are): GPTQ trades weight error for output error. Here
    # GPTQ at level 1 would leave level 2 a wider residual (worse at level 2 on held-out rows), so
    # level 1 stays round-to-nearest and level 2 takes the error feedback.
    gen = torch.Generator().manual_seed(8)
    weight = torch.randn(192, 256, generator=gen) * 0.02
    inputs = torch.randn(1024, 48, generator=gen) @ torch.randn(48, 256, generator=gen) \
        + 0.1 * torch.randn(1024, 256, generator=gen)
    plain = HoloTensor.encode(weight, rank=0)
    tuned = HoloTensor.encode(weight, rank=0, calibration=inputs)
    assert tuned.level_bytes(1) == plain.level_bytes(1) and tuned.level_bytes(2) == plain.level_bytes(2)
    held_out = inputs[768:]  # the rows the encoder judges on, never fitted
    reference = held_out @ weight.t()
    plain_out = [_rel(held_out @ plain.decode(k).t(), reference) for k in (1, 2)]
    tuned_out = [_rel(held_out @ tuned.decode(k).t(), reference) for k in (1, 2)]
    assert tuned_out[0] <= plain_out[0] * (1 + 1e-6)
    assert tuned_out[1] < 0.7 * plain_out[1]
    # Level 2 is a residual stage over whatever level 1 rounded to, so it still refines it.
    for key in ("rel_error", "out_rel_error"):
        assert tuned.level_fidelity(2)[key] < tuned.level_fidelity(1)[key] / 4
    assert torch.equal(tuned.decode(3), weight)


def test_calibration_that_does_not_carry_over_is_not_used():
    # Held-out rows from another distribution than the fitted ones: GPTQ fitted on the first rows
    # would lose there, so the encoding measures no worse than round-to-nearest at either level.
    gen = torch.Generator().manual_seed(9)
    weight = torch.randn(128, 256, generator=gen) * 0.02
    fitted = torch.randn(96, 16, generator=gen) @ torch.randn(16, 256, generator=gen)
    other = torch.randn(32, 256, generator=gen)
    inputs = torch.cat([fitted, other])
    plain = HoloTensor.encode(weight, rank=0)
    tuned = HoloTensor.encode(weight, rank=0, calibration=inputs)
    reference = other @ weight.t()
    for k in (1, 2):
        assert _rel(other @ tuned.decode(k).t(), reference) <= _rel(other @ plain.decode(k).t(), reference) * (1 + 1e-6)


def test_symmetric_option():
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(9))
    for symmetric, zero_bytes in ((True, 0), (False, 2)):
        holo = HoloTensor.encode(weight, rank=0, symmetric=symmetric, group_size=64)
        assert holo.meta["symmetric"] is symmetric
        assert holo.fragment("scales").shape == (4, 64, 1 + zero_bytes // 2)
        assert holo.level_fidelity(1)["rel_error"] < 0.15
    with pytest.raises(InvalidRequestError, match="symmetric"):
        HoloTensor.encode(weight, symmetric="yes")


@pytest.mark.parametrize("tensor", [torch.randn(1000), torch.randn(4, 8), torch.arange(5000).reshape(50, 100)])
def test_small_1d_and_integer_tensors_stay_exact(tensor):
    holo = HoloTensor.encode(tensor)
    assert holo.scheme == "exact" and holo.num_levels == 1
    assert torch.equal(holo.decode(1), tensor)
    assert holo.level_bytes(1) == holo.full_bytes


def test_bad_levels_and_options_raise_typed_errors():
    holo = HoloTensor.encode(torch.randn(64, 128), rank=0)
    for bad in (-1, 4, 1.5, True):
        with pytest.raises(InvalidRequestError):
            holo.level_bytes(bad)
    with pytest.raises(InvalidRequestError):
        holo.decode(0)
    with pytest.raises(InvalidRequestError):
        HoloTensor.encode(torch.randn(8, 8), group_size=3)
    with pytest.raises(InvalidRequestError):
        HoloTensor.encode(torch.randn(8, 8), rank=-2)
    partial = HoloTensor.from_parts(holo.meta, {k: v for k, v in holo.fragments.items() if k != "lo"})
    assert torch.equal(partial.decode(1), holo.decode(1))
    with pytest.raises(FormatError, match="lo"):
        partial.decode(2)
    with pytest.raises(FormatError, match="shape"):
        HoloTensor.from_parts(holo.meta, {"hi": torch.zeros(3, dtype=torch.uint8)})


def _model_tensors():
    gen = torch.Generator().manual_seed(0)
    return {
        "embed": HoloTensor.encode(torch.randn(1000, 64, generator=gen), rank=0),
        "attn": HoloTensor.encode(torch.randn(64, 64, generator=gen), rank=0),
        "mlp": HoloTensor.encode(torch.randn(256, 64, generator=gen).bfloat16(), rank=0),
        "norm": HoloTensor.encode(torch.randn(64, generator=gen)),
    }


def test_plan_fits_budget_is_monotone_and_exact_at_one():
    tensors = _model_tensors()
    full = sum(t.full_bytes for t in tensors.values())
    floor = min_quality(tensors)
    assert 0 < floor < 0.3
    previous = None
    for q in [i / 200 for i in range(201)]:
        plan = plan_quality(tensors, q)
        assert plan_bytes(tensors, plan) <= q * full
        if q >= floor:
            assert all(level >= 1 for level in plan.values())
        if previous is not None:
            assert all(plan[n] >= previous[n] for n in plan)
        previous = plan
    assert plan_quality(tensors, 1.0) == {n: t.num_levels for n, t in tensors.items()}
    assert plan_quality(tensors, 0.0) == {n: 0 for n in tensors}
    assert all(level >= 1 for level in plan_quality(tensors, floor).values())


def test_plan_buys_precision_where_error_falls_most_per_byte():
    gen = torch.Generator().manual_seed(0)
    smooth = torch.randn(256, 256, generator=gen)
    heavy = torch.randn(256, 256, generator=gen)
    heavy[:, :4] *= 100  # outliers: large 4-bit error, more to gain per byte
    tensors = {"a_smooth": HoloTensor.encode(smooth, rank=0), "b_heavy": HoloTensor.encode(heavy, rank=0,
                                                                                        seed=1)}
    tensors["b_heavy"].meta["levels"][0]["fidelity"]["rel_error"] = 0.5  # sensitivity from the record
    full = sum(t.full_bytes for t in tensors.values())
    q = (tensors["a_smooth"].level_bytes(1) + tensors["b_heavy"].level_bytes(2)) / full
    assert plan_quality(tensors, q) == {"a_smooth": 1, "b_heavy": 2}


def test_calibrated_plan_ranks_by_weight_times_output_error():
    gen = torch.Generator().manual_seed(2)
    inputs = torch.randn(128, 256, generator=gen)
    tensors = {name: HoloTensor.encode(torch.randn(256, 256, generator=gen), rank=0, calibration=inputs)
               for name in ("a", "b")}
    levels = {name: t.meta["levels"][0]["fidelity"] for name, t in tensors.items()}
    # "a" looks worse by its own output error, "b" by the product with its weight error.
    levels["a"].update(rel_error=0.05, out_rel_error=0.2)
    levels["b"].update(rel_error=0.5, out_rel_error=0.1)
    full = sum(t.full_bytes for t in tensors.values())
    q = (tensors["a"].level_bytes(1) + tensors["b"].level_bytes(2)) / full
    assert plan_quality(tensors, q) == {"a": 1, "b": 2}


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan, "x", None])
def test_plan_rejects_bad_quality(bad):
    with pytest.raises(InvalidRequestError):
        plan_quality(_model_tensors(), bad)


def _stage_errors(groups, scale, zero):
    """Per-group squared errors of level 1 and of level 2 on it (the encoder's own stages)."""
    from torch_arbiter.holo import codec

    residual = groups - codec._grid_values(codec._grid_codes(groups, scale, zero), scale, zero)
    _, fine = codec._residual_grid(residual, scale)
    return residual.square().sum(-1), codec._residual_error(residual, fine)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    groups=st.integers(1, 4),
    group=st.sampled_from([8, 32, 64]),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
    outlier=st.floats(1.0, 50.0),
    shift=st.floats(-2.0, 2.0),
)
def test_refitted_grid_never_loses_to_round_to_nearest(rows, groups, group, symmetric, seed, outlier, shift):
    from torch_arbiter.holo import codec

    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, groups, group, generator=gen) * 0.02 + shift * 0.02
    values[..., 0] *= outlier  # one outlier per group, of any size
    values[0, 0] = 0.0  # and an all-zero group
    start = codec._fit_groups(values, symmetric)
    scale, zero = codec._refit_level1(values, symmetric)
    assert torch.isfinite(scale).all() and torch.isfinite(zero).all() and (scale > 0).all()
    assert torch.equal(scale, scale.to(torch.bfloat16).float()) and torch.equal(zero, zero.to(torch.bfloat16).float())
    before, after = _stage_errors(values, *start), _stage_errors(values, scale, zero)
    for old, new in zip(before, after):
        assert torch.isfinite(new).all()
        assert (new <= old).all()


def test_refitted_grid_lowers_the_error_of_gaussian_weights():
    # What the refit is for: same bytes, lower error at both levels on rotated (Gaussian-like) weights.
    from torch_arbiter.holo import codec

    values = torch.randn(256, 8, 64, generator=torch.Generator().manual_seed(3))
    for symmetric in (True, False):
        before = _stage_errors(values, *codec._fit_groups(values, symmetric))
        after = _stage_errors(values, *codec._refit_level1(values, symmetric))
        assert after[0].sum() < 0.97 * before[0].sum()
        assert after[1].sum() < before[1].sum()
