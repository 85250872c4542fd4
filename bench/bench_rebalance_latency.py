"""Rebalance latency on the demo's two real models: from a change in external bytes to every model
running at its new level.

SmolLM2-135M-Instruct (patched from its holo conversion) and the digits DDPM pipeline (patched by
encoding) share one virtual device sized to hold both at full quality. Each round, another process
"takes" or gives back memory (``tracker.set_external_bytes`` then ``arbiter.rebalance()``, what the
memory monitor does), alternating so every round moves both models (down, then up). Timed: from
the change to ``arbiter.wait_until_settled()`` (every model committed its new level; a raise is
committed before the fragments are taken, so it also waits for the others' lowerings):

- **idle**: no forward runs; the arbiter's applier thread moves both models.
- **busy**: one thread runs SmolLM2 forwards (8 tokens, no cache) and another the DDPM UNet
  (batch 4) back to back; each model moves at its next safe point, in its own forward thread.
  There the time a forward waits at its safe point is the time its own thread spends applying the
  new level (timed around the model's switch, with the thread that made it); the way through the
  safe point of every forward (a pre-hook on the top module registered before ``patch()`` to one
  on its first layer: the check, the workload scope) is reported too.

Baseline in the same run: the bare ``arbiter.rebalance()`` call (the arbiter's planning, no model
moving), so the ratio shows what the moves themselves cost.

Run: ``python bench/bench_rebalance_latency.py [--rounds N]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

from torch_arbiter import Arbiter, ArbiterConfig, Priority, WorkloadType  # noqa: E402
from torch_arbiter.demo import models  # noqa: E402
from torch_arbiter.hooks import patch  # noqa: E402

_RESERVE = 8 << 20


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]


def _summary(values: list[float]) -> dict:
    return {"n": len(values), "median_ms": statistics.median(values) * 1e3, "p99_ms": _percentile(values, 99) * 1e3,
            "max_ms": max(values) * 1e3}


class _SafePointTimer:
    """Times a top module's way through its safe point on every forward: from a pre-hook
    registered before ``patch()`` (it runs first) to a pre-hook on its first layer."""

    def __init__(self, module: torch.nn.Module):
        self.started: dict[int, float] = {}
        self.waits: list[float] = []
        module.register_forward_pre_hook(self._before)

    def _before(self, _module, _args):
        self.started[threading.get_ident()] = time.perf_counter()

    def after_patch(self, first_layer: torch.nn.Module) -> None:
        first_layer.register_forward_pre_hook(self._after)

    def _after(self, _module, _args):
        started = self.started.pop(threading.get_ident(), None)
        if started is not None:
            self.waits.append(time.perf_counter() - started)


class _ApplyTimer:
    """Times every level switch of a model and notes the thread that made it (a forward thread
    holds its forward at the safe point for that long)."""

    def __init__(self, managed):
        self.moves: list[tuple[str, float]] = []
        apply = managed._apply

        def timed(requested):
            started = time.perf_counter()
            try:
                return apply(requested)
            finally:
                self.moves.append((threading.current_thread().name, time.perf_counter() - started))

        managed._apply = timed

    def durations(self, thread_name: str) -> list[float]:
        return [d for name, d in self.moves if name == thread_name] or [0.0]


def _rounds(arbiter: Arbiter, managed: list, externals: tuple[int, int], rounds: int) -> list[float]:
    latencies = []
    for i in range(rounds):
        before = [m.quality for m in managed]
        started = time.perf_counter()
        arbiter.tracker.set_external_bytes(externals[i % 2])
        arbiter.rebalance()
        if not arbiter.wait_until_settled(60):
            raise RuntimeError("the models did not settle within 60 s")
        latencies.append(time.perf_counter() - started)
        if [m.quality for m in managed] == before:
            raise RuntimeError("a round moved no model: pick other external sizes")
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)

    llm, tokenizer = models.load_smollm2()
    pipe = models.load_digits_ddpm()
    llm_timer, unet_timer = _SafePointTimer(llm), _SafePointTimer(pipe.unet)
    llm_full = sum(p.numel() * p.element_size() for p in llm.parameters())
    ddpm_full = sum(p.numel() * p.element_size() for c in pipe.components.values()
                    if isinstance(c, torch.nn.Module) for p in c.parameters())
    capacity = llm_full + ddpm_full + 2 * _RESERVE + (1 << 20)
    arbiter = Arbiter(ArbiterConfig(vram_bytes=capacity))
    chat = patch(llm, arbiter, workload=WorkloadType.LLM_INFERENCE, priority=Priority.HIGH, name="smollm2",
                 holo_dir=models.smollm2_holo_dir(), activation_bytes=_RESERVE, progress=False)
    image = patch(pipe, arbiter, workload=WorkloadType.IMAGE_GENERATION, priority=Priority.NORMAL, name="ddpm",
                  activation_bytes=_RESERVE, progress=False)
    llm_timer.after_patch(llm.model.embed_tokens)
    unet_timer.after_patch(pipe.unet.conv_in)
    chat_moves, image_moves = _ApplyTimer(chat), _ApplyTimer(image)
    # Squeezed: room for SmolLM2 at its floor and the DDPM half-way between its floor and full
    # quality (each model's granted bytes are its curve's steps, so only then do both move).
    floors = chat.curve[0][1] + image.curve[0][1] + 2 * _RESERVE
    squeeze = arbiter.state().capacity_bytes - floors - (image.full_bytes - image.curve[0][1]) // 2
    externals = (squeeze, 0)
    managed = [chat, image]

    baseline = []
    for i in range(args.rounds):
        arbiter.tracker.set_external_bytes(externals[i % 2])
        started = time.perf_counter()
        arbiter.rebalance()
        baseline.append(time.perf_counter() - started)
        arbiter.wait_until_settled(60)
    idle = _rounds(arbiter, managed, externals, args.rounds)
    qualities = {"squeezed": None, "full": None}

    stop = threading.Event()
    ids = tokenizer("The capital of France is a city", return_tensors="pt").input_ids[:, :8]
    sample = torch.randn(4, 1, 16, 16)
    timestep = torch.tensor([10])

    durations: dict[str, list[float]] = {"llm": [], "unet": []}

    def run_llm():
        with torch.no_grad():
            while not stop.is_set():
                started = time.perf_counter()
                llm(input_ids=ids, use_cache=False)
                durations["llm"].append(time.perf_counter() - started)

    def run_unet():
        with torch.no_grad():
            while not stop.is_set():
                started = time.perf_counter()
                pipe.unet(sample, timestep)
                durations["unet"].append(time.perf_counter() - started)

    llm_timer.waits.clear()
    unet_timer.waits.clear()
    threads = [threading.Thread(target=run_llm, name="llm-forward"), threading.Thread(target=run_unet, name="unet-forward")]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    try:
        busy = _rounds(arbiter, managed, externals, args.rounds)
        arbiter.tracker.set_external_bytes(externals[0])
        arbiter.rebalance()
        arbiter.wait_until_settled(60)
        qualities["squeezed"] = {"smollm2": chat.quality, "ddpm": image.quality}
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    arbiter.tracker.set_external_bytes(0)
    arbiter.rebalance()
    arbiter.wait_until_settled(60)
    qualities["full"] = {"smollm2": chat.quality, "ddpm": image.quality}

    data = {
        "capacity_bytes": capacity, "smollm2_full_bytes": chat.full_bytes, "ddpm_full_bytes": image.full_bytes,
        "external_bytes": list(externals), "qualities": qualities, "rounds": args.rounds,
        "rebalance_call_only": _summary(baseline), "idle_change_to_new_level": _summary(idle),
        "busy_change_to_new_level": _summary(busy),
        "switch_in_forward_thread": {"smollm2": _summary(chat_moves.durations("llm-forward")),
                                     "ddpm": _summary(image_moves.durations("unet-forward"))},
        "switch_in_applier_thread": {"smollm2": _summary(chat_moves.durations("torch_arbiter-applier")),
                                     "ddpm": _summary(image_moves.durations("torch_arbiter-applier"))},
        "busy_safe_point_every_forward": {"smollm2": _summary(llm_timer.waits), "ddpm_unet": _summary(unet_timer.waits)},
        "busy_forward_duration": {"smollm2": _summary(durations["llm"]), "ddpm_unet": _summary(durations["unet"])},
    }
    rows = [
        ("`arbiter.rebalance()` alone (baseline)", data["rebalance_call_only"]),
        ("idle models: change -> both at new level", data["idle_change_to_new_level"]),
        ("busy models: change -> both at new level", data["busy_change_to_new_level"]),
        ("SmolLM2 switch made by its forward thread (the forward waits this long at its safe point)",
         data["switch_in_forward_thread"]["smollm2"]),
        ("DDPM switch made by its UNet forward thread", data["switch_in_forward_thread"]["ddpm"]),
        ("SmolLM2 switch made by the applier thread (idle model)", data["switch_in_applier_thread"]["smollm2"]),
        ("DDPM switch made by the applier thread (idle model)", data["switch_in_applier_thread"]["ddpm"]),
        ("busy: SmolLM2 safe point, every forward (top pre-hook to first layer)", data["busy_safe_point_every_forward"]["smollm2"]),
        ("busy: DDPM UNet safe point, every call", data["busy_safe_point_every_forward"]["ddpm_unet"]),
        ("busy: one SmolLM2 forward (8 tokens), for scale", data["busy_forward_duration"]["smollm2"]),
        ("busy: one DDPM UNet call (batch 4), for scale", data["busy_forward_duration"]["ddpm_unet"]),
    ]
    base = data["rebalance_call_only"]["median_ms"]
    table = ("| what | n | median (ms) | p99 (ms) | max (ms) | median / baseline |\n|---|---:|---:|---:|---:|---:|\n"
             + "\n".join(f"| {name} | {s['n']} | {s['median_ms']:.2f} | {s['p99_ms']:.2f} | {s['max_ms']:.2f} | "
                         f"{s['median_ms'] / base:.1f}x |" for name, s in rows))
    notes = (f"Virtual CPU device of {capacity} bytes (SmolLM2 {chat.full_bytes} B + DDPM {image.full_bytes} B at full "
             f"quality + two {_RESERVE}-byte reserves); each round alternates external bytes {externals[0]} and 0, "
             f"moving both models (a busy model moves when its running forward ends: see the forward durations) (squeezed: {qualities['squeezed']}; full: {qualities['full']}). "
             "One torch thread. A round ends when `wait_until_settled()` returns: every model committed its level.")
    path = write_results("rebalance_latency", "Rebalance latency: external change to every model at its new level",
                         table, data, notes)
    chat.unpatch()
    image.unpatch()
    arbiter.close()
    print(path.read_text())


if __name__ == "__main__":
    main()
