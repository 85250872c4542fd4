"""`torch-arbiter top` and the status files it reads, with a real second process publishing."""

from __future__ import annotations

import gc
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from torch_arbiter import Arbiter, ArbiterConfig
from torch_arbiter.cli import main
from torch_arbiter.errors import InvalidRequestError
from torch_arbiter.status import read_statuses, status_dir

_PUBLISHER = textwrap.dedent("""
    import sys, time, torch
    from torch import nn
    from torch_arbiter import Arbiter, ArbiterConfig, Priority, WorkloadType
    from torch_arbiter.hooks import patch
    torch.manual_seed(0)
    arbiter = Arbiter(ArbiterConfig(vram_bytes=4 << 20, status_interval_s=0.1))
    managed = patch(nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256)), arbiter, name="publisher-net",
                    workload=WorkloadType.IMAGE_GENERATION, priority=Priority.CRITICAL, activation_bytes=0,
                    progress=False)
    print("ready", flush=True)
    sys.stdin.readline()
    managed.set_quality(0.5)
    arbiter.update_priority(managed.allocation, Priority.LOW)
    print("changed", flush=True)
    time.sleep(60)
""")


def _top_once(capsys) -> str:
    assert main(["top", "--once"]) == 0
    return capsys.readouterr().out


def _wait_for(condition, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_top_lists_another_process_and_skips_it_once_it_is_dead(tmp_path, monkeypatch, capsys):
    directory = tmp_path / "status"
    monkeypatch.setenv("TORCH_ARBITER_STATUS_DIR", str(directory))
    monkeypatch.setenv("COLUMNS", "200")
    env = dict(os.environ)
    publisher = subprocess.Popen([sys.executable, "-c", _PUBLISHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, env=env)
    try:
        assert publisher.stdout.readline().strip() == "ready"
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        [path] = directory.glob(f"{publisher.pid}-*.json")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600

        _wait_for(lambda: [w["name"] for s in read_statuses(directory) for w in s["workloads"]] == ["publisher-net"])
        out = _top_once(capsys)
        row = next(line for line in out.splitlines() if "publisher-net" in line)
        assert f"pid {publisher.pid}" in out and "CRITICAL" in row and "1.000" in row

        publisher.stdin.write("\n")
        publisher.stdin.flush()
        assert publisher.stdout.readline().strip() == "changed"
        # Neither change alters a granted quality (no listener call): the periodic write carries them.
        _wait_for(lambda: [(w["quality"], w["priority"]) for s in read_statuses(directory) for w in s["workloads"]]
                  == [(0.5, "LOW")])
        [status] = read_statuses(directory)
        assert status["pid"] == publisher.pid and status["workloads"][0]["resident_bytes"] < status["workloads"][0]["full_bytes"]
    finally:
        publisher.kill()
        publisher.wait()
    assert path.exists()  # killed: close() never ran
    assert "no arbiter is running" in _top_once(capsys)
    assert not path.exists()  # the dead process's file was removed


def test_closing_an_arbiter_removes_its_status_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_ARBITER_STATUS_DIR", str(tmp_path))
    with Arbiter(ArbiterConfig(vram_bytes=1 << 20)):
        [status] = read_statuses(tmp_path)
        assert status["pid"] == os.getpid() and status["workloads"] == [] and status["total_bytes"] == 1 << 20
    assert read_statuses(tmp_path) == []
    with Arbiter(ArbiterConfig(vram_bytes=1 << 20, status_interval_s=None)):
        assert read_statuses(tmp_path) == []


def test_a_dropped_arbiter_takes_its_status_file_with_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_ARBITER_STATUS_DIR", str(tmp_path))
    arbiter = Arbiter(ArbiterConfig(vram_bytes=1 << 20, status_interval_s=0.05))
    assert len(read_statuses(tmp_path)) == 1
    del arbiter
    gc.collect()
    _wait_for(lambda: not list(tmp_path.glob("*.json")))


def test_a_status_dir_others_can_write_is_refused(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("TORCH_ARBITER_STATUS_DIR", str(shared))
    with pytest.raises(InvalidRequestError, match="writable by others"):
        status_dir()
    with Arbiter(ArbiterConfig(vram_bytes=1 << 20)):  # the arbiter runs on without a status file
        assert list(shared.iterdir()) == []


def test_half_written_and_foreign_files_are_skipped(tmp_path):
    (tmp_path / f"{os.getpid()}-99.json").write_text('{"pid": ')
    (tmp_path / "notes.json").write_text(json.dumps({"pid": 1}))
    assert read_statuses(tmp_path) == []


def test_top_quits_on_ctrl_c_without_a_traceback(tmp_path):
    env = dict(os.environ, TORCH_ARBITER_STATUS_DIR=str(tmp_path))
    process = subprocess.Popen([sys.executable, "-m", "torch_arbiter.cli", "top", "--interval", "0.1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert "no arbiter is running" in process.stdout.readline()
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130 and "Traceback" not in err and "interrupted" in err
