"""torch_arbiter: several PyTorch models share one GPU at live quality."""

from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all
from .priority import Priority, WorkloadKind, WorkloadType

__all__ = [*_errors_all, "Priority", "WorkloadKind", "WorkloadType"]
__version__ = "0.1.0"
