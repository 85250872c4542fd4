"""The ``torch-arbiter`` command.

Subcommands: ``demo`` (the main job: two real models share one virtual device),
``convert`` / ``inspect`` (holo checkpoints), ``serve`` (the OpenAI-compatible server). Each subcommand is a ``_cmd_*``
function registered in :func:`_build_parser`.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(vram_gb=args.vram_gb, quick=args.quick)


def _cmd_convert(args: argparse.Namespace) -> int:
    from .holo.convert import convert, format_summary

    summary = convert(args.src, args.dst, gguf_file=args.gguf_file, group_size=args.group_size,
                      rank=args.rank, overwrite=args.overwrite, progress=not args.no_progress,
                      calibration_text=args.calibration_text, calibration_tokens=args.calibration_tokens)
    print(format_summary(summary))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .holo.convert import format_summary, summarize

    print(format_summary(summarize(args.path)))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    from .serve import ServeConfig, run

    return run(ServeConfig(
        host=args.host, port=args.port, chat_model=args.chat_model, chat_holo=args.chat_holo,
        image_pipeline=args.image_pipeline, api_key=args.api_key or os.environ.get("TORCH_ARBITER_API_KEY"),
        vram_gb=args.vram_gb, device=args.device, idle_decay_s=args.idle_decay_s, max_priority=args.max_priority,
        max_tokens=args.max_tokens))


def _auto_or_int(value: str) -> str | int:
    if value == "auto":
        return value
    if value.isdigit():
        return int(value)
    raise argparse.ArgumentTypeError(f"expected 'auto' or a non-negative integer, got {value!r}")


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

    conv = sub.add_parser("convert", help="encode a model (transformers/diffusers dir, safetensors, GGUF) "
                                          "into a holo checkpoint")
    conv.add_argument("src", help="transformers model dir, diffusers pipeline dir, or .safetensors file")
    conv.add_argument("dst", help="destination directory of the holo checkpoint (must not exist)")
    conv.add_argument("--gguf-file", default=None, help="GGUF file name inside SRC (dequantised by transformers)")
    conv.add_argument("--group-size", type=_auto_or_int, default="auto",
                      help="weights per scale group: 'auto' (32, 64 or 128 per tensor, by measured error "
                           "per bit) or an even integer")
    conv.add_argument("--rank", type=_auto_or_int, default="auto",
                      help="low-rank branch: 'auto' (kept where it measures better per byte), 0, or a rank")
    conv.add_argument("--calibration-text", default=None, metavar="FILE",
                      help="text (not your evaluation text) run once through a transformers/GGUF model so that "
                           "its linear layers are encoded with GPTQ rounding on their own inputs")
    conv.add_argument("--calibration-tokens", type=int, default=1024,
                      help="tokens of the calibration text to run (default 1024)")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    conv.add_argument("--no-progress", action="store_true", help="no progress bar")
    conv.set_defaults(func=_cmd_convert)

    insp = sub.add_parser("inspect", help="print the summary of a holo checkpoint")
    insp.add_argument("path", help="holo checkpoint directory")
    insp.set_defaults(func=_cmd_inspect)

    srv = sub.add_parser("serve", help="OpenAI-compatible server: a chat model and an image model on one device")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--chat-model", default=None, metavar="DIR",
                     help="local transformers chat model dir (default: SmolLM2-135M-Instruct)")
    srv.add_argument("--chat-holo", default=None, metavar="DIR",
                     help="holo checkpoint of --chat-model from `torch-arbiter convert` (else encoded at start)")
    srv.add_argument("--image-pipeline", default=None, metavar="DIR",
                     help="local diffusers pipeline dir (default: the digits DDPM)")
    srv.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' (default: $TORCH_ARBITER_API_KEY, else no key)")
    srv.add_argument("--vram-gb", type=float, default=None,
                     help="device size (default: the card; on CPU the chat model at full beside the image floor)")
    srv.add_argument("--device", default=None, help="cpu or cuda:N (default: cuda:0 when available)")
    srv.add_argument("--idle-decay-s", type=float, default=2.0,
                     help="seconds after its last request before a model decays to BACKGROUND (default 2)")
    srv.add_argument("--max-priority", default="high",
                     help="highest priority a request header may ask for (default high)")
    srv.add_argument("--max-tokens", type=int, default=512, help="most completion tokens per chat request")
    srv.set_defaults(func=_cmd_serve)

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
