"""The CUDA path of the quantised HoloLinear levels (torch's int4 weight-only kernel), run on the
CPU through torch's CPU twin of the same kernel (``_weight_int4pack_mm_for_cpu``): packing made
once per level change, the layout probe and its inverse, level 2 as two 4-bit stages of one
input, the large-batch decode, and the numerics against the HoloTensor's own decode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_arbiter.nn import HoloEmbedding, HoloLinear, _int4, modules

pytestmark = pytest.mark.skipif(not _int4.available(torch.device("cpu")), reason="torch lacks the CPU int4 kernel")


@pytest.fixture
def int4_on_cpu(monkeypatch):
    """Route the CPU through the int4 path the modules take on CUDA."""
    monkeypatch.setattr(modules, "_INT4_DEVICE_TYPES", ("cpu",))


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("tiles", [2, 4, 8])
def test_layout_probe_inverts_torchs_converter(tiles):
    found = _int4.layout(torch.device("cpu"), tiles)
    assert found is not None and found.cols == 16 * tiles
    codes = torch.randint(0, 16, (4 * found.rows, 3 * found.cols), dtype=torch.uint8)
    assert torch.equal(_int4.unpack(_int4.pack(codes), *codes.shape, found), codes)


@pytest.mark.parametrize("rows", [1, 5, 40])  # 40 >= _INT4_ROWS: decode to bf16 + one matmul
@pytest.mark.parametrize("shape, group", [((256, 192), 64), ((128, 512), 128), ((64, 96), 32)])
def test_int4_levels_match_the_decoded_weight(int4_on_cpu, rows, shape, group):
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0])
    holo = HoloLinear.from_linear(linear, rank=0, group_size=group)
    x = torch.randn(rows, shape[1])
    for level in range(1, holo.num_levels):
        holo.set_level(level)
        assert "int4_codes" in holo._resident and "hi" not in holo._resident
        assert holo.resident_bytes == holo.level_bytes(level)  # the packed layout replaces the codes
        expected = nn.functional.linear(x, holo.holo.decode(level), linear.bias)
        assert _rel(holo(x), expected) < 1e-2  # bf16 activations and accumulation
    holo.set_level(holo.num_levels)
    assert torch.equal(holo(x), linear(x))


def test_level_two_is_both_stages_in_one_kernel_call(int4_on_cpu, monkeypatch):
    torch.manual_seed(0)
    holo = HoloLinear.from_linear(nn.Linear(256, 128), rank=0, group_size=64)
    holo.set_level(2)
    packs, calls = [], []
    pack, matmul = _int4.pack, _int4.matmul
    monkeypatch.setattr(_int4, "pack", lambda codes: packs.append(codes.shape) or pack(codes))
    monkeypatch.setattr(_int4, "matmul", lambda x, *rest: calls.append(x.shape) or matmul(x, *rest))
    x = torch.randn(3, 256)
    level2 = holo(x)
    holo(x)
    assert packs == [] and calls == [(3, 512), (3, 512)]  # packed once in set_level; [x, x]
    holo.set_level(1)
    assert packs == [(128, 256)]
    level1 = holo(x)
    exact = holo.to_original()(x)
    assert _rel(level2, exact) < _rel(level1, exact) / 4  # the second stage adds precision


def test_rank_branch_and_a_tied_embedding_read_the_packed_codes(int4_on_cpu):
    torch.manual_seed(0)
    embedding = nn.Embedding(320, 128)
    head = nn.Linear(128, 320, bias=False)
    head.weight = embedding.weight
    holo_head = HoloLinear.from_linear(head, rank=8)
    holo_embedding = HoloEmbedding.tied_to(holo_head, embedding)
    ids = torch.tensor([1, 64, 319])
    x = torch.randn(2, 128)
    for level in (1, 2):
        holo_embedding.set_level(level)
        assert "int4_codes" in holo_head._resident
        assert torch.allclose(holo_embedding(ids), holo_head.holo.decode(level)[ids], atol=1e-5)
        assert _rel(holo_head(x), nn.functional.linear(x, holo_head.holo.decode(level))) < 1e-2
