"""A patched model stays a good nn.Module: state_dict()/save_pretrained() give the original weights
under their original names at any quality, load_state_dict accepts only those, and .to(dtype) is
refused before anything changes (never ignored)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torch_arbiter import patch
from torch_arbiter.errors import PatchError

# Fixed options skip the encoder's search (group, rotation, rank): these tests are about the
# module, not the codec, and the search would triple their time.
_FAST = dict(register=False, progress=False, encode_options=dict(group_size=32, rank=0, rotate=True, symmetric=True))


def _tiny_llama(tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_save_pretrained_of_a_patched_model_is_the_original_bit_for_bit(tie, tmp_path):
    from transformers import LlamaForCausalLM

    model = _tiny_llama(tie)
    reference = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    tokens = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens).logits
    managed = patch(model, **_FAST)
    try:
        for quality in (managed.min_quality, 0.6, 1.0):
            managed.set_quality(quality)
            state = model.state_dict()
            assert sorted(state) == sorted(reference)
            assert all(torch.equal(state[name], reference[name]) for name in reference)
        managed.set_quality(managed.min_quality)
        model.save_pretrained(tmp_path / "saved")
    finally:
        managed.unpatch()
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert all(torch.equal(reloaded.state_dict()[name], reference[name]) for name in reference)
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, expected)


def test_load_state_dict_accepts_the_same_weights_and_refuses_others():
    model = _tiny_llama(False)
    reference = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    managed = patch(model, **_FAST)
    try:
        managed.set_quality(managed.min_quality)
        assert not model.load_state_dict(reference).missing_keys
        changed = dict(reference)
        changed["model.layers.1.mlp.down_proj.weight"] = changed["model.layers.1.mlp.down_proj.weight"] + 1
        with pytest.raises(PatchError, match="unpatch"):
            model.load_state_dict(changed)
        missing = {k: v for k, v in reference.items() if k != "lm_head.weight"}
        with pytest.raises(RuntimeError, match="lm_head.weight"):
            model.load_state_dict(missing)
        assert "lm_head.weight" in model.load_state_dict(missing, strict=False).missing_keys
        # norms and biases (not swapped) still load
        norms = dict(reference)
        norms["model.norm.weight"] = torch.full_like(norms["model.norm.weight"], 2.0)
        model.load_state_dict(norms)
        assert torch.equal(model.model.norm.weight, norms["model.norm.weight"])
    finally:
        managed.unpatch()


_CASTS = [lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double(),
          lambda m: m.to("cpu", torch.float16)]


def test_a_dtype_change_is_refused_before_anything_changes():
    model = _tiny_llama(True)
    managed = patch(model, **_FAST)
    try:
        dtypes = {name: t.dtype for name, t in model.state_dict().items()}
        for cast in _CASTS:
            with pytest.raises(PatchError, match="unpatch"):
                cast(model)
            assert {name: t.dtype for name, t in model.state_dict().items()} == dtypes
        model.to("cpu")  # a device move is not a dtype change
        model.float()  # nor a cast to the dtype it has
    finally:
        managed.unpatch()
    _CASTS[0](model)  # once unpatched, the model casts as any other
    assert model.model.norm.weight.dtype == torch.bfloat16


def test_a_patched_conv_model_saves_its_original_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 32, 3), nn.ReLU(), nn.Conv2d(32, 16, 3))
    reference = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    managed = patch(model, **_FAST)
    try:
        managed.set_quality(managed.min_quality)
        state = model.state_dict()
        assert sorted(state) == sorted(reference)
        assert all(torch.equal(state[name], reference[name]) for name in reference)
    finally:
        managed.unpatch()


@pytest.mark.slow
def test_save_pretrained_of_a_patched_smollm2_reloads_as_the_original(smollm2, smollm2_holo_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from torch_arbiter.demo import models

    reference, tokenizer = smollm2
    model, _ = models.load_smollm2()
    managed = patch(model, register=False, holo_dir=smollm2_holo_dir, progress=False)
    try:
        managed.set_quality(managed.min_quality)
        model.save_pretrained(tmp_path / "saved")
    finally:
        managed.unpatch()
    del model
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    expected = reference.state_dict()
    state = reloaded.state_dict()
    assert sorted(state) == sorted(expected)  # all 273 names (the tied head included)
    assert all(torch.equal(state[name], expected[name]) for name in expected)
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        want = reference.generate(**prompt, max_new_tokens=6, do_sample=False)
        got = reloaded.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
