"""The torch-arbiter command, run as a real process."""

import subprocess
import sys


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch_arbiter.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_demo_runs_and_shows_each_workloads_quality():
    out = _run("demo", "--quick")
    assert out.returncode == 0, out.stderr
    assert "quality" in out.stdout and "chat" in out.stdout and "image" in out.stdout


def test_unknown_command_fails_with_usage():
    out = _run("frobnicate")
    assert out.returncode == 2 and "usage" in out.stderr
