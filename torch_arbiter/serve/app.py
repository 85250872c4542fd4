"""The OpenAI-compatible HTTP app over a :class:`~torch_arbiter.serve.host.ModelHost`.

Endpoints: ``POST /v1/chat/completions`` (streamed as server-sent events or not),
``POST /v1/images/generations`` (``b64_json`` PNGs), ``GET /v1/models``, ``GET /healthz``,
``GET /metrics`` (Prometheus text). Request bodies are parsed here rather than by pydantic
models so that every bad request gets the OpenAI error body
``{"error": {"message", "type", "param", "code"}}`` and a 4xx status, as the ``openai`` client
expects.

Headers: a request may carry ``x-torch-arbiter-priority`` (a priority name or 0-4; clamped to
the operator's ``max_priority``). Every response carries ``x-torch-arbiter-replica``; a model
response carries ``x-torch-arbiter-quality`` (the quality its first model call ran at: for a
stream, the quality at its start) and ``x-torch-arbiter-priority`` (the priority it ran under).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InvalidRequestError
from ..priority import Priority
from .host import ModelHost
from .runners import ChatJob, ImageJob, b64_png

__all__ = ["create_app", "PRIORITY_HEADER", "QUALITY_HEADER", "REPLICA_HEADER"]

PRIORITY_HEADER = "x-torch-arbiter-priority"
QUALITY_HEADER = "x-torch-arbiter-quality"
REPLICA_HEADER = "x-torch-arbiter-replica"
_ROLES = {"system", "user", "assistant", "developer", "tool"}


class _ApiError(Exception):
    """An OpenAI-style error response."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


class _AuthAndReplica:
    """ASGI middleware: checks the bearer key (all paths but /healthz) and names the replica.

    Pure ASGI rather than ``@app.middleware``, so a streamed response passes through untouched
    and a client's disconnect reaches the stream at once.
    """

    def __init__(self, app, *, api_key: str | None, replica: str):
        self.app, self.api_key, self.replica = app, api_key, replica

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message):
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append(REPLICA_HEADER, self.replica)
            await send(message)

        if self.api_key is not None and scope["path"] != "/healthz":
            scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                response = _ApiError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'",
                                     code="invalid_api_key").response()
                return await response(scope, receive, send_named)
        await self.app(scope, receive, send_named)


def create_app(host: ModelHost, *, owns_host: bool = False) -> FastAPI:
    """The FastAPI app serving ``host``'s two models.

    Args:
        host: a loaded :class:`ModelHost`.
        owns_host: close the host when the app shuts down (its lifespan ends).

    Returns:
        The app; run it with uvicorn (``torch-arbiter serve`` does) or mount it in Ray Serve.
    """
    from contextlib import asynccontextmanager

    config = host.config
    metrics = _metrics(host)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        try:
            yield
        finally:
            if owns_host:
                await asyncio.to_thread(host.close)

    app = FastAPI(title="torch-arbiter", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.host = host

    @app.exception_handler(_ApiError)
    async def _api_error(_request: Request, exc: _ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _ApiError(exc.status_code, str(exc.detail), code=code).response()

    app.add_middleware(_AuthAndReplica, api_key=config.api_key, replica=host.replica)

    @app.get("/healthz")
    async def healthz():
        return host.status()

    @app.get("/metrics")
    async def metrics_endpoint():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models():
        created = int(time.time())
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "torch-arbiter"} for model_id in host.runners()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _json_body(request)
        runner = host.chat
        _check_model(body.get("model"), runner.model_id, required=True)
        messages = _messages(body.get("messages"))
        stream = _bool(body, "stream", False)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        max_tokens = min(config.max_tokens, 256) if max_tokens is None else max_tokens
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= config.max_tokens:
            raise _ApiError(400, f"{param} must be an integer from 1 to {config.max_tokens}, got {max_tokens!r}",
                            param=param, code="invalid_value")
        n = body.get("n", 1)
        if n != 1 or isinstance(n, bool):
            raise _ApiError(400, f"n must be 1 on this server, got {n!r}", param="n", code="invalid_value")
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
        stop = _stop(body.get("stop"))
        seed = _int_or_none(body, "seed")
        include_usage = _bool(body.get("stream_options") or {}, "include_usage", False)
        priority = _priority(request, config.chat_priority, config.max_priority)
        prompt_ids = runner.encode(messages)
        if len(prompt_ids) + max_tokens > runner.context_length:
            raise _ApiError(400, f"this model's maximum context length is {runner.context_length} tokens; the "
                                 f"messages take {len(prompt_ids)} and {param} asks for {max_tokens}: shorten the "
                                 f"messages or lower {param}", param="messages", code="context_length_exceeded")
        job = await _submit(host, runner, priority, lambda loop, done: ChatJob(
            loop, prompt_ids=prompt_ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
            stop=stop, seed=seed, on_finish=done))
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        headers = {QUALITY_HEADER: f"{job.quality:.6f}", PRIORITY_HEADER: priority.name.lower()}
        if stream:
            return StreamingResponse(_sse(job, completion_id, created, runner.model_id, include_usage),
                                     media_type="text/event-stream", headers=headers)
        text, result = [], None
        try:
            while result is None:
                kind, payload = await job.events.get()
                if kind == "delta":
                    text.append(payload)
                elif kind == "done":
                    result = payload
                else:
                    raise _ApiError(500, f"generation failed: {payload}", type="server_error")
        finally:
            job.cancel()  # no-op once done; stops the work if this handler was cancelled
        usage = _usage(result)
        body = {"id": completion_id, "object": "chat.completion", "created": created, "model": runner.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                             "logprobs": None, "finish_reason": result["finish_reason"]}],
                "usage": usage}
        return JSONResponse(body, headers=headers)

    @app.post("/v1/images/generations")
    async def images_generations(request: Request):
        body = await _json_body(request)
        runner = host.image
        _check_model(body.get("model"), runner.model_id, required=False)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise _ApiError(400, "prompt must be a non-empty string", param="prompt", code="invalid_value")
        n = body.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= config.max_images:
            raise _ApiError(400, f"n must be an integer from 1 to {config.max_images}, got {n!r}", param="n",
                            code="invalid_value")
        size = _size(body.get("size"), runner.call_options)
        response_format = body.get("response_format") or "b64_json"
        if response_format != "b64_json":
            raise _ApiError(400, "response_format must be 'b64_json' (this server keeps no files to link to)",
                            param="response_format", code="invalid_value")
        steps = body.get("num_inference_steps", config.image_steps)
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= config.max_image_steps:
            raise _ApiError(400, f"num_inference_steps must be an integer from 1 to {config.max_image_steps}",
                            param="num_inference_steps", code="invalid_value")
        seed = _int_or_none(body, "seed")
        priority = _priority(request, config.image_priority, config.max_priority)
        job = await _submit(host, runner, priority, lambda loop, done: ImageJob(
            loop, prompt=prompt, n=n, size=size, steps=steps, seed=seed, on_finish=done))
        try:
            kind, payload = await job.events.get()
        finally:
            job.cancel()
        if kind != "done":
            raise _ApiError(500, f"image generation failed: {payload}", type="server_error")
        return JSONResponse({"created": int(time.time()), "data": [{"b64_json": b64_png(png)} for png in payload]},
                            headers={QUALITY_HEADER: f"{job.quality:.6f}", PRIORITY_HEADER: priority.name.lower()})

    return app


async def _submit(host: ModelHost, runner, priority: Priority, make_job):
    """Raise the model's priority for this request, queue the job, wait until the model starts it."""
    loop = asyncio.get_running_loop()
    traffic = host.traffic
    if traffic is not None:
        await asyncio.to_thread(traffic.enter, runner.model_id, priority)
        done = lambda: traffic.exit(runner.model_id, priority)  # noqa: E731  (runs in the worker thread)
    else:
        done = None
    job = make_job(loop, done)
    try:
        runner.submit(job)
    except RuntimeError:  # the server is shutting down
        if done is not None:
            await asyncio.to_thread(done)
        raise _ApiError(503, "the server is shutting down: retry on another replica", type="server_error") from None
    try:
        kind, payload = await job.events.get()
    except BaseException:
        job.cancel()
        raise
    if kind == "error":
        raise _ApiError(500, f"the model failed: {payload}", type="server_error")
    return job


async def _sse(job: ChatJob, completion_id: str, created: int, model_id: str, include_usage: bool):
    """The OpenAI chunk stream of one chat job; a client that goes away cancels the job."""
    def chunk(delta: dict, finish: str | None = None, usage=None, choices=True) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_id,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else []}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, payload = await job.events.get()
            if kind == "delta":
                yield chunk({"content": payload})
            elif kind == "done":
                yield chunk({}, payload["finish_reason"])
                if include_usage:
                    yield chunk({}, usage=_usage(payload), choices=False)
                break
            else:
                error = {"error": {"message": f"generation failed: {payload}", "type": "server_error",
                                   "param": None, "code": None}}
                yield f"data: {json.dumps(error)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()


def _usage(result: dict) -> dict:
    return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
            "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _ApiError(400, f"the request body is not valid JSON ({exc}): send a JSON object",
                        code="invalid_json") from None
    if not isinstance(body, dict):
        raise _ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _check_model(model: Any, served: str, *, required: bool) -> None:
    if model is None and not required:
        return
    if not isinstance(model, str):
        raise _ApiError(400, "model must be a string naming a served model (see GET /v1/models)", param="model",
                        code="invalid_value")
    if model != served:
        raise _ApiError(404, f"The model '{model}' does not exist here; this endpoint serves '{served}' "
                             "(see GET /v1/models)", param="model", code="model_not_found")


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise _ApiError(400, "messages must be a non-empty array of {role, content} objects", param="messages",
                        code="invalid_value")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise _ApiError(400, f"messages[{i}] must be an object with a role in {sorted(_ROLES)}",
                            param=f"messages[{i}]", code="invalid_value")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text is understood here
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _ApiError(400, f"messages[{i}].content: only text parts are supported",
                                param=f"messages[{i}].content", code="invalid_value")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _ApiError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content",
                            code="invalid_value")
        role = "system" if message["role"] == "developer" else message["role"]
        parsed.append({"role": role, "content": content})
    return parsed


def _bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _ApiError(400, f"{name} must be true or false, got {value!r}", param=name, code="invalid_type")
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            (low < value if low_open else low <= value) and value <= high):
        raise _ApiError(400, f"{name} must be a number in {'(' if low_open else '['}{low}, {high}], got {value!r}",
                        param=name, code="invalid_value")
    return float(value)


def _int_or_none(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63):
        raise _ApiError(400, f"{name} must be a non-negative integer", param=name, code="invalid_value")
    return value


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise _ApiError(400, "stop must be a non-empty string or an array of at most 4 of them", param="stop",
                        code="invalid_value")
    return tuple(stops)


def _size(size: Any, call_options) -> tuple[int, int]:
    if size is None or size == "auto":
        return call_options.native_size
    width, height = call_options.native_size
    try:
        width, height = (int(v) for v in str(size).lower().split("x"))
    except ValueError:
        raise _ApiError(400, f"size must look like '{width}x{height}', got {size!r}", param="size",
                        code="invalid_value") from None
    if not call_options.allows(width, height):
        what = ("multiples of 8 from 64 to " + str(2 * max(call_options.native_size))) if call_options.takes_size \
            else "only its native size"
        raise _ApiError(400, f"size {size!r} is not one this pipeline makes: it makes "
                             f"{call_options.native_size[0]}x{call_options.native_size[1]} ({what})",
                        param="size", code="invalid_value")
    return width, height


def _priority(request: Request, default: Priority, ceiling: Priority) -> Priority:
    raw = request.headers.get(PRIORITY_HEADER)
    if raw is None:
        return min(default, ceiling)
    try:
        value = Priority.coerce(int(raw) if raw.strip().isdigit() else raw.strip())
    except InvalidRequestError:
        raise _ApiError(400, f"{PRIORITY_HEADER}: {raw!r} is not a priority; use one of "
                             f"{', '.join(p.name.lower() for p in Priority)} or 0-4", param=PRIORITY_HEADER,
                        code="invalid_value") from None
    return min(value, ceiling)


def _metrics(host: ModelHost):
    """A Prometheus registry: the arbiter's own series (:class:`~torch_arbiter.metrics.ArbiterCollector`:
    device, per-model quality, priority and resident bytes) and the server's request counters."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from ..metrics import ArbiterCollector

    class _ServeCollector:
        def collect(self):
            in_flight = GaugeMetricFamily("torch_arbiter_serve_in_flight", "Requests queued or running",
                                          labels=["model"])
            counters = {name: CounterMetricFamily(f"torch_arbiter_serve_requests_{name}", f"Requests {name}",
                                                  labels=["model"]) for name in ("completed", "cancelled", "failed")}
            retries = CounterMetricFamily("torch_arbiter_serve_preemption_retries",
                                          "Model calls retried after a preemption", labels=["model"])
            for model_id, runner in host.runners().items():
                in_flight.add_metric([model_id], runner.in_flight)
                for name, family in counters.items():
                    family.add_metric([model_id], getattr(runner, name))
                retries.add_metric([model_id], runner.retries)
            yield in_flight
            yield from counters.values()
            yield retries

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ServeCollector())
    if host.arbiter is not None:
        registry.register(ArbiterCollector(host.arbiter))
    return registry
