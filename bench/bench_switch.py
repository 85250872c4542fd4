"""Switching and loading through the arbiter's fragment cache: SmolLM2-135M (bf16) and the digits DDPM.

One run measures, each against a baseline timed in the same run:

- **first output**: cold start (a fresh process) to the first generated token / first denoising
  step, progressive at the floor (``from_holo_pretrained`` of the converted checkpoint, an arbiter
  whose grant is the whole model, so the rest streams in after) vs the dense checkpoint
  (``from_pretrained``), both read through a loopback HTTP server capped at 50 MB/s (the dense
  side downloads its files at that rate first), and both from the local disk.
- **raise** floor -> 1.0 with the missing fragments in HOST, vs one memcpy of the same delta
  bytes and vs reloading the whole dense model; from DISK (HOST budget 0) vs plain file reads of
  the delta bytes.
- **lower** 1.0 -> floor: time until the bytes are returned.
- **dedup**: two pipelines / two models sharing their weights, the cache's resident bytes per tier.
- **peak RSS** of loading SmolLM2 at its floor (fresh process, HOST budget 0), against the issue's
  bound: floor bytes + largest single tensor + 20 %.

Run: ``nice -n 10 python bench/bench_switch.py [--runs N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]  # this checkout's torch_arbiter, the bench helpers, range_server
import range_server  # noqa: E402
from _common import write_results  # noqa: E402
PROMPT = "The capital of France is"


# ----------------------------------------------------------------------------- the models on disk

def smollm2_bf16_dir() -> Path:
    """A bf16 safetensors copy of the cached fp32 SmolLM2 checkpoint (cached beside it)."""
    import torch
    from safetensors.torch import load_file, save_file

    from torch_arbiter.demo import models

    source = models.smollm2_checkpoint_dir()
    stamp = {"source": models._source_stamp(models.smollm2_gguf_path()), "dtype": "bfloat16"}

    def build(staging: Path) -> None:
        tensors = {name: t.to(torch.bfloat16) if t.is_floating_point() else t
                   for name, t in load_file(str(source / "model.safetensors")).items()}
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        for item in source.iterdir():
            if item.is_file() and item.suffix != ".safetensors" and item.name != models._SOURCE_STAMP:
                shutil.copy2(item, staging / item.name)
        config = json.loads((staging / "config.json").read_text())
        config["dtype"] = "bfloat16"
        (staging / "config.json").write_text(json.dumps(config, indent=2))

    return models._cached_dir(models.cache_dir() / "smollm2-135m-instruct-q4_1-bf16", stamp, build)


def smollm2_bf16_holo_dir() -> Path:
    """:func:`smollm2_bf16_dir` converted (no calibration text), rebuilt when the codec changes."""
    from torch_arbiter.demo import models
    from torch_arbiter.holo.convert import convert

    source = smollm2_bf16_dir()
    stamp = {"source": models._source_stamp(models.smollm2_gguf_path()), "dtype": "bfloat16",
             "codec": models._codec_fingerprint()}
    return models._cached_dir(models.cache_dir() / "smollm2-135m-instruct-q4_1-bf16-holo", stamp,
                              lambda staging: models.convert_into(convert, source, staging, progress=False))


def ddpm_holo_dir() -> Path:
    """The committed digits DDPM pipeline converted to a holo checkpoint (cached)."""
    from torch_arbiter.demo import models
    from torch_arbiter.holo.convert import convert

    weights = models.DIGITS_DDPM_DIR / "unet" / "diffusion_pytorch_model.safetensors"
    stamp = {"source": models._source_stamp(weights), "codec": models._codec_fingerprint()}
    return models._cached_dir(models.cache_dir() / "digits-ddpm-holo", stamp,
                              lambda staging: models.convert_into(convert, models.DIGITS_DDPM_DIR, staging,
                                                                  progress=False))


def _ddpm_shared_unet_dir(scratch: Path) -> Path:
    """A second pipeline sharing the DDPM's UNet: the converted checkpoint (fragments hard-linked,
    never modified) with a DDIM scheduler instead of the DDPM one."""
    source = ddpm_holo_dir()
    target = scratch / "digits-ddim-holo"
    shutil.copytree(source, target, copy_function=os.link)
    for name in ("model_index.json", "scheduler/scheduler_config.json"):
        path = target / name
        text = path.read_text().replace("DDPMScheduler", "DDIMScheduler")
        path.unlink()  # a hard link: write a new file, the cached one stays as it is
        path.write_text(text)
    listed = target / "holo_files.json"
    if listed.is_file():  # the side-file checksums describe the DDPM files: drop the list, the usual names are read
        listed.unlink()
    return target


# ----------------------------------------------------------------------------- the throttled server

class _Throttle:
    """One shared link of ``rate`` bytes/s: every writer waits for its share (a token bucket of
    zero depth, so no burst)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._next = 0.0
        self.sent = 0

    def take(self, nbytes: int) -> None:
        with self._lock:
            start = max(time.perf_counter(), self._next)
            self._next = start + nbytes / self.rate
            self.sent += nbytes
            until = self._next
        delay = until - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


# ----------------------------------------------------------------------------- cold starts (children)

def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _download(base_url: str, names: list[str], dest: Path) -> int:
    """Fetch ``names`` under ``base_url`` into ``dest`` (streamed, 1 MiB at a time); returns bytes."""
    import urllib.request

    total = 0
    for name in names:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(base_url + name, timeout=120) as response, open(target, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                total += len(chunk)
    return total


def _child(argv: list[str]) -> None:
    """One cold start in this fresh process; prints one JSON line of wall-clock times."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["smollm2", "ddpm"])
    parser.add_argument("--mode", choices=["dense", "progressive", "rss"])
    parser.add_argument("--location")
    parser.add_argument("--files", default="[]")
    parser.add_argument("--ids", default="[]")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--vram-bytes", type=int, default=64 << 30)
    args = parser.parse_args(argv)
    import tempfile

    import torch
    import transformers  # noqa: F401  both sides import the same libraries before the clock starts
    if args.model == "smollm2":
        from transformers import AutoModelForCausalLM
        from transformers.models.llama import modeling_llama  # noqa: F401
    else:
        from diffusers import DDPMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel  # noqa: F401
    if args.mode != "dense":
        import accelerate  # noqa: F401

        import torch_arbiter as ta
        from torch_arbiter import Arbiter, ArbiterConfig, CacheConfig
        from torch_arbiter.hooks import managed_model_of
        from torch_arbiter.hooks import transformers_quantizer  # noqa: F401
    result: dict = {"imported": time.time(), "hwm_before_kib": _status_kib("VmHWM"),
                    "rss_before_kib": _status_kib("VmRSS")}
    with tempfile.TemporaryDirectory(prefix="bench-switch-") as scratch:
        if args.mode == "dense":
            location = args.location
            if location.startswith("http"):
                result["downloaded_bytes"] = _download(location, json.loads(args.files), Path(scratch))
                location = scratch
            result["loaded_files"] = time.time()
            if args.model == "smollm2":
                model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.bfloat16).eval()
            else:
                model = DDPMPipeline.from_pretrained(location)
            managed = None
        else:
            cache = CacheConfig(host_capacity_bytes=0) if args.mode == "rss" else None
            arbiter = Arbiter(ArbiterConfig(vram_bytes=args.vram_bytes, status_interval_s=None, cache=cache))
            model = ta.from_holo_pretrained(args.location, quantization_config=ta.HoloTensorConfig(arbiter=arbiter))
            managed = managed_model_of(model)
            result.update(quality_at_return=managed.quality, min_quality=managed.min_quality,
                          floor_bytes=managed.bytes_at(managed.min_quality), full_bytes=managed.full_bytes,
                          resident_bytes=managed.resident_bytes)
        result["loaded"] = time.time()
        result["hwm_loaded_kib"] = _status_kib("VmHWM")
        result["rss_loaded_kib"] = _status_kib("VmRSS")
        if managed is not None:
            result["quality_before_output"] = managed.quality
            first_layer = next(iter(managed.layers.values()))  # runs after the safe point: the level in effect

            def note_quality(_module, _args) -> None:
                result.setdefault("quality_in_output", managed.quality)

            first_layer.register_forward_pre_hook(note_quality)
        with torch.no_grad():
            if args.model == "smollm2":
                result["token"] = int(model(torch.tensor([json.loads(args.ids)])).logits[0, -1].argmax())
            else:
                model.set_progress_bar_config(disable=True)
                image = model(batch_size=1, num_inference_steps=1, generator=torch.Generator().manual_seed(0),
                              output_type="np").images
                result["image_mean"] = float(image.mean())
        result["first_output"] = time.time()
        result["hwm_after_output_kib"] = _status_kib("VmHWM")
        if managed is not None:
            result["quality_after_output"] = managed.quality
            result["remote_bytes_by_output"] = arbiter.cache.stats().bytes_out[ta.CacheTier.REMOTE]
            if args.stream:
                deadline = time.monotonic() + 300
                while managed.quality < 1.0 and time.monotonic() < deadline:
                    time.sleep(0.01)
                result["full_quality"] = time.time() if managed.quality >= 1.0 else None
    print("RESULT " + json.dumps(result), flush=True)
    os._exit(0)  # nothing to tear down: the arbiter's threads and temp files go with the process


def _run_child(*args: str) -> dict:
    spawned = time.time()
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"child {args} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["spawned"] = spawned
    return result


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def _first_output(runs: int, rate: float) -> dict:
    """Cold starts to the first token (SmolLM2 bf16) and the first denoising step (DDPM)."""
    from transformers import AutoTokenizer

    from torch_arbiter.demo import models

    dense_llm, holo_llm = smollm2_bf16_dir(), smollm2_bf16_holo_dir()
    dense_ddpm, holo_ddpm = models.DIGITS_DDPM_DIR, ddpm_holo_dir()
    ids = AutoTokenizer.from_pretrained(dense_llm)(PROMPT).input_ids
    throttle = _Throttle(rate)
    servers = {path: range_server.serve(path, throttle=throttle.take)
               for path in (dense_llm, holo_llm, dense_ddpm, holo_ddpm)}
    llm_files = sorted(p.name for p in dense_llm.iterdir() if p.is_file() and p.name != "torch_arbiter_source.json")
    ddpm_files = ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                  "unet/diffusion_pytorch_model.safetensors"]
    cases = {}
    try:
        for model, dense, holo, files in (("smollm2", dense_llm, holo_llm, llm_files),
                                          ("ddpm", dense_ddpm, holo_ddpm, ddpm_files)):
            for source in ("http", "disk"):
                samples: dict[str, list[dict]] = {"dense": [], "progressive": []}
                for run in range(runs):
                    for mode, path in (("dense", dense), ("progressive", holo)):  # interleaved: load drifts hit both
                        location = servers[path][1] if source == "http" else str(path)
                        extra = ["--stream"] if mode == "progressive" and run == runs - 1 else []
                        sent, requests = throttle.sent, _requests(servers)
                        result = _run_child("--model", model, "--mode", mode, "--location", location,
                                            "--files", json.dumps(files), "--ids", json.dumps(ids), *extra)
                        result["served_bytes"] = throttle.sent - sent
                        result["served_requests"] = _requests(servers) - requests
                        samples[mode].append(result)
                        print(f"  first output {model} {source} {mode} run {run}: "
                              f"{result['first_output'] - result['imported']:.2f} s after imports", flush=True)
                cases[f"{model}/{source}"] = _first_output_summary(samples)
    finally:
        for server, _ in servers.values():
            range_server.stop(server)
    return {"rate_bytes_per_s": rate, "prompt": PROMPT, "prompt_ids": ids, "cases": cases}


def _requests(servers: dict) -> int:
    """Requests the servers answered so far."""
    return sum(len(server.requests) for server, _ in servers.values())


def _first_output_summary(samples: dict[str, list[dict]]) -> dict:
    out = {}
    for mode, results in samples.items():
        after_imports = [r["first_output"] - r["imported"] for r in results]
        from_spawn = [r["first_output"] - r["spawned"] for r in results]
        entry = {"runs": results, "median_s": _median(after_imports), "median_from_spawn_s": _median(from_spawn),
                 "served_bytes_median": _median([r["served_bytes"] for r in results]),
                 "served_requests_median": _median([r["served_requests"] for r in results])}
        if mode == "progressive":
            entry["quality_at_output"] = [r["quality_in_output"] for r in results]
            entry["quality_at_return"] = [r["quality_at_return"] for r in results]
            entry["quality_before_output"] = [r["quality_before_output"] for r in results]
            streamed = [r for r in results if r.get("full_quality")]
            if streamed:
                entry["full_quality_after_s"] = streamed[-1]["full_quality"] - streamed[-1]["imported"]
        out[mode] = entry
    out["speedup"] = out["dense"]["median_s"] / out["progressive"]["median_s"]
    out["speedup_from_spawn"] = out["dense"]["median_from_spawn_s"] / out["progressive"]["median_from_spawn_s"]
    return out


# ----------------------------------------------------------------------------- switches (in process)

def _held_keys(managed) -> set[str]:
    """Content keys of the fragments the model's Holo layers hold at DEVICE now."""
    keys = set()
    for module in managed.layers.values():
        for name in module._acquired:
            keys.add(module.holo.fragments.content_keys[name])
    return keys


def _load_unregistered(holo_dir: Path, cache_config=None):
    import torch_arbiter as ta
    from torch_arbiter import Arbiter, ArbiterConfig
    from torch_arbiter.hooks import managed_model_of

    arbiter = Arbiter(ArbiterConfig.for_vram_gb(64, status_interval_s=None, cache=cache_config))
    model = ta.from_holo_pretrained(holo_dir, quantization_config=ta.HoloTensorConfig(
        arbiter=arbiter, register=False, quality=0.0))
    return arbiter, model, managed_model_of(model)


def _time_switches(managed, cache, reps: int) -> dict:
    """Raise floor -> 1.0 and lower back ``reps`` times; the fragments each raise brings in."""
    from torch_arbiter import CacheTier

    managed.set_quality(0.0)
    floor_keys = _held_keys(managed)
    raises, lowers, brought = [], [], []
    for _ in range(reps):
        before = cache.stats().bytes_in[CacheTier.DEVICE]
        started = time.perf_counter()
        applied = managed.set_quality(1.0)
        raises.append(time.perf_counter() - started)
        brought.append(cache.stats().bytes_in[CacheTier.DEVICE] - before)
        assert applied and managed.quality == 1.0, "the raise did not apply at once on an idle model"
        full_keys = _held_keys(managed)
        device_full = cache.resident_bytes(CacheTier.DEVICE)
        started = time.perf_counter()
        applied = managed.set_quality(0.0)
        lowers.append(time.perf_counter() - started)
        assert applied and managed.quality == managed.min_quality
        device_floor = cache.resident_bytes(CacheTier.DEVICE)
    delta = sorted(full_keys - floor_keys)
    return {"raise_s": raises, "lower_s": lowers, "device_bytes_in_per_raise": brought,
            "delta_keys": delta, "delta_bytes": sum(cache.fragment_nbytes(k) for k in delta),
            "device_bytes_full": device_full, "device_bytes_floor": device_floor,
            "resident_bytes_floor": managed.resident_bytes, "bytes_at_floor": managed.bytes_at(managed.min_quality),
            "full_bytes": managed.full_bytes, "min_quality": managed.min_quality}


def _switch_from_host(reps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from torch_arbiter import CacheTier

    arbiter, model, managed = _load_unregistered(smollm2_bf16_holo_dir())
    cache = arbiter.cache
    every = [key for module in managed.layers.values() for key in module.holo.fragments.content_keys.values()]
    cache.get_many([key for key in every if not cache.ready(key)], CacheTier.HOST)
    result = _time_switches(managed, cache, reps)
    result["host_bytes_before_raise"] = cache.resident_bytes(CacheTier.HOST)
    source = torch.empty(result["delta_bytes"], dtype=torch.uint8).fill_(7)
    target = torch.empty_like(source)
    memcpy = []
    for _ in range(reps):
        started = time.perf_counter()
        target.copy_(source)
        memcpy.append(time.perf_counter() - started)
    per_fragment = []
    tensors = [cache.read(key) for key in result["delta_keys"]]
    for _ in range(reps):
        started = time.perf_counter()
        for tensor in tensors:
            tensor.clone()
        per_fragment.append(time.perf_counter() - started)
    del source, target, tensors
    first_step = managed.curve[1][1] - managed.curve[0][1]
    managed.unpatch()
    arbiter.close()
    reloads = []
    for _ in range(3):
        started = time.perf_counter()
        dense = AutoModelForCausalLM.from_pretrained(smollm2_bf16_dir(), dtype=torch.bfloat16)
        reloads.append(time.perf_counter() - started)
        del dense
    result.update(memcpy_s=memcpy, clone_per_fragment_s=per_fragment, reload_dense_s=reloads,
                  first_step_bytes=first_step)
    return result


def _switch_from_disk(reps: int) -> dict:
    """Raise and lower with no HOST budget; the baselines read the delta's byte ranges one after
    another, each discarded at once (the buffer is reused, its pages stay mapped and warm) and
    each kept until the pass ends (fresh memory, as a raise must hold all of it)."""
    import torch

    from torch_arbiter import CacheConfig
    from torch_arbiter.memory import trim_host_heap

    holo_dir = smollm2_bf16_holo_dir()
    arbiter, model, managed = _load_unregistered(holo_dir, CacheConfig(host_capacity_bytes=0))
    cache = arbiter.cache
    result = _time_switches(managed, cache, reps)
    source = cache.attach(holo_dir)
    fid_of = {key: fid for fid, key in source.keys.items()}
    entries = [source.index["fragments"][fid_of[key]] for key in result["delta_keys"]]
    reads, kept_reads = [], []
    for _ in range(reps):
        started = time.perf_counter()
        for entry in entries:
            with open(holo_dir / entry["file"], "rb") as handle:
                handle.seek(entry["offset"])
                handle.read(entry["length"])
        reads.append(time.perf_counter() - started)
    for _ in range(reps):
        started = time.perf_counter()
        kept = []
        for entry in entries:
            with open(holo_dir / entry["file"], "rb") as handle:
                handle.seek(entry["offset"])
                buffer = torch.empty(entry["length"], dtype=torch.uint8)
                handle.readinto(buffer.numpy())
                kept.append(buffer)
        kept_reads.append(time.perf_counter() - started)
        del kept, buffer
        trim_host_heap()  # as a lowering returns the memory
    managed.unpatch()
    arbiter.close()
    result["file_reads_s"] = reads
    result["file_reads_kept_s"] = kept_reads
    return result


# ----------------------------------------------------------------------------- dedup

def _settle(arbiter, managed, timeout: float = 120.0) -> None:
    """Wait until the model's prefetches are done and it runs at its grant."""
    deadline = time.monotonic() + timeout
    arbiter.prefetcher.idle(managed.holder, timeout)
    while managed.quality < min(1.0, managed.allocation.quality) and time.monotonic() < deadline:
        time.sleep(0.01)


def _snapshot(arbiter, named: dict) -> dict:
    from torch_arbiter import CacheTier

    cache = arbiter.cache
    held = arbiter.held_bytes()
    return {
        "cache_device_bytes": cache.resident_bytes(CacheTier.DEVICE),
        "cache_host_bytes": cache.resident_bytes(CacheTier.HOST),
        "arbiter_held_bytes": sum(held.values()),
        "models": {name: {"quality": m.quality, "resident_bytes": m.resident_bytes,
                          "charged_bytes": m.cache_stats().charged_bytes, "shared_bytes": m.cache_stats().shared_bytes,
                          "held_bytes": held.get(m.allocation.id, 0) - m.allocation.activation_bytes}
                   for name, m in named.items()},
    }


def _dedup_pair(first_dir: Path, second_dir: Path) -> dict:
    import torch_arbiter as ta
    from torch_arbiter import Arbiter, ArbiterConfig
    from torch_arbiter.hooks import managed_model_of

    arbiter = Arbiter(ArbiterConfig.for_vram_gb(64, status_interval_s=None))
    config = lambda name: ta.HoloTensorConfig(arbiter=arbiter, name=name)  # noqa: E731
    first = managed_model_of(ta.from_holo_pretrained(first_dir, quantization_config=config("first")))
    _settle(arbiter, first)
    out = {"one_at_full": _snapshot(arbiter, {"first": first})}
    second = managed_model_of(ta.from_holo_pretrained(second_dir, quantization_config=config("second")))
    _settle(arbiter, second)
    out["two_at_full"] = _snapshot(arbiter, {"first": first, "second": second})
    for managed in (first, second):
        managed.set_quality(0.0, wait=True, timeout=60)
    out["two_at_floor"] = _snapshot(arbiter, {"first": first, "second": second})
    first.unpatch()
    out["second_after_first_released"] = _snapshot(arbiter, {"second": second})
    second.unpatch()
    arbiter.close()
    return out


def _dedup() -> dict:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-switch-") as scratch:
        ddim = _ddpm_shared_unet_dir(Path(scratch))
        return {"ddpm_and_ddim_sharing_the_unet": _dedup_pair(ddpm_holo_dir(), ddim),
                "smollm2_loaded_twice": _dedup_pair(smollm2_bf16_holo_dir(), smollm2_bf16_holo_dir())}


# ----------------------------------------------------------------------------- peak RSS

def _largest_tensor_bytes(holo_dir: Path) -> int:
    import math

    itemsize = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8, "int64": 8, "int32": 4, "uint8": 1}
    tensors = json.loads((holo_dir / "holo_index.json").read_text())["tensors"]
    return max(math.prod(meta["shape"]) * itemsize.get(meta["dtype"], 4) for meta in tensors.values())


def _peak_rss(host: dict) -> dict:
    from torch_arbiter import WorkloadType

    holo_dir = smollm2_bf16_holo_dir()
    floor = host["bytes_at_floor"]
    vram = floor + WorkloadType.LLM_INFERENCE.typical_activation_bytes + host["first_step_bytes"] // 2
    result = _run_child("--model", "smollm2", "--mode", "rss", "--location", str(holo_dir),
                        "--ids", json.dumps([1, 504, 3575]), "--vram-bytes", str(vram))
    largest = _largest_tensor_bytes(holo_dir)
    bound = int((floor + largest) * 1.2)
    grew = (result["hwm_loaded_kib"] - result["hwm_before_kib"]) << 10
    return {"child": result, "floor_bytes": floor, "largest_tensor_bytes": largest, "bound_bytes": bound,
            "peak_growth_bytes": grew, "rss_growth_bytes": (result["rss_loaded_kib"] - result["rss_before_kib"]) << 10,
            "peak_growth_with_first_token_bytes": (result["hwm_after_output_kib"] - result["hwm_before_kib"]) << 10,
            "holds": grew <= bound, "vram_bytes": vram}


# ----------------------------------------------------------------------------- report

def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.1f}"


def _verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _tables(first: dict, host: dict, disk: dict, dedup: dict, rss: dict) -> tuple[str, dict]:
    lines = ["## First output from a cold start (fresh process each)", "",
             f"Median of {len(first['cases']['smollm2/http']['dense']['runs'])} runs per cell, timed from the end of "
             "the imports (torch, transformers / diffusers, and torch_arbiter for the progressive side) to the first "
             "token / first denoising step; `from spawn` adds process start and imports. HTTP: a loopback "
             f"server capped at {first['rate_bytes_per_s'] / 1e6:.0f} MB/s (10^6 bytes), shared by all connections.",
             "`quality` is the progressive model's quality when `from_holo_pretrained` returned → in effect during "
             "the first output (read in its first Holo layer, after the safe point, where a pending raise is applied).",
             "", "| model | source | progressive s | quality | dense s | speedup | from spawn: prog / dense s | speedup from spawn | "
             "served MB (requests): prog / dense | target | holds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    targets = {}
    for case, row in first["cases"].items():
        model, source = case.split("/")
        prog, dense = row["progressive"], row["dense"]
        quality = ", ".join(f"{a:.3f} → {b:.3f}" for a, b in zip(prog["quality_at_return"], prog["quality_at_output"]))
        served = (f"{_mb(prog['served_bytes_median'])} ({prog['served_requests_median']:.0f}) / "
                  f"{_mb(dense['served_bytes_median'])} ({dense['served_requests_median']:.0f})" if source == "http" else "—")
        target = "≥ 2.5×" if case == "smollm2/http" else "—"
        holds = _verdict(row["speedup"] >= 2.5) if case == "smollm2/http" else "—"
        if case == "smollm2/http":
            targets["first_token_http_2.5x"] = row["speedup"] >= 2.5
        lines.append(f"| {model} | {source} | {prog['median_s']:.2f} | {quality} | {dense['median_s']:.2f} | "
                     f"{row['speedup']:.2f}× | {prog['median_from_spawn_s']:.2f} / {dense['median_from_spawn_s']:.2f} | "
                     f"{row['speedup_from_spawn']:.2f}× | {served} | {target} | {holds} |")
    streamed = first["cases"]["smollm2/http"]["progressive"].get("full_quality_after_s")
    if streamed is not None:
        lines += ["", f"SmolLM2 over HTTP reached quality 1.0 (everything streamed) {streamed:.2f} s after the imports "
                  f"(last progressive run); the dense side served {_mb(first['cases']['smollm2/http']['dense']['served_bytes_median'])} MB."]
    raise_host, lower_host = _median(host["raise_s"]), _median(host["lower_s"])
    memcpy, reload = _median(host["memcpy_s"]), _median(host["reload_dense_s"])
    raise_disk, reads = _median(disk["raise_s"]), _median(disk["file_reads_s"])
    kept_reads = _median(disk["file_reads_kept_s"])
    lower_disk = _median(disk["lower_s"])
    targets.update({"raise_host_le_2x_memcpy": raise_host <= 2 * memcpy,
                    "raise_host_ge_5x_faster_than_reload": reload >= 5 * raise_host,
                    "raise_disk_le_1.5x_reads_kept": raise_disk <= 1.5 * kept_reads,
                    "raise_disk_le_1.5x_reads_discarded": raise_disk <= 1.5 * reads,
                    "lower_lt_10ms_host_has_room": lower_host < 0.010,
                    "lower_lt_10ms_host_budget_0": lower_disk < 0.010})
    lines += ["", "## Switching SmolLM2 bf16 (unregistered model, `ManagedModel.set_quality`, no forward running)", "",
              f"Floor = quality {host['min_quality']:.3f} ({_mb(host['bytes_at_floor'])} MB of {_mb(host['full_bytes'])} MB); "
              f"the raise brings {len(host['delta_keys'])} fragments, {_mb(host['delta_bytes'])} MB (the delta). "
              f"{len(host['raise_s'])} raises and lowers each.", "",
              "| switch | median ms | p99 ms | baseline | baseline median ms | ratio | target | holds |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |",
              f"| raise floor → 1.0, delta in HOST | {_ms(raise_host)} | {_ms(_p99(host['raise_s']))} | one memcpy of the delta bytes "
              f"(torch `copy_`) | {_ms(memcpy)} | {raise_host / memcpy:.2f}× | ≤ 2× | {_verdict(targets['raise_host_le_2x_memcpy'])} |",
              f"| same | | | per-fragment `clone()` of the delta | {_ms(_median(host['clone_per_fragment_s']))} | "
              f"{raise_host / _median(host['clone_per_fragment_s']):.2f}× | — | — |",
              f"| same | | | reload the dense model (`from_pretrained` of the bf16 safetensors, page cache warm) | {_ms(reload)} | "
              f"{reload / raise_host:.1f}× faster | ≥ 5× | {_verdict(targets['raise_host_ge_5x_faster_than_reload'])} |",
              f"| raise floor → 1.0, from DISK (HOST budget 0) | {_ms(raise_disk)} | {_ms(_p99(disk['raise_s']))} | plain file "
              f"reads of the delta ranges, kept (fresh memory) | {_ms(kept_reads)} | {raise_disk / kept_reads:.2f}× | ≤ 1.5× | "
              f"{_verdict(targets['raise_disk_le_1.5x_reads_kept'])} |",
              f"| same | | | plain file reads of the delta ranges, each discarded (one warm buffer) | {_ms(reads)} | "
              f"{raise_disk / reads:.2f}× | ≤ 1.5× | {_verdict(targets['raise_disk_le_1.5x_reads_discarded'])} |",
              f"| lower 1.0 → floor (HOST has room) | {_ms(lower_host)} | {_ms(_p99(host['lower_s']))} | — | — | — | < 10 ms | "
              f"{_verdict(lower_host < 0.010)} |",
              f"| lower 1.0 → floor (HOST budget 0) | {_ms(lower_disk)} | {_ms(_p99(disk['lower_s']))} | — | — | — | < 10 ms | "
              f"{_verdict(lower_disk < 0.010)} |",
              "", f"After a lower the cache's DEVICE tier holds {_mb(host['device_bytes_floor'])} MB (at 1.0: "
              f"{_mb(host['device_bytes_full'])} MB); the bytes are returned when `set_quality` returns."]
    lines += ["", "## One copy of shared weights (arbiter's cache, both models registered, grant = full)", "",
              "| pair | state | cache DEVICE MB | cache HOST MB | arbiter held MB (weights + reserves) | per model: quality, resident MB, charged MB, shared MB |",
              "| --- | --- | --- | --- | --- | --- |"]
    for pair, states in dedup.items():
        for state, snap in states.items():
            per_model = "; ".join(f"{name}: {m['quality']:.3f}, {_mb(m['resident_bytes'])}, {_mb(m['charged_bytes'])}, "
                                  f"{_mb(m['shared_bytes'])}" for name, m in snap["models"].items())
            lines.append(f"| {pair} | {state} | {_mb(snap['cache_device_bytes'])} | {_mb(snap['cache_host_bytes'])} | "
                         f"{_mb(snap['arbiter_held_bytes'])} | {per_model} |")
    pair = dedup["ddpm_and_ddim_sharing_the_unet"]
    targets["dedup_device_once"] = all(
        states["two_at_full"]["cache_device_bytes"] == states["one_at_full"]["cache_device_bytes"] for states in dedup.values())
    lines += ["", "## Peak RSS of loading SmolLM2 bf16 at its floor (fresh process, grant = floor, HOST budget 0)", "",
              "| peak RSS growth (VmHWM after − before `from_holo_pretrained`) MB | RSS growth MB | floor MB | largest tensor MB | "
              "bound (floor + largest) × 1.2 MB | holds | quality |", "| --- | --- | --- | --- | --- | --- | --- |",
              f"| {_mb(rss['peak_growth_bytes'])} | {_mb(rss['rss_growth_bytes'])} | {_mb(rss['floor_bytes'])} | "
              f"{_mb(rss['largest_tensor_bytes'])} | {_mb(rss['bound_bytes'])} | {_verdict(rss['holds'])} | "
              f"{rss['child']['quality_at_return']:.3f} |",
              "", f"With the first token the peak grows to {_mb(rss['peak_growth_with_first_token_bytes'])} MB over the same start."]
    targets["peak_rss_bound"] = rss["holds"]
    del pair
    return "\n".join(lines), targets


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        _child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="cold starts per cell of the first-output table")
    parser.add_argument("--reps", type=int, default=15, help="raises and lowers timed per case")
    parser.add_argument("--rate-mb", type=float, default=50.0, help="the HTTP server's cap, MB/s (10^6 bytes)")
    args = parser.parse_args()
    load_start = os.getloadavg()
    started = time.perf_counter()
    for build in (smollm2_bf16_dir, smollm2_bf16_holo_dir, ddpm_holo_dir):
        print(f"{build.__name__}: {build()}", flush=True)
    print("first output ...", flush=True)
    first = _first_output(args.runs, args.rate_mb * 1e6)
    print("switches from HOST ...", flush=True)
    host = _switch_from_host(args.reps)
    print("switches from DISK ...", flush=True)
    disk = _switch_from_disk(args.reps)
    print("dedup ...", flush=True)
    dedup = _dedup()
    print("peak RSS ...", flush=True)
    rss = _peak_rss(host)
    table, targets = _tables(first, host, disk, dedup, rss)
    load_end = os.getloadavg()
    notes = "\n".join([
        "Notes:",
        f"- Load average (1, 5, 15 min) at start {load_start[0]:.2f} / {load_start[1]:.2f} / {load_start[2]:.2f}, at the end "
        f"{load_end[0]:.2f} / {load_end[1]:.2f} / {load_end[2]:.2f}: the machine's cores may be shared with other jobs; "
        f"whole run {time.perf_counter() - started:.0f} s.",
        "- The page cache is warm for both sides alike: every file (dense safetensors, holo fragments) was read "
        "before the timed runs, so `disk` compares the loaders, not the drive.",
        "- Progressive: `from_holo_pretrained(dir_or_url, quantization_config=HoloTensorConfig(arbiter=...))` with an "
        "arbiter whose grant is the whole model (64 GiB virtual device): it returns once the floor is in and the rest "
        "streams after; the first output runs at whatever quality is in effect then (recorded). Dense: "
        "`AutoModelForCausalLM.from_pretrained(dir, dtype=bfloat16)` / `DDPMPipeline.from_pretrained(dir)` after "
        "downloading every file of the checkpoint through the same server. The prompt is tokenized by the parent.",
        "- Raise/lower: `ManagedModel.set_quality` on an unregistered model with no forward running (applied at "
        "once, in the caller). On this CPU machine the DEVICE tier shares storage with HOST copies, so a raise from "
        "HOST moves no bytes (it takes the fragments and rebuilds the layers' codes). `from_pretrained` of a bf16 "
        "safetensors file into a bf16 model maps the file (no conversion), so its pages are read when first used, "
        "not during the reload timed here. From DISK a fragment is checked against its sha256 (the index's) at its "
        "first read in the process and again when its file changes (the first raise pays it: the p99 column), "
        "the plain reads never. A raise from DISK reads its fragments in parallel (up to 8 reads); the plain reads "
        "are sequential. A lower with HOST budget 0 reads the floor's fragments back from DISK: the exact top level "
        "replaced them, and nothing else holds them.",
        "- First output of the progressive side includes the streaming of the levels above the floor in the "
        "background (4 prefetch workers) competing for the same two cores.",
        f"- Targets held: {json.dumps(targets)}",
    ])
    path = write_results("switch", "Switching and progressive loading through the fragment cache",
                         table, {"first_output": first, "switch_host": host, "switch_disk": disk, "dedup": dedup,
                                 "peak_rss": rss, "targets": targets, "load_average": [load_start, load_end]}, notes)
    print(path.read_text())


if __name__ == "__main__":
    main()
