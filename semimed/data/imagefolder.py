"""Your own images in class folders (`imagefolder`): the class of an image is the folder it is in.

    <root>/<class>/…/<image>                  semimed draws a patient-disjoint train/val/test split
    <root>/<train|val|test>/<class>/…/<image>  the folders are the split (as MedMNIST's official one)

Images may sit at any depth below their class folder. The second layout is recognised when every top-level
folder is a split name (train, test, and optionally val, valid or validation); a tree that mixes split names
with other folders is refused rather than read as classes named "train" and "test". Class names are the folder
names, sorted (the dataset's notes say so, hence every split summary).

Patient ids: `patient_regex` (first group of a match in the image's path relative to root), or `patient_csv`
(columns path,patient_id), else each image is its own patient (an image-level split, said in the notes). A
folder split whose patients cross it (one patient in train/ and test/) is refused: its test scores would be
inflated by near-duplicates seen in training; `split_folders=pool` draws a patient-disjoint split instead.

Refused, each with one line naming the folder or file: a missing root, a single class, an empty class folder,
an image outside any class folder, and a file in a class folder that is not an image (a .gif or a .webp would
otherwise be skipped and the study would train on fewer images than the user gave it). Hidden entries
(.DS_Store, macOS "._" forks) and Windows/desktop junk (Thumbs.db, desktop.ini) are skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from semimed.data.base import (
    LabeledImageSet,
    check_distinct_files,
    file_channels,
    safe_relative_path,
    walk_files,
)
from semimed.data.spec import DatasetSpec, no_release, option, register_dataset
from semimed.errors import SemimedError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom")
JUNK = frozenset({"thumbs.db", "desktop.ini"})  # hidden names (".DS_Store", "._x") are skipped by walk_files
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
# Class names (lower case, a leading "0_"-style index dropped) that mark the negative class of a binary task.
NEGATIVE_NAMES = frozenset(
    {"normal", "benign", "negative", "healthy", "no_finding", "nofinding", "0", "false"}
)
# MedMNIST's note, for a user's own data: what a split without patient ids can and cannot promise.
NO_PATIENT_NOTE = (
    "no patient ids: image-level split (each image counts as its own patient, so patient-disjointness cannot "
    "be checked)"
)


def obvious_positive(classes: list[str]) -> str | None:
    """The positive class of a two-class task when the names make it obvious: exactly one of them is a
    negative name (normal, benign, negative, healthy, no_finding, 0, false; `0_normal` counts as normal), and
    the other is the positive one. None otherwise: data.positive_class is then required."""
    if len(classes) != 2:
        return None

    def key(name: str) -> str:
        text = re.sub(r"[\s-]+", "_", name.strip().lower())
        return re.sub(r"^\d+_+", "", text) or text

    negative = [name for name in classes if key(name) in NEGATIVE_NAMES]
    return next(name for name in classes if name not in negative) if len(negative) == 1 else None


def image_channels(channels: int, first: Path, where: str) -> tuple[int, str]:
    """(channels, note): `channels` 1 or 3 as given; 0 = from the first image's header (grayscale: 1)."""
    if channels not in (0, 1, 3):
        raise SemimedError(f"{where}: data.options.channels={channels} must be 0 (auto), 1 or 3")
    if channels:
        return channels, f"channels: {channels} (data.options.channels)"
    found = file_channels(first)
    return (
        found,
        f"channels: {found}, from the first image ({first.name}; data.options.channels overrides it)",
    )


def check_split(official: np.ndarray, patients: np.ndarray, rows: list[str], source: str, fix: str) -> None:
    """A given split needs train and test rows, and no patient in two of its parts: a patient's images are
    near-duplicates, and seen in training they inflate the test scores. `rows[i]` names row i in messages."""
    for part in ("train", "test"):
        if not (official == part).any():
            raise SemimedError(f"{source}: the given split has no {part} images; {fix}")
    first: dict[str, int] = {}
    for row, (patient, part) in enumerate(zip(patients.astype(str).tolist(), official.tolist(), strict=True)):
        seen = first.setdefault(patient, row)
        if official[seen] != part:
            raise SemimedError(
                f"{source}: patient {patient!r} is in {official[seen]} ({rows[seen]}) and {part} ({rows[row]}): "
                f"the given split is not patient-disjoint; {fix}"
            )


def _entries(folder: Path) -> tuple[list[Path], list[str]]:
    """(the visible sub-folders, sorted; the names of the image files directly in `folder`)."""
    try:
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        folders = [p for p in entries if p.is_dir()]
    except OSError as exc:
        raise SemimedError(f"{folder}: cannot list this folder ({exc.strerror or exc})") from None
    return folders, [p.name for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and p not in folders]


def _layout(root: Path) -> dict[str, Path] | None:
    """{split: folder} for a split layout, else None."""
    folders, loose = _entries(root)
    if loose:
        raise SemimedError(f"{root}: image {loose[0]!r} is outside any class folder (<root>/<class>/<image>)")
    split_like = [p for p in folders if p.name.lower() in SPLIT_NAMES]
    if not split_like:
        return None
    others = [p.name for p in folders if p.name.lower() not in SPLIT_NAMES]
    if others:
        raise SemimedError(
            f"{root}: folders {', '.join(p.name for p in split_like)} are split names but {others[0]!r} is not; "
            "use <root>/<class>/… or <root>/<train|val|test>/<class>/…"
        )
    splits: dict[str, Path] = {}
    for folder in split_like:
        part = SPLIT_NAMES[folder.name.lower()]
        if part in splits:
            raise SemimedError(f"{root}: both {splits[part].name}/ and {folder.name}/ are the {part} split")
        splits[part] = folder
    return splits


def _class_images(folder: Path, root: Path) -> dict[str, list[Path]]:
    """{class name: its image files} of the class folders in `folder`."""
    classes, loose = _entries(folder)
    if loose:
        raise SemimedError(f"{folder}: image {loose[0]!r} is outside any class folder")
    found = {}
    for class_dir in classes:
        # walk_files checks the links below a class folder; the class (or split) folder itself may be one too.
        real = class_dir.resolve()
        if not real.is_relative_to(root.resolve()):
            raise SemimedError(
                f"{class_dir}: link leads outside the data root {root} (to {real}); copy or move that data "
                "under the root, or make the root a folder above both"
            )
        files = walk_files(class_dir, root, lambda name: name.lower() not in JUNK)
        other = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
        if other:
            raise SemimedError(
                f"{other[0]}: not an image file ({len(other)} such in {class_dir}); images are "
                f"{' '.join(IMAGE_SUFFIXES)}: convert or remove the others"
            )
        if not files:
            raise SemimedError(f"{class_dir}: empty class folder (no image files); remove it or add images")
        found[class_dir.name] = files
    return found


def _patients(paths: list[str], root: Path, options: ImageFolderOptions) -> tuple[list[str] | None, str]:
    """Each image's patient id (None: none given) and the note that says where they came from."""
    if options.patient_regex and options.patient_csv:
        raise SemimedError("imagefolder: set one of data.options.patient_regex and patient_csv, not both")
    if options.patient_regex:
        try:
            pattern = re.compile(options.patient_regex)
        except re.error as exc:
            raise SemimedError(f"data.options.patient_regex '{options.patient_regex}': {exc}") from None
        if pattern.groups < 1:
            raise SemimedError(
                f"data.options.patient_regex '{options.patient_regex}' has no group: put the patient id "
                r"in parentheses, e.g. '/(P\d+)_[^/]*$' for <class>/P0012_left.png"
            )
        out = []
        for path in paths:
            match = pattern.search(path)
            if match is None or not match.group(1):
                raise SemimedError(
                    f"{root / path}: data.options.patient_regex '{options.patient_regex}' finds no patient id "
                    f"in {path!r} (it is matched against the path relative to {root})"
                )
            out.append(match.group(1))
        return out, f"patient ids: data.options.patient_regex '{options.patient_regex}'"
    if options.patient_csv:
        return _patients_from_csv(paths, root, Path(options.patient_csv).expanduser())
    return None, f"{NO_PATIENT_NOTE}; set data.options.patient_regex or patient_csv if images share patients"


def _patients_from_csv(paths: list[str], root: Path, csv: Path) -> tuple[list[str], str]:
    csv = csv if csv.is_absolute() else root / csv
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False, index_col=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, EOFError) as exc:
        raise SemimedError(
            f"{csv}: cannot read data.options.patient_csv ({str(exc).splitlines()[0]})"
        ) from None
    missing = [column for column in ("path", "patient_id") if column not in table.columns]
    if missing:
        raise SemimedError(f"{csv}: lacks column(s) {', '.join(map(repr, missing))} (needs path,patient_id)")
    patient_of: dict[str, tuple[str, int]] = {}
    wanted = set(paths)
    for i, (name, patient) in enumerate(zip(table["path"], table["patient_id"], strict=True)):
        line = f"{csv} line {i + 2}"  # the header is line 1
        if not name.strip() or not patient.strip():
            raise SemimedError(f"{line}: empty {'path' if not name.strip() else 'patient_id'}")
        path = safe_relative_path(root, name.strip(), line)
        if path in patient_of:
            raise SemimedError(f"{line}: path {path!r} is listed twice (first on line {patient_of[path][1]})")
        if path not in wanted:
            raise SemimedError(f"{line}: path {path!r} is not an image of the dataset under {root}")
        patient_of[path] = (patient.strip(), i + 2)
    unlisted = [path for path in paths if path not in patient_of]
    if unlisted:
        raise SemimedError(
            f"{csv}: no row for image {unlisted[0]!r} ({len(unlisted)} image(s) without a patient id)"
        )
    return [patient_of[path][0] for path in paths], f"patient ids: {csv.name} (data.options.patient_csv)"


def load_imagefolder(root: str | Path, options: ImageFolderOptions | None = None) -> LabeledImageSet:
    """Index the class folders under `root` (metadata only; pixels are read lazily)."""
    options = options or ImageFolderOptions()
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise SemimedError(f"{root}: image folder does not exist or is not a folder")
    splits = _layout(root)
    pooled = splits is not None and options.split_folders == "pool"
    if splits is not None and not {"train", "test"} <= set(splits):
        raise SemimedError(
            f"{root}: split folders {', '.join(p.name for p in splits.values())} need train/ and test/ "
            "(val/ is optional: carved from train when absent)"
        )
    parts = splits or {"": root}
    found = {part: _class_images(folder, root) for part, folder in parts.items()}
    # One walk per class folder: a link from one class's folder into another's is only seen across them.
    check_distinct_files(
        [path for per_class in found.values() for files in per_class.values() for path in files]
    )
    classes = sorted({name for per_class in found.values() for name in per_class})
    for part, per_class in found.items():
        absent = [name for name in classes if name not in per_class]
        if absent and splits is not None and not pooled and part != "val":
            raise SemimedError(
                f"{parts[part]}: no class folder {absent[0]!r} (another split folder has it); every split "
                "folder must hold every class"
            )
    if len(classes) < 2:
        where = parts["train"] if splits else root
        what = f"one class folder ({classes[0]})" if classes else "no class folders"
        raise SemimedError(f"{where}: {what}; a classifier needs at least two (<root>/<class>/<image>)")
    rows = [
        (path.relative_to(root).as_posix(), name, part)
        for part, per_class in found.items()
        for name, files in per_class.items()
        for path in files
    ]
    rows.sort(key=lambda row: row[0])
    meta = pd.DataFrame(rows, columns=["path", "class", "folder_split"])
    patients, patient_note = _patients(meta["path"].tolist(), root, options)
    meta["patient_id"] = meta["path"] if patients is None else patients
    channels, channel_note = image_channels(options.channels, root / meta["path"].iat[0], str(root))
    meta.attrs["channels"] = channels
    official = None if splits is None or pooled else meta["folder_split"].to_numpy().astype(str)
    if official is not None:
        fix = "fix the folders, or set data.options.split_folders=pool to draw a patient-disjoint split"
        check_split(official, meta["patient_id"].to_numpy(), meta["path"].tolist(), str(root), fix)
    if splits is None or pooled:
        meta = meta.drop(columns="folder_split")
    positive = obvious_positive(classes)
    notes = [f"classes (folder names, sorted): {', '.join(classes)}", patient_note, channel_note]
    if official is not None:
        notes.append(f"split: the folders {', '.join(p.name for p in splits.values())} (as given)")
    if positive is not None:
        notes.append(
            f"default positive class: {positive} (the other name says negative; data.positive_class)"
        )
    labels = meta["class"].map({name: k for k, name in enumerate(classes)}).to_numpy(np.int64)
    return LabeledImageSet(
        name="imagefolder",
        task="default",
        root=root,
        classes=classes,
        multilabel=False,
        labels=labels,
        meta=meta,
        official_split=official,
        notes=notes,
        positive_class=positive,
    )


# ------------------------------------------------------------------------------------------------ registration


@dataclass(frozen=True)
class ImageFolderOptions:
    patient_regex: str = option(
        "",
        r"a regular expression searched in each image's path relative to the root (<class>/…/<file>); its first "
        r"group is the patient id, e.g. '/(P\d+)_[^/]*$'",
    )
    patient_csv: str = option(
        "",
        "a CSV with columns path,patient_id (paths relative to the root; the CSV's own path too if relative)",
    )
    split_folders: str = option(
        "use",
        "with <root>/<train|val|test>/<class>/…: use those folders as the split, or pool them and draw one",
        choices=("use", "pool"),
    )
    channels: int = option(0, "channels the model sees: 1, 3, or 0 = from the first image (grayscale: 1)")


def _load(root: Path, task: str, options: ImageFolderOptions) -> LabeledImageSet:
    return load_imagefolder(root, options)


SPEC = register_dataset(
    DatasetSpec(
        name="imagefolder",
        description="your own images in class folders: <root>/<class>/<image>, or <root>/<split>/<class>/…",
        root_help="your image folder: one folder per class, or train/, val/ and test/ folders holding them",
        options=ImageFolderOptions,
        tasks=("default",),
        default_task="default",
        task_help="single-label: one class per folder, class names = folder names, sorted",
        load=_load,
        release="your own data: no release totals",
        check_release=no_release,
        split_rule=(
            "the train/val/test folders when given (val carved from train when absent), else random "
            "patient-disjoint (data.test_fraction, data.val_fraction of patients; no patient ids: of images)"
        ),
        patient_level=False,
    )
)
