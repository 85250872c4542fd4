"""The main job, ``torch-arbiter demo``: a chat LLM and an image model share one device.

SmolLM2-135M-Instruct (transformers) and the repository's digits DDPM (diffusers) are each
patched with one line, registered with one :class:`~torch_arbiter.arbiter.Arbiter`, and run
while priorities and the memory used by "another process" change:

1. both fit at full quality (the device is sized so that they use about 85 % of it);
2. another process takes most of the device: the chat (HIGH, the user-facing priority) drops to
   4-bit levels on every layer but its head, the image job (BACKGROUND) to its floor;
3. the user clicks "generate" while the chat answers: the image job becomes CRITICAL and climbs
   back to full quality, the chat becomes BACKGROUND and drops to its floor, where its answer
   changes (its new level waits for its next decode step);
4. the other process exits and the image job is done: the chat climbs back to full quality.

A rich table shows every workload live; a sampler thread records the arbiter's state five times a
second. At the end the demo writes ``timeline.png``, ``trace.json``, ``chat.md``,
``digits_q*.png`` and ``summary.md`` into its output directory.

On a machine without a GPU the device is virtual (``ArbiterConfig.for_vram_gb``): the budget is
enforced by weight residency (what each model keeps resident), not per CUDA allocation.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._fileio import atomic_write
from .._optional import import_optional
from ..arbiter import Arbiter, ArbiterConfig
from ..errors import InvalidRequestError
from ..memory import GpuMemoryTracker
from ..priority import Priority, WorkloadType

__all__ = ["DemoResult", "check_vram_gb", "default_out_dir", "run_demo"]

_MIB = 1 << 20
_GIB = 1 << 30
_QUESTION = "What is the capital of France?"
_ACTIVATIONS = {"chat": 32 * _MIB, "image": 16 * _MIB}
_FULL_SHARE = 0.85  # both models at full quality fill this share of the default device
_SAMPLE_INTERVAL_S = 0.2
_FILE_MODE = 0o644


def check_vram_gb(value: Any) -> float | None:
    """Validate the demo's ``--vram-gb`` before anything is loaded.

    Args:
        value: None (size the device for the two models) or a number of GiB.

    Returns:
        The value as a float, or None.

    Raises:
        InvalidRequestError: not a finite number greater than 0 (NaN, infinity, 0, negative).
    """
    if value is None:
        return None
    try:
        gb = float(value)
    except (TypeError, ValueError):
        gb = math.nan
    if not (math.isfinite(gb) and gb > 0):
        raise InvalidRequestError(
            f"--vram-gb must be a size in GiB greater than 0 (for example 0.7), got {value!r}; "
            "leave it out to size the virtual device for the two models"
        )
    return gb


def default_out_dir() -> Path:
    """``demo-out/<local date and time>`` under the current directory (not created here)."""
    return Path("demo-out") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


@dataclass
class DemoResult:
    """What :func:`run_demo` did.

    Attributes:
        out_dir: the directory the files were written to.
        files: the files written, by role (``timeline``, ``trace``, ``chat``, ``summary``,
            ``digits`` (a list)).
        seconds: wall time of the scenario (loading and writing included).
    """

    out_dir: Path
    files: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


class _Recorder:
    """Samples the arbiter and the models five times a second and keeps the scenario's events.

    A scenario step that changes the device and rebalances runs inside :meth:`atomic`, so no
    sample falls between the other process taking memory and the arbiter's answer (the demo
    simulates that process; on a real GPU the memory monitor answers within its interval).
    """

    def __init__(self, arbiter: Arbiter) -> None:
        self.arbiter = arbiter
        self.samples: list[dict] = []
        self.events: list[dict] = []
        self.outputs: dict[str, str] = {}
        self.phase = ""
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="torch-arbiter-demo-sampler", daemon=True)

    def start(self) -> "_Recorder":
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        self.sample()

    def now(self) -> float:
        return round(time.monotonic() - self._started, 3)

    def _run(self) -> None:
        while not self._stop.wait(_SAMPLE_INTERVAL_S):
            self.sample()

    @contextlib.contextmanager
    def atomic(self):
        with self._lock:
            yield

    def event(self, label: str) -> None:
        with self._lock:
            self.events.append({"t_s": self.now(), "label": label})
        self.sample()

    def sample(self) -> dict:
        from ..hooks import managed_models

        with self._lock:
            state = self.arbiter.state()
            models = {m.allocation.id: m for m in managed_models(self.arbiter) if m.allocation is not None}
            workloads = {}
            for info in state.workloads:
                model = models.get(info.id)
                workloads[info.name] = {
                    "priority": info.priority.name,
                    "state": info.state.name,
                    "target_quality": round(info.quality, 4),
                    "quality": round(model.quality, 4) if model is not None else None,
                    "granted_bytes": info.granted_bytes,
                    "resident_bytes": model.resident_bytes if model is not None else None,
                    "full_bytes": info.full_bytes,
                }
            sample = {
                "t_s": self.now(),
                "device_bytes": state.total_bytes,
                "capacity_bytes": state.capacity_bytes,
                "external_bytes": state.external_bytes,
                "granted_bytes": state.granted_bytes,
                "resident_bytes": sum(w["resident_bytes"] or 0 for w in workloads.values()),
                "pressure": state.pressure.name,
                "workloads": workloads,
            }
            self.samples.append(sample)
        return sample

    def latest(self) -> dict:
        with self._lock:
            return self.samples[-1]


def _view(recorder: _Recorder):
    """The live table: the device line, then one row per workload with its last output."""
    from rich.table import Table

    sample = recorder.latest()
    title = (f"[bold]{recorder.phase}[/]\n" if recorder.phase else "") + (
        f"device {sample['device_bytes'] / _MIB:.0f} MiB · other processes {sample['external_bytes'] / _MIB:.0f} MiB · "
        f"granted {sample['granted_bytes'] / _MIB:.0f} MiB · pressure {sample['pressure']}")
    table = Table(title=title, title_justify="left", expand=False)
    for column, justify in (("workload", "left"), ("priority", "left"), ("target q", "right"),
                            ("in effect", "right"), ("resident MiB", "right"), ("granted MiB", "right"),
                            ("last output", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    for name, w in sample["workloads"].items():
        resident = "-" if w["resident_bytes"] is None else f"{w['resident_bytes'] / _MIB:.1f} / {w['full_bytes'] / _MIB:.1f}"
        in_effect = "-" if w["quality"] is None else f"{w['quality']:.3f}"
        table.add_row(name, w["priority"] + (f" ({w['state']})" if w["state"] != "ACTIVE" else ""),
                      f"{w['target_quality']:.3f}", in_effect, resident, f"{w['granted_bytes'] / _MIB:.1f}",
                      recorder.outputs.get(name, ""))
    return table


def _answer(model, tokenizer, new_tokens: int) -> str:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": _QUESTION}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def _digits(pipe, steps: int):
    generator = torch.Generator().manual_seed(0)
    return pipe(batch_size=4, generator=generator, num_inference_steps=steps, output_type="np").images


def _save_digits(images, path: Path) -> None:
    """The batch side by side, each 16x16 digit scaled 8x (nearest), on a grey gutter."""
    import numpy as np
    from PIL import Image

    scale, gap = 8, 6
    tiles = [np.kron(np.clip(img[..., 0], 0, 1), np.ones((scale, scale))) for img in images]
    height, width = tiles[0].shape
    canvas = np.full((height + 2 * gap, len(tiles) * (width + gap) + gap), 0.5)
    for index, tile in enumerate(tiles):
        left = gap + index * (width + gap)
        canvas[gap:gap + height, left:left + width] = tile
    buffer = io.BytesIO()
    Image.fromarray((canvas * 255).round().astype(np.uint8), mode="L").save(buffer, format="png")
    atomic_write(path, buffer.getvalue(), _FILE_MODE)


def _device_size(vram_gb: float | None, chat_full: int, chat_floor: int, image_full: int) -> int:
    activations = sum(_ACTIVATIONS.values())
    needed = chat_floor + image_full + activations
    if vram_gb is None:
        return int((chat_full + image_full + activations) / _FULL_SHARE)
    device = int(vram_gb * _GIB)
    if device < needed:
        raise InvalidRequestError(
            f"--vram-gb {vram_gb:g} is too small for this demo: SmolLM2 at its lowest quality, the digits model "
            f"and their working memory need {needed / _GIB:.3f} GiB. Pass --vram-gb "
            f"{math.ceil(needed / _GIB * 100) / 100:.2f} or more, or leave --vram-gb out")
    return device


def run_demo(vram_gb: float | None = None, quick: bool = False, out_dir: str | Path | None = None,
             live: bool | None = None) -> DemoResult:
    """Run the two-model scenario with a live view and write its pictures, trace and outputs.

    Args:
        vram_gb: size of the virtual device in GiB; default: both models at full quality fill
            85 % of it (so they give way only when "another process" takes memory).
        quick: fewer generated tokens and denoising steps (CI); same scenario and files.
        out_dir: where to write the files; default :func:`default_out_dir`. Created if missing.
        live: show the live table (default: when stdout is a terminal). Without it, a snapshot
            table is printed after each phase.

    Returns:
        A :class:`DemoResult` (the directory, the files, the run time).

    Raises:
        InvalidRequestError: ``vram_gb`` is not a positive finite number, or too small for the
            two models at their lowest quality (the message gives the smallest size that works);
            ``out_dir`` cannot be made.
        ModelNotAvailableError: a model package is missing (the message names the pip command).
        OptionalDependencyError: rich or matplotlib is missing (the ``demo`` extra).

    Limits: CPU only (a virtual device); the first run converts SmolLM2 (minutes, cached).
    """
    for module in ("rich", "matplotlib"):
        import_optional(module, "demo", "the demo's live view and pictures")
    from rich.console import Console
    from rich.live import Live

    from ..holo.convert import summarize
    from ..hooks import patch
    from .models import load_digits_ddpm, load_smollm2, perplexity, psnr, reference_text, smollm2_holo_dir

    started = time.monotonic()
    vram_gb = check_vram_gb(vram_gb)
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)
    live = console.is_terminal if live is None else live
    out = Path(out_dir) if out_dir is not None else default_out_dir()
    tokens, steps = (12, 10) if quick else (20, 25)

    holo_dir = smollm2_holo_dir(progress=True)
    holo_summary = summarize(holo_dir, qualities=())
    pipe = load_digits_ddpm()
    image_full = sum(p.nbytes for p in pipe.unet.parameters()) + sum(b.nbytes for b in pipe.unet.buffers())
    device_bytes = _device_size(vram_gb, holo_summary.full_bytes,
                                math.ceil(holo_summary.min_quality * holo_summary.full_bytes), image_full)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidRequestError(f"cannot make the output directory {out} ({exc.strerror or exc}): "
                                  "pass another --out DIR") from exc
    console.print("loading SmolLM2-135M-Instruct and the digits DDPM ...")
    llm, tokenizer = load_smollm2()
    reference_digits = _digits(pipe, steps)
    text = reference_text()
    reference_ppl = perplexity(llm, tokenizer, text, max_tokens=128, stride=128, window=128)
    tracker = GpuMemoryTracker("cpu", device_bytes)
    console.print(
        f"[bold]torch-arbiter demo[/]: SmolLM2-135M (chat) and a digits DDPM (image) share one virtual "
        f"{device_bytes / _MIB:.0f} MiB device.\nNo GPU here: the budget is enforced by weight residency "
        "(what each model keeps resident); on CUDA the pluggable allocator also enforces it on every allocation.\n"
        f"Files go to {out}/")

    chat_log: list[dict] = []
    digit_files: dict[str, Path] = {}
    image_scores: list[dict] = []

    with Arbiter(ArbiterConfig(vram_bytes=device_bytes, monitor_interval_s=0.05), tracker=tracker) as arbiter:
        chat = patch(llm, arbiter, workload=WorkloadType.LLM_INFERENCE, priority=Priority.HIGH, name="chat",
                     holo_dir=holo_dir, progress=False, activation_bytes=_ACTIVATIONS["chat"])
        image = patch(pipe, arbiter, workload=WorkloadType.IMAGE_GENERATION, priority=Priority.BACKGROUND,
                      name="image", activation_bytes=_ACTIVATIONS["image"], progress=False)
        recorder = _Recorder(arbiter).start()
        view = Live(get_renderable=lambda: _view(recorder), console=console, refresh_per_second=8,
                    transient=False) if live else contextlib.nullcontext()

        def run_chat(phase: str, with_perplexity: bool = True) -> None:
            before = chat.quality
            answer = _answer(llm, tokenizer, tokens)
            entry = {"phase": phase, "question": _QUESTION, "answer": answer,
                     "quality_start": round(before, 4), "quality_end": round(chat.quality, 4)}
            if with_perplexity:
                entry["perplexity"] = round(perplexity(llm, tokenizer, text, max_tokens=128, stride=128, window=128), 3)
            chat_log.append(entry)
            recorder.outputs["chat"] = answer.replace("\n", " ")

        def run_image(phase: str) -> None:
            quality = image.quality
            images = _digits(pipe, steps)
            score = psnr(images, reference_digits)
            label = f"q{quality:.2f}"
            if label not in digit_files:
                digit_files[label] = out / f"digits_{label}.png"
                _save_digits(images, digit_files[label])
            image_scores.append({"phase": phase, "quality": round(quality, 4), "psnr_db": score,
                                 "file": digit_files[label].name})
            verdict = "identical to full quality" if score == math.inf else f"PSNR {score:.1f} dB vs full quality"
            recorder.outputs["image"] = f"4 digits, {verdict}"

        def phase(title: str, chat_runs: bool = True, image_runs: bool = True) -> None:
            recorder.phase = title
            if chat_runs:
                run_chat(title)
            if image_runs and image.patched:
                run_image(title)
            recorder.sample()
            if not live:
                console.print(_view(recorder))

        with view:
            recorder.event("both models patched: the chat HIGH (user-facing), the image job BACKGROUND")
            phase("1. both fit at full quality: the chat (HIGH, user-facing) and the image job (BACKGROUND)")

            # The other process leaves the chat one step above its floor (every layer 4-bit but the
            # tied head) and the image job its floor; once the image job is CRITICAL the chat gives
            # up that step, and at its floor its answers change.
            squeeze = max(0, device_bytes - (chat.bytes_at(chat.curve[1][0]) + image.bytes_at(image.min_quality)
                                             + sum(_ACTIVATIONS.values())))
            with recorder.atomic():
                tracker.set_external_bytes(squeeze)
                arbiter.rebalance()
            recorder.event(f"another process takes {squeeze / device_bytes:.0%} of the device")
            phase(f"2. another process takes {squeeze / device_bytes:.0%} of the device: "
                  "the chat drops to 4-bit levels but its head, the image job to its floor")

            title = "3. the user clicks 'generate' while the chat answers: the image job is CRITICAL and climbs, the chat is BACKGROUND"
            recorder.phase = title
            worker = threading.Thread(target=run_chat, args=(title, False), daemon=True)
            worker.start()
            time.sleep(0.3)
            recorder.event("the user clicks 'generate': the image job CRITICAL, the chat BACKGROUND")
            arbiter.update_priority(image.allocation, Priority.CRITICAL)
            arbiter.update_priority(chat.allocation, Priority.BACKGROUND)
            worker.join()
            phase(title, chat_runs=False)

            with recorder.atomic():
                tracker.set_external_bytes(0)
                arbiter.rebalance()
            image.unpatch()
            recorder.event("the other process exits and the image job is done (unpatched)")
            phase("4. the other process exits and the image job is done: the chat climbs back to full quality",
                  image_runs=False)
            recorder.stop()
        chat.unpatch()
        stats = arbiter.stats()

    seconds = time.monotonic() - started
    result = DemoResult(out, seconds=seconds)
    result.files = _write_outputs(out, recorder, chat_log, image_scores, digit_files, reference_ppl, stats,
                                  device_bytes, quick, seconds)
    console.print(f"\nstats: {stats.grants} grants, {stats.releases} releases, {stats.rebalances} rebalances, "
                  f"{stats.quality_reductions} quality reductions, {stats.quality_increases} increases, "
                  f"{stats.preemptions} preemptions, {stats.failures} failures")
    console.print(f"done in {seconds:.0f} s; wrote {', '.join(_file_names(result.files))} to {out}/")
    return result


def _file_names(files: dict[str, Any]) -> list[str]:
    names = []
    for value in files.values():
        names.extend(p.name for p in (value if isinstance(value, list) else [value]))
    return names


def _write_outputs(out: Path, recorder: _Recorder, chat_log: list[dict], image_scores: list[dict],
                   digit_files: dict[str, Path], reference_ppl: float, stats, device_bytes: int, quick: bool,
                   seconds: float) -> dict[str, Any]:
    """Write trace.json, timeline.png, chat.md and summary.md; returns the files by role."""
    trace = {
        "units": {"t_s": "seconds since the scenario started", "*_bytes": "bytes",
                  "*quality": "share of the model's full-quality weight bytes resident, in [0, 1]"},
        "notes": ("device_bytes: the virtual device; capacity_bytes: what the arbiter may grant (device minus "
                  "other processes); granted_bytes: granted to the workloads (weights and activation reserve); "
                  "resident_bytes: weight bytes the models hold, measured from their tensors. target_quality is "
                  "what the arbiter granted, quality what the model runs at (applied at its next safe point)."),
        "quick": quick,
        "device_bytes": device_bytes,
        "events": recorder.events,
        "samples": recorder.samples,
    }
    files: dict[str, Any] = {"trace": out / "trace.json", "timeline": out / "timeline.png",
                             "chat": out / "chat.md", "summary": out / "summary.md",
                             "digits": sorted(digit_files.values())}
    atomic_write(files["trace"], json.dumps(trace, indent=1) + "\n", _FILE_MODE)
    _plot_timeline(trace, files["timeline"])
    atomic_write(files["chat"], _chat_markdown(chat_log, reference_ppl), _FILE_MODE)
    atomic_write(files["summary"], _summary_markdown(trace, chat_log, image_scores, stats, seconds, files), _FILE_MODE)
    return files


def _chat_markdown(chat_log: list[dict], reference_ppl: float) -> str:
    lines = ["# The chat at each phase", "",
             f"Question (greedy decoding): **{_QUESTION}**", "",
             f"Perplexity on the first 128 tokens of the GPL-3 text at full quality: {reference_ppl:.2f}.", ""]
    for entry in chat_log:
        quality = (f"quality {entry['quality_start']:.3f}" if entry["quality_start"] == entry["quality_end"]
                   else f"quality {entry['quality_start']:.3f} at the first token, {entry['quality_end']:.3f} at the last")
        lines += [f"## {entry['phase']}", "", f"*{quality}*"
                  + (f", perplexity {entry['perplexity']:.2f}" if "perplexity" in entry else ""), ""]
        lines += ["> " + line if line else ">" for line in entry["answer"].splitlines() or [""]]
        lines.append("")
    return "\n".join(lines)


def _summary_markdown(trace: dict, chat_log: list[dict], image_scores: list[dict], stats, seconds: float,
                      files: dict[str, Any]) -> str:
    samples = trace["samples"]
    peak_over = max(s["granted_bytes"] - s["capacity_bytes"] for s in samples)
    lines = [
        "# torch-arbiter demo", "",
        f"SmolLM2-135M-Instruct (chat) and a digits DDPM (image) shared one virtual "
        f"{trace['device_bytes'] / _MIB:.0f} MiB device for {seconds:.0f} s"
        + (" (`--quick`)" if trace["quick"] else "") + ". No GPU: the budget was enforced by weight residency.", "",
        "![timeline](timeline.png)", "",
        f"- [timeline.png](timeline.png): quality and resident bytes of each workload over time, the device, "
        f"the other process's bytes and each scenario event.",
        f"- [trace.json](trace.json): the same {len(samples)} samples and {len(trace['events'])} events, with units.",
        "- [chat.md](chat.md): the chat's answer at each phase, with the quality it was made at.",
    ]
    for path in files["digits"]:
        lines.append(f"- [{path.name}]({path.name}): the image batch at quality {path.stem.split('_q')[1]}.")
    lines += ["", "## What happened", ""]
    lines += [f"{n}. at {e['t_s']:.1f} s: {e['label']}" for n, e in enumerate(trace["events"], start=1)]
    lines += ["", "## Outputs", "", "| phase | chat quality | chat answer |", "| --- | --- | --- |"]
    for entry in chat_log:
        lines.append(f"| {entry['phase'].split(':')[0]} | {entry['quality_end']:.3f} | "
                     f"{entry['answer'].splitlines()[0] if entry['answer'] else ''} |")
    lines += ["", "| phase | image quality | PSNR vs full quality | file |", "| --- | --- | --- | --- |"]
    for score in image_scores:
        psnr_text = "identical" if score["psnr_db"] == math.inf else f"{score['psnr_db']:.1f} dB"
        lines.append(f"| {score['phase'].split(':')[0]} | {score['quality']:.3f} | {psnr_text} | "
                     f"![{score['file']}]({score['file']}) |")
    lines += ["", "## Counters", "",
              f"{stats.grants} grants, {stats.releases} releases, {stats.rebalances} rebalances, "
              f"{stats.quality_reductions} quality reductions, {stats.quality_increases} increases, "
              f"{stats.preemptions} preemptions, {stats.failures} failures.", "",
              "Granted bytes stayed within the capacity left by the other process in every sample." if peak_over <= 0
              else f"Granted bytes exceeded the capacity left by the other process by up to {peak_over} bytes.", ""]
    return "\n".join(lines)


def _plot_timeline(trace: dict, path: Path) -> None:
    """Quality (top) and bytes (bottom) of each workload over time, with the scenario's events."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = trace["samples"]
    times = [s["t_s"] for s in samples]
    names = list(dict.fromkeys(name for s in samples for name in s["workloads"]))
    colors = dict(zip(names, ("tab:blue", "tab:orange", "tab:green", "tab:purple")))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 7), sharex=True, height_ratios=(1, 1.3))

    def series(name: str, key: str, scale: float = 1.0):
        return [s["workloads"][name][key] / scale if name in s["workloads"] and s["workloads"][name][key] is not None
                else float("nan") for s in samples]

    for name in names:
        top.step(times, series(name, "quality"), where="post", color=colors[name], lw=2.2, label=f"{name}: in effect")
        top.step(times, series(name, "target_quality"), where="post", color=colors[name], lw=1, ls="--",
                 label=f"{name}: granted target")
    top.set_ylabel("quality\n(share of full weight bytes)")
    top.set_ylim(0, 1.05)
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    top.grid(alpha=0.3)

    mib = _MIB
    external = [s["external_bytes"] / mib for s in samples]
    device = [s["device_bytes"] / mib for s in samples]
    bottom.fill_between(times, 0, external, step="post", color="0.75", label="other process")
    stacked = list(external)
    for name in names:
        resident = [0.0 if math.isnan(v) else v for v in series(name, "resident_bytes", mib)]
        upper = [a + b for a, b in zip(stacked, resident)]
        full = max((s["workloads"][name]["full_bytes"] for s in samples if name in s["workloads"]), default=0)
        bottom.fill_between(times, stacked, upper, step="post", color=colors[name], alpha=0.6,
                            label=f"{name}: resident weights ({full / mib:.1f} MiB at full quality)")
        stacked = upper
    granted = [e + s["granted_bytes"] / mib for e, s in zip(external, samples)]
    bottom.step(times, granted, where="post", color="black", lw=1, ls="--", label="other process + granted")
    bottom.step(times, device, where="post", color="red", lw=1.5, label="device capacity")
    bottom.set_ylabel("MiB")
    bottom.set_xlabel("seconds")
    bottom.set_ylim(0, max(device) * 1.08)
    bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    bottom.grid(alpha=0.3)

    for number, event in enumerate(trace["events"], start=1):
        for axis in (top, bottom):
            axis.axvline(event["t_s"], color="0.3", lw=0.8, ls=":")
        top.annotate(str(number), (event["t_s"], 1.05), xytext=(2, 2), textcoords="offset points", fontsize=9,
                     fontweight="bold", annotation_clip=False)
    legend = "\n".join(f"{n}. {e['label']}" for n, e in enumerate(trace["events"], start=1))
    fig.suptitle("torch-arbiter demo: two models share one virtual device", fontsize=12, x=0.01, ha="left")
    fig.text(0.01, 0.005, legend, fontsize=7.5, va="bottom", ha="left")
    fig.tight_layout(rect=(0, 0.03 + 0.018 * len(trace["events"]), 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buffer.getvalue(), _FILE_MODE)
