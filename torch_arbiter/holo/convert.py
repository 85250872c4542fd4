"""Convert a model on disk into a holo checkpoint, and summarise a checkpoint.

Sources :func:`convert` reads (nothing is ever written into the source):

- a transformers model directory (``config.json`` + ``*.safetensors``);
- the same with ``gguf_file=``: transformers dequantises the GGUF file (needs ``gguf``), the
  tensors get the Hugging Face names, and ``config.json`` is written without the GGUF
  quantization config so the checkpoint directory loads as a plain model;
- a diffusers pipeline directory (``model_index.json`` + one folder per component): tensor names
  are prefixed with the component folder (``unet/conv_in.weight``);
- a single ``.safetensors`` file.

Small non-weight files (configs, tokenizers, scheduler settings) are copied next to the index with
their folder structure, so a converted transformers or diffusers directory keeps what a loader
needs besides the weights. Tensors that share storage (tied embeddings and head) are stored once;
the index metadata maps every alias to the stored name (``"tied"``).

Limits: every tensor of a source is loaded while it is encoded (one at a time for safetensors
sources, the whole model for GGUF); ``.bin`` (pickle) weights are refused, never unpickled.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import safe_open

from .._fileio import atomic_write
from ..errors import FormatError, InvalidRequestError
from .calibrate import DEFAULT_CALIBRATION_ROWS, collect_weight_inputs
from .codec import HoloTensor
from .format import INDEX_NAME, HoloCheckpoint, save_holo
from .plan import min_quality, plan_bytes, plan_quality

__all__ = ["convert", "summarize", "format_summary", "ConversionSummary", "SummaryRow"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5", ".onnx")
_COPY_LIMIT = 64 << 20  # non-weight files larger than this are not copied (say so, do not guess)


@dataclass(frozen=True)
class SummaryRow:
    """One row of a checkpoint summary: a uniform level or a model quality."""

    label: str
    bits_per_weight: float
    resident_bytes: int
    rel_error: float
    levels: dict[str, int] = field(default_factory=dict)


@dataclass
class ConversionSummary:
    """What a checkpoint holds: totals and one row per uniform level and per quality."""

    path: str
    tensors: int
    encoded: int
    with_rank: int
    parameters: int
    full_bytes: int
    min_quality: float
    rows: list[SummaryRow]


def _iter_safetensors(path: Path, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                yield prefix + key, handle.get_tensor(key)
    except (OSError, ValueError, RuntimeError) as exc:
        if isinstance(exc, FormatError):
            raise
        raise FormatError(f"{path} is not a readable safetensors file ({exc}); check the source") from None


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files and any(any(folder.glob(pattern)) for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt")):
        raise InvalidRequestError(
            f"{folder} holds only pickle weights (.bin/.pt); torch_arbiter never unpickles. Re-save the "
            "model with safetensors (model.save_pretrained(dir, safe_serialization=True)) first")
    return files


def _source_tensors(src: Path, gguf_file: str | None) -> tuple[Callable[[], Iterator], int, dict]:
    """(tensor iterator factory, tensor count, metadata) of a source."""
    if gguf_file is not None:
        return _gguf_source(src, gguf_file)
    if src.is_file():
        if src.suffix != ".safetensors":
            raise InvalidRequestError(f"{src} is not a .safetensors file; pass a model directory, a "
                                      "safetensors file, or a GGUF file with --gguf-file")
        return (lambda: _iter_safetensors(src)), _count([src]), {"kind": "safetensors"}
    if not src.is_dir():
        raise InvalidRequestError(f"source {src} does not exist")
    if (src / "model_index.json").is_file():
        components = [d for d in sorted(src.iterdir()) if d.is_dir() and _weight_files(d)]
        if not components:
            raise InvalidRequestError(f"diffusers pipeline {src} has no component with safetensors weights")
        files = [(f, f"{d.name}/") for d in components for f in _weight_files(d)]
        return ((lambda: (item for f, p in files for item in _iter_safetensors(f, p))),
                _count([f for f, _ in files]), {"kind": "diffusers", "components": [d.name for d in components]})
    files = _weight_files(src)
    if not files:
        ggufs = sorted(p.name for p in src.glob("*.gguf"))
        hint = f"; for GGUF pass --gguf-file {ggufs[0]}" if ggufs else ""
        raise InvalidRequestError(f"{src} holds no .safetensors weights{hint}")
    return (lambda: (item for f in files for item in _iter_safetensors(f))), _count(files), {"kind": "transformers"}


def _count(files: Iterable[Path]) -> int:
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            total += len(list(handle.keys()))
    return total


def _gguf_source(src: Path, gguf_file: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = src if src.is_dir() else src.parent
    name = gguf_file if src.is_dir() else src.name
    if not (folder / name).is_file():
        raise InvalidRequestError(f"GGUF file {folder / name} does not exist")
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name)
    config = AutoConfig.from_pretrained(str(folder), gguf_file=name).to_dict()
    config.pop("quantization_config", None)
    state = model.state_dict()
    return (lambda: iter(state.items())), len(state), {"kind": "gguf", "gguf_file": name, "config": config,
                                                        "gguf_path": str(folder / name)}


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, gguf_file: str | None = None,
            group_size: int | str = "auto", rank: int | str = "auto", overwrite: bool = False,
            progress: bool = True, calibration_text: str | os.PathLike | None = None,
            calibration_tokens: int = DEFAULT_CALIBRATION_ROWS) -> ConversionSummary:
    """Encode every tensor of a model on disk into a holo checkpoint at ``dst`` (atomic).

    Args:
        src: a transformers model dir, a diffusers pipeline dir, a ``.safetensors`` file, or the
            dir of a GGUF file (with ``gguf_file``).
        dst: destination directory (must not exist unless ``overwrite``).
        gguf_file: the GGUF file name inside ``src``.
        group_size: passed to :meth:`HoloTensor.encode`.
        rank: passed to :meth:`HoloTensor.encode`.
        overwrite: replace an existing ``dst``.
        progress: show a tqdm bar on stderr.
        calibration_text: a text file (not your evaluation text) for a transformers or GGUF
            source: the model is loaded with transformers, runs the first ``calibration_tokens``
            tokens of it once, and every ``nn.Linear`` and ``nn.Conv2d`` weight is encoded with GPTQ rounding on
            its own inputs (lower error at the same bytes; a slower encode).
        calibration_tokens: how many tokens of ``calibration_text`` to run (capped at the
            model's context length).

    Returns:
        The :class:`ConversionSummary` of the written checkpoint.

    Raises:
        InvalidRequestError: missing source, pickle-only weights, existing destination, or a
            calibration text for a source that is not a transformers model.
        FormatError: an unreadable source file.
    """
    from tqdm.auto import tqdm

    source, dest = Path(src), Path(dst)
    if dest.exists() and not overwrite:
        raise InvalidRequestError(f"{dest} already exists; choose another destination or pass --overwrite")
    if dest.resolve() == source.resolve() or source.resolve() in dest.resolve().parents:
        raise InvalidRequestError(f"destination {dest} is inside the source {source}; write it elsewhere")
    factory, count, metadata = _source_tensors(source, gguf_file)
    calibration: dict[str, torch.Tensor] = {}
    if calibration_text is not None:
        if metadata["kind"] not in ("transformers", "gguf"):
            raise InvalidRequestError(f"calibration needs a transformers model dir or a GGUF file; {source} is a "
                                      f"{metadata['kind']} source: convert it without --calibration-text")
        calibration = _calibration_inputs(source, gguf_file, Path(calibration_text), calibration_tokens)
        metadata["calibration"] = {"text": Path(calibration_text).name, "tokens": calibration_tokens}
    encoded: dict[str, HoloTensor] = {}
    tied: dict[str, str] = {}
    # Only an in-memory state dict (GGUF) can hold tied tensors; safetensors files cannot.
    seen: dict[tuple, str] = {}
    find_ties = metadata["kind"] == "gguf"
    for name, tensor in tqdm(factory(), total=count, desc=f"encoding {source.name}", unit="tensor",
                             disable=not progress):
        if find_ties and tensor.numel():
            key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
            if key in seen:
                tied[name] = seen[key]
                continue
            seen[key] = name
        encoded[name] = HoloTensor.encode(tensor, group_size=group_size, rank=rank,
                                          calibration=calibration.get(name))
    metadata = dict(metadata, source=str(source.resolve()), tied=tied, group_size=group_size, rank=rank)
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_holo(dest, encoded, metadata, overwrite=overwrite)
    _copy_side_files(source, dest, metadata)
    return summarize(dest)


def _calibration_inputs(source: Path, gguf_file: str | None, text: Path, tokens: int) -> dict[str, torch.Tensor]:
    """Each linear weight's inputs (by state-dict name) while the model runs ``tokens`` tokens of ``text``."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if not text.is_file():
        raise InvalidRequestError(f"calibration text {text} does not exist; pass a text file")
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise InvalidRequestError(f"calibration_tokens must be a positive int, got {tokens!r}")
    folder = source if source.is_dir() else source.parent
    options = {"gguf_file": gguf_file} if gguf_file is not None else {}
    # The architecture the checkpoint was saved as: an encoder (BERT) loaded as a causal LM would
    # grow a freshly initialised head whose inputs mean nothing.
    architectures = getattr(AutoConfig.from_pretrained(str(folder), **options), "architectures", None) or []
    causal = gguf_file is not None or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(str(folder), **options).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), **options)
    limit = min(tokens, getattr(model.config, "max_position_embeddings", tokens) or tokens)
    ids = tokenizer(text.read_text(errors="replace"), return_tensors="pt").input_ids[:, :limit]
    inputs = collect_weight_inputs(model, lambda: model(input_ids=ids), max_rows=limit)
    prefix = getattr(model, "base_model_prefix", "")
    calibration = {}
    for name, rows in inputs.items():
        calibration[name] = rows
        if prefix:  # checkpoints name weights with or without the base model's prefix
            calibration.setdefault(name.removeprefix(prefix + "."), rows)
            calibration.setdefault(f"{prefix}.{name}", rows)
    return calibration


def _copy_side_files(source: Path, dest: Path, metadata: dict) -> None:
    """Copy configs/tokenizers next to the index (atomic per file); write the GGUF model's config."""
    import json

    if "config" in metadata:
        atomic_write(dest / "config.json", json.dumps(metadata["config"], indent=1).encode())
    if "gguf_path" in metadata:  # the tokenizer lives inside the GGUF file: write it out beside
        from transformers import AutoTokenizer

        gguf = Path(metadata["gguf_path"])
        with tempfile.TemporaryDirectory(dir=dest.parent) as staging:
            AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(staging)
            for path in Path(staging).iterdir():
                if path.is_file():
                    atomic_write(dest / path.name, path.read_bytes())
    if source.is_dir() and metadata["kind"] != "gguf":  # a GGUF's folder is not a model dir
        _copy_model_dir_files(source, dest)
    _write_side_file_list(dest)


def _write_side_file_list(dest: Path) -> None:
    """List the side files (path -> sha256) so a reader over HTTP knows what to fetch and check."""
    import hashlib
    import json

    from ..cache.sources import SIDE_FILES_NAME

    listed = {}
    for path in sorted(dest.rglob("*")):
        relative = path.relative_to(dest).as_posix()
        if path.is_file() and relative != INDEX_NAME and relative != SIDE_FILES_NAME and not (
                path.parent == dest and path.name.startswith("fragments-")):
            listed[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    atomic_write(dest / SIDE_FILES_NAME, json.dumps(listed, indent=1).encode())


def _copy_model_dir_files(source: Path, dest: Path) -> None:
    """Copy the configs, tokenizers and other small non-weight files of a model directory."""
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if (not path.is_file() or path.suffix in _WEIGHT_SUFFIXES or path.name == INDEX_NAME
                or path.stat().st_size > _COPY_LIMIT or any(p.startswith(".") for p in relative.parts)):
            continue
        target = dest / relative
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, path.read_bytes())


def summarize(path: str | os.PathLike, qualities: Iterable[float] = (0.25, 0.5, 0.75, 1.0)) -> ConversionSummary:
    """Summarise a holo checkpoint from its index alone (no fragment is read).

    Args:
        path: the checkpoint directory.
        qualities: model qualities to plan and report, besides the minimum runnable one.

    Returns:
        Totals, one row per uniform level (``int4``/``int8``/``exact`` everywhere it exists) and
        one row per quality: bits per weight = resident bytes x 8 / parameters (embeddings, head
        and plain tensors included), and the parameter-weighted RMS of the recorded relative errors.
    """
    checkpoint = HoloCheckpoint.open(path)
    holos: dict[str, HoloTensor] = {}
    plain_bytes = plain_params = 0
    for name in checkpoint.tensor_names():
        meta = checkpoint.tensor_meta(name)
        if meta.get("holo", False):
            holos[name] = HoloTensor.from_parts({k: v for k, v in meta.items() if k != "holo"}, {})
        else:
            plain_bytes += meta["full_bytes"]
            plain_params += math.prod(meta["shape"])
    params = plain_params + sum(math.prod(t.shape) for t in holos.values())
    full = plain_bytes + sum(t.full_bytes for t in holos.values())

    def row(label: str, plan: dict[str, int]) -> SummaryRow:
        resident = plain_bytes + plan_bytes(holos, plan)
        weighted = sum(math.prod(holos[n].shape) * holos[n].level_fidelity(k)["rel_error"] ** 2
                       for n, k in plan.items())
        counts: dict[str, int] = {}
        for n, k in plan.items():
            label_k = holos[n].level_fidelity(k)["label"]
            counts[label_k] = counts.get(label_k, 0) + 1
        return SummaryRow(label, resident * 8 / max(1, params), resident,
                          math.sqrt(weighted / max(1, params)), counts)

    rows = []
    for label, pick in (("int4", 1), ("int8", 2)):
        if any(t.num_levels > pick for t in holos.values()):
            rows.append(row(f"all {label}", {n: min(pick, t.num_levels) for n, t in holos.items()}))
    rows.append(row("exact", {n: t.num_levels for n, t in holos.items()}))
    floor = min_quality(holos)
    for q in sorted({floor, *qualities}):
        if q >= floor:
            rows.append(row(f"q={q:.3f}", plan_quality(holos, q)))
    return ConversionSummary(str(path), len(holos) + (len(checkpoint.tensor_names()) - len(holos)),
                             sum(1 for t in holos.values() if t.num_levels > 1),
                             sum(1 for t in holos.values() if t.rank), params, full, floor, rows)


def format_summary(summary: ConversionSummary) -> str:
    """The summary as a fixed-width text table (what ``convert`` and ``inspect`` print)."""
    lines = [
        f"{summary.path}: {summary.tensors} tensors ({summary.encoded} encoded, {summary.with_rank} with a "
        f"rank branch), {summary.parameters:,} parameters, full {summary.full_bytes / 2**20:.1f} MiB, "
        f"runs from q={summary.min_quality:.3f}",
        f"{'level/quality':<14} {'bits/weight':>11} {'MiB':>9} {'rms rel err':>11}  levels",
    ]
    for r in summary.rows:
        levels = ", ".join(f"{k}:{v}" for k, v in sorted(r.levels.items()))
        lines.append(f"{r.label:<14} {r.bits_per_weight:>11.3f} {r.resident_bytes / 2**20:>9.2f} "
                     f"{r.rel_error:>11.2e}  {levels}")
    return "\n".join(lines)

