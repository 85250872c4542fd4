"""Global mode's out-of-memory signal, built and run for real on the CPU: the helper compiled by
``install()`` against this torch's headers, and the shim driven from C++ the way PyTorch's
``CUDAPluggableAllocator`` calls it (host backend). A refusal must reach the caller as PyTorch's
own ``c10::OutOfMemoryError`` (``torch.OutOfMemoryError`` in Python), never as a null pointer."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from torch_arbiter.allocator import _lib, scope

HARNESS = Path(__file__).parent / "native" / "oom_harness.cpp"

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs a C++ compiler")


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    root = Path(torch.__file__).parent
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    out = tmp_path_factory.mktemp("harness") / "oom_harness"
    subprocess.run(["g++", "-O0", "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-I", str(root / "include"),
                    str(HARNESS), "-o", str(out), "-L", str(root / "lib"), "-lc10", "-ldl",
                    f"-Wl,-rpath,{root / 'lib'}"], check=True, capture_output=True, timeout=300)
    return out


def _run(harness: Path, helper: str) -> list[str]:
    prefix = f"ta_oom_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    done = subprocess.run([str(harness), _lib.library_path(), helper, prefix], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not [name for name in os.listdir("/dev/shm") if name.startswith(prefix)]
    return done.stdout.splitlines()


def test_refusal_throws_pytorchs_out_of_memory_error_through_the_shim(harness, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_ARBITER_CACHE", str(tmp_path))
    helper = scope._build_oom_helper(torch)
    assert helper.parent == tmp_path and scope._build_oom_helper(torch) == helper  # built once
    refused, after = _run(harness, str(helper))
    assert refused.startswith("OutOfMemoryError: torch_arbiter: workload 7 refused 1048576 bytes")
    assert after == "after: allocated"


def test_without_the_handler_a_refusal_is_a_null_pointer(harness):
    """Pool mode keeps returning null: PyTorch's caching allocator checks it there."""
    assert _run(harness, "-") == ["returned null", "after: allocated"]
