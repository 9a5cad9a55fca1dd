"""The dataset registry: what a dataset is, declared once, read by the config, the CLI, `prepare` and the report.

Each dataset module registers one `DatasetSpec` (timm's "one registry that tests iterate over"):

    BREAKHIS = register_dataset(DatasetSpec(name="breakhis", options=BreakHisOptions, tasks=("binary", …), …))

- `options` is a frozen dataclass of the loader's own settings. Every field says what it means in
  `metadata["help"]` and, where the set is closed, `metadata["choices"]` (the `option()` helper writes both).
  `data.options` in a config is checked against it (semimed.config), and `semimed split|prepare` turn each field
  into a flag (`--magnification`, `--drop-missing`), so adding a dataset never touches the config or the CLI.
  Field types: str, int, float, bool, or list[str] (a YAML list in a config; `--label-columns A,B` as a flag,
  and `data.options.label_columns=A,B` as an override: semimed.config splits a string at commas).
- `load(root, task, options) -> LabeledImageSet` parses metadata only; `task` is one of `tasks`.
- `check_release(dataset, options) -> (expected, missing)` compares a load with the full release (what
  `semimed prepare` reports): `expected` is {"images", "patients"} or None where the release is unknown.

A module adding a dataset: declare the options dataclass, the spec, and import the module in
`semimed/data/__init__.py`. Nothing else in semimed names datasets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semimed.data.base import LabeledImageSet
from semimed.registry import Registry

LoadFn = Callable[[str | Path, str, Any], LabeledImageSet]
# (expected {"images", "patients"} of the release filtered like the load, or None; lines naming what is missing)
CheckReleaseFn = Callable[[LabeledImageSet, Any], tuple[dict[str, int] | None, list[str]]]


def option(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A dataset option field: its default, a help text (the CLI flag's), and the closed set of values if any.

    `choices` uses the same metadata key as `semimed.config.choices`, so the config's closed-set check applies.
    A list default (a `list[str]` option: YAML list in a config, comma-separated as a flag) becomes a default
    factory, so no two option objects share one list.
    """
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class NoOptions:
    """For a dataset whose loader takes no settings."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str  # one line: what the files are
    root_help: str  # what data.root / --root points at
    options: type  # a frozen dataclass; each field made with option() (help, choices)
    tasks: tuple[str, ...]  # valid data.task values
    default_task: str  # what data.task "" means
    task_help: str  # one line: what each task is
    load: LoadFn
    release: str  # the expected release totals, one line (docs, `semimed prepare` output)
    check_release: CheckReleaseFn
    split_rule: str  # how train/val/test are formed, one line (docs, `semimed split` output)
    # Several images per patient and one label per image: patient-level accuracy (majority vote of a patient's
    # images, metrics.patient_accuracy) is a reported metric. False where each image is its own patient.
    patient_level: bool = False
    # Fetch a missing root (`semimed prepare --download`); returns the path written. None: not downloadable.
    fetch: Callable[[Path], Path] | None = None

    def __post_init__(self) -> None:
        # A mis-declared spec fails at import, not when a user first reaches for the option.
        if not dataclasses.is_dataclass(self.options) or not self.options.__dataclass_params__.frozen:
            raise TypeError(f"dataset {self.name!r}: options must be a frozen dataclass")
        for item in dataclasses.fields(self.options):
            if not item.metadata.get("help"):
                raise TypeError(
                    f"dataset {self.name!r}: option {item.name!r} has no help text (use option())"
                )
            if item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING:
                raise TypeError(f"dataset {self.name!r}: option {item.name!r} has no default")
        if not self.tasks or self.default_task not in self.tasks:
            raise TypeError(f"dataset {self.name!r}: default task {self.default_task!r} not in {self.tasks}")

    def option_fields(self) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(self.options)

    def default_options(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options())

    def make_options(self, values: dict[str, Any]) -> Any:
        """The options dataclass from a (validated, see semimed.config) `data.options` mapping."""
        return self.options(**values)


def no_release(dataset: LabeledImageSet, options: Any) -> tuple[None, list[str]]:
    """`check_release` of a user's own data: there is no published release to compare a load with."""
    return None, []


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Register `spec` under its name (registered objects are specs, not factories: `DATASETS.get(name)` is the
    spec itself)."""
    DATASETS.register(spec.name)(spec)  # type: ignore[arg-type]
    return spec
