"""The body of one Tune trial: a function that builds and fits a TorchTrainer (Train V2's Tune pattern), or, with
`scaling.num_workers: 0`, trains in its own process. Either way the run folder is
`<experiment>/runs/<trial label>_<trial id>/`, written in place on a filesystem path and staged + mirrored for a
storage URI (semimed.storage).

Killed trials. A trial whose process dies (SIGKILL, the kernel's OOM killer, a lost node: Ray reports a
RayActorError) is retried up to `max_failures` times and resumes from its last checkpoint. Ray's own memory
monitor kills with an OutOfMemoryError instead, which Tune 2.60's actor manager does not expect: it raised
"Caught unexpected exception" and stopped the whole sweep (`_actor_task_failed` in
ray/air/execution/_internal/actor_manager.py). `retry_trials_killed_by_ray` hands such errors to Tune as the
actor failures they are, so that trial is retried too.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from ray import tune
from ray.exceptions import RayActorError, RayError, RayTaskError

from semimed import storage
from semimed.tune.overrides import trial_label
from semimed.tune.space import SearchSpace


def make_trainable(space: SearchSpace, experiment_dir: str):
    """The trial function for `space`; `experiment_dir` is `<storage>/<name>` (a path or a URI)."""
    keys = list(space.grid) + list(space.sample)

    def semimed_trial(params: dict[str, Any]) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        from semimed.train import build_trainer
        from semimed.tune.plan import trial_scaling

        context = tune.get_context()
        overrides = {k: params[k] for k in keys}
        cfg = space.trial_config(overrides)
        # What the plan reserved for this trial (a closed-form method: in-process on CPUs, no GPU).
        cfg = dataclasses.replace(cfg, scaling=trial_scaling(cfg))
        run_dir = storage.join(experiment_dir, "runs", f"{trial_label(overrides)}_{context.get_trial_id()}")
        if cfg.scaling.num_workers == 0:
            run_in_process(cfg, run_dir)
            return
        trainer = build_trainer(
            cfg,
            run_dir,
            storage_path=storage.join(experiment_dir, "train"),
            # Derived from the trial id, never a timestamp: a retried or restored trial finds its checkpoints.
            run_name=f"train-{context.get_trial_id()}",
            callbacks=[TuneReportCallback()],
            show_progress=False,
        )
        trainer.fit()

    return semimed_trial


def run_in_process(cfg, run_dir: str) -> None:
    """`scaling.num_workers: 0`: the trial trains in its own process, without a Ray Train worker group.

    Measured here (scripts/bench_ray.py), a 1-worker TorchTrainer costs ~10-15 s per trial to start; short CPU
    trials (the demo, MedMNIST studies) pay that for every trial, long GPU or DDP trials do not notice it.
    Checkpoints and resume go through Tune instead of Train (on a path: through the run folder).
    """
    import torch

    from semimed.experiment import run_training
    from semimed.train import Reporter

    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    with storage.staged_folder(run_dir) as folder:
        # Which process trains this trial (each retry writes its own): for operators, and the tests that kill it.
        pid_dir = folder.path / "workers"
        pid_dir.mkdir(parents=True, exist_ok=True)
        (pid_dir / "trial.pid").write_text(str(os.getpid()))
        reporter = Reporter(tune.report, tune.Checkpoint, folder.sync)
        # One copy of each checkpoint: on a path the run folder is it (a retried trial resumes from there);
        # only a run folder staged for a URI hands its checkpoints to Tune.
        report = reporter if storage.is_uri(run_dir) else lambda metrics, _: reporter(metrics, None)
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            run_training(cfg, folder.path, report=report, show_progress=False)
        else:
            with checkpoint.as_directory() as resume_dir:
                run_training(cfg, folder.path, report=report, resume_from=resume_dir, show_progress=False)
        folder.sync()
        reporter.send_final()


class TrialProcessKilled(RayActorError):
    """A trial's process was ended by Ray (its memory monitor), not by an error in the trial's code."""


def retry_trials_killed_by_ray() -> None:
    """Make Tune retry a trial that Ray's memory monitor killed, as it retries one that died of a SIGKILL.

    Ray 2.60 reports a worker killed by its memory monitor as `OutOfMemoryError`, a RayError that is neither
    a RayActorError (a dead actor: the trial is retried, max_failures) nor a RayTaskError (an exception in
    the trial's code). Tune's actor manager (`RayActorManager._actor_task_failed`,
    ray/air/execution/_internal/actor_manager.py) raises `RuntimeError("Caught unexpected exception: ...")`
    for anything else, and that ends the whole sweep. The trial's actor is gone in that case too, so such an
    error is passed on as the actor's death. Installed once, in the driver (where Tune's controller runs).
    """
    from ray.air.execution._internal.actor_manager import RayActorManager

    original = RayActorManager._actor_task_failed
    if getattr(original, "_semimed_retries_killed_trials", False):
        return

    def _actor_task_failed(self, tracked_actor_task, exception: Exception):
        if isinstance(exception, RayError) and not isinstance(exception, (RayActorError, RayTaskError)):
            killed = TrialProcessKilled(error_msg=f"{type(exception).__name__}: {exception}")
            killed.__cause__ = exception
            exception = killed
        return original(self, tracked_actor_task, exception)

    _actor_task_failed._semimed_retries_killed_trials = True
    RayActorManager._actor_task_failed = _actor_task_failed
