"""Ray Tune adapter: a search-space YAML -> a Tuner whose trials each build and fit a TorchTrainer.

Search-space YAML (unknown top-level keys are errors):

    name: breakhis_label_fraction       # experiment name -> <storage>/<name>
    base: {data: {...}, train: {...}}   # a semimed config (or `base_config: path/to/config.yaml`)
    grid:                                # full factorial over dotted config keys (FIFO, every cell run)
      data.fraction: [0.01, 0.05, 0.1]
      seed: [0, 1, 2]
    max_concurrent_trials: 2             # optional; default derived from the cluster's resources
    max_failures: 1                      # Tune retries of a failed trial (it resumes from its checkpoint)

Each trial's files live in `<storage>/<name>/runs/<trial>/` (config, split, TensorBoard, metrics.json); Tune's
own event files and state live in `<storage>/<name>/` as usual, so `tensorboard --logdir <storage>/<name>`
shows both.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune

from semimed.config import apply_overrides, config_from_dict, load_yaml
from semimed.errors import SemimedError

SEARCH_SPACE_KEYS = ("name", "base", "base_config", "grid", "max_concurrent_trials", "max_failures", "description")
DEFAULT_STORAGE = "~/semimed_results"


@dataclass(frozen=True)
class SearchSpace:
    name: str
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    max_concurrent_trials: int | None = None
    max_failures: int = 1
    source: str = ""
    description: str = ""
    trials: list[dict[str, Any]] = field(default_factory=list)  # the grid, expanded

    def trial_config(self, overrides: dict[str, Any]):
        return config_from_dict(apply_overrides(self.base, overrides))


def load_search_space(path: str | Path, overrides: list[str] | None = None) -> SearchSpace:
    """Parse and validate a search space: every grid cell must make a valid config (typos fail here)."""
    from semimed.config import parse_override

    path = Path(path)
    raw = load_yaml(path)
    unknown = sorted(set(raw) - set(SEARCH_SPACE_KEYS))
    if unknown:
        raise SemimedError(f"{path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(SEARCH_SPACE_KEYS)}")
    base = raw.get("base") or {}
    if raw.get("base_config"):
        base = apply_overrides(load_yaml(path.parent / raw["base_config"]), _flatten(base))
    base = apply_overrides(base, dict(parse_override(item) for item in overrides or []))
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
        raise SemimedError(f"{path}: 'grid' must map dotted config keys to non-empty lists")
    keys = list(grid)
    trials = [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]
    space = SearchSpace(name=str(raw.get("name") or path.stem), base=base, grid=grid,
                        max_concurrent_trials=raw.get("max_concurrent_trials"),
                        max_failures=int(raw.get("max_failures", 1)), source=str(path),
                        description=str(raw.get("description", "")), trials=trials)
    for trial in trials or [{}]:
        try:
            space.trial_config(trial)
        except SemimedError as exc:
            raise SemimedError(f"{path}: {exc}") from None
    return space


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
    parts = [f"{k.split('.')[-1]}={v}" for k, v in overrides.items()]
    return ",".join(parts).replace("/", "_")


def resolve_storage(storage: str | None) -> str:
    storage = storage or os.environ.get("SEMIMED_STORAGE", DEFAULT_STORAGE)
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def default_concurrency(space: SearchSpace) -> int:
    """As many trials as the cluster's CPUs (or GPUs) fit, given each trial's workers."""
    cfg = space.trial_config(space.trials[0] if space.trials else {})
    resources = ray.cluster_resources()
    if cfg.scaling.use_gpu:
        per_trial = cfg.scaling.num_workers * cfg.scaling.gpus_per_worker
        return max(1, int(resources.get("GPU", 0) // per_trial))
    # Physical cores, not the padded logical count (init_ray pads to 4): CPU trials compete for real cores.
    cores = min(resources.get("CPU", 1), os.cpu_count() or 1) if _is_local() else resources.get("CPU", 1)
    return max(1, int(cores // (cfg.scaling.num_workers * cfg.scaling.cpus_per_worker)))


def _is_local() -> bool:
    return len(ray.nodes()) <= 1


def _make_trainable(space: SearchSpace, experiment_dir: str):
    def semimed_trial(params: dict[str, Any]) -> None:
        from ray.tune.integration.ray_train import TuneReportCallback

        from semimed.train import build_trainer

        context = tune.get_context()
        overrides = {k: params[k] for k in space.grid}
        cfg = space.trial_config(overrides)
        trial_name = f"{trial_label(overrides)}_{context.get_trial_id()}"
        run_dir = Path(experiment_dir) / "runs" / trial_name if "://" not in experiment_dir else None
        trainer = build_trainer(
            cfg,
            run_dir or Path(os.environ.get("TMPDIR", "/tmp")) / "semimed_runs" / trial_name,
            storage_path=f"{experiment_dir}/train",
            # Derived from the trial id, never a timestamp: a retried or restored trial finds its checkpoints.
            run_name=f"train-{context.get_trial_id()}",
            callbacks=[TuneReportCallback()],
            show_progress=False,
        )
        trainer.fit()

    return semimed_trial


def build_tuner(space: SearchSpace, storage: str | None = None, resume: bool = False) -> tune.Tuner:
    storage = resolve_storage(storage)
    experiment_dir = f"{storage.rstrip('/')}/{space.name}"
    # The trial function itself only waits on its TorchTrainer: reserve a sliver of a CPU, not a whole one.
    trainable = tune.with_resources(_make_trainable(space, experiment_dir), {"CPU": 0.5})
    param_space = {key: tune.grid_search(values) for key, values in space.grid.items()}
    if resume:
        if not tune.Tuner.can_restore(experiment_dir):
            raise SemimedError(f"{experiment_dir}: no experiment to resume")
        # Restoring unpickles the experiment state: only do it for a path you own (the user's own storage).
        return tune.Tuner.restore(experiment_dir, trainable, resume_unfinished=True, resume_errored=True,
                                  param_space=param_space)
    concurrency = space.max_concurrent_trials or default_concurrency(space)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, num_samples=1),
        run_config=tune.RunConfig(name=space.name, storage_path=storage,
                                  failure_config=tune.FailureConfig(max_failures=space.max_failures)),
    )


def describe_trials(space: SearchSpace) -> list[str]:
    """One line per trial with its resources (what `--dry-run` prints)."""
    lines = []
    for i, trial in enumerate(space.trials or [{}]):
        cfg = space.trial_config(trial)
        s = cfg.scaling
        gpus = f", {s.gpus_per_worker:g} GPU" if s.use_gpu else ""
        lines.append(f"{i:3d}  {trial_label(trial) or '(base)'}  [{s.num_workers} worker(s) × "
                     f"{s.cpus_per_worker:g} CPU{gpus}; {cfg.train.steps} steps; method {cfg.method.name}]")
    return lines


def run_sweep(space: SearchSpace, storage: str | None = None, resume: bool = False) -> Path | str:
    """Run (or resume) the sweep; returns the experiment directory."""
    tuner = build_tuner(space, storage, resume)
    results = tuner.fit()
    errors = [r for r in results if r.error]
    if errors and len(errors) == len(results):
        raise SemimedError(f"all {len(results)} trials failed; first error: {str(errors[0].error).splitlines()[0]}")
    return f"{resolve_storage(storage).rstrip('/')}/{space.name}"
