"""HoloTensor: nested fragment codec, model-level quality planning, the on-disk format, conversion.

- :mod:`.codec`: :class:`HoloTensor` (encode a weight into levels of fragments, decode any level);
- :mod:`.plan`: :func:`plan_quality` / :func:`min_quality` (which level each tensor takes at
  model quality ``q``);
- :mod:`.format`: :func:`save_holo`, :class:`HoloCheckpoint`, :func:`decode_fragment`;
- :mod:`.calibrate`: :func:`collect_layer_inputs` (layer inputs for GPTQ-rounded encoding);
- :mod:`.sensitivity`: :func:`record_calls` / :func:`record_model_errors` (how much each weight
  moves the model's output, for the planner);
- :mod:`.convert`: :func:`convert` a model directory or file into a holo checkpoint.
"""

from .calibrate import collect_layer_inputs, collect_weight_inputs
from .codec import FragmentSpec, HoloTensor
from .format import INDEX_NAME, HoloCheckpoint, decode_fragment, fragment_id, save_holo
from .plan import min_quality, plan_bytes, plan_order, plan_quality
from .sensitivity import record_calls, record_model_errors

__all__ = [
    "HoloTensor",
    "FragmentSpec",
    "plan_quality",
    "min_quality",
    "plan_bytes",
    "plan_order",
    "INDEX_NAME",
    "save_holo",
    "HoloCheckpoint",
    "decode_fragment",
    "fragment_id",
    "collect_layer_inputs",
    "collect_weight_inputs",
    "record_calls",
    "record_model_errors",
]
