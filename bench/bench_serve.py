"""``torch-arbiter serve`` under load against a swap-whole-models baseline, in one run, on one device.

The load, sent by the official ``openai`` client (async) to a real uvicorn on 127.0.0.1: 2 image
requests and, 50 ms later, 8 concurrent streamed chats, all in flight together; repeated for
``--rounds`` rounds. Two servers answer it in turn, on the same virtual device (the size
``torch-arbiter serve`` picks on CPU: SmolLM2 at full quality beside the digits DDPM at its floor,
plus both activation reserves):

- **arbiter**: ``torch-arbiter serve`` itself: both models patched under one arbiter, both
  resident, each at the quality the traffic gives it (the chats at USER_FACING rise to full
  quality, the image model gives way to its floor while they run);
- **swap**: what Ollama or LocalAI do when two models do not fit together: the original models,
  one loaded at a time; a request for the other waits for the device (first come, first served),
  which unloads the loaded model and loads the other from disk (SmolLM2 from its safetensors
  copy, the DDPM from its pipeline dir). Same HTTP app, same worker threads, same decoding.

Reported per server: chat time to first token and streaming tokens/s (p50/p99 over every chat),
image latency, requests lost (failed or incomplete: must be 0), model swaps, and the peak of the
weights resident on the device (sampled every 20 ms: the patched models' measured resident bytes,
or the loaded model's bytes) and of the arbiter's granted bytes, against the device capacity.

Run: ``nice -n 10 python bench/bench_serve.py [--rounds 2] [--tokens 32] [--steps 25]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

from torch_arbiter import models  # noqa: E402
from torch_arbiter.serve import ModelHost, ServeConfig, create_app, serve_in_thread  # noqa: E402
from torch_arbiter.serve.host import DEFAULT_CHAT_ID, DEFAULT_IMAGE_ID, _eos_ids  # noqa: E402
from torch_arbiter.serve.runners import ChatRunner, ImageRunner, pipeline_call_options  # noqa: E402

_CHATS = 8
_IMAGES = 2
_PROMPTS = ["Name three fruits.", "What is the capital of France?", "Write a haiku about rain.",
            "Explain what a GPU is.", "Give me a tip for sleeping well.", "What is 12 times 7?",
            "Describe the sea in one sentence.", "List two primary colors."]


class _SwapDevice:
    """One model on the device at a time; the device is granted first come, first served.

    A runner's lease waits its turn, unloads whatever other model is loaded (drops every
    reference and collects it) and loads its own from disk, then holds the device while it has
    work. ``resident_bytes`` is the loaded model's weight bytes (what the device holds).
    """

    def __init__(self, loaders: dict):
        self._loaders = loaders
        self._cond = threading.Condition()
        self._queue: list[object] = []
        self._holder: object | None = None
        self.loaded_name: str | None = None
        self.loaded: object | None = None
        self.resident_bytes = 0
        self.swaps = 0
        self.swap_seconds = 0.0

    def load(self, name: str) -> None:
        if self.loaded_name == name:
            return
        started = time.perf_counter()
        swapping = self.loaded_name is not None
        self.loaded, self.loaded_name, self.resident_bytes = None, None, 0
        gc.collect()
        model = self._loaders[name]()
        modules = model.components.values() if hasattr(model, "components") else [model]
        self.resident_bytes = sum(t.nbytes for m in modules if hasattr(m, "parameters")
                                  for t in list(m.parameters()) + list(m.buffers()))
        self.loaded, self.loaded_name = model, name
        if swapping:
            self.swaps += 1
            self.swap_seconds += time.perf_counter() - started

    def backend(self, name: str):
        device = self

        class _Backend:
            def lease(self):
                return device._lease(name)

            def served_quality(self) -> float:
                return 1.0

        return _Backend()

    def _lease(self, name: str):
        from contextlib import contextmanager

        @contextmanager
        def held():
            ticket = object()
            with self._cond:
                self._queue.append(ticket)
                self._cond.wait_for(lambda: self._holder is None and self._queue[0] is ticket)
                self._queue.pop(0)
                self._holder = ticket
            try:
                self.load(name)
                yield self.loaded
            finally:
                with self._cond:
                    self._holder = None
                    self._cond.notify_all()

        return held()


def _arbiter_server(config: ServeConfig):
    host = ModelHost.load(config)

    def resident() -> int:
        return sum(m.resident_bytes for m in host.managed.values())

    return host, resident, lambda: host.arbiter.state().granted_bytes, lambda: None


def _swap_server(config: ServeConfig):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import torch

    directory = models.smollm2_checkpoint_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    device = _SwapDevice({
        DEFAULT_CHAT_ID: lambda: AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32, local_files_only=True).eval(),
        DEFAULT_IMAGE_ID: models.load_digits_ddpm,
    })
    device.load(DEFAULT_CHAT_ID)  # the server last served a chat
    chat_model = device.loaded
    chat = ChatRunner(DEFAULT_CHAT_ID, tokenizer, device.backend(DEFAULT_CHAT_ID),
                      context_length=chat_model.config.max_position_embeddings,
                      eos_token_ids=_eos_ids(chat_model, tokenizer))
    del chat_model
    image = ImageRunner(DEFAULT_IMAGE_ID, device.backend(DEFAULT_IMAGE_ID),
                        pipeline_call_options(models.load_digits_ddpm()))
    host = ModelHost(config, chat, image)
    return host, lambda: device.resident_bytes, lambda: None, lambda: (device.swaps, device.swap_seconds)


async def _stream_chat(client, prompt: str, tokens: int) -> dict:
    started = time.perf_counter()
    first = last = None
    usage = finish = None
    stream = await client.chat.completions.create(
        model=DEFAULT_CHAT_ID, messages=[{"role": "user", "content": prompt}], max_tokens=tokens, temperature=0,
        stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first = first or now
            last = now
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        if chunk.usage:
            usage = chunk.usage
    if finish is None or usage is None or first is None:
        raise RuntimeError("incomplete stream")
    generated = usage.completion_tokens
    return {"ttft_s": first - started, "tokens": generated,
            "tokens_per_s": (generated - 1) / (last - first) if generated > 1 and last > first else None}


async def _image(client, steps: int, seed: int) -> dict:
    started = time.perf_counter()
    raw = await client.images.with_raw_response.generate(model=DEFAULT_IMAGE_ID, prompt="a digit",
                                                         extra_body={"num_inference_steps": steps, "seed": seed})
    if len(raw.parse().data) != 1:
        raise RuntimeError("no image")
    return {"latency_s": time.perf_counter() - started, "quality": float(raw.headers["x-torch-arbiter-quality"])}


async def _round(url: str, tokens: int, steps: int, seed: int) -> tuple[list, list, int]:
    import openai

    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600) as client:
        images = [asyncio.create_task(_image(client, steps, seed + i)) for i in range(_IMAGES)]
        await asyncio.sleep(0.05)
        chats = [asyncio.create_task(_stream_chat(client, _PROMPTS[i % len(_PROMPTS)], tokens)) for i in range(_CHATS)]
        results = await asyncio.gather(*chats, *images, return_exceptions=True)
    lost = sum(isinstance(r, BaseException) for r in results)
    ok = [r for r in results if not isinstance(r, BaseException)]
    return [r for r in ok if "ttft_s" in r], [r for r in ok if "latency_s" in r], lost


def _percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))]


def _run(name: str, factory, config: ServeConfig, args) -> dict:
    print(f"== {name}: loading", flush=True)
    host, resident, granted, swaps = factory(config)
    capacity = host.arbiter.state().capacity_bytes if host.arbiter is not None else None
    peaks = {"resident": 0, "granted": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peaks["resident"] = max(peaks["resident"], resident())
            g = granted()
            if g is not None:
                peaks["granted"] = max(peaks["granted"], g)
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    chats, images, lost = [], [], 0
    started = time.perf_counter()
    with serve_in_thread(create_app(host, owns_host=True)) as url:
        sampler.start()
        for r in range(args.rounds):
            c, i, n = asyncio.run(_round(url, args.tokens, args.steps, seed=100 * r))
            chats += c
            images += i
            lost += n
            print(f"   round {r + 1}: {len(c)} chats, {len(i)} images, {n} lost", flush=True)
        stop.set()
        sampler.join()
    wall = time.perf_counter() - started
    swap_count = swaps()
    ttft = [c["ttft_s"] for c in chats]
    tps = [c["tokens_per_s"] for c in chats if c["tokens_per_s"]]
    latency = [i["latency_s"] for i in images]
    result = {
        "capacity_bytes": capacity, "chats": len(chats), "images": len(images), "lost": lost, "wall_s": wall,
        "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": _percentile(ttft, 99),
        "tokens_per_s_p50": statistics.median(tps), "tokens_per_s_p99": _percentile(tps, 1),
        "image_latency_p50_s": statistics.median(latency), "image_latency_max_s": max(latency),
        "image_quality": sorted({round(i["quality"], 3) for i in images}),
        "chat_tokens_total": sum(c["tokens"] for c in chats),
        "peak_resident_bytes": peaks["resident"],
        "peak_granted_bytes": peaks["granted"] or None,
        "swaps": swap_count[0] if swap_count else 0,
        "swap_seconds": swap_count[1] if swap_count else 0.0,
    }
    print(f"   {result}", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of 8 chats + 2 images (default 2)")
    parser.add_argument("--tokens", type=int, default=32, help="completion tokens per chat (default 32)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps per image (default 25)")
    args = parser.parse_args()

    config = ServeConfig()  # the device size torch-arbiter serve picks on CPU
    results = {"arbiter": _run("arbiter", _arbiter_server, config, args)}
    capacity = results["arbiter"]["capacity_bytes"]
    gc.collect()
    results["swap"] = _run("swap", _swap_server, config, args)
    a, s = results["arbiter"], results["swap"]
    mib = 1 << 20

    def row(label, key, fmt, better_low=True):
        ratio = s[key] / a[key] if better_low and a[key] else (a[key] / s[key] if s[key] else float("nan"))
        return f"| {label} | {fmt.format(a[key])} | {fmt.format(s[key])} | {ratio:.2f}x |"

    table = "\n".join([
        f"Device: virtual, {capacity / mib:.1f} MiB (SmolLM2-135M at full quality + digits DDPM at its floor "
        f"+ activation reserves). Load: {args.rounds} rounds of {_IMAGES} image requests ({args.steps} steps) "
        f"and {_CHATS} streamed chats ({args.tokens} tokens, greedy) in flight together.",
        "",
        "| | arbiter (torch-arbiter serve) | swap whole models (baseline) | arbiter advantage |",
        "|---|---|---|---|",
        row("chat time to first token p50 (s)", "ttft_p50_s", "{:.2f}"),
        row("chat time to first token p99 (s)", "ttft_p99_s", "{:.2f}"),
        row("chat tokens/s per stream p50", "tokens_per_s_p50", "{:.1f}", better_low=False),
        row("chat tokens/s per stream p1 (slowest)", "tokens_per_s_p99", "{:.1f}", better_low=False),
        row("image latency p50 (s)", "image_latency_p50_s", "{:.2f}"),
        row("image latency max (s)", "image_latency_max_s", "{:.2f}"),
        row("wall time of the load (s)", "wall_s", "{:.1f}"),
        f"| requests lost | {a['lost']} | {s['lost']} | |",
        f"| model swaps (seconds spent) | {a['swaps']} | {s['swaps']} ({s['swap_seconds']:.1f} s) | |",
        f"| image quality served | {', '.join(map(str, a['image_quality']))} | "
        f"{', '.join(map(str, s['image_quality']))} | |",
        f"| peak resident weights / capacity | {a['peak_resident_bytes'] / mib:.1f} / {capacity / mib:.1f} MiB "
        f"({a['peak_resident_bytes'] / capacity:.1%}), both models | {s['peak_resident_bytes'] / mib:.1f} / "
        f"{capacity / mib:.1f} MiB ({s['peak_resident_bytes'] / capacity:.1%}), one model | |",
        f"| peak granted by the arbiter / capacity | {a['peak_granted_bytes'] / mib:.1f} / {capacity / mib:.1f} MiB "
        f"| n/a | |",
    ])
    notes = ("Tokens/s per stream is (completion tokens - 1) / (last token time - first token time) of one "
             "stream; each server interleaves its chats token by token in one worker thread, so eight streams "
             "share the model's speed. p99 over the chats of all rounds is their maximum at this count. The "
             "swap baseline starts with the chat model loaded; an image request arriving first swaps it out.")
    path = write_results("serve", "torch-arbiter serve under load vs swapping whole models", table,
                         {"capacity_bytes": capacity, "rounds": args.rounds, "tokens": args.tokens,
                          "steps": args.steps, "results": results}, notes)
    print(path.read_text())
    return 0 if a["lost"] == s["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
