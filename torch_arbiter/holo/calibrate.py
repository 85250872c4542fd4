"""Calibration: the input rows each ``nn.Linear`` sees while representative data runs through a model.

:meth:`HoloTensor.encode` takes a layer's inputs as ``calibration=`` and then rounds level 1 and 2
with GPTQ error feedback, which lowers the layer's *output* error (``bench/bench_live_quality.py``
measures both ways). This module collects those inputs with forward hooks, once, before any layer
is swapped.

Limits: only ``nn.Linear`` layers are calibrated (a conv's inputs would need unfolding; convs are
encoded round-to-nearest). At most ``max_rows`` rows per layer are kept, in bfloat16 on the CPU,
so memory is ``max_rows x in_features x 2`` bytes per linear (about 3 MB per 1536-wide layer at
the default 1024 rows).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..errors import InvalidRequestError

__all__ = ["collect_linear_inputs", "collect_weight_inputs", "DEFAULT_CALIBRATION_ROWS"]

#: Rows of inputs kept per linear layer by default.
DEFAULT_CALIBRATION_ROWS = 1024


@torch.no_grad()
def collect_linear_inputs(root: nn.Module | Iterable[nn.Module], run: Callable[[], Any], *,
                          max_rows: int = DEFAULT_CALIBRATION_ROWS) -> dict[nn.Module, torch.Tensor]:
    """Input rows ``[m, in_features]`` of every ``nn.Linear`` under ``root`` while ``run()`` executes.

    Args:
        root: the module tree (or several, e.g. a pipeline's components) to watch. It is not
            modified; the hooks are removed afterwards, also when ``run`` raises.
        run: a callable driving representative forwards through ``root`` (for an LLM: a few
            hundred tokens of text that is not the evaluation text).
        max_rows: the first rows kept per layer (a positive int).

    Returns:
        ``{linear module: float32 [m, in_features] CPU tensor}`` for every linear that ran; a
        module called several times (a tied head, a shared block) gets the rows of all calls.

    Raises:
        InvalidRequestError: ``max_rows`` is not a positive int, or ``run()`` reached no linear
            layer of ``root`` (the calibration would be empty: pass a callable that runs it).
    """
    if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1:
        raise InvalidRequestError(f"max_rows must be a positive int, got {max_rows!r}")
    rows: dict[nn.Module, list[torch.Tensor]] = {}
    counts: dict[nn.Module, int] = {}

    def keep(module: nn.Module, args: tuple, _output: Any) -> None:
        room = max_rows - counts.get(module, 0)
        if room <= 0 or not args or not isinstance(args[0], torch.Tensor):
            return
        flat = args[0].detach().reshape(-1, args[0].shape[-1])[:room]
        rows.setdefault(module, []).append(flat.to("cpu", torch.bfloat16))
        counts[module] = counts.get(module, 0) + flat.shape[0]

    roots = [root] if isinstance(root, nn.Module) else list(root)
    linears = {id(m): m for r in roots for m in r.modules() if isinstance(m, nn.Linear)}
    handles = [m.register_forward_hook(keep) for m in linears.values()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    if handles and not rows:
        raise InvalidRequestError("the calibration run reached no nn.Linear of the model; pass a callable "
                                  "that runs the model itself (e.g. lambda m: m(input_ids))")
    return {module: torch.cat(parts).float() for module, parts in rows.items()}


def collect_weight_inputs(model: nn.Module, run: Callable[[], Any], *,
                          max_rows: int = DEFAULT_CALIBRATION_ROWS) -> dict[str, torch.Tensor]:
    """:func:`collect_linear_inputs` keyed by each linear's weight name in ``model.named_parameters()``.

    The names a checkpoint (or a state dict) uses for those weights, so the rows can go to
    ``HoloTensor.encode(calibration=...)`` tensor by tensor. A weight shared by several linears (a
    head tied to its embedding) appears once, under its first name.

    Args:
        model: the model (not modified).
        run: a callable driving representative forwards through ``model``.
        max_rows: the first rows kept per layer.

    Returns:
        ``{weight name: float32 [m, in_features] CPU tensor}``.

    Raises:
        InvalidRequestError: as :func:`collect_linear_inputs`.
    """
    names = {id(param): name for name, param in model.named_parameters()}
    inputs = collect_linear_inputs(model, run, max_rows=max_rows)
    return {names[id(module.weight)]: rows for module, rows in inputs.items()}
