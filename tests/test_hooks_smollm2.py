"""patch() on the real SmolLM2-135M-Instruct: exactness, perplexity per quality, live switching.

The model is converted once and cached (conftest ``smollm2_holo_dir``). One patched copy serves
the whole module, to keep it fast on two cores: the tests run in file order and the last one
unpatches it.
"""

from __future__ import annotations

import threading

import pytest
import torch

from torch_arbiter.demo import models
from torch_arbiter.hooks import managed_model_of, patch

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
NEW_TOKENS = 8
PPL_TOKENS = 192


def _generate(model, tokenizer, new_tokens: int = NEW_TOKENS) -> torch.Tensor:
    batch = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)


def _ppl(model, tokenizer) -> float:
    return models.perplexity(model, tokenizer, models.reference_text(), max_tokens=PPL_TOKENS,
                             stride=PPL_TOKENS, window=PPL_TOKENS)


@pytest.fixture(scope="module")
def reference_outputs(smollm2):
    model, tokenizer = smollm2
    return {"tokens": _generate(model, tokenizer), "ppl": _ppl(model, tokenizer)}


@pytest.fixture(scope="module")
def managed_smollm2(smollm2_holo_dir):
    model, tokenizer = models.load_smollm2()
    managed = patch(model, register=False, holo_dir=smollm2_holo_dir, progress=False)
    yield managed, tokenizer
    managed.unpatch()


def test_greedy_generate_at_quality_one_gives_the_unpatched_tokens(managed_smollm2, reference_outputs):
    managed, tokenizer = managed_smollm2
    managed.set_quality(1.0)
    assert len(managed.levels) == 211  # 30 blocks x 7 projections + the tied embedding/head, once
    assert managed.model.model.embed_tokens.holo is managed.model.lm_head.holo
    assert torch.equal(_generate(managed.model, tokenizer), reference_outputs["tokens"])


def test_perplexity_and_resident_bytes_per_quality(managed_smollm2, reference_outputs, record_property):
    managed, tokenizer = managed_smollm2
    rows = []
    for q in (1.0, 0.6, managed.min_quality):
        managed.set_quality(q)
        rows.append((q, managed.resident_bytes, managed.bytes_at(q), _ppl(managed.model, tokenizer)))
    managed.set_quality(1.0)
    for q, resident, planned, ppl in rows:
        record_property(f"q={q:.3f}", f"resident={resident} ppl={ppl:.3f}")
        print(f"quality {q:.3f}: resident {resident} bytes, perplexity {ppl:.3f} "
              f"(reference {reference_outputs['ppl']:.3f})")
        assert resident == planned
    assert rows[0][3] == pytest.approx(reference_outputs["ppl"], rel=1e-6)
    assert [r[1] for r in rows] == sorted((r[1] for r in rows), reverse=True)
    assert rows[-1][1] < 0.16 * managed.full_bytes  # about 4.5 bits per weight, embedding included
    assert rows[1][3] < 1.02 * reference_outputs["ppl"]  # mostly 8-bit: within 2 %
    assert rows[2][3] < 2.0 * reference_outputs["ppl"]  # every layer 4-bit: degraded, still coherent


def test_quality_moves_only_between_generation_steps(managed_smollm2):
    """A second thread flips the quality while generate() runs; every forward sees one plan."""
    managed, tokenizer = managed_smollm2
    model = managed.model
    layers = list(managed.layers.values())
    snapshots: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    started = []

    def before(_module, _args):
        started.append(tuple(layer.level for layer in layers))

    def after(_module, _args, _output):
        snapshots.append((started.pop(), tuple(layer.level for layer in layers)))

    pre = model.register_forward_pre_hook(before)
    post = model.register_forward_hook(after, prepend=True)  # before the safe point's exit
    stop = threading.Event()
    requests = []

    def flipper():
        qualities = (0.55, 1.0)
        while not stop.is_set():
            q = qualities[len(requests) % 2]
            requests.append(q)
            managed.set_quality(q)
            stop.wait(0.05)

    thread = threading.Thread(target=flipper)
    try:
        managed.set_quality(1.0)
        thread.start()
        tokens = _generate(model, tokenizer, new_tokens=12)
    finally:
        stop.set()
        thread.join(30)
        pre.remove()
        post.remove()
    managed.set_quality(1.0)
    assert tokens.shape[1] > tokenizer(PROMPT, return_tensors="pt").input_ids.shape[1]
    assert len(snapshots) >= 2 and len(requests) >= 2
    assert all(start == end for start, end in snapshots), "a level changed in the middle of a forward"
    assert len({start for start, _ in snapshots}) >= 2, "the quality never moved during generate()"


def test_a_converted_dir_loads_live_through_transformers(smollm2_holo_dir, reference_outputs):
    from transformers import AutoTokenizer

    from torch_arbiter.hooks.transformers_quantizer import HoloTensorConfig, from_holo_pretrained

    tokenizer = AutoTokenizer.from_pretrained(smollm2_holo_dir, local_files_only=True)
    model = from_holo_pretrained(smollm2_holo_dir, dtype=torch.float32,
                                 quantization_config=HoloTensorConfig(register=False, quality=0.6))
    managed = managed_model_of(model)
    try:
        assert len(managed.levels) == 211 and model.model.embed_tokens.holo is model.lm_head.holo
        assert managed.quality == pytest.approx(0.6) and managed.resident_bytes == managed.bytes_at(0.6)
        managed.set_quality(1.0)
        assert torch.equal(_generate(model, tokenizer), reference_outputs["tokens"])
    finally:
        managed.unpatch()


def test_unpatch_restores_the_model_bit_for_bit(managed_smollm2, smollm2, reference_outputs):
    """Runs last in this module: it unpatches the shared model."""
    managed, tokenizer = managed_smollm2
    reference, _ = smollm2
    model = managed.model
    managed.set_quality(managed.min_quality)
    managed.unpatch()
    expected = reference.state_dict()
    restored = model.state_dict()
    assert restored.keys() == expected.keys()
    assert all(torch.equal(restored[key], expected[key]) for key in expected)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(_generate(model, tokenizer), reference_outputs["tokens"])
