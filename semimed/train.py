"""Ray Train adapter: the per-worker function and the TorchTrainer around `experiment.run_training`.

Only this module and tune.py import Ray. The worker resolves its device and rank from Ray, resumes from
`ray.train.get_checkpoint()` when Ray restarts it, and forwards the engine's reports (metrics + checkpoint
directory) to `ray.train.report`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch

from semimed.config import Config, config_from_dict
from semimed.experiment import prepare_run_dir, run_training
from semimed.metrics import metric_names
from semimed.runs import default_run_name


def train_fn_per_worker(config: dict[str, Any]) -> None:
    cfg = config_from_dict(config["cfg"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        # Ray sets OMP_NUM_THREADS from the worker's CPU share; make torch follow it (it reads it only at import).
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    _quiet_report_log()

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(summary_metrics(metrics), checkpoint=checkpoint)

    # Which process trains which rank: for operators (and the fault-tolerance test, which kills one).
    pid_dir = Path(config["run_dir"]) / "workers"
    pid_dir.mkdir(parents=True, exist_ok=True)
    (pid_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None) as resume_dir:
        run_training(
            cfg,
            config["run_dir"],
            report=report,
            resume_from=resume_dir,
            device=device,
            write_files=rank == 0,
            show_progress=config.get("show_progress", True),
        )


def summary_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """What goes to Ray: bookkeeping (step, which checkpoint), train/* curves, and the registered summary metrics
    of val/test (`semimed.metrics.METRICS`). Per-class values (`val/roc_auc/benign`) and thresholds stay in the
    run's metrics.json and TensorBoard; they would flood Tune's tables and logs."""
    summary = set(metric_names())
    return {
        k: v
        for k, v in metrics.items()
        if "/" not in k or k.startswith("train/") or k.split("/", 1)[1] in summary
    }


def _quiet_report_log() -> None:
    # Ray Train V2 logs every report's full TrainingReport at INFO from a logger named after its source file,
    # which `ray.train.LoggingConfig` does not reach.
    try:
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:  # a Ray without that module: nothing to quiet
        pass


def build_trainer(
    cfg: Config,
    run_dir: str | Path,
    storage_path: str,
    run_name: str,
    callbacks: list | None = None,
    show_progress: bool = True,
) -> ray.train.torch.TorchTrainer:
    """A TorchTrainer for one run. `run_name` must be deterministic so a retried run finds its checkpoints."""
    scaling = cfg.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    return ray.train.torch.TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "run_dir": str(run_dir), "show_progress": show_progress},
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # Ray logs every report's full metrics dict at INFO; the engine has its own progress and TensorBoard.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start a private local Ray (address None) or connect to a cluster. Never attach to a stale local one.

    Locally, logical CPUs are at least 4: a Tune trial plus its Train worker need 2 CPUs, and two concurrent
    trials would otherwise wait forever on a 2-core machine (RAY_NOTES.md). The dashboard runs (on loopback):
    Ray Train's PlacementGroupCleaner asks the State API, which the dashboard serves, whether a finished run's
    controller is gone; without it every finished Train run in a sweep leaks its workers' placement group
    until the sweep's CPUs are all reserved and the next trial's workers never start.
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    if address:
        ray.init(address=address)
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus or max(4, os.cpu_count() or 1),
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            configure_logging=True,
            logging_level="warning",
        )


def train_once(cfg: Config, address: str | None = None) -> dict[str, Any]:
    """`semimed train`: one run on Ray Train; returns the final metrics. `scaling.num_workers: 0` trains in
    this process (no Ray), like `semimed train --local`."""
    if not cfg.name:
        cfg = dataclasses.replace(cfg, name=default_run_name(cfg))
    if cfg.scaling.num_workers == 0:
        return run_training(cfg, Path(cfg.output_dir) / cfg.name)
    storage = (
        str(Path(cfg.output_dir).expanduser().resolve()) if "://" not in cfg.output_dir else cfg.output_dir
    )
    run_dir = Path(storage) / cfg.name
    # Refuse a folder that holds another run here, before any worker starts (the workers check again).
    prepare_run_dir(cfg, run_dir)
    init_ray(address)
    trainer = build_trainer(cfg, run_dir, storage_path=str(Path(storage) / ".ray_train"), run_name=cfg.name)
    result = trainer.fit()
    return dict(result.metrics or {})
