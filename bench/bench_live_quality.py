"""What quality costs and buys on the real models, through patch(): perplexity, PSNR, bytes.

- SmolLM2-135M-Instruct, patched twice: from its cached holo conversion (``torch-arbiter convert``,
  round-to-nearest), and by encoding with ``patch(calibration=...)`` on 1024 tokens of another
  licence text (GPTQ-rounded). At each quality the resident
  weight bytes (measured from the tensors held), bits per weight (resident bytes x 8 / parameters,
  embedding and head included), perplexity on the GPL-3 text against the unpatched model in the
  same run, greedy-token agreement with the unpatched model, and how long ``set_quality`` took.
  Beware: the reference weights are dequantised Q4_1 (linear layers: 4-bit, asymmetric blocks of
  32 along the input dimension; tied embedding/head: Q8_0). The tied embedding/head is one Holo
  weight; norms stay exact, which with every weight at int4 sets the floor ``min_quality``.
- The digits DDPM (patched by encoding): PSNR of the images at each quality against the unpatched
  pipeline with the same seed, and the resident bytes.

Run: ``python bench/bench_live_quality.py [--quick] [--only smollm2|ddpm]`` (``--only`` writes
``results/live_quality_<model>``, leaving the two-model results file alone).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import calibration_ids, write_results  # noqa: E402

from torch_arbiter.demo import models  # noqa: E402
from torch_arbiter.hooks import patch  # noqa: E402

_QUALITIES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
_PROMPT = "The capital of France is"


def _greedy(model, tokenizer, new_tokens: int) -> torch.Tensor:
    batch = tokenizer(_PROMPT, return_tensors="pt")
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)[0, batch.input_ids.shape[1]:]


def _smollm2(args, calibrated: bool) -> tuple[list[dict], dict]:
    model, tokenizer = models.load_smollm2()
    text = models.reference_text()

    def ppl():
        return models.perplexity(model, tokenizer, text, max_tokens=args.ppl_tokens, window=args.window,
                                 stride=args.stride)

    parameters = sum(p.numel() for p in model.parameters())
    reference_ppl, reference_tokens = ppl(), _greedy(model, tokenizer, args.new_tokens)
    if calibrated:
        managed = patch(model, register=False, progress=False, calibration=calibration_ids(tokenizer))
    else:
        managed = patch(model, register=False, holo_dir=models.smollm2_holo_dir(), progress=False)
    rows = []
    for q in (*_QUALITIES, managed.min_quality):
        started = time.perf_counter()
        managed.set_quality(q)
        switch_s = time.perf_counter() - started
        tokens = _greedy(model, tokenizer, args.new_tokens)
        agreement = float((tokens[: len(reference_tokens)] == reference_tokens[: len(tokens)]).float().mean())
        rows.append({"quality": q, "applied": managed.quality, "resident_bytes": managed.resident_bytes,
                     "planned_bytes": managed.bytes_at(q), "bits_per_weight": managed.resident_bytes * 8 / parameters,
                     "perplexity": ppl(), "token_agreement": agreement, "set_quality_s": switch_s})
    managed.unpatch()
    return rows, {"reference_perplexity": reference_ppl, "parameters": parameters,
                  "full_bytes": managed.full_bytes, "min_quality": managed.min_quality,
                  "holo_layers": len(managed.levels)}


def _ddpm(args) -> tuple[list[dict], dict]:
    pipeline = models.load_digits_ddpm()

    def sample():
        generator = torch.Generator().manual_seed(0)
        return pipeline(batch_size=args.images, generator=generator, num_inference_steps=args.steps,
                        output_type="np").images

    reference = sample()
    parameters = sum(p.numel() for p in pipeline.unet.parameters())
    managed = patch(pipeline, register=False, progress=False)
    rows = []
    for q in (*_QUALITIES, managed.min_quality):
        managed.set_quality(q)
        rows.append({"quality": q, "applied": managed.quality, "resident_bytes": managed.resident_bytes,
                     "planned_bytes": managed.bytes_at(q), "bits_per_weight": managed.resident_bytes * 8 / parameters,
                     "psnr_db": models.psnr(sample(), reference)})
    managed.unpatch()
    return rows, {"parameters": parameters, "full_bytes": managed.full_bytes,
                  "min_quality": managed.min_quality, "holo_layers": len(managed.levels)}


def main(argv: list[str] | None = None) -> None:
    """Measure both models and write bench/results/live_quality.{md,json}."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and images")
    parser.add_argument("--only", choices=("smollm2", "ddpm"), help="measure one model")
    args = parser.parse_args(argv)
    args.ppl_tokens, args.window, args.stride = (256, 256, 256) if args.quick else (1024, 512, 256)
    args.new_tokens = 8 if args.quick else 24
    args.images, args.steps = (4, 10) if args.quick else (16, 25)

    smol_runs = {label: _smollm2(args, calibrated) for label, calibrated in
                 (("converted, round-to-nearest", False), ("patch(calibration=...), GPTQ", True))
                 if args.only in (None, "smollm2")}
    ddpm_rows, ddpm = _ddpm(args) if args.only in (None, "ddpm") else ([], None)
    table = []
    for label, (smol_rows, smol) in smol_runs.items():
        table += [f"## SmolLM2-135M-Instruct, {label}", "",
                  f"{smol['holo_layers']} Holo layers, {smol['parameters']} parameters, full {smol['full_bytes']} "
                  f"bytes; reference perplexity {smol['reference_perplexity']:.3f} ({args.ppl_tokens} tokens of GPL-3, "
                  f"window {args.window}, stride {args.stride}).", "",
                  "| quality | applied | resident bytes | = bytes_at | bits/weight | perplexity | vs reference "
                  f"| greedy agreement ({args.new_tokens} tok) | set_quality s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in smol_rows:
            table.append(f"| {r['quality']:.3f} | {r['applied']:.3f} | {r['resident_bytes']} | "
                         f"{'yes' if r['resident_bytes'] == r['planned_bytes'] else 'NO'} | "
                         f"{r['bits_per_weight']:.2f} | {r['perplexity']:.3f} | "
                         f"{r['perplexity'] / smol['reference_perplexity'] - 1:+.2%} | "
                         f"{r['token_agreement']:.0%} | {r['set_quality_s']:.2f} |")
        table.append("")
    if ddpm is not None:
        table += ["## Digits DDPM", "",
                  f"{ddpm['holo_layers']} Holo layers, {ddpm['parameters']} parameters, full {ddpm['full_bytes']} "
                  f"bytes; patched with `patch(pipeline)` (self-calibrated on its own denoising loop); PSNR of "
                  f"{args.images} images ({args.steps} steps, seed 0) against the unpatched pipeline.", "",
                  "| quality | applied | resident bytes | = bytes_at | bits/weight | PSNR dB |", "|---|---|---|---|---|---|"]
    for r in ddpm_rows:
        psnr = "inf (identical)" if math.isinf(r["psnr_db"]) else f"{r['psnr_db']:.2f}"
        table.append(f"| {r['quality']:.3f} | {r['applied']:.3f} | {r['resident_bytes']} | "
                     f"{'yes' if r['resident_bytes'] == r['planned_bytes'] else 'NO'} | {r['bits_per_weight']:.2f} | {psnr} |")
    notes = "Quality below min_quality applies min_quality (every Holo layer at its lowest level)."
    if smol_runs:
        notes += (" The SmolLM2 reference is already on a 4-bit grid (dequantised Q4_1), so the int4 level of the "
                  "codec looks better there than it would on fp16 weights.")
    path = write_results("live_quality" + (f"_{args.only}" if args.only else ""), "Live quality through patch(): perplexity, PSNR, resident bytes",
                         "\n".join(table), {**{f"smollm2 {label}": {**smol, "rows": rows}
                                               for label, (rows, smol) in smol_runs.items()},
                                            **({"digits_ddpm": {**ddpm, "rows": ddpm_rows}} if ddpm else {})}, notes)
    print(path.read_text())


if __name__ == "__main__":
    main()
