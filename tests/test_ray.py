"""Ray Train / Ray Tune integration on a private local Ray (loopback, 4 logical CPUs on 2 cores).

Each test asserts values: the files a sweep leaves, identical splits and metrics across 1 and 2 DDP workers,
a killed worker that resumes from its checkpoint, a killed in-process trial (SIGKILL, and Ray's own memory
monitor) that resumes while the sweep finishes the others, and a killed sweep driver whose resume does not
re-run finished trials. They take about a minute each on a 2-core machine, so they are few.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.ray

FAST = ["data.image_size=24", "model.backbone=small_cnn", "train.batch_size=16", "train.lr=0.003"]


@pytest.fixture(scope="module")
def s3():
    """An S3-compatible server on loopback (moto_server), started before the module's Ray: this process's
    AWS_* variables point at it, and the Ray processes inherit them, as nodes with an instance role would."""
    from s3server import moto_environment

    with moto_environment() as server:
        yield server


@pytest.fixture(scope="module")
def local_ray(s3):
    os.environ.pop("RAY_ADDRESS", None)
    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    import ray

    from semimed.train import init_ray

    init_ray()
    yield ray
    ray.shutdown()


def _config(demo_roots, run_name: str, out: Path, *extra: str):
    from semimed.config import load_config

    return load_config(
        None, [f"data.root={demo_roots['breakhis']}", f"name={run_name}", f"output_dir={out}", *FAST, *extra]
    )


def _space(tmp_path: Path, demo_roots, name: str, grid: dict, steps: int = 30, **top) -> Path:
    space = {
        "name": name,
        "base": {
            "data": {"dataset": "breakhis", "root": str(demo_roots["breakhis"]), "image_size": 24},
            "model": {"backbone": "small_cnn"},
            "train": {"steps": steps, "batch_size": 16, "eval_every": 10, "checkpoint_every": 10},
        },
        "grid": grid,
        "max_concurrent_trials": 1,
        **top,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def test_sweep_writes_runs_report_and_tensorboard(local_ray, demo_roots, tmp_path):
    from semimed.report import write_report
    from semimed.tune import load_search_space, run_sweep

    space = load_search_space(
        _space(tmp_path, demo_roots, "tiny", {"data.fraction": [0.1, 1.0], "seed": [0]})
    )
    experiment = Path(run_sweep(space, str(tmp_path / "results")))
    assert experiment == tmp_path / "results" / "tiny"
    runs = sorted(experiment.glob("runs/*/metrics.json"))
    assert len(runs) == 2
    for metrics_path in runs:
        metrics = json.loads(metrics_path.read_text())
        assert metrics["step"] == 30
        assert 0.0 <= metrics["test/balanced_accuracy"] <= 1.0
        split = json.loads(metrics_path.with_name("split.json").read_text())
        cfg = yaml.safe_load(metrics_path.with_name("config.yaml").read_text())
        assert split["fraction"] == cfg["data"]["fraction"]
        assert list(metrics_path.parent.glob("tb/events.out.tfevents.*")), "engine TensorBoard curves missing"
    assert list(experiment.rglob("events.out.tfevents.*"))
    summary, text = write_report(experiment)
    assert set(summary["label_fraction"]) == {0.1, 1.0}
    assert (experiment / "report.csv").is_file() and (experiment / "report.png").stat().st_size > 0
    assert "balanced_accuracy" in text


def test_two_workers_same_split_and_same_eval_as_one(local_ray, demo_roots, tmp_path):
    """The labeled subset does not depend on the worker count, and 2-rank evaluation (sharded, gathered,
    de-duplicated) of one checkpoint gives the 1-rank metrics."""
    from semimed.train import train_once

    one = _config(demo_roots, "one", tmp_path, "train.steps=30", "train.eval_every=10", "data.fraction=0.2")
    one_metrics = train_once(one)
    assert one_metrics["step"] == 30
    two = _config(
        demo_roots,
        "two",
        tmp_path,
        "train.steps=30",
        "train.eval_every=10",
        "data.fraction=0.2",
        "scaling.num_workers=2",
    )
    # Start the 2-worker run from the 1-worker run's final checkpoint: it trains 0 more steps and evaluates.
    shutil.copytree(tmp_path / "one" / "checkpoints", tmp_path / "two" / "checkpoints")
    two_metrics = train_once(two)
    assert two_metrics["resumed_from_step"] == 30
    assert (tmp_path / "one" / "split.json").read_bytes() == (tmp_path / "two" / "split.json").read_bytes()
    for key in ("test_last/accuracy", "test_last/roc_auc", "test_last/balanced_accuracy"):
        assert two_metrics[key] == pytest.approx(one_metrics[key], abs=1e-6), key

    # And DDP training itself: 2 gloo ranks, each half of the global batch, a finite result.
    ddp = _config(
        demo_roots, "ddp", tmp_path, "train.steps=12", "train.eval_every=6", "scaling.num_workers=2"
    )
    ddp_metrics = train_once(ddp)
    assert ddp_metrics["step"] == 12 and 0.0 <= ddp_metrics["test/accuracy"] <= 1.0
    assert sorted(p.name for p in (tmp_path / "ddp" / "workers").iterdir()) == ["rank0.pid", "rank1.pid"]


def test_killed_worker_resumes_from_its_checkpoint(local_ray, demo_roots, tmp_path):
    from semimed.train import train_once

    cfg = _config(
        demo_roots,
        "ft",
        tmp_path,
        "train.steps=400",
        "train.eval_every=25",
        "train.checkpoint_every=25",
        "scaling.max_failures=2",
    )
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(train_once(cfg)))
    thread.start()
    run_dir = tmp_path / "ft"
    deadline = time.monotonic() + 180
    while not list((run_dir / "checkpoints").glob("step_0000050")) and time.monotonic() < deadline:
        time.sleep(0.1)
    pid = int((run_dir / "workers" / "rank0.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert result["step"] == 400
    # The restarted worker continued from a checkpoint (>= 50), not from step 0.
    assert result["resumed_from_step"] >= 50
    assert int((run_dir / "workers" / "rank0.pid").read_text()) != pid
    assert 0.0 <= result["test/accuracy"] <= 1.0


def test_sweep_resume_after_driver_sigkill(demo_roots, tmp_path):
    """SIGKILL the `semimed sweep` driver after the first trial; `--resume` finishes the others only."""
    space = _space(tmp_path, demo_roots, "resumable", {"data.fraction": [0.5], "seed": [0, 1, 2]}, steps=60)
    storage = tmp_path / "results"
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "semimed.cli", "sweep", str(space), "--storage", str(storage)]
    runs = storage / "resumable" / "runs"
    driver = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while not list(runs.glob("*/metrics.json")) and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.2)
    finished = {p.parent.name: json.loads(p.read_text()) for p in runs.glob("*/metrics.json")}
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
    driver.wait()
    assert 1 <= len(finished) < 3
    time.sleep(2)
    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    done = {p.parent.name: json.loads(p.read_text()) for p in runs.glob("*/metrics.json")}
    assert len(done) == 3 and len(list(runs.iterdir())) == 3, sorted(done)  # one folder per trial, no reruns
    for name, before in finished.items():
        after = done[name]
        # A trial that Tune had recorded as finished is not run again; one that finished its training just
        # before the kill (not yet recorded) resumes from its final checkpoint: no step is trained twice, and
        # its metrics are the same.
        assert after["resumed_from_step"] in (0, 60) and after["step"] == 60
        if after["resumed_from_step"] == 60:
            assert after["test/accuracy"] == pytest.approx(before["test/accuracy"])
            assert after["test/roc_auc"] == pytest.approx(before["test/roc_auc"])
        else:
            assert after == before


def _sweep_in_thread(space, storage: Path) -> tuple[threading.Thread, dict]:
    from semimed.tune import run_sweep

    outcome: dict = {}

    def sweep() -> None:
        try:
            outcome["experiment"] = run_sweep(space, str(storage))
        except BaseException as exc:  # noqa: BLE001 - the test reports whatever ended the sweep
            outcome["error"] = exc

    thread = threading.Thread(target=sweep, daemon=True)
    thread.start()
    return thread, outcome


def _first_checkpoint(runs: Path, timeout: float = 120) -> Path:
    """The run folder of the first trial that has saved a checkpoint (polled)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(runs.glob("*/checkpoints/step_*"))
        if found:
            return found[0].parents[1]
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint under {runs} after {timeout:.0f} s")


def test_sweep_survives_a_sigkilled_in_process_trial(local_ray, demo_roots, tmp_path, capsys):
    """SIGKILL an in-process trial (`scaling.num_workers: 0`) after its first checkpoint: Tune retries it
    (max_failures 1, the default) and it resumes from that checkpoint. Another trial fails for good (a label
    fraction too small for the data): the sweep still returns, and says which trial errored."""
    from semimed.tune import load_search_space

    grid = {"data.fraction": [0.1, 0.0001]}
    path = _space(tmp_path, demo_roots, "killed", grid, steps=80, trial_resources={"num_workers": 0})
    space = load_search_space(path)
    assert space.max_failures == 1
    thread, outcome = _sweep_in_thread(space, tmp_path / "results")
    runs = tmp_path / "results" / "killed" / "runs"
    killed = _first_checkpoint(runs)
    assert killed.name.startswith("fraction=0.1_")
    pid = int((killed / "workers" / "trial.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=240)
    assert not thread.is_alive(), "the sweep did not finish after a trial was killed"
    assert outcome.get("experiment") == str(tmp_path / "results" / "killed"), outcome.get("error")
    metrics = {p.parent.name: json.loads(p.read_text()) for p in runs.glob("*/metrics.json")}
    assert list(metrics) == [killed.name] and metrics[killed.name]["step"] == 80
    assert metrics[killed.name]["resumed_from_step"] > 0  # continued from a checkpoint, not from step 0
    assert int((killed / "workers" / "trial.pid").read_text()) != pid  # a new process trained the rest
    [failed] = [p.name for p in runs.iterdir() if p.name.startswith("fraction=0.0001_")]
    out = capsys.readouterr().out
    assert "1 of 2 trials errored (the others finished):" in out
    assert f"  runs/{failed}: SemimedError: label fraction 0.0001 " in out


def _memory() -> tuple[int, int]:
    """(total, used) bytes of this node, as Ray's memory monitor counts them without a cgroup limit."""
    info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").open()}
    return info["MemTotal"], info["MemTotal"] - info["MemAvailable"]


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        below = children.get(todo.pop(), [])
        found.extend(below)
        todo.extend(below)
    return found


def _trial_processes(driver: int) -> list[int]:
    """The Tune trial actors (`ray::ImplicitFunc`) that the sweep driver `driver`'s own local Ray runs."""
    pids = []
    for pid in set(_descendants(driver)):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::ImplicitFunc"):
                pids.append(pid)
        except OSError:
            continue
    return pids


def test_sweep_survives_a_trial_killed_by_rays_memory_monitor(demo_roots, tmp_path):
    """Ray's memory monitor kills a worker with an OutOfMemoryError, not the ActorDiedError of a SIGKILL, and
    Tune 2.60 stopped the whole sweep: "RuntimeError: Caught unexpected exception: 1 worker(s) were killed due
    to the node running low on memory". Here the sweep's own local Ray kills above the usage at start + 5 GiB,
    and the test takes that memory once the first trial has a checkpoint: the trial is retried, resumes, and
    the sweep finishes both trials and exits 0. (Other processes on the machine that grow by GiBs meanwhile
    would make this Ray kill early.)"""
    import numpy as np

    path = _space(
        tmp_path,
        demo_roots,
        "oom",
        {"seed": [0, 1]},
        steps=300,  # ~6 s of training after the first checkpoint: time to take the memory
        trial_resources={"num_workers": 0},
        max_failures=2,  # a second kill, should the memory not be back in time, still ends in a resumed trial
    )
    storage = tmp_path / "results"
    total, used = _memory()
    env = {
        **os.environ,
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "RAY_memory_usage_threshold": f"{(used + 5 * 2**30) / total:.4f}",
        "RAY_memory_monitor_refresh_ms": "100",
    }
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "sweep.log"
    with log.open("w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", "semimed.cli", "sweep", str(path), "--storage", str(storage)],
            env=env,
            start_new_session=True,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        runs = storage / "oom" / "runs"
        killed = _first_checkpoint(runs)
        recorded = killed / "workers" / "trial.pid"
        # The pid the trial recorded; code that does not record it is found by its process title.
        [trial] = [int(recorded.read_text())] if recorded.exists() else _trial_processes(driver.pid)
        hog, deadline = [], time.monotonic() + 60
        while Path(f"/proc/{trial}").exists() and time.monotonic() < deadline and len(hog) < 48:
            hog.append(np.ones(2**25))  # 256 MiB, touched, 12 GiB at most
        taken = len(hog) / 4
        del hog
        assert not Path(f"/proc/{trial}").exists(), (
            f"the memory monitor did not kill the trial ({taken} GiB taken)"
        )
        returncode = driver.wait(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    text = log.read_text()
    assert returncode == 0, text[-3000:]
    assert "Caught unexpected exception" not in text
    metrics = {p.parent.name: json.loads(p.read_text()) for p in runs.glob("*/metrics.json")}
    assert len(metrics) == 2 and {m["step"] for m in metrics.values()} == {300}
    # Ray's monitor picks the worker it kills (the newest task first): not always the trial whose checkpoint
    # the test waited for, which may even finish while the memory is being taken. The killed one resumed.
    resumed = [name for name, m in metrics.items() if m["resumed_from_step"] > 0]
    assert len(resumed) == 1, (killed.name, {name: m["resumed_from_step"] for name, m in metrics.items()})
    errors = "".join(p.read_text() for p in (storage / "oom").glob("semimed_trial_*/error.txt"))
    assert "OutOfMemoryError" in errors and "low on memory" in errors  # killed by the monitor, then retried


# ---------------------------------------------------------------------------------------------------------
# every searcher x scheduler offered runs; ASHA stops a bad trial; a sweep on object storage


RUN_FILES = {"run.json", "config.yaml", "split.json", "env.json", "metrics.json", "predictions.parquet"}


def _trial_space(tmp_path: Path, demo_roots, name: str, algorithm: str, scheduler: str) -> Path:
    """Two short in-process trials: a grid of two learning rates (random/grid search) or two sampled ones (one
    search of num_samples 2 for Optuna/HyperOpt, which take no grid axis)."""
    search = {"algorithm": algorithm, "metric": "train/loss", "mode": "min"}
    if algorithm == "random":
        grid, sample = {"train.lr": [3e-3, 1e-7]}, {}  # the second one does not learn: ASHA stops it
        top = {"num_samples": 1}
    else:
        grid, sample = {"seed": [0]}, {"train.lr": {"loguniform": [1e-3, 1e-2]}}
        top = {"num_samples": 2}
    values = {
        "name": name,
        "base": {
            "data": {"dataset": "breakhis", "root": str(demo_roots["breakhis"]), "image_size": 24},
            "model": {"backbone": "small_cnn"},
            "train": {"steps": 40, "batch_size": 16, "eval_every": 10, "checkpoint_every": 20},
            "scaling": {"num_workers": 0},
        },
        "grid": grid,
        "sample": sample,
        "search": search,
        "scheduler": {"name": scheduler, **({"grace_period": 10} if scheduler == "asha" else {})},
        # ASHA judges a trial against those judged before it: one at a time makes that order the grid's.
        "max_concurrent_trials": 1 if scheduler == "asha" else 2,
        **top,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _tune_results(experiment: str) -> list[dict]:
    """The last result of every trial, from Tune's own files (result.json) in the experiment folder."""
    from semimed import storage

    results = []
    for rel in sorted(storage.list_files(experiment)):
        if rel.endswith("/result.json"):
            lines = storage.read_bytes(storage.join(experiment, rel)).decode().splitlines()
            results.append(json.loads(lines[-1]))
    return results


@pytest.mark.parametrize(
    ("algorithm", "scheduler"),
    [
        (
            "random",
            "fifo",
        ),  # with --storage s3://… (moto on loopback): see _assert_every_trial_file_in_bucket
        ("random", "asha"),
        ("optuna", "fifo"),
        ("optuna", "asha"),
        ("hyperopt", "fifo"),
        ("hyperopt", "asha"),
    ],
)
def test_every_searcher_and_scheduler_runs_its_trials(
    local_ray, s3, demo_roots, tmp_path, algorithm, scheduler
):
    """Each combination offered runs 2 trials to their end, none errored. With grid search, ASHA (in steps,
    judged first at step 10) stops the trial whose learning rate is 1e-7 early, before its 40-step budget, and
    its folder has no metrics.json; the other trial trains to the end. Random + FIFO stores on S3."""
    from semimed import storage
    from semimed.tune import load_search_space, run_sweep

    name = f"{algorithm}_{scheduler}"
    space = load_search_space(_trial_space(tmp_path, demo_roots, name, algorithm, scheduler))
    on_s3 = (algorithm, scheduler) == ("random", "fifo")
    root = f"s3://{s3.create_bucket('sweep')}/results" if on_s3 else str(tmp_path / "results")
    experiment = run_sweep(space, root)
    assert experiment == f"{root}/{name}"
    results = _tune_results(experiment)
    assert len(results) == 2 and all("error" not in r for r in results)
    files = storage.list_files(experiment)
    trials = {rel.split("/")[1] for rel in files if rel.startswith("runs/")}
    finished = {
        rel.split("/")[1]: json.loads(storage.read_bytes(storage.join(experiment, rel)))
        for rel in files
        if rel.startswith("runs/") and rel.endswith("/metrics.json") and rel.count("/") == 2
    }
    assert all(m["step"] == 40 for m in finished.values())
    if scheduler == "fifo":
        assert len(finished) == 2 and sorted(r["step"] for r in results) == [40, 40]
    if (algorithm, scheduler) == ("random", "asha"):
        stopped = [r for r in results if r["config"]["train.lr"] == 1e-7]
        assert len(stopped) == 1 and stopped[0]["step"] < 40, results  # ended before its budget
        assert [trial.startswith("lr=0.003_") for trial in finished] == [True]
        assert [t for t in trials if t not in finished][0].startswith("lr=1e-07_")  # listed unfinished
    if on_s3:
        _assert_every_trial_file_in_bucket(s3, experiment, sorted(trials))


def _assert_every_trial_file_in_bucket(s3, experiment: str, trials: list[str]) -> None:
    """`--storage s3://…`: every file of every trial is in the bucket (looked at with boto3), through the staged
    run folder (in-process trials) and Ray's own checkpoint upload; the staging folders are gone from local
    disk; `semimed report s3://…` reads the trials from the bucket and writes its files there."""
    import tempfile

    from semimed import storage
    from semimed.report import write_report

    bucket, prefix = experiment.removeprefix("s3://").split("/", 1)
    keys = s3.keys(bucket, prefix + "/")
    assert len(trials) == 2
    for trial in trials:
        files = {k.split(f"/runs/{trial}/", 1)[1] for k in keys if f"/runs/{trial}/" in k}
        assert RUN_FILES | {"backbone.safetensors", "workers/trial.pid"} <= files, sorted(files)
        assert any(f.startswith("tb/events.out.tfevents.") for f in files)
        assert not any(f.startswith(("checkpoints/", ".")) for f in files)  # Ray keeps the checkpoints
        trial_id = "_".join(trial.rsplit("_", 2)[1:])
        assert any(
            f"/semimed_trial_{trial_id}_" in k and "/checkpoint_" in k and k.endswith("/state.pt")
            for k in keys
        )
    staging = Path(tempfile.gettempdir()) / storage.STAGING_ROOT
    assert not [p for p in staging.glob("*") if p.name.rsplit(".", 2)[0] in trials]
    summary, text = write_report(experiment)
    assert f"Experiment directory: `{experiment}`" in text and len(summary)
    assert f"{prefix}/report.md" in s3.keys(bucket, f"{prefix}/report")


def test_train_adapter_quiets_rays_report_log_without_private_imports():
    """semimed/train.py imports no private Ray module. Ray Train V2 logs each report at INFO from a logger named
    after its source file (`logging.getLogger(__file__)`), which `ray.train.LoggingConfig` does not configure;
    the standard-library filter on the root handlers drops those records and nothing else."""
    import importlib.util
    import logging
    import re

    import semimed.train as adapter

    source = Path(adapter.__file__).read_text()
    assert not re.search(r"^\s*(from|import)\s+ray\S*\._internal", source, re.M)
    origin = importlib.util.find_spec("ray.train.v2._internal.execution.context").origin
    assert "logging.getLogger(__file__)" in Path(origin).read_text()  # why the public knob misses it

    def record(name: str, level: int) -> logging.LogRecord:
        return logging.LogRecord(name, level, origin, 1, "Reporting training result 3: ...", None, None)

    keep = adapter._RayFileLoggerFilter().filter
    assert not keep(record(origin, logging.INFO))
    assert keep(record(origin, logging.WARNING))  # warnings and errors still pass
    assert keep(record("ray.train", logging.INFO)) and keep(record("semimed", logging.INFO))
