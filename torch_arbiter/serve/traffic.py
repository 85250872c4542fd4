"""The arbiter follows the traffic: a model's priority rises with its requests and decays when idle.

Each served model has one allocation. While requests for it are in flight its priority is the
highest of theirs, and never below ``idle_priority + 1``, so a busy model always outranks an
idle one; once the last request ends and ``idle_decay_s`` pass with no new one, it goes back to
``idle_priority`` (BACKGROUND by default), where it keeps only what the busier models leave: on a
device too small for both at full quality, its floor. Every change is one
:meth:`~torch_arbiter.arbiter.Arbiter.update_priority`, so the arbiter rebalances every model and
each applies its new level at its next safe point.
"""

from __future__ import annotations

import threading
from collections import Counter

from ..priority import Priority

__all__ = ["TrafficPriorities"]


class TrafficPriorities:
    """Moves each model's allocation priority with its requests in flight.

    Args:
        arbiter: the :class:`~torch_arbiter.arbiter.Arbiter` holding the allocations.
        allocations: the allocation of each model, by model id.
        idle_priority: the priority of a model with no request for ``idle_decay_s``.
        idle_decay_s: seconds an idle model keeps its last priority before decaying.

    Thread-safe. :meth:`enter` and :meth:`exit` call the arbiter (a rebalance, and a level change
    of an idle model in the calling thread): call them off the event loop.
    """

    def __init__(self, arbiter, allocations: dict, *, idle_priority: Priority = Priority.BACKGROUND,
                 idle_decay_s: float = 2.0):
        self._arbiter = arbiter
        self._allocations = dict(allocations)
        self.idle_priority = Priority.coerce(idle_priority)
        self.idle_decay_s = float(idle_decay_s)
        self._lock = threading.Lock()
        self._in_flight: dict[str, Counter] = {name: Counter() for name in self._allocations}
        self._timers: dict[str, threading.Timer] = {}
        self._closed = False

    def enter(self, model_id: str, priority: Priority) -> None:
        """A request for ``model_id`` at ``priority`` is accepted: raise the model if needed."""
        with self._lock:
            self._cancel_timer(model_id)
            self._in_flight[model_id][Priority(priority)] += 1
            self._apply(model_id)

    def exit(self, model_id: str, priority: Priority) -> None:
        """A request for ``model_id`` ended: lower the model to its busy requests' priority, or
        start its idle countdown."""
        with self._lock:
            counts = self._in_flight[model_id]
            counts[Priority(priority)] -= 1
            counts += Counter()  # drop the zero counts
            self._in_flight[model_id] = counts
            if counts:
                self._apply(model_id)
            elif not self._closed:
                timer = threading.Timer(self.idle_decay_s, self._decay, (model_id,))
                timer.daemon = True
                self._timers[model_id] = timer
                timer.start()

    def in_flight(self, model_id: str) -> int:
        """Requests for ``model_id`` accepted and not yet ended."""
        with self._lock:
            return sum(self._in_flight[model_id].values())

    def priority(self, model_id: str) -> Priority:
        """The priority ``model_id``'s allocation has now."""
        return Priority(self._allocations[model_id].priority)

    def close(self) -> None:
        """Cancel the pending decays (the allocations keep their priorities)."""
        with self._lock:
            self._closed = True
            for name in list(self._timers):
                self._cancel_timer(name)

    def _busy_priority(self, model_id: str) -> Priority:
        counts = self._in_flight[model_id]
        if not counts:
            return self.idle_priority
        return Priority(max(max(counts), min(self.idle_priority + 1, Priority.CRITICAL)))

    def _apply(self, model_id: str) -> None:
        allocation = self._allocations[model_id]
        wanted = self._busy_priority(model_id)
        if allocation.priority != wanted and not allocation.released:
            self._arbiter.update_priority(allocation, wanted)

    def _decay(self, model_id: str) -> None:
        with self._lock:
            if self._timers.get(model_id) is not threading.current_thread():
                return  # a newer request cancelled this countdown
            del self._timers[model_id]
            if not self._closed and not self._in_flight[model_id]:
                self._apply(model_id)

    def _cancel_timer(self, model_id: str) -> None:
        timer = self._timers.pop(model_id, None)
        if timer is not None:
            timer.cancel()
