"""``torch-arbiter serve``: an OpenAI-compatible server for a chat model and an image model on one device.

Both models are patched under one :class:`~torch_arbiter.arbiter.Arbiter`; each has its own
worker thread (:mod:`.runners`), the arbiter follows the traffic (:mod:`.traffic`), and the HTTP
app (:mod:`.app`, FastAPI) speaks the OpenAI chat-completions and images APIs.

The HTTP side needs the ``serve`` extra (``pip install 'torch-arbiter[serve]'``): FastAPI and
uvicorn are imported only by :func:`create_app` and :func:`run`, which raise
:class:`~torch_arbiter.errors.OptionalDependencyError` saying so when they are missing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import threading
import time
from typing import Iterator

from ..errors import OptionalDependencyError
from .host import ModelHost, ServeConfig, replica_name

__all__ = ["ServeConfig", "ModelHost", "create_app", "run", "replica_name", "require_serve_dependencies",
           "serve_in_thread"]

_SERVE_PACKAGES = ("fastapi", "uvicorn", "prometheus_client")


def require_serve_dependencies() -> None:
    """Check that the ``serve`` extra is installed.

    Raises:
        OptionalDependencyError: a package of the extra is missing (the message says what to install).
    """
    missing = [name for name in _SERVE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise OptionalDependencyError(
            f"torch-arbiter serve needs {', '.join(missing)}: run `pip install 'torch-arbiter[serve]'`")


def create_app(host: ModelHost, *, owns_host: bool = False):
    """The FastAPI app over a loaded :class:`ModelHost` (see :func:`torch_arbiter.serve.app.create_app`).

    Raises:
        OptionalDependencyError: FastAPI or prometheus_client is not installed.
    """
    require_serve_dependencies()
    from .app import create_app as _create_app

    return _create_app(host, owns_host=owns_host)


def run(config: ServeConfig) -> int:
    """Load both models, serve them with uvicorn until interrupted, then unload them.

    Args:
        config: the :class:`ServeConfig` (host, port, models, key, device size, priorities).

    Returns:
        0 after a clean shutdown (Ctrl-C or SIGTERM).

    Raises:
        OptionalDependencyError: the ``serve`` extra is not installed.
    """
    require_serve_dependencies()
    import uvicorn

    host = ModelHost.load(config)
    app = create_app(host, owns_host=True)
    print(f"torch-arbiter serve: {host.chat.model_id} (chat) and {host.image.model_id} (images) on "
          f"http://{config.host}:{config.port}/v1", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
    return 0


@contextlib.contextmanager
def serve_in_thread(app, *, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread while the block runs (tests, notebooks, benchmarks).

    Args:
        app: an ASGI app (from :func:`create_app`).
        host: address to bind (loopback by default).
        port: TCP port; 0 picks a free one.
        timeout: seconds to wait for the server to start and to stop.

    Yields:
        The base URL, e.g. ``http://127.0.0.1:41234`` (add ``/v1`` for the OpenAI client).

    Raises:
        OptionalDependencyError: uvicorn is not installed.
        RuntimeError: the server did not start within ``timeout``.
    """
    require_serve_dependencies()
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="torch-arbiter-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {host}:{port} within {timeout} s")
            time.sleep(0.02)
        bound = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)
