"""Ray Tune adapter: a search-space YAML -> Tuner(s) whose trials each build and fit a TorchTrainer.

Search-space YAML (unknown keys are errors; see search_spaces/ for complete examples):

    name: breakhis_ssl                    # experiment name -> <storage>/<name>
    base: {data: {...}, train: {...}}     # a semimed config (or `base_config: path/to/config.yaml`)
    grid:                                 # full factorial over dotted config keys: every cell is run
      method.name: [supervised, fixmatch]
      data.fraction: [0.01, 0.05, 0.1]
      seed: [0, 1, 2]
    sample:                               # optional sampled hyperparameters, num_samples per grid cell
      train.lr: {loguniform: [1.0e-4, 1.0e-2]}
      method.params.threshold: {uniform: [0.8, 0.98]}
    num_samples: 1
    search: {algorithm: random, metric: val/roc_auc, mode: max}   # random | optuna | hyperopt
    scheduler: {name: fifo}                # fifo (default) | asha (grace_period, reduction_factor)
    trial_resources: {num_workers: 1, cpus_per_worker: 1, use_gpu: false, gpus_per_worker: 1}
    max_concurrent_trials: 2               # optional; default: what the cluster's CPUs/GPUs fit
    max_failures: 1                        # Tune retries of a failed trial (it resumes from its checkpoint)

FIFO is the default because a fraction × seed study must run every cell to the same budget: early stopping
would bias the small-fraction means. Optuna and HyperOpt reject grid axes, so with them each grid cell is
its own search (the outer-grid pattern): one Tuner per cell, all in the same experiment directory.

Each trial's files live in `<storage>/<name>/runs/<trial>/` (config, split, TensorBoard, metrics.json); Tune's
own event files and state live under `<storage>/<name>/` too, so `tensorboard --logdir <storage>/<name>`
shows both.

Command-line overrides (`semimed sweep SPACE key=value ...`) are never dropped silently. Each one lands in
exactly one place, and `--dry-run` and the start of a real sweep print where:

- a key that IS a grid axis replaces that axis by the one value:
  `override data.fraction=0.5 replaces grid axis data.fraction [0.01, 0.05, 0.1, 0.25, 0.5, 1] -> [0.5]`;
- a key INSIDE a whole-section grid axis (`method.params.threshold` under the axis `method`, whose values are
  entries like `{name: fixmatch, params: {threshold: 0.95}}`; `train.lr` under an axis `train`) is set in
  every value of that axis. If that makes some value invalid (supervised takes no `threshold`), loading
  fails, naming the override and those values: to change only some entries, edit them under `grid:` in the
  search space instead;
- a key that holds grid axes (`method={name: fixmatch}` over the axis `method.name`) sets that section of the
  base; an axis whose key the override's value sets is replaced by that value, the others keep varying;
- a sampled key (equal to a `sample:` key, inside one or containing one) is an error: the samples are what
  the search explores, and pinning one from the command line would quietly turn num_samples trials into
  copies. Move it to `base` (or make it a grid axis) in the search space;
- any other key sets the base config of every trial.

Killed trials. A trial whose process dies (SIGKILL, the kernel's OOM killer, a lost node: Ray reports a
RayActorError) is retried up to `max_failures` times and resumes from its last checkpoint. Ray's own memory
monitor kills with an OutOfMemoryError instead, which Tune 2.60's actor manager does not expect: it raised
"Caught unexpected exception" and stopped the whole sweep (`_actor_task_failed` in
ray/air/execution/_internal/actor_manager.py). `_retry_trials_killed_by_ray` hands such errors to Tune as
the actor failures they are, so that trial is retried too. A trial that still fails is marked errored and
the others run to the end; `run_sweep` lists the errored ones and raises only when every trial failed.
"""

from __future__ import annotations

import copy
import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.exceptions import RayActorError, RayError, RayTaskError

from semimed.config import apply_overrides, config_from_dict, load_yaml, parse_override
from semimed.errors import SemimedError

SEARCH_SPACE_KEYS = (
    "name",
    "description",
    "base",
    "base_config",
    "grid",
    "sample",
    "num_samples",
    "search",
    "scheduler",
    "trial_resources",
    "max_concurrent_trials",
    "max_failures",
)
DISTRIBUTIONS = {
    "uniform": tune.uniform,
    "loguniform": tune.loguniform,
    "choice": tune.choice,
    "randint": tune.randint,
    "quniform": tune.quniform,
}
ALGORITHMS = ("random", "optuna", "hyperopt")
SCHEDULERS = ("fifo", "asha")
DEFAULT_STORAGE = "~/semimed_results"
# The trial function itself only waits on its TorchTrainer: it reserves half a CPU, not a whole one.
TRIAL_CPU = 0.5
TRIAL_RESOURCE_KEYS = ("num_workers", "cpus_per_worker", "gpus_per_worker", "use_gpu")


@dataclass(frozen=True)
class SearchSpace:
    name: str
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    sample: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    num_samples: int = 1
    algorithm: str = "random"
    metric: str = "val/roc_auc"
    mode: str = "max"
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "fifo"})
    max_concurrent_trials: int | None = None
    max_failures: int = 1
    source: str = ""
    description: str = ""
    # One line per command-line override: where it was applied (what `--dry-run` and a sweep's start print).
    override_notes: tuple[str, ...] = ()

    @property
    def cells(self) -> list[dict[str, Any]]:
        """The grid, expanded: one dict of dotted overrides per cell."""
        keys = list(self.grid)
        return [dict(zip(keys, values, strict=True)) for values in itertools.product(*self.grid.values())]

    @property
    def trials(self) -> list[dict[str, Any]]:
        return [cell for cell in self.cells for _ in range(self.num_samples)]

    def trial_config(self, overrides: dict[str, Any], base: dict[str, Any] | None = None):
        # Copies: a grid value that is a whole section must not be changed by a key set inside it afterwards.
        return config_from_dict(
            apply_overrides(self.base if base is None else base, copy.deepcopy(overrides))
        )

    def sampled_space(self) -> dict[str, Any]:
        return {
            key: DISTRIBUTIONS[kind](*args)
            if kind != "choice"
            else tune.choice(args[0] if len(args) == 1 and isinstance(args[0], list) else args)
            for key, spec in self.sample.items()
            for kind, args in spec.items()
        }


def load_search_space(path: str | Path, overrides: list[str] | None = None) -> SearchSpace:
    """Parse and validate a search space: every grid cell must make a valid config (typos fail here).

    `overrides` (`key=value` strings) are placed by the rules in the module docstring."""
    path = Path(path)
    raw = load_yaml(path)

    def fail(message: str) -> SemimedError:
        return SemimedError(f"{path}: {message}")

    unknown = sorted(set(raw) - set(SEARCH_SPACE_KEYS))
    if unknown:
        raise fail(f"unknown key(s) {', '.join(unknown)}; valid: {', '.join(SEARCH_SPACE_KEYS)}")
    base = raw.get("base") or {}
    if raw.get("base_config"):
        base = apply_overrides(load_yaml(path.parent / raw["base_config"]), _flatten(base))
    resources = raw.get("trial_resources") or {}
    bad = sorted(set(resources) - set(TRIAL_RESOURCE_KEYS))
    if bad:
        raise fail(
            f"unknown trial_resources key(s) {', '.join(bad)}; valid: {', '.join(TRIAL_RESOURCE_KEYS)}"
        )
    base = apply_overrides(base, {f"scaling.{k}": v for k, v in resources.items()})
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
        raise fail("'grid' must map dotted config keys to non-empty lists")
    sample = raw.get("sample") or {}
    for key, spec in sample.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise fail(f"sample.{key} must be one of {{{', '.join(DISTRIBUTIONS)}: [args]}}")
        if key in grid:
            raise fail(f"{key} is both a grid axis and sampled")
    given = dict(parse_override(item) for item in overrides or [])
    placed = _place_overrides(base, grid, sample, given, fail)
    search = raw.get("search") or {}
    algorithm = search.get("algorithm", "random")
    if algorithm not in ALGORITHMS:
        raise fail(f"unknown search.algorithm {algorithm!r}; valid: {', '.join(ALGORITHMS)}")
    scheduler = {"name": "fifo", **(raw.get("scheduler") or {})}
    if scheduler["name"] not in SCHEDULERS:
        raise fail(f"unknown scheduler.name {scheduler['name']!r}; valid: {', '.join(SCHEDULERS)}")
    space = SearchSpace(
        name=str(raw.get("name") or path.stem),
        base=placed.base,
        grid=placed.grid,
        sample=sample,
        num_samples=int(raw.get("num_samples", 1)),
        algorithm=algorithm,
        metric=str(search.get("metric", "val/roc_auc")),
        mode=str(search.get("mode", "max")),
        scheduler=scheduler,
        max_concurrent_trials=raw.get("max_concurrent_trials"),
        max_failures=int(raw.get("max_failures", 1)),
        source=str(path),
        description=str(raw.get("description", "")),
        override_notes=tuple(placed.notes),
    )
    _check_cells(space, placed, base, fail)
    return space


@dataclass
class _Placed:
    """Where command-line overrides went: the new base and grid, one note per override, and for each grid
    axis whose values had overrides set inside them, those overrides and the axis's values before them."""

    base: dict[str, Any]
    grid: dict[str, list[Any]]
    given: list[str] = field(default_factory=list)  # `key=value`, as printed
    notes: list[str] = field(default_factory=list)
    inside: dict[str, list[str]] = field(default_factory=dict)
    pristine: dict[str, list[Any]] = field(default_factory=dict)


def _place_overrides(base, grid, sample, overrides: dict[str, Any], fail) -> _Placed:
    """Apply overrides to a search space by the rules in the module docstring."""
    placed = _Placed(base=base, grid=dict(grid))
    grid = placed.grid
    for key, value in overrides.items():
        shown = f"override {key}={_short(value)}"
        placed.given.append(f"{key}={_short(value)}")
        for sampled, spec in sample.items():
            if _nested(key, sampled):
                kind, args = next(iter(spec.items()))
                raise fail(
                    f"{shown}: {sampled} is sampled ({kind}{args}) and an override cannot pin a sampled key; "
                    f"to fix it, move {sampled} from sample: to base: (or to grid:) in the search space"
                )
        if key in grid:
            placed.notes.append(
                f"{shown} replaces grid axis {key} {_short_list(grid[key])} -> [{_short(value)}]"
            )
            grid[key] = [value]
            placed.inside.pop(key, None)
            placed.pristine.pop(key, None)
            continue
        outer = [axis for axis in grid if key.startswith(axis + ".")]
        for axis in outer:
            sections = [v for v in grid[axis] if isinstance(v, dict)]
            if len(sections) != len(grid[axis]):
                raise fail(
                    f"{shown}: the values of grid axis {axis} are not sections: {_short_list(grid[axis])}"
                )
            placed.pristine.setdefault(axis, grid[axis])
            placed.inside.setdefault(axis, []).append(shown.removeprefix("override "))
            grid[axis] = [apply_overrides(v, {key[len(axis) + 1 :]: value}) for v in grid[axis]]
            placed.notes.append(
                f"{shown} is set in every value of grid axis {axis} {_short_list(grid[axis])}"
            )
        if outer:
            continue
        held = [axis for axis in grid if axis.startswith(key + ".")]
        if held and not isinstance(value, dict):
            raise fail(f"{shown}: {key} is a section holding grid axis {held[0]}; override {held[0]} instead")
        placed.base = apply_overrides(placed.base, {key: value})
        for axis in held:
            found, axis_value = _lookup(value, axis[len(key) + 1 :])
            if found:
                placed.notes.append(
                    f"{shown} replaces grid axis {axis} {_short_list(grid[axis])} -> [{_short(axis_value)}]"
                )
                grid[axis] = [axis_value]
            else:
                placed.notes.append(f"{shown} sets the base section {key}; grid axis {axis} varies inside it")
        if not held:
            placed.notes.append(f"{shown} sets the base config of every trial")
    return placed


def _check_cells(space: SearchSpace, placed: _Placed, base_before: dict[str, Any], fail) -> None:
    """Every cell must make a valid config. A cell that only an override set inside a whole-section grid value
    made invalid is blamed on that override, naming the axis values it broke; one that is valid without the
    overrides of the base (`base_before`) names those."""
    from semimed.experiment import check_config

    probe = {key: _example_value(spec) for key, spec in space.sample.items()}

    def error(cell: dict[str, Any], base: dict[str, Any] | None = None) -> str | None:
        try:
            check_config(space.trial_config({**cell, **probe}, base))
        except SemimedError as exc:
            return str(exc)
        return None

    axes = list(space.grid)
    broken: dict[str, dict[str, str]] = {}  # axis -> {value label: error}
    for index in itertools.product(*(range(len(space.grid[a])) for a in axes)):
        cell = {a: space.grid[a][i] for a, i in zip(axes, index, strict=True)}
        message = error(cell)
        if message is None:
            continue
        before = {a: placed.pristine.get(a, space.grid[a])[i] for a, i in zip(axes, index, strict=True)}
        blamed = [a for a in placed.inside if error({**before, a: cell[a]}) is not None]
        if blamed and error(before) is None:
            for axis in blamed:
                broken.setdefault(axis, {}).setdefault(_short(cell[axis]), message)
            continue
        if placed.given and error(before, base_before) is None:
            raise fail(f"with override(s) {', '.join(placed.given)}, trial {trial_label(cell)}: {message}")
        raise fail(message)  # invalid without the overrides too: a problem of the search space itself
    if broken:
        axis, values = next(iter(broken.items()))
        raise fail(
            f"override {', '.join(placed.inside[axis])} is set in every value of grid axis {axis} and makes "
            f"{', '.join(values)} invalid ({next(iter(values.values()))}); to change only some entries, edit "
            f"them under grid: {axis} in the search space and leave the override out"
        )


def _nested(a: str, b: str) -> bool:
    """Whether dotted keys `a` and `b` are the same key or one holds the other."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _lookup(values: Any, dotted: str) -> tuple[bool, Any]:
    for part in dotted.split("."):
        if not isinstance(values, dict) or part not in values:
            return False, None
        values = values[part]
    return True, values


def _example_value(spec: dict[str, list[Any]]) -> Any:
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        return (args[0] if isinstance(args[0], list) else args)[0]
    return type(args[0])(args[0]) if kind == "randint" else float(args[0])


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and key != "params":
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def trial_label(overrides: dict[str, Any]) -> str:
    """`method.name=fixmatch, data.fraction=0.05` -> `method=fixmatch,fraction=0.05` (a folder-safe name)."""

    def short(key: str) -> str:
        parts = key.split(".")
        return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]

    pairs = [f"{short(k)}={_short(v)}" for k, v in overrides.items()]
    return ",".join(pairs).replace("/", "_").replace(" ", "")


def _short(value: Any) -> str:
    """A grid value as one short word: floats to 3 digits, a whole section by its name."""
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):  # a whole section as one grid value, e.g. {name: fixmatch, params: {...}}
        return str(value.get("name", "+".join(f"{k}={_short(x)}" for k, x in value.items())))
    return str(value)


def _short_list(values: list[Any]) -> str:
    return f"[{', '.join(_short(v) for v in values)}]"


def resolve_storage(storage: str | None) -> str:
    storage = storage or os.environ.get("SEMIMED_STORAGE", DEFAULT_STORAGE)
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def default_concurrency(space: SearchSpace) -> int:
    """As many trials as the cluster's CPUs (or GPUs) fit, given each trial's workers."""
    cfg = space.trial_config(space.cells[0] if space.cells else {})
    resources = ray.cluster_resources()
    if cfg.scaling.use_gpu:
        per_trial = max(1, cfg.scaling.num_workers) * cfg.scaling.gpus_per_worker
        return max(1, int(resources.get("GPU", 0) // per_trial))
    # Physical cores, not the padded logical count (init_ray pads to 4): CPU trials compete for real cores.
    # Each trial also holds TRIAL_CPU for its driver, which must fit beside its workers' CPUs.
    cores = resources.get("CPU", 1)
    per_trial = max(1, cfg.scaling.num_workers) * cfg.scaling.cpus_per_worker
    driver = TRIAL_CPU if cfg.scaling.num_workers > 0 else 0.0
    if len(ray.nodes()) <= 1:
        return max(1, min(int(cores // (per_trial + driver)), int((os.cpu_count() or 1) // per_trial)))
    return max(1, int(cores // (per_trial + driver)))


def _make_trainable(space: SearchSpace, experiment_dir: str):
    keys = list(space.grid) + list(space.sample)

    def semimed_trial(params: dict[str, Any]) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        from semimed.train import build_trainer

        context = tune.get_context()
        overrides = {k: params[k] for k in keys}
        cfg = space.trial_config(overrides)
        trial_name = f"{trial_label(overrides)}_{context.get_trial_id()}"
        local = "://" not in experiment_dir
        run_dir = Path(experiment_dir if local else os.environ.get("TMPDIR", "/tmp")) / "runs" / trial_name
        if cfg.scaling.num_workers == 0:
            _run_in_process(cfg, run_dir)
            return
        trainer = build_trainer(
            cfg,
            run_dir,
            storage_path=f"{experiment_dir}/train",
            # Derived from the trial id, never a timestamp: a retried or restored trial finds its checkpoints.
            run_name=f"train-{context.get_trial_id()}",
            callbacks=[TuneReportCallback()],
            show_progress=False,
        )
        trainer.fit()

    return semimed_trial


def _run_in_process(cfg, run_dir: Path) -> None:
    """`scaling.num_workers: 0`: the trial trains in its own process, without a Ray Train worker group.

    Measured here (scripts/bench_ray.py), a 1-worker TorchTrainer costs ~10-15 s per trial to start; short CPU
    trials (the demo, MedMNIST studies) pay that for every trial, long GPU or DDP trials do not notice it.
    Checkpoints and resume go through Tune instead of Train.
    """
    import torch

    from semimed.experiment import run_training
    from semimed.train import summary_metrics

    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    # Which process trains this trial (each retry writes its own): for operators, and the test that kills it.
    pid_dir = run_dir / "workers"
    pid_dir.mkdir(parents=True, exist_ok=True)
    (pid_dir / "trial.pid").write_text(str(os.getpid()))

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(summary_metrics(metrics), checkpoint=checkpoint)

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        run_training(cfg, run_dir, report=report, show_progress=False)
        return
    with checkpoint.as_directory() as resume_dir:
        run_training(cfg, run_dir, report=report, resume_from=resume_dir, show_progress=False)


class TrialProcessKilled(RayActorError):
    """A trial's process was ended by Ray (its memory monitor), not by an error in the trial's code."""


def _retry_trials_killed_by_ray() -> None:
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


def _trial_resources(space: SearchSpace) -> dict[str, float]:
    """What one trial reserves: a sliver for a TorchTrainer's driver, or the whole run when in-process."""
    scaling = space.trial_config(space.cells[0] if space.cells else {}).scaling
    if scaling.num_workers > 0:
        return {"CPU": TRIAL_CPU}
    return {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})}


def _scheduler(space: SearchSpace):
    if space.scheduler["name"] == "fifo":
        return None
    options = {k: v for k, v in space.scheduler.items() if k != "name"}
    return tune.schedulers.ASHAScheduler(metric=space.metric, mode=space.mode, **options)


def _searcher(space: SearchSpace):
    if space.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=space.metric, mode=space.mode)
    if space.algorithm == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(metric=space.metric, mode=space.mode)
    return None


def build_tuners(space: SearchSpace, storage: str | None = None, resume: bool = False) -> list[tune.Tuner]:
    """One Tuner for grid + random search; one per grid cell (outer grid) for Optuna/HyperOpt."""
    # Tune pre-reserves placement groups for up to 200 *pending* trials; on a small machine those reservations
    # take the CPUs that the running trials' Train workers need, and every worker group start times out.
    # One staged trial is enough to keep the next trial ready.
    os.environ.setdefault("TUNE_MAX_PENDING_TRIALS_PG", "1")
    _retry_trials_killed_by_ray()
    storage = resolve_storage(storage)
    experiment_dir = f"{storage.rstrip('/')}/{space.name}"
    trainable = tune.with_resources(_make_trainable(space, experiment_dir), _trial_resources(space))
    concurrency = space.max_concurrent_trials or default_concurrency(space)
    if space.algorithm == "random":
        parts = [(space.name, storage, {key: tune.grid_search(values) for key, values in space.grid.items()})]
    else:  # outer grid: each cell a search of its own
        parts = [
            (f"search-{i:03d}_{trial_label(cell)}", experiment_dir, dict(cell))
            for i, cell in enumerate(space.cells)
        ]
    tuners = []
    for name, storage_path, param_space in parts:
        param_space = {**param_space, **space.sampled_space()}
        path = f"{storage_path.rstrip('/')}/{name}"
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
                    max_concurrent_trials=concurrency,
                    num_samples=space.num_samples,
                    search_alg=_searcher(space),
                    scheduler=_scheduler(space),
                    **(
                        {"metric": space.metric, "mode": space.mode}
                        if space.algorithm == "random" and space.scheduler["name"] != "fifo"
                        else {}
                    ),
                ),
                run_config=tune.RunConfig(
                    name=name,
                    storage_path=storage_path,
                    failure_config=tune.FailureConfig(max_failures=space.max_failures),
                ),
            )
        )
    return tuners


def describe_trials(space: SearchSpace) -> list[str]:
    """One line per trial with its resources (what `--dry-run` prints)."""
    sampled = ", ".join(
        f"{k}~{kind}{args}" for k, spec in space.sample.items() for kind, args in spec.items()
    )
    lines = []
    for i, cell in enumerate(space.trials or [{}]):
        cfg = space.trial_config(cell) if not space.sample else None
        cfg = cfg or space.trial_config({**cell, **{k: _example_value(v) for k, v in space.sample.items()}})
        s = cfg.scaling
        gpus = f", {s.gpus_per_worker:g} GPU" if s.use_gpu else ""
        extra = f"; sampled {sampled}" if sampled else ""
        workers = f"{s.num_workers} Ray Train worker(s)" if s.num_workers else "in-process (no Train workers)"
        lines.append(
            f"{i:3d}  {trial_label(cell) or '(base)'}  [{workers} × {s.cpus_per_worker:g} CPU{gpus}; "
            f"{cfg.train.steps} steps; method {cfg.method.name}{extra}]"
        )
    return lines


def run_sweep(space: SearchSpace, storage: str | None = None, resume: bool = False) -> str:
    """Run (or resume) the sweep; returns the experiment directory.

    Trials that failed after their retries are listed (how many, which, their first error line); the sweep
    raises only when every trial failed."""
    results = []
    for tuner in build_tuners(space, storage, resume):
        results.extend(tuner.fit())
    errors = [r for r in results if r.error]
    if errors and len(errors) == len(results):
        raise SemimedError(f"all {len(results)} trials failed; first error: {_error_line(errors[0].error)}")
    if errors:
        print(f"{len(errors)} of {len(results)} trials errored (the others finished):")
        print("\n".join(f"  {line}" for line in errored_trials(space, errors)))
    return f"{resolve_storage(storage).rstrip('/')}/{space.name}"


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
