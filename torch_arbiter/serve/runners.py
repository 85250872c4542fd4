"""Worker threads that run one model's requests, one model call at a time.

Each model has one :class:`ChatRunner` or :class:`ImageRunner` with its own thread. Requests
(jobs) are queued to it from the event loop; the thread runs them and sends their events back
to the loop. Why a thread per model and not per request:

- model calls are serialized per model, so a quality change requested by the arbiter waits for
  at most one forward (one decode step, one UNet call) and is applied at the next safe point,
  never in the middle of a call and never on the event loop;
- chats are interleaved token by token (round robin over the active chats, each with its own KV
  cache), so eight concurrent chats each get their first token after about eight prefills
  rather than after seven whole answers.

A forward that raises :class:`~torch_arbiter.errors.PreemptedError` (the model was suspended
and not re-admitted in time) is retried after a short wait; a request accepted into the queue is
never dropped because of a rebalance. A cancelled job (its client went away) is dropped at the
next step, which frees its slot at once.

Limits: one sequence per forward (no batching across chats); a KV cache filled at one quality
is reused at the next (the keys computed earlier are not recomputed).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import io
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator

import torch

from ..errors import PreemptedError

__all__ = ["Job", "ChatJob", "ImageJob", "ManagedBackend", "ChatRunner", "ImageRunner", "PipelineCall",
           "pipeline_call_options", "b64_png"]

_log = logging.getLogger("torch_arbiter.serve")
_RETRY_WAIT_S = 0.05
#: How long a job start waits for a raise of its model to land (the others lower at their safe
#: points first): about one forward of the other model; past it the job starts at the level it has.
_SETTLE_WAIT_S = 1.0


class _Cancelled(Exception):
    """The job's client went away: stop working on it."""


class Job:
    """One request queued to a runner; its events go to an asyncio queue on the server's loop.

    Events are ``(kind, payload)`` tuples: ``("start", quality)`` when the model starts on it,
    then runner-specific ones, and last ``("done", result)`` or ``("error", exception)``.

    Args:
        loop: the event loop that reads :attr:`events`.
        on_finish: called once, in the worker thread, when the runner is done with the job
            (finished, failed or cancelled).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_finish: Callable[[], None] | None = None):
        self.events: asyncio.Queue = asyncio.Queue()
        self.quality: float | None = None
        self._loop = loop
        self._cancelled = threading.Event()
        self._on_finish = on_finish
        self._finished = False

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` was called."""
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Ask the runner to drop the job at its next step (safe from any thread)."""
        self._cancelled.set()

    def emit(self, kind: str, payload: Any = None) -> None:
        """Send an event to the loop (called by the worker thread)."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancel()

    def finish(self) -> None:
        """Mark the job done for the runner (idempotent); runs ``on_finish`` once."""
        if not self._finished:
            self._finished = True
            if self._on_finish is not None:
                try:
                    self._on_finish()
                except Exception:
                    _log.exception("on_finish of a job failed")


class ChatJob(Job):
    """A chat completion: the prompt's token ids and the sampling settings.

    Args:
        loop: the event loop that reads the events.
        prompt_ids: the prompt through the chat template.
        max_tokens: completion tokens at most.
        temperature: 0 is greedy; else the softmax temperature.
        top_p: nucleus sampling mass (1 keeps every token).
        stop: strings that end the completion (not included in it).
        seed: seeds the sampling (None: torch's global generator).
        on_finish: see :class:`Job`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *, prompt_ids: list[int], max_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, stop: tuple[str, ...] = (), seed: int | None = None,
                 on_finish: Callable[[], None] | None = None):
        super().__init__(loop, on_finish)
        self.prompt_ids, self.max_tokens = list(prompt_ids), max_tokens
        self.temperature, self.top_p, self.stop = temperature, top_p, tuple(stop)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.generated: list[int] = []
        self.sent = ""
        self.cache: Any = None
        self.next_logits: torch.Tensor | None = None


class ImageJob(Job):
    """An image request: ``n`` images of ``size`` (width, height) in ``steps`` denoising steps.

    Args:
        loop: the event loop that reads the events.
        prompt: the text (ignored by an unconditional pipeline).
        n: images in the one pipeline call.
        size: ``(width, height)``, one :meth:`PipelineCall.allows`.
        steps: denoising steps.
        seed: seeds the pipeline's generator (a retried call makes the same images).
        on_finish: see :class:`Job`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *, prompt: str, n: int, size: tuple[int, int], steps: int,
                 seed: int | None = None, on_finish: Callable[[], None] | None = None):
        super().__init__(loop, on_finish)
        self.prompt, self.n, self.size, self.steps, self.seed = prompt, n, size, steps, seed


class ManagedBackend:
    """What a runner needs from a patched model: the object to call and the quality it runs at.

    Args:
        managed: the :class:`~torch_arbiter.hooks.ManagedModel`.
        cuda_scope: route the worker's CUDA allocations to the model's allocation
            (``arbiter.workload``) while it runs: True on a CUDA arbiter.

    Another backend (the benchmark's swap-whole-models baseline) provides the same two methods.
    """

    def __init__(self, managed, *, cuda_scope: bool = False):
        self.managed = managed
        self._cuda_scope = cuda_scope

    def lease(self) -> ContextManager[Any]:
        """A context in which the worker may call the model; yields the model or pipeline."""
        if self._cuda_scope and self.managed.allocation is not None:
            return _scoped(self.managed.arbiter.workload(self.managed.allocation), self.managed.model)
        return contextlib.nullcontext(self.managed.model)

    def served_quality(self) -> float:
        """The quality the next model call runs at: a pending level is applied at its start.

        A raise lands only once the models lowered for it have passed their safe points, so this
        first waits (at most ``_SETTLE_WAIT_S``) for the arbiter to settle: a request that just
        raised its model's priority is served at its new grant, not at the level before it.
        """
        if self.managed.arbiter is not None:
            self.managed.arbiter.wait_until_settled(timeout=_SETTLE_WAIT_S)
        pending = self.managed.pending_quality
        if pending is None:
            return self.managed.quality
        return max(pending, self.managed.min_quality)


@contextlib.contextmanager
def _scoped(scope: ContextManager[Any], model: Any) -> Iterator[Any]:
    with scope:
        yield model


class _Runner:
    """A worker thread over one model: jobs in, events out, one model call at a time."""

    def __init__(self, model_id: str, backend: Any):
        self.model_id = model_id
        self.backend = backend
        self._queue: list[Job] = []
        self._live: set[Job] = set()
        self._cond = threading.Condition()
        self._closed = False
        self.in_flight = 0
        self.completed = 0
        self.cancelled = 0
        self.failed = 0
        self.retries = 0
        self._thread = threading.Thread(target=self._run, name=f"torch-arbiter-serve-{model_id}", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``; its events follow on ``job.events``.

        Raises:
            RuntimeError: the runner was closed.
        """
        with self._cond:
            if self._closed:
                raise RuntimeError(f"the {self.model_id} runner is closed")
            self._queue.append(job)
            self._live.add(job)
            self.in_flight += 1
            self._cond.notify()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread after cancelling every queued and running job."""
        with self._cond:
            self._closed = True
            for job in self._live:
                job.cancel()
            self._cond.notify()
        self._thread.join(timeout)

    def _take(self, block: bool) -> list[Job]:
        with self._cond:
            while block and not self._queue and not self._closed:
                self._cond.wait()
            jobs, self._queue = self._queue, []
            return jobs

    def _run(self) -> None:
        while True:
            jobs = self._take(block=True)
            if not jobs and self._closed:
                return
            try:
                with self.backend.lease() as model:
                    self._drain(model, jobs)
            except Exception as exc:  # the backend could not give the model: fail these jobs
                _log.exception("%s: lease failed", self.model_id)
                for job in jobs:
                    self._end(job, "error", exc)

    def _drain(self, model: Any, jobs: list[Job]) -> None:
        raise NotImplementedError

    def _end(self, job: Job, kind: str, payload: Any = None) -> None:
        if job._finished:
            return
        with self._cond:
            self._live.discard(job)
            self.in_flight -= 1
            if kind == "done":
                self.completed += 1
            elif kind == "cancelled":
                self.cancelled += 1
            else:
                self.failed += 1
        if kind != "cancelled":
            job.emit(kind, payload)
        job.finish()

    def _call(self, job: Job, fn: Callable[[], Any]) -> Any:
        """``fn()``, retried while the model is preempted; raises ``_Cancelled`` if the client left."""
        while True:
            if job.cancelled:
                raise _Cancelled()
            try:
                return fn()
            except PreemptedError:
                with self._cond:
                    self.retries += 1
                time.sleep(_RETRY_WAIT_S)

    def _start(self, job: Job) -> None:
        job.quality = float(self.backend.served_quality())
        job.emit("start", job.quality)


def _forward_cache_name(model: Any) -> str:
    """``cache`` (transformers >= 5) or ``past_key_values`` (earlier): the KV-cache argument."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class ChatRunner(_Runner):
    """Runs chat completions of one transformers causal LM, interleaving active chats per token.

    Args:
        model_id: the name clients pass as ``model``.
        tokenizer: its tokenizer (with a chat template).
        backend: a :class:`ManagedBackend` (or one with the same methods).
        context_length: prompt plus completion tokens the model accepts.
        eos_token_ids: token ids that end a completion (the tokenizer's and generation config's).

    Events of a :class:`ChatJob`: ``("start", quality)``, ``("delta", text)`` (one per token that
    completes text), ``("done", {"finish_reason", "prompt_tokens", "completion_tokens"})``.
    """

    def __init__(self, model_id: str, tokenizer: Any, backend: Any, *, context_length: int,
                 eos_token_ids: set[int]):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.eos_token_ids = frozenset(eos_token_ids)
        self._cache_arg: str | None = None
        super().__init__(model_id, backend)

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt token ids of ``messages`` through the tokenizer's chat template."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    def _drain(self, model: Any, jobs: list[Job]) -> None:
        if self._cache_arg is None:
            self._cache_arg = _forward_cache_name(model)
        active: list[ChatJob] = []
        pending = list(jobs)
        while pending or active:
            for job in pending:
                if self._advance(model, job, first=True):
                    active.append(job)
            for job in list(active):
                if not self._advance(model, job, first=False):
                    active.remove(job)
            pending = self._take(block=False)

    def _advance(self, model: Any, job: ChatJob, first: bool) -> bool:
        """Prefill (first) or one decode step; returns True while the job goes on."""
        try:
            if first:
                self._start(job)
                ids = torch.tensor([job.prompt_ids], dtype=torch.long)
                self._forward(model, job, ids)
            token = self._sample(job)
            job.generated.append(token)
            finish = self._emit_text(job, token)
            if finish is None and len(job.generated) >= job.max_tokens:
                finish = "length"
            if finish is not None:
                self._emit_text(job, None, final=True)
                self._end(job, "done", {"finish_reason": finish, "prompt_tokens": len(job.prompt_ids),
                                        "completion_tokens": len(job.generated)})
                return False
            self._forward(model, job, torch.tensor([[token]], dtype=torch.long))
            return True
        except _Cancelled:
            self._end(job, "cancelled")
        except Exception as exc:
            _log.exception("%s: chat generation failed", self.model_id)
            self._end(job, "error", exc)
        return False

    def _forward(self, model: Any, job: ChatJob, ids: torch.Tensor) -> None:
        def step():
            with torch.inference_mode():
                out = model(input_ids=ids, use_cache=True, **{self._cache_arg: job.cache})
            return out

        out = self._call(job, step)
        job.cache = getattr(out, self._cache_arg)
        job.next_logits = out.logits[0, -1].float()

    def _sample(self, job: ChatJob) -> int:
        logits = job.next_logits
        if job.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / job.temperature, dim=-1)
        if job.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < job.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=job.generator))

    def _emit_text(self, job: ChatJob, token: int | None, final: bool = False) -> str | None:
        """Send the text that became certain; returns ``"stop"`` at an end token or stop string.

        Text is decoded from all generated tokens (a token may complete a multi-byte character
        only with the next one); with stop strings, the last ``len(longest stop) - 1``
        characters are held back until they cannot start one.
        """
        finish = None
        tokens = job.generated
        if token is not None and token in self.eos_token_ids:
            tokens, finish = job.generated[:-1], "stop"
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        if finish is None and not final:
            if text.endswith("\ufffd"):
                return None
            if job.stop:
                text = text[:max(len(job.sent), len(text) - max(map(len, job.stop)) + 1)]
        if len(text) > len(job.sent) and text.startswith(job.sent):
            job.emit("delta", text[len(job.sent):])
            job.sent = text
        return finish


class ImageRunner(_Runner):
    """Runs image requests of one diffusers pipeline, one pipeline call at a time.

    Args:
        model_id: the name clients pass as ``model``.
        backend: a :class:`ManagedBackend` (or one with the same methods) over the pipeline.
        call_options: how this pipeline is called (see :func:`pipeline_call_options`).

    Events of an :class:`ImageJob`: ``("start", quality)``, ``("done", [png bytes, ...])``.
    """

    def __init__(self, model_id: str, backend: Any, call_options: "PipelineCall"):
        self.call_options = call_options
        super().__init__(model_id, backend)

    def _drain(self, model: Any, jobs: list[Job]) -> None:
        for job in jobs:
            try:
                self._start(job)
                images = self._call(job, lambda: model(**self.call_options.kwargs(job)).images)
                self._end(job, "done", [_png(image) for image in images])
            except _Cancelled:
                self._end(job, "cancelled")
            except Exception as exc:
                _log.exception("%s: image generation failed", self.model_id)
                self._end(job, "error", exc)


@dataclass(frozen=True)
class PipelineCall:
    """How a diffusers pipeline is called, read from its ``__call__`` signature.

    Attributes:
        native_size: ``(width, height)`` the pipeline makes by default.
        takes_prompt: the pipeline is text-conditioned (an unconditional one ignores prompts).
        takes_size: it accepts ``height`` / ``width``.
        batch_arg: ``num_images_per_prompt`` or ``batch_size``.
    """

    native_size: tuple[int, int]
    takes_prompt: bool
    takes_size: bool
    batch_arg: str

    def allows(self, width: int, height: int) -> bool:
        """True when the pipeline can make ``width`` x ``height`` images.

        Limits: a pipeline without ``height``/``width`` arguments makes only its native size; one
        with them takes multiples of 8 from 64 up to twice its native size.
        """
        if (width, height) == self.native_size:
            return True
        largest = 2 * max(self.native_size)
        return self.takes_size and all(v % 8 == 0 and 64 <= v <= largest for v in (width, height))

    def kwargs(self, job: ImageJob) -> dict[str, Any]:
        """The keyword arguments of one call for ``job`` (a fresh seeded generator each time, so a
        retried call makes the same images)."""
        options: dict[str, Any] = {self.batch_arg: job.n, "num_inference_steps": job.steps, "output_type": "pil"}
        if job.seed is not None:
            options["generator"] = torch.Generator().manual_seed(job.seed)
        if self.takes_prompt:
            options["prompt"] = job.prompt
        if self.takes_size:
            options["width"], options["height"] = job.size
        return options


def pipeline_call_options(pipeline: Any) -> PipelineCall:
    """Read how to call ``pipeline`` (its native size, prompt, size and batch arguments).

    Args:
        pipeline: a diffusers ``DiffusionPipeline`` with a ``unet`` or ``transformer``.

    Returns:
        The :class:`PipelineCall`.
    """
    parameters = inspect.signature(type(pipeline).__call__).parameters
    denoiser = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
    sample = getattr(getattr(denoiser, "config", None), "sample_size", 64)
    height, width = (sample, sample) if isinstance(sample, int) else tuple(sample)
    scale = getattr(pipeline, "vae_scale_factor", 1) if getattr(pipeline, "vae", None) is not None else 1
    return PipelineCall(
        native_size=(int(width) * scale, int(height) * scale),
        takes_prompt="prompt" in parameters,
        takes_size="height" in parameters and "width" in parameters,
        batch_arg="num_images_per_prompt" if "num_images_per_prompt" in parameters else "batch_size",
    )


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64_png(data: bytes) -> str:
    """Base64 text of PNG bytes (the ``b64_json`` field of the images API)."""
    return base64.b64encode(data).decode("ascii")
