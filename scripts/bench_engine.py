"""images/s of `engine.fit` (method `supervised`) vs a bare PyTorch loop, same model, data and batch size.

Both loops train from the same in-memory uint8 images (no augmentation: the bare loop has none), normalize on
the device, and use the same optimizer, AMP and memory format. The engine additionally runs its data loader
(per-sample views + collate), LR schedule, loss bookkeeping and a final checkpoint-free evaluation-free pass.
Prints both throughputs and the ratio (goal >= 0.9). Runs without Ray, on CPU or a GPU:

    python scripts/bench_engine.py --device cpu --backbone small_cnn --image-size 32 --batch-size 64
    python scripts/bench_engine.py --device cuda --backbone resnet50 --image-size 224 --batch-size 128 \
        --amp bf16 --channels-last --loader-workers 8
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from semimed.config import TrainConfig
from semimed.data.augment import Normalizer
from semimed.engine import RunData, fit
from semimed.methods import create_method
from semimed.models.backbones import create_backbone


def bare_loop(model, images: torch.Tensor, labels: torch.Tensor, args, device) -> dict[str, float]:
    """The reference: index a pinned uint8 tensor, copy, normalize, forward, backward, step.
    Returns images/s after the warm-up by wall clock and by this process's CPU time (the steadier one on a
    shared CPU), and the seconds of the warm-up steps (with --compile: the compile)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    normalize = Normalizer(images.shape[1])
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    generator = torch.Generator().manual_seed(0)
    model.train()
    if args.compile:
        model.compile()  # compiled at the first warm-up step, as the engine's train.compile does

    def step() -> None:
        idx = torch.randint(0, len(images), (args.batch_size,), generator=generator)
        x = normalize(images[idx].to(device, non_blocking=True)).contiguous(memory_format=memory_format)
        y = labels[idx].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    begin = time.perf_counter()
    for _ in range(args.warmup):
        step()
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step()
    _sync(device)
    return _rates(args, time.perf_counter() - start, time.process_time() - cpu, start - begin)


def _rates(args, wall: float, cpu: float, warmup: float) -> dict[str, float]:
    images = args.steps * args.batch_size
    return {"images_per_s": images / wall, "cpu_images_per_s": images / cpu, "warmup_s": warmup}


def engine_loop(model, images: torch.Tensor, labels: torch.Tensor, args, device) -> dict[str, float]:
    method = create_method("supervised", model, num_classes=2, multilabel=False)
    data = RunData(
        pixels=images.numpy(),
        targets=labels.numpy(),
        rows={"labeled": np.arange(len(images))},
        classes=["a", "b"],
        multilabel=False,
        labeled_augment="none",
        normalize=Normalizer(images.shape[1]),
    )
    timings: dict[int, tuple[float, float]] = {}

    def report(metrics, _checkpoint) -> None:  # called at each `eval_every`: time the steps in between
        _sync(device)
        timings[metrics["step"]] = (time.perf_counter(), time.process_time())

    total = args.warmup + args.steps
    cfg = TrainConfig(
        steps=total,
        batch_size=args.batch_size,
        lr=1e-3,
        schedule="constant",
        amp=args.amp,
        channels_last=args.channels_last,
        eval_every=args.warmup,
        checkpoint_every=total + 1,
        loader_workers=args.loader_workers,
        device=str(device),
        compile=args.compile,
    )
    begin = time.perf_counter()
    fit(method, data, cfg, report=report, device=device, show_progress=False)
    _sync(device)
    start, cpu = timings[args.warmup]
    return _rates(args, time.perf_counter() - start, time.process_time() - cpu, start - begin)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="small_cnn")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--loader-workers", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="alternate bare/engine this many times")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile both (train.compile for the engine)"
    )
    parser.add_argument("--json", default="", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    images = torch.from_numpy(
        rng.integers(0, 256, (args.images, args.channels, args.image_size, args.image_size), dtype=np.uint8)
    )
    labels = torch.from_numpy(rng.integers(0, 2, args.images))
    if device.type == "cuda":
        images, labels = images.pin_memory(), labels.pin_memory()
        torch.backends.cudnn.benchmark = True

    def fresh_model():
        torch.manual_seed(0)
        model = create_backbone(args.backbone, 2, args.channels, image_size=args.image_size).to(device)
        return model.to(memory_format=torch.channels_last) if args.channels_last else model

    runs: dict[str, list[dict[str, float]]] = {"bare": [], "engine": []}
    for _ in range(args.repeats):  # interleaved, so drift (thermal, other load) hits both alike
        for side, loop in (("bare", bare_loop), ("engine", engine_loop)):
            runs[side].append(loop(fresh_model(), images, labels, args, device))
    bare = [r["images_per_s"] for r in runs["bare"]]
    engine = [r["images_per_s"] for r in runs["engine"]]
    warmup = {side: [r["warmup_s"] for r in found] for side, found in runs.items()}
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(
        f"device {name}; {args.backbone} {args.image_size}px batch {args.batch_size} amp {args.amp} "
        f"channels_last {args.channels_last} loader_workers {args.loader_workers} compile {args.compile}"
    )
    print(
        f"bare PyTorch loop : {np.median(bare):9.1f} images/s  (runs: {', '.join(f'{v:.1f}' for v in bare)})"
    )
    print(
        f"semimed engine.fit: {np.median(engine):9.1f} images/s  (runs: {', '.join(f'{v:.1f}' for v in engine)})"
    )
    print(f"ratio engine/bare : {np.median(engine) / np.median(bare):.3f}")
    print(f"warm-up ({args.warmup} steps{', incl. compile' if args.compile else ''}), s: {warmup}")
    result = {"device": name, "args": vars(args), "bare_images_per_s": bare, "engine_images_per_s": engine}
    result["warmup_s"] = warmup
    if device.type == "cpu":
        cpu = {side: [r["cpu_images_per_s"] for r in found] for side, found in runs.items()}
        print(f"by CPU time, images/s: bare {cpu['bare']}, engine {cpu['engine']}")
        result["cpu_images_per_s"] = cpu
    result["ratio"] = float(np.median(engine) / np.median(bare))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
    return result


if __name__ == "__main__":
    main()
