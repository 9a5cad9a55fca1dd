"""The throughput benchmarks of one lent-GPU session (issue 15), run in one go and written as one JSON.

Pieces, in order (each writes its numbers to the JSON as soon as it finishes, so a session cut short keeps
what it measured; a piece that fails records its error and the next one runs):

1. engine_vs_bare_resnet50: ResNet-50 @224, batch 128, bf16, channels_last: `engine.fit` vs a bare loop
   (scripts/bench_engine.py), eager (compiled: piece 6).
2. device_augment_224: the data path at 224 px, gray and RGB. `augment_only`: weak and strong views of a batch
   already on the device (img/s). `stream`: rows of an in-memory uint8 array (the decode-once cache) -> pinned
   batch -> device -> weak + strong views, through the engine's `TrainStreams` (img/s), with the views built on
   the device vs per image in 12 loader workers. Target: strong view ≥ 10,000 img/s.
3. fixmatch_step: FixMatch (B = 32, μ = 7, ResNet-50 @224, bf16, channels_last) s/step with the views built on
   the device vs in loader workers, against the network time of (1 + 2μ)·B images (a supervised step at that
   batch). Target: device views ≤ 1.1 × the network time.
4. packed_trials: MedMNIST-sized FixMatch trials (ResNet-18 (28), 28 px, B = 64, μ = 1, bf16, views on the
   device), 1 alone vs 4 at once on the GPU (separate processes, 4 torch threads each, as Ray would pack
   `scaling.gpus_per_worker: 0.25`): aggregate labeled img/s. Target: 4 packed ≥ 3 × one.
5. densenet121_224: DenseNet-121 @224 (CheXNet's network), batch 128, bf16, channels_last: engine vs bare loop —
   the rate the studies' cost (docs/benchmarks.md) scales from; `study_cost` holds the hours at that rate.
6. engine_vs_bare_resnet50_compiled: piece 1 with `--compile` (`train.compile`). Targets: ≥ 5,000 img/s,
   engine/bare ≥ 0.95.
7. densenet121_224_compiled: piece 5 with `--compile`.

    python3 scripts/gpu_bench.py --out "$OUT"        # on the lent GPU, ~8 min (scripts/gpu_check.sh runs it)
    python3 scripts/gpu_bench.py --smoke-test         # every piece tiny, on the CPU, in < 60 s
    python3 scripts/gpu_bench.py --only fixmatch_step packed_trials

Needs torch and timm (no Ray: the engine runs without it).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_engine  # noqa: E402
import bench_methods  # noqa: E402

from semimed.config import TrainConfig  # noqa: E402
from semimed.data.augment import Normalizer, augment_batch, step_generator  # noqa: E402
from semimed.data.views import RunData  # noqa: E402
from semimed.engine.loop import TrainStreams  # noqa: E402
from semimed.methods.base import Needs  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------- pieces


def engine_vs_bare(ctx: argparse.Namespace, backbone: str, compiled: bool) -> dict[str, Any]:
    """scripts/bench_engine.py at 224 px, batch 128, bf16, channels_last (one repeat: bare, then engine)."""
    size, batch = (224, 128) if not ctx.smoke_test else (32, 8)
    command = [
        "--device", ctx.device, "--backbone", backbone if not ctx.smoke_test else "small_cnn",
        "--image-size", str(size), "--batch-size", str(batch), "--images", str(16 * batch),
        "--loader-workers", str(ctx.workers), "--repeats", "1",
        *(["--amp", "bf16", "--channels-last"] if ctx.device == "cuda" else []),
    ]  # fmt: skip
    if ctx.smoke_test:
        command += ["--steps", "2", "--warmup", "1"]
    else:  # compiled: the warm-up includes the compile (for the engine, mostly a cache hit of the bare loop's)
        command += ["--steps", "40", "--warmup", "15" if compiled else "10"]
    result = bench_engine.main([*command, *(["--compile"] if compiled else [])])
    release(ctx.torch_device)
    return result


def device_augment(ctx: argparse.Namespace) -> dict[str, Any]:
    device = ctx.torch_device
    size, batch, n = (224, 512, 4096) if not ctx.smoke_test else (32, 16, 64)
    repeats = 10 if not ctx.smoke_test else 2
    out: dict[str, Any] = {"image_size": size, "batch": batch}
    for channels in (1, 3):
        rng = np.random.default_rng(0)
        pixels = rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8)
        on_device = torch.from_numpy(pixels[:batch]).to(device)
        for kind in ("weak", "strong"):
            augment_batch(kind, on_device, step_generator(0, 0))  # warm-up (kernels, caches)
            sync(device)
            start = time.perf_counter()
            for step in range(repeats):
                augment_batch(kind, on_device, step_generator(0, step))
            sync(device)
            out[f"augment_only/{kind}/{channels}ch_images_per_s"] = (
                repeats * batch / (time.perf_counter() - start)
            )
        data = RunData(
            pixels=pixels,
            targets=np.arange(n) % 2,
            rows={"labeled": np.arange(64), "unlabeled": np.arange(64, n)},
            classes=["a", "b"],
            multilabel=False,
        )
        for where, workers in (("device", ctx.workers), ("loader", max(ctx.workers, ctx.cpu_workers))):
            cfg = TrainConfig(
                batch_size=batch // 2, unlabeled_ratio=2, loader_workers=workers, device=ctx.device
            )
            augment_device = "cuda" if where == "device" else "cpu"
            streams = TrainStreams(
                data, Needs(labeled=False, unlabeled=("weak", "strong")), cfg, 0, 0, 0, 1, augment_device
            )
            normalize = Normalizer(channels)
            for _ in range(2):
                streams.next(device, ctx.device == "cuda", normalize)
            sync(device)
            start = time.perf_counter()
            for _ in range(repeats):
                streams.next(device, ctx.device == "cuda", normalize)
            sync(device)
            # Each step yields `batch` unlabeled images, each as a weak and a strong view.
            out[f"stream/{where}/{channels}ch_images_per_s"] = repeats * batch / (time.perf_counter() - start)
            out[f"stream/{where}/{channels}ch_loader_workers"] = workers
            del streams
        release(device)
    return out


def fixmatch_step(ctx: argparse.Namespace) -> dict[str, Any]:
    b, mu = (32, 7) if not ctx.smoke_test else (4, 2)
    common = [
        "--backbone", "resnet50" if not ctx.smoke_test else "small_cnn",
        "--image-size", "224" if not ctx.smoke_test else "32", "--device", ctx.device,
        "--steps", "10" if not ctx.smoke_test else "2",
        *(["--amp", "bf16", "--channels-last"] if ctx.device == "cuda" else []),
    ]  # fmt: skip
    images = b * (1 + 2 * mu)
    network = bench_methods.main(
        [
            *common,
            "--methods",
            "supervised",
            "--batch-size",
            str(images),
            "--augment-device",
            "cuda",
            "--loader-workers",
            str(ctx.workers),
        ]  # fmt: skip
    )[0]
    release(ctx.torch_device)
    out: dict[str, Any] = {"B": b, "mu": mu, "network_s_per_step": network["s_per_step"]}
    for where, extra in (
        ("device", ["--augment-device", "cuda", "--loader-workers", str(ctx.workers)]),
        ("loader", ["--augment-device", "cpu", "--loader-workers", str(ctx.cpu_workers)]),
    ):
        row = bench_methods.main(
            [*common, "--methods", "fixmatch", "--batch-size", str(b), "--mu", str(mu), *extra]
        )[0]
        out[f"{where}_views_s_per_step"] = row["s_per_step"]
        out[f"{where}_views_over_network"] = row["s_per_step"] / network["s_per_step"]
        release(ctx.torch_device)
    return out


def packed_trials(ctx: argparse.Namespace) -> dict[str, Any]:
    """1 trial alone, then 4 at once (separate processes), each printing its own steady-state throughput."""
    count = 4 if not ctx.smoke_test else 2
    out: dict[str, Any] = {}
    for concurrent in (1, count):
        procs, files = [], []
        for i in range(concurrent):
            result = Path(ctx.out) / f"packed_{concurrent}_{i}.json"
            command = [sys.executable, __file__, "--trial", "--json", str(result), "--device", ctx.device]
            command += ["--smoke-test"] if ctx.smoke_test else []
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 4) // count))}
            procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
            files.append(result)
        logs = [p.communicate()[0].decode(errors="replace") for p in procs]
        if any(p.returncode for p in procs):
            raise RuntimeError("a packed trial failed:\n" + "\n".join(log[-2000:] for log in logs))
        rates = [json.loads(f.read_text())["labeled_images_per_s"] for f in files]
        out[f"{concurrent}_trials_images_per_s"] = rates
        out[f"{concurrent}_trials_aggregate"] = float(sum(rates))
    out["aggregate_ratio"] = out[f"{count}_trials_aggregate"] / out["1_trials_aggregate"]
    return out


def trial(ctx: argparse.Namespace) -> None:
    """One packed trial (a child of `packed_trials`): FixMatch through `engine.fit`, MedMNIST-sized."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "4")))
    steps = "100" if not ctx.smoke_test else "2"
    common = ["--device", ctx.device, "--steps", steps, "--augment-device", "cuda", "--loader-workers", "1"]
    if ctx.device == "cuda":
        common += ["--amp", "bf16"]
    row = bench_methods.main(
        [*common, "--backbone", "resnet18_28" if not ctx.smoke_test else "small_cnn", "--image-size", "28",
         "--channels", "1", "--batch-size", "64" if not ctx.smoke_test else "4", "--mu", "1",
         "--methods", "fixmatch"]
    )[0]  # fmt: skip
    Path(ctx.json).write_text(json.dumps(row))


# ------------------------------------------------------------------------------------- the studies, costed

# The budgets of search_spaces/{chestxray14,breakhis}_ssl.yaml (B = 64, μ = 3) and the sizes of their val and
# test parts (ChestX-ray14: the official 25,596-image test list, val = 10% of the 86,524 train_val images by
# patient; BreakHis: 7,909 images of 82 patients, test 30% and val 15% of the rest by patient: approximate).
STUDIES = {
    "chestxray14_ssl": {"steps": 6000, "batch": 64, "mu": 3, "eval_every": 500, "val": 8650, "test": 25596},
    "breakhis_ssl": {"steps": 3000, "batch": 64, "mu": 3, "eval_every": 250, "val": 870, "test": 2400},
}
FRACTIONS, SEEDS = (0.01, 0.05, 0.1, 0.25, 1.0), (0, 1, 2)
FIXED_S = 60.0 + 26.0  # per trial: start-up, cache read, checkpoints; + a Ray Train trial's start (bench_ray)


def images_per_step(method: str, b: int, mu: int) -> float:
    """Training-equivalent images through the networks per step (a no-grad forward counts 1/3: fwd ≈ bwd/2)."""
    return {
        "supervised": b,
        "pseudo_label": (1 + mu) * b,
        "fixmatch": (1 + 2 * mu) * b,
        "mean_teacher": (1 + mu) * b + mu * b / 3,  # + the teacher's no-grad pass over μB
        "gan_ssl": (1 + 2 * mu) * b + 2 * mu * b + 0.2 * mu * b,  # D, feature matching through D, G (~0.2 D)
    }[method]


def study_cost(train_images_per_s: float, gpus: int = 8) -> dict[str, dict[str, float]]:
    """Hours of each study on 1 GPU and on `gpus` GPUs (one trial per GPU, longest trials first), from one
    network's training rate: per trial, steps · images_per_step / rate + evaluations (val every eval_every
    steps, then val and test at the last and the reported checkpoint, forward-only at 3 × the rate) + FIXED_S."""
    out = {}
    for name, study in STUDIES.items():
        evaluated = study["steps"] / study["eval_every"] * study["val"] + 2 * (study["val"] + study["test"])
        trials = []
        for method in ("supervised", "pseudo_label", "fixmatch", "mean_teacher", "gan_ssl"):
            train = study["steps"] * images_per_step(method, study["batch"], study["mu"]) / train_images_per_s
            trials += [train + evaluated / (3 * train_images_per_s) + FIXED_S] * len(FRACTIONS) * len(SEEDS)
        loads = [0.0] * gpus
        for seconds in sorted(trials, reverse=True):
            loads[loads.index(min(loads))] += seconds
        out[name] = {
            "trials": len(trials),
            "hours_1_gpu": sum(trials) / 3600,
            f"hours_{gpus}_gpus": max(loads) / 3600,
        }
    return out


# In order of what the session needs most; the compiled runs (minutes of compiling) last.
PIECES = {
    "engine_vs_bare_resnet50": lambda ctx: engine_vs_bare(ctx, "resnet50", compiled=False),
    "device_augment_224": device_augment,
    "fixmatch_step": fixmatch_step,
    "packed_trials": packed_trials,
    "densenet121_224": lambda ctx: with_study_cost(engine_vs_bare(ctx, "densenet121", compiled=False)),
    "engine_vs_bare_resnet50_compiled": lambda ctx: engine_vs_bare(ctx, "resnet50", compiled=True),
    "densenet121_224_compiled": lambda ctx: with_study_cost(
        engine_vs_bare(ctx, "densenet121", compiled=True)
    ),
}


def with_study_cost(result: dict[str, Any]) -> dict[str, Any]:
    """The DenseNet-121 numbers plus the studies' cost at its engine rate (docs/benchmarks.md's estimate)."""
    result["study_cost"] = study_cost(float(np.median(result["engine_images_per_s"])))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default=os.environ.get("OUT", "gpu_out"), help="folder of the JSON (and logs)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="+", choices=list(PIECES), default=list(PIECES))
    parser.add_argument(
        "--workers", type=int, default=4, help="loader workers when views are built on the device"
    )
    parser.add_argument(
        "--cpu-workers", type=int, default=12, help="loader workers that build views per image"
    )
    parser.add_argument("--budget-s", type=float, default=480, help="skip the pieces that start after this")
    parser.add_argument("--smoke-test", action="store_true", help="every piece tiny, on the CPU (< 60 s)")
    parser.add_argument(
        "--cost-from", type=float, default=0.0, help="only print the studies' cost at this training img/s"
    )
    parser.add_argument("--trial", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", default="", help=argparse.SUPPRESS)
    ctx = parser.parse_args(argv)
    if ctx.cost_from:
        cost = study_cost(ctx.cost_from)
        print(json.dumps(cost, indent=1))
        return cost
    compile_function = torch.compile
    if ctx.smoke_test:
        ctx.device, ctx.workers, ctx.cpu_workers = "cpu", 0, 0
        torch.set_num_threads(1)
        # Dynamo traces the networks as on the GPU; the eager backend skips code generation (minutes on a CPU).
        torch.compile = functools.partial(compile_function, backend="eager")
    ctx.torch_device = torch.device(ctx.device)
    try:
        if ctx.trial:
            trial(ctx)
            return {}
        return run_pieces(ctx)
    finally:
        torch.compile = compile_function


def run_pieces(ctx: argparse.Namespace) -> dict[str, Any]:
    Path(ctx.out).mkdir(parents=True, exist_ok=True)
    if ctx.device == "cuda":
        torch.backends.cudnn.benchmark = True
    results: dict[str, Any] = {
        "machine": {
            "device": torch.cuda.get_device_name(0)
            if ctx.device == "cuda"
            else platform.processor() or "cpu",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "smoke_test": ctx.smoke_test,
        },
        "pieces": {},
    }
    path = Path(ctx.out) / ("gpu_bench_smoke.json" if ctx.smoke_test else "gpu_bench.json")
    started = time.perf_counter()
    for name in ctx.only:
        elapsed = time.perf_counter() - started
        if elapsed > ctx.budget_s:
            results["pieces"][name] = {"skipped": f"budget: {elapsed:.0f} s gone of {ctx.budget_s:.0f}"}
            continue
        print(f"== {name} (at {elapsed:.0f} s)", flush=True)
        piece_start = time.perf_counter()
        try:
            results["pieces"][name] = PIECES[name](ctx)
        except Exception as exc:  # record it and go on: one failure must not cost the session's other numbers
            results["pieces"][name] = {"error": f"{type(exc).__name__}: {exc}"[:4000]}
            print(f"{name} failed: {type(exc).__name__}: {exc}", flush=True)
        results["pieces"][name]["wall_s"] = time.perf_counter() - piece_start
        path.write_text(json.dumps(results, indent=1, default=str))
        release(ctx.torch_device)
    print(f"wrote {path} in {time.perf_counter() - started:.0f} s")
    return results


if __name__ == "__main__":
    main()
