"""The models behind the server: one arbiter, a patched chat model and pipeline, their runners.

:class:`ServeConfig` holds what ``torch-arbiter serve`` takes on its command line;
:meth:`ModelHost.load` loads both models, patches them under one
:class:`~torch_arbiter.arbiter.Arbiter` and starts one worker thread per model. Nothing here
imports FastAPI: the Ray Serve deployment and the benchmark build a host the same way.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidRequestError
from ..priority import Priority, WorkloadType
from .runners import ChatRunner, ImageRunner, ManagedBackend, pipeline_call_options
from .traffic import TrafficPriorities

__all__ = ["ServeConfig", "ModelHost", "replica_name"]

_GIB = 1 << 30
_MIB = 1 << 20
DEFAULT_CHAT_ID = "SmolLM2-135M-Instruct"
DEFAULT_IMAGE_ID = "digits-ddpm"


@dataclass(frozen=True)
class ServeConfig:
    """What the server serves and how it shares the device.

    Args:
        host: address to bind (loopback unless told otherwise).
        port: TCP port.
        chat_model: a local transformers causal-LM dir; None serves SmolLM2-135M-Instruct.
        chat_holo: a holo checkpoint of ``chat_model`` made by ``torch-arbiter convert`` (read
            instead of encoding the weights at start); ignored for the default model (its
            cached conversion is used).
        image_pipeline: a local diffusers pipeline dir; None serves the digits DDPM.
        api_key: the key clients must send as ``Authorization: Bearer KEY``; None: no check.
        vram_gb: device size in GiB; None: the whole card on CUDA, and on a virtual (CPU) device
            just enough for the chat model at full quality beside the image model at its floor.
        device: ``"cpu"`` or ``"cuda:N"``; None: ``cuda:0`` when torch can use CUDA.
        idle_decay_s: seconds after its last request before a model decays to ``idle_priority``.
        chat_priority: the priority of a chat request without a priority header.
        image_priority: the priority of an image request without a priority header.
        max_priority: the highest priority a request header may ask for (higher is clamped).
        idle_priority: the priority of a model with no request in flight.
        max_tokens: the most completion tokens one chat request may ask for.
        max_images: the most images one request may ask for (``n``).
        image_steps: denoising steps of an image request that does not say.
        max_image_steps: the most denoising steps a request may ask for.
        chat_activation_bytes: bytes the chat model needs at any quality (KV caches, activations).
        image_activation_bytes: the same for the pipeline.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    chat_model: str | None = None
    chat_holo: str | None = None
    image_pipeline: str | None = None
    api_key: str | None = None
    vram_gb: float | None = None
    device: str | None = None
    idle_decay_s: float = 2.0
    chat_priority: Priority = Priority.USER_FACING
    image_priority: Priority = Priority.BACKGROUND
    max_priority: Priority = Priority.HIGH
    idle_priority: Priority = Priority.BACKGROUND
    max_tokens: int = 512
    max_images: int = 4
    image_steps: int = 25
    max_image_steps: int = 1000
    chat_activation_bytes: int = 32 * _MIB
    image_activation_bytes: int = 16 * _MIB

    def __post_init__(self) -> None:
        for name in ("chat_priority", "image_priority", "max_priority", "idle_priority"):
            object.__setattr__(self, name, Priority.coerce(getattr(self, name)))
        for name in ("port", "max_tokens", "max_images", "image_steps", "max_image_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "port" else 1):
                raise InvalidRequestError(f"{name} must be a positive integer, got {value!r}")
        if self.image_steps > self.max_image_steps:
            raise InvalidRequestError("image_steps must not exceed max_image_steps")
        if not (isinstance(self.idle_decay_s, (int, float)) and math.isfinite(self.idle_decay_s)
                and self.idle_decay_s >= 0):
            raise InvalidRequestError(f"idle_decay_s must be seconds >= 0, got {self.idle_decay_s!r}")
        if self.vram_gb is not None and not (isinstance(self.vram_gb, (int, float)) and self.vram_gb > 0):
            raise InvalidRequestError(f"vram_gb must be a positive number of GiB, got {self.vram_gb!r}")
        for name in ("chat_model", "chat_holo", "image_pipeline"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_dir():
                raise InvalidRequestError(f"--{name.replace('_', '-')} {path}: not a directory (give a local "
                                          "model dir; nothing is downloaded)")
        if self.api_key is not None and not self.api_key.strip():
            raise InvalidRequestError("api_key must not be empty: omit it to serve without a key")


def replica_name() -> str:
    """``host:pid`` of this server process (sent in the ``x-torch-arbiter-replica`` header)."""
    return f"{socket.gethostname()}:{os.getpid()}"


class ModelHost:
    """One arbiter, the two patched models, their runners and the traffic-driven priorities.

    Build it with :meth:`load`; the constructor only wires parts that exist (the benchmark
    wires its swap baseline's runners the same way, with ``arbiter=None``).

    Attributes:
        chat: the :class:`ChatRunner`.
        image: the :class:`ImageRunner`.
        arbiter: the arbiter (None for a host without one).
        traffic: the :class:`TrafficPriorities` (None without an arbiter).
        managed: the :class:`~torch_arbiter.hooks.ManagedModel` of each model id.
    """

    def __init__(self, config: ServeConfig, chat: ChatRunner, image: ImageRunner, *, arbiter=None,
                 traffic: TrafficPriorities | None = None, managed: dict | None = None):
        self.config = config
        self.chat = chat
        self.image = image
        self.arbiter = arbiter
        self.traffic = traffic
        self.managed = dict(managed or {})
        self.replica = replica_name()

    @classmethod
    def load(cls, config: ServeConfig) -> "ModelHost":
        """Load, patch and register both models, and start their worker threads.

        Args:
            config: the :class:`ServeConfig`.

        Returns:
            The running host (close it with :meth:`close`).

        Raises:
            ModelNotAvailableError: a default model's package is missing.
            PatchError / ArbiterError: a model cannot be patched or does not fit the device.
        """
        from ..arbiter import Arbiter, ArbiterConfig
        from ..hooks.managed import _register, patch

        device = config.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
        chat_id, model, tokenizer, holo_dir = _load_chat(config)
        image_id, pipeline = _load_image(config)
        if device != "cpu":
            model.to(device)
            pipeline.to(device)
        chat = patch(model, register=False, holo_dir=holo_dir, progress=False)
        try:
            image = patch(pipeline, register=False, progress=False)
        except BaseException:
            chat.unpatch()
            raise
        if config.vram_gb is not None:
            vram_bytes = int(config.vram_gb * _GIB)
        elif device == "cpu":
            vram_bytes = (chat.full_bytes + image.bytes_at(image.min_quality)
                          + config.chat_activation_bytes + config.image_activation_bytes)
        else:
            vram_bytes = None
        arbiter = Arbiter(ArbiterConfig(vram_bytes=vram_bytes, device=device))
        try:
            # Registered after both are patched so that the default virtual device can be sized
            # from their exact bytes; the same registration patch() does.
            _register(chat, arbiter, WorkloadType.LLM_INFERENCE, config.idle_priority, chat_id, None,
                      config.chat_activation_bytes, None)
            _register(image, arbiter, WorkloadType.IMAGE_GENERATION, config.idle_priority, image_id, None,
                      config.image_activation_bytes, None)
        except BaseException:
            chat.unpatch()
            image.unpatch()
            arbiter.close()
            raise
        cuda = device.startswith("cuda")
        eos = _eos_ids(model, tokenizer)
        context = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        chat_runner = ChatRunner(chat_id, tokenizer, ManagedBackend(chat, cuda_scope=cuda), context_length=context,
                                 eos_token_ids=eos)
        image_runner = ImageRunner(image_id, ManagedBackend(image, cuda_scope=cuda), pipeline_call_options(pipeline))
        traffic = TrafficPriorities(arbiter, {chat_id: chat.allocation, image_id: image.allocation},
                                    idle_priority=config.idle_priority, idle_decay_s=config.idle_decay_s)
        return cls(config, chat_runner, image_runner, arbiter=arbiter, traffic=traffic,
                   managed={chat_id: chat, image_id: image})

    def runners(self) -> dict[str, Any]:
        """The runner of each model id."""
        return {self.chat.model_id: self.chat, self.image.model_id: self.image}

    def status(self) -> dict[str, Any]:
        """Per model: quality in effect, priority, requests in flight and done, floor, resident and full bytes."""
        models = {}
        for model_id, runner in self.runners().items():
            managed = self.managed.get(model_id)
            models[model_id] = {
                "quality": runner.backend.served_quality(),
                "priority": self.traffic.priority(model_id).name if self.traffic else None,
                "in_flight": runner.in_flight,
                "completed": runner.completed,
                "cancelled": runner.cancelled,
                "failed": runner.failed,
                "retries": runner.retries,
                "min_quality": managed.min_quality if managed else None,
                "resident_bytes": managed.resident_bytes if managed else None,
                "full_bytes": managed.full_bytes if managed else None,
            }
        status: dict[str, Any] = {"status": "ok", "replica": self.replica, "models": models}
        if self.arbiter is not None:
            state = self.arbiter.state()
            status["device"] = {"capacity_bytes": state.capacity_bytes, "granted_bytes": state.granted_bytes}
        return status

    def close(self) -> None:
        """Stop the runners and the decays, unpatch both models, close the arbiter."""
        if self.traffic is not None:
            self.traffic.close()
        self.chat.close()
        self.image.close()
        for managed in self.managed.values():
            managed.unpatch()
        if self.arbiter is not None:
            self.arbiter.close()


def _load_chat(config: ServeConfig):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config.chat_model is None:
        from .. import models

        model, tokenizer = models.load_smollm2()
        return DEFAULT_CHAT_ID, model, tokenizer, models.smollm2_holo_dir()
    directory = Path(config.chat_model)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError(f"the tokenizer in {directory} has no chat template: serve an instruct/chat "
                                  "model (its tokenizer_config.json must carry chat_template)")
    return directory.name, model, tokenizer, config.chat_holo


def _load_image(config: ServeConfig):
    if config.image_pipeline is None:
        from .. import models

        return DEFAULT_IMAGE_ID, models.load_digits_ddpm()
    from diffusers import DiffusionPipeline

    directory = Path(config.image_pipeline)
    pipeline = DiffusionPipeline.from_pretrained(directory, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return directory.name, pipeline


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        ids.update(value if isinstance(value, (list, tuple)) else [] if value is None else [value])
    return ids
