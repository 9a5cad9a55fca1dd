"""NIH ChestX-ray14 (Wang et al., CVPR 2017): the Data_Entry table, the official lists, images anywhere under root.

What the loader reads under `root` (one walk of the tree, at any depth):

- the metadata table: `Data_Entry_2017_v2020.csv(.gz)` or `Data_Entry_2017.csv(.gz)` (columns Image Index,
  Finding Labels, Follow-up #, Patient ID, Patient Age, Patient Gender, View Position, …). The shallowest copy
  wins; at equal depth v2020 (the relabelled release) is preferred over 2017, and a note says so;
- the official split: `test_list.txt` (the test set) and `train_val_list.txt` (the rest); val is carved from
  train_val BY PATIENT by `make_split`. test_list.txt is required: without it there is no official split, and a
  random image split is what the study protocol forbids for a dataset with up to ~180 follow-ups per patient;
- the images, found by FILE NAME: the NIH release unpacks to `images_001/images/…` … `images_012/images/…`,
  mirrors flatten it, and some keep their own folders (a 64-px copy under `NIH1000/{train,…}/{0_normal,…}/`).

Labels: the 14 findings in the fixed order of `FINDINGS` (the order of the NIH paper and of torchxrayvision /
MedMNIST's ChestMNIST): "No Finding" is all zeros; `labels` is float32 [N, 14] (1 present, 0 absent).

A name present more than once (the same image at several resolutions, e.g. 00000001_000.png at 1024, 512 and 128
px in the sample folder) resolves to the copy with the most pixels, read from the image header without decoding;
ties go to the first path in sorted order. The largest copy loses the least detail, and the cache resizes anyway.
A warning and a dataset note say how many names were resolved this way.

Rows whose image is not under root stop the load with the count and the first names, unless
`drop_missing=True`: then they are dropped with a warning, the count is in `dataset.notes` and in
`meta.attrs["missing_dropped"]` (the cache manifest records it).

This module stays one file (about 420 lines): every helper here serves `load_chestxray14` alone, and
semimed/data keeps one module per dataset, which registers itself when imported (semimed/data/__init__.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from semimed.data.base import LabeledImageSet, walk_files
from semimed.data.spec import DatasetSpec, option, register_dataset
from semimed.errors import SemimedError, SemimedWarning

FINDINGS: list[str] = [
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
]
NO_FINDING = "No Finding"
# Preference order among metadata files found at the same depth: v2020 fixed labels of the 2017 table.
METADATA_NAMES: tuple[str, ...] = (
    "Data_Entry_2017_v2020.csv",
    "Data_Entry_2017_v2020.csv.gz",
    "Data_Entry_2017.csv",
    "Data_Entry_2017.csv.gz",
)
TEST_LIST, TRAIN_VAL_LIST = "test_list.txt", "train_val_list.txt"
VIEWS = ("PA", "AP")
# The full release (what `semimed prepare` checks a tree against).
TOTAL_IMAGES, TOTAL_PATIENTS = 112_120, 30_805
# Per-finding image counts of Data_Entry_2017_v2020 (all 112,120 rows), as published with the release.
PUBLISHED_COUNTS: dict[str, int] = {
    "Atelectasis": 11_559,
    "Cardiomegaly": 2_776,
    "Effusion": 13_317,
    "Infiltration": 19_894,
    "Mass": 5_782,
    "Nodule": 6_331,
    "Pneumonia": 1_431,
    "Pneumothorax": 5_302,
    "Consolidation": 4_667,
    "Edema": 2_303,
    "Emphysema": 2_516,
    "Fibrosis": 1_686,
    "Pleural_Thickening": 3_385,
    "Hernia": 227,
    NO_FINDING: 60_361,
}
_REQUIRED = ("Image Index", "Finding Labels", "Patient ID", "View Position")
_OPTIONAL = {"Follow-up #": "follow_up", "Patient Age": "age", "Patient Gender": "gender"}
_EXAMPLES = 5  # names quoted in one-line messages


def _walk(root: Path) -> tuple[dict[str, list[str]], dict[str, list[tuple[int, str]]]]:
    """One walk of the tree: PNG file name -> relative paths, and metadata/list name -> (depth, relative path)."""
    wanted = set(METADATA_NAMES) | {TEST_LIST, TRAIN_VAL_LIST}
    images: dict[str, list[str]] = {}
    found: dict[str, list[tuple[int, str]]] = {}
    # Linked folders are followed when they stay inside root; hidden entries (.DS_Store, macOS "._" forks of
    # every PNG, our own cache staging) are never images.
    for path in walk_files(root, root, lambda name: name.lower().endswith(".png") or name in wanted):
        rel_path = path.relative_to(root)
        rel, name = rel_path.as_posix(), rel_path.name
        if name.lower().endswith(".png"):
            images.setdefault(name, []).append(rel)
        else:
            found.setdefault(name, []).append((len(rel_path.parts) - 1, rel))
    return images, found


def _shallowest(found: dict[str, list[tuple[int, str]]], name: str, root: Path) -> str | None:
    """The single shallowest copy of `name`; two at the same depth are ambiguous and refused."""
    copies = sorted(found.get(name, []))
    if not copies:
        return None
    top = [rel for depth, rel in copies if depth == copies[0][0]]
    if len(top) > 1:
        raise SemimedError(f"{root}: several {name} at the same depth ({', '.join(top)}); keep one")
    return top[0]


def find_metadata(root: Path, found: dict[str, list[tuple[int, str]]]) -> tuple[str, list[str]]:
    """(relative path of the Data_Entry table to use, notes)."""
    candidates = []
    for preference, name in enumerate(METADATA_NAMES):
        rel = _shallowest(found, name, root)
        if rel is not None:
            candidates.append((len(Path(rel).parts), preference, rel))
    if not candidates:
        raise SemimedError(
            f"{root}: no ChestX-ray14 metadata ({' or '.join(METADATA_NAMES)}) under this folder"
        )
    candidates.sort()
    notes = []
    if len(candidates) > 1:
        others = ", ".join(rel for *_, rel in candidates[1:])
        notes.append(f"metadata: using {candidates[0][2]} (also found: {others})")
    return candidates[0][2], notes


def _read_list(path: Path) -> pd.Index:
    names = path.read_text().split()
    index = pd.Index(names)
    if index.has_duplicates:
        raise SemimedError(f"{path}: {index[index.duplicated()][0]!r} is listed twice")
    return index


def read_metadata(path: Path) -> pd.DataFrame:
    """The Data_Entry table as a DataFrame with columns image_index, finding_labels, patient_id, view, …

    Every value is checked here, so a bad row stops the load with its line number instead of surfacing later.
    """
    try:
        # keep_default_na=False: an empty "Finding Labels" cell must stay "" and be reported, not become NaN.
        table = pd.read_csv(path, keep_default_na=False, index_col=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, EOFError) as exc:
        raise SemimedError(f"{path}: cannot read the metadata table ({str(exc).splitlines()[0]})") from None
    missing = [column for column in _REQUIRED if column not in table.columns]
    if missing:
        raise SemimedError(f"{path}: lacks column(s) {', '.join(map(repr, missing))}")
    out = pd.DataFrame(
        {
            "image_index": table["Image Index"].astype(str).str.strip(),
            "finding_labels": table["Finding Labels"].astype(str).str.strip(),
            "patient_id": table["Patient ID"],
            "view": table["View Position"].astype(str).str.strip().str.upper(),
        }
    )
    for column, name in _OPTIONAL.items():
        if column in table.columns:
            out[name] = table[column]

    def line(position: int) -> str:
        return _line(path, position)

    names = out["image_index"]
    # Image names are looked up by file name: a path separator or a dot-dot would reach outside the data root.
    bad = names.str.contains(r"[/\\]", regex=True) | names.isin(["", ".", ".."]) | names.str.startswith(".")
    if bad.any():
        first = int(np.flatnonzero(bad.to_numpy())[0])
        raise SemimedError(
            f"{line(first)}: image name {names.iat[first]!r} is not a plain file name "
            "(it would escape the data root)"
        )
    duplicated = names.duplicated()
    if duplicated.any():
        first = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise SemimedError(f"{line(first)}: image {names.iat[first]!r} appears twice in the table")
    patient = pd.to_numeric(out["patient_id"], errors="coerce")
    if patient.isna().any():
        first = int(np.flatnonzero(patient.isna().to_numpy())[0])
        raise SemimedError(f"{line(first)}: Patient ID {out['patient_id'].iat[first]!r} is not a number")
    out["patient_id"] = patient.astype(np.int64)
    bad_view = ~out["view"].isin(VIEWS)
    if bad_view.any():
        first = int(np.flatnonzero(bad_view.to_numpy())[0])
        raise SemimedError(f"{line(first)}: View Position {out['view'].iat[first]!r} is not PA or AP")
    if "age" in out:
        # The Kaggle sample writes ages as "060Y"; the release as 60.
        out["age"] = pd.to_numeric(out["age"].astype(str).str.rstrip("Yy"), errors="coerce")
    return out


def _line(path: Path, position: int) -> str:
    return f"{path} line {position + 2}"  # +1 for the header, +1 because lines count from 1


def parse_findings(labels: pd.Series, where) -> np.ndarray:
    """ "Effusion|Mass" strings -> float32 [N, 14] in FINDINGS order; "No Finding" -> all zeros.

    `where(i)` names row i in error messages. The release has only ~800 distinct label strings, so each distinct
    string is parsed once (a per-row split of 112k rows costs seconds).
    """
    codes, uniques = pd.factorize(labels)
    column = {name: k for k, name in enumerate(FINDINGS)}
    table = np.zeros((len(uniques), len(FINDINGS)), dtype=np.float32)
    for u, text in enumerate(uniques):
        parts = [part.strip() for part in str(text).split("|")]
        problem = None
        if parts == [NO_FINDING]:
            continue
        if "" in parts:
            problem = f"empty finding in {text!r}"
        elif NO_FINDING in parts:
            problem = f"{NO_FINDING!r} combined with findings in {text!r}"
        else:
            unknown = [part for part in parts if part not in column]
            if unknown:
                problem = f"unknown finding {unknown[0]!r} (valid: {', '.join(FINDINGS)}, {NO_FINDING})"
        if problem:
            raise SemimedError(f"{where(int(np.flatnonzero(codes == u)[0]))}: {problem}")
        table[u, [column[part] for part in parts]] = 1.0
    return table[codes]


def _pick_copy(root: Path, copies: list[str]) -> str:
    """The copy with the most pixels (header only, no decode); ties -> first in sorted order."""

    def area(rel: str) -> int:
        try:
            with Image.open(root / rel) as image:
                return image.size[0] * image.size[1]
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return -1  # unreadable: any readable copy is better; the cache reports it if it is the only one

    return min(sorted(copies), key=lambda rel: -area(rel))


def _parse_view(view: str) -> str | None:
    text = str(view).strip().upper()
    if text == "ALL":
        return None
    if text in VIEWS:
        return text
    raise SemimedError(f"chestxray14: unknown view {view!r} (valid: all, PA, AP)")


def load_chestxray14(root: str | Path, view: str = "all", drop_missing: bool = False) -> LabeledImageSet:
    """Index ChestX-ray14 under `root` (metadata only; pixels are read lazily or from the cache).

    view: "all", "PA" or "AP" (the View Position column). drop_missing: drop rows whose image file is not under
    root (with a warning and a dataset note) instead of stopping; the full table names 112,120 images, a partial
    download fewer. `meta.path` is relative to `root`, `meta.patient_id` is the NIH Patient ID (int).
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise SemimedError(f"{root}: ChestX-ray14 root does not exist or is not a folder")
    wanted_view = _parse_view(view)
    images, found = _walk(root)
    metadata_rel, notes = find_metadata(root, found)
    table = read_metadata(root / metadata_rel)

    def line(position: int) -> str:
        return _line(root / metadata_rel, position)

    labels = parse_findings(table["finding_labels"], line)

    test_rel = _shallowest(found, TEST_LIST, root)
    if test_rel is None:
        raise SemimedError(f"{root}: no {TEST_LIST} (the official test list) under this folder")
    in_test = table["image_index"].isin(_read_list(root / test_rel)).to_numpy()
    train_val_rel = _shallowest(found, TRAIN_VAL_LIST, root)
    if train_val_rel is not None:
        in_train_val = table["image_index"].isin(_read_list(root / train_val_rel)).to_numpy()
        for mask, problem in (
            (in_test & in_train_val, f"is in both {TEST_LIST} and {TRAIN_VAL_LIST}"),
            (~in_test & ~in_train_val, f"is in neither {TEST_LIST} nor {TRAIN_VAL_LIST}"),
        ):
            if mask.any():
                first = int(np.flatnonzero(mask)[0])
                raise SemimedError(f"{line(first)}: image {table['image_index'].iat[first]!r} {problem}")
    official = np.where(in_test, "test", "train")
    # Patient-disjointness of the official lists is the premise of every ChestX-ray14 number; check, not trust.
    sides = (
        pd.DataFrame({"patient": table["patient_id"], "test": in_test}).groupby("patient")["test"].nunique()
    )
    if (sides > 1).any():
        patient = int(sides.index[(sides > 1).to_numpy()][0])
        raise SemimedError(
            f"{root / test_rel}: patient {patient} has images in both the test and the "
            "train_val list (the official lists are patient-disjoint)"
        )

    keep = np.ones(len(table), dtype=bool)
    if wanted_view is not None:
        keep &= (table["view"] == wanted_view).to_numpy()
    names = table["image_index"].to_numpy()
    present = np.array([name in images for name in names], dtype=bool)
    missing = keep & ~present
    dropped = int(missing.sum())
    if dropped:
        examples = names[missing][:_EXAMPLES].tolist()
        message = (
            f"{root / metadata_rel}: {dropped} of {int(keep.sum())} rows name an image not found under "
            f"{root} (first: {', '.join(examples)})"
        )
        if not drop_missing:
            raise SemimedError(
                f"{message}; set data.options.drop_missing=true (semimed prepare --drop-missing) to drop them"
            )
        note = (
            f"dropped {dropped} of {int(keep.sum())} metadata rows whose image is missing "
            f"(drop_missing; first: {', '.join(examples)})"
        )
        warnings.warn(note, SemimedWarning, stacklevel=2)
        notes.append(note)
        keep &= present
    if not keep.any():
        which = "" if wanted_view is None else f" with view {wanted_view}"
        raise SemimedError(f"{root / metadata_rel}: no rows{which}")

    rows = np.flatnonzero(keep)
    duplicated = 0
    paths = []
    for name in names[rows]:
        copies = images[name]
        if len(copies) > 1:
            duplicated += 1
        paths.append(copies[0] if len(copies) == 1 else _pick_copy(root, copies))
    if duplicated:
        message = (
            f"{duplicated} image name(s) occur more than once under {root}; "
            "using the copy with the most pixels of each"
        )
        warnings.warn(message, SemimedWarning, stacklevel=2)
        notes.append(message)

    meta = table.iloc[rows].reset_index(drop=True)
    meta.insert(0, "path", paths)
    meta["official_split"] = official[rows]
    meta.attrs = {"channels": 1, "missing_dropped": dropped, "metadata": metadata_rel}
    return LabeledImageSet(
        name="chestxray14",
        task="findings",
        root=root,
        classes=list(FINDINGS),
        multilabel=True,
        labels=np.ascontiguousarray(labels[rows]),
        meta=meta,
        official_split=official[rows],
        notes=notes,
    )


# ------------------------------------------------------------------------------------------------ registration


@dataclass(frozen=True)
class ChestXray14Options:
    view: str = option(
        "all", "keep the rows of one View Position (PA or AP), or all", choices=("all", *VIEWS)
    )
    drop_missing: bool = option(
        False,
        "drop metadata rows whose image is not under root, counting them (default: stop, naming them)",
    )


def _load(root: Path, task: str, options: ChestXray14Options) -> LabeledImageSet:
    return load_chestxray14(root, view=options.view, drop_missing=options.drop_missing)


def check_release(
    dataset: LabeledImageSet, options: ChestXray14Options
) -> tuple[dict[str, int] | None, list[str]]:
    """The full release's totals (known for all views only) and the rows dropped for a missing image."""
    expected = (
        {"images": TOTAL_IMAGES, "patients": TOTAL_PATIENTS} if _parse_view(options.view) is None else None
    )
    missing = []
    dropped = int(dataset.meta.attrs.get("missing_dropped", 0))
    if dropped:
        missing.append(
            f"{dropped} rows of {dataset.meta.attrs.get('metadata', 'the metadata')} have no image "
            "under root (dropped: --drop-missing)"
        )
    return expected, missing


SPEC = register_dataset(
    DatasetSpec(
        name="chestxray14",
        description="NIH ChestX-ray14 (Wang et al. 2017): Data_Entry_2017*.csv(.gz), official lists, PNGs",
        root_help="the folder holding the Data_Entry table, test_list.txt and the images (at any depth)",
        options=ChestXray14Options,
        tasks=("findings",),
        default_task="findings",
        task_help="findings: the 14 findings, multi-label",
        load=_load,
        release=f"{TOTAL_IMAGES:,} images / {TOTAL_PATIENTS:,} patients (Data_Entry_2017_v2020)",
        check_release=check_release,
        split_rule=(
            "official: test_list.txt is test, val = data.val_fraction of the train_val_list.txt patients"
        ),
        patient_level=False,
    )
)
