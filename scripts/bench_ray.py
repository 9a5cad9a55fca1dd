"""Ray's cost for one training: the same run through `experiment.run_training` (no Ray) and as a 1-trial
sweep (Tune trial -> TorchTrainer, 1 worker; and the in-process trial path), in one process; then a 4-trial
sweep at max_concurrent_trials 1 vs 2. Prints wall times, Ray's fixed overhead and the ratios.

    python scripts/bench_ray.py --steps 1500     # ~2 min of training on a 2-core CPU
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500, help="steps of the single run (~2 min on 2 cores)")
    parser.add_argument(
        "--sweep-steps", type=int, default=150, help="steps of each trial in the 4-trial sweeps"
    )
    parser.add_argument("--skip-single", action="store_true")
    args = parser.parse_args()

    import torch

    from semimed.config import config_from_dict
    from semimed.data.demo import write_demo
    from semimed.experiment import run_training
    from semimed.train import init_ray
    from semimed.tune import load_search_space, run_sweep

    # The same intra-op threads as a Ray trial with cpus_per_worker=1 (Ray sets OMP_NUM_THREADS=1 there); with
    # torch's default on a busy 2-core machine, the no-Ray run alone spin-waits and looks 5x slower.
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    root = write_demo(work / "data")["breakhis"]
    base = {
        "data": {
            "dataset": "breakhis",
            "root": str(root),
            "image_size": 32,
            "fraction": 0.5,
            "cache_dir": str(work / "cache"),
        },
        "model": {"backbone": "small_cnn"},
        "train": {
            "steps": args.steps,
            "batch_size": 32,
            "eval_every": max(1, args.steps // 5),
            "checkpoint_every": max(1, args.steps // 5),
        },
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
    }

    def space_file(name: str, grid: dict, steps: int, workers: int, concurrency: int) -> Path:
        values = {
            "name": name,
            "grid": grid,
            "max_concurrent_trials": concurrency,
            "base": {
                **base,
                "train": {
                    **base["train"],
                    "steps": steps,
                    "eval_every": max(1, steps // 3),
                    "checkpoint_every": max(1, steps // 3),
                },
                "scaling": {"num_workers": workers, "cpus_per_worker": 1},
            },
        }
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(values))
        return path

    # Decode once so no timing below pays for the cache.
    run_training(
        config_from_dict({**base, "train": {**base["train"], "steps": 1}}), work / "warm", show_progress=False
    )
    ray_start = timed(init_ray)
    rows = [("ray.init (local, dashboard on)", ray_start)]
    if not args.skip_single:
        direct = timed(lambda: run_training(config_from_dict(base), work / "direct", show_progress=False))
        rows.append((f"run_training, no Ray ({args.steps} steps)", direct))
        for workers, label in (
            (1, "1-trial sweep, TorchTrainer 1 worker"),
            (0, "1-trial sweep, in-process trial"),
        ):
            space = load_search_space(space_file(f"single{workers}", {"seed": [0]}, args.steps, workers, 1))
            wall = timed(lambda space=space: run_sweep(space, str(work / "results")))
            rows.append((label, wall))
            rows.append(("  overhead vs no Ray (s) / ratio", f"{wall - direct:.1f} s / {wall / direct:.3f}x"))
    for workers in (1, 0):
        walls = []
        for concurrency in (1, 2):
            space = load_search_space(
                space_file(
                    f"four{workers}c{concurrency}",
                    {"seed": [0, 1, 2, 3]},
                    args.sweep_steps,
                    workers,
                    concurrency,
                )
            )
            walls.append(timed(lambda space=space: run_sweep(space, str(work / "results"))))
        kind = "TorchTrainer" if workers else "in-process"
        rows.append((f"4-trial sweep ({kind}), 1 at a time", walls[0]))
        rows.append((f"4-trial sweep ({kind}), 2 at a time", walls[1]))
        rows.append(("  speed-up of 2 at a time", f"{walls[0] / walls[1]:.2f}x"))
    print("\n| measurement | value |\n|---|---|")
    for label, value in rows:
        print(f"| {label} | {value if isinstance(value, str) else f'{value:.1f} s'} |")


if __name__ == "__main__":
    main()
