"""A CPU process's memory follows quality: RSS of ``patch()`` of SmolLM2 (bf16) with and without a
HOST budget, against the dense model loaded in the same kind of process.

    .venv/bin/python bench/bench_host_memory.py

Each case runs in a fresh subprocess: load SmolLM2-135M-Instruct in bf16 (the baseline: its RSS
over the bare process), then ``patch()`` it with no calibration on an arbiter whose cache has
``host_capacity_bytes`` = unbounded or 0 (fragments past the budget spill to a temporary
directory), and read ``VmRSS`` at quality 1.0, at the floor and back at 1.0. ``after load`` is
the process with the dense model; every other figure is relative to it (negative: the patched
model holds less than the dense one did).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write_results  # noqa: E402

_CHILD = r"""
import gc, json, sys, torch
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
import torch_arbiter as ta
from torch_arbiter.demo import models
bare = rss()
model, tokenizer = models.load_smollm2(torch.bfloat16)
gc.collect(); ta.memory.trim_host_heap()
loaded = rss()
budget = json.loads(sys.argv[1])
arbiter = ta.Arbiter(ta.ArbiterConfig(vram_bytes=4 << 30, status_interval_s=None,
                                      cache=ta.CacheConfig(host_capacity_bytes=budget)))
managed = ta.patch(model, arbiter, calibration=False, progress=False)
ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
def answer():
    with torch.no_grad():
        return tokenizer.decode(model.generate(ids, max_new_tokens=4, do_sample=False)[0][ids.shape[1]:])
out = {"dense_bytes": managed.full_bytes, "load": loaded - bare, "full": rss() - loaded, "answer_full": answer()}
managed.set_quality(managed.min_quality, wait=True)
out.update(floor=rss() - loaded, floor_quality=managed.quality, floor_resident=managed.resident_bytes,
           answer_floor=answer(), cache={t.name: b for t, b in arbiter.cache.stats().resident_bytes.items()})
managed.set_quality(1.0, wait=True)
out.update(back=rss() - loaded)
print("RESULT " + json.dumps(out))
"""


def _run(budget: int | None) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(budget)], capture_output=True, text=True,
                          timeout=900, check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    cases = {"unbounded HOST (default)": None, "host_capacity_bytes=0": 0}
    results = {label: _run(budget) for label, budget in cases.items()}
    mib = 1 << 20
    rows = ["| HOST budget | dense model loaded | patched at 1.0 | at the floor (q) | back at 1.0 | cache at the floor (DEVICE / HOST / DISK) | answer at the floor |",
            "|---|---:|---:|---:|---:|---|---|"]
    for label, r in results.items():
        cache = r["cache"]
        rows.append(f"| {label} | {r['load'] / mib:+.0f} MiB | {r['full'] / mib:+.0f} MiB | "
                    f"{r['floor'] / mib:+.0f} MiB ({r['floor_quality']:.2f}) | {r['back'] / mib:+.0f} MiB | "
                    f"{cache['DEVICE'] / mib:.0f} / {cache['HOST'] / mib:.0f} / {cache['DISK'] / mib:.0f} MiB | "
                    f"{r['answer_floor'].strip()!r} |")
    dense = next(iter(results.values()))["dense_bytes"]
    notes = (f"SmolLM2-135M-Instruct in bf16: {dense / mib:.0f} MiB of weights. 'dense model loaded' is over the "
             "bare process; the other columns are over the process with the dense model loaded, so a negative "
             "figure means the patched model holds less RAM than the dense one. The floor holds "
             f"{next(iter(results.values()))['floor_resident'] / mib:.0f} MiB resident. glibc keeps freed blocks "
             "in its heap; torch_arbiter trims it (malloc_trim) after a model lowers on a CPU arbiter.")
    path = write_results("host_memory", "Process memory follows quality (CPU)", "\n".join(rows), results, notes)
    print(path.read_text())


if __name__ == "__main__":
    main()
