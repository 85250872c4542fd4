"""Model-level quality: which level each tensor takes at model quality ``q``.

``q`` is the share of the model's full bytes (the original bytes of every tensor, embeddings and
head included) that may be resident. The planner spends that budget where the *measured* error
falls most per byte:

- every tensor's cost of a level is ``level_bytes(k)``; its error is a squared relative error
  recorded at encode time (level 0 counts as error 1): ``rel_error²`` (weight error), or, when
  calibration inputs were given, ``rel_error × out_rel_error``. Squared relative errors add up like
  the relative noise each layer injects, so layers of different sizes are comparable. The product
  is a measured choice: output error alone undervalued layers whose output is small next to the
  stream it joins (at <= 8.5 bits per weight it left SmolLM2's tied head and MiniLM's last
  down-projection at 4 bits: +1.29 % perplexity, cosine 0.99948), weight error alone spent the
  budget on MiniLM's fp32 embedding table (cosine 0.99848 at 6.4 of 8.5 bits used); the product
  measured -0.02 % and 0.99980 there, and the same as output error at <= 5 and <= 4.5 bits;
- where the level-1 fidelity also holds a ``model_error`` (the model's own output error with only
  this tensor at level 1, :mod:`torch_arbiter.holo.sensitivity`), every level's error of that
  tensor is scaled by ``model_error`` / its level-1 per-layer error: the per-layer errors say how
  the levels of one tensor compare, the model error how much that tensor matters;
- per tensor, only the levels on the lower convex hull of (bytes, error) are used, so each step
  has a falling gain per byte;
- all steps "level 0 -> lowest level" come first (a model can only run once every weight has a
  level; :func:`min_quality` is the quality that takes), then every other step in one global order
  of gain per byte (ties by name, for determinism);
- the plan at ``q`` is the longest *prefix* of that order that fits ``q × full bytes``.

Taking a prefix of one fixed order makes the plan monotone in ``q`` (a higher ``q`` never lowers a
tensor) and exact at ``q = 1`` (every tensor at its top level: those bytes are the full bytes).
The price: when the next step is large (an embedding's next level) the budget left is not filled
with later, smaller steps; the waste is at most the largest single step.
"""

from __future__ import annotations

import math
import numbers
from typing import Mapping, Protocol

from ..errors import InvalidRequestError

__all__ = ["plan_quality", "min_quality", "plan_bytes", "plan_order"]


class _Levelled(Protocol):
    num_levels: int
    full_bytes: int

    def level_bytes(self, k: int) -> int: ...

    def level_fidelity(self, k: int) -> dict: ...


def _layer_error(tensor: _Levelled, k: int) -> float:
    fidelity = tensor.level_fidelity(k)
    weight = float(fidelity["rel_error"])
    return weight * float(fidelity.get("out_rel_error", weight))


def _error(tensor: _Levelled, k: int) -> float:
    error = _layer_error(tensor, k)
    measured = tensor.level_fidelity(1).get("model_error") if k < tensor.num_levels else None
    if measured is None:
        return error
    lowest = _layer_error(tensor, 1)
    return error * float(measured) / lowest if lowest > 0 else float(measured)


def _hull_steps(name: str, tensor: _Levelled) -> list[tuple[float, str, int, int]]:
    """(gain per byte, name, level reached, extra bytes) of every hull step above level 1."""
    start = (tensor.level_bytes(1), _error(tensor, 1), 1)
    points = sorted((tensor.level_bytes(k), _error(tensor, k), k) for k in range(2, tensor.num_levels + 1))
    hull: list[tuple[int, float, int]] = [start]
    for point in points:
        if point[1] >= hull[-1][1] and point[2] != tensor.num_levels:
            continue  # costs more, measures no better: never worth taking
        while len(hull) >= 2:
            (b0, e0, _), (b1, e1, _) = hull[-2], hull[-1]
            # Drop the middle point when going straight from b0 to the new point gains more per byte.
            if (e0 - point[1]) * (b1 - b0) >= (e0 - e1) * (point[0] - b0):
                hull.pop()
            else:
                break
        hull.append(point)
    if hull[-1][2] != tensor.num_levels:  # the exact top must stay reachable
        hull.append((tensor.level_bytes(tensor.num_levels), 0.0, tensor.num_levels))
    steps = []
    for (b0, e0, _), (b1, e1, k1) in zip(hull, hull[1:]):
        extra = b1 - b0
        gain = (e0 - e1) / extra if extra > 0 else math.inf
        steps.append((gain, name, k1, extra))
    return steps


def plan_order(tensors: Mapping[str, _Levelled]) -> list[tuple[str, int, int]]:
    """The fixed order in which quality is bought: ``(name, level reached, extra bytes)`` steps.

    Args:
        tensors: name -> HoloTensor (or anything with ``num_levels``, ``level_bytes``,
            ``level_fidelity``).

    Returns:
        First the step of every tensor from level 0 to level 1 (largest error drop per byte first),
        then all higher hull steps, largest measured gain per byte first.
    """
    first = []
    later = []
    for name, tensor in tensors.items():
        size = tensor.level_bytes(1)
        gain = (1.0 - _error(tensor, 1)) / size if size > 0 else math.inf
        first.append((gain, name, 1, size))
        later.extend(_hull_steps(name, tensor))
    first.sort(key=lambda s: (-s[0], s[1]))
    later.sort(key=lambda s: (-s[0], s[1], s[2]))
    return [(name, level, extra) for _, name, level, extra in first + later]


def _check_quality(q: float) -> float:
    # Same rule as ManagedModel.set_quality: a real number, not a string or a bool.
    if isinstance(q, bool) or not isinstance(q, numbers.Real):
        raise InvalidRequestError(f"quality must be a number in [0, 1], got {q!r}")
    value = float(q)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise InvalidRequestError(f"quality must be in [0, 1], got {q!r}; clamp it before asking")
    return value


def plan_quality(tensors: Mapping[str, _Levelled], q: float,
                 order: list[tuple[str, int, int]] | None = None) -> dict[str, int]:
    """The level of every tensor at model quality ``q``.

    Args:
        tensors: name -> HoloTensor.
        q: model quality in [0, 1].
        order: ``plan_order(tensors)`` when the caller keeps it (a live model plans at every
            switch; sorting the steps again costs more than the rest of the switch).

    Returns:
        name -> level in ``0..num_levels``. The bytes fit ``q * sum(full_bytes)``; the plan is
        monotone in ``q``; at ``q = 1`` every tensor is at its top level; for
        ``q >= min_quality(tensors)`` no tensor is at level 0.

    Raises:
        InvalidRequestError: ``q`` outside [0, 1] or NaN.
    """
    q = _check_quality(q)
    full = sum(t.full_bytes for t in tensors.values())
    plan = {name: 0 for name in tensors}
    if q >= 1.0:
        return {name: t.num_levels for name, t in tensors.items()}
    budget = q * full
    spent = 0
    for name, level, extra in plan_order(tensors) if order is None else order:
        if spent + extra > budget:
            break
        spent += extra
        plan[name] = level
    return plan


def plan_bytes(tensors: Mapping[str, _Levelled], plan: Mapping[str, int]) -> int:
    """Resident bytes of a plan: ``sum(level_bytes(plan[name]))``."""
    return sum(tensors[name].level_bytes(level) for name, level in plan.items())


def min_quality(tensors: Mapping[str, _Levelled]) -> float:
    """The lowest quality at which every tensor has a level (so the model can run).

    Args:
        tensors: name -> HoloTensor.

    Returns:
        ``sum(level_bytes(1)) / sum(full_bytes)`` (0 for an empty mapping). ``plan_quality`` at
        this quality or above never returns level 0.
    """
    full = sum(t.full_bytes for t in tensors.values())
    if full == 0:
        return 0.0
    need = sum(t.level_bytes(1) for t in tensors.values())
    # Round up in float so that min_quality(t) * full >= need despite rounding.
    q = need / full
    while q * full < need:
        q = math.nextafter(q, 2.0)
    return min(q, 1.0)
