"""Throughput of each training method, per optimizer step, for one backbone and batch.

Every method runs through the real training loop (`semimed.engine.fit`) on synthetic uint8 images, so a step
costs what it costs in a study: augmentation of the labeled and two-view unlabeled batches (in-process,
train.loader_workers = 0), the method's forward passes, backward, optimizer step and after-step hook (EMA
teacher, generator step). Reported per method: labeled images/s (the step budget's unit), seconds per step,
images built per step (from the method's declared needs), and the step cost relative to `supervised`.
Self-supervised methods (simclr, byol) read no label: their "labeled img/s" is their stream's μB images per
step, so compare methods by s/step.

    .venv/bin/python scripts/bench_methods.py                      # small_cnn, 32 px, B=32, μ=2, CPU
    .venv/bin/python scripts/bench_methods.py --backbone resnet18_28 --image-size 28 --threads 2
    .venv/bin/python scripts/bench_methods.py --smoke-test         # seconds: does every method run?
    .venv/bin/python scripts/bench_methods.py --against-plain      # FixMatch vs a plain loop, separate processes

`--against-plain` hands every other flag to scripts/bench_against_plain.py (its own defaults: the issue's
ResNet-18, 28 px, B = 32, μ = 7 setting; `--help` there lists them).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from semimed.config import TrainConfig
from semimed.engine import RunData, fit
from semimed.methods import METHODS, Method, create_method
from semimed.models.backbones import create_backbone


def loop_methods() -> list[str]:
    """Every registered method that trains through the step loop (not the closed-form classical fits)."""
    names = [name for name in METHODS.names() if not getattr(METHODS.get(name), "closed_form", False)]
    return sorted(names, key=lambda name: name != "supervised")  # the reference row first


def images_per_step(method: Method, batch: int, mu: int) -> str:
    """Images the data side builds per step, from the method's declared needs: B labeled + μB per unlabeled
    view. Extra forward passes of the same images (a teacher, a generator) come on top of this."""
    labeled = batch if method.needs.labeled else 0
    views = len(method.needs.unlabeled)
    return f"{labeled} + {views} x {batch * mu}" if views else f"{labeled}"


def synthetic_data(image_size: int, channels: int, labeled: int, unlabeled: int, seed: int = 0) -> RunData:
    rng = np.random.default_rng(seed)
    n = labeled + unlabeled
    pixels = rng.integers(0, 256, (n, channels, image_size, image_size), dtype=np.uint8)
    rows = np.arange(n)
    return RunData(
        pixels=pixels,
        targets=np.arange(n) % 2,
        rows={"labeled": rows[:labeled], "unlabeled": rows[labeled:]},
        classes=["benign", "malignant"],
        multilabel=False,
    )


def bench_one(name: str, args: argparse.Namespace, data: RunData) -> dict:
    params = {"image_size": args.image_size} if name == "gan_ssl" else {}
    if name == "finetune":
        params = {"strategy": "full"}  # from the random init here: the step costs what a full fine-tune costs
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_backbone(args.backbone, 2, args.channels)
        method = create_method(name, model, 2, False, **params)
        # 2·steps steps with one log window of `steps`: the reported window is the second, warm half.
        cfg = TrainConfig(
            steps=2 * args.steps,
            batch_size=args.batch_size,
            unlabeled_ratio=args.mu,
            eval_every=4 * args.steps,
            checkpoint_every=10**9,
            device=args.device,
            amp=args.amp,
            channels_last=args.channels_last,
            loader_workers=args.loader_workers,
            compile=args.compile,
        )
        started = time.perf_counter()
        final = fit(method, data, cfg, show_progress=False, augment_device=args.augment_device)
        total = time.perf_counter() - started
    per_s = float(final["train/images_per_s"])
    # The engine counts a step's first stream: B labeled images, or μB for a method that reads no label.
    counted = args.batch_size if method.needs.labeled else args.batch_size * args.mu
    return {
        "method": name,
        "labeled_images_per_s": per_s,
        "s_per_step": counted / per_s,
        "images_per_step": images_per_step(method, args.batch_size, args.mu),
        "wall_s": total,
    }


def main(argv: list[str] | None = None) -> list[dict] | dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--against-plain" in argv:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_against_plain import main as against_plain

        return against_plain([a for a in argv if a != "--against-plain"])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="small_cnn")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="labeled images per step (B)")
    parser.add_argument(
        "--mu", type=int, default=2, help="unlabeled images per labeled one (train.unlabeled_ratio)"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after as many warm-up steps)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    parser.add_argument(
        "--channels-last", action="store_true", help="train.channels_last (faster convs on CPU)"
    )
    parser.add_argument("--loader-workers", type=int, default=0, help="train.loader_workers")
    parser.add_argument(
        "--augment-device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="data.augment_device (views built where)",
    )
    parser.add_argument("--compile", action="store_true", help="train.compile")
    parser.add_argument("--methods", nargs="+", default=loop_methods(), choices=loop_methods())
    parser.add_argument("--json", default="", help="also write the rows to this file")
    parser.add_argument(
        "--against-plain",
        action="store_true",
        help="FixMatch against a plain PyTorch loop, each in its own process (scripts/bench_against_plain.py)",
    )
    parser.add_argument(
        "--smoke-test", action="store_true", help="2 steps at B=4: checks that everything runs"
    )
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.steps, args.batch_size = 2, 4
    if args.threads:
        torch.set_num_threads(args.threads)

    data = synthetic_data(
        args.image_size,
        args.channels,
        labeled=max(64, args.batch_size),
        unlabeled=max(256, args.batch_size * args.mu),
    )
    rows = [bench_one(name, args, data) for name in args.methods]
    base = next((r for r in rows if r["method"] == "supervised"), None)
    for row in rows:
        row["cost_vs_supervised"] = row["s_per_step"] / base["s_per_step"] if base else float("nan")

    print(
        f"# {args.backbone}, {args.image_size} px, B={args.batch_size}, μ={args.mu}, {args.steps} timed steps, "
        f"device {args.device}, amp {args.amp}, channels_last {args.channels_last}, "
        f"augment_device {args.augment_device}, compile {args.compile}, loader_workers {args.loader_workers}, "
        f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}"
    )
    print(
        "| method | labeled img/s | s/step | × supervised | images per step (labeled + views x unlabeled) |"
    )
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['method']} | {row['labeled_images_per_s']:.1f} | {row['s_per_step']:.3f} | "
            f"{row['cost_vs_supervised']:.2f} | {row['images_per_step']} |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=1)
    return rows


if __name__ == "__main__":
    main()
