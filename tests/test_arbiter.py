"""Behaviour of the Arbiter on a virtual (CPU) device."""

import asyncio
import math
import threading
import time

import pytest

from torch_arbiter import (
    AllocationState,
    AllocationTimeoutError,
    Arbiter,
    ArbiterConfig,
    GpuMemoryTracker,
    InsufficientMemoryError,
    InvalidRequestError,
    Priority,
    QualityPolicy,
    UnknownWorkloadError,
    WorkloadType,
)

GIB = 1 << 30
LLM, IMAGE, VIDEO = WorkloadType.LLM_INFERENCE, WorkloadType.IMAGE_GENERATION, WorkloadType.VIDEO_GENERATION


@pytest.fixture
def arbiter():
    with Arbiter(ArbiterConfig.for_vram_gb(16)) as arb:
        yield arb


def snapshot(arb):
    s = arb.state()
    return [(w.id, w.state, w.quality, w.granted_bytes, w.priority) for w in s.workloads]


def test_seed_doc_example_llm_keeps_quality_image_is_lowered_then_climbs_back(arbiter):
    async def scenario():
        llm = await arbiter.request_allocation(LLM, Priority.USER_FACING)
        img = await arbiter.request_allocation(IMAGE, Priority.BACKGROUND)
        during = (llm.quality, img.quality)
        llm.release()
        return during, img.quality

    (llm_q, img_q), img_after = asyncio.run(scenario())
    assert llm_q == 1.0
    assert img_q < llm_q and img_q >= IMAGE.floor
    assert img_after == 1.0
    stats = arbiter.stats()
    assert (stats.grants, stats.releases, stats.quality_reductions, stats.quality_increases) == (2, 1, 0, 1)


def test_granted_bytes_are_quality_times_size_plus_activations(arbiter):
    a = arbiter.request_allocation_blocking(LLM, Priority.HIGH, bytes=4 * GIB, activation_bytes=GIB)
    assert a.quality == 1.0 and a.granted_bytes == 5 * GIB and a.full_bytes == 4 * GIB
    assert arbiter.state().granted_bytes == 5 * GIB
    assert arbiter.tracker.read().granted_bytes == 5 * GIB


def test_new_request_rebalances_every_running_workload_and_listeners_see_lowerings_first(arbiter):
    seen = []
    arbiter.add_listener(lambda changes: seen.append([(c.allocation.name, c.lowered) for c in changes]))
    a = arbiter.request_allocation_blocking(IMAGE, Priority.NORMAL, bytes=8 * GIB, activation_bytes=0, name="a")
    b = arbiter.request_allocation_blocking(IMAGE, Priority.NORMAL, bytes=8 * GIB, activation_bytes=0, name="b")
    assert a.quality == 1.0 and b.quality == 1.0
    c = arbiter.request_allocation_blocking(LLM, Priority.HIGH, bytes=8 * GIB, activation_bytes=0, name="c")
    assert c.quality == 1.0 and math.isclose(a.quality, 0.5) and math.isclose(b.quality, 0.5)
    assert seen[-1] == [("a", True), ("b", True)]
    c.release()
    assert seen[-1] == [("a", False), ("b", False)]
    assert a.quality == b.quality == 1.0


def test_waiting_requests_are_served_fifo_within_a_priority(arbiter):
    big = arbiter.request_allocation_blocking(VIDEO, Priority.HIGH, bytes=16 * GIB, min_quality=1.0, activation_bytes=0)
    order = []

    def ask(name):
        a = arbiter.request_allocation_blocking(IMAGE, Priority.NORMAL, bytes=10 * GIB, min_quality=1.0, activation_bytes=0, name=name, timeout=10)
        order.append(name)
        time.sleep(0.05)
        a.release()

    first = threading.Thread(target=ask, args=("first",))
    first.start()
    while arbiter.state().waiting < 1:
        time.sleep(0.005)
    second = threading.Thread(target=ask, args=("second",))
    second.start()
    while arbiter.state().waiting < 2:
        time.sleep(0.005)
    big.release()
    first.join(5)
    second.join(5)
    assert order == ["first", "second"]
    stats = arbiter.stats()
    assert stats.waits == 2 and stats.average_wait_s > 0


def test_timeout_raises_typed_error_and_leaves_state_unchanged(arbiter):
    arbiter.request_allocation_blocking(VIDEO, Priority.HIGH, bytes=16 * GIB, min_quality=1.0, activation_bytes=0)
    before = snapshot(arbiter)
    t0 = time.monotonic()
    with pytest.raises(AllocationTimeoutError, match="timeout|within"):
        arbiter.request_allocation_blocking(IMAGE, Priority.LOW, bytes=GIB, min_quality=1.0, timeout=0.2)
    assert 0.15 < time.monotonic() - t0 < 2
    assert snapshot(arbiter) == before
    assert arbiter.stats().timeouts == 1


def test_async_timeout_and_cancel(arbiter):
    arbiter.request_allocation_blocking(VIDEO, Priority.HIGH, bytes=16 * GIB, min_quality=1.0, activation_bytes=0)
    before = snapshot(arbiter)

    async def scenario():
        with pytest.raises(AllocationTimeoutError):
            await arbiter.request_allocation(IMAGE, Priority.LOW, bytes=GIB, min_quality=1.0, timeout=0.1)
        task = asyncio.create_task(arbiter.request_allocation(IMAGE, Priority.LOW, bytes=GIB, min_quality=1.0))
        await asyncio.sleep(0.05)
        assert arbiter.state().waiting == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert snapshot(arbiter) == before


def test_async_waiter_is_woken_by_a_release_from_another_thread(arbiter):
    holder = arbiter.request_allocation_blocking(VIDEO, Priority.HIGH, bytes=16 * GIB, min_quality=1.0, activation_bytes=0)

    async def scenario():
        threading.Timer(0.1, holder.release).start()
        async with await arbiter.request_allocation(IMAGE, Priority.LOW, bytes=4 * GIB, timeout=5) as a:
            assert a.state is AllocationState.ACTIVE
        return a

    a = asyncio.run(scenario())
    assert a.released and arbiter.state().workloads == ()


def test_wait_false_fails_at_once(arbiter):
    arbiter.request_allocation_blocking(VIDEO, Priority.HIGH, bytes=16 * GIB, min_quality=1.0, activation_bytes=0)
    before = snapshot(arbiter)
    with pytest.raises(InsufficientMemoryError, match="wait=True"):
        arbiter.request_allocation_blocking(IMAGE, Priority.LOW, bytes=GIB, min_quality=1.0, wait=False)
    assert snapshot(arbiter) == before


def test_preemption_suspends_lower_priority_and_resumes_it(arbiter):
    low = arbiter.request_allocation_blocking(IMAGE, Priority.LOW, bytes=10 * GIB, min_quality=1.0, activation_bytes=0)
    high = arbiter.request_allocation_blocking(LLM, Priority.CRITICAL, bytes=10 * GIB, min_quality=1.0, activation_bytes=0)
    assert high.state is AllocationState.ACTIVE
    assert low.state is AllocationState.SUSPENDED and low.quality == 0.0
    high.release()
    assert low.state is AllocationState.ACTIVE and low.quality == 1.0
    stats = arbiter.stats()
    assert stats.preemptions == 1 and stats.resumptions == 1


def test_update_priority_moves_quality(arbiter):
    a = arbiter.request_allocation_blocking(IMAGE, Priority.NORMAL, bytes=10 * GIB, activation_bytes=0, name="a")
    b = arbiter.request_allocation_blocking(IMAGE, Priority.LOW, bytes=10 * GIB, activation_bytes=0, name="b")
    assert a.quality == 1.0 and b.quality < 1.0
    arbiter.update_priority(b, Priority.HIGH)
    assert b.quality == 1.0 and a.quality < 1.0


def test_reclaim_grows_a_budget_at_the_expense_of_lower_priorities(arbiter):
    hi = arbiter.request_allocation_blocking(LLM, Priority.HIGH, bytes=8 * GIB, activation_bytes=0)
    lo = arbiter.request_allocation_blocking(IMAGE, Priority.LOW, bytes=8 * GIB, activation_bytes=0)
    lo_before = lo.quality
    assert arbiter.reclaim(hi, 2 * GIB)
    assert hi.granted_bytes == 10 * GIB and lo.quality < lo_before
    before = snapshot(arbiter)
    assert not arbiter.reclaim(hi, 64 * GIB)
    assert snapshot(arbiter) == before


def test_reclaim_holds_the_callers_quality_and_never_suspends_anyone():
    with Arbiter(ArbiterConfig.for_vram_gb(1, allow_preemption=False)) as arb:
        MIB = 1 << 20
        chat = arb.request_allocation_blocking(LLM, Priority.LOW, bytes=400 * MIB, activation_bytes=0, name="chat")
        image = arb.request_allocation_blocking(IMAGE, Priority.HIGH, bytes=500 * MIB, activation_bytes=0, name="image")
        for ask in (40, 300, 200, 100, 50):
            before_q, before_b = image.quality, image.granted_bytes
            ok = arb.reclaim(image, ask * MIB)
            assert chat.state is AllocationState.ACTIVE and chat.quality >= chat.min_quality
            if ok:
                assert image.granted_bytes >= before_b + ask * MIB and image.quality >= before_q
            else:
                assert (image.quality, image.granted_bytes) == (before_q, before_b)


def test_memory_taken_by_another_process_triggers_a_rebalance():
    tracker = GpuMemoryTracker("cpu", 16 * GIB)
    with Arbiter(ArbiterConfig.for_vram_gb(16, monitor_interval_s=0.02), tracker=tracker) as arb:
        a = arb.request_allocation_blocking(IMAGE, Priority.NORMAL, bytes=12 * GIB, activation_bytes=0)
        assert a.quality == 1.0
        tracker.set_external_bytes(8 * GIB)
        deadline = time.monotonic() + 5
        while a.quality == 1.0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert math.isclose(a.quality, 8 / 12)
        tracker.set_external_bytes(0)
        while a.quality < 1.0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert a.quality == 1.0


def test_policy_is_applied(arbiter):
    with Arbiter(ArbiterConfig.for_vram_gb(16, policy=QualityPolicy.BALANCED)) as arb:
        a = arb.request_allocation_blocking(LLM, Priority.CRITICAL, bytes=12 * GIB, activation_bytes=0)
        b = arb.request_allocation_blocking(IMAGE, Priority.BACKGROUND, bytes=12 * GIB, activation_bytes=0)
        assert math.isclose(a.quality, b.quality) and math.isclose(a.quality, 16 / 24)


def test_threads_hammering_never_break_the_budget(arbiter):
    worst = []
    arbiter.add_listener(lambda changes: worst.append(arbiter.state().granted_bytes))
    errors = []

    def worker(seed):
        try:
            for i in range(40):
                a = arbiter.request_allocation_blocking(
                    [LLM, IMAGE, VIDEO][(seed + i) % 3], Priority((seed * 7 + i) % 5), bytes=(1 + (seed + i) % 6) * GIB, timeout=120
                )
                if i % 5 == 0:
                    arbiter.update_priority(a, Priority((i + seed) % 5))
                a.release()
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert max(worst, default=0) <= 16 * GIB
    assert arbiter.state().workloads == () and arbiter.state().granted_bytes == 0
    assert arbiter.stats().grants == arbiter.stats().releases == 240


def test_a_failing_listener_does_not_break_the_arbiter(arbiter, caplog):
    calls = []
    arbiter.add_listener(lambda changes: 1 / 0)
    arbiter.add_listener(calls.append)
    arbiter.request_allocation_blocking(IMAGE, Priority.LOW, bytes=12 * GIB, activation_bytes=0)
    arbiter.request_allocation_blocking(LLM, Priority.HIGH, bytes=12 * GIB, activation_bytes=0)
    assert calls and "listener" in caplog.text


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bytes": -1}, "bytes must be >= 1"),
        ({"bytes": 0}, "bytes must be >= 1"),
        ({"bytes": 1 << 60}, "1 PiB"),
        ({"bytes": 1.5}, "whole number"),
        ({"min_quality": float("nan")}, "min_quality"),
        ({"min_quality": 1.5}, "min_quality"),
        ({"timeout": -1}, "timeout"),
        ({"activation_bytes": -5}, "activation_bytes"),
        ({"curve": [(0.5, 10), (0.2, 5)]}, "curve"),
    ],
)
def test_bad_requests_are_typed_errors_and_change_nothing(arbiter, kwargs, match):
    arbiter.request_allocation_blocking(LLM, Priority.HIGH, bytes=GIB)
    before = snapshot(arbiter)
    with pytest.raises(InvalidRequestError, match=match):
        arbiter.request_allocation_blocking(IMAGE, Priority.LOW, **kwargs)
    assert snapshot(arbiter) == before


def test_unknown_workload_and_priority(arbiter):
    with pytest.raises(InvalidRequestError, match="WorkloadType"):
        arbiter.request_allocation_blocking("llm", Priority.LOW)
    with pytest.raises(InvalidRequestError, match="priority"):
        arbiter.request_allocation_blocking(LLM, 9)
    custom = WorkloadType.custom("tts", 0.5, GIB)
    assert arbiter.request_allocation_blocking(custom, "low").workload.name == "tts"


def test_floor_larger_than_the_device_fails_at_once(arbiter):
    with pytest.raises(InsufficientMemoryError, match="floor"):
        arbiter.request_allocation_blocking(LLM, Priority.HIGH, bytes=100 * GIB)
    assert arbiter.state().workloads == ()


def test_double_and_foreign_release(arbiter):
    a = arbiter.request_allocation_blocking(LLM, Priority.HIGH, bytes=GIB)
    a.release()
    with pytest.raises(UnknownWorkloadError, match="release it once"):
        a.release()
    with Arbiter(ArbiterConfig.for_vram_gb(16)) as other:
        b = other.request_allocation_blocking(LLM, Priority.HIGH, bytes=GIB)
        before = snapshot(arbiter)
        with pytest.raises(UnknownWorkloadError):
            arbiter.release(b)
        with pytest.raises(UnknownWorkloadError):
            arbiter.release(12345)
        assert snapshot(arbiter) == before and not b.released


def test_budget_larger_than_the_device_is_refused():
    tracker = GpuMemoryTracker("cpu", 8 * GIB)
    with pytest.raises(InvalidRequestError, match="larger than the device"):
        Arbiter(ArbiterConfig.for_vram_gb(16), tracker=tracker)
    for bad in (0, -3, float("nan"), float("inf")):
        with pytest.raises(InvalidRequestError):
            ArbiterConfig.for_vram_gb(bad)


def test_try_allocate_returns_the_error_instead_of_raising(arbiter):
    ok = arbiter.try_allocate(LLM, Priority.HIGH, bytes=GIB)
    bad = arbiter.try_allocate(LLM, Priority.HIGH, bytes=-1)
    assert ok.granted and ok.allocation.quality == 1.0
    assert not bad.granted and isinstance(bad.error, InvalidRequestError)


def test_closed_arbiter_refuses_requests():
    arb = Arbiter(ArbiterConfig.for_vram_gb(4))
    arb.close()
    with pytest.raises(Exception, match="closed"):
        arb.request_allocation_blocking(LLM, Priority.HIGH, bytes=GIB)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA machine detects its card")
def test_auto_detect_on_this_machine_gives_a_virtual_device():
    cfg = ArbiterConfig.auto_detect(virtual_gb=3)
    assert cfg.device == "cpu" and cfg.vram_bytes == 3 * GIB


def test_used_bytes_follow_the_models_curve(arbiter):
    curve = [(0.5, 3 * GIB), (0.75, 5 * GIB), (1.0, 8 * GIB)]
    a = arbiter.request_allocation_blocking(LLM, Priority.HIGH, bytes=8 * GIB, curve=curve, activation_bytes=GIB)
    assert a.min_quality == 0.5 and a.quality == 1.0 and a.used_bytes == 9 * GIB
    b = arbiter.request_allocation_blocking(LLM, Priority.CRITICAL, bytes=8 * GIB, activation_bytes=0)
    assert 0.75 <= a.quality < 1.0 and a.used_bytes == 6 * GIB <= a.granted_bytes
    b.release()
    a.release()
    assert a.used_bytes == 0


def test_a_waiter_suspended_again_before_it_wakes_keeps_waiting(arbiter):
    """Found by the thread-hammering test: a wake-up is a hint, the grant is checked again."""
    holder = arbiter.request_allocation_blocking(VIDEO, Priority.HIGH, bytes=16 * GIB, min_quality=1.0, activation_bytes=0)
    granted = []
    waiter = threading.Thread(target=lambda: granted.append(arbiter.request_allocation_blocking(
        IMAGE, Priority.NORMAL, bytes=10 * GIB, min_quality=1.0, activation_bytes=0, timeout=10)))
    waiter.start()
    while arbiter.state().waiting < 1:
        time.sleep(0.005)
    with arbiter._lock:  # the waiting thread cannot look between the two steps
        holder.release()  # admits the waiter and wakes it...
        critical = arbiter.request_allocation_blocking(LLM, Priority.CRITICAL, bytes=16 * GIB, min_quality=1.0, activation_bytes=0)
    time.sleep(0.2)  # ...but it was suspended again before it could look
    assert not granted and waiter.is_alive()
    critical.release()
    waiter.join(5)
    assert granted and granted[0].state is AllocationState.ACTIVE
    assert arbiter.stats().timeouts == 0
