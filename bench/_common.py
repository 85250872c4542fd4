"""Shared helpers of the benchmarks: machine description, timing, results files.

Every benchmark writes ``bench/results/<name>.md`` (a table for people) and
``<name>.json`` (the raw figures) that start with the machine and the command.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

__all__ = ["machine_info", "time_call", "write_results", "RESULTS_DIR", "evaluation_text", "evaluation_sentences"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    """CPU model, core count, memory, Python and torch versions, GPU if any."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1)
    except (ValueError, OSError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def time_call(fn: Callable[[], object], *, repeat: int = 21, number: int = 1, warmup: int = 2) -> dict:
    """Median, min and p90 seconds of ``fn()`` over ``repeat`` rounds of ``number`` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - t0) / number)
    samples.sort()
    return {
        "median_s": statistics.median(samples),
        "min_s": samples[0],
        "p90_s": samples[min(len(samples) - 1, int(0.9 * len(samples)))],
        "repeat": repeat,
        "number": number,
    }


#: Calibration text of the SmolLM2 benchmarks: another licence than the evaluation text (GPL-3).
CALIBRATION_TEXT = Path("/usr/share/common-licenses/Apache-2.0")
CALIBRATION_TOKENS = 1024


def calibration_ids(tokenizer):
    """The first :data:`CALIBRATION_TOKENS` token ids ``[1, n]`` of :data:`CALIBRATION_TEXT`."""
    from torch_arbiter.demo import models

    text = models.reference_text(CALIBRATION_TEXT)[:8000]
    return tokenizer(text, return_tensors="pt").input_ids[:, :CALIBRATION_TOKENS]


def write_results(name: str, title: str, table_md: str, data: dict, notes: str = "") -> Path:
    """Write ``results/<name>.md`` and ``results/<name>.json``; return the .md path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    md = [f"# {title}", "", f"Command: `{command}`", "",
          "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "", table_md.rstrip(), ""]
    if notes:
        md += [notes.rstrip(), ""]
    path = RESULTS_DIR / f"{name}.md"
    _atomic_write(path, "\n".join(md))
    _atomic_write(RESULTS_DIR / f"{name}.json", json.dumps({"command": command, "machine": info, **data}, indent=2))
    return path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


#: Standard-library modules whose docstrings are the evaluation text of the codec benchmark:
#: technical prose in another domain than the licences the calibrated rows are fitted on, present
#: on every machine with this Python and held nowhere in the project.
EVALUATION_MODULES = ("argparse", "collections/__init__", "json/__init__", "pathlib", "subprocess",
                      "threading", "email/message", "logging/__init__", "tarfile", "zipfile",
                      "asyncio/events", "unittest/case", "http/client", "urllib/request", "datetime")


def evaluation_text() -> str:
    """Docstrings of :data:`EVALUATION_MODULES` (module, classes, functions) in source order.

    Returns:
        The docstrings joined by blank lines, whitespace inside each collapsed to single spaces.
    """
    import ast
    import re
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for module in EVALUATION_MODULES:
        source = (stdlib / f"{module}.py").read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(re.sub(r"\s+", " ", doc).strip())
    return "\n\n".join(parts)


def distinct_sentences(text: str, count: int) -> list[str]:
    """The first ``count`` distinct sentences (25 to 300 characters, not ``>>>`` examples) of ``text``."""
    import re

    pieces = [s.strip() for s in re.split(r"(?<=[.;:!?])\s+", text)]
    unique = list(dict.fromkeys(s for s in pieces if 25 <= len(s) <= 300 and not s.startswith(">>>")))
    return unique[:count]


def evaluation_sentences(count: int) -> list[str]:
    """The first ``count`` distinct sentences of :func:`evaluation_text`."""
    return distinct_sentences(evaluation_text(), count)


#: Prose of another kind than the docstrings, also on this machine and held nowhere in the
#: project: sentences of two Perl manuals (an article on localisation, and the diagnostics list).
OTHER_EVALUATION_TEXTS = {"TPJ13": "/usr/share/perl/5.36.0/Locale/Maketext/TPJ13.pod",
                          "perldiag": "/usr/share/perl/5.36.0/pod/perldiag.pod"}


def other_evaluation_sentences(count: int) -> dict[str, list[str]]:
    """The first ``count`` distinct sentences of each of :data:`OTHER_EVALUATION_TEXTS` that
    exists here (POD commands, verbatim blocks and formatting codes left out)."""
    import re

    texts = {}
    for name, path in OTHER_EVALUATION_TEXTS.items():
        if not Path(path).is_file():
            continue
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
        text = "\n".join(line for line in lines if not line.startswith(("=", " ", "\t")))
        texts[name] = distinct_sentences(re.sub(r"\s+", " ", re.sub(r"[A-Z]<([^<>]*)>", r"\1", text)), count)
    return texts
