"""Search-space YAML -> a validated `SearchSpace` (the format is in the docstring of semimed/tune/__init__.py).

Everything that can be checked without Ray running is checked here, so that `--dry-run` and a typo fail before
anything starts: keys, distributions, every grid cell's config, the searcher and scheduler and the metric they
read, and whether an optional searcher is installed.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune

from semimed.config import apply_overrides, config_from_dict, load_yaml, parse_override
from semimed.errors import SemimedError
from semimed.optional import missing
from semimed.tune.overrides import check_cells, flatten, place_overrides

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
# Searchers that are optional extras: algorithm -> (module to import, the extra that installs it); checked when
# the search space loads, before anything runs.
OPTIONAL_SEARCHERS = {"optuna": ("optuna", "optuna"), "hyperopt": ("hyperopt", "hyperopt")}
SCHEDULERS = ("fifo", "asha")
ASHA_OPTIONS = ("grace_period", "reduction_factor", "max_t")
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

    @property
    def uses_metric(self) -> bool:
        """Whether a searcher or scheduler reads `metric` (plain grid/random search with FIFO does not)."""
        return self.algorithm != "random" or self.scheduler["name"] != "fifo"

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


def _experiment_name(name: str, fail) -> str:
    """The experiment's folder under --storage: one folder name (`name: ../x` would write elsewhere)."""
    from semimed.runs import check_name

    try:
        return check_name(name, "name")
    except SemimedError as exc:
        raise fail(str(exc)) from None


def load_search_space(path: str | Path, overrides: list[str] | None = None) -> SearchSpace:
    """Parse and validate a search space: every grid cell must make a valid config (typos fail here).

    `overrides` (`key=value` strings) are placed by the rules in the docstring of semimed/tune/__init__.py."""
    path = Path(path)
    raw = load_yaml(path)

    def fail(message: str) -> SemimedError:
        return SemimedError(f"{path}: {message}")

    unknown = sorted(set(raw) - set(SEARCH_SPACE_KEYS))
    if unknown:
        raise fail(f"unknown key(s) {', '.join(unknown)}; valid: {', '.join(SEARCH_SPACE_KEYS)}")
    base = raw.get("base") or {}
    if raw.get("base_config"):
        base = apply_overrides(load_yaml(path.parent / raw["base_config"]), flatten(base))
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
    placed = place_overrides(base, grid, sample, given, fail)
    search = raw.get("search") or {}
    algorithm = search.get("algorithm", "random")
    if algorithm not in ALGORITHMS:
        raise fail(f"unknown search.algorithm {algorithm!r}; valid: {', '.join(ALGORITHMS)}")
    scheduler = {"name": "fifo", **(raw.get("scheduler") or {})}
    if scheduler["name"] not in SCHEDULERS:
        raise fail(f"unknown scheduler.name {scheduler['name']!r}; valid: {', '.join(SCHEDULERS)}")
    space = SearchSpace(
        name=_experiment_name(str(raw.get("name") or path.stem), fail),
        base=placed.base,
        grid=placed.grid,
        sample=sample,
        num_samples=int(raw.get("num_samples", 1)),
        algorithm=algorithm,
        metric=str(search.get("metric", "val/roc_auc")),
        mode=str(search.get("mode", "max")),
        scheduler=scheduler,
        max_concurrent_trials=_positive(raw.get("max_concurrent_trials"), "max_concurrent_trials", fail),
        max_failures=int(raw.get("max_failures", 1)),
        source=str(path),
        description=str(raw.get("description", "")),
        override_notes=tuple(placed.notes),
    )
    check_cells(space, placed, base, fail)
    _check_search(space, fail)
    return space


def _positive(value: Any, key: str, fail) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise fail(f"{key} must be a whole number >= 1, not {value!r}")
    return value


def _check_search(space: SearchSpace, fail) -> None:
    """The searcher is installed; the metric a searcher or scheduler reads is one every result carries; the
    scheduler's options are known numbers."""
    if space.algorithm in OPTIONAL_SEARCHERS:
        module, extra = OPTIONAL_SEARCHERS[space.algorithm]
        if importlib.util.find_spec(module) is None:
            raise fail(missing(f"search.algorithm {space.algorithm}", module, extra))
    if space.mode not in ("max", "min"):
        raise fail(f"search.mode must be max or min, not {space.mode!r}")
    options = {k: v for k, v in space.scheduler.items() if k != "name"}
    if space.scheduler["name"] == "fifo" and options:
        raise fail(f"scheduler fifo takes no options ({', '.join(options)})")
    if space.scheduler["name"] == "asha":
        unknown = sorted(set(options) - set(ASHA_OPTIONS))
        if unknown:
            raise fail(f"unknown scheduler option(s) {', '.join(unknown)}; valid: {', '.join(ASHA_OPTIONS)}")
        for key, value in options.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise fail(f"scheduler.{key} must be a number > 0, not {value!r}")
    if space.uses_metric:
        _check_metric(space, fail)


def _check_metric(space: SearchSpace, fail) -> None:
    from semimed.metrics import metric_names

    kind, _, name = space.metric.partition("/")
    if kind == "test":
        raise fail(
            f"search.metric {space.metric}: hyperparameters chosen on the test set make its numbers optimistic; "
            f"use val/{name}"
        )
    if space.metric != "train/loss" and (kind != "val" or name not in metric_names()):
        raise fail(
            f"search.metric {space.metric!r} is not reported during training; valid: train/loss or val/<metric> "
            f"with <metric> one of {', '.join(metric_names())}"
        )
    if kind == "val":
        for cell in space.cells or [{}]:
            if space.trial_config(cell).data.val_policy == "none":
                raise fail(
                    f"search.metric {space.metric} needs a validation set, but data.val_policy is none"
                    + (f" for trial {cell}" if cell else "")
                )
