"""torch_arbiter: several PyTorch models share one GPU at live quality.

The public names of DESIGN.md, in the Python spelling of the seed crate
``infernum_arbiter``.
"""

from .allocation import Allocation, AllocationRequest, AllocationResult, AllocationState
from .arbiter import (
    Arbiter,
    ArbiterConfig,
    ArbiterState,
    ArbiterStats,
    QualityChange,
    WorkloadInfo,
    get_default_arbiter,
)
from .cache import CacheConfig, CacheStats, CacheTier, FragmentCache
from .coordinator import Coordinator, CoordinatorConfig
from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all
from .gpu import DetectionMethod, GpuDetectionResult, GpuDetector, GpuInfo, GpuVendor
from .holo import HoloTensor
from .hooks import ManagedModel, patch
from .memory import GpuMemoryTracker, MemoryPressure, MemoryStats
from .nn import HoloConv2d, HoloLinear
from .priority import Priority, WorkloadKind, WorkloadType
from .quality import QualityAllocation, QualityBudget, QualityPolicy

__all__ = [
    *_errors_all,
    "Allocation",
    "AllocationRequest",
    "AllocationResult",
    "AllocationState",
    "Arbiter",
    "CacheConfig",
    "CacheStats",
    "CacheTier",
    "DetectionMethod",
    "FragmentCache",
    "GpuDetectionResult",
    "GpuDetector",
    "GpuInfo",
    "GpuVendor",
    "HoloConv2d",
    "HoloLinear",
    "HoloTensor",
    "HoloTensorConfig",
    "ManagedModel",
    "ArbiterConfig",
    "ArbiterState",
    "ArbiterStats",
    "Coordinator",
    "CoordinatorConfig",
    "GpuMemoryTracker",
    "MemoryPressure",
    "MemoryStats",
    "Priority",
    "QualityAllocation",
    "QualityBudget",
    "QualityChange",
    "QualityPolicy",
    "WorkloadInfo",
    "WorkloadKind",
    "WorkloadType",
    "get_default_arbiter",
    "from_holo_pretrained",
    "patch",
]
__version__ = "0.1.0"

_TRANSFORMERS_GLUE = ("HoloTensorConfig", "from_holo_pretrained")


def __getattr__(name: str):
    # The transformers glue imports transformers (seconds) and registers the "holo"
    # quantization method with it: do that on first use, not on ``import torch_arbiter``.
    if name in _TRANSFORMERS_GLUE:
        from .hooks import transformers_quantizer

        return getattr(transformers_quantizer, name)
    raise AttributeError(f"module 'torch_arbiter' has no attribute {name!r}")
