"""The C kernels of the quantised levels (holo_kernels.c) against the torch decode path they replace."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from torch_arbiter.holo import HoloTensor
from torch_arbiter.holo.codec import dequantize_rotated, rotate_input, unrotate
from torch_arbiter.nn import HoloEmbedding, HoloLinear, _kernels, cpu_kernels_available

pytestmark = pytest.mark.skipif(not cpu_kernels_available(), reason="needs the built kernels and an AVX2 CPU")


def _rel(a, b):
    return (a - b).norm().item() / b.norm().item()


def _level(holo, k):
    resident = {name: holo.fragment(name) for name in holo.level_fragments(k)}
    return resident, _kernels.codes_for(resident, holo.meta, k)


@settings(max_examples=25, deadline=None)
@given(out_blocks=st.integers(1, 12), in_features=st.integers(8, 300), group=st.sampled_from([32, 64, 128]),
       rotate=st.booleans(), symmetric=st.booleans(), rows=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_kernels_match_the_torch_decode(out_blocks, in_features, group, rotate, symmetric, rows, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(8 * out_blocks, in_features, generator=gen) * torch.rand(1, in_features, generator=gen)
    holo = HoloTensor.encode(weight, group_size=group, rotate=rotate, symmetric=symmetric, rank=0, min_numel=1)
    assume(holo.scheme != "exact")  # too narrow for its group: kept exact, no codes to run
    meta = holo.meta
    x = torch.randn(rows, in_features, generator=gen)
    for k in (1, 2):
        resident, codes = _level(holo, k)
        dense = dequantize_rotated(resident, meta, k, torch.float32)
        assert torch.allclose(_kernels.decode_rows(codes), dense, rtol=1e-6, atol=1e-6)
        assert torch.allclose(_kernels.decode_rows(codes, first=3, count=4), dense[3:7], rtol=1e-6, atol=1e-6)
        padded = nn.functional.pad(x, (0, meta["padded_features"] - in_features))
        rotated = rotate_input(padded, resident["signs"], meta["block"])
        assert torch.allclose(_kernels.rotate_rows(x, resident["signs"], meta["padded_features"], meta["block"]),
                              rotated, atol=1e-5)
        weight = unrotate(dense, resident["signs"], meta["block"])[:, :in_features]
        assert torch.allclose(_kernels.weight_rows(codes), weight, atol=1e-5)
        ids = torch.randint(0, dense.shape[0], (5,), generator=gen)
        assert torch.allclose(_kernels.weight_rows(codes, ids), weight[ids], atol=1e-5)
        if codes.fused:
            assert _rel(_kernels.linear(codes, x), rotated @ dense.t()) < 1e-3


def test_modules_without_the_kernels_compute_the_same(monkeypatch):
    torch.manual_seed(0)
    linear = nn.Linear(320, 256)
    embedding = nn.Embedding(256, 320)
    x, ids = torch.randn(2, 3, 320), torch.tensor([[0, 17, 255]])
    with_kernels = [HoloLinear.from_linear(linear), HoloEmbedding.from_embedding(embedding)]
    torch_path = [HoloLinear(with_kernels[0].holo, linear.bias),
                  HoloEmbedding(with_kernels[1].holo, with_kernels[1].embedding_options)]
    for k in (1, 2):
        for module in with_kernels:
            module.set_level(k)
        with monkeypatch.context() as patch:
            patch.setitem(_kernels._state, "lib", None)
            assert not cpu_kernels_available()
            for module in torch_path:
                module.set_level(k)
        assert with_kernels[0]._codes is not None and torch_path[0]._codes is None
        assert _rel(with_kernels[0](x), torch_path[0](x)) < 1e-4
        assert torch.allclose(with_kernels[1](ids), torch_path[1](ids), atol=1e-6)
        assert with_kernels[0].resident_bytes == torch_path[0].resident_bytes == with_kernels[0].level_bytes(k)


@pytest.mark.parametrize("kernels", [True, False])
def test_embedding_ids_out_of_range_raise_index_error(kernels, monkeypatch):
    if not kernels:
        monkeypatch.setitem(_kernels._state, "lib", None)
    holo = HoloEmbedding.from_embedding(nn.Embedding(64, 96))
    holo.set_level(1)
    for bad in (torch.tensor([3, 64]), torch.tensor([-1])):
        with pytest.raises(IndexError):
            holo(bad)
