"""The public names of DESIGN.md are importable from torch_arbiter and documented."""

import enum
import inspect

import torch_arbiter

DESIGN_NAMES = [
    "Arbiter", "ArbiterConfig", "ArbiterState", "ArbiterStats", "ArbiterError",
    "Priority", "WorkloadType", "QualityPolicy", "QualityBudget", "QualityAllocation",
    "Coordinator", "CoordinatorConfig", "Allocation", "AllocationRequest", "AllocationResult",
    "GpuMemoryTracker", "MemoryStats", "MemoryPressure",
    "GpuDetector", "GpuInfo", "GpuVendor", "DetectionMethod", "GpuDetectionResult",
    "FragmentCache", "CacheConfig", "CacheStats", "CacheTier",
    "HoloTensor", "HoloLinear", "HoloConv2d", "patch", "ManagedModel", "HoloTensorConfig",
]


def test_design_names_are_exported():
    missing = [n for n in DESIGN_NAMES if n not in torch_arbiter.__all__ or not hasattr(torch_arbiter, n)]
    assert not missing


def test_every_export_and_its_public_methods_are_documented():
    undocumented = []
    for name in torch_arbiter.__all__:
        obj = getattr(torch_arbiter, name)
        if not (inspect.getdoc(obj) or "").strip():
            undocumented.append(name)
        if inspect.isclass(obj) and not issubclass(obj, (enum.Enum, BaseException)):
            for attr, member in vars(obj).items():
                if attr.startswith("_") or not (inspect.isfunction(member) or isinstance(member, (property, classmethod, staticmethod))):
                    continue
                if not (inspect.getdoc(member) or "").strip():
                    undocumented.append(f"{name}.{attr}")
    assert not undocumented


def test_errors_share_one_base():
    for name in torch_arbiter.errors.__all__:
        assert issubclass(getattr(torch_arbiter, name), torch_arbiter.ArbiterError)


def test_enum_values_match_the_seed():
    P = torch_arbiter.Priority
    assert [(p.name, p.value) for p in P] == [("BACKGROUND", 0), ("LOW", 1), ("NORMAL", 2), ("HIGH", 3), ("CRITICAL", 4)]
    assert [p.name for p in torch_arbiter.QualityPolicy] == ["FIXED", "ADAPTIVE", "LLM_FIRST", "DIFFUSION_FIRST", "BALANCED"]
    assert [p.name for p in torch_arbiter.MemoryPressure] == ["LOW", "MODERATE", "HIGH", "CRITICAL"]
    assert [t.name for t in torch_arbiter.CacheTier] == ["DEVICE", "HOST", "DISK", "REMOTE"]
    assert [t.name for t in torch_arbiter.WorkloadType] == ["LLM_INFERENCE", "IMAGE_GENERATION", "VIDEO_GENERATION"]
