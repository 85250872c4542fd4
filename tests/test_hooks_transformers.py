"""transformers glue: HoloTensorConfig through from_pretrained, and loading a converted dir (tiny model)."""

from __future__ import annotations

import json

import pytest
import torch

from torch_arbiter import Arbiter, ArbiterConfig, WorkloadType
from torch_arbiter.errors import InvalidRequestError, PatchError
from torch_arbiter.hooks import managed_model_of


def test_from_pretrained_with_holo_config_patches_and_registers(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from torch_arbiter.hooks import HoloTensorConfig

    path, tokens, expected = tiny_llama_dir
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(2))  # virtual: room for the kind's activation reserve
    config = HoloTensorConfig(workload=WorkloadType.LLM_INFERENCE, priority="high", arbiter=arbiter)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, local_files_only=True)
    managed = managed_model_of(model)
    try:
        assert managed is not None and managed.arbiter is arbiter and managed.allocation is not None
        assert len(managed.levels) == 16  # 2 x 7 projections, the untied head and the embedding
        with torch.no_grad():
            assert torch.equal(model(tokens).logits, expected)
        managed.set_quality(managed.min_quality)
        with torch.no_grad():
            lowered = model(tokens).logits
        assert not torch.equal(lowered, expected)
        assert torch.nn.functional.cosine_similarity(lowered.flatten(), expected.flatten(), dim=0) > 0.95
        assert json.loads(model.config.to_json_string())["quantization_config"]["quant_method"] == "holo"
    finally:
        managed.unpatch()
    assert managed.allocation.released


def test_from_pretrained_with_a_holo_dir_never_holds_the_layer_weights_densely(
        tiny_llama_dir, tiny_llama_holo, monkeypatch):
    from transformers import AutoModelForCausalLM

    from torch_arbiter.hooks import HoloTensorConfig
    from torch_arbiter.hooks.transformers_quantizer import HoloQuantizer

    path, tokens, expected = tiny_llama_dir
    devices_when_loaded = {}
    after_loading = HoloQuantizer._process_model_after_weight_loading

    def record(self, model, **kwargs):
        devices_when_loaded.update({name: p.device.type for name, p in model.named_parameters()})
        return after_loading(self, model, **kwargs)

    monkeypatch.setattr(HoloQuantizer, "_process_model_after_weight_loading", record)
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(2))
    config = HoloTensorConfig(holo_dir=tiny_llama_holo, arbiter=arbiter)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, local_files_only=True)
    managed = managed_model_of(model)
    try:
        dense = {name for name, device in devices_when_loaded.items() if device != "meta"}
        assert not set(managed.levels) & dense, "a layer weight was loaded densely"
        assert dense and all(name.endswith("norm.weight") for name in dense)  # only the exact tensors are read
        assert arbiter.wait_until_settled(30) and managed.quality == 1.0
        with torch.no_grad():
            assert torch.equal(model(tokens).logits, expected)
    finally:
        managed.unpatch()


def test_from_pretrained_refuses_a_holo_dir_made_from_other_weights(tiny_llama_holo, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from torch_arbiter.hooks import HoloTensorConfig

    torch.manual_seed(1)  # same architecture as tiny_llama_dir, other weights
    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    other.save_pretrained(tmp_path / "other")
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(2))
    with pytest.raises(PatchError, match="converted from other weights"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "other", local_files_only=True,
                                             quantization_config=HoloTensorConfig(holo_dir=tiny_llama_holo, arbiter=arbiter))
    assert arbiter.state().workloads == ()


def test_a_converted_dir_loads_through_from_holo_pretrained(tiny_llama_dir, tmp_path):
    from torch_arbiter.holo.convert import convert
    from torch_arbiter.hooks import HoloTensorConfig, from_holo_pretrained

    path, tokens, expected = tiny_llama_dir
    convert(path, tmp_path / "holo", progress=False)
    model = from_holo_pretrained(tmp_path / "holo", quantization_config=HoloTensorConfig(register=False, quality=0.5))
    managed = managed_model_of(model)
    try:
        assert managed.quality == pytest.approx(0.5) and managed.resident_bytes == managed.bytes_at(0.5)
        managed.set_quality(1.0)
        with torch.no_grad():
            assert torch.equal(model(tokens).logits, expected)
    finally:
        managed.unpatch()
    (tmp_path / "holo" / "config.json").unlink()
    with pytest.raises(PatchError, match="no config.json"):
        from_holo_pretrained(tmp_path / "holo")


@pytest.mark.parametrize("kwargs", [{"workload": "painting"}, {"priority": "urgent"}, {"quality": 1.5}])
def test_holo_config_rejects_bad_fields(kwargs):
    from torch_arbiter.hooks import HoloTensorConfig

    with pytest.raises(InvalidRequestError):
        HoloTensorConfig(**kwargs)


def _calibrated(managed) -> list[bool]:
    """For each encoded linear: whether it was calibrated (embeddings never are)."""
    from torch_arbiter.nn import HoloLinear

    return ["out_rel_error" in module.holo.level_fidelity(1) for module in managed.layers.values()
            if isinstance(module, HoloLinear) and module.holo.scheme == "nested4x2"]


def test_patch_self_calibrates_a_causal_lm_unless_told_not_to(tiny_llama_dir):
    from transformers import LlamaForCausalLM

    from torch_arbiter.hooks import patch

    path, tokens, logits = tiny_llama_dir
    model = LlamaForCausalLM.from_pretrained(path).eval()
    rng = torch.random.get_rng_state()
    managed = patch(model, register=False, progress=False)
    assert torch.equal(torch.random.get_rng_state(), rng)  # seeded on its own generator state
    calibrated = _calibrated(managed)
    assert calibrated and all(calibrated)  # its own generated tokens reached every linear
    codes = {name: module.holo.fragment("hi").clone() for name, module in managed.layers.items()
             if module.holo.scheme == "nested4x2"}
    managed.unpatch()
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, logits)
    again = patch(model, register=False, progress=False)  # same seed, same tokens, same codes
    assert all(torch.equal(again.layers[name].holo.fragment("hi"), hi) for name, hi in codes.items())
    again.unpatch()
    plain = patch(model, register=False, progress=False, calibration=False)
    assert not any(_calibrated(plain))
    plain.unpatch()


def test_a_causal_lms_self_calibration_records_its_final_forward_only(tiny_llama_dir):
    from transformers import LlamaForCausalLM

    from torch_arbiter.holo.calibrate import collect_layer_inputs
    from torch_arbiter.hooks.self_calibration import SELF_CALIBRATION_TOKENS, self_calibration_run

    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir[0]).eval()
    inputs = collect_layer_inputs(model, self_calibration_run(model, "transformers", progress=False),
                                  max_rows=10**6)
    sequences, length = SELF_CALIBRATION_TOKENS
    # Generating token by token makes the same rows again; only the forward over the text counts.
    assert inputs and all(rows.shape[0] == sequences * length for rows in inputs.values())


def test_patch_self_calibrates_an_encoder_on_random_tokens():
    from transformers import BertConfig, BertModel

    from torch_arbiter.hooks import patch

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=128)).eval()
    managed = patch(model, register=False, progress=False)
    calibrated = _calibrated(managed)
    assert calibrated and all(calibrated)
    managed.unpatch()
