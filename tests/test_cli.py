"""The torch-arbiter command, run as a real process."""

import json
import subprocess
import sys

import pytest
from PIL import Image

import torch_arbiter
from torch_arbiter.cli import main


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch_arbiter.cli", *args], capture_output=True, text=True, timeout=timeout)


def _quality_around(samples, name, index):
    """(target quality of ``name`` in the sample before ``index``, the same in the last sample of the run
    that starts at ``index`` with unchanged external bytes and priorities)."""
    before = samples[index - 1]["workloads"][name]["target_quality"]
    key = (samples[index]["external_bytes"], samples[index]["workloads"][name]["priority"])
    after = [s["workloads"][name]["quality"] for s in samples[index:]
             if name in s["workloads"] and (s["external_bytes"], s["workloads"][name]["priority"]) == key]
    return before, after[-1]


@pytest.mark.slow
def test_demo_quick_writes_its_files_and_the_trace_follows_the_scenario(tmp_path):
    out = _run("demo", "--quick", "--out", str(tmp_path), timeout=900)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    names = {p.name for p in tmp_path.iterdir()}
    assert {"timeline.png", "trace.json", "chat.md", "summary.md"} <= names
    digits = sorted(n for n in names if n.startswith("digits_q") and n.endswith(".png"))
    assert len(digits) >= 2
    for name in ["timeline.png", *digits]:
        with Image.open(tmp_path / name) as image:
            image.load()
            assert image.width > 100 and image.height > 50
    for name in digits:
        assert f"({name})" in (tmp_path / "summary.md").read_text()

    trace = json.loads((tmp_path / "trace.json").read_text())
    samples = trace["samples"]
    assert trace["units"]["*_bytes"] == "bytes" and len(trace["events"]) >= 4
    for sample in samples:
        assert {"device_bytes", "capacity_bytes", "external_bytes", "granted_bytes", "resident_bytes"} <= sample.keys()
        assert sample["granted_bytes"] <= sample["capacity_bytes"]
        assert sum(w["granted_bytes"] for w in sample["workloads"].values()) == sample["granted_bytes"]
    # The other process takes memory: the chat is lowered.
    rise = next(i for i, s in enumerate(samples) if s["external_bytes"] > samples[0]["external_bytes"])
    before, after = _quality_around(samples, "chat", rise)
    assert after < before
    # The image job becomes CRITICAL: it is raised.
    critical = next(i for i, s in enumerate(samples) if s["workloads"].get("image", {}).get("priority") == "CRITICAL")
    before, after = _quality_around(samples, "image", critical)
    assert after > before
    # The other process exits: the chat climbs back to full quality.
    assert samples[-1]["external_bytes"] == 0 and samples[-1]["workloads"]["chat"]["quality"] == 1.0

    chat = (tmp_path / "chat.md").read_text()
    assert chat.count("\n## ") >= 4 and "*quality 1.000*" in chat and "What is the capital of France?" in chat
    assert "\\n" not in chat  # answers are written as text, not as escaped Python strings


@pytest.mark.slow
def test_demo_says_which_device_size_is_enough_before_loading_the_llm():
    out = _run("demo", "--vram-gb", "0.05", "--out", "/dev/null/never", timeout=600)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    message = out.stderr.strip().splitlines()[-1]
    assert "--vram-gb 0.05 is too small for this demo" in message and "min_quality" not in message
    enough = float(message.split("Pass --vram-gb ")[1].split()[0])
    assert 0.05 < enough < 1.0


@pytest.mark.parametrize("value", ["nan", "inf", "-4", "0", "many"])
def test_demo_refuses_a_bad_device_size_in_demo_terms(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", f"--vram-gb={value}"])
    assert exit_info.value.code == 2
    assert "--vram-gb: must be a size in GiB greater than 0" in capsys.readouterr().err


def test_a_bad_device_size_is_refused_before_anything_loads():
    out = _run("demo", "--vram-gb=nan", timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr and out.stdout == ""
    assert "leave it out to size the virtual device" in out.stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"torch-arbiter {torch_arbiter.__version__}"


def test_unknown_command_fails_with_usage():
    out = _run("frobnicate")
    assert out.returncode == 2 and "usage" in out.stderr
