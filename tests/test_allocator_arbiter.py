"""The allocator under a real Arbiter on CPU: scopes, limits that follow the arbiter's decisions,
and out-of-memory recovery through the host backend (the same library calls as on CUDA)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from test_allocator import ledger  # noqa: F401  (the isolated-ledger fixture, used by name)

from torch_arbiter import Priority, WorkloadType
from torch_arbiter import allocator as ta_alloc
from torch_arbiter.arbiter import Arbiter, ArbiterConfig
from torch_arbiter.errors import AllocatorError, InvalidRequestError, WorkloadOutOfMemoryError

MIB = 1 << 20


@pytest.fixture
def arbiter(ledger):  # noqa: F811
    arb = Arbiter(ArbiterConfig.for_vram_gb(1))
    yield arb
    arb.close()


def _request(arb: Arbiter, kind: WorkloadType, priority: Priority, mib: int, name: str):
    return arb.request_allocation_blocking(kind, priority, bytes=mib * MIB, activation_bytes=10 * MIB, name=name)


def test_scope_selects_the_workload_and_sets_its_limit(arbiter, ledger):  # noqa: F811
    chat = _request(arbiter, WorkloadType.LLM_INFERENCE, Priority.LOW, 800, "chat")
    key = ta_alloc.workload_key(chat.id)
    with arbiter.workload(chat) as scoped:
        assert scoped is chat and ta_alloc.thread_workload() == key
        assert ledger.usage(key).limit == chat.granted_bytes
        with arbiter.workload(WorkloadType.LLM_INFERENCE):  # by kind: the one active allocation
            assert ta_alloc.thread_workload() == key
    assert ta_alloc.thread_workload() == ta_alloc.DEFAULT_WORKLOAD


def test_limit_follows_rebalances_while_the_scope_is_open(arbiter, ledger):  # noqa: F811
    chat = _request(arbiter, WorkloadType.LLM_INFERENCE, Priority.LOW, 800, "chat")
    key = ta_alloc.workload_key(chat.id)
    with arbiter.workload(chat):
        full_grant = chat.granted_bytes
        ta_alloc.HostBlock(500 * MIB).free()  # fits the full-quality grant
        image = _request(arbiter, WorkloadType.IMAGE_GENERATION, Priority.HIGH, 600, "image")
        assert chat.granted_bytes < full_grant  # the arbiter lowered chat ...
        assert ledger.usage(key).limit == chat.granted_bytes  # ... and the listener followed
        with pytest.raises(torch.OutOfMemoryError):
            ta_alloc.HostBlock(500 * MIB)
    image.release()
    assert ledger.usage(key).limit == chat.granted_bytes == full_grant  # raised back


def test_released_allocation_is_forgotten_and_cannot_be_scoped(arbiter, ledger):  # noqa: F811
    chat = _request(arbiter, WorkloadType.LLM_INFERENCE, Priority.LOW, 100, "chat")
    image = _request(arbiter, WorkloadType.IMAGE_GENERATION, Priority.HIGH, 100, "image")
    with arbiter.workload(chat):
        pass
    chat.release()
    with arbiter.workload(image):  # entering any scope sweeps the released ones
        pass
    assert ledger.usage(ta_alloc.workload_key(chat.id)) is None
    with pytest.raises(InvalidRequestError, match="released"):
        with ta_alloc.workload_scope(arbiter, chat):
            pass


def test_oom_is_recovered_by_reclaiming_from_lower_priorities(arbiter, ledger):  # noqa: F811
    chat = _request(arbiter, WorkloadType.LLM_INFERENCE, Priority.LOW, 800, "chat")
    image = _request(arbiter, WorkloadType.IMAGE_GENERATION, Priority.HIGH, 600, "image")
    chat_before, image_grant = chat.granted_bytes, image.granted_bytes
    attempts = []

    def step(nbytes: int) -> int:
        attempts.append(nbytes)
        with ta_alloc.HostBlock(nbytes) as block:  # refused at first: past image's grant
            return block.nbytes

    need = image_grant + 40 * MIB
    assert ta_alloc.run_with_recovery(arbiter, image, step, need) == need
    assert len(attempts) == 2  # one refusal, one successful retry
    assert image.granted_bytes >= need and chat.granted_bytes < chat_before
    assert ledger.usage(ta_alloc.workload_key(image.id)).limit == image.granted_bytes
    assert ledger.usage(ta_alloc.workload_key(chat.id)).limit == chat.granted_bytes


def test_successive_refusals_in_one_call_are_each_recovered(arbiter, ledger):  # noqa: F811
    chat = _request(arbiter, WorkloadType.LLM_INFERENCE, Priority.LOW, 800, "chat")
    image = _request(arbiter, WorkloadType.IMAGE_GENERATION, Priority.HIGH, 100, "image")
    first = image.granted_bytes + 40 * MIB
    asked: list[int] = []
    attempts: list[int] = []

    def two_blocks() -> None:
        attempts.append(1)
        with ta_alloc.HostBlock(first):
            if not asked:  # what is still reclaimable once the first block fits
                floor = int(chat.min_quality * chat.full_bytes) + chat.activation_bytes
                free = arbiter.state().capacity_bytes - sum(a.granted_bytes for a in arbiter.allocations())
                asked.append(int(0.7 * (chat.granted_bytes - floor + free)))
            with ta_alloc.HostBlock(asked[0]):  # refused again: the retry asks twice the shortfall
                pass

    ta_alloc.run_with_recovery(arbiter, image, two_blocks, retries=3)
    assert len(attempts) == 3  # refused on the first block, then on the second, then through
    assert image.granted_bytes >= first + asked[0]
    assert ledger.usage(ta_alloc.workload_key(image.id)).limit == image.granted_bytes


def test_unrecoverable_oom_names_who_holds_what(arbiter, ledger):  # noqa: F811
    chat = _request(arbiter, WorkloadType.LLM_INFERENCE, Priority.LOW, 400, "chat")
    image = _request(arbiter, WorkloadType.IMAGE_GENERATION, Priority.HIGH, 300, "image")
    with arbiter.workload(chat):
        held = ta_alloc.HostBlock(100 * MIB)
    try:
        with pytest.raises(WorkloadOutOfMemoryError) as caught:
            ta_alloc.run_with_recovery(arbiter, image, lambda: ta_alloc.HostBlock(2048 * MIB), retries=2)
        message = str(caught.value)
        assert "'image'" in message and f"{2048 * MIB} bytes refused" in message
        assert f"chat (allocation {chat.id}): {100 * MIB} bytes" in message
        assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)
    finally:
        held.free()


def test_recovery_arguments_and_other_errors(arbiter, ledger):  # noqa: F811
    image = _request(arbiter, WorkloadType.IMAGE_GENERATION, Priority.HIGH, 100, "image")
    with pytest.raises(InvalidRequestError):
        ta_alloc.run_with_recovery(arbiter, image, lambda: None, retries=-1)
    with pytest.raises(WorkloadOutOfMemoryError, match="after 0 recoveries"):
        ta_alloc.run_with_recovery(arbiter, image, lambda: ta_alloc.HostBlock(image.granted_bytes + 1), retries=0)

    key = ta_alloc.workload_key(image.id)
    with arbiter.workload(image):
        ledger.set_limit(key, None)  # within budget, the backend itself fails: worth a retry
        with pytest.raises(torch.OutOfMemoryError):
            ta_alloc.HostBlock(1 << 62)
    assert ta_alloc.last_refusal().reason == "backend"
    assert ta_alloc.recover_from_oom(arbiter, image)
    ta_alloc.clear_refusal()
    assert not ta_alloc.recover_from_oom(arbiter, image)  # not a refusal of the library
    with pytest.raises(InvalidRequestError):
        ta_alloc.recover_from_oom(arbiter, image, headroom=0.5)

    def broken() -> None:
        raise KeyError("not a memory problem")

    with pytest.raises(KeyError):
        ta_alloc.run_with_recovery(arbiter, image, broken)


def test_scoped_arbiter_stays_collectable(ledger):  # noqa: F811
    arb = Arbiter(ArbiterConfig.for_vram_gb(1))
    chat = _request(arb, WorkloadType.LLM_INFERENCE, Priority.LOW, 100, "chat")
    with arb.workload(chat):
        pass
    chat.release()
    ref = weakref.ref(arb)
    del arb, chat
    gc.collect()
    assert ref() is None  # the limit listener does not keep arbiters alive


def test_cpu_scope_without_a_usable_ledger_still_selects_the_workload(caplog):
    ta_alloc.detach_ledgers()
    prefix = f"ta_test_noledger_{os.getpid()}"
    ta_alloc.set_ledger_prefix(prefix)
    path = f"/dev/shm/{prefix}.u{os.geteuid()}.d0"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.fchmod(fd, 0o644)  # a segment the library refuses to use
    os.close(fd)
    arb = Arbiter(ArbiterConfig.for_vram_gb(1))
    try:
        chat = _request(arb, WorkloadType.LLM_INFERENCE, Priority.LOW, 100, "chat")
        with arb.workload(chat):
            assert ta_alloc.thread_workload() == ta_alloc.workload_key(chat.id)
        assert "no allocator ledger" in caplog.text
    finally:
        arb.close()
        os.unlink(path)
        ta_alloc.detach_ledgers()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_install_without_cuda_says_what_to_do():
    with pytest.raises(AllocatorError, match="CUDA build of PyTorch"):
        ta_alloc.install()
    assert not ta_alloc.is_installed()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_check_script_says_it_needs_a_gpu():
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "no CUDA device is visible" in run.stderr and "host backend" in run.stderr
