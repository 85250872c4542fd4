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
from .coordinator import Coordinator, CoordinatorConfig
from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all
from .memory import GpuMemoryTracker, MemoryPressure, MemoryStats
from .priority import Priority, WorkloadKind, WorkloadType
from .quality import QualityAllocation, QualityBudget, QualityPolicy

__all__ = [
    *_errors_all,
    "Allocation",
    "AllocationRequest",
    "AllocationResult",
    "AllocationState",
    "Arbiter",
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
