"""Safe switch points: apply a new quality only between forward calls of a model's top modules.

A Holo module's level must not change while a forward that reads it is running: half the layers
would compute at one level and half at another, and on CUDA the tensors a running kernel reads
could be freed. :class:`SafePointSwitch` holds the pending change and a count of forwards in
progress; the change is applied

- at once, in the caller's thread, when no forward of the top modules is running;
- otherwise by the thread that brings the count back to zero (at the end of the running forward)
  or, at the latest, just before the next forward starts.

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
import sys
import threading
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
            guarded forward is running. If it raises, the value is dropped (not retried) and
            the exception reaches whoever triggered the application: the caller of
            :meth:`request`, or the forward that reached the safe point.

    Thread-safe: :meth:`request` may be called from any thread; the forward hooks call
    :meth:`enter` / :meth:`exit`.
    """

    def __init__(self, apply: Callable[[T], None]):
        self._apply = apply
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._running = 0
        self._pending: T | None = None
        self._has_pending = False

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

    def request(self, value: T) -> bool:
        """Ask for ``value`` to be applied; a newer request replaces an older pending one.

        Args:
            value: passed to ``apply`` at the next safe point.

        Returns:
            True when it was applied now (no forward was running), False when it waits.
        """
        with self._lock:
            self._pending, self._has_pending = value, True
            if self._running == 0:
                self._flush_locked()
                return True
            return False

    def wait_applied(self, timeout: float | None = None) -> bool:
        """Block until nothing is pending (or ``timeout`` seconds pass).

        Returns:
            True when nothing is pending any more.
        """
        with self._idle:
            return self._idle.wait_for(lambda: not self._has_pending, timeout)

    @contextlib.contextmanager
    def idle(self) -> Iterator[None]:
        """Hold the switch with no guarded forward running (waits for running ones to end).

        New forwards wait at :meth:`enter` until the block ends. Used to take hooks off safely.
        """
        with self._idle:
            self._idle.wait_for(lambda: self._running == 0)
            yield

    def enter(self) -> None:
        """Mark the start of a guarded forward (applies a pending value first if none runs)."""
        with self._lock:
            if self._running == 0 and self._has_pending:
                self._flush_locked()
            self._running += 1

    def exit(self) -> None:
        """Mark the end of a guarded forward (applies a pending value if it was the last one)."""
        with self._lock:
            self._running -= 1
            if self._running == 0:
                if self._has_pending:
                    self._flush_locked()
                self._idle.notify_all()

    def _flush_locked(self) -> None:
        value, self._pending, self._has_pending = self._pending, None, False
        try:
            self._apply(value)
        finally:
            self._idle.notify_all()


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


def apply_safe_point_hook(module: nn.Module, switch: SafePointSwitch[Any]) -> SafePointHandle:
    """Guard ``module``'s forward with ``switch``: pending values apply only outside it.

    Args:
        module: a top module (a transformers model, a diffusers UNet/VAE/text encoder, any
            ``nn.Module``).
        switch: the switch whose forwards-in-progress count this module's forwards raise.

    Returns:
        A handle whose ``remove()`` takes the hook off again and leaves ``module`` as it was.
    """
    if _is_diffusers_model(module):
        return _apply_diffusers_hook(module, switch)
    return _apply_torch_hooks(module, switch)


def _apply_torch_hooks(module: nn.Module, switch: SafePointSwitch[Any]) -> SafePointHandle:
    pre = module.register_forward_pre_hook(lambda _module, _args: switch.enter())
    options = {"always_call": True} if _accepts_always_call() else {}
    post = module.register_forward_hook(lambda _module, _args, _output: switch.exit(), **options)

    def remove() -> None:
        pre.remove()
        post.remove()

    return SafePointHandle(remove)


def _accepts_always_call() -> bool:
    import inspect

    return "always_call" in inspect.signature(nn.Module.register_forward_hook).parameters


def _apply_diffusers_hook(module: nn.Module, switch: SafePointSwitch[Any]) -> SafePointHandle:
    from diffusers.hooks import HookRegistry, ModelHook

    class _SafePointModelHook(ModelHook):
        """Counts the forward in progress; ``new_forward`` so an exception still releases it."""

        def new_forward(self, hooked: nn.Module, *args, **kwargs):
            switch.enter()
            try:
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
