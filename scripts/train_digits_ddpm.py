"""Train the small digits DDPM that tests, benchmarks and the demo run through a real DDPMPipeline.

No trained diffusers model ships on PyPI and no model hub is reachable here, so the project trains
its own: a ~0.25 M-parameter ``UNet2DModel`` (Conv2d and Linear layers, attention at 8x8) on
scikit-learn's 1797 handwritten 8x8 digits, upsampled to 16x16 and scaled to [-1, 1]. The
cosine noise schedule with 200 train timesteps keeps sampling cheap. An exponential moving
average of the weights is what gets saved (it samples cleaner digits than the raw weights).

Usage (about 9 min on one shared CPU core)::

    .venv/bin/python scripts/train_digits_ddpm.py                 # writes torch_arbiter/demo/assets/digits_ddpm
    .venv/bin/python scripts/train_digits_ddpm.py --steps 200 --out /tmp/ddpm   # a quick smoke run

The output is a diffusers pipeline dir (``model_index.json``, ``unet/``, ``scheduler/``) plus a
README with the command, seed and final loss and ``samples.png`` (a grid of 36 samples). It is
written to a temp dir and renamed into place, so a failed run never leaves half a model behind.
Runs are seeded; bit-identical results need the same torch build and thread count.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

_DEFAULT_OUT = Path(__file__).resolve().parent.parent / "torch_arbiter" / "demo" / "assets" / "digits_ddpm"
_IMAGE_SIZE = 16


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=_DEFAULT_OUT, help="pipeline dir to write")
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--timesteps", type=int, default=200, help="DDPM train timesteps")
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args(argv)


def _digits_dataset() -> torch.Tensor:
    """scikit-learn's digits as a (1797, 1, 16, 16) float tensor in [-1, 1]."""
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(images, size=(_IMAGE_SIZE, _IMAGE_SIZE), mode="bilinear", align_corners=False)
    return images.clamp(0.0, 1.0) * 2.0 - 1.0


def _build_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=_IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        layers_per_block=2,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=16,
    )


def _save_grid(images: np.ndarray, path: Path) -> None:
    """Save (n, h, w, 1) images in [0, 1] as a square PNG grid, each digit scaled up 4x."""
    from PIL import Image

    n, h, w = images.shape[:3]
    side = int(np.ceil(np.sqrt(n)))
    grid = np.ones((side * (h + 1), side * (w + 1)), dtype=np.float32)
    for i in range(n):
        row, col = divmod(i, side)
        grid[row * (h + 1):row * (h + 1) + h, col * (w + 1):col * (w + 1) + w] = images[i, :, :, 0]
    pixels = (grid * 255).round().astype(np.uint8)
    Image.fromarray(pixels).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(path)


def train(args: argparse.Namespace) -> None:
    """Train, sample a grid, and write the pipeline dir atomically to ``args.out``."""
    from diffusers import DDPMPipeline, DDPMScheduler

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    data = _digits_dataset()
    unet = _build_unet()
    ema = _build_unet()
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    scheduler = DDPMScheduler(num_train_timesteps=args.timesteps, beta_schedule="squaredcos_cap_v2")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.05
    )
    params = sum(p.numel() for p in unet.parameters())
    print(f"UNet2DModel with {params} parameters, {len(data)} images, {args.steps} steps", flush=True)

    started = time.perf_counter()
    recent_losses: list[float] = []
    unet.train()
    for step in range(1, args.steps + 1):
        batch = data[torch.randint(len(data), (args.batch_size,), generator=generator)]
        noise = torch.randn(batch.shape, generator=generator)
        timesteps = torch.randint(args.timesteps, (args.batch_size,), generator=generator)
        noisy = scheduler.add_noise(batch, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        with torch.no_grad():
            for ema_param, param in zip(ema.parameters(), unet.parameters()):
                ema_param.lerp_(param, 1.0 - args.ema_decay)
        recent_losses = (recent_losses + [loss.item()])[-100:]
        if step % 100 == 0 or step == args.steps:
            print(f"step {step:5d}  loss(avg of last 100) {np.mean(recent_losses):.4f}  "
                  f"{time.perf_counter() - started:.0f}s", flush=True)
    final_loss = float(np.mean(recent_losses))

    ema.eval()
    pipeline = DDPMPipeline(unet=ema, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    samples = pipeline(batch_size=36, generator=torch.Generator().manual_seed(args.seed),
                       num_inference_steps=args.timesteps, output_type="np").images

    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.", dir=args.out.parent))
    try:
        pipeline.save_pretrained(staging, safe_serialization=True)
        _save_grid(samples, staging / "samples.png")
        _write_readme(staging / "README.md", args, params, final_loss, time.perf_counter() - started)
        _make_readable(staging)
        if args.out.exists():
            shutil.rmtree(args.out)
        os.replace(staging, args.out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"final loss {final_loss:.4f}; wrote {args.out}", flush=True)


def _make_readable(directory: Path) -> None:
    """Give the staged tree normal permissions (mkdtemp and some writers create it private)."""
    directory.chmod(0o755)
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _write_readme(path: Path, args: argparse.Namespace, params: int, final_loss: float,
                  seconds: float) -> None:
    command = " ".join(shlex.quote(part) for part in [".venv/bin/python", "scripts/train_digits_ddpm.py",
                                                       *sys.argv[1:]])
    path.write_text(
        "# digits DDPM (trained by this repository)\n\n"
        "A diffusers `DDPMPipeline` whose `UNet2DModel` was trained on scikit-learn's 8x8 digits\n"
        "(upsampled to 16x16, one channel, scaled to [-1, 1]). Tests, benchmarks and the demo load it\n"
        "with `torch_arbiter.demo.models.load_digits_ddpm()`. `samples.png` shows 36 samples.\n\n"
        f"- command: `{command}`\n"
        f"- seed: {args.seed}; steps: {args.steps}; batch size: {args.batch_size}; lr: {args.lr} "
        f"(one-cycle); EMA decay: {args.ema_decay}; torch threads: {args.threads}\n"
        f"- scheduler: DDPMScheduler, {args.timesteps} train timesteps, squaredcos_cap_v2 betas\n"
        f"- parameters: {params}\n"
        f"- final training loss (noise MSE, mean of the last 100 steps): {final_loss:.4f}\n"
        f"- training time: {seconds:.0f} s (torch {torch.__version__})\n"
    )


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    train(_parse_args(argv))


if __name__ == "__main__":
    main()
