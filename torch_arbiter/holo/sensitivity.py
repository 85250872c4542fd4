"""Sensitivity: how much each weight's lowest level moves the model's own output.

Why: the planner (:mod:`torch_arbiter.holo.plan`) compares the levels of different tensors by
squared relative errors measured *per layer* at encode time (weight error x the layer's output
error on its calibration inputs). A layer's output error cannot say what the rest of the network
does with it: some layers' errors are amplified on the way to the output, others washed out. So
with calibration inputs from a model's own run (self-calibration, or the user's), that run's
top-level calls are recorded and replayed with one weight at a time at its lowest level; the
relative squared error of the outputs is recorded as that level's ``model_error``, and the planner
scales every level of the weight by how much larger or smaller it is than the per-layer error.

Measured on all-MiniLM-L6-v2 planned at <= 4.5 bits per weight, judged on three texts none of the
inputs came from (Python docstrings, two Perl manuals; mean cosine to the full model): planned by
the per-layer errors of its self-made random tokens 0.9708 / 0.9678 / 0.9695, by the model errors
on the same tokens 0.9719 / 0.9702 / 0.9717 (``docs/codec.md``).

Limits: one replay of the recorded calls per encoded weight, so the calls are cut to
:data:`SENSITIVITY_CALLS` calls of at most :data:`SENSITIVITY_ITEMS` batch items each; a call is
recorded only when its arguments are tensors, numbers, strings or containers of them (a call
given a key-value cache object is skipped: replaying it would change it). A weight the recorded
calls never reach measures 0 and is never raised above its lowest level by the planner. It
measures what the recorded calls return, so ``patch()`` uses it for transformers models only: a
pipeline's image is the end of a whole denoising trajectory, and one UNet call's error misranked
the digits DDPM's weights (see ``_measure_sensitivity`` in :mod:`torch_arbiter.hooks.managed`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from .calibrate import _recording
from .codec import HoloTensor

__all__ = ["SENSITIVITY_CALLS", "SENSITIVITY_ITEMS", "RecordedCalls", "record_calls", "record_model_errors"]

#: Top-level calls kept for the replay (a denoising loop makes one per step).
SENSITIVITY_CALLS = 8
#: Batch items kept per recorded call (the replay runs once per encoded weight).
SENSITIVITY_ITEMS = 2

_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device)


class RecordedCalls:
    """The top-level calls :func:`record_calls` kept: ``(module, args, kwargs)``, batch cut."""

    def __init__(self) -> None:
        self.calls: list[tuple[nn.Module, tuple, dict]] = []

    def outputs(self) -> list[list[torch.Tensor]]:
        """The output tensors of every recorded call, replayed now (fp32 copies)."""
        with torch.no_grad():
            return [[t.detach().float().clone() for t in _tensors(_values(module(*args, **kwargs)))]
                    for module, args, kwargs in self.calls]

    def error_against(self, reference: list[list[torch.Tensor]]) -> float:
        """The relative squared error of a replay now against ``reference`` (from :meth:`outputs`).

        Each output (``logits``; ``last_hidden_state`` and ``pooler_output``; ``sample``) counts
        alike: ``Σ‖out - ref‖² / Σ‖ref‖²`` over the calls, averaged over the outputs.
        """
        outputs = self.outputs()
        errors = []
        for position in range(min(len(ref) for ref in reference)):
            pairs = [(out[position], ref[position]) for out, ref in zip(outputs, reference)]
            total = sum(float(ref.square().sum()) for _, ref in pairs) or 1.0
            errors.append(sum(float((out - ref).square().sum()) for out, ref in pairs) / total)
        return sum(errors) / len(errors)


@contextmanager
def record_calls(modules: Iterable[nn.Module], *, max_calls: int = SENSITIVITY_CALLS,
                 max_items: int = SENSITIVITY_ITEMS) -> Iterator[RecordedCalls]:
    """Record the top-level forward calls of ``modules`` made inside the block.

    Calls inside :func:`~torch_arbiter.holo.calibrate.not_recorded` are skipped, as are calls
    with arguments that are not plain data (see the module limits). The arguments are cloned and
    cut to the first ``max_items`` batch items (every tensor whose first dimension is the batch
    of the call's first tensor); the hooks are removed on exit.

    Args:
        modules: the modules whose calls to keep (a pipeline's components, or a model).
        max_calls: calls kept (the first ones).
        max_items: batch items kept per call.

    Yields:
        The :class:`RecordedCalls`, filled as the block runs.
    """
    recorded = RecordedCalls()

    def keep(module: nn.Module, args: tuple, kwargs: dict, _output: Any) -> None:
        if (len(recorded.calls) >= max_calls or not _recording() or not _plain((args, kwargs))
                or next(_tensors(_values(_output)), None) is None):
            return
        first = next(_tensors((args, kwargs)), None)
        if first is None or first.dim() == 0:
            return
        batch = first.shape[0]
        recorded.calls.append((module, _cut(args, batch, max_items), _cut(kwargs, batch, max_items)))

    handles = [module.register_forward_hook(keep, with_kwargs=True) for module in modules]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def record_model_errors(recorded: RecordedCalls, weights: Mapping[HoloTensor, Callable[[int], None]],
                        progress: Callable[[], None] | None = None) -> None:
    """Record each weight's ``model_error`` at its lowest level (into its level-1 fidelity).

    Args:
        recorded: the calls to replay; every weight must be at its exact level when this starts.
        weights: HoloTensor -> a setter that puts that weight at a level (its top level restores
            it bit for bit).
        progress: called once per weight measured.

    The setters are left at the top level, also when a replay raises.
    """
    if not recorded.calls:
        return
    reference = recorded.outputs()
    for holo, set_level in weights.items():
        try:
            set_level(1)
            error = recorded.error_against(reference)
        finally:
            set_level(holo.num_levels)
        holo.meta["levels"][0]["fidelity"]["model_error"] = error
        if progress is not None:
            progress()


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _plain(value: Any) -> bool:
    if isinstance(value, (torch.Tensor, *_PLAIN)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_plain(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and _plain(item) for key, item in value.items())
    return False


def _cut(value: Any, batch: int, items: int) -> Any:
    if isinstance(value, torch.Tensor):
        part = value[:items] if value.dim() and value.shape[0] == batch else value
        return part.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_cut(item, batch, items) for item in value)
    if isinstance(value, dict):
        return {key: _cut(item, batch, items) for key, item in value.items()}
    return value


def _values(output: Any) -> Any:
    # transformers' ModelOutput and diffusers' BaseOutput are dicts of their non-None fields.
    return tuple(output.values()) if isinstance(output, dict) else output


