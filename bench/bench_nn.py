"""Forward speed of HoloLinear / HoloConv2d at every level against the original module.

Shapes are SmolLM2-135M's (hidden 576, MLP 1536, tied head/embedding 49152) plus a
diffusion-UNet-like conv.
Each case times the original module and the Holo module at every level in the same run, on the
same inputs, interleaved (original, level 1, level 2, level 3, repeat) so that load from other
processes hits all of them alike; the table gives medians and the ratio to the original.
Targets (CPU): top level <= 1.05x, every level <= 2x.

Run: ``python bench/bench_nn.py [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

from torch_arbiter.nn import HoloConv2d, HoloEmbedding, HoloLinear, cpu_kernels_available  # noqa: E402
from torch_arbiter.nn.modules import _DENSE_ROWS  # noqa: E402


def _interleaved(fns: dict, rounds: int, inner: int) -> dict[str, float]:
    samples = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - t0) / inner)
    return {name: statistics.median(s) for name, s in samples.items()}


def _at_level(holo, k):
    """A module of the same class sharing ``holo``'s HoloTensor, held at level ``k``."""
    if isinstance(holo, HoloConv2d):
        return HoloConv2d(holo.holo, holo.bias, holo.conv_options, level=k)
    if isinstance(holo, HoloEmbedding):
        return HoloEmbedding(holo.holo, holo.embedding_options, level=k)
    return HoloLinear(holo.holo, holo.bias, level=k)


def _case(label, original, holo, x, rounds, inner):
    modules = {k: _at_level(holo, k) for k in range(1, holo.num_levels + 1)}
    timed = {"original": lambda: original(x)}
    timed.update({k: (lambda m=m: m(x)) for k, m in modules.items()})
    medians = _interleaved(timed, rounds, inner)
    base = medians["original"]
    rows = []
    for k, value in medians.items():
        if k == "original":
            level, resident = "original", original.weight.nbytes
        else:
            level, resident = holo.holo.level_fidelity(k)["label"], modules[k].resident_bytes
        rows.append({"case": label, "level": level, "median_us": value * 1e6, "ratio": value / base,
                     "resident_bytes": resident})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared, oversubscribed machine multi-thread "
                             "timings stall on preempted workers)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rounds = 5 if args.quick else 25
    rows = []
    with torch.no_grad():
        for in_f, out_f in ((576, 576), (576, 1536), (1536, 576), (576, 49152)):
            linear = nn.Linear(in_f, out_f, bias=False)
            holo = HoloLinear.from_linear(linear, rank=0)
            small = out_f < 49152
            for batch, inner in ((1, 50 if small else 5), (8, 20 if small else 2), (16, 10 if small else 1),
                                 (128, 3 if small else 1), (512, 1)):
                x = torch.randn(batch, in_f)
                rows += _case(f"linear {in_f}->{out_f}, {batch} row{'s' if batch > 1 else ''}",
                              linear, holo, x, rounds, inner)
        embedding = nn.Embedding(49152, 576)
        holo = HoloEmbedding.from_embedding(embedding, rank=0)
        for tokens in (1, 128):
            ids = torch.randint(0, 49152, (1, tokens))
            rows += _case(f"embedding 49152x576, {tokens} token{'s' if tokens > 1 else ''}",
                          embedding, holo, ids, rounds, 20)
        for batch, size in ((1, 16), (8, 32)):
            conv = nn.Conv2d(64, 128, 3, padding=1)
            holo = HoloConv2d.from_conv(conv, rank=0)
            x = torch.randn(batch, 64, size, size)
            rows += _case(f"conv 64->128 3x3, {batch}x{size}x{size}", conv, holo, x, rounds, 10)
    header = "| case | level | median µs | × original | resident bytes |\n|---|---|---:|---:|---:|\n"
    table = header + "\n".join(
        f"| {r['case']} | {r['level']} | {r['median_us']:.1f} | {r['ratio']:.2f} | {r['resident_bytes']:,} |"
        for r in rows)
    worst_top = max(r["ratio"] for r in rows if r["level"] == "exact")
    worst_any = max(r["ratio"] for r in rows if r["level"] != "original")
    notes = (f"CPU kernels (holo_kernels.c): {'used' if cpu_kernels_available() else 'NOT available, torch decode path'}; "
             f"quantised levels of HoloLinear run the fused kernel below {_DENSE_ROWS} input rows and decode "
             "fp32 weight chunks for torch's matmul from there on.\n\n"
             f"Worst top-level ratio: {worst_top:.2f} (target <= 1.05); worst ratio at any level: "
             f"{worst_any:.2f} (target <= 2). Medians of interleaved rounds on a shared 2-core machine: "
             "ratios are more trustworthy than absolute times.")
    path = write_results("nn_forward", "Holo modules: forward time per level vs the original module",
                         table, {"rows": rows, "cpu_kernels": cpu_kernels_available(), "dense_rows": _DENSE_ROWS}, notes)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
