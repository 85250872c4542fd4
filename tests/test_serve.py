"""torch-arbiter serve: the official openai client against a real uvicorn on 127.0.0.1.

The slow tests share one server: the ``torch-arbiter serve`` command, run as a process with its
default models (SmolLM2-135M-Instruct and the digits DDPM under one arbiter on the default virtual
device: the chat model at full quality fits beside the image model at its floor, not beside it at
full). Chats ask for few tokens and images for few denoising steps.
"""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from torch_arbiter import Arbiter, ArbiterConfig, InvalidRequestError, Priority, WorkloadType
from torch_arbiter.serve import ServeConfig
from torch_arbiter.serve.runners import PipelineCall
from torch_arbiter.serve.traffic import TrafficPriorities

KEY = "test-key"
CHAT = "SmolLM2-135M-Instruct"
IMAGE = "digits-ddpm"
IDLE_DECAY_S = 0.3
QUALITY = "x-torch-arbiter-quality"


# ---- fast: no model ------------------------------------------------------------------------------

def test_config_refuses_bad_values():
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        ServeConfig(max_tokens=0)
    with pytest.raises(InvalidRequestError, match="not a directory"):
        ServeConfig(chat_model="/nonexistent/model")
    with pytest.raises(InvalidRequestError, match="priority"):
        ServeConfig(max_priority="urgent")
    assert ServeConfig(max_priority="critical").max_priority is Priority.CRITICAL
    assert ServeConfig().host == "127.0.0.1"


def test_pipeline_sizes():
    native_only = PipelineCall((16, 16), takes_prompt=False, takes_size=False, batch_arg="batch_size")
    assert native_only.allows(16, 16) and not native_only.allows(32, 32)
    sized = PipelineCall((512, 512), takes_prompt=True, takes_size=True, batch_arg="num_images_per_prompt")
    assert sized.allows(512, 768) and sized.allows(64, 64)
    assert not sized.allows(500, 512) and not sized.allows(2048, 512)


def test_traffic_raises_a_busy_model_and_decays_an_idle_one():
    arbiter = Arbiter(ArbiterConfig(vram_bytes=1000))
    chat = arbiter.request_allocation_blocking(WorkloadType.LLM_INFERENCE, Priority.BACKGROUND, bytes=800,
                                               min_quality=0.5, activation_bytes=0)
    image = arbiter.request_allocation_blocking(WorkloadType.IMAGE_GENERATION, Priority.BACKGROUND, bytes=400,
                                                min_quality=0.5, activation_bytes=0)
    traffic = TrafficPriorities(arbiter, {"chat": chat, "image": image}, idle_decay_s=0.2)
    try:
        traffic.enter("image", Priority.BACKGROUND)  # busy: at least one above idle
        assert image.priority is Priority.LOW and image.quality == 1.0 and chat.quality < 1.0
        traffic.enter("chat", Priority.HIGH)
        assert chat.priority is Priority.HIGH and chat.quality == 1.0 and image.quality == 0.5
        traffic.exit("chat", Priority.HIGH)
        assert chat.priority is Priority.HIGH  # not before the decay time
        deadline = time.monotonic() + 5
        while chat.priority is not Priority.BACKGROUND and time.monotonic() < deadline:
            time.sleep(0.02)
        assert chat.priority is Priority.BACKGROUND and image.quality == 1.0
        traffic.exit("image", Priority.BACKGROUND)
        traffic.enter("image", Priority.NORMAL)  # a new request cancels the countdown
        time.sleep(0.4)
        assert image.priority is Priority.NORMAL and traffic.in_flight("image") == 1
    finally:
        traffic.close()
        arbiter.close()


# ---- slow: the real server -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``torch-arbiter serve`` as a real process: loopback by default, the key from the environment;
    stopped with SIGTERM, after which it must have shut down cleanly (models unloaded)."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "torch_arbiter.cli", "serve", "--port", str(port), "--idle-decay-s",
             str(IDLE_DECAY_S), "--max-tokens", "400"],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TORCH_ARBITER_API_KEY": KEY})
    url = f"http://127.0.0.1:{port}"

    def up():
        assert process.poll() is None, log_path.read_text()
        try:
            return httpx.get(f"{url}/healthz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        _wait(up, timeout=300)
        yield url, process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
    output = log_path.read_text()
    assert code in (0, -signal.SIGTERM), output  # uvicorn re-raises the signal once it has shut down
    assert f"Uvicorn running on http://127.0.0.1:{port}" in output and "Application shutdown complete" in output


@pytest.fixture
def client(server):
    url, _ = server
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _health(server) -> dict:
    return httpx.get(f"{server[0]}/healthz").json()


def _wait(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _wait_idle(server):
    _wait(lambda: all(m["priority"] == "BACKGROUND" and m["in_flight"] == 0
                      for m in _health(server)["models"].values()))


def _chat(text: str, **options):
    return {"model": CHAT, "messages": [{"role": "user", "content": text}], "temperature": 0, **options}


def _png_size(b64: str) -> tuple[int, int]:
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64))).size


@pytest.mark.slow
def test_models_health_metrics_and_the_api_key(server, client):
    url, _ = server
    assert sorted(m.id for m in client.models.list()) == sorted([CHAT, IMAGE])
    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    assert caught.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/metrics").status_code == 401
    metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert f'torch_arbiter_serve_in_flight{{model="{CHAT}"}}' in metrics
    assert "torch_arbiter_workload_quality_in_effect{" in metrics and "torch_arbiter_rebalances_total" in metrics
    health = _health(server)
    assert health["status"] == "ok" and set(health["models"]) == {CHAT, IMAGE}


@pytest.mark.slow
def test_a_chat_completion_with_its_quality_header(server, client):
    raw = client.chat.completions.with_raw_response.create(**_chat("Say hello", max_tokens=6))
    completion = raw.parse()
    assert completion.choices[0].message.content and completion.model == CHAT
    assert completion.usage.completion_tokens <= 6 and completion.choices[0].finish_reason in ("stop", "length")
    assert float(raw.headers[QUALITY]) == 1.0  # the busy chat outranks the idle image model
    assert raw.headers["x-torch-arbiter-priority"] == "high"
    assert raw.headers["x-torch-arbiter-replica"].endswith(f":{server[1]}")


@pytest.mark.slow
def test_concurrent_streamed_chats_and_image_requests(server, client):
    def stream(i):
        chunks = list(client.chat.completions.create(**_chat(f"Name a color, {i}", max_tokens=6), stream=True,
                                                     stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        return text, finish, chunks[-1].usage

    def images(i):
        return client.images.generate(model=IMAGE, prompt="a digit", n=2, size="16x16",
                                      extra_body={"num_inference_steps": 3, "seed": i})

    with ThreadPoolExecutor(6) as pool:
        chats = [pool.submit(stream, i) for i in range(4)]
        pictures = [pool.submit(images, i) for i in range(2)]
        chat_results = [f.result(timeout=120) for f in chats]
        image_results = [f.result(timeout=120) for f in pictures]
    for text, finish, usage in chat_results:
        assert text and len(finish) == 1 and usage.completion_tokens <= 6
    for result in image_results:
        assert len(result.data) == 2 and all(_png_size(d.b64_json) == (16, 16) for d in result.data)
    assert image_results[0].data[0].b64_json != image_results[1].data[0].b64_json  # two seeds
    models = _health(server)["models"]
    assert models[CHAT]["failed"] == models[IMAGE]["failed"] == 0


@pytest.mark.slow
def test_the_qualities_follow_the_traffic(server, client):
    _wait_idle(server)
    image_floor = _health(server)["models"][IMAGE]["min_quality"]
    alone = client.images.with_raw_response.generate(model=IMAGE, prompt="7", extra_body={"num_inference_steps": 2})
    assert float(alone.headers[QUALITY]) == 1.0  # busy image, idle chat: the image runs at full
    assert _health(server)["models"][CHAT]["quality"] < 1.0  # the idle chat gave way to it
    stream = client.chat.completions.with_raw_response.create(**_chat("Tell me a story", max_tokens=60), stream=True)
    assert float(stream.headers[QUALITY]) == 1.0
    chunks = iter(stream.parse())
    next(chunks)
    during = client.images.with_raw_response.generate(model=IMAGE, prompt="7", extra_body={"num_inference_steps": 2})
    assert float(during.headers[QUALITY]) == pytest.approx(image_floor)  # the chat outranks it
    asked = client.images.with_raw_response.generate(model=IMAGE, prompt="7", extra_body={"num_inference_steps": 2},
                                                     extra_headers={"x-torch-arbiter-priority": "critical"})
    assert asked.headers["x-torch-arbiter-priority"] == "high"  # clamped to the operator's max_priority
    assert float(asked.headers[QUALITY]) > image_floor  # equal priority: the device is shared
    list(chunks)
    _wait_idle(server)
    assert _health(server)["models"][CHAT]["quality"] < 1.0  # both idle: shared again


@pytest.mark.slow
def test_bad_requests_get_openai_errors(server, client):
    url, _ = server
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"
    cases = [
        (lambda: client.chat.completions.create(**_chat("hi", max_tokens=401)), "max_tokens"),
        (lambda: client.chat.completions.create(**_chat("hi", n=2)), "n"),
        (lambda: client.chat.completions.create(model=CHAT, messages=[]), "messages"),
        (lambda: client.images.generate(model=IMAGE, prompt="7", size="1024x1024"), "size"),
        (lambda: client.images.generate(model=IMAGE, prompt="7", n=0), "n"),
        (lambda: client.images.generate(model=IMAGE, prompt="7", n=99), "n"),
        (lambda: client.images.generate(model=IMAGE, prompt="7", response_format="url"), "response_format"),
        (lambda: client.chat.completions.create(**_chat("hi"), extra_headers={"x-torch-arbiter-priority": "asap"}),
         "x-torch-arbiter-priority"),
    ]
    for call, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            call()
        error = caught.value.body
        assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**_chat("hello " * 8200, max_tokens=4))
    assert caught.value.body["code"] == "context_length_exceeded" and caught.value.body["param"] == "messages"
    for body in (b"{not json", b"[1, 2]"):
        response = httpx.post(f"{url}/v1/chat/completions", content=body,
                              headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        assert response.status_code == 400 and set(response.json()["error"]) == {"message", "type", "param", "code"}
    missing = httpx.get(f"{url}/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert missing.status_code == 404 and "error" in missing.json()


@pytest.mark.slow
def test_a_client_that_drops_a_stream_frees_its_slot(server):
    url, _ = server
    _wait_idle(server)
    before = _health(server)["models"][CHAT]
    got = []
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                         json=_chat("Write a long essay about the sea", max_tokens=400, stream=True)) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    got.append(line)
                if len(got) == 3:
                    break  # leave the stream mid-way: the connection closes with the block
    started = time.monotonic()
    _wait(lambda: _health(server)["models"][CHAT]["in_flight"] == 0, timeout=15)
    after = _health(server)["models"][CHAT]
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]
    assert time.monotonic() - started < 10  # 400 tokens would take far longer
    with openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) as client:
        assert client.chat.completions.create(**_chat("hi", max_tokens=2)).choices[0].message.content is not None


def test_a_missing_serve_extra_says_what_to_install(monkeypatch):
    import importlib.util

    from torch_arbiter import OptionalDependencyError
    from torch_arbiter.serve import require_serve_dependencies

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    with pytest.raises(OptionalDependencyError, match=r"pip install 'torch-arbiter\[serve\]'"):
        require_serve_dependencies()


def test_a_preempted_forward_is_retried_and_the_request_completes():
    """The chat runner over a small real transformers model whose forward is refused twice with
    PreemptedError at its start (where a suspended model's forward gives up waiting): the request
    still completes, with the same tokens as without the refusals."""
    import asyncio
    import contextlib

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from torch_arbiter import PreemptedError
    from torch_arbiter.demo import models
    from torch_arbiter.serve.runners import ChatJob, ChatRunner

    tokenizer = AutoTokenizer.from_pretrained(models.smollm2_holo_dir(), local_files_only=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    refusals = {"left": 0}

    def refuse(_module, _args, _kwargs):
        if refusals["left"]:
            refusals["left"] -= 1
            raise PreemptedError("suspended: retry after re-admission")

    model.register_forward_pre_hook(refuse, with_kwargs=True)

    class Backend:
        def lease(self):
            return contextlib.nullcontext(model)

        def served_quality(self):
            return 1.0

    runner = ChatRunner("tiny", tokenizer, Backend(), context_length=512, eos_token_ids=set())

    async def complete(prompt_ids):
        job = ChatJob(asyncio.get_running_loop(), prompt_ids=prompt_ids, max_tokens=5, temperature=0)
        runner.submit(job)
        events = []
        while not events or events[-1][0] not in ("done", "error"):
            events.append(await asyncio.wait_for(job.events.get(), 60))
        return events, job.generated

    try:
        prompt = runner.encode([{"role": "user", "content": "hi"}])
        _, plain_tokens = asyncio.run(complete(prompt))
        refusals["left"] = 2
        events, tokens = asyncio.run(complete(prompt))
    finally:
        runner.close()
    assert events[-1] == ("done", {"finish_reason": "length", "prompt_tokens": len(prompt), "completion_tokens": 5})
    assert tokens == plain_tokens and refusals["left"] == 0
    assert runner.retries == 2 and runner.failed == 0 and runner.completed == 2
