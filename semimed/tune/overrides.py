"""Command-line overrides of a search space: each `key=value` lands in exactly one place (the rules are in the
docstring of semimed/tune/__init__.py), and every grid cell must still make a valid config."""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Any

from semimed.config import apply_overrides
from semimed.errors import SemimedError


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


def place_overrides(base, grid, sample, overrides: dict[str, Any], fail) -> _Placed:
    """Apply overrides to a search space by the rules in the module docstring."""
    placed = _Placed(base=base, grid=dict(grid))
    grid = placed.grid
    for key, value in overrides.items():
        shown = f"override {key}={short(value)}"
        placed.given.append(f"{key}={short(value)}")
        for sampled, spec in sample.items():
            if _nested(key, sampled):
                kind, args = next(iter(spec.items()))
                raise fail(
                    f"{shown}: {sampled} is sampled ({kind}{args}) and an override cannot pin a sampled key; "
                    f"to fix it, move {sampled} from sample: to base: (or to grid:) in the search space"
                )
        if key in grid:
            placed.notes.append(
                f"{shown} replaces grid axis {key} {short_list(grid[key])} -> [{short(value)}]"
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
                    f"{shown}: the values of grid axis {axis} are not sections: {short_list(grid[axis])}"
                )
            placed.pristine.setdefault(axis, grid[axis])
            placed.inside.setdefault(axis, []).append(shown.removeprefix("override "))
            grid[axis] = [apply_overrides(v, {key[len(axis) + 1 :]: value}) for v in grid[axis]]
            placed.notes.append(f"{shown} is set in every value of grid axis {axis} {short_list(grid[axis])}")
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
                    f"{shown} replaces grid axis {axis} {short_list(grid[axis])} -> [{short(axis_value)}]"
                )
                grid[axis] = [axis_value]
            else:
                placed.notes.append(f"{shown} sets the base section {key}; grid axis {axis} varies inside it")
        if not held:
            placed.notes.append(f"{shown} sets the base config of every trial")
    return placed


def check_cells(space, placed: _Placed, base_before: dict[str, Any], fail) -> None:
    """Every cell must make a valid config. A cell that only an override set inside a whole-section grid value
    made invalid is blamed on that override, naming the axis values it broke; one that is valid without the
    overrides of the base (`base_before`) names those."""
    from semimed.experiment import check_config

    probe = {key: example_value(spec) for key, spec in space.sample.items()}

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
                broken.setdefault(axis, {}).setdefault(short(cell[axis]), message)
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


def example_value(spec: dict[str, list[Any]]) -> Any:
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        return (args[0] if isinstance(args[0], list) else args)[0]
    return type(args[0])(args[0]) if kind == "randint" else float(args[0])


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and key != "params":
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def trial_label(overrides: dict[str, Any]) -> str:
    """`method.name=fixmatch, data.fraction=0.05` -> `method=fixmatch,fraction=0.05` (a folder-safe name)."""

    def part(key: str) -> str:
        parts = key.split(".")
        return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]

    pairs = [f"{part(k)}={short(v)}" for k, v in overrides.items()]
    label = ",".join(pairs).replace("/", "_").replace(" ", "")
    # The label names each trial's run folder (`runs/<label>_<trial id>`) and an outer-grid search's folder: a
    # grid of whole data sections (root, cache_dir, options) or of long roots gave a name over the file system's
    # 255 bytes, and every such trial failed with "File name too long". Cut, with a digest of the whole label
    # so that two long labels that share their start stay apart.
    if len(label.encode()) <= MAX_LABEL_BYTES:
        return label
    digest = hashlib.sha256(label.encode()).hexdigest()[:10]
    head = label.encode()[: MAX_LABEL_BYTES - len(digest) - 1].decode(errors="ignore")
    return f"{head}~{digest}"


MAX_LABEL_BYTES = 120  # + "_<trial id>" or "search-NNN_": well under NAME_MAX (255 bytes)


def short(value: Any) -> str:
    """A grid value as one short word: floats to 3 digits, a whole section by its name."""
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):  # a whole section as one grid value, e.g. {name: fixmatch, params: {...}}
        for key in ("name", "method"):  # a method section by its name, a pretrain section by its method
            if key in value:
                return str(value[key]) or "none"
        return "+".join(f"{k}={short(x)}" for k, x in value.items())
    return str(value)


def short_list(values: list[Any]) -> str:
    return f"[{', '.join(short(v) for v in values)}]"
