"""The Ray Serve deployment on a local Ray: two CPU replicas, each with its own arbiter, answer
concurrent requests from the official openai client through Ray's proxy."""

from __future__ import annotations

import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[2]
CHAT = "SmolLM2-135M-Instruct"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_app():
    from integrations.ray_serve.deployment import build

    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="ray12_", dir="/tmp") as temp:
        # The replicas import torch_arbiter and this module from this checkout.
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, _temp_dir=temp,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}}, logging_level="warning")
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build({"num_replicas": "2", "gpu": "false", "idle_decay_s": "0.5"}), name="torch_arbiter",
                      route_prefix="/", blocking=False)
            _wait_running("torch_arbiter", timeout=150)
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.shutdown()
            ray.shutdown()


def _wait_running(name: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status = serve.status().applications.get(name)
        if status is not None and status.status == "RUNNING":
            return
        assert status is None or status.status not in ("DEPLOY_FAILED", "UNHEALTHY"), status
        assert time.monotonic() < deadline, f"the app did not start: {status}"
        time.sleep(0.5)


def test_two_cpu_replicas_answer_concurrent_requests(ray_app):
    client = openai.OpenAI(base_url=f"{ray_app}/v1", api_key="unused", max_retries=0, timeout=120)

    def chat(i):
        raw = client.chat.completions.with_raw_response.create(
            model=CHAT, messages=[{"role": "user", "content": f"Say a number, {i}"}], max_tokens=3, temperature=0,
            stream=True)
        chunks = list(raw.parse())
        return raw.headers["x-torch-arbiter-replica"], float(raw.headers["x-torch-arbiter-quality"]), chunks

    def image(i):
        raw = client.images.with_raw_response.generate(model="digits-ddpm", prompt="7", extra_body={
            "num_inference_steps": 2, "seed": i})
        return raw.headers["x-torch-arbiter-replica"], len(raw.parse().data)

    replicas: set[str] = set()
    with ThreadPoolExecutor(8) as pool:
        for _ in range(3):  # Ray's router spreads by queue length: a few rounds see both replicas
            chats = [pool.submit(chat, i) for i in range(6)]
            images = [pool.submit(image, i) for i in range(2)]
            for future in chats:
                replica, quality, chunks = future.result(timeout=120)
                replicas.add(replica)
                assert 0 < quality <= 1 and chunks[-1].choices[0].finish_reason in ("stop", "length")
            for future in images:
                replica, count = future.result(timeout=120)
                replicas.add(replica)
                assert count == 1
            if len(replicas) == 2:
                break
    assert len(replicas) == 2, replicas
    assert sorted(m.id for m in client.models.list()) == sorted([CHAT, "digits-ddpm"])
