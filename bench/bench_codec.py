"""HoloTensor codec quality and speed on real models, with the baselines measured in the same run.

Sections (``--only`` picks some):

- ``minilm``: all-MiniLM-L6-v2 (real fp32 weights). Mean cosine of mean-pooled sentence embeddings
  against the fp32 model and nearest-neighbour agreement (each sentence's nearest other sentence
  is the same as with fp32), on the first distinct sentences of the licence texts under /usr/share/common-licenses.
- ``smollm2``: SmolLM2-135M-Instruct perplexity on GPL-3 (``torch_arbiter.demo.models.perplexity``)
  and the KL divergence of its next-token distributions from the reference model's.
  Its reference weights are a dequantised Q4_1 GGUF: already on a 4-bit grid with asymmetric
  blocks of 32 along the input dimension, so round-to-nearest grouped the same way (RTN g32) is
  nearly lossless there and says nothing about a real fp model.
- ``ddpm``: the project's digits DDPM (when its weights exist): PSNR of images per quality against
  full quality, same seed; the holo levels also over several rotation seeds (their mean), since
  the rotation's random signs alone move the PSNR by a few dB.
- ``throughput``: encode and decode MB/s over SmolLM2's weights; decode against a memcpy of the
  same output bytes.

Methods, each applied to every weight the codec encodes (>= 2-D float, >= 4096 elements; the rest
stays exact in every method): ``holo`` at a uniform level or at a planned quality; ``rtn`` =
round-to-nearest asymmetric group quantisation along the input dimension (fp16 scale and minimum
per group); ``hqq`` = the ``hqq`` package's quantizer (0.2.8, its default proximal optimiser,
groups along the input dimension as its ``axis=1`` config, fp16 scale and zero: 4 + 32/g bits per
weight; a benchmark-only dependency, ``pip install .[bench]``); ``dct`` = the seed's method, the
whole-matrix 2-D DCT keeping the largest coefficients in fp16 plus a 1-bit-per-coefficient bitmap,
given exactly the bytes of the holo level it is compared with. Bits per weight = resident bytes x
8 / all parameters (embeddings, head, norms).

``holo`` is encoded three ways, as ``patch()`` does: *data-free* (``calibration=False``: no
inputs, round-to-nearest on the refitted grid), *self-calibrated* (``patch(model)``'s default:
the inputs the model makes itself, :mod:`torch_arbiter.hooks.self_calibration`) and, for MiniLM,
*calibrated on licences* (sentences of the licence texts under /usr/share/common-licenses). The
evaluation text is another domain: docstrings of Python's standard library
(``_common.evaluation_text``), held nowhere in the project and never calibrated on; MiniLM's
planned and HQQ rows are also judged on two Perl manuals (``_common.OTHER_EVALUATION_TEXTS``, when
present). ``planned at <= X bpw`` rows run the planner at the quality whose byte budget is X bits
per parameter (the issue's targets read off directly). Encode times include collecting the
calibration inputs and, for transformers models calibrated, measuring each weight's sensitivity.

Run: ``python bench/bench_codec.py [--only minilm,smollm2,ddpm,throughput] [--threads N] [--ppl-tokens N]
[--ddpm-rotation-seeds N] [--data-free-only]`` (``--data-free-only``: a quick loop that skips the
calibrated MiniLM and SmolLM2 encodings; its results file name ends in ``_data_free``).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (distinct_sentences, evaluation_sentences, evaluation_text,  # noqa: E402
                     other_evaluation_sentences, write_results)

from torch_arbiter.demo import models  # noqa: E402
from torch_arbiter.holo import (HoloTensor, collect_weight_inputs, min_quality, plan_bytes,  # noqa: E402
                                plan_quality, record_calls, record_model_errors)
from torch_arbiter.holo.calibrate import DEFAULT_CALIBRATION_ROWS  # noqa: E402
from torch_arbiter.hooks.self_calibration import self_calibration_run  # noqa: E402

_MIN_NUMEL = 4096
_CALIBRATION_SENTENCES = 400
_HQQ_GROUPS = (64, 32)


def _encodable(tensor: torch.Tensor) -> bool:
    return tensor.dim() >= 2 and tensor.is_floating_point() and tensor.numel() >= _MIN_NUMEL


def _params(model) -> dict[str, torch.nn.Parameter]:
    return dict(model.named_parameters())  # tied parameters appear once


# -- baselines ----------------------------------------------------------------------------------

def _rtn(weight: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, int]:
    """Round-to-nearest asymmetric group quantisation; returns (dequantised, bytes)."""
    matrix = weight.reshape(weight.shape[0], -1).float()
    cols = matrix.shape[1]
    padded = -(-cols // group) * group
    groups = torch.nn.functional.pad(matrix, (0, padded - cols)).reshape(matrix.shape[0], -1, group)
    low = groups.amin(-1, keepdim=True).half().float()
    high = groups.amax(-1, keepdim=True)
    scale = ((high - low) / (2 ** bits - 1)).half().float().clamp_min(1e-12)
    codes = ((groups - low) / scale).round_().clamp_(0, 2 ** bits - 1)
    out = (codes * scale + low).reshape(matrix.shape[0], -1)[:, :cols]
    nbytes = matrix.shape[0] * padded * bits // 8 + groups.shape[0] * groups.shape[1] * 4
    return out.reshape(weight.shape).to(weight.dtype), nbytes


def _hqq(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, int]:
    """HQQ 4-bit (its default optimiser), groups of ``group`` along the input; returns (dequantised, bytes).

    The input dimension is zero-padded to a multiple of ``group`` (as for RTN); scale and zero are
    rounded to fp16, what HQQ stores.
    """
    from hqq.core.quantize import Quantizer

    matrix = weight.reshape(weight.shape[0], -1).float()
    cols = matrix.shape[1]
    padded = -(-cols // group) * group
    matrix = torch.nn.functional.pad(matrix, (0, padded - cols))
    codes, meta = Quantizer.quantize(matrix, nbits=4, group_size=group, optimize=True, axis=1, device="cpu",
                                     bitpack=False)
    scale, zero = meta["scale"].half().float(), meta["zero"].half().float()
    out = ((codes.float() - zero) * scale).reshape(matrix.shape)[:, :cols]
    return out.reshape(weight.shape).to(weight.dtype), matrix.numel() // 2 + scale.numel() * 4


def _dct(weight: torch.Tensor, nbytes: int) -> tuple[torch.Tensor, int]:
    """Seed method: whole-matrix DCT, keep the largest coefficients (fp16) + a bitmap, in ``nbytes``."""
    from scipy.fft import dctn, idctn

    matrix = weight.reshape(weight.shape[0], -1).double().numpy()
    coeffs = dctn(matrix, norm="ortho")
    bitmap = math.ceil(coeffs.size / 8)
    keep = int(max(0, min(coeffs.size, (nbytes - bitmap) // 2)))
    flat = np.abs(coeffs).ravel()
    kept = np.zeros_like(coeffs)
    if keep:
        index = np.argpartition(flat, flat.size - keep)[flat.size - keep:]
        kept.ravel()[index] = coeffs.ravel()[index].astype(np.float16).astype(np.float64)
    out = torch.from_numpy(idctn(kept, norm="ortho")).reshape(weight.shape).to(weight.dtype)
    return out, bitmap + 2 * keep


# -- applying a method to a model ----------------------------------------------------------------

class _Variants:
    """Holds the encoded model and produces weight sets for each method at a byte budget."""

    def __init__(self, model, run=None, max_rows=DEFAULT_CALIBRATION_ROWS, seed=0, sensitivity=True):
        """Encode every weight of ``model``; ``run`` drives it for calibration inputs (None: data-free),
        of which ``max_rows`` per layer are kept (default: what ``patch()`` keeps); ``seed``: the
        rotation's signs; ``sensitivity``: also record each weight's model error on ``run``'s calls
        (what ``patch()`` does for a transformers model, not for a pipeline)."""
        self.params = _params(model)
        self.originals = {n: p.detach().clone() for n, p in self.params.items()}
        start = time.perf_counter()
        calibration = {}
        recorded = None
        if run is not None:
            with record_calls([model] if sensitivity else []) as recorded:  # as patch()'s _measure_sensitivity
                calibration = collect_weight_inputs(model, run, max_rows=max_rows)
        self.holos = {n: HoloTensor.encode(t, min_numel=_MIN_NUMEL, seed=seed,
                                           calibration=calibration.get(n) if _encodable(t) else None)
                      for n, t in self.originals.items()}
        if recorded is not None:
            with torch.no_grad():
                record_model_errors(recorded, {h: (lambda k, n=n: self.params[n].copy_(self.holos[n].decode(k)))
                                               for n, h in self.holos.items() if h.num_levels > 1})
        self.encode_s = time.perf_counter() - start
        self.numel = sum(t.numel() for t in self.originals.values())
        self.full = sum(h.full_bytes for h in self.holos.values())

    def holo_plan(self, plan):
        weights = {n: self.holos[n].decode(k) for n, k in plan.items()}
        return weights, plan_bytes(self.holos, plan)

    def uniform(self, level):
        return {n: min(level, h.num_levels) for n, h in self.holos.items()}

    def rtn(self, bits, group):
        return self.baseline(lambda t: _rtn(t, bits, group))

    def baseline(self, method):
        """Every encodable weight through ``method(weight) -> (dequantised, bytes)``, the rest exact."""
        weights, total = {}, 0
        for n, t in self.originals.items():
            if _encodable(t):
                weights[n], b = method(t)
            else:
                weights[n], b = t, t.numel() * t.element_size()
            total += b
        return weights, total

    def dct_like(self, plan):
        """DCT per tensor given the bytes the holo plan gives that tensor."""
        weights, total = {}, 0
        for n, t in self.originals.items():
            k = plan[n]
            if _encodable(t) and k < self.holos[n].num_levels:
                weights[n], b = _dct(t, self.holos[n].level_bytes(k))
            else:
                weights[n], b = t, t.numel() * t.element_size()
            total += b
        return weights, total

    def load(self, weights):
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(weights[n])

    def bpw(self, nbytes):
        return nbytes * 8 / self.numel


def _configs(variants: dict[str, _Variants], rtn_specs, budget_bpw=()):
    """Yield (name, weights, bytes) of every method compared, one at a time (each is a full copy).

    ``variants``: the holo encodings by label (the first is data-free: the DCT rows get its bytes).
    ``budget_bpw``: bits per weight at which the planner is also run (the quality whose byte
    budget is that many bits per parameter), to read the targets off directly.
    """
    first = next(iter(variants.values()))
    yield "fp reference", dict(first.originals), first.full
    for label, v in variants.items():
        for level_label, level in (("int4 (all)", 1), ("int8 (all)", 2)):
            yield (f"holo {label}, {level_label}", *v.holo_plan(v.uniform(level)))
        yield from _budget_plans(v, budget_bpw, f"holo {label}")
    for bits, group in rtn_specs:
        yield (f"rtn {bits}-bit g{group}", *first.rtn(bits, group))
    for group in _HQQ_GROUPS:
        yield (f"hqq 4-bit g{group}", *first.baseline(lambda t: _hqq(t, group)))
    for level in (1, 2):
        yield (f"dct (seed) at holo int{4 * level} bytes", *first.dct_like(first.uniform(level)))
    yield ("holo exact (top)", *first.holo_plan(first.uniform(3)))


def _budget_plans(v: _Variants, budget_bpw, label):
    """Planned rows at the qualities whose byte budget is ``budget_bpw`` bits per parameter."""
    for bpw in budget_bpw:
        q = bpw * v.numel / 8 / v.full
        if min_quality(v.holos) <= q <= 1:
            yield (f"{label}, planned at <= {bpw} bpw", *v.holo_plan(plan_quality(v.holos, q)))


def _encode_note(variants: dict[str, _Variants]) -> str:
    return "Encode time: " + ", ".join(f"{label} {v.encode_s:.1f} s" for label, v in variants.items()) + "."


def _grid_choices(v: _Variants) -> str:
    """How many encoded tensors took each (group size, rotated, symmetric) level-1 grid."""
    counts: dict[str, int] = {}
    for h in v.holos.values():
        if h.scheme == "nested4x2":
            m = h.meta
            key = (f"g{m['group_size']} {'rotated' if m['rotated'] else 'unrotated'} "
                   f"{'symmetric' if m['symmetric'] else 'asymmetric'}")
            counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} x {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


# -- sections ------------------------------------------------------------------------------------

def _sentences(count: int) -> list[str]:
    """The first ``count`` distinct sentences of the licence texts (the calibration text)."""
    licences = ["GPL-3", "Apache-2.0", "GPL-2", "LGPL-3", "MPL-2.0", "Artistic", "CC0-1.0"]
    texts = [models.reference_text(Path("/usr/share/common-licenses") / name) for name in licences
             if (Path("/usr/share/common-licenses") / name).is_file()]
    return distinct_sentences(re.sub(r"\s+", " ", " ".join(texts)), count)


def _embedding_score(model, tokenizer, sentences):
    """``score() -> (mean cosine, min cosine, NN agreement)`` of the model now against itself now."""
    batch = tokenizer(sentences, return_tensors="pt", padding=True, truncation=True, max_length=128)

    def embed():
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def neighbours(emb):
        sim = emb @ emb.t()
        sim.fill_diagonal_(-2)
        return sim.argmax(1)

    reference = embed()
    reference_nn = neighbours(reference)

    def score():
        emb = embed()
        cos = (emb * reference).sum(-1)
        return cos.mean().item(), cos.min().item(), (neighbours(emb) == reference_nn).float().mean().item()

    return score


@torch.no_grad()
def bench_minilm(count: int, data_free_only: bool = False) -> tuple[list[dict], str]:
    model, tokenizer = models.load_minilm()
    sentences = evaluation_sentences(count)
    licences = _sentences(_CALIBRATION_SENTENCES)
    # One sentence per forward: a padded batch would add its pad positions' rows, which no text has.
    calib_inputs = [tokenizer(s, return_tensors="pt", truncation=True, max_length=128) for s in licences]
    variants = {"data-free": _Variants(model)}
    if not data_free_only:
        variants["self-calibrated"] = _Variants(model, self_calibration_run(model, "transformers", progress=False))
        variants["calibrated on licences"] = _Variants(model, lambda: [model(**x) for x in calib_inputs], max_rows=4096)
    score = _embedding_score(model, tokenizer, sentences)
    others = {name: _embedding_score(model, tokenizer, text) for name, text in other_evaluation_sentences(count).items()}
    first = variants["data-free"]
    rows = []
    for name, weights, nbytes in _configs(variants, [(4, 64), (4, 128), (8, 64), (8, 128)], budget_bpw=(4.5, 8.5)):
        first.load(weights)
        mean, low, agree = score()
        row = {"method": name, "bpw": first.bpw(nbytes), "bytes": nbytes,
               "mean_cosine": mean, "min_cosine": low, "nn_agreement": agree}
        if "planned" in name or name.startswith("hqq"):
            row["other_texts"] = {text: dict(zip(("mean_cosine", "min_cosine", "nn_agreement"), other()))
                                  for text, other in others.items()}
        rows.append(row)
    first.load(first.originals)
    table = "| method | bits/weight | mean cosine | min cosine | NN agreement |\n|---|---:|---:|---:|---:|\n"
    table += "\n".join(f"| {r['method']} | {r['bpw']:.3f} | {r['mean_cosine']:.5f} | {r['min_cosine']:.4f} | "
                       f"{100 * r['nn_agreement']:.1f} % |" for r in rows)
    if others:
        table += ("\n\nThe planned and HQQ rows on other texts (`_common.OTHER_EVALUATION_TEXTS`, "
                  + ", ".join(f"{name}: {len(text)} sentences" for name, text in other_evaluation_sentences(count).items())
                  + "), mean cosine / NN agreement:\n\n| method | bits/weight | " + " | ".join(others)
                  + " |\n|---|---:|" + "---:|" * len(others) + "\n")
        table += "\n".join(f"| {r['method']} | {r['bpw']:.3f} | " + " | ".join(
            f"{v['mean_cosine']:.5f} / {100 * v['nn_agreement']:.1f} %" for v in r["other_texts"].values()) + " |"
            for r in rows if "other_texts" in r)
    head = (f"all-MiniLM-L6-v2: {len(sentences)} sentences of Python standard-library docstrings, "
            f"{first.numel:,} parameters; calibrated on licences = 4096 token rows sampled uniformly from {len(licences)} licence sentences (one per forward, no padding). "
            f"{_encode_note(variants)} Grids chosen (data-free): {_grid_choices(first)}")
    return rows, head + "\n\n" + table


@torch.no_grad()
def bench_smollm2(max_tokens: int, data_free_only: bool = False) -> tuple[list[dict], str]:
    model, tokenizer = models.load_smollm2()
    text = evaluation_text()
    variants = {"data-free": _Variants(model)}
    if not data_free_only:
        variants["self-calibrated"] = _Variants(model, self_calibration_run(model, "transformers", progress=False))
    first = variants["data-free"]
    ids = tokenizer(text[:2000], return_tensors="pt").input_ids[:, :256]
    reference_logits = model(ids).logits
    eval_ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
    reference_logp = torch.log_softmax(model(eval_ids).logits.float(), dim=-1)
    rows = []
    for name, weights, nbytes in _configs(variants, [(4, 32), (4, 64), (8, 32)], budget_bpw=(5.0, 8.5)):
        first.load(weights)
        ppl = models.perplexity(model, tokenizer, text, max_tokens=max_tokens)
        logp = torch.log_softmax(model(eval_ids).logits.float(), dim=-1)
        kl = (reference_logp.exp() * (reference_logp - logp)).sum(-1).mean().item()
        row = {"method": name, "bpw": first.bpw(nbytes), "bytes": nbytes, "perplexity": ppl, "kl": kl}
        if name == "holo exact (top)":
            row["identical_logits"] = bool(torch.equal(model(ids).logits, reference_logits))
        rows.append(row)
    first.load(first.originals)
    ref = rows[0]["perplexity"]
    table = ("| method | bits/weight | perplexity | vs reference | KL to reference (nats/token) |\n"
             "|---|---:|---:|---:|---:|\n")
    table += "\n".join(f"| {r['method']} | {r['bpw']:.3f} | {r['perplexity']:.4f} | "
                       f"{100 * (r['perplexity'] / ref - 1):+.2f} % | {r['kl']:.5f} |" for r in rows)
    exact = next(r for r in rows if r["method"] == "holo exact (top)")
    head = (f"SmolLM2-135M-Instruct: perplexity on the first {max_tokens} tokens of Python standard-library "
            f"docstrings, {first.numel:,} parameters (tied embedding/head counted once). {_encode_note(variants)} "
            f"Top level gives identical logits: {exact['identical_logits']}. Reference weights are dequantised "
            "Q4_1 (4-bit grid, blocks of 32 along the input): RTN 4-bit g32 (and HQQ g32) land back near that "
            "grid, so their figures are not a fair codec comparison; the encoder's per-tensor grid choice finds "
            f"the same grid by measurement. Grids chosen (data-free): {_grid_choices(first)}. KL = mean over the "
            f"{max_tokens} evaluation tokens of KL(reference || method) of the next-token distributions (one "
            "forward over them): a fidelity measure without perplexity's sign (noise can lower a perplexity "
            "by chance).")
    return rows, head + "\n\n" + table


@torch.no_grad()
def bench_ddpm(steps: int, rotation_seeds: int) -> tuple[list[dict], str]:
    try:
        pipe = models.load_digits_ddpm()
    except Exception as exc:  # the weights are committed by another issue; say why it is missing
        return [], f"Digits DDPM: not run ({type(exc).__name__}: {exc})."
    variants = {"data-free": _Variants(pipe.unet),
                "self-calibrated": _Variants(pipe.unet, self_calibration_run(pipe, "diffusers", progress=False),
                                             sensitivity=False)}
    first = variants["data-free"]

    def sample():
        generator = torch.Generator().manual_seed(0)
        return pipe(batch_size=16, generator=generator, num_inference_steps=steps, output_type="np").images

    reference = sample()
    rows = []
    for name, weights, nbytes in _configs(variants, [(4, 64), (4, 32)]):
        if name == "fp reference":
            continue
        first.load(weights)
        rows.append({"method": name, "bpw": first.bpw(nbytes), "psnr_db": models.psnr(sample(), reference)})
    table = "| method | bits/weight | PSNR vs full quality (dB) |\n|---|---:|---:|\n"
    table += "\n".join(f"| {r['method']} | {r['bpw']:.3f} | {r['psnr_db']:.2f} |" for r in rows)
    # The DDPM's PSNR moves by a few dB with the rotation's random signs alone (the sampler
    # amplifies which weights happen to round which way), so a single seed cannot rank codecs.
    calibration_run = self_calibration_run(pipe, "diffusers", progress=False)
    per_seed = {label: [] for label in variants}
    for seed in range(rotation_seeds):
        for label, run in (("data-free", None), ("self-calibrated", calibration_run)):
            first.load(first.originals)  # encode (and self-calibrate) the full-quality weights
            encoded = _Variants(pipe.unet, run, seed=seed, sensitivity=False)
            psnrs = []
            for level in (1, 2):
                first.load(encoded.holo_plan(encoded.uniform(level))[0])
                psnrs.append(models.psnr(sample(), reference))
            per_seed[label].append(psnrs)
    first.load(first.originals)
    seeds_table = ("| method | " + " | ".join(f"seed {i}" for i in range(rotation_seeds))
                   + " | mean |\n|---|" + "---:|" * (rotation_seeds + 1) + "\n")
    for label, runs in per_seed.items():
        for index, level_label in enumerate(("int4 (all)", "int8 (all)")):
            values = [run[index] for run in runs]
            seeds_table += (f"| holo {label}, {level_label} | " + " | ".join(f"{v:.2f}" for v in values)
                            + f" | {sum(values) / len(values):.2f} |\n")
            rows.append({"method": f"holo {label}, {level_label}, rotation seeds", "psnr_db_per_seed": values,
                         "psnr_db_mean": sum(values) / len(values)})
    return rows, (f"Digits DDPM ({steps} steps, 16 images, seed 0; int4 (all) is its lowest level, "
                  f"min_quality). {_encode_note(variants)}\n\n" + table
                  + f"\n\nPSNR (dB) of the holo encodings over rotation seeds 0..{rotation_seeds - 1} "
                  "(the encoder's `seed`: the rotation's random signs; the table above is seed 0; RTN and "
                  "HQQ do not rotate, so they have one figure):\n\n" + seeds_table)


def bench_throughput() -> tuple[list[dict], str]:
    model, _ = models.load_smollm2()
    params = {n: p.detach() for n, p in _params(model).items() if _encodable(p)}
    total = sum(p.numel() * p.element_size() for p in params.values())
    start = time.perf_counter()
    holos = {n: HoloTensor.encode(p) for n, p in params.items()}
    encode_s = time.perf_counter() - start
    rows = [{"what": "encode", "MB_per_s": total / encode_s / 1e6, "seconds": encode_s}]
    out_bytes = total  # every decode produces the original dtype and shape
    copy_src = {n: p.clone() for n, p in params.items()}
    start = time.perf_counter()
    for p in copy_src.values():
        p.clone()
    copy_s = time.perf_counter() - start
    rows.append({"what": "memcpy of the same output bytes (clone)", "MB_per_s": out_bytes / copy_s / 1e6,
                 "seconds": copy_s})
    for level, label in ((1, "decode int4"), (2, "decode int8"), (3, "decode exact")):
        start = time.perf_counter()
        for h in holos.values():
            h.decode(min(level, h.num_levels))
        seconds = time.perf_counter() - start
        rows.append({"what": label, "MB_per_s": out_bytes / seconds / 1e6, "seconds": seconds,
                     "vs_memcpy": copy_s / seconds})
    table = "| operation | MB/s (original bytes) | seconds | speed vs memcpy |\n|---|---:|---:|---:|\n"
    table += "\n".join(f"| {r['what']} | {r['MB_per_s']:.0f} | {r['seconds']:.2f} | "
                       f"{r.get('vs_memcpy', float('nan')):.3f} |" for r in rows)
    return rows, (f"Throughput over SmolLM2-135M's {len(params)} encoded weights ({total / 1e6:.0f} MB fp32); "
                  "decode = fragments to a dense tensor in the original dtype on the CPU:\n\n" + table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="minilm,smollm2,ddpm,throughput")
    parser.add_argument("--sentences", type=int, default=300)
    parser.add_argument("--ppl-tokens", type=int, default=1024)
    parser.add_argument("--ddpm-steps", type=int, default=25)
    parser.add_argument("--ddpm-rotation-seeds", type=int, default=8,
                        help="rotation seeds the DDPM's holo levels are also measured over (mean)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--data-free-only", action="store_true",
                        help="skip the calibrated encodings of MiniLM and SmolLM2 (SmolLM2's self-calibration "
                             "alone takes ~13 min on 2 CPU cores): a quick loop while tuning the codec")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sections, data = [], {}
    wanted = args.only.split(",")
    runners = {"minilm": lambda: bench_minilm(args.sentences, args.data_free_only),
               "smollm2": lambda: bench_smollm2(args.ppl_tokens, args.data_free_only),
               "ddpm": lambda: bench_ddpm(args.ddpm_steps, args.ddpm_rotation_seeds), "throughput": bench_throughput}
    for name in wanted:
        start = time.perf_counter()
        rows, text = runners[name]()
        data[name] = rows
        sections.append(f"## {name}\n\n{text}\n\n({time.perf_counter() - start:.0f} s)")
        print(sections[-1], flush=True)
    suffix = ("" if len(wanted) == 4 else "_" + "_".join(wanted)) + ("_data_free" if args.data_free_only else "")
    path = write_results(f"codec{suffix}", "HoloTensor codec vs round-to-nearest and the seed's DCT",
                         "\n\n".join(sections), data)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
