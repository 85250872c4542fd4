"""Calibration: the input rows each ``nn.Linear`` and ``nn.Conv2d`` sees while representative data runs.

:meth:`HoloTensor.encode` takes a layer's inputs as ``calibration=`` and then rounds level 1 and 2
with GPTQ error feedback, which lowers the layer's *output* error (``bench/bench_live_quality.py``
measures both ways). This module collects those inputs with forward hooks, once, before any layer
is swapped.

A conv is a matmul of its weight ``[out, in*kh*kw]`` with the patches of its input (what
``F.unfold`` makes), so its rows are patches: one per output position, taken straight from the
padded input at the positions the sample keeps, never the whole unfolded map (which for a 64x64
latent at 320 channels is 47 MB per call).

Rows are a uniform sample of every row the run produced (seeded reservoir sampling), not the first
ones: a pipeline's later denoising steps, the bottom of an image and the last sequence of a batch
are represented too. A run that produces at most ``max_rows`` rows for a layer keeps them all, in
order.

Limits: grouped and depthwise convs (``groups > 1``) are not calibrated (their weight is not one
matmul); they and embeddings are encoded round-to-nearest. At most ``max_rows`` rows per layer
are kept, in bfloat16 on the CPU, so memory is ``max_rows x width x 2`` bytes per layer (about
3 MB per 1536-wide linear or 3x3 conv of 170 channels at the default 1024 rows).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from ..errors import InvalidRequestError

__all__ = ["collect_layer_inputs", "collect_weight_inputs", "not_recorded", "DEFAULT_CALIBRATION_ROWS"]

#: Rows of inputs kept per layer by default.
DEFAULT_CALIBRATION_ROWS = 1024
_SEED = 0
_paused = threading.local()


@contextmanager
def not_recorded() -> Iterator[None]:
    """Forwards made inside this block (in this thread) are not recorded by :func:`collect_layer_inputs`.

    For a run whose first part only prepares inputs: a causal LM that generates its calibration
    text one token at a time makes, for every token, the same layer inputs its final forward over
    the whole text makes again; recorded twice, they would halve the distinct rows a sample keeps.
    """
    before = getattr(_paused, "active", False)
    _paused.active = True
    try:
        yield
    finally:
        _paused.active = before


def _recording() -> bool:
    """Whether forwards on this thread are recorded now (not inside :func:`not_recorded`)."""
    return not getattr(_paused, "active", False)


@torch.no_grad()
def collect_layer_inputs(root: nn.Module | Iterable[nn.Module], run: Callable[[], Any], *,
                         max_rows: int = DEFAULT_CALIBRATION_ROWS) -> dict[nn.Module, torch.Tensor]:
    """Input rows of every ``nn.Linear`` and ungrouped ``nn.Conv2d`` under ``root`` while ``run()`` executes.

    Args:
        root: the module tree (or several, e.g. a pipeline's components) to watch. It is not
            modified; the hooks are removed afterwards, also when ``run`` raises.
        run: a callable driving representative forwards through ``root`` (for an LLM: a few
            hundred tokens of text that is not the evaluation text).
        max_rows: rows kept per layer (a positive int): all of them when the run makes no more,
            else a uniform seeded sample of all it made.

    Returns:
        ``{module: float32 CPU tensor}`` for every such layer that ran: ``[m, in_features]`` for a
        linear, ``[m, in_channels*kh*kw]`` patches for a conv (the width of its weight read as
        ``[out, in*kh*kw]``). A module called several times (a tied head, a shared block, a
        denoising loop) gets rows of all calls.

    Raises:
        InvalidRequestError: ``max_rows`` is not a positive int, or ``run()`` reached no linear
            or conv layer of ``root`` (the calibration would be empty: pass a callable that runs it).
    """
    if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1:
        raise InvalidRequestError(f"max_rows must be a positive int, got {max_rows!r}")
    samples: dict[nn.Module, _Reservoir] = {}
    generator = torch.Generator().manual_seed(_SEED)

    def keep(module: nn.Module, args: tuple, _output: Any) -> None:
        if not args or not isinstance(args[0], torch.Tensor) or not _recording():
            return
        sample = samples.setdefault(module, _Reservoir(max_rows, generator))
        if isinstance(module, nn.Conv2d):
            x = args[0] if args[0].dim() == 4 else args[0].unsqueeze(0)
            height, width = _output_size(module, x)
            count = x.shape[0] * height * width
            slots, picked = sample.choose(count)
            sample.put(slots, _conv_patches(module, x, picked))
        else:
            flat = args[0].detach().reshape(-1, args[0].shape[-1])
            slots, picked = sample.choose(flat.shape[0])
            sample.put(slots, flat[picked.to(flat.device)])

    roots = [root] if isinstance(root, nn.Module) else list(root)
    layers = {id(m): m for r in roots for m in r.modules()
              if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)}
    handles = [m.register_forward_hook(keep) for m in layers.values()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    inputs = {module: sample.rows() for module, sample in samples.items() if sample.filled}
    if handles and not inputs:
        raise InvalidRequestError("the calibration run reached no nn.Linear or nn.Conv2d of the model; pass a "
                                  "callable that runs the model itself (e.g. lambda m: m(input_ids))")
    return inputs


def collect_weight_inputs(model: nn.Module, run: Callable[[], Any], *,
                          max_rows: int = DEFAULT_CALIBRATION_ROWS) -> dict[str, torch.Tensor]:
    """:func:`collect_layer_inputs` keyed by each layer's weight name in ``model.named_parameters()``.

    The names a checkpoint (or a state dict) uses for those weights, so the rows can go to
    ``HoloTensor.encode(calibration=...)`` tensor by tensor. A weight shared by several layers (a
    head tied to its embedding) appears once, under its first name.

    Args:
        model: the model (not modified).
        run: a callable driving representative forwards through ``model``.
        max_rows: rows kept per layer (see :func:`collect_layer_inputs`).

    Returns:
        ``{weight name: float32 [m, width] CPU tensor}``.

    Raises:
        InvalidRequestError: as :func:`collect_layer_inputs`.
    """
    names = {id(param): name for name, param in model.named_parameters()}
    inputs = collect_layer_inputs(model, run, max_rows=max_rows)
    return {names[id(module.weight)]: rows for module, rows in inputs.items()}


class _Reservoir:
    """A uniform sample of at most ``size`` rows from a stream that arrives in batches (algorithm R)."""

    def __init__(self, size: int, generator: torch.Generator):
        self.size, self.generator, self.seen = size, generator, 0
        self.buffer: torch.Tensor | None = None
        self.filled = 0

    def choose(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(slots, picked)``: the buffer slot each kept row of the next ``count`` goes to, and its index.

        Row ``t`` of the stream (0-based) takes a free slot while there is one, else replaces slot
        ``j`` drawn uniformly from ``0..t`` when ``j < size``. Of two rows of one batch aimed at the
        same slot the later one wins, as it would one row at a time.
        """
        index = torch.arange(count, dtype=torch.long)
        position = index + self.seen
        slot = position.clone()
        full = position >= self.size
        if bool(full.any()):
            draws = torch.rand(int(full.sum()), generator=self.generator, dtype=torch.float64)
            slot[full] = (draws * (position[full] + 1).double()).long()
        self.seen += count
        kept = slot < self.size
        slot, index = slot[kept], index[kept]
        # The last row aimed at each slot.
        last = torch.zeros(min(self.size, self.seen), dtype=torch.long).scatter_reduce(
            0, slot, index, "amax", include_self=False)
        winner = last[slot] == index
        return slot[winner], index[winner]

    def put(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        if not len(slots):
            return
        rows = rows.detach().to("cpu", torch.bfloat16)
        needed = int(slots.max()) + 1
        if self.buffer is None or needed > len(self.buffer):  # grows as rows come: max_rows may be huge
            grown = torch.empty(min(self.size, max(needed, 2 * self.filled)), rows.shape[-1], dtype=torch.bfloat16)
            if self.buffer is not None:
                grown[: self.filled] = self.buffer[: self.filled]
            self.buffer = grown
        self.buffer[slots] = rows
        self.filled = max(self.filled, needed)

    def rows(self) -> torch.Tensor:
        return self.buffer[: self.filled].float()


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` zero padding of ``conv``'s input, ``"same"`` and ``"valid"`` included."""
    if conv.padding == "valid":
        return 0, 0, 0, 0
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return total[0] // 2, total[0] - total[0] // 2, total[1] // 2, total[1] - total[1] // 2
    return conv.padding[0], conv.padding[0], conv.padding[1], conv.padding[1]


def _output_size(conv: nn.Conv2d, x: torch.Tensor) -> tuple[int, int]:
    """``(height, width)`` of ``conv``'s output for input ``x``."""
    top, bottom, left, right = _conv_padding(conv)
    height, width = (max(0, (size + pad - d * (k - 1) - 1) // s + 1) for size, pad, k, s, d in zip(
        x.shape[-2:], (top + bottom, left + right), conv.kernel_size, conv.stride, conv.dilation))
    return height, width


def _conv_patches(conv: nn.Conv2d, x: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """The input patches ``[len(picked), in*kh*kw]`` at flat output positions ``picked`` (batch-major).

    ``patches @ conv.weight.reshape(out, -1).T + bias`` is the conv's output at those positions;
    the columns are ordered as the weight's ``(in, kh, kw)``, as ``F.unfold`` orders them.
    """
    top, bottom, left, right = _conv_padding(conv)
    padded = torch.nn.functional.pad(x.detach(), (left, right, top, bottom))
    height, width = _output_size(conv, x)
    per_image = height * width
    picked = picked.to(x.device)
    image, position = picked // per_image, picked % per_image
    ys = (position // width)[:, None] * conv.stride[0] + torch.arange(conv.kernel_size[0], device=x.device) * conv.dilation[0]
    xs = (position % width)[:, None] * conv.stride[1] + torch.arange(conv.kernel_size[1], device=x.device) * conv.dilation[1]
    # Advanced indices around a slice put their dims first: [n, kh, kw, in].
    patches = padded[image[:, None, None], :, ys[:, :, None], xs[:, None, :]]
    return patches.permute(0, 3, 1, 2).reshape(len(picked), -1)
