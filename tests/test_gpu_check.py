"""scripts/gpu_check.py dry-run on the CPU: its CUDA-only calls stubbed, everything else real
(the holo checks, the int4 section through torch's CPU twin of the kernel, the cleanup)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from torch_arbiter import allocator as ta_alloc
from torch_arbiter.nn import HoloLinear, _int4, modules

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.fixture
def gpu_check(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check_dry_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    return module


_pinned: set[int] = set()


class PinnedLinear(nn.Linear):
    """An nn.Linear that must not be moved in place (its device copies may)."""

    def _apply(self, fn, recurse=True):
        if id(self) in _pinned:
            raise AssertionError("the original module was moved in place")
        return super()._apply(fn, recurse)


def test_holo_check_runs_on_device_copies(gpu_check, capsys):
    torch.manual_seed(0)
    original = PinnedLinear(128, 64)
    _pinned.add(id(original))
    try:
        cases = [("linear 128->64, 3 rows", original, lambda: torch.randn(3, 128), HoloLinear.from_linear)]
        assert gpu_check.check_holo_modules(torch.device("cpu"), 1, cases) == 0
    finally:
        _pinned.discard(id(original))
    out = capsys.readouterr().out
    assert "linear 128->64, 3 rows" in out and "FAILED" not in out


@pytest.mark.skipif(not _int4.available(torch.device("cpu")), reason="torch lacks the CPU int4 kernel")
def test_int4_section_reports_both_paths(gpu_check, monkeypatch, capsys):
    monkeypatch.setattr(modules, "_INT4_DEVICE_TYPES", ("cpu",))
    failures = gpu_check.check_int4_kernels(torch.device("cpu"), 1, shape=(256, 256), targets={1: 1.5, 40: 1.2})
    out = capsys.readouterr().out
    assert failures == 0, out
    lines = [line for line in out.splitlines() if line.strip()[:2] in ("1 ", "40")]
    assert len(lines) == 4  # levels 1 and 2 at 1 and 40 rows
    assert sum("int4 kernel" in line for line in lines) == 2 and sum("decode + bf16 mm" in line for line in lines) == 2
    assert all(("met" in line or "MISSED" in line) for line in lines)


def test_main_prints_its_settings_and_cleans_up_when_a_check_fails(gpu_check, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "stub GPU")
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "native", raising=False)

    def broken():
        raise RuntimeError("a check failed mid-way")

    monkeypatch.setattr(gpu_check, "build_llm", broken)
    ta_alloc.detach_ledgers()
    mine = f"ta_gpu_check_{os.getpid()}_"
    try:
        with pytest.raises(RuntimeError, match="mid-way"):
            gpu_check.main(["--device", "0"])
        out = capsys.readouterr().out
        assert f"torch {torch.__version__}" in out
        assert "allocator settings: PYTORCH_CUDA_ALLOC_CONF=" in out and "pool mode" in out
        assert "cleanup: workloads released, ledger segment" in out
        assert not [name for name in os.listdir("/dev/shm") if name.startswith(mine)]
    finally:
        ta_alloc.detach_ledgers()
        ta_alloc.set_ledger_prefix("torch_arbiter")

