"""Your own images listed in one manifest table (`csv`): a `.csv`, `.csv.gz` or `.parquet` file, one row per image.

data.root is the manifest FILE; `image_root` ("" = the manifest's folder; relative = to that folder) is where the
path column's paths are resolved, and no path may leave it (no `..`, no absolute path). Columns, all options:

- `path_column` (path): the image's path under image_root; empty or listed twice is an error;
- labels, one of: `label_column` (label), one class name per row (class names = its distinct values, sorted as
  text); `label_columns`, a list of 0/1 columns, one per finding, in that order (blank = unknown: NaN); `labels_separator` (e.g. "|") with label_column holding `A|B` (the classes are the
  union of the names; an empty cell is "no finding": all 0);
- `patient_column` (patient_id), `split_column` (split: train, val, valid, validation or test) and
  `site_column` (site, kept in meta): used when the file has them. An option set to another name must name a
  column that exists; set to "" it is ignored even where the column exists.

Every error is one line naming the file, the row and the column: "line N" of a CSV (the header is line 1), "row N"
(1-based) of a Parquet file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from semimed.data.base import LabeledImageSet, safe_relative_path
from semimed.data.imagefolder import (
    NO_PATIENT_NOTE,
    SPLIT_NAMES,
    check_split,
    image_channels,
    obvious_positive,
)
from semimed.data.spec import DatasetSpec, no_release, option, register_dataset
from semimed.errors import SemimedError

SUFFIXES = (".csv", ".csv.gz", ".parquet")
_ZERO, _ONE = frozenset({"0", "0.0", "false"}), frozenset({"1", "1.0", "true"})


def read_manifest(path: Path) -> tuple[pd.DataFrame, str]:
    """(the table with every cell as stripped text, "" for blank; "line" or "row": how rows are named)."""
    name = path.name.lower()
    if not name.endswith(SUFFIXES):
        raise SemimedError(f"{path}: a manifest is a {', '.join(SUFFIXES)} file")
    try:
        if name.endswith(".parquet"):
            table, unit = pd.read_parquet(path), "row"
        else:
            table = pd.read_csv(path, dtype=str, keep_default_na=False, index_col=False)
            unit = "line"
    except FileNotFoundError:
        raise SemimedError(f"{path}: manifest not found") from None
    except Exception as exc:  # pandas/pyarrow raise many types for a bad file; each means "unreadable"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SemimedError(f"{path}: cannot read the manifest ({reason})") from None
    if table.empty:
        raise SemimedError(f"{path}: the manifest has no rows")
    # A CSV read as text needs only stripping; Parquet cells are typed (ints, floats with NaN gaps, None).
    return table.apply(lambda column: column.str.strip()) if unit == "line" else table.apply(_text), unit


def _text(column: pd.Series) -> pd.Series:
    """Cells as text: None/NaN/NA -> "", 3.0 -> "3" (a Parquet integer column with gaps may be float)."""

    def one(value: object) -> str:
        if np.ndim(value) == 0 and pd.isna(value):
            return ""
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value).strip()

    return column.map(one).astype(object)


def _optional(table: pd.DataFrame, name: str, default: str, where: str) -> str | None:
    """The column an optional-column option names, or None: "" = not used; the default name may be absent."""
    if not name or (name == default and name not in table.columns):
        return None
    if name not in table.columns:
        raise SemimedError(f"{where}: no column {name!r} (columns: {', '.join(map(str, table.columns))})")
    return name


def _binary_matrix(table: pd.DataFrame, columns: list[str], row) -> np.ndarray:
    """0/1 label columns -> float32 [N, K]; blank -> NaN (unknown); anything else is an error naming the cell."""
    matrix = np.full((len(table), len(columns)), np.nan, dtype=np.float32)
    for k, column in enumerate(columns):
        values = table[column].str.lower()
        bad = ~values.isin(_ZERO | _ONE | {""})
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise SemimedError(
                f"{row(i)}, column {column!r}: {table[column].iat[i]!r} is not 0, 1 or blank (unknown)"
            )
        matrix[values.isin(_ZERO).to_numpy(), k] = 0.0
        matrix[values.isin(_ONE).to_numpy(), k] = 1.0
    return matrix


def _check_spellings(classes: list[str], first_row: Callable[[str], int], row, column: str) -> None:
    """Refuse two class names that differ only in letter case (`Malignant`, `malignant`): almost surely one
    class typed two ways, which would otherwise silently become two classes (a 3-class task, or a split refused
    for a class of a few images)."""
    first: dict[str, str] = {}
    for name in classes:
        other = first.setdefault(name.casefold(), name)
        if other != name:
            # Name the spelling met later, at its first row, against the earlier one's first row.
            (early, early_name), (late, late_name) = sorted(
                [(first_row(other), other), (first_row(name), name)]
            )
            raise SemimedError(
                f"{row(late)}, column {column!r}: label {late_name!r} differs from {early_name!r} ({row(early)}) "
                "only in letter case; spell each class one way"
            )


def _labels(table: pd.DataFrame, options: ManifestOptions, path: Path, row) -> tuple[list[str], np.ndarray]:
    """(classes, labels): int64 [N] for one label column, float32 [N, K] for the multi-label forms."""
    if options.label_columns and options.labels_separator:
        raise SemimedError("csv: set one of data.options.label_columns and labels_separator, not both")
    if options.label_columns:
        columns = list(options.label_columns)
        if len(columns) < 2 or len(set(columns)) != len(columns):
            raise SemimedError(
                f"data.options.label_columns {columns}: needs two or more distinct columns (one: use label_column)"
            )
        absent = [c for c in columns if c not in table.columns]
        if absent:
            raise SemimedError(f"{path}: no column {absent[0]!r} (data.options.label_columns)")
        return columns, _binary_matrix(table, columns, row)
    column = options.label_column
    if column not in table.columns:
        raise SemimedError(f"{path}: no column {column!r} (data.options.label_column)")
    values = table[column]
    if options.labels_separator:
        parts = [
            [name.strip() for name in text.split(options.labels_separator)] if text else [] for text in values
        ]
        for i, names in enumerate(parts):
            if "" in names:
                raise SemimedError(f"{row(i)}, column {column!r}: empty class name in {values.iat[i]!r}")
        classes = sorted({name for names in parts for name in names})
        _check_spellings(
            classes, lambda name: next(i for i, names in enumerate(parts) if name in names), row, column
        )
        if len(classes) < 2:
            raise SemimedError(
                f"{path}, column {column!r}: {len(classes)} class name(s) in all rows; need 2+"
            )
        index = {name: k for k, name in enumerate(classes)}
        matrix = np.zeros((len(table), len(classes)), dtype=np.float32)
        for i, names in enumerate(parts):
            matrix[i, [index[name] for name in names]] = 1.0
        return classes, matrix
    blank = (values == "").to_numpy()
    if blank.any():
        raise SemimedError(f"{row(int(np.flatnonzero(blank)[0]))}, column {column!r}: empty label")
    classes = sorted(set(values))
    _check_spellings(classes, lambda name: int(np.flatnonzero((values == name).to_numpy())[0]), row, column)
    if len(classes) < 2:
        raise SemimedError(
            f"{path}, column {column!r}: one class only ({classes[0]!r}); a classifier needs two"
        )
    return classes, values.map({name: k for k, name in enumerate(classes)}).to_numpy(np.int64)


def load_manifest(root: str | Path, options: ManifestOptions | None = None) -> LabeledImageSet:
    """Index the images a manifest lists (metadata only; pixels are read lazily)."""
    options = options or ManifestOptions()
    path = Path(root).expanduser().resolve()
    if path.is_dir():
        raise SemimedError(
            f"{path}: is a folder; data.root for csv is the manifest file (.csv, .csv.gz, .parquet)"
        )
    table, unit = read_manifest(path)
    image_root = (path.parent / Path(options.image_root).expanduser()).resolve()
    if not image_root.is_dir():
        raise SemimedError(f"{image_root}: data.options.image_root is not a folder")

    def row(i: int) -> str:
        return f"{path} {unit} {i + 2 if unit == 'line' else i + 1}"

    column = options.path_column
    if column not in table.columns:
        raise SemimedError(f"{path}: no column {column!r} (data.options.path_column)")
    paths, first = [], {}
    for i, name in enumerate(table[column]):
        if not name:
            raise SemimedError(f"{row(i)}, column {column!r}: empty path")
        relative = safe_relative_path(image_root, name, f"{row(i)}, column {column!r}")
        if relative in first:
            raise SemimedError(
                f"{row(i)}, column {column!r}: path {relative!r} is also on {row(first[relative])}"
            )
        if not (image_root / relative).is_file():
            raise SemimedError(
                f"{row(i)}, column {column!r}: image {relative!r} not found under {image_root}"
            )
        first[relative] = i
        paths.append(relative)
    classes, labels = _labels(table, options, path, row)
    meta = pd.DataFrame({"path": paths})
    notes = []
    patient = _optional(table, options.patient_column, "patient_id", f"{path} (data.options.patient_column)")
    if patient is None:
        meta["patient_id"] = paths
        notes.append(f"{NO_PATIENT_NOTE}; give the manifest a patient column if images share patients")
    else:
        blank = (table[patient] == "").to_numpy()
        if blank.any():
            raise SemimedError(f"{row(int(np.flatnonzero(blank)[0]))}, column {patient!r}: empty patient id")
        meta["patient_id"] = table[patient].to_numpy()
        notes.append(f"patient ids: column {patient!r}")
    site = _optional(table, options.site_column, "site", f"{path} (data.options.site_column)")
    if site is not None:
        meta["site"] = table[site].to_numpy()
    official = None
    split = _optional(table, options.split_column, "split", f"{path} (data.options.split_column)")
    if split is not None:
        values = table[split].str.lower()
        bad = ~values.isin(list(SPLIT_NAMES))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise SemimedError(
                f"{row(i)}, column {split!r}: unknown split {table[split].iat[i]!r} (valid: {', '.join(SPLIT_NAMES)})"
            )
        official = values.map(SPLIT_NAMES).to_numpy().astype(str)
        fix = f"fix column {split!r}, or set data.options.split_column='' to draw a patient-disjoint split"
        check_split(
            official, meta["patient_id"].to_numpy(), [row(i) for i in range(len(meta))], str(path), fix
        )
        meta["official_split"] = official
        notes.append(f"split: column {split!r} (as given)")
    channels, channel_note = image_channels(options.channels, image_root / paths[0], str(path))
    meta.attrs["channels"] = channels
    multilabel = labels.ndim == 2
    positive = None if multilabel else obvious_positive(classes)
    kind = "multi-label" if multilabel else "single-label"
    notes = [f"classes ({kind}): {', '.join(classes)}", *notes, channel_note]
    if positive is not None:
        notes.append(
            f"default positive class: {positive} (the other name says negative; data.positive_class)"
        )
    return LabeledImageSet(
        name="csv",
        task="default",
        root=image_root,
        classes=classes,
        multilabel=multilabel,
        labels=labels,
        meta=meta,
        official_split=official,
        notes=notes,
        positive_class=positive,
    )


# ------------------------------------------------------------------------------------------------ registration


@dataclass(frozen=True)
class ManifestOptions:
    image_root: str = option("", "folder the path column is relative to ('' = the manifest's folder)")
    path_column: str = option("path", "column of image paths, relative to image_root")
    label_column: str = option("label", "column of class names (or of 'A|B' lists with labels_separator)")
    label_columns: list[str] = option(
        [], "multi-label: the 0/1 columns, one per finding (blank cell = unknown)"
    )
    labels_separator: str = option("", "multi-label: label_column holds names joined by this (e.g. '|')")
    patient_column: str = option("patient_id", "column of patient ids ('' or absent: one image, one patient)")
    split_column: str = option("split", "column of train/val/test ('' or absent: semimed draws the split)")
    site_column: str = option("site", "column of acquisition sites, kept in the metadata ('' = none)")
    channels: int = option(0, "channels the model sees: 1, 3, or 0 = from the first image (grayscale: 1)")


def _load(root: Path, task: str, options: ManifestOptions) -> LabeledImageSet:
    return load_manifest(root, options)


SPEC = register_dataset(
    DatasetSpec(
        name="csv",
        description="your own images listed in a manifest (.csv, .csv.gz or .parquet): path, label(s), patient",
        root_help="the manifest file itself (.csv, .csv.gz, .parquet); images under data.options.image_root",
        options=ManifestOptions,
        tasks=("default",),
        default_task="default",
        task_help="from the options: label_column (single-label), label_columns or labels_separator (multi-label)",
        load=_load,
        release="your own data: no release totals",
        check_release=no_release,
        split_rule=(
            "the split column when the manifest has one (val carved from train when absent), else random "
            "patient-disjoint (data.test_fraction, data.val_fraction of patients; no patient ids: of images)"
        ),
        patient_level=False,
    )
)
