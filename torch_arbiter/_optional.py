"""Import a package from one of torch_arbiter's extras, or say which extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import OptionalDependencyError

__all__ = ["import_optional"]


def import_optional(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module``; if it is missing, raise an error naming the extra that brings it.

    Args:
        module: the module to import (``"rich"``, ``"prometheus_client"``).
        extra: the torch-arbiter extra that installs it (``"demo"``, ``"metrics"``).
        feature: what needs it, for the message (``"Prometheus metrics"``).

    Returns:
        The imported module.

    Raises:
        OptionalDependencyError: the module cannot be imported.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.split(".")[0]
        raise OptionalDependencyError(
            f"the {package} package is missing ({feature} use it): run `pip install 'torch-arbiter[{extra}]'` "
            f"(or `pip install {package}`)"
        ) from exc
