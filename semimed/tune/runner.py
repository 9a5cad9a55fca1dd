"""Tuner construction and running: the searcher and scheduler, storage, concurrency, resume, errored trials."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

from ray import tune
from ray.exceptions import RayTaskError

from semimed import storage as store
from semimed import sweep_progress
from semimed.errors import SemimedError
from semimed.interrupts import SigintWatch
from semimed.optional import require
from semimed.tune.overrides import trial_label
from semimed.tune.plan import PENDING_ENV, Plan, plan_for_run, trial_resources
from semimed.tune.space import SearchSpace
from semimed.tune.trial import make_trainable, retry_trials_killed_by_ray

DEFAULT_STORAGE = "~/semimed_results"


def resolve_storage(storage: str | None) -> str:
    """The results root: `--storage`, else $SEMIMED_STORAGE, else ~/semimed_results (paths made absolute)."""
    return store.normalize(storage or os.environ.get("SEMIMED_STORAGE", DEFAULT_STORAGE))


def experiment_dir(space: SearchSpace, storage: str | None) -> str:
    return store.join(resolve_storage(storage), space.name)


def check_resumable(space: SearchSpace, storage: str | None) -> None:
    """Raise unless `--resume` has an experiment to resume, before anything is made: Tune's state in the
    experiment folder (grid + random search: one Tuner), or at least the folder (outer grid: a cell not
    started yet starts now). Reads only."""
    experiment = experiment_dir(space, storage)
    found = tune.Tuner.can_restore(experiment) if space.algorithm == "random" else store.is_dir(experiment)
    if not found:
        raise SemimedError(
            f"{experiment}: no experiment to resume (--resume); run the sweep without --resume to start it"
        )


def _scheduler(space: SearchSpace):
    """None (FIFO) or ASHA in steps: a trial is judged at `grace_period` steps (default: its first evaluation),
    then at grace_period × reduction_factor^k, up to `max_t` (default: the budget, train.steps). The metric and
    mode go to TuneConfig only (Tune passes them on; giving them twice is an error)."""
    if space.scheduler["name"] == "fifo":
        return None
    train = space.trial_config(space.cells[0] if space.cells else {}).train
    options = {"grace_period": train.eval_every, "max_t": train.steps}
    options.update({k: v for k, v in space.scheduler.items() if k != "name"})
    return tune.schedulers.ASHAScheduler(time_attr="step", **options)


def _searcher(space: SearchSpace):
    if space.algorithm == "optuna":
        require("optuna", "optuna", "search.algorithm optuna")
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch()
    if space.algorithm == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch()
    return None


def build_tuners(
    space: SearchSpace, storage: str | None = None, resume: bool = False, plan: Plan | None = None
) -> list[tune.Tuner]:
    """One Tuner for grid + random search; one per grid cell (outer grid) for Optuna/HyperOpt."""
    from semimed.train import local_ray

    plan = plan or plan_for_run(space, None, local_ray())
    retry_trials_killed_by_ray()
    root = resolve_storage(storage)
    experiment = store.join(root, space.name)
    # Per trial: a sweep may mix trial shapes (a closed-form method next to networks asks for no GPU).
    trainable = tune.with_resources(make_trainable(space, experiment), trial_resources(space))
    if space.algorithm == "random":
        parts = [(space.name, root, {key: tune.grid_search(values) for key, values in space.grid.items()})]
    else:  # outer grid: each cell a search of its own
        parts = [
            (f"search-{i:03d}_{trial_label(cell)}", experiment, dict(cell))
            for i, cell in enumerate(space.cells)
        ]
    metric = {"metric": space.metric, "mode": space.mode} if space.uses_metric else {}
    lines = sweep_progress.trial_lines(space, plan.concurrency)  # one progress view over every Tuner
    tuners = []
    for name, storage_path, param_space in parts:
        param_space = {**param_space, **space.sampled_space()}
        path = store.join(storage_path, name)
        if resume and tune.Tuner.can_restore(path):
            # Restoring unpickles the experiment state: only for a path the user owns (their own storage).
            tuners.append(
                tune.Tuner.restore(
                    path, trainable, resume_unfinished=True, resume_errored=True, param_space=param_space
                )
            )
            continue
        if resume and space.algorithm == "random":
            raise SemimedError(f"{path}: no experiment to resume")
        tuners.append(
            tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    max_concurrent_trials=plan.concurrency,
                    num_samples=space.num_samples,
                    reuse_actors=sweep_progress.reuse_trial_processes(space),
                    search_alg=_searcher(space),
                    scheduler=_scheduler(space),
                    **metric,
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=storage_path,
                    failure_config=tune.FailureConfig(max_failures=space.max_failures),
                    # In-process trials report their checkpoints to Tune: keep the two newest, as the engine does.
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                    **sweep_progress.run_config_options(lines),  # quiet output; no Tune TensorBoard copy
                ),
            )
        )
    return tuners


def run_sweep(
    space: SearchSpace, storage: str | None = None, resume: bool = False, cluster_config: str | None = None
) -> str:
    """Run (or resume) the sweep; returns the experiment directory (a path or a storage URI).

    Prints the plan (concurrency and resources, semimed.tune.plan). Trials that failed after their retries are
    listed (how many, which, their first error line); the sweep raises only when every trial failed. Ctrl-C:
    Tune stops the trials and saves its state, then this raises SweepInterrupted (a KeyboardInterrupt)."""
    from semimed.train import local_ray

    plan = plan_for_run(space, cluster_config, local_ray())
    for line in plan.lines():  # user-facing: on the terminal even when Ray's output goes to sweep.log
        sweep_progress.say(line)
    results, grids = [], []
    with _pending_trials(plan), SigintWatch() as sigint:
        for tuner in build_tuners(space, storage, resume, plan):
            grids.append(tuner.fit())
            results.extend(grids[-1])
            if sweep_interrupted(sigint.seen(), grids):
                break  # the next grid cell's Tuner does not start either
    if sweep_interrupted(sigint.seen(), grids):
        raise SweepInterrupted(experiment_dir(space, storage))
    errors = [r for r in results if r.error]
    if errors and len(errors) == len(results):
        raise SemimedError(f"all {len(results)} trials failed; first error: {_error_line(errors[0].error)}")
    if errors:
        print(f"{len(errors)} of {len(results)} trials errored (the others finished):")
        print("\n".join(f"  {line}" for line in errored_trials(space, errors)))
    return experiment_dir(space, storage)


class SweepInterrupted(KeyboardInterrupt):
    """The user stopped the sweep (Ctrl-C) and Tune saved its state in `experiment`: `--resume` continues it."""

    def __init__(self, experiment: str) -> None:
        super().__init__(f"Tune saved the sweep's state in {experiment}")
        self.experiment = experiment


def sweep_interrupted(sigint: bool, grids: Sequence) -> bool:
    """Whether `Tuner.fit()` returned because the sweep was interrupted rather than finished.

    Tune takes SIGINT itself (a graceful stop: it saves the experiment state) and returns the partial results
    like a finished sweep's, with no error. Interrupted: a SIGINT arrived (`sigint`, semimed.interrupts), or a
    ResultGrid holds trials that neither finished nor errored (pending or running when Tune stopped: also
    when the watch could not be set, outside the main thread, or Tune was stopped by SIGUSR1)."""
    return sigint or any(grid.num_terminated + grid.num_errors < len(grid) for grid in grids)


@contextlib.contextmanager
def _pending_trials(plan: Plan):
    """TUNE_MAX_PENDING_TRIALS_PG for this sweep's fits (Tune reads it when a fit starts): pending trials are the
    demand an autoscaler sees; on a small local machine they deadlock (semimed.tune.plan). A value the user set
    is kept; ours is removed again afterwards, so that it does not leak into the next sweep of this process."""
    if os.environ.get(PENDING_ENV):
        yield
        return
    os.environ[PENDING_ENV] = str(plan.pending_trials)
    try:
        yield
    finally:
        os.environ.pop(PENDING_ENV, None)


def errored_trials(space: SearchSpace, results) -> list[str]:
    """`<run folder>: <first line of the error>` for failed Tune results (the run folder under runs/)."""
    keys = list(space.grid) + list(space.sample)
    lines = []
    for result in results:
        # Tune names a trial's folder `semimed_trial_<trial id>_<tag>_<date>`; the id is in the metrics too,
        # but only once the trial has reported.
        found = re.search(r"semimed_trial_([0-9a-f]+_\d+)", Path(result.path or "").name)
        trial_id = (result.metrics or {}).get("trial_id") or (found.group(1) if found else "?")
        label = trial_label({k: result.config[k] for k in keys if k in (result.config or {})})
        lines.append(f"runs/{label}_{trial_id}: {_error_line(result.error)}")
    return lines


def _error_line(error: BaseException) -> str:
    """One line that says what went wrong: the trial's own exception, not Ray's `ray::ImplicitFunc.train()
    (pid=...)` header around it."""
    if isinstance(error, RayTaskError) and error.cause is not None:
        error = error.cause
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def default_concurrency(space: SearchSpace, cluster_config: str | None = None) -> int:
    """How many trials the sweep runs at once without `max_concurrent_trials` (semimed.tune.plan)."""
    from semimed.train import local_ray

    return plan_for_run(space, cluster_config, local_ray()).concurrency
