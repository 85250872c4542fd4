"""Safe switch points: apply a new quality only between forward calls of a model's top modules.

A Holo module's level must not change while a forward that reads it is running: half the layers
would compute at one level and half at another, and on CUDA the tensors a running kernel reads
could be freed. :class:`SafePointSwitch` holds the pending change and a count of forwards in
progress; the change is applied

- at once, in the thread that asks (:meth:`SafePointSwitch.request`, or the arbiter's applier
  thread through :meth:`SafePointSwitch.apply_if_idle`), when no forward of the top modules runs;
- otherwise by the thread that brings the count back to zero (at the end of the running forward)
  or, at the latest, by the next forward's own thread just before it starts.

A change that cannot be made yet (a raise whose memory others still hold) stays pending and is
tried again at the next safe point; a model that may not run (suspended) makes the next forward
wait in :meth:`SafePointSwitch.enter`.

So an LLM switches between two decode steps of ``generate()`` (each step is one top-level forward)
and a diffusion pipeline between two UNet calls of its denoising loop.

Two ways to mark a top module, both removable:

- :func:`apply_safe_point_hook` on a diffusers ``ModelMixin`` registers a ``ModelHook`` named
  :data:`SAFE_POINT_HOOK` in diffusers' ``HookRegistry``, so it composes with diffusers' own hooks
  (group offloading, caches, layerwise casting) instead of wrapping ``forward`` behind their back;
- on any other ``nn.Module`` it uses torch's forward pre-hook and an ``always_call`` forward hook
  (the count is released even when the forward raises).

Limits: the count is per switch, not per thread: if several threads run forwards of the same
model back to back without a gap, the change waits until they all stop (it is never applied
mid-forward, it may be applied late). A KV cache filled by earlier decode steps keeps the values
computed at the earlier quality. diffusers' ``HookRegistry.remove_hook`` rewires correctly only
when the hook removed is the outermost or no hook above it defines ``new_forward`` (diffusers'
own limit): remove hooks added after ``patch()`` before ``unpatch()``.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import time
from typing import Any, Callable, Generic, Iterator, TypeVar

from torch import nn

__all__ = ["SAFE_POINT_HOOK", "SafePointSwitch", "SafePointHandle", "apply_safe_point_hook"]

SAFE_POINT_HOOK = "torch_arbiter_safe_point"
"""Name of the hook in diffusers' ``HookRegistry`` (and the tag of the torch hooks)."""

T = TypeVar("T")


class SafePointSwitch(Generic[T]):
    """A pending value applied by ``apply(value)`` only while no guarded forward runs.

    Args:
        apply: called with the newest pending value, under the switch's lock, never while a
            guarded forward is running. It returns False to keep the value pending (the change
            cannot be made yet: memory it needs is still held by others); anything else means
            applied. If it raises, the value is dropped (not retried) and the exception reaches
            whoever triggered the application: the caller of :meth:`request` or
            :meth:`apply_if_idle`, or the forward that reached the safe point.
        refresh: optional ``() -> bool``, read without the lock at every safe point: True means
            the owner has a change that was not posted yet, so ``apply(None)`` runs there (a
            forward never starts on a target older than its owner's newest one).
        ready: optional ``() -> bool``: False while a forward must not start (the model is
            suspended); :meth:`enter` then waits, applying what is pending as it arrives.
        timeout: seconds :meth:`enter` waits for ``ready`` (None: for ever).
        timeout_error: ``(waited_s) -> Exception`` raised when that wait times out.

    Thread-safe: :meth:`request` may be called from any thread; the forward hooks call
    :meth:`enter` / :meth:`exit`. The forwards-in-progress count is kept per thread too, so an
    :meth:`exit` whose :meth:`enter` raised (a hook or ``apply`` failed before counting) is a
    no-op: the count can never go negative, whatever raises where.
    """

    def __init__(self, apply: Callable[[T | None], "bool | None"], *, refresh: Callable[[], bool] | None = None,
                 ready: Callable[[], bool] | None = None, timeout: float | None = None,
                 timeout_error: Callable[[float], BaseException] | None = None):
        self._apply = apply
        self._refresh = refresh
        self._ready = ready
        self._timeout = timeout
        self._timeout_error = timeout_error or (lambda waited: TimeoutError(f"not ready after {waited:.2f} s"))
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._running = 0
        self._entered: dict[int, int] = {}  # thread id -> forwards it entered and has not exited
        self._pending: T | None = None
        self._has_pending = False
        self._closed = False

    @property
    def running(self) -> int:
        """How many guarded forwards are in progress now."""
        with self._lock:
            return self._running

    @property
    def has_pending(self) -> bool:
        """True while a requested value waits for a safe point."""
        with self._lock:
            return self._has_pending

    @property
    def pending(self) -> T | None:
        """The value waiting for a safe point (None when there is none)."""
        with self._lock:
            return self._pending if self._has_pending else None

    def request(self, value: T | None) -> bool:
        """Ask for ``value`` to be applied; a newer request replaces an older pending one.

        Args:
            value: passed to ``apply`` at the next safe point.

        Returns:
            True when it was applied now (no forward was running), False when it waits.
        """
        with self._lock:
            self._pending, self._has_pending = value, True
            return self._flush_if_idle_locked()

    def apply_if_idle(self) -> bool:
        """Apply what is pending now if no guarded forward runs (the arbiter's applier calls this).

        Returns:
            True when nothing is pending any more on return.
        """
        with self._lock:
            if not self._has_pending and self._refresh is not None and self._refresh():
                self._pending, self._has_pending = None, True
            return self._flush_if_idle_locked()

    def wait_applied(self, timeout: float | None = None) -> bool:
        """Block until nothing is pending (or ``timeout`` seconds pass).

        Returns:
            True when nothing is pending any more.
        """
        with self._idle:
            return self._idle.wait_for(lambda: not self._has_pending, timeout)

    def notify(self) -> None:
        """Wake forwards waiting in :meth:`enter` to look at ``ready`` again."""
        with self._idle:
            self._idle.notify_all()

    @contextlib.contextmanager
    def idle(self) -> Iterator[None]:
        """Hold the switch with no guarded forward running (waits for running ones to end).

        New forwards wait at :meth:`enter` until the block ends. Used to take hooks off safely.
        """
        with self._idle:
            self._idle.wait_for(lambda: self._running == 0)
            yield

    def close(self) -> None:
        """Stop guarding (the hooks are being removed): later :meth:`enter` calls count nothing."""
        with self._idle:
            self._closed = True
            self._idle.notify_all()

    def enter(self) -> None:
        """Mark the start of a guarded forward.

        When none runs, what is pending is applied first. While ``ready`` says no, waits
        (applying what arrives) up to ``timeout``, then raises ``timeout_error``. Nothing is
        counted when this raises, or once the switch is closed.
        """
        started = None
        with self._lock:
            while True:
                if self._closed:
                    return
                if self._running == 0:
                    self._flush_if_idle_locked(refresh=True)
                if self._running > 0 or self._ready is None or self._ready():
                    break
                if started is None:
                    started = time.monotonic()
                waited = time.monotonic() - started
                if self._timeout is not None and waited >= self._timeout:
                    raise self._timeout_error(waited)
                remaining = None if self._timeout is None else self._timeout - waited
                self._idle.wait(remaining)
            self._running += 1
            me = threading.get_ident()
            self._entered[me] = self._entered.get(me, 0) + 1

    def exit(self) -> None:
        """Mark the end of a guarded forward (applies what is pending if it was the last one).

        An exit of a thread with no forward entered (its :meth:`enter` raised) does nothing.
        """
        with self._lock:
            me = threading.get_ident()
            count = self._entered.get(me, 0)
            if count == 0:
                return
            if count == 1:
                del self._entered[me]
            else:
                self._entered[me] = count - 1
            self._running -= 1
            if self._running == 0:
                try:
                    self._flush_if_idle_locked(refresh=True)
                finally:
                    self._idle.notify_all()

    def _flush_if_idle_locked(self, *, refresh: bool = False) -> bool:
        if self._running:
            return not self._has_pending
        if refresh and not self._has_pending and self._refresh is not None and self._refresh():
            self._pending, self._has_pending = None, True
        if not self._has_pending:
            return True
        value, self._pending, self._has_pending = self._pending, None, False
        try:
            applied = self._apply(value) is not False
        except BaseException:
            self._idle.notify_all()
            raise
        if not applied and not self._has_pending:
            self._pending, self._has_pending = value, True  # blocked: kept for the next safe point
        self._idle.notify_all()
        return applied


class SafePointHandle:
    """Removes the safe-point hook from one module (like torch's ``RemovableHandle``)."""

    def __init__(self, remove: Callable[[], None]):
        self._remove = remove
        self._removed = False

    def remove(self) -> None:
        """Remove the hook; calling it again does nothing."""
        if not self._removed:
            self._removed = True
            self._remove()


def _is_diffusers_model(module: nn.Module) -> bool:
    # A diffusers model exists only once diffusers is imported: never import it (slow) to ask.
    diffusers = sys.modules.get("diffusers")
    return diffusers is not None and isinstance(module, diffusers.ModelMixin)


def apply_safe_point_hook(module: nn.Module, switch: SafePointSwitch[Any],
                          run: Callable[..., Any] | None = None) -> SafePointHandle:
    """Guard ``module``'s forward with ``switch``: pending values apply only outside it.

    Args:
        module: a top module (a transformers model, a diffusers UNet/VAE/text encoder, any
            ``nn.Module``).
        switch: the switch whose forwards-in-progress count this module's forwards raise.
        run: optional ``run(forward, *args, **kwargs)`` that calls the module's own forward,
            inside the guard (``patch()`` runs it in the allocation's workload scope, with
            out-of-memory recovery). On a plain module it is installed as the instance's
            ``forward`` (``functools.wraps``: its signature stays the original's).

    Returns:
        A handle whose ``remove()`` takes the hook off again and leaves ``module`` as it was.
    """
    if _is_diffusers_model(module):
        return _apply_diffusers_hook(module, switch, run)
    return _apply_torch_hooks(module, switch, run)


def _apply_torch_hooks(module: nn.Module, switch: SafePointSwitch[Any], run: Callable[..., Any] | None) -> SafePointHandle:
    pre = module.register_forward_pre_hook(lambda _module, _args: switch.enter())
    options = {"always_call": True} if _accepts_always_call() else {}
    post = module.register_forward_hook(lambda _module, _args, _output: switch.exit(), **options)
    had_forward = "forward" in module.__dict__
    if run is not None:
        original = module.forward

        @functools.wraps(original)
        def forward(*args, **kwargs):
            return run(original, *args, **kwargs)

        module.forward = forward

    def remove() -> None:
        pre.remove()
        post.remove()
        if run is not None:
            if had_forward:
                module.forward = original
            else:
                module.__dict__.pop("forward", None)

    return SafePointHandle(remove)


def _accepts_always_call() -> bool:
    import inspect

    return "always_call" in inspect.signature(nn.Module.register_forward_hook).parameters


def _apply_diffusers_hook(module: nn.Module, switch: SafePointSwitch[Any], run: Callable[..., Any] | None) -> SafePointHandle:
    from diffusers.hooks import HookRegistry, ModelHook

    class _SafePointModelHook(ModelHook):
        """Counts the forward in progress; ``new_forward`` so an exception still releases it."""

        def new_forward(self, hooked: nn.Module, *args, **kwargs):
            switch.enter()
            try:
                if run is not None:
                    return run(self.fn_ref.original_forward, *args, **kwargs)
                return self.fn_ref.original_forward(*args, **kwargs)
            finally:
                switch.exit()

    had_registry = "_diffusers_hook" in module.__dict__
    had_forward = "forward" in module.__dict__
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(_SafePointModelHook(), SAFE_POINT_HOOK)

    def remove() -> None:
        registry.remove_hook(SAFE_POINT_HOOK, recurse=False)
        if not had_registry and not registry.hooks:
            del module._diffusers_hook
            if not had_forward:
                module.__dict__.pop("forward", None)

    return SafePointHandle(remove)
