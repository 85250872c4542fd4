"""The live path (issue 10): what the arbiter grants is what each patched model holds.

Small real modules, patched for real, on a virtual CPU device: preemption frees every Holo byte
and the fixed tensors, a suspended model's forward waits (or raises PreemptedError), switches
run in the model's own context, safe points survive exceptions, and patch() runs forwards in
the allocation's workload scope with out-of-memory recovery (host backend of the allocator).
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from test_allocator import ledger  # noqa: F401  (the isolated-ledger fixture, used by name)
from torch import nn

from torch_arbiter import Arbiter, ArbiterConfig, Priority, WorkloadType, patch
from torch_arbiter import allocator as ta_alloc
from torch_arbiter.allocation import AllocationState
from torch_arbiter.errors import InvalidRequestError, PreemptedError, WorkloadOutOfMemoryError
from torch_arbiter.holo import HoloTensor, save_holo

MIB = 1 << 20


def _mlp(seed: int = 0, width: int = 512) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)).eval()


def _hold_forward(layer: nn.Module, run, name: str | None = None):
    """Start ``run`` in a thread and return once its forward is held at ``layer``'s pre-hook.

    Returns ``(runner, hook, go_on)``: the thread, the hook's handle, and the event that lets the
    forward go on (it is held at most 5 s).
    """
    inside, go_on = threading.Event(), threading.Event()

    def hold(_module, _args):
        inside.set()
        go_on.wait(5)

    hook = layer.register_forward_pre_hook(hold)
    runner = threading.Thread(target=run, name=name)
    runner.start()
    assert inside.wait(5)
    return runner, hook, go_on


def _full_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.fixture(scope="module")
def mlp_holo_dir(tmp_path_factory):
    """``_mlp()``'s two weights encoded once (encoding 512x512 weights takes seconds here)."""
    source = _mlp()
    path = tmp_path_factory.mktemp("mlp") / "holo"
    save_holo(path, {name: HoloTensor.encode(source.get_parameter(name).detach()) for name in ("0.weight", "2.weight")})
    return path


@pytest.fixture
def repro(mlp_holo_dir):
    """The issue's repro: a 2.1 MB model on a device 1.5x its size."""
    model = _mlp()
    reference = _mlp()
    arbiter = Arbiter(ArbiterConfig(vram_bytes=int(_full_bytes(model) * 1.5)))
    managed = patch(model, arbiter, priority=Priority.NORMAL, activation_bytes=0, progress=False, timeout=0.3,
                    holo_dir=mlp_holo_dir)
    assert arbiter.wait_until_settled(10)  # patch(holo_dir=) returns at the floor; the rest streams in
    yield arbiter, model, managed, reference
    managed.unpatch()
    arbiter.close()


def test_issue_repro_a_critical_request_suspends_the_model_and_the_capacity_holds(repro):
    arbiter, model, managed, _ = repro
    assert managed.full_bytes == 2_101_248 and arbiter.state().capacity_bytes == 3_151_872
    critical = arbiter.request_allocation_blocking(WorkloadType.LLM_INFERENCE, Priority.CRITICAL,
                                                   bytes=2_941_747, min_quality=1.0, activation_bytes=0)
    # Before issue 10: 2,941,747 B granted while 3,225,395 B were held (the model kept its floor).
    assert managed.allocation.state is AllocationState.SUSPENDED
    assert managed.resident_bytes == 0 and managed.suspended and managed.quality == 0.0
    assert all(layer.resident_bytes == 0 for layer in managed.layers.values())
    assert managed.resident_bytes + critical.granted_bytes <= arbiter.state().capacity_bytes
    assert arbiter.held_bytes() == {managed.allocation.id: 0, critical.id: 2_941_747}
    with pytest.raises(PreemptedError, match="timeout"):
        model(torch.randn(1, 512))
    critical.release()
    assert arbiter.wait_until_settled(5)
    assert managed.quality == 1.0 and managed.resident_bytes == managed.full_bytes


def test_a_suspended_forward_waits_and_resumes_from_host_memory_without_reloading(repro):
    arbiter, model, managed, reference = repro
    managed.timeout = None
    managed._switch._timeout = None
    fragments = {name: layer.holo.fragment("exact").data_ptr() for name, layer in managed.layers.items()}
    critical = arbiter.request_allocation_blocking(WorkloadType.LLM_INFERENCE, Priority.CRITICAL,
                                                   bytes=2_941_747, min_quality=1.0, activation_bytes=0)
    x = torch.randn(3, 512)
    results = []
    waiter = threading.Thread(target=lambda: results.append(model(x)))
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive() and managed.resident_bytes == 0  # waiting, holding nothing
    critical.release()
    waiter.join(10)
    assert not waiter.is_alive() and torch.equal(results[0], reference(x))
    # The same host tensors came back: a promotion, not a reload.
    assert fragments == {name: layer.holo.fragment("exact").data_ptr() for name, layer in managed.layers.items()}


def test_a_running_forward_finishes_before_the_model_is_suspended(repro):
    arbiter, model, managed, reference = repro
    x = torch.randn(2, 512)
    results = []
    runner, hook, go_on = _hold_forward(model[0], lambda: results.append(model(x)))
    threading.Timer(0.2, go_on.set).start()  # the forward goes on while the request below waits
    critical = arbiter.request_allocation_blocking(WorkloadType.LLM_INFERENCE, Priority.CRITICAL, bytes=2_941_747,
                                                   min_quality=1.0, activation_bytes=0, wait=True, timeout=None)
    assert critical.state is AllocationState.ACTIVE
    hook.remove()
    runner.join(5)
    # The request was handed out only after the running forward ended and the model let go.
    assert torch.equal(results[0], reference(x))
    assert managed.resident_bytes == 0
    critical.release()


def test_a_request_waits_for_the_running_forward_to_let_go(repro):
    arbiter, model, managed, _ = repro
    runner, hook, go_on = _hold_forward(model[0], lambda: model(torch.randn(1, 512)))
    granted = []
    asker = threading.Thread(target=lambda: granted.append(arbiter.request_allocation_blocking(
        WorkloadType.LLM_INFERENCE, Priority.CRITICAL, bytes=2_941_747, min_quality=1.0, activation_bytes=0)))
    asker.start()
    time.sleep(0.2)
    assert not granted and managed.resident_bytes == managed.full_bytes  # still computing
    go_on.set()
    hook.remove()
    asker.join(5)
    runner.join(5)
    assert granted and managed.resident_bytes == 0
    granted[0].release()


def test_switches_run_in_the_applier_thread_never_on_the_callers_event_loop(repro):
    arbiter, _, managed, _ = repro
    threads = []
    move = managed._move
    managed._move = lambda q: (threads.append(threading.current_thread().name), move(q))[1]

    async def ask():
        allocation = await arbiter.request_allocation(WorkloadType.LLM_INFERENCE, Priority.CRITICAL,
                                                      bytes=2_941_747, min_quality=1.0, activation_bytes=0)
        return allocation, threading.current_thread().name

    critical, loop_thread = asyncio.run(ask())
    critical.release()
    assert arbiter.wait_until_settled(5)
    del managed._move
    assert threads and loop_thread not in threads
    assert set(threads) == {"torch_arbiter-applier"}


def test_a_running_model_applies_its_new_level_in_its_own_forward_thread():
    model = _mlp(3, width=128)
    arbiter = Arbiter(ArbiterConfig(vram_bytes=4 * _full_bytes(model)))
    managed = patch(model, arbiter, activation_bytes=0, progress=False)
    threads = []
    move = managed._move
    managed._move = lambda q: (threads.append(threading.current_thread().name), move(q))[1]
    runner, hook, go_on = _hold_forward(model[0], lambda: model(torch.randn(1, 128)), name="forward-thread")
    arbiter.tracker.set_external_bytes(int(3.5 * managed.full_bytes))  # another process takes memory
    arbiter.rebalance()  # from this thread (as the memory monitor would, from its own)
    go_on.set()
    hook.remove()
    runner.join(5)
    assert arbiter.wait_until_settled(5)
    assert threads[0] == "forward-thread" and managed.quality < 1.0
    del managed._move
    managed.unpatch()
    arbiter.close()


# -- safe points survive exceptions -------------------------------------------------------------------


def _unregistered(seed: int = 4):
    model = _mlp(seed, width=128)
    return model, patch(model, register=False, progress=False)


def test_an_exception_in_a_later_hook_leaves_the_count_at_zero():
    model, managed = _unregistered()
    hook = model.register_forward_pre_hook(lambda _m, _a: (_ for _ in ()).throw(RuntimeError("user hook")))
    with pytest.raises(RuntimeError, match="user hook"):
        model(torch.randn(1, 128))
    hook.remove()
    assert managed._switch.running == 0
    assert managed.set_quality(managed.min_quality) is True  # applied at once: nothing runs
    model(torch.randn(1, 128))
    assert managed._switch.running == 0
    managed.unpatch()


def _failing_set_level(level: int) -> None:
    raise RuntimeError("set_level failed")


def test_an_exception_in_set_level_at_a_forwards_exit_leaves_the_count_at_zero():
    model, managed = _unregistered(5)
    layer = next(iter(managed.layers.values()))
    errors = []

    def run():
        try:
            model(torch.randn(1, 128))
        except RuntimeError as exc:
            errors.append(str(exc))

    runner, hook, go_on = _hold_forward(model[2], run)
    assert managed.set_quality(managed.min_quality) is False  # pending: a forward runs
    layer.set_level = _failing_set_level
    hook.remove()
    go_on.set()
    runner.join(5)
    assert errors == ["set_level failed"] and managed._switch.running == 0
    with pytest.raises(RuntimeError, match="set_level failed"):  # idle: raised to the caller
        managed.set_quality(managed.min_quality)
    del layer.set_level
    assert managed._switch.running == 0 and managed.set_quality(1.0) is True
    model(torch.randn(1, 128))
    assert managed._switch.running == 0
    managed.unpatch()


def test_an_exception_in_set_level_at_a_forwards_enter_counts_nothing():
    model = _mlp(8, width=128)
    arbiter = Arbiter(ArbiterConfig(vram_bytes=4 * _full_bytes(model)))
    managed = patch(model, arbiter, activation_bytes=0, progress=False)
    arbiter._applier.stop()  # so the next forward's own thread is the one to apply the change
    layer = next(iter(managed.layers.values()))
    layer.set_level = _failing_set_level
    arbiter.tracker.set_external_bytes(int(3.5 * managed.full_bytes))
    arbiter.rebalance()
    with pytest.raises(RuntimeError, match="set_level failed"):
        model(torch.randn(1, 128))  # enter() applies first, fails: no forward counted
    assert managed._switch.running == 0
    del layer.set_level
    model(torch.randn(1, 128))  # the target is still newer than what was applied: applied now
    assert managed._switch.running == 0 and managed.quality < 1.0
    assert managed.resident_bytes + managed.allocation.activation_bytes <= arbiter.state().capacity_bytes
    managed.unpatch()
    arbiter.close()


def test_an_exception_in_the_forward_releases_the_count_and_the_pending_level_applies():
    model, managed = _unregistered(6)
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 7))  # wrong width
    assert managed._switch.running == 0
    assert managed.set_quality(managed.min_quality) is True and managed.quality == managed.min_quality
    managed.unpatch()


# -- patch() enforces through the workload scope ---------------------------------------------------


class _Allocating(nn.Module):
    """A layer to make live, and a forward that takes ``need`` bytes through the allocator."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 64)
        self.need = 0
        self.seen_workloads: list[int] = []

    def forward(self, x):
        self.seen_workloads.append(ta_alloc.thread_workload())
        if self.need:
            with ta_alloc.HostBlock(self.need):
                pass
        return self.linear(x)


def test_forwards_run_in_the_allocations_workload_scope(ledger):  # noqa: F811
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(1))
    model = _Allocating()
    managed = patch(model, arbiter, activation_bytes=MIB, progress=False)
    model(torch.randn(1, 64))
    assert model.seen_workloads == [ta_alloc.workload_key(managed.allocation.id)]
    loose = _Allocating()
    unenforced = patch(loose, arbiter, activation_bytes=MIB, progress=False, enforce=False)
    loose(torch.randn(1, 64))
    assert loose.seen_workloads == [0]  # outside any scope
    managed.unpatch()
    unenforced.unpatch()
    arbiter.close()


def test_an_out_of_memory_forward_is_recovered_from_lower_priorities(ledger):  # noqa: F811
    arbiter = Arbiter(ArbiterConfig.for_vram_gb(1))
    background = arbiter.request_allocation_blocking(WorkloadType.IMAGE_GENERATION, Priority.LOW,
                                                     bytes=800 * MIB, activation_bytes=0, name="background")
    model = _Allocating()
    managed = patch(model, arbiter, priority=Priority.HIGH, activation_bytes=MIB, progress=False, name="chat")
    model.need = managed.allocation.granted_bytes + 300 * MIB  # past its budget and the free bytes
    before = background.granted_bytes
    model(torch.randn(1, 64))
    assert len(model.seen_workloads) == 2  # refused once, retried once
    assert background.granted_bytes < before and arbiter.stats().oom_recoveries == 1
    model.need = 4096 * MIB  # can never fit: a typed error naming who holds what
    with pytest.raises(WorkloadOutOfMemoryError, match="'chat'"):
        model(torch.randn(1, 64))
    assert managed._switch.running == 0
    managed.unpatch()
    background.release()
    arbiter.close()


def test_a_forward_at_level_zero_outside_patch_is_a_typed_error():
    model, managed = _unregistered(7)
    managed._move(None)
    with pytest.raises(InvalidRequestError, match="suspended"):
        managed.model[0].forward(torch.randn(1, 128))
    managed._move(1.0)
    managed.unpatch()


def test_an_admitted_request_with_wait_false_still_waits_for_the_model_to_let_go(repro):
    arbiter, model, managed, _ = repro
    runner, hook, go_on = _hold_forward(model[0], lambda: model(torch.randn(1, 512)))
    threading.Timer(0.1, go_on.set).start()
    critical = arbiter.request_allocation_blocking(WorkloadType.LLM_INFERENCE, Priority.CRITICAL, bytes=2_941_747,
                                                   min_quality=1.0, activation_bytes=0, wait=False, timeout=5)
    hook.remove()
    runner.join(5)
    assert critical.state is AllocationState.ACTIVE and managed.resident_bytes == 0
    critical.release()
