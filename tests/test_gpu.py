"""GpuDetector: parsers against recorded tool output, and the chain with real processes and files."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest

from torch_arbiter.errors import InvalidRequestError
from torch_arbiter.gpu import (
    DetectionFailed,
    DetectionMethod,
    GpuDetector,
    GpuVendor,
    parse_nvidia_smi_csv,
    parse_rocm_smi_json,
    read_amdgpu_sysfs,
    run_command,
)

FIXTURES = Path(__file__).parent / "fixtures" / "gpu"
MIB = 1 << 20


def _fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def _install_tool(bin_dir: Path, name: str, body: str) -> None:
    """Put an executable shell script called ``name`` in ``bin_dir`` (a fake vendor tool)."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / name
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)


def _printing_tool(bin_dir: Path, name: str, fixture: str, status: int = 0) -> None:
    _install_tool(bin_dir, name, f"cat '{FIXTURES / fixture}'\nexit {status}")


def _make_amdgpu_sysfs(root: Path, cards: dict[str, dict[str, str]]) -> Path:
    """Build ``<root>/class/drm/<card>/device/<attr>`` files, as the amdgpu driver exposes them."""
    for card, attributes in cards.items():
        device = root / "class" / "drm" / card / "device"
        device.mkdir(parents=True)
        for attribute, value in attributes.items():
            (device / attribute).write_text(value + "\n")
    return root


# --- nvidia-smi ---------------------------------------------------------------------------------


def test_nvidia_smi_rtx4090():
    (gpu,) = parse_nvidia_smi_csv(_fixture("nvidia_smi_rtx4090.csv"))
    assert gpu.name == "NVIDIA GeForce RTX 4090"
    assert gpu.vendor is GpuVendor.NVIDIA
    assert gpu.total_bytes == 24564 * MIB
    assert gpu.free_bytes == 23817 * MIB
    assert gpu.used_bytes == (24564 - 23817) * MIB
    assert gpu.compute_capability == "8.9"
    assert gpu.driver == "550.54.14"
    assert gpu.uuid == "GPU-5a3b8c1e-7f2d-4e9a-b6c0-1d2e3f4a5b6c"
    assert gpu.method is DetectionMethod.NVIDIA_SMI and not gpu.unified_memory


def test_nvidia_smi_multi_gpu_keeps_order_and_per_gpu_free_memory():
    gpus = parse_nvidia_smi_csv(_fixture("nvidia_smi_a100x4.csv"))
    assert [g.index for g in gpus] == [0, 1, 2, 3]
    assert {g.name for g in gpus} == {"NVIDIA A100-SXM4-80GB"}
    assert all(g.total_bytes == 81920 * MIB and g.compute_capability == "8.0" for g in gpus)
    assert gpus[1].free_bytes == 4215 * MIB
    assert len({g.uuid for g in gpus}) == 4


def test_nvidia_smi_placeholders_become_unknown():
    (gpu,) = parse_nvidia_smi_csv(_fixture("nvidia_smi_vgpu_na_fields.csv"))
    assert gpu.name == "GRID T4-16Q" and gpu.total_bytes == 16384 * MIB
    assert gpu.free_bytes is None and gpu.used_bytes is None
    assert gpu.compute_capability is None


def test_nvidia_smi_old_driver_without_compute_cap_column():
    (gpu,) = parse_nvidia_smi_csv(_fixture("nvidia_smi_a100_driver470_no_compute_cap.csv"))
    assert gpu.total_bytes == 40536 * MIB and gpu.compute_capability is None
    assert gpu.driver == "470.223.02"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n\n",
        "0, NVIDIA GeForce RTX 4090, GPU-x, 550.54.14\n",  # too few columns
        "0, NVIDIA GeForce RTX 4090, GPU-x, 550.54.14, lots, 1, 8.9\n",  # memory not a number
        "0, NVIDIA GeForce RTX 4090, GPU-x, 550.54.14, [N/A], 1, 8.9\n",  # no total
        "x, NVIDIA GeForce RTX 4090, GPU-x, 550.54.14, 24564, 1, 8.9\n",  # index not a number
    ],
)
def test_nvidia_smi_malformed_output_is_a_detection_failure(text):
    with pytest.raises(DetectionFailed):
        parse_nvidia_smi_csv(text)


def test_nvidia_smi_driver_message_is_a_detection_failure():
    with pytest.raises(DetectionFailed):
        parse_nvidia_smi_csv(_fixture("nvidia_smi_driver_not_loaded.txt"))


# --- rocm-smi -----------------------------------------------------------------------------------


def test_rocm_smi_mi250x_two_gcds():
    gpus = parse_rocm_smi_json(_fixture("rocm_smi_mi250x_rocm6.json"))
    assert [g.index for g in gpus] == [0, 1]
    assert all(g.vendor is GpuVendor.AMD and g.name == "AMD Instinct MI250X" for g in gpus)
    assert all(g.total_bytes == 68702699520 and g.compute_capability == "gfx90a" for g in gpus)
    assert gpus[0].free_bytes == 68702699520 - 11145216
    assert gpus[1].free_bytes == 68702699520 - 34370101248
    assert gpus[0].method is DetectionMethod.ROCM_SMI


def test_rocm_smi_rocm5_spelling_after_a_warning_line():
    (gpu,) = parse_rocm_smi_json(_fixture("rocm_smi_rx7900xtx_rocm5_warning.txt"))
    assert gpu.name == "Navi 31 [Radeon RX 7900 XT/7900 XTX]"
    assert gpu.total_bytes == 25753026560 and gpu.free_bytes == 25753026560 - 1182240768
    assert gpu.compute_capability is None


def test_rocm_smi_text_after_the_document_is_ignored():
    text = _fixture("rocm_smi_mi250x_rocm6.json").strip() + "\n=============== End of ROCm SMI Log ===============\n"
    assert len(parse_rocm_smi_json(text)) == 2


def test_rocm_smi_system_entry_gives_the_driver():
    text = '{"card3": {"VRAM Total Memory (B)": "17163091968"}, "system": {"Driver version": "6.3.6"}}'
    (gpu,) = parse_rocm_smi_json(text)
    assert gpu.index == 3 and gpu.driver == "6.3.6" and gpu.name == "card3" and gpu.free_bytes is None


@pytest.mark.parametrize(
    "fixture_or_text",
    ["rocm_smi_truncated.txt", "rocm_smi_no_vram.json", "ERROR: No AMD GPUs specified", "[1, 2]"],
)
def test_rocm_smi_malformed_output_is_a_detection_failure(fixture_or_text):
    path = FIXTURES / fixture_or_text
    text = path.read_text() if path.exists() else fixture_or_text
    with pytest.raises(DetectionFailed):
        parse_rocm_smi_json(text)


# --- amdgpu sysfs -------------------------------------------------------------------------------


def test_amdgpu_sysfs_reads_amd_cards_only(tmp_path):
    root = _make_amdgpu_sysfs(
        tmp_path,
        {
            "card0": {"vendor": "0x8086", "device": "0x56a0"},  # an Intel iGPU: not ours
            "card1": {
                "vendor": "0x1002",
                "device": "0x744c",
                "mem_info_vram_total": "25753026560",
                "mem_info_vram_used": "1182240768",
                "product_name": "Radeon RX 7900 XTX",
                "unique_id": "5c0a71c1f2bd43c4",
            },
            "card1-DP-1": {"vendor": "0x1002", "mem_info_vram_total": "1"},  # a connector
            "card2": {"vendor": "0x1002", "device": "0x73bf", "mem_info_vram_total": "17163091968"},
        },
    )
    (root / "module" / "amdgpu").mkdir(parents=True)
    (root / "module" / "amdgpu" / "version").write_text("6.7.0\n")
    first, second = read_amdgpu_sysfs(root)
    assert (first.index, first.name, first.uuid, first.driver) == (1, "Radeon RX 7900 XTX", "5c0a71c1f2bd43c4", "6.7.0")
    assert first.total_bytes == 25753026560 and first.free_bytes == 25753026560 - 1182240768
    assert (second.index, second.name, second.free_bytes) == (2, "AMD GPU 0x73bf", None)
    assert second.method is DetectionMethod.AMDGPU_SYSFS


def test_amdgpu_sysfs_without_amd_card_or_drm_fails(tmp_path):
    with pytest.raises(DetectionFailed, match="does not exist"):
        read_amdgpu_sysfs(tmp_path)
    _make_amdgpu_sysfs(tmp_path, {"card0": {"vendor": "0x1002", "mem_info_vram_total": "garbage"}})
    with pytest.raises(DetectionFailed, match="no amdgpu card"):
        read_amdgpu_sysfs(tmp_path)


# --- the chain, with real subprocesses ----------------------------------------------------------


def test_detector_answers_through_a_real_nvidia_smi_process(tmp_path):
    bin_dir = tmp_path / "bin"
    _printing_tool(bin_dir, "nvidia-smi", "nvidia_smi_a100x4.csv")
    result = GpuDetector([DetectionMethod.NVIDIA_SMI], search_path=str(bin_dir)).detect()
    assert result.method is DetectionMethod.NVIDIA_SMI and not result.is_virtual
    assert len(result.gpus) == 4 and result.primary.name == "NVIDIA A100-SXM4-80GB"
    assert result.errors == {}


def test_old_driver_rejecting_compute_cap_is_asked_again_without_it(tmp_path):
    bin_dir = tmp_path / "bin"
    _install_tool(
        bin_dir,
        "nvidia-smi",
        f"""case "$1" in
  *compute_cap*) cat '{FIXTURES / "nvidia_smi_invalid_field.txt"}'; exit 2;;
  *) cat '{FIXTURES / "nvidia_smi_a100_driver470_no_compute_cap.csv"}';;
esac""",
    )
    result = GpuDetector([DetectionMethod.NVIDIA_SMI], search_path=str(bin_dir)).detect()
    assert result.method is DetectionMethod.NVIDIA_SMI
    assert result.primary.name == "NVIDIA A100-PCIE-40GB" and result.primary.compute_capability is None


def test_chain_falls_through_failing_tools_to_sysfs_and_says_why(tmp_path):
    bin_dir = tmp_path / "bin"
    _printing_tool(bin_dir, "nvidia-smi", "nvidia_smi_driver_not_loaded.txt", status=9)
    _printing_tool(bin_dir, "rocm-smi", "rocm_smi_truncated.txt")
    sysfs = _make_amdgpu_sysfs(
        tmp_path / "sys", {"card0": {"vendor": "0x1002", "device": "0x740c", "mem_info_vram_total": "68702699520"}}
    )
    detector = GpuDetector(
        [DetectionMethod.NVIDIA_SMI, DetectionMethod.ROCM_SMI, DetectionMethod.AMDGPU_SYSFS],
        search_path=str(bin_dir),
        sysfs_root=sysfs,
    )
    result = detector.detect()
    assert result.method is DetectionMethod.AMDGPU_SYSFS
    assert result.primary.total_bytes == 68702699520
    assert "status 9" in result.errors[DetectionMethod.NVIDIA_SMI]
    assert "communicate with the NVIDIA driver" in result.errors[DetectionMethod.NVIDIA_SMI]
    assert "malformed" in result.errors[DetectionMethod.ROCM_SMI]
    assert [a.method for a in result.attempts] == [
        DetectionMethod.NVIDIA_SMI,
        DetectionMethod.ROCM_SMI,
        DetectionMethod.AMDGPU_SYSFS,
    ]


def test_hung_tool_and_its_children_are_killed_at_the_timeout(tmp_path):
    bin_dir = tmp_path / "bin"
    # the child `sleep` inherits stdout: killing only the script would leave the pipe open
    _install_tool(bin_dir, "nvidia-smi", "sleep 30 &\nsleep 30")
    started = time.perf_counter()
    result = GpuDetector(
        [DetectionMethod.NVIDIA_SMI], timeout=0.5, search_path=str(bin_dir), virtual_capacity_bytes=1 << 30
    ).detect()
    assert time.perf_counter() - started < 10
    assert result.method is DetectionMethod.CPU_VIRTUAL
    assert "timed out" in result.errors[DetectionMethod.NVIDIA_SMI]


def test_run_command_reports_missing_tool_and_returns_stdout(tmp_path):
    with pytest.raises(DetectionFailed, match="not found"):
        run_command(["nvidia-smi"], 1.0, search_path=str(tmp_path))
    assert run_command(["echo", "hello"], 5.0) == "hello\n"


def test_apple_unified_memory_from_sysctl(tmp_path):
    bin_dir = tmp_path / "bin"
    _install_tool(
        bin_dir,
        "sysctl",
        """case "$2" in
  hw.memsize) echo 34359738368;;
  machdep.cpu.brand_string) echo 'Apple M2 Max';;
  *) exit 1;;
esac""",
    )
    apple = GpuDetector([DetectionMethod.APPLE_UNIFIED], search_path=str(bin_dir), platform="darwin").detect()
    assert apple.method is DetectionMethod.APPLE_UNIFIED
    gpu = apple.primary
    assert (gpu.vendor, gpu.name, gpu.total_bytes, gpu.unified_memory) == (GpuVendor.APPLE, "Apple M2 Max", 32 << 30, True)
    linux = GpuDetector([DetectionMethod.APPLE_UNIFIED], search_path=str(bin_dir), platform="linux").detect()
    assert linux.is_virtual and "not macOS" in linux.errors[DetectionMethod.APPLE_UNIFIED]


def test_virtual_device_capacity_is_configured_and_validated():
    result = GpuDetector([], virtual_capacity_bytes=3 << 30).detect()
    assert result.is_virtual and result.gpus[0].total_bytes == result.gpus[0].free_bytes == 3 << 30
    assert result.primary.vendor is GpuVendor.CPU and result.primary.unified_memory
    with pytest.raises(InvalidRequestError, match="virtual_capacity_bytes"):
        GpuDetector(virtual_capacity_bytes=0)


def test_full_chain_on_this_machine_never_raises():
    result = GpuDetector(virtual_capacity_bytes=2 << 30).detect()
    assert result.gpus and result.attempts[-1].method is result.method
    assert all(a.error for a in result.attempts[:-1])
    machine_has_gpu = shutil.which("nvidia-smi") or shutil.which("rocm-smi") or Path("/dev/nvidia0").exists()
    if not machine_has_gpu and not Path("/sys/class/drm").is_dir() and sys.platform != "darwin":
        assert result.method is DetectionMethod.CPU_VIRTUAL and result.primary.total_bytes == 2 << 30


def test_torch_method_asks_a_child_process_and_leaves_cuda_uninitialised(monkeypatch):
    """Querying the devices in-process would start CUDA here and make install() impossible."""
    import torch

    def starts_cuda(*args, **kwargs):
        raise AssertionError("detection initialised CUDA in this process")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", starts_cuda)
    monkeypatch.setattr(torch.cuda, "mem_get_info", starts_cuda)
    asked = []

    def runner(argv, timeout):
        asked.append(argv)
        return 'some warning\n[{"index": 0, "name": "NVIDIA H200", "total": 150000000000, "free": 149000000000, ' \
               '"capability": "9.0", "uuid": "GPU-1"}]\n'

    result = GpuDetector([DetectionMethod.TORCH_CUDA], runner=runner).detect()
    assert asked and asked[0][:2] == [sys.executable, "-c"]
    (gpu,) = result.gpus
    assert (gpu.name, gpu.total_bytes, gpu.compute_capability, gpu.method) == (
        "NVIDIA H200", 150000000000, "9.0", DetectionMethod.TORCH_CUDA)


def test_torch_probe_runs_in_a_real_child_process(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the child's torch has no device
    result = GpuDetector([DetectionMethod.TORCH_CUDA]).detect()
    assert result.is_virtual and "reports no device" in result.errors[DetectionMethod.TORCH_CUDA]
    assert not torch.cuda.is_initialized()
