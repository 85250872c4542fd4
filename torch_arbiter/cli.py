"""The ``torch-arbiter`` command.

Subcommands: ``demo`` (the main job: two real models share one virtual device),
``convert`` / ``inspect`` (holo checkpoints). Each subcommand is a ``_cmd_*``
function registered in :func:`_build_parser`.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(vram_gb=args.vram_gb, quick=args.quick)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torch-arbiter",
        description="Share one GPU between several PyTorch models at live quality.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run two real models side by side under one arbiter")
    demo.add_argument("--vram-gb", type=float, default=None, help="virtual device size (CPU)")
    demo.add_argument("--quick", action="store_true", help="shorter run (used by the tests)")
    demo.set_defaults(func=_cmd_demo)

    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``torch-arbiter`` console script.

    Args:
        argv: arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        The process exit status (0 on success). An ``ArbiterError`` is printed as
        one line on stderr with status 2 instead of a traceback.
    """
    from .errors import ArbiterError

    args = _build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ArbiterError as exc:
        print(f"torch-arbiter: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
