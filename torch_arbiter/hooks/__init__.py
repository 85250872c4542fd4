"""Hooks that make a loaded model's quality live: ``patch()``, ``ManagedModel`` and the glue.

One file per technique, in the style of ``diffusers.hooks``: each has a named hook constant and
``apply_*`` / ``remove_*`` entry points, and everything it installs can be removed again.

- :mod:`.holo_swap`: swap ``nn.Linear`` / ``nn.Conv2d`` for Holo modules (and back, bit for bit);
- :mod:`.safe_point`: apply a new quality only between forward calls of the top modules;
- :mod:`.managed`: :func:`patch` and :class:`ManagedModel` (planning, arbiter registration);
- :mod:`.self_calibration`: the inputs a model makes for itself so ``patch(model)`` calibrates
  with no data (generated tokens, random token ids, a short denoising run);
- :mod:`.transformers_quantizer`: ``HoloTensorConfig`` for ``from_pretrained(quantization_config=...)``
  and ``from_holo_pretrained`` (imported on first use: it imports transformers).
"""

from .holo_swap import HOLO_SWAP_HOOK, SwappedLayer, apply_holo_swap, find_swappable, remove_holo_swap
from .managed import ManagedModel, managed_model_of, managed_models, patch
from .safe_point import SAFE_POINT_HOOK, SafePointHandle, SafePointSwitch, apply_safe_point_hook
from .self_calibration import SELF_CALIBRATION_HOOK, self_calibration_run

__all__ = [
    "patch",
    "ManagedModel",
    "managed_model_of",
    "managed_models",
    "HOLO_SWAP_HOOK",
    "SwappedLayer",
    "apply_holo_swap",
    "remove_holo_swap",
    "find_swappable",
    "SAFE_POINT_HOOK",
    "SafePointSwitch",
    "SafePointHandle",
    "apply_safe_point_hook",
    "SELF_CALIBRATION_HOOK",
    "self_calibration_run",
    "HoloTensorConfig",
    "HoloQuantizer",
    "from_holo_pretrained",
]

_TRANSFORMERS_GLUE = ("HoloTensorConfig", "HoloQuantizer", "from_holo_pretrained")


def __getattr__(name: str):
    # The transformers glue imports transformers (seconds): only when asked for.
    if name in _TRANSFORMERS_GLUE:
        from . import transformers_quantizer

        return getattr(transformers_quantizer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
