"""Property and unit tests of the pure coordinator."""

import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from torch_arbiter import (
    Coordinator,
    CoordinatorConfig,
    InvalidRequestError,
    Priority,
    QualityBudget,
    QualityPolicy,
)

GIB = 1 << 30
GROUPS = ["llm_inference", "image_generation", "video_generation", "custom"]


@st.composite
def budgets(draw, min_size=1, max_size=12):
    n = draw(st.integers(min_size, max_size))
    sequences = draw(st.permutations(range(n)))  # arrival order is unique, as in the arbiter
    out = []
    for i in range(n):
        floor = draw(st.floats(0.0, 1.0))
        out.append(
            QualityBudget(
                key=i,
                priority=draw(st.sampled_from(list(Priority))),
                floor=floor,
                full_bytes=draw(st.integers(0, 16 * GIB)),
                activation_bytes=draw(st.integers(0, 2 * GIB)),
                sequence=sequences[i],
                group=draw(st.sampled_from(GROUPS)),
                max_quality=draw(st.floats(floor, 1.0)),
            )
        )
    return out


policies = st.sampled_from(list(QualityPolicy))
capacities = st.integers(0, 64 * GIB)
settings_ = settings(max_examples=150, deadline=None)


@settings_
@given(budgets(), capacities, policies)
@example(  # found by CI: the exact water-fill level overshot by one byte in floating point
    [QualityBudget(0, Priority.BACKGROUND, 0.5, 6126581, 0, 0, "llm_inference", 1.0),
     QualityBudget(1, Priority.BACKGROUND, 0.0, 0, 0, 1, "llm_inference", 0.0),
     QualityBudget(2, Priority.BACKGROUND, 0.25, 1859, 0, 2, "llm_inference", 1.0)],
    4540205, QualityPolicy.ADAPTIVE,
)
def test_granted_bytes_never_exceed_capacity(bs, capacity, policy):
    result = Coordinator(CoordinatorConfig(policy)).compute(bs, capacity)
    assert sum(a.granted_bytes for a in result.values()) <= capacity


@settings_
@given(budgets(), capacities, policies)
def test_admitted_keep_their_floor_and_waiting_get_nothing(bs, capacity, policy):
    result = Coordinator(CoordinatorConfig(policy)).compute(bs, capacity)
    for b in bs:
        a = result[b.key]
        if a.admitted:
            assert b.floor <= a.quality <= b.max_quality + 1e-12
            assert a.granted_bytes == b.bytes_at(a.quality)
        else:
            assert (a.quality, a.granted_bytes) == (0.0, 0)


@settings_
@given(budgets(), capacities, st.sampled_from([p for p in QualityPolicy if p is not QualityPolicy.FIXED]))
def test_a_waiting_workload_really_did_not_fit(bs, capacity, policy):
    """Nobody waits while its floor would fit beside the higher-priority admitted ones."""
    coord = Coordinator(CoordinatorConfig(policy))
    result = coord.compute(bs, capacity)
    for b in bs:
        if result[b.key].admitted:
            continue
        ahead = [
            o
            for o in bs
            if result[o.key].admitted and (o.priority, -o.sequence) > (b.priority, -b.sequence)
        ]
        floor_of = lambda o: o.bytes_at(o.floor)  # noqa: E731  (not FIXED: starts at the floor)
        same_prio_waiting_ahead = any(
            not result[o.key].admitted and o.priority == b.priority and o.sequence < b.sequence for o in bs
        )
        assert same_prio_waiting_ahead or sum(map(floor_of, ahead)) + floor_of(b) > capacity


@settings_
@given(budgets(max_size=8), capacities, st.integers(0, 8 * GIB))
def test_more_capacity_never_lowers_anyone_with_the_same_admitted_set(bs, capacity, extra):
    for policy in QualityPolicy:
        coord = Coordinator(CoordinatorConfig(policy))
        small = coord.compute(bs, capacity)
        large = coord.compute(bs, capacity + extra)
        if {k for k, a in small.items() if a.admitted} != {k for k, a in large.items() if a.admitted}:
            continue
        for k, a in small.items():
            assert large[k].quality >= a.quality - 1e-12, (policy, k)


@settings_
@given(
    st.lists(st.sampled_from(list(Priority)), min_size=2, max_size=10),
    st.floats(0.0, 0.9),
    st.integers(1, 8 * GIB),
    st.integers(0, 1 * GIB),
    capacities,
)
def test_adaptive_higher_priority_never_gets_less_with_the_same_curve(prios, floor, full, act, capacity):
    bs = [QualityBudget(i, p, floor, full, act, sequence=i, group="custom") for i, p in enumerate(prios)]
    result = Coordinator(CoordinatorConfig(QualityPolicy.ADAPTIVE)).compute(bs, capacity)
    for hi in bs:
        for lo in bs:
            if hi.priority > lo.priority:
                assert result[hi.key].quality >= result[lo.key].quality


@settings_
@given(budgets(max_size=10), capacities)
def test_balanced_gives_one_common_quality_above_floors(bs, capacity):
    result = Coordinator(CoordinatorConfig(QualityPolicy.BALANCED)).compute(bs, capacity)
    raised = [
        result[b.key].quality
        for b in bs
        if result[b.key].admitted and b.floor < result[b.key].quality < b.max_quality and b.full_bytes > 0
    ]
    assert max(raised, default=0) - min(raised, default=0) < 1e-9


@settings_
@given(budgets(max_size=10), capacities, st.floats(0.0, 1.0))
def test_fixed_never_adapts(bs, capacity, fixed):
    result = Coordinator(CoordinatorConfig(QualityPolicy.FIXED, fixed_quality=fixed)).compute(bs, capacity)
    for b in bs:
        if result[b.key].admitted:
            assert result[b.key].quality == min(max(b.floor, fixed), b.max_quality)


@settings_
@given(budgets(max_size=10), capacities, policies)
def test_pure_same_inputs_same_targets(bs, capacity, policy):
    coord = Coordinator(CoordinatorConfig(policy))
    assert coord.compute(bs, capacity) == coord.compute(list(reversed(bs)), capacity)


def _pair(group_a="llm_inference", group_b="image_generation"):
    return [
        QualityBudget("llm", Priority.LOW, 0.4, 8 * GIB, 0, sequence=0, group=group_a),
        QualityBudget("img", Priority.HIGH, 0.3, 6 * GIB, 0, sequence=1, group=group_b),
    ]


def test_adaptive_raises_the_higher_priority_first():
    r = Coordinator(CoordinatorConfig(QualityPolicy.ADAPTIVE)).compute(_pair(), 10 * GIB)
    assert r["img"].quality == 1.0
    assert math.isclose(r["llm"].quality, 4 / 8)


def test_llm_first_raises_the_llm_first_whatever_the_priority():
    r = Coordinator(CoordinatorConfig(QualityPolicy.LLM_FIRST)).compute(_pair(), 10 * GIB)
    assert r["llm"].quality == 1.0
    assert math.isclose(r["img"].quality, 2 / 6)


def test_diffusion_first_raises_the_image_model_first():
    bs = [
        QualityBudget("llm", Priority.HIGH, 0.4, 8 * GIB, group="llm_inference"),
        QualityBudget("img", Priority.LOW, 0.3, 6 * GIB, sequence=1, group="image_generation"),
    ]
    r = Coordinator(CoordinatorConfig(QualityPolicy.DIFFUSION_FIRST)).compute(bs, 10 * GIB)
    assert r["img"].quality == 1.0
    assert math.isclose(r["llm"].quality, 4 / 8)


def test_balanced_equalises():
    r = Coordinator(CoordinatorConfig(QualityPolicy.BALANCED)).compute(_pair(), 7 * GIB)
    assert math.isclose(r["llm"].quality, r["img"].quality)
    assert math.isclose(r["llm"].quality, 0.5)


def test_lowest_priority_waits_rather_than_breaking_the_budget():
    bs = [
        QualityBudget("a", Priority.HIGH, 0.5, 10 * GIB, sequence=0),
        QualityBudget("b", Priority.LOW, 0.5, 10 * GIB, sequence=1),
    ]
    r = Coordinator().compute(bs, 8 * GIB)
    assert r["a"].admitted and not r["b"].admitted


def test_fifo_within_a_priority_small_request_does_not_jump_the_queue():
    bs = [
        QualityBudget("run", Priority.NORMAL, 1.0, 6 * GIB, sequence=0),
        QualityBudget("big", Priority.NORMAL, 1.0, 6 * GIB, sequence=1),
        QualityBudget("small", Priority.NORMAL, 1.0, 1 * GIB, sequence=2),
    ]
    r = Coordinator().compute(bs, 8 * GIB, active_keys={"run"})
    assert r["run"].admitted and not r["big"].admitted and not r["small"].admitted


def test_without_preemption_a_running_workload_keeps_its_place():
    bs = [
        QualityBudget("low", Priority.LOW, 1.0, 6 * GIB, sequence=0),
        QualityBudget("high", Priority.HIGH, 1.0, 6 * GIB, sequence=1),
    ]
    with_pre = Coordinator(CoordinatorConfig(allow_preemption=True)).compute(bs, 8 * GIB, {"low"})
    without = Coordinator(CoordinatorConfig(allow_preemption=False)).compute(bs, 8 * GIB, {"low"})
    assert with_pre["high"].admitted and not with_pre["low"].admitted
    assert without["low"].admitted and not without["high"].admitted


def test_bad_inputs_are_typed_errors():
    with pytest.raises(InvalidRequestError):
        Coordinator().compute([QualityBudget(1, Priority.LOW, 0.1, 10)] * 2, 100)
    with pytest.raises(InvalidRequestError):
        Coordinator().compute([], -1)
    with pytest.raises(InvalidRequestError):
        QualityBudget(1, Priority.LOW, float("nan"), 10)
    with pytest.raises(InvalidRequestError):
        QualityBudget(1, Priority.LOW, 0.9, 10, max_quality=0.5)
    with pytest.raises(InvalidRequestError):
        CoordinatorConfig(policy="adaptive")


def test_water_fill_settles_at_once_when_integer_grants_overshoot():
    # Two 10-byte workloads at 0.19 (1 byte each, truncated) sharing 1 spare byte: the exact common
    # level 0.24 would grant 2 bytes. Shaving the level by tiny steps took ~10^11 steps here (a CI
    # hang); the fit must come back at once and never exceed the capacity.
    bs = [QualityBudget(i, Priority.NORMAL, 0.19, 10, 0, sequence=i) for i in range(2)]
    capacity = sum(b.bytes_at(0.19) for b in bs) + 1
    result = Coordinator().compute(bs, capacity)
    assert sum(a.granted_bytes for a in result.values()) <= capacity
    assert all(a.admitted and a.quality >= 0.19 for a in result.values())


# -- step curves (patched models) ---------------------------------------------------------------------


@st.composite
def curved_budgets(draw, min_size=1, max_size=10):
    n = draw(st.integers(min_size, max_size))
    out = []
    for i in range(n):
        full = draw(st.integers(1, 4 * GIB))
        steps = sorted(draw(st.lists(st.floats(0.05, 0.99), min_size=0, max_size=9, unique=True)))
        sizes = sorted(draw(st.lists(st.integers(1, full), min_size=len(steps), max_size=len(steps))))
        curve = tuple(zip(steps, sizes)) + ((1.0, full),)
        floor = curve[0][0]
        linear = draw(st.booleans())  # some workloads without a curve, as bare requests
        out.append(QualityBudget(i, draw(st.sampled_from(list(Priority))), floor, full,
                                 draw(st.integers(0, GIB // 4)), sequence=i, group=draw(st.sampled_from(GROUPS)),
                                 curve=() if linear else curve))
    return out


@settings_
@given(curved_budgets(), capacities, policies)
def test_curved_grants_are_exact_steps_and_fit(bs, capacity, policy):
    result = Coordinator(CoordinatorConfig(policy)).compute(bs, capacity)
    assert sum(a.granted_bytes for a in result.values()) <= capacity
    for b in bs:
        a = result[b.key]
        if a.admitted and b.curve:
            step = max((p for p in b.curve if p[0] <= a.quality), default=b.curve[0])
            assert a.granted_bytes == step[1] + b.activation_bytes  # exactly what the model holds


@settings_
@given(curved_budgets(), capacities, st.sampled_from([QualityPolicy.ADAPTIVE, QualityPolicy.BALANCED]))
def test_no_curved_workload_could_take_its_next_step_with_what_is_left(bs, capacity, policy):
    # What a step leaves over is not lost: after the fill, nobody's next step fits in what is left
    # (up to the byte per linear workload that rounding its grant down may leave unused).
    result = Coordinator(CoordinatorConfig(policy)).compute(bs, capacity)
    left = capacity - sum(a.granted_bytes for a in result.values()) - sum(not b.curve for b in bs)
    for b in bs:
        a = result[b.key]
        if a.admitted and b.curve:
            following = [p for p in b.curve if p[0] > a.quality and p[1] + b.activation_bytes > a.granted_bytes]
            if following:
                assert following[0][1] + b.activation_bytes - a.granted_bytes > left


def test_a_large_step_that_does_not_fit_leaves_its_bytes_to_the_next_workload():
    big = QualityBudget("big", Priority.HIGH, 0.2, 10_000, 0, sequence=0, curve=((0.2, 2_000), (0.9, 9_000), (1.0, 10_000)))
    small = QualityBudget("small", Priority.LOW, 0.1, 1_000, 0, sequence=1,
                          curve=((0.1, 100), (0.5, 500), (1.0, 1_000)))
    r = Coordinator(CoordinatorConfig(QualityPolicy.ADAPTIVE)).compute([big, small], 3_500)
    assert (r["big"].quality, r["big"].granted_bytes) == (0.2, 2_000)  # 9,000 cannot fit
    assert (r["small"].quality, r["small"].granted_bytes) == (1.0, 1_000)  # gets what big left
