"""The main job, ``torch-arbiter demo``: a chat LLM and an image model share one device.

SmolLM2-135M-Instruct (transformers) and the repository's digits DDPM (diffusers) are each
patched with one line, registered with one :class:`~torch_arbiter.arbiter.Arbiter`, and run
while priorities and the memory used by "another process" change. Every step prints each
model's quality, the weight bytes it really holds, and what it produced at that quality.

On a machine without a GPU the device is virtual (``ArbiterConfig.for_vram_gb``): the budget
is enforced by weight residency (what each model keeps resident), not per CUDA allocation.
"""

from __future__ import annotations

import threading
import time

import torch

from ..arbiter import Arbiter, ArbiterConfig
from ..memory import GpuMemoryTracker
from ..priority import Priority, WorkloadType

__all__ = ["run_demo"]

_MIB = 1 << 20
_PROMPT = "The capital of France is"


def _answer(model, tokenizer, new_tokens: int) -> str:
    batch = tokenizer(_PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _digits(pipe, steps: int):
    generator = torch.Generator().manual_seed(0)
    return pipe(batch_size=4, generator=generator, num_inference_steps=steps, output_type="np").images


def _print_state(arbiter: Arbiter, managed: dict, label: str) -> None:
    state = arbiter.state()
    print(f"\n== {label}")
    print(f"   device {state.total_bytes / _MIB:.0f} MiB, other processes {state.external_bytes / _MIB:.0f} MiB, "
          f"granted {state.granted_bytes / _MIB:.0f} MiB ({state.pressure.name} pressure)")
    for w in state.workloads:
        model = managed[w.name]
        print(f"   {w.name:<6} {w.priority.name:<10} target {w.quality:5.3f}  in effect {model.quality:5.3f}  "
              f"resident weights {model.resident_bytes / _MIB:6.1f} of {model.full_bytes / _MIB:6.1f} MiB")


def run_demo(vram_gb: float | None = None, quick: bool = False) -> int:
    """Run the two-model scenario and print qualities, resident bytes and outputs at each step.

    Args:
        vram_gb: size of the virtual device in GiB; default: 80 % of what both models need at
            full quality (so someone must give way).
        quick: fewer generated tokens and denoising steps (used by the tests).

    Returns:
        0 on success.
    """
    from ..hooks import patch
    from .models import load_digits_ddpm, load_smollm2, perplexity, psnr, reference_text, smollm2_holo_dir

    tokens, steps = (6, 8) if quick else (16, 25)
    print("loading SmolLM2-135M-Instruct and the digits DDPM (the first run also converts SmolLM2 into "
          "HoloTensor fragments, a few minutes, cached afterwards) ...", flush=True)
    llm, tokenizer = load_smollm2()
    pipe = load_digits_ddpm()
    reference_digits = _digits(pipe, steps)
    text = reference_text()
    reference_ppl = perplexity(llm, tokenizer, text, max_tokens=128, stride=128, window=128)
    llm_bytes = sum(p.nbytes for p in llm.parameters())
    unet_bytes = sum(p.nbytes for p in pipe.unet.parameters())
    activations = {"chat": 32 * _MIB, "image": 16 * _MIB}
    device_bytes = int(vram_gb * (1 << 30)) if vram_gb else int(0.8 * (llm_bytes + unet_bytes + sum(activations.values())))
    tracker = GpuMemoryTracker("cpu", device_bytes)
    print(f"torch-arbiter demo: SmolLM2-135M (chat) and a digits DDPM (image) on one virtual "
          f"{device_bytes / _MIB:.0f} MiB device.\nNo GPU here: the budget is enforced by weight residency; "
          "on CUDA the pluggable allocator also enforces it on every allocation.")

    with Arbiter(ArbiterConfig(vram_bytes=device_bytes, monitor_interval_s=0.05), tracker=tracker) as arbiter:
        chat = patch(llm, arbiter, workload=WorkloadType.LLM_INFERENCE, priority=Priority.USER_FACING,
                     name="chat", holo_dir=smollm2_holo_dir(), progress=False, activation_bytes=activations["chat"])
        image = patch(pipe, arbiter, workload=WorkloadType.IMAGE_GENERATION, priority=Priority.BACKGROUND,
                      name="image", activation_bytes=activations["image"], progress=False)
        managed = {"chat": chat, "image": image}

        def show_outputs() -> None:
            ppl = perplexity(llm, tokenizer, text, max_tokens=128, stride=128, window=128)
            print(f"   chat  > {_PROMPT} {_answer(llm, tokenizer, tokens)!r}  (perplexity {ppl:.2f}, "
                  f"full quality {reference_ppl:.2f})")
            if image.patched:
                score = psnr(_digits(pipe, steps), reference_digits)
                verdict = "identical to full quality" if score == float("inf") else f"PSNR vs full quality {score:.1f} dB"
                print(f"   image > 4 digits, {verdict}")

        _print_state(arbiter, managed, "both patched: the chat (USER_FACING) comes first, the image job waits at its floor")
        show_outputs()

        seen = arbiter.stats().rebalances
        tracker.set_external_bytes(device_bytes * 2 // 5)
        _wait_for(lambda: arbiter.stats().rebalances > seen)
        _print_state(arbiter, managed, "another process takes 40 % of the device: the monitor lowers the chat model")
        show_outputs()

        worker = threading.Thread(target=lambda: _answer(llm, tokenizer, tokens))
        worker.start()
        time.sleep(0.2)
        arbiter.update_priority(image.allocation, Priority.CRITICAL)
        arbiter.update_priority(chat.allocation, Priority.BACKGROUND)
        print("\n   (priorities swapped while the chat was generating: its new level waits for the next decode step)")
        worker.join()
        _print_state(arbiter, managed, "the user clicks 'generate': the image job is CRITICAL, the chat BACKGROUND")
        show_outputs()

        seen = arbiter.stats().rebalances
        tracker.set_external_bytes(0)
        _wait_for(lambda: arbiter.stats().rebalances > seen)
        image.unpatch()
        _print_state(arbiter, managed, "the other process exits and the image job is done (unpatched): the chat climbs back")
        show_outputs()
        chat.unpatch()

        stats = arbiter.stats()
        print(f"\nstats: {stats.grants} grants, {stats.releases} releases, {stats.rebalances} rebalances, "
              f"{stats.quality_reductions} quality reductions, {stats.quality_increases} increases, "
              f"{stats.preemptions} preemptions, {stats.failures} failures")
    return 0


def _wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
