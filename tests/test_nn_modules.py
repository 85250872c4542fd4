"""HoloLinear / HoloConv2d: forward at every level, honest resident bytes, exact round trip."""

import pytest
import torch
from torch import nn

from torch_arbiter.errors import InvalidRequestError
from torch_arbiter.nn import HoloConv2d, HoloEmbedding, HoloLinear


def _rel(a, b):
    return (a - b).norm().item() / b.norm().item()


@pytest.mark.parametrize("shape", [(576, 192), (96, 80), (64, 100)])
@pytest.mark.parametrize("rows", [1, 3, 33, 150])  # 2 x 33 and 2 x 150 rows: the dense path on the CPU
def test_linear_forward_matches_decoded_weight_at_every_level(shape, rows):
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0])
    holo = HoloLinear.from_linear(linear, rank=0)
    x = torch.randn(2, rows, shape[1])
    reference = linear(x)
    for k in range(1, holo.num_levels + 1):
        holo.set_level(k)
        assert holo.level == k
        out = holo(x)
        assert out.shape == reference.shape
        expected = nn.functional.linear(x, holo.holo.decode(k), linear.bias)
        # The fused kernel rounds the input to int16 per run of 32 values: a tiny, bounded extra error.
        assert _rel(out, expected) < 1e-3
        assert holo.resident_bytes == holo.level_bytes(k) == holo.holo.level_bytes(k)
    assert torch.equal(holo(x), reference)  # top level: the original F.linear, bit for bit


def test_linear_with_rank_branch_and_no_bias():
    gen = torch.Generator().manual_seed(2)
    linear = nn.Linear(256, 128, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(128, 3, generator=gen) @ torch.randn(3, 256, generator=gen)
                            + 0.01 * torch.randn(128, 256, generator=gen))
    holo = HoloLinear.from_linear(linear, rank=8)
    assert holo.holo.rank == 8
    for rows in (1, 20):
        x = torch.randn(rows, 256, generator=gen)
        for k in (1, 2):
            holo.set_level(k)
            expected = x @ holo.holo.decode(k).t()
            assert _rel(holo(x), expected) < 1e-3
            assert holo.resident_bytes == holo.level_bytes(k)


def test_lower_level_holds_fewer_bytes_and_releases_the_exact_weight():
    linear = nn.Linear(512, 512)
    holo = HoloLinear.from_linear(linear)
    full = holo.resident_bytes
    assert full == 512 * 512 * 4
    holo.set_level(2)
    mid = holo.resident_bytes
    holo.set_level(1)
    low = holo.resident_bytes
    assert low < mid < full / 3
    assert all(t.data_ptr() != linear.weight.data_ptr() for t in holo._resident.values())


def test_to_original_is_bit_identical_and_keeps_flags():
    linear = nn.Linear(300, 70).to(torch.bfloat16)
    linear.weight.requires_grad_(False)
    holo = HoloLinear.from_linear(linear)
    holo.set_level(1)
    restored = holo.to_original()
    assert isinstance(restored, nn.Linear) and restored.weight.dtype == torch.bfloat16
    assert torch.equal(restored.weight, linear.weight) and torch.equal(restored.bias, linear.bias)
    assert restored.weight.requires_grad is False and restored.bias.requires_grad is True
    x = torch.randn(4, 300, dtype=torch.bfloat16)
    holo.set_level(holo.num_levels)
    assert torch.equal(holo(x), linear(x))


def test_conv_every_level_and_round_trip():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 48, 3, padding=1, stride=2)
    holo = HoloConv2d.from_conv(conv)
    x = torch.randn(2, 32, 9, 9)
    reference = conv(x)
    errors = []
    for k in range(1, holo.num_levels + 1):
        holo.set_level(k)
        out = holo(x)
        expected = nn.functional.conv2d(x, holo.holo.decode(k), conv.bias, 2, 1)
        assert torch.allclose(out, expected, atol=1e-5)
        assert holo.resident_bytes == holo.level_bytes(k)
        errors.append(_rel(out, reference))
    assert errors[0] > errors[1] > errors[2] == 0.0 and errors[0] < 0.2
    restored = holo.to_original()
    assert torch.equal(restored.weight, conv.weight) and restored.stride == conv.stride
    assert torch.equal(restored(x), reference)


def test_bad_levels_and_inputs_raise():
    holo = HoloLinear.from_linear(nn.Linear(64, 64))
    for bad in (4, -1, "2"):
        with pytest.raises(InvalidRequestError):
            holo.set_level(bad)


def test_level_zero_releases_the_weight_and_refuses_a_forward_until_a_level_is_set():
    layer = HoloLinear.from_linear(nn.Linear(64, 64))
    x = torch.randn(2, 64)
    reference = layer(x)
    layer.set_level(0)
    assert layer.resident_bytes == 0 and layer.level == 0
    with pytest.raises(InvalidRequestError, match="suspended"):
        layer(x)
    layer.set_level(layer.num_levels)  # from the host copy of its fragments, no re-encoding
    assert torch.equal(layer(x), reference)
    with pytest.raises(InvalidRequestError):
        HoloLinear.from_linear(nn.Conv2d(3, 3, 1))
    with pytest.raises(InvalidRequestError):
        HoloConv2d.from_conv(nn.Conv2d(3, 8, 3, padding_mode="reflect"))


def test_tiny_linear_has_one_exact_level():
    linear = nn.Linear(4, 3)
    holo = HoloLinear.from_linear(linear)
    assert holo.num_levels == 1 and holo.resident_bytes == 48
    x = torch.randn(5, 4)
    assert torch.equal(holo(x), linear(x))


@pytest.mark.parametrize("vocab", [256, 200])
def test_embedding_rows_match_decoded_table_at_every_level(vocab):
    torch.manual_seed(0)
    embedding = nn.Embedding(vocab, 96, padding_idx=0)
    holo = HoloEmbedding.from_embedding(embedding)
    ids = torch.tensor([[0, 5, vocab - 1], [7, 7, 130]])
    for k in range(1, holo.num_levels + 1):
        holo.set_level(k)
        assert torch.allclose(holo(ids), holo.holo.decode(k)[ids], atol=1e-6)
        assert holo.resident_bytes == holo.level_bytes(k)
    assert torch.equal(holo(ids), embedding(ids))
    restored = holo.to_original()
    assert torch.equal(restored.weight, embedding.weight) and restored.padding_idx == 0
    with pytest.raises(InvalidRequestError, match="max_norm"):
        HoloEmbedding.from_embedding(nn.Embedding(10, 4, max_norm=1.0))


def test_embedding_tied_to_a_head_shares_its_codes_and_level():
    torch.manual_seed(0)
    embedding = nn.Embedding(320, 128)
    head = nn.Linear(128, 320, bias=False)
    head.weight = embedding.weight  # tied, as in SmolLM2
    holo_head = HoloLinear.from_linear(head)
    holo_embedding = HoloEmbedding.tied_to(holo_head, embedding)
    ids = torch.tensor([1, 64, 319])
    for k in (1, 2, 3):
        holo_embedding.set_level(k)
        assert holo_head.level == k and holo_embedding.level == k
        assert holo_embedding.resident_bytes == holo_embedding.level_bytes(k) == 0
        assert torch.allclose(holo_embedding(ids), holo_head.holo.decode(k)[ids], atol=1e-6)
    holo_head.set_level(1)
    assert holo_embedding.level == 1
    with pytest.raises(InvalidRequestError, match="tie"):
        HoloEmbedding.tied_to(holo_head, nn.Embedding(320, 128))
