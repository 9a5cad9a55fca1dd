"""`semimed demo`: synthetic data in the real formats -> a small sweep on a private local Ray -> report."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from semimed.files import atomic_write_text

DEMO_SPACE = Path(__file__).resolve().parent / "demo_space.yaml"


def run_demo(out: Path, storage: str | None = None, smoke: bool = False) -> Path:
    from semimed.data.demo import write_demo
    from semimed.report import write_report
    from semimed.train import init_ray
    from semimed.tune import load_search_space, run_sweep

    started = time.perf_counter()
    out = out.resolve()
    print(f"[1/3] writing synthetic BreakHis- and ChestX-ray14-format data under {out / 'data'}")
    # 48 patients (more than write_demo's default) so the test set, ~14 patients, is large enough that the
    # curve is not hidden in seed noise.
    roots = write_demo(out / "data", breakhis_patients=48)
    space_values = yaml.safe_load(DEMO_SPACE.read_text())
    space_values["base"]["data"]["root"] = str(roots["breakhis"])
    if smoke:
        space_values["base"]["train"].update(steps=40, eval_every=20, checkpoint_every=20)
        space_values["grid"]["data.fraction"] = [0.1, 1.0]
        space_values["grid"]["seed"] = [0]
    space_path = atomic_write_text(out / "demo_space.yaml", yaml.safe_dump(space_values, sort_keys=False))
    space = load_search_space(space_path)
    storage = storage or str(out / "results")
    print(f"[2/3] sweeping {len(space.trials)} trials on a local Ray (search space: {space_path})")
    init_ray()
    experiment = run_sweep(space, storage)
    print("[3/3] report")
    _, text = write_report(experiment)
    print(text)
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    print(f"experiment directory: {experiment}")
    print(f"report: {experiment}/report.md, {experiment}/report.csv, {experiment}/report.png")
    print(f"curves: tensorboard --logdir {experiment}")
    return Path(experiment)
