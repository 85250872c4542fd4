"""The torch-arbiter command, run as a real process."""

import subprocess
import sys

import pytest


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch_arbiter.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_demo_runs_both_real_models_and_moves_their_quality():
    out = _run("demo", "--quick", timeout=900)
    assert out.returncode == 0, out.stderr
    blocks = out.stdout.split("\n== ")[1:]
    assert len(blocks) == 4
    chat_targets = [float(line.split("target")[1].split()[0]) for b in blocks for line in b.splitlines()
                    if line.strip().startswith("chat ") and "target" in line]
    assert chat_targets[1] < chat_targets[0] and chat_targets[3] > chat_targets[2]
    assert ("PSNR" in out.stdout or "identical" in out.stdout) and "perplexity" in out.stdout and "0 failures" in out.stdout


def test_unknown_command_fails_with_usage():
    out = _run("frobnicate")
    assert out.returncode == 2 and "usage" in out.stderr
