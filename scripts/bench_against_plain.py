"""semimed's FixMatch step against a minimal plain PyTorch FixMatch loop, each in its OWN process.

`scripts/bench_engine.py` runs its bare loop in the engine's process, so anything that slows the whole process
(allocator state, threads, denormals, what a library sets at import) cancels there. Here each side is a fresh
subprocess with the same environment (OMP_NUM_THREADS, …), model, batch, optimizer and data:

- plain: this file's `plain_worker` — numpy + torch + timm only (never imports semimed); one loop: index the
  uint8 images, batched flip/shift and RandAugment-style strong views with per-sample parameters, one forward
  over [x; u_weak; u_strong], CE + masked CE, backward, Adam.
- semimed: `experiment.run_training` — what `semimed train CONFIG --local` runs (run folder, lock, TensorBoard,
  progress bar, checkpoint and evaluation at the end), once per `data.augment_device` asked for (`cpu`: per-image
  torchvision views in the loader; `cuda`: the batched views on the training device, here the CPU).

Each side is timed as the difference of an N-step and an M-step run (start-up, data loading, the final
evaluation and checkpoint cancel), by wall clock and by the process's CPU time (user + sys, from wait4: on a
shared machine the CPU time is the steadier of the two). Runs are repeated and interleaved; medians, ranges and
the load average are printed, and the ratio semimed / plain.

    .venv/bin/python scripts/bench_against_plain.py                    # resnet18, 28 px, B=32, μ=7, 40-10 steps
    .venv/bin/python scripts/bench_against_plain.py --npz semimed/demo_data/breastmnist.npz
    .venv/bin/python scripts/bench_against_plain.py --smoke-test       # seconds: does everything run?
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# ------------------------------------------------------------------------------------------- the plain side


def plain_worker(args: argparse.Namespace) -> dict:
    """A minimal FixMatch loop (no semimed import). Returns per-section CPU seconds per step."""
    import timm
    import torch
    import torch.nn.functional as F

    torch.manual_seed(args.seed)
    data = np.load(args.npz)
    pixels = torch.from_numpy(_nchw(data["train_images"]))
    labels = torch.from_numpy(data["train_labels"][:, 0].astype(np.int64))
    labeled = max(args.batch_size, int(len(pixels) * args.fraction))
    model = timm.create_model(args.backbone, num_classes=int(labels.max()) + 1, in_chans=pixels.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(args.seed)
    size = pixels.shape[-1]
    pad = max(1, size // 8)

    def uniform(n: int) -> torch.Tensor:
        return torch.rand(n, generator=generator)

    def weak(x: torch.Tensor) -> torch.Tensor:  # per-sample flips and a reflect-padded shift, uint8
        n = len(x)
        shift = torch.randint(-pad, pad + 1, (2, n), generator=generator)
        flip = uniform(2 * n).view(2, n) < 0.5
        index = []
        for axis in range(2):
            k = (torch.arange(size) + shift[axis][:, None]).abs()
            k = torch.where(k > size - 1, 2 * (size - 1) - k, k)
            index.append(torch.where(flip[axis][:, None], size - 1 - k, k))
        c = x.shape[1]
        x = x.gather(2, index[0][:, None, :, None].expand(n, c, size, size))
        return x.gather(3, index[1][:, None, None, :].expand(n, c, size, size))

    def strong(x: torch.Tensor) -> torch.Tensor:  # weak + 2 of {brightness, contrast, solarize} + Cutout
        x = weak(x).float()
        n = len(x)
        for _ in range(2):
            op, m = torch.randint(0, 3, (n,), generator=generator), uniform(n)
            factor = (1 + 0.9 * (2 * m - 1)).view(n, 1, 1, 1)
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            out = torch.stack(
                [
                    x * factor,
                    mean + factor * (x - mean),
                    torch.where(x >= 255 * m.view(n, 1, 1, 1), 255 - x, x),
                ]
            )
            x = out[op, torch.arange(n)].clamp(0, 255).round()
        top, left = torch.randint(0, size - size // 2 + 1, (2, n), generator=generator)
        ys, xs = torch.arange(size) - top[:, None], torch.arange(size) - left[:, None]
        inside = ((ys >= 0) & (ys < size // 2))[:, :, None] & ((xs >= 0) & (xs < size // 2))[:, None, :]
        return x.masked_fill(inside[:, None], 127).to(torch.uint8)

    def normalize(x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - 0.5) / 0.5

    b, mu = args.batch_size, args.mu
    sections = {"data": 0.0, "forward": 0.0, "update": 0.0}
    model.train()
    for _ in range(args.steps):
        t0 = time.process_time()
        li = torch.randint(0, labeled, (b,), generator=generator)
        ui = torch.randint(labeled, len(pixels), (b * mu,), generator=generator)
        x, y = normalize(weak(pixels[li])), labels[li]
        u = pixels[ui]
        u_weak, u_strong = normalize(weak(u)), normalize(strong(u))
        t1 = time.process_time()
        logits = model(torch.cat([x, u_weak, u_strong]))
        probs = logits[b : b + b * mu].detach().softmax(dim=1)
        confidence, targets = probs.max(dim=1)
        mask = (confidence >= 0.95).float()
        unsup = (F.cross_entropy(logits[b + b * mu :], targets, reduction="none") * mask).mean()
        loss = F.cross_entropy(logits[:b], y) + unsup
        t2 = time.process_time()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.process_time()
        sections["data"] += t1 - t0
        sections["forward"] += t2 - t1
        sections["update"] += t3 - t2
    result = {k: v / max(1, args.steps) for k, v in sections.items()}
    result["imports_semimed"] = any(name.split(".")[0] == "semimed" for name in sys.modules)
    return result


# ----------------------------------------------------------------------------------------- the semimed side


def semimed_worker(args: argparse.Namespace) -> dict:
    """`semimed train --local` (experiment.run_training) with the same settings; CPU seconds per section."""
    import collections

    import semimed.experiment as experiment
    from semimed.config import load_config
    from semimed.engine import fit as engine_fit
    from semimed.engine.loop import TrainStreams
    from semimed.methods.base import Method
    from semimed.methods.fixmatch import FixMatch

    cfg = load_config(None, semimed_overrides(args))

    def fit_here(*a, **kw):  # data.augment_device reaches fit even where run_training does not pass it yet
        kw.setdefault("augment_device", cfg.data.augment_device)
        return engine_fit(*a, **kw)

    experiment.fit = fit_here
    totals: dict[str, float] = collections.defaultdict(float)

    def timed(name, function):
        def wrapper(*a, **kw):
            start = time.process_time()
            try:
                return function(*a, **kw)
            finally:
                totals[name] += time.process_time() - start

        return wrapper

    if args.sections:  # off by default: the wrappers are not part of what is compared
        TrainStreams.next = timed("data", TrainStreams.next)
        FixMatch.train_step = timed("forward", FixMatch.train_step)
        Method.update_parameters = timed("update", Method.update_parameters)
    run_dir = Path(args.work) / "runs" / f"{os.getpid()}-{time.time_ns()}"
    experiment.run_training(cfg, run_dir, show_progress=True)
    return {k: v / max(1, args.steps) for k, v in totals.items()}


def semimed_overrides(args: argparse.Namespace) -> list[str]:
    never = 10**6  # no evaluation or checkpoint inside the timed window: both come once, at the end
    return [
        "data.dataset=medmnist",
        f"data.root={args.npz}",
        f"data.positive_class={args.positive_class}",
        f"data.image_size={args.image_size}",
        f"data.fraction={args.fraction}",
        f"data.cache_dir={Path(args.work) / 'cache'}",
        f"data.augment_device={args.augment_device}",
        f"model.backbone={args.backbone}",
        "method.name=fixmatch",
        f"train.steps={args.steps}",
        f"train.batch_size={args.batch_size}",
        f"train.unlabeled_ratio={args.mu}",
        "train.optimizer=adam",
        "train.lr=0.001",
        "train.weight_decay=0",
        "train.schedule=constant",
        f"train.eval_every={never}",
        f"train.checkpoint_every={never}",
        "train.device=cpu",
        "train.loader_workers=0",
        f"seed={args.seed}",
        f"output_dir={Path(args.work) / 'runs'}",
    ]


# ------------------------------------------------------------------------------------------------- driver


def _nchw(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2))


def synthetic_npz(path: Path, size: int, n_train: int, seed: int = 0) -> Path:
    """A MedMNIST-format file of random 1-channel uint8 images (2 classes); no download."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("val", 64), ("test", 64)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1)
    np.savez(path, **arrays)
    return path


def run_worker(args: argparse.Namespace, side: str, steps: int, augment_device: str = "cpu") -> dict:
    """One subprocess; its wall time (here) and CPU time (wait4's rusage of the child)."""
    command = [
        sys.executable,
        __file__,
        "--worker",
        side,
        "--steps",
        str(steps),
        "--augment-device",
        augment_device,
        *args.passthrough,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    stem = Path(args.work) / f"{side}-{time.time_ns()}"
    with open(f"{stem}.log", "w") as log:
        start = time.perf_counter()
        process = subprocess.Popen([*command, "--result", f"{stem}.json"], env=env, stdout=log, stderr=log)
        _, status, usage = os.wait4(process.pid, 0)  # the child's own rusage (a Popen.wait would lose it)
        wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = Path(f"{stem}.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"{side} worker failed (exit {process.returncode}):\n{tail}")
    out_file = Path(f"{stem}.json")
    result = json.loads(out_file.read_text())
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "sections": result}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}–{max(values):.3f}]"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--npz", default="", help="a MedMNIST .npz (default: synthetic 28-px images)")
    parser.add_argument(
        "--positive-class",
        default="",
        help="data.positive_class, for an npz that declares none (synthetic: class_1)",
    )
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mu", type=int, default=7)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=40, help="N: the long run")
    parser.add_argument("--base-steps", type=int, default=10, help="M: the short run subtracted")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every worker")
    parser.add_argument("--augment-device", default="cpu", help="(worker) data.augment_device")
    parser.add_argument("--variants", default="cpu,cuda", help="semimed's data.augment_device values to run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sections", action="store_true", help="also CPU time per section (data/forward/update)"
    )
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--smoke-test", action="store_true", help="tiny: 3-1 steps, B=4, μ=2, 1 repeat")
    parser.add_argument("--worker", choices=["plain", "semimed"], help=argparse.SUPPRESS)
    parser.add_argument("--result", default="", help=argparse.SUPPRESS)
    parser.add_argument("--work", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        result = (plain_worker if args.worker == "plain" else semimed_worker)(args)
        Path(args.result).write_text(json.dumps(result))
        return result

    if args.smoke_test:
        args.steps, args.base_steps, args.batch_size, args.mu, args.repeats = 3, 1, 4, 2, 1
    with tempfile.TemporaryDirectory(prefix="bench_plain_") as work:
        args.work = work
        if not args.npz:
            args.positive_class = (
                args.positive_class or "class_1"
            )  # two unnamed classes: say which is positive
            args.npz = str(
                synthetic_npz(
                    Path(work) / "synthetic.npz", args.image_size, 1000 if not args.smoke_test else 64
                )
            )
        args.passthrough = [
            "--npz", args.npz, "--positive-class", args.positive_class, "--backbone", args.backbone, "--image-size", str(args.image_size),
            "--batch-size", str(args.batch_size), "--mu", str(args.mu), "--fraction", str(args.fraction),
            "--seed", str(args.seed), "--work", work, *(["--sections"] if args.sections else []),
        ]  # fmt: skip
        variants = [v for v in args.variants.split(",") if v]
        sides = [("plain", "cpu")] + [("semimed", v) for v in variants]
        load_before = os.getloadavg()
        run_worker(args, "semimed", 1, variants[0] if variants else "cpu")  # writes the decode cache once
        per_step: dict[str, dict[str, list[float]]] = {f"{s}:{v}": {"wall": [], "cpu": []} for s, v in sides}
        sections: dict[str, list[dict]] = {f"{s}:{v}": [] for s, v in sides}
        for repeat in range(args.repeats):
            order = sides[repeat % len(sides) :] + sides[: repeat % len(sides)]  # interleaved, rotating
            for side, variant in order:
                key = f"{side}:{variant}"
                short = run_worker(args, side, args.base_steps, variant)
                long = run_worker(args, side, args.steps, variant)
                for measure in ("wall", "cpu"):
                    per_step[key][measure].append(
                        (long[measure] - short[measure]) / (args.steps - args.base_steps)
                    )
                sections[key].append(long["sections"])
        load_after = os.getloadavg()

    plain = per_step["plain:cpu"]
    rows = []
    print(
        f"# FixMatch, {args.backbone} ({Path(args.npz).name if args.npz else 'synthetic'}), {args.image_size} px, "
        f"B={args.batch_size}, μ={args.mu}, Adam 1e-3, fp32; {args.steps}- minus {args.base_steps}-step runs, "
        f"{args.repeats} repeat(s), OMP_NUM_THREADS={args.threads}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}"
    )
    print("| side | s/step wall, median [range] | CPU s/step, median [range] | ratio wall | ratio CPU |")
    print("|---|---|---|---|---|")
    for key, values in per_step.items():
        ratio_wall = statistics.median(values["wall"]) / statistics.median(plain["wall"])
        ratio_cpu = statistics.median(values["cpu"]) / statistics.median(plain["cpu"])
        label = (
            "plain PyTorch loop"
            if key == "plain:cpu"
            else f"semimed, data.augment_device={key.split(':')[1]}"
        )
        print(
            f"| {label} | {spread(values['wall'])} | {spread(values['cpu'])} | {ratio_wall:.3f} | {ratio_cpu:.3f} |"
        )
        rows.append({"side": key, **values, "ratio_wall": ratio_wall, "ratio_cpu": ratio_cpu})
    if args.sections:
        print("CPU s/step per section (median over repeats of the long run):")
        for key, found in sections.items():
            names = sorted({n for s in found for n in s if n in ("data", "forward", "update")})
            print(
                f"  {key}: "
                + ", ".join(f"{n} {statistics.median(s.get(n, 0.0) for s in found):.3f}" for n in names)
            )
    result = {"args": {k: v for k, v in vars(args).items() if k != "passthrough"}, "rows": rows}
    result["load_average"] = {"before": load_before, "after": load_after}
    result["sections"] = sections
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
