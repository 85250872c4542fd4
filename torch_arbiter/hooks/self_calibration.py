"""Self-calibration: inputs a model makes for itself, so ``patch(model)`` calibrates with no data.

GPTQ rounding (``HoloTensor.encode(calibration=...)``) needs each layer's input activations. A
user who writes only ``patch(model)`` gives none, so the model supplies them:

- a transformers causal LM samples its own text from a neutral start (its BOS token; top-k 50 at
  temperature 1), the data-free calibration of LLM-QAT ("generated data"): what it generates is
  what its layers are tuned to see;
- any other transformers model that takes ``input_ids`` (an encoder such as BERT) reads random
  token ids from its vocabulary: no text, but its embeddings, attention and MLPs see their own
  statistics (MiniLM at <= 4.5 bits per weight, on text it never saw: cosine 0.963 without
  calibration, 0.971 with it; ``bench/results/codec_minilm.md``);
- a diffusers pipeline runs a short stretch of its own denoising loop (a few steps, one image).

Everything is seeded, so a patch is reproducible. The encoder keeps a GPTQ rounding only where it
measures better than round-to-nearest on held-out rows of these inputs (see
:mod:`torch_arbiter.holo.codec`), so a poor self-made sample costs encode time, not fidelity on
those rows.

Linears and (ungrouped) convs are calibrated, a conv on the patches of its input
(:mod:`torch_arbiter.holo.calibrate`); on the digits DDPM that is what lets a pipeline's own loop
help at all (its UNet is nearly all convs).

Limits: embeddings and grouped convs stay round-to-nearest; a pipeline whose ``__call__`` needs
arguments other than a prompt is not self-calibrated (a warning says so; pass
``calibration=callable``).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

import torch
from torch import nn

from ..holo.calibrate import not_recorded

__all__ = ["SELF_CALIBRATION_HOOK", "SELF_CALIBRATION_TOKENS", "SELF_CALIBRATION_STEPS", "self_calibration_run"]

SELF_CALIBRATION_HOOK = "torch_arbiter_self_calibration"
"""Tag of the technique (logs and progress bars)."""

#: Tokens a model generates or reads for its own calibration: sequences x length.
SELF_CALIBRATION_TOKENS = (8, 128)
#: Denoising steps of a pipeline's self-calibration run. Each step gives a low-resolution conv only
#: h*w rows: with 4 steps the digits DDPM's 8x8 convs had 256 rows for 288 to 576 columns, too few
#: for GPTQ to pass the held-out rule, and its lowest level measured 36.0 dB (mean of 8 rotation
#: seeds); with 8 steps 38.9 dB, and on another batch of images 38.9 -> 40.7 dB (16 steps: 38.5).
SELF_CALIBRATION_STEPS = 8
_SEED = 0
_TOP_K = 50

_log = logging.getLogger(__name__)


def self_calibration_run(obj: Any, kind: str, progress: bool = True) -> Callable[[], Any] | None:
    """The no-argument callable that drives ``obj`` on inputs it makes itself, or None.

    Args:
        obj: what :func:`~torch_arbiter.hooks.patch` was given.
        kind: ``"transformers"``, ``"diffusers"`` or ``"module"`` (as ``patch`` classifies it).
        progress: show a tqdm bar saying what runs.

    Returns:
        A callable for :func:`~torch_arbiter.holo.calibrate.collect_layer_inputs`, or None when
        ``obj`` gives no way to make inputs (a plain ``nn.Module``: its input is unknown).
    """
    if kind == "transformers":
        if _is_causal_lm(obj):
            return lambda: _generate(obj, progress)
        if getattr(obj, "main_input_name", None) == "input_ids" and getattr(obj.config, "vocab_size", 0):
            return lambda: _random_tokens(obj, progress)
        return None
    if kind == "diffusers":
        return _denoising_run(obj, progress)
    return None


def _is_causal_lm(model: nn.Module) -> bool:
    config = model.config
    return (hasattr(model, "generate") and not getattr(config, "is_encoder_decoder", False)
            and any(name.endswith("ForCausalLM") for name in (getattr(config, "architectures", None) or [])
                    + [type(model).__name__]))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _bar(progress: bool, total: int, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="token", disable=not progress)


@torch.no_grad()
def _generate(model: nn.Module, progress: bool) -> None:
    """Sample text from BOS, then run it through the model once (the rows the hooks keep)."""
    from transformers.generation.streamers import BaseStreamer

    sequences, length = SELF_CALIBRATION_TOKENS
    config = model.config
    start = next((t for t in (getattr(config, "bos_token_id", None), getattr(config, "eos_token_id", None), 0)
                  if isinstance(t, int)), 0)
    pad = getattr(config, "pad_token_id", None)
    bar = _bar(progress, sequences * length, f"self-calibrating: generating {sequences * length} tokens")

    class _Counter(BaseStreamer):
        def put(self, value):
            if value.dim() == 1:  # one new token per sequence (the prompt arrives as [batch, 1] first)
                bar.update(value.numel())

        def end(self):
            bar.close()

    ids = torch.full((sequences, 1), start, dtype=torch.long, device=_device(model))
    with torch.random.fork_rng(devices=[]), not_recorded():
        torch.manual_seed(_SEED)
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=_TOP_K,
                                   temperature=1.0, top_p=1.0, max_new_tokens=length - 1, min_new_tokens=length - 1,
                                   pad_token_id=pad if isinstance(pad, int) else start, streamer=_Counter())
    bar.close()
    model(generated)


@torch.no_grad()
def _random_tokens(model: nn.Module, progress: bool) -> None:
    sequences, length = SELF_CALIBRATION_TOKENS
    with _bar(progress, sequences * length, f"self-calibrating: {sequences * length} random tokens") as bar:
        generator = torch.Generator().manual_seed(_SEED)
        ids = torch.randint(0, model.config.vocab_size, (sequences, length), generator=generator)
        model(input_ids=ids.to(_device(model)))
        bar.update(ids.numel())


def _denoising_run(pipeline: Any, progress: bool) -> Callable[[], Any] | None:
    parameters = inspect.signature(pipeline.__call__).parameters
    options: dict[str, Any] = {}
    if "num_inference_steps" not in parameters:
        _log.warning("%s: %s.__call__ takes no num_inference_steps; not self-calibrating it (pass "
                     "calibration=callable)", SELF_CALIBRATION_HOOK, type(pipeline).__name__)
        return None
    options["num_inference_steps"] = SELF_CALIBRATION_STEPS
    if "prompt" in parameters:
        options["prompt"] = ""
    if "batch_size" in parameters:
        options["batch_size"] = 1
    if "generator" in parameters:
        options["generator"] = torch.Generator().manual_seed(_SEED)
    if "output_type" in parameters:
        options["output_type"] = "np"
    for name, parameter in parameters.items():
        if name not in options and name != "self" and parameter.default is inspect.Parameter.empty \
                and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            _log.warning("%s: %s.__call__ needs %r; not self-calibrating it (pass calibration=callable)",
                         SELF_CALIBRATION_HOOK, type(pipeline).__name__, name)
            return None

    def run() -> None:
        from tqdm.auto import tqdm

        with tqdm(total=1, desc=f"self-calibrating: {SELF_CALIBRATION_STEPS} denoising steps",
                  disable=not progress) as bar:
            with torch.no_grad():
                pipeline(**options)
            bar.update(1)

    return run
