"""Find the accelerator this process will share, and how much memory it has.

``GpuDetector.detect()`` walks a chain of methods, most precise first, and stops at
the first one that finds a device:

1. NVML (``pynvml`` from the ``nvidia-ml-py`` package): exact total/free bytes, driver,
   compute capability, without creating a CUDA context.
2. ``torch.cuda`` (also answers on ROCm builds of torch, where ``torch.version.hip`` is set),
   asked in a child process: querying every device in this one would initialise CUDA here
   (a context on each device), after which ``torch_arbiter.allocator.install()`` is impossible.
3. ``nvidia-smi --query-gpu=... --format=csv,noheader,nounits``.
4. ``rocm-smi --showmeminfo vram --showproductname --json``.
5. amdgpu sysfs (``/sys/class/drm/card*/device/mem_info_vram_*``, PCI vendor 0x1002).
6. Apple unified memory (``sysctl -n hw.memsize`` on darwin, ``torch.backends.mps``).
7. A CPU virtual device of configured capacity: always answers, so callers never special-case
   "no GPU".

Every external command runs with a timeout in its own process group (killed whole on
timeout, so a hung driver tool cannot hang us), and no method raises: a failure is recorded in
``GpuDetectionResult.attempts`` and the chain moves on. The text parsers are pure functions
(``parse_nvidia_smi_csv``, ``parse_rocm_smi_json``, ``read_amdgpu_sysfs``) so they are tested
against recorded output samples; the command runner, the ``PATH`` searched for tools, the sysfs
root and the platform are arguments of ``GpuDetector`` so tests drive the real code with real
files and real processes.
"""

from __future__ import annotations

import csv
import enum
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

__all__ = [
    "GpuVendor",
    "DetectionMethod",
    "GpuInfo",
    "DetectionAttempt",
    "GpuDetectionResult",
    "GpuDetector",
    "DetectionFailed",
    "CommandRunner",
    "run_command",
    "parse_nvidia_smi_csv",
    "parse_rocm_smi_json",
    "read_amdgpu_sysfs",
    "NVIDIA_SMI_QUERY_FIELDS",
    "ROCM_SMI_ARGS",
]

_MIB = 1 << 20
_AMD_PCI_VENDOR = "0x1002"
#: The fields asked of ``nvidia-smi``, in the order the CSV parser expects them.
NVIDIA_SMI_QUERY_FIELDS = ("index", "name", "uuid", "driver_version", "memory.total", "memory.free", "compute_cap")
#: ``rocm-smi`` arguments: VRAM bytes and product names, as JSON.
ROCM_SMI_ARGS = ("--showmeminfo", "vram", "--showproductname", "--json")
_NVIDIA_SMI_MISSING_VALUES = {"", "[n/a]", "n/a", "[not supported]", "[unknown error]", "[insufficient permissions]"}


class GpuVendor(str, enum.Enum):
    """Who made the device. ``CPU`` is the virtual device used when no accelerator answers."""

    NVIDIA = "nvidia"
    AMD = "amd"
    APPLE = "apple"
    INTEL = "intel"
    CPU = "cpu"


class DetectionMethod(str, enum.Enum):
    """The methods of the detection chain, in the order ``GpuDetector`` tries them."""

    NVML = "nvml"
    TORCH_CUDA = "torch_cuda"
    NVIDIA_SMI = "nvidia_smi"
    ROCM_SMI = "rocm_smi"
    AMDGPU_SYSFS = "amdgpu_sysfs"
    APPLE_UNIFIED = "apple_unified"
    CPU_VIRTUAL = "cpu_virtual"


class DetectionFailed(Exception):
    """Internal signal: one detection method found nothing usable (never escapes ``detect()``)."""


@dataclass(frozen=True)
class GpuInfo:
    """One device as a detection method saw it.

    Attributes:
        index: the device's index as its own tool numbers it (CUDA / NVML index, rocm card number).
        name: the product name the tool reports (``"NVIDIA GeForce RTX 4090"``).
        vendor: who made it.
        total_bytes: device memory in bytes (for unified memory: the whole system memory).
        free_bytes: free device memory at detection time, or ``None`` where the method cannot
            tell (Apple unified memory, sysfs without ``mem_info_vram_used``).
        driver: driver version string where the method reports one.
        compute_capability: ``"8.9"`` for NVIDIA, the gfx target (``"gfx90a"``) for AMD, else ``None``.
        uuid: a stable device id where known (NVIDIA ``GPU-...``, AMD unique id).
        unified_memory: True where device and host share one memory (Apple silicon, the CPU
            virtual device): moving a tensor between "tiers" there frees nothing.
        method: the detection method that produced this record.
    """

    index: int
    name: str
    vendor: GpuVendor
    total_bytes: int
    free_bytes: int | None
    driver: str | None = None
    compute_capability: str | None = None
    uuid: str | None = None
    unified_memory: bool = False
    method: DetectionMethod = DetectionMethod.CPU_VIRTUAL

    @property
    def used_bytes(self) -> int | None:
        """``total_bytes - free_bytes``, or ``None`` when free memory is unknown."""
        return None if self.free_bytes is None else self.total_bytes - self.free_bytes


@dataclass(frozen=True)
class DetectionAttempt:
    """What one method of the chain did.

    Attributes:
        method: the method tried.
        found: number of devices it found (0 when it failed).
        error: why it found nothing (missing library, command not found, timeout, malformed
            output), or ``None`` when it answered.
        seconds: wall time the attempt took.
    """

    method: DetectionMethod
    found: int
    error: str | None
    seconds: float


@dataclass(frozen=True)
class GpuDetectionResult:
    """The outcome of ``GpuDetector.detect()``.

    Attributes:
        gpus: the devices found by the method that answered (never empty: the CPU virtual device
            answers last).
        method: the method that answered.
        attempts: every method tried, in order, including the one that answered.
    """

    gpus: tuple[GpuInfo, ...]
    method: DetectionMethod
    attempts: tuple[DetectionAttempt, ...] = field(default_factory=tuple)

    @property
    def primary(self) -> GpuInfo:
        """The first device (index order): the one the arbiter manages by default."""
        return self.gpus[0]

    @property
    def is_virtual(self) -> bool:
        """True when no accelerator answered and ``gpus`` holds the CPU virtual device."""
        return self.method is DetectionMethod.CPU_VIRTUAL

    @property
    def errors(self) -> dict[DetectionMethod, str]:
        """Why each method before the answering one found nothing."""
        return {a.method: a.error for a in self.attempts if a.error is not None}


#: ``runner(argv, timeout_seconds) -> stdout``; raises ``DetectionFailed`` on any failure.
CommandRunner = Callable[[Sequence[str], float], str]


def run_command(argv: Sequence[str], timeout: float, *, search_path: str | None = None) -> str:
    """Run a tool and return its stdout, or raise ``DetectionFailed`` saying why not.

    The child runs in its own session; on timeout the whole process group is killed, so a
    tool that forks (or a wrapper script) cannot keep our pipes open and hang us.

    Args:
        argv: the command; ``argv[0]`` is looked up on ``search_path`` (``PATH`` when ``None``).
        timeout: seconds before the process group is killed.
        search_path: an ``os.pathsep``-separated list of directories to find ``argv[0]`` in.

    Returns:
        The command's stdout decoded as UTF-8 (undecodable bytes replaced).

    Raises:
        DetectionFailed: the tool is missing, timed out, or exited non-zero (message holds the
            exit status and the first line of stderr).
    """
    executable = shutil.which(argv[0], path=search_path)
    if executable is None:
        raise DetectionFailed(f"{argv[0]} not found on PATH")
    try:
        process = subprocess.Popen(
            [executable, *argv[1:]],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        raise DetectionFailed(f"{argv[0]} could not start: {exc}") from exc
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_process_group(process)
        raise DetectionFailed(f"{argv[0]} timed out after {timeout:g} s (killed)") from None
    if process.returncode != 0:
        first_line = (stderr or stdout).decode("utf-8", "replace").strip().splitlines()[:1]
        detail = f": {first_line[0]}" if first_line else ""
        raise DetectionFailed(f"{argv[0]} exited with status {process.returncode}{detail}")
    return stdout.decode("utf-8", "replace")


def _kill_process_group(process: subprocess.Popen) -> None:
    """Kill a timed-out tool and everything it started, then reap it without waiting long."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()
    try:
        process.communicate(timeout=1.0)
    except subprocess.TimeoutExpired:
        pass  # stuck in the kernel (a wedged driver): abandon it rather than hang


def parse_nvidia_smi_csv(text: str) -> list[GpuInfo]:
    """Parse ``nvidia-smi --query-gpu=<NVIDIA_SMI_QUERY_FIELDS> --format=csv,noheader,nounits``.

    Also accepts the output of the same query without the trailing ``compute_cap`` column
    (drivers older than 510 reject that field, and the detector retries without it).

    Args:
        text: the command's stdout; memory columns are MiB (``nounits``); ``[N/A]`` and
            ``[Not Supported]`` mean unknown.

    Returns:
        One ``GpuInfo`` per line, in the order printed.

    Raises:
        DetectionFailed: no GPU line, a line with the wrong number of columns, or a total
            memory that is not a positive number.
    """
    gpus: list[GpuInfo] = []
    columns = len(NVIDIA_SMI_QUERY_FIELDS)
    for row in csv.reader(text.strip().splitlines(), skipinitialspace=True):
        if not row:
            continue
        if len(row) not in (columns, columns - 1):
            raise DetectionFailed(f"nvidia-smi line has {len(row)} columns, expected {columns}: {row!r}")
        values = [_nvidia_smi_value(cell) for cell in row]
        index, name, uuid, driver, total_mib, free_mib = values[:6]
        compute_cap = values[6] if len(values) == columns else None
        total = _parse_mib(total_mib, "memory.total")
        if total is None or total <= 0 or name is None:
            raise DetectionFailed(f"nvidia-smi line without a name or a positive memory.total: {row!r}")
        gpus.append(
            GpuInfo(
                index=_parse_int(index, "index"),
                name=name,
                vendor=GpuVendor.NVIDIA,
                total_bytes=total,
                free_bytes=_parse_mib(free_mib, "memory.free"),
                driver=driver,
                compute_capability=compute_cap,
                uuid=uuid,
                method=DetectionMethod.NVIDIA_SMI,
            )
        )
    if not gpus:
        raise DetectionFailed("nvidia-smi printed no GPU")
    return gpus


def _nvidia_smi_value(cell: str) -> str | None:
    """One CSV cell, with nvidia-smi's placeholders for unknown values turned into ``None``."""
    value = cell.strip()
    return None if value.lower() in _NVIDIA_SMI_MISSING_VALUES else value


def _parse_mib(value: str | None, what: str) -> int | None:
    """MiB as printed by ``nounits`` (an integer, occasionally a decimal) → bytes."""
    if value is None:
        return None
    try:
        return int(float(value) * _MIB)
    except ValueError:
        raise DetectionFailed(f"{what} is not a number: {value!r}") from None


def _parse_int(value: str | None, what: str) -> int:
    """A mandatory integer field; a missing or non-numeric one is a malformed answer."""
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DetectionFailed(f"{what} is not an integer: {value!r}") from None


def parse_rocm_smi_json(text: str) -> list[GpuInfo]:
    """Parse ``rocm-smi --showmeminfo vram --showproductname --json``.

    The document maps ``"card<N>"`` to a dict of strings (``"VRAM Total Memory (B)"``,
    ``"VRAM Total Used Memory (B)"``, ``"Card series"``, ``"GFX Version"``, ...); ROCm 6 spells
    some keys with capitals (``"Card Series"``), so keys are matched without case. A
    ``"system"`` entry (driver version) is read when present. rocm-smi sometimes prints warnings
    before the JSON and log lines after it; both are skipped.

    Args:
        text: the command's stdout.

    Returns:
        One ``GpuInfo`` per card with a VRAM total, ordered by card number.

    Raises:
        DetectionFailed: no JSON object, or no card with a positive VRAM total.
    """
    start = text.find("{")
    if start < 0:
        raise DetectionFailed("rocm-smi printed no JSON object")
    try:  # raw_decode: tolerate rocm-smi's log lines after the document too
        document, _ = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError as exc:
        raise DetectionFailed(f"rocm-smi JSON is malformed: {exc}") from None
    if not isinstance(document, dict):
        raise DetectionFailed("rocm-smi JSON is not an object of cards")
    system = _lower_keys(document.get("system", {}))
    driver = system.get("driver version")
    cards = []
    for key, raw in document.items():
        if not (key.startswith("card") and key[4:].isdigit() and isinstance(raw, dict)):
            continue
        card = _lower_keys(raw)
        total = _parse_optional_int(card.get("vram total memory (b)"))
        if total is None or total <= 0:
            continue
        used = _parse_optional_int(card.get("vram total used memory (b)"))
        name = card.get("card series") or card.get("card model") or card.get("card sku") or key
        cards.append(
            GpuInfo(
                index=int(key[4:]),
                name=name.strip(),
                vendor=GpuVendor.AMD,
                total_bytes=total,
                free_bytes=None if used is None else max(total - used, 0),
                driver=driver or card.get("driver version"),
                compute_capability=card.get("gfx version"),
                uuid=card.get("unique id") or card.get("guid"),
                method=DetectionMethod.ROCM_SMI,
            )
        )
    if not cards:
        raise DetectionFailed("rocm-smi JSON holds no card with a VRAM total")
    return sorted(cards, key=lambda gpu: gpu.index)


def _lower_keys(mapping: object) -> dict[str, str]:
    """A rocm-smi entry with lower-cased keys and string values (non-dicts become empty)."""
    if not isinstance(mapping, dict):
        return {}
    return {str(k).strip().lower(): str(v).strip() for k, v in mapping.items()}


def _parse_optional_int(value: str | None) -> int | None:
    """An integer field that may be absent or ``"N/A"``."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


def read_amdgpu_sysfs(sysfs_root: str | os.PathLike = "/sys") -> list[GpuInfo]:
    """Read AMD GPUs from the amdgpu kernel driver's sysfs files.

    Looks at ``<root>/class/drm/card<N>/device``: ``vendor`` must be ``0x1002``, and
    ``mem_info_vram_total`` (bytes) must exist; ``mem_info_vram_used``, ``product_name``,
    ``unique_id`` and ``<root>/module/amdgpu/version`` are read when present. Connector
    entries (``card0-DP-1``) and render nodes are ignored.

    Args:
        sysfs_root: the sysfs mount point (a temporary tree in tests).

    Returns:
        One ``GpuInfo`` per AMD card, ordered by card number.

    Raises:
        DetectionFailed: no ``drm`` class directory, or no AMD card with a VRAM total.
    """
    drm = Path(sysfs_root) / "class" / "drm"
    if not drm.is_dir():
        raise DetectionFailed(f"{drm} does not exist (no DRM driver loaded)")
    driver = _read_text(Path(sysfs_root) / "module" / "amdgpu" / "version")
    gpus = []
    for card in drm.iterdir():
        if not (card.name.startswith("card") and card.name[4:].isdigit()):
            continue
        device = card / "device"
        if (_read_text(device / "vendor") or "").lower() != _AMD_PCI_VENDOR:
            continue
        total = _parse_optional_int(_read_text(device / "mem_info_vram_total"))
        if total is None or total <= 0:
            continue
        used = _parse_optional_int(_read_text(device / "mem_info_vram_used"))
        pci_device = _read_text(device / "device") or "unknown"
        gpus.append(
            GpuInfo(
                index=int(card.name[4:]),
                name=_read_text(device / "product_name") or f"AMD GPU {pci_device}",
                vendor=GpuVendor.AMD,
                total_bytes=total,
                free_bytes=None if used is None else max(total - used, 0),
                driver=driver,
                uuid=_read_text(device / "unique_id"),
                method=DetectionMethod.AMDGPU_SYSFS,
            )
        )
    if not gpus:
        raise DetectionFailed(f"no amdgpu card with mem_info_vram_total under {drm}")
    return sorted(gpus, key=lambda gpu: gpu.index)


def _read_text(path: Path) -> str | None:
    """A sysfs attribute's stripped text, or ``None`` when absent or unreadable."""
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip() or None
    except OSError:
        return None


def _physical_memory_bytes() -> int | None:
    """Total RAM of this machine from ``sysconf``, or ``None`` where the platform lacks it."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


#: Seconds the torch.cuda probe may take (importing torch and starting CUDA on each device).
_TORCH_PROBE_TIMEOUT = 120.0

#: The torch.cuda probe, run in a child process so this one's CUDA stays uninitialised.
_TORCH_PROBE = """
import json, torch
hip = getattr(torch.version, "hip", None)
rows = []
for index in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    rows.append({"index": index, "name": p.name, "total": total, "free": free,
                 "capability": getattr(p, "gcnArchName", None) if hip else f"{p.major}.{p.minor}",
                 "uuid": str(p.uuid) if hasattr(p, "uuid") else None})
print(json.dumps(rows))
"""


class GpuDetector:
    """Detect the devices of this machine through a fallback chain (see the module docstring).

    Args:
        methods: the methods to try, in order (default: all of ``DetectionMethod``). The CPU
            virtual device is appended when missing, so ``detect()`` always answers.
        timeout: seconds each external command may run before it is killed.
        virtual_capacity_bytes: capacity of the CPU virtual device; ``None`` means half of this
            machine's RAM (so a demo at full quality does not push the host into swap), or
            8 GiB where RAM cannot be read.
        runner: runs a command and returns its stdout (``run_command`` by default); tests pass
            one, or keep the default and set ``search_path``.
        search_path: directories searched for ``nvidia-smi``/``rocm-smi``/``sysctl`` (default
            ``PATH``).
        sysfs_root: where sysfs is mounted (default ``/sys``).
        platform: ``sys.platform`` value that decides whether the Apple method applies.

    Limits: NVML and torch methods see what the driver exposes to this process
    (``CUDA_VISIBLE_DEVICES`` applies to torch, not to NVML or nvidia-smi). Results are not
    cached: each ``detect()`` runs the chain again.
    """

    def __init__(
        self,
        methods: Iterable[DetectionMethod] | None = None,
        *,
        timeout: float = 5.0,
        virtual_capacity_bytes: int | None = None,
        runner: CommandRunner | None = None,
        search_path: str | None = None,
        sysfs_root: str | os.PathLike = "/sys",
        platform: str | None = None,
    ) -> None:
        chosen = list(DetectionMethod) if methods is None else [DetectionMethod(m) for m in methods]
        if DetectionMethod.CPU_VIRTUAL not in chosen:
            chosen.append(DetectionMethod.CPU_VIRTUAL)
        if virtual_capacity_bytes is not None and virtual_capacity_bytes <= 0:
            from .errors import InvalidRequestError

            raise InvalidRequestError(
                f"virtual_capacity_bytes must be positive, got {virtual_capacity_bytes}; "
                "pass the memory budget the CPU virtual device should have, or None for half the RAM"
            )
        self.methods: tuple[DetectionMethod, ...] = tuple(chosen)
        self.timeout = float(timeout)
        self.virtual_capacity_bytes = virtual_capacity_bytes
        self._runner = runner
        self.search_path = search_path
        self.sysfs_root = Path(sysfs_root)
        self.platform = sys.platform if platform is None else platform

    def detect(self) -> GpuDetectionResult:
        """Run the chain and return the first method's devices.

        Returns:
            A ``GpuDetectionResult`` naming the method that answered, with every attempt (and
            the reason each earlier method found nothing). Never raises on a machine without an
            accelerator: the CPU virtual device answers last.
        """
        attempts: list[DetectionAttempt] = []
        for method in self.methods:
            started = time.perf_counter()
            try:
                gpus = self._detectors()[method]()
            except DetectionFailed as exc:
                error = str(exc)
            except Exception as exc:  # a driver library can fail in any way; detection must not
                error = f"{type(exc).__name__}: {exc}"
            else:
                attempts.append(DetectionAttempt(method, len(gpus), None, time.perf_counter() - started))
                return GpuDetectionResult(tuple(gpus), method, tuple(attempts))
            attempts.append(DetectionAttempt(method, 0, error, time.perf_counter() - started))
        raise AssertionError("unreachable: the CPU virtual method always answers")

    def _detectors(self) -> dict[DetectionMethod, Callable[[], list[GpuInfo]]]:
        return {
            DetectionMethod.NVML: self._detect_nvml,
            DetectionMethod.TORCH_CUDA: self._detect_torch_cuda,
            DetectionMethod.NVIDIA_SMI: self._detect_nvidia_smi,
            DetectionMethod.ROCM_SMI: self._detect_rocm_smi,
            DetectionMethod.AMDGPU_SYSFS: lambda: read_amdgpu_sysfs(self.sysfs_root),
            DetectionMethod.APPLE_UNIFIED: self._detect_apple,
            DetectionMethod.CPU_VIRTUAL: self._detect_cpu_virtual,
        }

    def _run(self, argv: Sequence[str], timeout: float | None = None) -> str:
        timeout = self.timeout if timeout is None else timeout
        if self._runner is not None:
            return self._runner(argv, timeout)
        return run_command(argv, timeout, search_path=self.search_path)

    def _detect_nvml(self) -> list[GpuInfo]:
        try:
            import pynvml
        except ImportError:
            raise DetectionFailed("pynvml is not installed (pip install nvidia-ml-py)") from None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise DetectionFailed(f"NVML could not start: {exc}") from None
        try:
            driver = _nvml_text(pynvml.nvmlSystemGetDriverVersion())
            gpus = []
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                try:
                    major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
                    capability: str | None = f"{major}.{minor}"
                except pynvml.NVMLError:
                    capability = None
                gpus.append(
                    GpuInfo(
                        index=index,
                        name=_nvml_text(pynvml.nvmlDeviceGetName(handle)),
                        vendor=GpuVendor.NVIDIA,
                        total_bytes=int(memory.total),
                        free_bytes=int(memory.free),
                        driver=driver,
                        compute_capability=capability,
                        uuid=_nvml_text(pynvml.nvmlDeviceGetUUID(handle)),
                        method=DetectionMethod.NVML,
                    )
                )
        except pynvml.NVMLError as exc:
            raise DetectionFailed(f"NVML query failed: {exc}") from None
        finally:
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError:
                pass
        if not gpus:
            raise DetectionFailed("NVML reports no GPU")
        return gpus

    def _detect_torch_cuda(self) -> list[GpuInfo]:
        import torch

        if not torch.cuda.is_available():  # reads the device count without initialising CUDA
            raise DetectionFailed("torch.cuda.is_available() is False")
        text = self._run([sys.executable, "-c", _TORCH_PROBE], max(self.timeout, _TORCH_PROBE_TIMEOUT))
        try:
            rows = json.loads(text.strip().splitlines()[-1])
        except (IndexError, ValueError) as exc:
            raise DetectionFailed(f"the torch.cuda probe printed no device list: {text[-200:]!r}") from exc
        hip = getattr(torch.version, "hip", None)
        gpus = [
            GpuInfo(
                index=row["index"],
                name=row["name"],
                vendor=GpuVendor.AMD if hip else GpuVendor.NVIDIA,
                total_bytes=int(row["total"]),
                free_bytes=int(row["free"]),
                driver=None,  # torch knows its CUDA/HIP runtime version, not the driver's
                compute_capability=row["capability"],
                uuid=row["uuid"],
                method=DetectionMethod.TORCH_CUDA,
            )
            for row in rows
        ]
        if not gpus:
            raise DetectionFailed("torch.cuda reports no device")
        return gpus

    def _detect_nvidia_smi(self) -> list[GpuInfo]:
        query = ",".join(NVIDIA_SMI_QUERY_FIELDS)
        try:
            text = self._run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"])
        except DetectionFailed as exc:
            if "compute_cap" not in str(exc) and "not a valid field" not in str(exc):
                raise
            # drivers before 510 reject compute_cap; ask again without it
            text = self._run(["nvidia-smi", f"--query-gpu={query.rsplit(',', 1)[0]}", "--format=csv,noheader,nounits"])
        return parse_nvidia_smi_csv(text)

    def _detect_rocm_smi(self) -> list[GpuInfo]:
        return parse_rocm_smi_json(self._run(["rocm-smi", *ROCM_SMI_ARGS]))

    def _detect_apple(self) -> list[GpuInfo]:
        if self.platform != "darwin":
            raise DetectionFailed(f"not macOS (platform {self.platform!r})")
        total = _parse_optional_int(self._run(["sysctl", "-n", "hw.memsize"]).strip())
        if total is None or total <= 0:
            raise DetectionFailed("sysctl hw.memsize did not print a positive integer")
        try:
            name = self._run(["sysctl", "-n", "machdep.cpu.brand_string"]).strip() or "Apple silicon"
        except DetectionFailed:
            name = "Apple silicon"
        free = None
        import torch

        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available() and hasattr(torch, "mps"):
            recommended = getattr(torch.mps, "recommended_max_memory", None)
            current = getattr(torch.mps, "driver_allocated_memory", None)
            if recommended is not None and current is not None:
                free = max(int(recommended()) - int(current()), 0)
        return [
            GpuInfo(
                index=0,
                name=name,
                vendor=GpuVendor.APPLE,
                total_bytes=total,
                free_bytes=free,
                unified_memory=True,
                method=DetectionMethod.APPLE_UNIFIED,
            )
        ]

    def _detect_cpu_virtual(self) -> list[GpuInfo]:
        capacity = self.virtual_capacity_bytes
        if capacity is None:
            physical = _physical_memory_bytes()
            capacity = physical // 2 if physical else 8 << 30
        return [
            GpuInfo(
                index=0,
                name="CPU virtual device",
                vendor=GpuVendor.CPU,
                total_bytes=int(capacity),
                free_bytes=int(capacity),
                unified_memory=True,
                method=DetectionMethod.CPU_VIRTUAL,
            )
        ]


def _nvml_text(value: str | bytes) -> str:
    """NVML returns ``bytes`` in old bindings and ``str`` in new ones."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
