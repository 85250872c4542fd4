"""``torch-arbiter serve`` as a Ray Serve deployment: one replica per GPU, Ray routing in front.

Each replica is the same app as ``torch-arbiter serve`` (:mod:`torch_arbiter.serve`): its own
:class:`~torch_arbiter.serve.ModelHost`, so its own arbiter over its own device (on a GPU node
Ray gives each replica one card through ``CUDA_VISIBLE_DEVICES``, which the replica sees as
``cuda:0``; without a GPU each replica runs on a virtual CPU device). Ray Serve's proxy routes
the OpenAI requests to the replicas and its autoscaler adds or removes replicas; nothing here
schedules anything itself.

Start it from the repository root (see README.md)::

    serve run integrations.ray_serve.deployment:build num_replicas=2
"""

from __future__ import annotations

from typing import Any

from ray import serve

from torch_arbiter.serve import ModelHost, ServeConfig, create_app

__all__ = ["TorchArbiterDeployment", "build"]

_MAX_ONGOING = 16  # a replica interleaves its chats per token: let it hold several at once


@serve.deployment(ray_actor_options={"num_gpus": 1}, max_ongoing_requests=_MAX_ONGOING)
@serve.ingress()
class TorchArbiterDeployment:
    """One replica: loads both models under its own arbiter; the app is built once they are loaded.

    Args:
        config: :class:`~torch_arbiter.serve.ServeConfig` fields as a dict (``host``/``port`` are
            Ray's, not the replica's: the Serve proxy owns the HTTP port).
    """

    def __init__(self, config: dict[str, Any] | None = None):
        self.host = ModelHost.load(ServeConfig(**(config or {})))

    def __serve_build_asgi_app__(self):
        """The replica's FastAPI app (Ray Serve calls this after ``__init__``)."""
        return create_app(self.host, owns_host=True)


def build(args: dict[str, str]) -> serve.Application:
    """The Ray Serve application, for ``serve run integrations.ray_serve.deployment:build key=value ...``.

    Args:
        args: ``num_replicas`` (default 1), or ``autoscaling=true`` with ``min_replicas`` /
            ``max_replicas`` (default 1 / the number of GPUs); ``gpu`` (``true``/``false``; default:
            true when the cluster has GPUs); and any :class:`ServeConfig` field as a string
            (``vram_gb``, ``idle_decay_s``, ``api_key``, ``chat_model``, ``image_pipeline``, ...).

    Returns:
        The bound application. On GPUs each replica asks Ray for one GPU; without, for one CPU.

    Limits: one replica per GPU (a replica manages exactly one device); the model dirs must exist
    at the same path on every node (or on a shared filesystem).
    """
    import ray

    args = dict(args)
    gpu_default = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    use_gpu = _flag(args.pop("gpu", None), gpu_default)
    autoscaling = _flag(args.pop("autoscaling", None), False)
    num_replicas = int(args.pop("num_replicas", 1))
    min_replicas = int(args.pop("min_replicas", 1))
    max_replicas = int(args.pop("max_replicas", num_replicas))
    config = _config_fields(args)
    options: dict[str, Any] = {
        "ray_actor_options": {"num_gpus": 1} if use_gpu else {"num_cpus": 1, "num_gpus": 0},
    }
    if autoscaling:
        options["autoscaling_config"] = {"min_replicas": min_replicas, "max_replicas": max_replicas,
                                         "target_ongoing_requests": _MAX_ONGOING // 2}
    else:
        options["num_replicas"] = num_replicas
    if not use_gpu:
        config.setdefault("device", "cpu")
    return TorchArbiterDeployment.options(**options).bind(config)


def _flag(value: str | bool | None, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    return value.strip().lower() in ("1", "true", "yes", "on")


def _config_fields(args: dict[str, str]) -> dict[str, Any]:
    """``ServeConfig`` fields from ``key=value`` strings, converted to each field's type."""
    import dataclasses

    defaults = {f.name: f.default for f in dataclasses.fields(ServeConfig)}
    unknown = set(args) - set(defaults)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}: use num_replicas, autoscaling, min_replicas, "
                         f"max_replicas, gpu or a ServeConfig field ({', '.join(sorted(defaults))})")
    config: dict[str, Any] = {}
    for name, value in args.items():
        default = defaults[name]
        if isinstance(value, str) and isinstance(default, bool):
            config[name] = _flag(value, default)
        elif isinstance(value, str) and isinstance(default, int) and not isinstance(default, bool) \
                and name not in ("chat_priority", "image_priority", "max_priority", "idle_priority"):
            config[name] = int(value)
        elif isinstance(value, str) and (isinstance(default, float) or name == "vram_gb"):
            config[name] = float(value)
        else:
            config[name] = value
    return config
