"""`semimed demo`: a small label-fraction study on a private local Ray, then its report.

Default: real medical images, the BreastMNIST file packaged in semimed/demo_data/ (offline; MedMNIST v2,
CC BY 4.0), study `semimed/demo_breastmnist.yaml`. `--synthetic`: the synthetic BreakHis-format tree written by
`semimed.data.demo.write_demo` (the real on-disk format), study `semimed/demo_space.yaml`.

What it prints: a few header lines, one line per trial start and finish (semimed/sweep_progress.py), the
report's main tables with the paired verdicts, and where everything is; Ray's own output goes to
`<experiment>/sweep.log`. The experiment folder is replaced on every run (only a folder this demo wrote).
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import yaml

from semimed.errors import SemimedError
from semimed.files import atomic_write_text

HERE = Path(__file__).resolve().parent
DEMO_SPACE = HERE / "demo_space.yaml"  # synthetic BreakHis-format data (`--synthetic`)
BREASTMNIST_SPACE = HERE / "demo_breastmnist.yaml"
BREASTMNIST = HERE / "demo_data" / "breastmnist.npz"
BREASTMNIST_MD5 = "750601b1f35ba3300ea97c75c52ff8f6"  # the official file (MedMNIST's medmnist/info.py)
MARKER = ".semimed_demo"  # in an experiment folder this demo wrote (and may replace)
# The smoke test: the same path end to end, in about a minute: 4 trials, one SSL method, one seed.
SMOKE = {"steps": 30, "eval_every": 15, "checkpoint_every": 30}


def breastmnist_path() -> Path:
    """The packaged breastmnist.npz, checked against the official MD5 (a damaged install fails here)."""
    if not BREASTMNIST.is_file():
        raise SemimedError(f"{BREASTMNIST}: the packaged BreastMNIST file is missing (reinstall semimed)")
    digest = hashlib.md5(BREASTMNIST.read_bytes(), usedforsecurity=False).hexdigest()
    if digest != BREASTMNIST_MD5:
        raise SemimedError(f"{BREASTMNIST}: MD5 {digest}, expected {BREASTMNIST_MD5} (reinstall semimed)")
    return BREASTMNIST


def _space_values(out: Path, synthetic: bool, smoke: bool, say) -> dict:
    if synthetic:
        from semimed.data.demo import write_demo

        say(f"data: synthetic BreakHis- and ChestX-ray14-format trees under {out / 'data'}")
        # 48 patients (more than write_demo's default) so the test set, ~14 patients, is large enough that the
        # curve is not hidden in seed noise.
        values = yaml.safe_load(DEMO_SPACE.read_text())
        values["base"]["data"]["root"] = str(write_demo(out / "data", breakhis_patients=48)["breakhis"])
    else:
        say(
            "data: BreastMNIST (MedMNIST v2, Yang et al. 2023; from BUSI, Al-Dhabyani et al. 2020; CC BY 4.0): "
            "780 breast ultrasound images, 28 px, malignant vs normal+benign, official split 546/78/156"
        )
        values = yaml.safe_load(BREASTMNIST_SPACE.read_text())
        values["base"]["data"]["root"] = str(breastmnist_path())
    values["base"]["data"]["cache_dir"] = str(out / "cache")  # never ~/.cache or the package folder
    if smoke:
        values["base"]["train"].update(SMOKE)
        methods = values["grid"]["method"]
        values["grid"]["method"] = [methods[0], methods[-1]]  # the control and one SSL method
        values["grid"]["data.fraction"] = [0.2, 1.0]
        values["grid"]["seed"] = [0]
    return values


def _fresh_experiment(experiment: Path, say) -> None:
    """Remove the previous demo's experiment folder (never a folder this demo did not write)."""
    if experiment.exists():
        if not (experiment / MARKER).is_file():
            raise SemimedError(
                f"{experiment}: exists and was not written by semimed demo; choose another --out or --storage"
            )
        say(f"replacing the previous demo run in {experiment}")
        shutil.rmtree(experiment)
    experiment.mkdir(parents=True)
    (experiment / MARKER).write_text("written by semimed demo; the next demo run replaces this folder\n")


def drop_resume_checkpoints(experiment: Path) -> int:
    """Remove the `checkpoints/` folder of every finished run (one with metrics.json); returns the bytes freed.

    A finished run's checkpoint only serves to resume it, and a demo run is never resumed: its reported network
    (backbone.safetensors, what `semimed predict` and `explain` load), metrics, predictions and curves stay.
    This keeps the demo under 60 MB: a small-CNN checkpoint (weights, Adam moments, the val-selected weights)
    is ~4.6 MB, Mean Teacher's ~7 MB, x 27 trials."""
    freed = 0
    for run in sorted((experiment / "runs").glob("*")):
        folder = run / "checkpoints"
        if (run / "metrics.json").is_file() and folder.is_dir():
            freed += disk_usage(folder)
            shutil.rmtree(folder)
    return freed


def disk_usage(path: Path) -> int:
    """Bytes on disk under `path` (allocated blocks, as `du -s` counts them)."""
    return sum(p.lstat().st_blocks * 512 for p in path.rglob("*") if p.is_file() or p.is_dir()) + (
        path.lstat().st_blocks * 512
    )


def run_demo(
    out: Path,
    storage: str | None = None,
    smoke: bool = False,
    synthetic: bool = False,
    verbose: bool = False,
    shutdown: bool = True,
) -> Path:
    """Run the demo study and print its report; returns the experiment directory. `shutdown`: stop the
    private Ray at the end (inside the quiet block, so its exit messages go to the log too)."""
    from semimed import sweep_progress
    from semimed.report import write_report
    from semimed.report.tables import brief
    from semimed.train import init_ray
    from semimed.tune import load_search_space, resolve_storage, run_sweep

    started = time.perf_counter()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    say = sweep_progress.say
    values = _space_values(out, synthetic, smoke, say)
    space_path = atomic_write_text(out / f"{values['name']}.yaml", yaml.safe_dump(values, sort_keys=False))
    space = load_search_space(space_path)
    storage = resolve_storage(storage or str(out / "results"))
    experiment = Path(storage) / space.name
    _fresh_experiment(experiment, say)
    grid = space.grid
    methods = ", ".join(m["name"] if isinstance(m, dict) else str(m) for m in grid.get("method", []))
    fractions = ", ".join(f"{f:g}" for f in grid.get("data.fraction", []))
    seeds = ", ".join(str(s) for s in grid.get("seed", []))
    say(
        f"study: {methods} at label fractions {fractions} x seeds {seeds} = {len(space.trials)} trials, "
        f"{space.base['train']['steps']} steps each (search space: {space_path})"
    )
    log_path = sweep_progress.sweep_log_path(str(experiment))
    say(f"experiment: {experiment}   (Ray's own output: {log_path})")
    with sweep_progress.quiet_output(log_path, verbose):
        init_ray()
        run_sweep(space, storage)
        summary, text = write_report(experiment)
        if shutdown:
            import ray

            ray.shutdown()
    freed = drop_resume_checkpoints(experiment)
    say("")
    say(brief(summary))
    size = disk_usage(out)
    say(
        f"demo finished in {time.perf_counter() - started:.0f} s; {size / 1e6:.0f} MB on disk under {out} "
        f"(data cache, run folders, Ray's logs; the finished trials' resume checkpoints, {freed / 1e6:.0f} MB, "
        "were removed: each run keeps its reported network, backbone.safetensors)"
    )
    say(f"full report (every metric, last-checkpoint numbers, label efficiency): {experiment / 'report.md'}")
    say(f"curves, PR curves, confusion matrices, metric vs label fraction: tensorboard --logdir {experiment}")
    return experiment
