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
]
__version__ = "0.1.0"
