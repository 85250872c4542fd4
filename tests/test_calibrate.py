"""Calibration inputs: the rows each linear and conv sees, sampled uniformly over a whole run."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from torch_arbiter.errors import InvalidRequestError
from torch_arbiter.holo.calibrate import collect_layer_inputs


@pytest.mark.parametrize("options", [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(3, 2), stride=(1, 2), padding=(2, 0), dilation=(2, 1)),
    dict(kernel_size=4, padding="same", dilation=2),
    dict(kernel_size=(4, 2), padding="same"),  # odd total padding: one more after than before
    dict(kernel_size=3, padding="valid"),
    dict(kernel_size=1),
])
def test_conv_rows_are_the_patches_its_weight_multiplies(options):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, **options)
    x = torch.randn(3, 5, 11, 9)
    inputs = collect_layer_inputs(conv, lambda: conv(x), max_rows=10**6)[conv]
    reference = conv(x)  # [n, out, h, w] -> rows in batch-major position order
    expected = (reference - conv.bias[None, :, None, None]).permute(0, 2, 3, 1).reshape(-1, 7)
    assert inputs.shape == (expected.shape[0], 5 * conv.kernel_size[0] * conv.kernel_size[1])
    # Rows are kept in bfloat16, so the product matches the conv to bf16 precision.
    assert torch.allclose(inputs @ conv.weight.reshape(7, -1).t(), expected, atol=0.05)
    if not isinstance(conv.padding, str):  # F.unfold takes symmetric padding only
        unfolded = torch.nn.functional.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                                              stride=conv.stride)
        assert torch.equal(inputs, unfolded.transpose(1, 2).reshape(-1, inputs.shape[1]).bfloat16().float())


def test_an_unbatched_conv_input_and_a_sample_of_its_positions():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(2, 6, 6)
    full = collect_layer_inputs(conv, lambda: conv(x), max_rows=36)[conv]
    some = collect_layer_inputs(conv, lambda: conv(x), max_rows=10)[conv]
    assert full.shape == (36, 18) and some.shape == (10, 18)
    # A sample is made of real rows, each once.
    assert all(any(torch.equal(row, other) for other in full) for row in some)
    assert len({tuple(row.tolist()) for row in some}) == 10


def test_grouped_convs_are_left_to_round_to_nearest():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 4, 1))
    inputs = collect_layer_inputs(model, lambda: model(torch.randn(1, 4, 5, 5)))
    assert list(inputs) == [model[1]]


def test_a_run_that_reaches_no_layer_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(1, 1, 1))
    with pytest.raises(InvalidRequestError, match="reached no nn.Linear or nn.Conv2d"):
        collect_layer_inputs(model, lambda: None)
    with pytest.raises(InvalidRequestError, match="max_rows"):
        collect_layer_inputs(model, lambda: None, max_rows=0)


@settings(max_examples=60, deadline=None)
@given(batches=st.lists(st.integers(0, 40), min_size=1, max_size=12), max_rows=st.integers(1, 60))
def test_rows_are_all_kept_in_order_or_a_sample_of_distinct_rows(batches, max_rows):
    linear = nn.Linear(2, 1)
    index = torch.arange(sum(batches))
    stream = torch.stack([index // 256, index % 256], 1).float()  # row i spells i, exactly in bfloat16

    def run():
        start = 0
        for size in batches:
            linear(stream[start:start + size])
            start += size

    if not sum(batches):
        with pytest.raises(InvalidRequestError):
            collect_layer_inputs(linear, run, max_rows=max_rows)
        return
    rows = collect_layer_inputs(linear, run, max_rows=max_rows)[linear]
    again = collect_layer_inputs(linear, run, max_rows=max_rows)[linear]
    assert torch.equal(rows, again)  # seeded: the same run keeps the same rows
    if len(stream) <= max_rows:
        assert torch.equal(rows, stream)
    else:
        kept = (rows[:, 0] * 256 + rows[:, 1]).long().tolist()
        assert len(kept) == max_rows and len(set(kept)) == max_rows and set(kept) <= set(index.tolist())


def test_a_long_run_is_sampled_evenly_not_by_its_first_rows():
    linear = nn.Linear(1, 1)
    calls = 200

    def run():
        for call in range(calls):
            linear(torch.full((50, 1), float(call)))

    rows = collect_layer_inputs(linear, run, max_rows=1000)[linear][:, 0]
    # 10,000 rows, 1,000 kept: each tenth of the run holds about 100 (binomial sd ~9.5).
    counts = torch.bincount((rows // (calls // 10)).long(), minlength=10)
    assert counts.min() >= 60 and counts.max() <= 140, counts.tolist()


def test_forwards_inside_not_recorded_are_left_out():
    from torch_arbiter.holo.calibrate import not_recorded

    linear = nn.Linear(3, 3)

    def run():
        with not_recorded():
            linear(torch.zeros(5, 3))
            with not_recorded():
                linear(torch.zeros(5, 3))
            linear(torch.zeros(5, 3))  # still inside the outer block
        linear(torch.ones(2, 3))

    assert torch.equal(collect_layer_inputs(linear, run)[linear], torch.ones(2, 3))


def test_the_run_records_without_autograd():
    # A user's calibration callable need not say no_grad: rows must not hold a graph (or its memory).
    conv = nn.Conv2d(2, 3, 3)
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    grad_seen = []

    def run():
        grad_seen.append(torch.is_grad_enabled())
        conv(x)

    rows = collect_layer_inputs(conv, run)[conv]
    assert grad_seen == [False] and not rows.requires_grad
