"""One invariant, tested hard: what the arbiter grants is what each patched model holds.

A hypothesis state machine drives tiny real ``nn.Module`` models, patched for real, while two
threads run forwards on them without pause. Its rules patch and unpatch models, request and
release bare allocations, change priorities and the memory other processes take (the virtual
tracker). Checked:

- at every rule's end (once lowerings caused by other processes have passed their safe points):
  the resident bytes of every patched model plus its activation reserve, plus the bare grants,
  fit within capacity minus external bytes;
- inside every forward (in the forward's thread): the model runs at no level above its grant,
  unless a newer, lower target arrived after the forward started (it finishes first);
- a suspended model holds 0 Holo bytes (and its forwards wait or raise PreemptedError);
- after everything is released, every count is back to zero.
"""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from torch import nn

from torch_arbiter import Arbiter, ArbiterConfig, Priority, WorkloadType, patch
from torch_arbiter.allocation import AllocationState
from torch_arbiter.errors import ArbiterError, PreemptedError
from torch_arbiter.holo import HoloTensor, save_holo

WIDTH = 48
RESERVE = 2048


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH)).eval()


@pytest.fixture(scope="module")
def tiny_holo_dir(tmp_path_factory):
    source = _tiny()
    path = tmp_path_factory.mktemp("tiny") / "holo"
    save_holo(path, {name: HoloTensor.encode(source.get_parameter(name).detach()) for name in ("0.weight", "2.weight")})
    return path


class LivePath(RuleBasedStateMachine):
    holo_dir = None

    def __init__(self):
        super().__init__()
        full = _tiny_full_bytes()
        self.arbiter = Arbiter(ArbiterConfig(vram_bytes=int(2.5 * (full + RESERVE))))
        self.models: list = []  # (module, managed)
        self.bare: list = []
        self.violations: list[str] = []
        self.forwards = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run_forwards, args=(i,), daemon=True) for i in range(2)]
        for thread in self.threads:
            thread.start()

    # -- the forward threads --------------------------------------------------------------------

    def _run_forwards(self, index: int) -> None:
        x = torch.randn(1, WIDTH)
        turn = index
        while not self.stop.is_set():
            with self.lock:
                models = list(self.models)
            if not models:
                self.stop.wait(0.002)
                continue
            turn += 1
            module, managed = models[turn % len(models)]
            try:
                module(x)
            except PreemptedError:
                pass  # suspended past its timeout: the documented outcome
            except Exception as exc:  # noqa: BLE001 - anything else breaks the contract
                if managed.patched:
                    self.violations.append(f"forward raised {type(exc).__name__}: {exc}")
            self.forwards += 1

    def _check_inside_forward(self, managed) -> None:
        """Run inside a model's forward: its level is not above its grant, or a newer target is due."""
        arbiter, allocation = self.arbiter, managed.allocation
        with arbiter._lock:
            due = arbiter._stale(allocation)
            weights = managed.resident_bytes
            if allocation.state is AllocationState.ACTIVE:
                allowed = allocation.granted_bytes - allocation.activation_bytes
            else:
                allowed = 0
            if not managed.patched:
                return  # unpatch() began while this forward ran: its layers are being put back
            if weights > allowed and not due:
                self.violations.append(f"{allocation.name} runs with {weights} B above its grant of {allowed} B")
            if weights == 0:
                self.violations.append(f"{allocation.name} ran a forward holding nothing")

    # -- rules ------------------------------------------------------------------------------------

    # Rules draw the same data whatever happened before (patch or a request may fail on timing),
    # so hypothesis replays a run exactly: no preconditions, picks taken modulo what exists.

    @rule(priority=st.sampled_from(list(Priority)))
    def patch_model(self, priority):
        if len(self.models) >= 3:
            return
        module = _tiny()
        try:
            managed = patch(module, self.arbiter, priority=priority, activation_bytes=RESERVE, progress=False,
                            holo_dir=self.holo_dir, timeout=0.05, name=f"m{len(self.models)}-{priority.name}")
        except ArbiterError:
            return  # no room for its floor now: patch() left the module as it was
        module[0].register_forward_pre_hook(lambda _m, _a, managed=managed: self._check_inside_forward(managed))
        with self.lock:
            self.models.append((module, managed))

    @rule(pick=st.integers(0, 99))
    def unpatch_model(self, pick):
        if self.models:
            with self.lock:
                module, managed = self.models.pop(pick % len(self.models))
            managed.unpatch()

    @rule(priority=st.sampled_from(list(Priority)), share=st.floats(0.05, 0.9))
    def request_bare(self, priority, share):
        capacity = self.arbiter.state().capacity_bytes
        try:
            self.bare.append(self.arbiter.request_allocation_blocking(
                WorkloadType.IMAGE_GENERATION, priority, bytes=max(1, int(share * capacity)), min_quality=0.5,
                activation_bytes=0, timeout=0.2))
        except ArbiterError:
            pass

    @rule(pick=st.integers(0, 99))
    def release_bare(self, pick):
        if self.bare:
            self.bare.pop(pick % len(self.bare)).release()

    @rule(pick=st.integers(0, 99), priority=st.sampled_from(list(Priority)))
    def change_priority(self, pick, priority):
        allocations = [m.allocation for _, m in self.models] + self.bare
        if allocations:
            self.arbiter.update_priority(allocations[pick % len(allocations)], priority)

    @rule(share=st.floats(0.0, 0.8))
    def change_external_bytes(self, share):
        self.arbiter.tracker.set_external_bytes(int(share * self.arbiter.tracker.read().total_bytes))
        self.arbiter.rebalance()
        # Memory another process took is given back by the models at their next safe points.
        assert self.arbiter.wait_until_settled(5), "the models did not settle after an external change"

    # -- invariants -------------------------------------------------------------------------------

    @invariant()
    def what_is_granted_is_what_is_held(self):
        # Between moves: while a model lowers, a fragment it shares is charged to its other holder
        # as soon as it lets go, and the arbiter learns at that model's commit (its own held bytes
        # cover the fragment until then), so per model the check holds between moves only.
        with contextlib.ExitStack() as quiet:
            for _, managed in list(self.models):
                quiet.enter_context(managed._lock)
            self._check_held()
        assert not self.violations, self.violations[:3]

    def _check_held(self):
        with self.arbiter._lock:
            capacity = self.arbiter.state().capacity_bytes
            held = self.arbiter.held_bytes()
            models = 0
            for _, managed in self.models:
                resident = managed.resident_bytes
                models += resident + (managed.allocation.activation_bytes if resident else 0)
                assert resident <= held.get(managed.allocation.id, 0), "a model holds more than it committed"
                if managed.allocation.state is not AllocationState.ACTIVE:
                    if not self.arbiter._stale(managed.allocation):
                        assert resident == 0 and all(
                            layer.resident_bytes == 0 for layer in managed.layers.values()), "suspended but holding"
            bare = sum(held.get(a.id, 0) for a in self.bare)
            assert models + bare <= capacity, f"{models} B in models + {bare} B bare > {capacity} B"
            assert sum(held.values()) <= capacity

    def teardown(self):
        try:
            for _, managed in self.models:
                managed.unpatch()
            for allocation in self.bare:
                allocation.release()
            self.stop.set()
            for thread in self.threads:
                thread.join(5)
            assert not self.violations, self.violations[:3]
            assert self.arbiter.allocations() == [] and self.arbiter.held_bytes() == {}
            assert self.arbiter.state().granted_bytes == 0 and self.arbiter.tracker.read().granted_bytes == 0
            assert all(m._switch.running == 0 for _, m in self.models)
            assert not self.arbiter._bound and not self.arbiter._held and not self.arbiter._applier._settles
        finally:
            self.stop.set()
            self.arbiter.close()


def _tiny_full_bytes() -> int:
    return sum(p.numel() * p.element_size() for p in _tiny().parameters())


def test_what_the_arbiter_grants_is_what_each_model_holds(tiny_holo_dir):
    LivePath.holo_dir = tiny_holo_dir
    runner = LivePath.TestCase()
    runner.settings = settings(max_examples=30, stateful_step_count=20, deadline=None,
                               suppress_health_check=list(HealthCheck))
    runner.runTest()
