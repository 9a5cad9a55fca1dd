"""Ray Train adapter: the per-worker function and the TorchTrainer around `experiment.run_training`.

Only this module and semimed/tune/ import Ray. The worker resolves its device and rank from Ray, resumes from
`ray.train.get_checkpoint()` when Ray restarts it, and forwards the engine's reports (metrics + checkpoint
directory) to `ray.train.report`. Rank 0 writes the run folder: in place on a filesystem path, or staged locally
and mirrored to an object-storage URI at each checkpoint and at the end (`semimed.storage.staged_folder`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch

from semimed import storage
from semimed.config import Config, config_from_dict
from semimed.errors import SemimedError, warnings_in_one_line
from semimed.experiment import kept_results, prepare_run_dir, run_training
from semimed.interrupts import SigintWatch
from semimed.metrics import metric_names
from semimed.runs import METRICS_FILE, RUN_FILE, check_name, default_run_name

_LOCAL_RAY = False  # whether init_ray started this process's Ray itself (a private local Ray)


def train_fn_per_worker(config: dict[str, Any]) -> None:
    cfg = config_from_dict(config["cfg"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        # Ray sets OMP_NUM_THREADS from the worker's CPU share; make torch follow it (it reads it only at import).
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    quiet_ray_report_log()
    target = config["run_dir"]
    with _worker_folder(target, rank) as folder:
        # Which process trains which rank: for operators (and the fault-tolerance tests, which kill one).
        pid_file = folder.path / "workers" / f"rank{rank}.pid"
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(str(os.getpid()))
        if rank > 0 and storage.is_uri(target):  # ranks > 0 write nothing else; their pid goes up directly
            storage.write_bytes(storage.join(target, "workers", pid_file.name), pid_file.read_bytes())
        report = Reporter(ray.train.report, ray.train.Checkpoint, folder.sync if rank == 0 else None)
        checkpoint = ray.train.get_checkpoint()
        # Ray forwards a worker's stderr to the driver's terminal: warnings as the CLI says them (one line).
        with (
            warnings_in_one_line(),
            checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None) as resume_dir,
        ):
            run_training(
                cfg,
                folder.path,
                report=report,
                resume_from=resume_dir,
                device=device,
                write_files=rank == 0,
                show_progress=config.get("show_progress", True),
            )
            if rank == 0:
                folder.sync()
            report.send_final()  # every rank: ray.train.report is a barrier


@contextlib.contextmanager
def _worker_folder(target: str, rank: int):
    """Rank 0 writes the run folder (staged for a URI); other ranks write only their pid file, into the shared
    folder or, for a URI, a private temporary one."""
    if rank == 0 or not storage.is_uri(target):
        with storage.staged_folder(target) as folder:
            yield folder
        return
    with tempfile.TemporaryDirectory(prefix="semimed-rank-") as scratch:
        yield storage.Folder(Path(scratch))


class Reporter:
    """The engine's `report(metrics, checkpoint_dir)` for Ray (Train's or Tune's `report`), with two rules:

    - every result carries the latest `val/*` values (a checkpoint step without an evaluation repeats them):
      a searcher or scheduler with a `search.metric` reads it from every result, and Tune stops a trial whose
      result lacks it;
    - the run folder is synced to storage before a checkpoint is reported (`sync`), and the final result is held
      back until the caller has written metrics.json and the backbone (`send_final`): Tune may stop a trial at
      any result it receives (ASHA does at its last rung), and a stopped trial writes nothing more.
    """

    def __init__(self, report, checkpoint_cls, sync=None) -> None:
        self._report = report
        self._checkpoint_cls = checkpoint_cls
        self._sync = sync
        self._last_val: dict[str, Any] = {}
        self._final: tuple[dict[str, Any], str | None] | None = None

    def __call__(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        metrics = summary_metrics(metrics)
        self._last_val.update({k: v for k, v in metrics.items() if k.startswith("val/")})
        metrics = {**self._last_val, **metrics}
        if metrics.get("final"):
            self._final = (metrics, checkpoint_dir)
            return
        self._send(metrics, checkpoint_dir)

    def send_final(self) -> None:
        if self._final is not None:
            self._send(*self._final)
            self._final = None

    def _send(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if checkpoint_dir and self._sync is not None:
            self._sync()
        checkpoint = self._checkpoint_cls.from_directory(checkpoint_dir) if checkpoint_dir else None
        self._report(metrics, checkpoint=checkpoint)


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


class _RayFileLoggerFilter(logging.Filter):
    """Drops INFO and DEBUG records of Ray loggers named after their source file.

    Ray Train V2 logs every report's full TrainingReport at INFO (`Reporting training result …`) from a logger
    created with `logging.getLogger(__file__)`. `ray.train.LoggingConfig(log_level=…)` configures the `ray.train`
    logger hierarchy, which a logger named `/…/site-packages/ray/train/…/context.py` is not part of, so the
    public knob does not reach it. The standard-library way that needs no import of Ray's private modules is a
    filter on the handlers those records end at (the root logger's), matching loggers whose name is a file path
    inside Ray; warnings and errors still pass. tests/test_ray.py checks that it matches what Ray logs.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        named_by_file = record.name.endswith(".py") and f"{os.sep}ray{os.sep}train{os.sep}" in record.name
        return record.levelno >= logging.WARNING or not named_by_file


def quiet_ray_report_log() -> None:
    """Install `_RayFileLoggerFilter` on the root logger's handlers (once per process)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _RayFileLoggerFilter) for f in handler.filters):
            handler.addFilter(_RayFileLoggerFilter())


def build_trainer(
    cfg: Config,
    run_dir: str | Path,
    storage_path: str,
    run_name: str,
    callbacks: list | None = None,
    show_progress: bool = True,
) -> ray.train.torch.TorchTrainer:
    """A TorchTrainer for one run. `run_name` must be deterministic so a retried run finds its checkpoints.
    `run_dir` is a path or a storage URI (then rank 0 stages it); `storage_path` is where Ray keeps checkpoints."""
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
    trials would otherwise wait forever on a 2-core machine (docs/ray.md). The dashboard runs (on loopback):
    Ray Train's PlacementGroupCleaner asks the State API, which the dashboard serves, whether a finished run's
    controller is gone; without it every finished Train run in a sweep leaks its workers' placement group
    until the sweep's CPUs are all reserved and the next trial's workers never start.
    """
    global _LOCAL_RAY
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    if address:
        check_reachable(address)  # else ray.init retries an unreachable address for minutes, silently
        ray.init(address=address)
        _LOCAL_RAY = False
        return
    from semimed.sweep_progress import say

    note = unused_cluster_note()
    if note:
        say(note)
    dashboard = free_local_port()
    ray.init(
        address="local",
        num_cpus=num_cpus or max(4, os.cpu_count() or 1),
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard,
        configure_logging=True,
        logging_level="warning",
        # Ray's State API (Train's PlacementGroupCleaner asks it from inside this Ray) finds its cluster from
        # RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else by looking for Ray's GCS processes on this machine:
        # with a second Ray here (another sweep, a `ray start` head) it raised "Found multiple active Ray
        # instances" (a traceback in the output) or asked the other cluster. Every process of this Ray's
        # job inherits this (runtime environments merge env_vars into tasks' and actors' own).
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard}"}},
    )
    _LOCAL_RAY = True


RAY_GCS_PORT = 6379  # a head's default GCS port (`ray start --head`), when an address names no port


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast, in one line naming the address, when nothing answers at a Ray cluster address (a GCS
    `host:port`, or `ray://host:port`): `ray.init` would retry for minutes with no output. "auto" and
    "local" are left to Ray. Only a TCP connect: it does not prove that Ray listens there."""
    if address in ("auto", "local"):
        return
    target = address.split("://", 1)[1] if "://" in address else address
    host, _, port_text = target.rstrip("/").rpartition(":")
    if not host:
        host, port_text = port_text, str(RAY_GCS_PORT)
    try:
        port = int(port_text)
    except ValueError:
        raise SemimedError(f"--address {address}: expected HOST:PORT (e.g. 10.0.0.1:6379) or auto") from None
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=timeout_s):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise SemimedError(
            f"--address {address}: no Ray cluster answers at {host}:{port} ({reason}); is the head running "
            "(`ray status` on it), and is this its GCS address (port 6379 by default)?"
        ) from None


def unused_cluster_note() -> str | None:
    """One line when a private local Ray is about to start although a cluster is at hand: RAY_ADDRESS is set,
    or `ray start` recorded a head on this machine that still answers. semimed uses a cluster only when
    --address says so (a recorded head may be stale, or someone else's)."""
    given = os.environ.get("RAY_ADDRESS", "")
    if given and given not in ("local", "auto"):
        return (
            f"note: RAY_ADDRESS={given} is set, but without --address semimed starts a private local Ray; "
            f"to run on that cluster: --address {given}"
        )
    # Where `ray start` records its head (ray/_common/utils.py: get_ray_address_file).
    temp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    record = Path(temp) / "ray" / "ray_current_cluster"
    with contextlib.suppress(
        OSError, ValueError
    ):  # no record, or a stale one (SemimedError: nothing answers)
        recorded = record.read_text().strip()
        if recorded:
            check_reachable(recorded, timeout_s=1.0)
            return (
                f"note: a Ray cluster started with `ray start` answers at {recorded}; without --address "
                f"semimed starts a private local Ray (to use that cluster: --address {recorded})"
            )
    return None


def free_local_port() -> int:
    """A TCP port free on the loopback interface now (for the local dashboard, whose URL must be known before
    Ray starts; Ray tries the next port if another process takes it meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def local_ray() -> bool:
    """Whether this process runs on a private local Ray that `init_ray` started (not a cluster)."""
    return _LOCAL_RAY and ray.is_initialized()


def train_once(cfg: Config, address: str | None = None) -> dict[str, Any]:
    """`semimed train`: one run on Ray Train; returns the final metrics. `scaling.num_workers: 0` trains in
    this process (no Ray), like `semimed train --local`. `output_dir` may be a storage URI (s3://…)."""
    if not cfg.name:
        cfg = dataclasses.replace(cfg, name=default_run_name(cfg))
    check_name(cfg.name, "name")
    output = storage.normalize(cfg.output_dir)
    run_dir = storage.join(output, cfg.name)
    if cfg.scaling.num_workers == 0:
        with storage.staged_folder(run_dir) as folder:
            return run_training(cfg, folder.path, report=lambda _, checkpoint: checkpoint and folder.sync())
    # Refuse a folder that holds another run here, before any worker starts (the workers check again); a
    # finished run is not started again (its workers would not agree on it: ranks > 0 of a URI cannot see it).
    if storage.is_uri(run_dir):  # its identity (run.json) and metrics.json are all the checks read
        with tempfile.TemporaryDirectory(prefix="semimed-check-") as scratch:
            storage.download(run_dir, Path(scratch), [RUN_FILE, METRICS_FILE])
            prepare_run_dir(cfg, scratch)
            kept = kept_results(scratch, shown=run_dir)
    else:
        prepare_run_dir(cfg, run_dir)
        kept = kept_results(run_dir)
    if kept is not None:
        return kept
    init_ray(address)
    trainer = build_trainer(cfg, run_dir, storage_path=storage.join(output, ".ray_train"), run_name=cfg.name)
    # Ray Train takes Ctrl-C itself (it aborts the run, then `sys.exit(0)` or an actor error ends `fit`):
    # turn that back into the KeyboardInterrupt it is (one line, exit 130: semimed.cli.main).
    with SigintWatch() as sigint:
        try:
            result = trainer.fit()
        except (Exception, SystemExit):
            if sigint.seen():
                raise KeyboardInterrupt from None
            raise
        if sigint.seen():
            raise KeyboardInterrupt
    return dict(result.metrics or {})
