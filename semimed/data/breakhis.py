"""BreakHis (Spanhol et al. 2016) in its original release layout.

    <root>/…/BreaKHis_v1/histology_slides/breast/<benign|malignant>/SOB/<subtype>/SOB_<B|M>_<T>_<yy>-<id>/<mag>X/
        SOB_<B|M>_<T>-<yy>-<id>-<mag>-<seq>.png

Every label the dataset has (class, subtype, patient, magnification) is written twice: in the folders and in the
file name. The loader reads both and refuses a file where they disagree, because a mislabelled or misplaced image
would otherwise leak silently into the wrong class or, worse, the wrong patient of a patient-disjoint split.

`patient_id` is the patient FOLDER name (`SOB_B_A_14-22549AB`), not the bare number: the release has patient numbers
that are shared by two folders with different letter suffixes and even different subtypes (14-21998AB/CD,
14-22549AB/CD, 14-29960AB/CD), and splits must treat each folder as its own patient.
"""

from __future__ import annotations

import os
import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from semimed.data.base import LabeledImageSet, check_distinct_files, walk_files
from semimed.data.spec import DatasetSpec, option, register_dataset
from semimed.errors import SemimedError

# Tumour-type code in file names -> (class folder, subtype folder), in the order the "subtype" task numbers them.
TUMOR_TYPES: dict[str, tuple[str, str]] = {
    "A": ("benign", "adenosis"),
    "F": ("benign", "fibroadenoma"),
    "PT": ("benign", "phyllodes_tumor"),
    "TA": ("benign", "tubular_adenoma"),
    "DC": ("malignant", "ductal_carcinoma"),
    "LC": ("malignant", "lobular_carcinoma"),
    "MC": ("malignant", "mucinous_carcinoma"),
    "PC": ("malignant", "papillary_carcinoma"),
}
SUBTYPES: list[str] = [subtype for _, subtype in TUMOR_TYPES.values()]
BINARY_CLASSES: list[str] = ["benign", "malignant"]
TASKS: dict[str, list[str]] = {"binary": BINARY_CLASSES, "subtype": SUBTYPES}
# The class whose sensitivity a binary study reports (data.positive_class overrides it).
POSITIVE_CLASS: dict[str, str] = {"binary": "malignant"}
MAGNIFICATIONS: tuple[int, ...] = (40, 100, 200, 400)
# The release (Spanhol et al. 2016, Table 1), what `semimed prepare` checks a tree against: images per subtype at
# (40X, 100X, 200X, 400X), and patients per subtype.
RELEASE_IMAGES: dict[str, tuple[int, int, int, int]] = {
    "adenosis": (114, 113, 111, 106),
    "fibroadenoma": (253, 260, 264, 237),
    "phyllodes_tumor": (109, 121, 108, 115),
    "tubular_adenoma": (149, 150, 140, 130),
    "ductal_carcinoma": (864, 903, 896, 788),
    "lobular_carcinoma": (156, 170, 163, 137),
    "mucinous_carcinoma": (205, 222, 196, 169),
    "papillary_carcinoma": (145, 142, 135, 138),
}
RELEASE_PATIENTS: dict[str, int] = {
    "adenosis": 4,
    "fibroadenoma": 10,
    "phyllodes_tumor": 3,
    "tubular_adenoma": 7,
    "ductal_carcinoma": 38,
    "lobular_carcinoma": 5,
    "mucinous_carcinoma": 9,
    "papillary_carcinoma": 6,
}
TOTAL_IMAGES, TOTAL_PATIENTS = 7_909, 82

_CLASS_CODE = {"B": "benign", "M": "malignant"}
_NAME_RE = re.compile(
    r"^SOB_(?P<tumor_class>[BM])_(?P<tumor_type>A|F|PT|TA|DC|LC|MC|PC)"
    r"-(?P<yy>\d{2})-(?P<id>\d+[A-Z]*)-(?P<magnification>40|100|200|400)-(?P<seq>\d+)\.png$"
)
_LAYOUT = "…/histology_slides/breast/{benign,malignant}/SOB/…"
# How far below the given root find_breakhis_root looks: <data>/breakhis/BreaKHis_v1/histology_slides/breast is 4.
_MAX_SEARCH_DEPTH = 4


def _is_breast_folder(path: Path) -> bool:
    return any((path / tumor_class / "SOB").is_dir() for tumor_class in BINARY_CLASSES)


def find_breakhis_root(root: str | Path) -> Path:
    """The `histology_slides/breast` folder at or under `root`.

    `root` may be the breast folder itself, `histology_slides`, `BreaKHis_v1`, or a folder up to a few levels
    above it. The search is breadth-first and sorted, so the shallowest tree wins; two trees at the same depth
    are ambiguous and refused rather than picked arbitrarily.
    """
    root = Path(root)
    if not root.is_dir():
        raise SemimedError(f"{root}: BreakHis root does not exist or is not a folder")
    queue: deque[tuple[Path, int]] = deque([(root, 0)])
    found: list[Path] = []
    found_depth = None
    while queue:
        folder, depth = queue.popleft()
        if found_depth is not None and depth > found_depth:
            break
        if _is_breast_folder(folder):
            found.append(folder)
            found_depth = depth
            continue
        if depth >= _MAX_SEARCH_DEPTH:
            continue
        try:
            children = sorted(entry.path for entry in os.scandir(folder) if entry.is_dir())
        except OSError:
            continue  # an unreadable side folder must not hide a tree found elsewhere
        queue.extend((Path(child), depth + 1) for child in children if not Path(child).name.startswith("."))
    if not found:
        raise SemimedError(f"{root}: no BreakHis tree (expected {_LAYOUT})")
    if len(found) > 1:
        listed = ", ".join(str(path) for path in found)
        raise SemimedError(f"{root}: several BreakHis trees ({listed}); pass the one to use")
    return found[0]


def parse_breakhis_name(name: str) -> dict:
    """Split an original BreakHis file name into its fields.

    >>> parse_breakhis_name("SOB_B_A-14-22549AB-100-001.png")["patient"]
    '14-22549AB'

    Keys: tumor_class ('B'/'M'), tumor_type ('A', 'F', 'PT', 'TA', 'DC', 'LC', 'MC', 'PC'), yy ('14'),
    patient ('14-22549AB'), magnification (int), seq (int).
    """
    match = _NAME_RE.match(name)
    if match is None:
        raise SemimedError(
            f"{name}: not a BreakHis file name (expected SOB_<B|M>_<type>-<yy>-<id>-<40|100|200|400>-<seq>.png)"
        )
    tumor_class, tumor_type = match["tumor_class"], match["tumor_type"]
    if TUMOR_TYPES[tumor_type][0] != _CLASS_CODE[tumor_class]:
        raise SemimedError(
            f"{name}: tumour type {tumor_type} is {TUMOR_TYPES[tumor_type][0]} but the name says {tumor_class}"
        )
    return {
        "tumor_class": tumor_class,
        "tumor_type": tumor_type,
        "yy": match["yy"],
        "patient": f"{match['yy']}-{match['id']}",
        "magnification": int(match["magnification"]),
        "seq": int(match["seq"]),
    }


def _parse_magnification(magnification: str | int) -> int | None:
    """None means all magnifications; accepts 40, "40", "40X"."""
    text = str(magnification).strip().lower()
    if text == "all":
        return None
    text = text.removesuffix("x")
    if text.isdigit() and int(text) in MAGNIFICATIONS:
        return int(text)
    valid = ", ".join(["all", *map(str, MAGNIFICATIONS)])
    raise SemimedError(f"breakhis: unknown magnification {magnification!r} (valid: {valid})")


def _record(path: Path, breast: Path) -> dict:
    """Parse one PNG and check that its name agrees with every folder above it."""
    parts = path.relative_to(breast).parts
    if len(parts) != 6 or parts[1] != "SOB":
        raise SemimedError(
            f"{path}: not at <benign|malignant>/SOB/<subtype>/<patient folder>/<mag>X/<file> under {breast}"
        )
    class_dir, _, subtype_dir, patient_dir, mag_dir, name = parts
    try:
        fields = parse_breakhis_name(name)
    except SemimedError as exc:
        raise SemimedError(f"{path}: {str(exc).split(': ', 1)[1]}") from None
    tumor_class, subtype = TUMOR_TYPES[fields["tumor_type"]]
    expected = {
        "class folder": (class_dir, tumor_class),
        "subtype folder": (subtype_dir, subtype),
        "patient folder": (
            patient_dir,
            f"SOB_{fields['tumor_class']}_{fields['tumor_type']}_{fields['patient']}",
        ),
        "magnification folder": (mag_dir, f"{fields['magnification']}X"),
    }
    for what, (actual, wanted) in expected.items():
        if actual != wanted:
            raise SemimedError(
                f"{path}: file name disagrees with its {what} ({actual!r}, name implies {wanted!r})"
            )
    return {
        "patient_id": patient_dir,
        "subtype": subtype,
        "tumor_class": tumor_class,
        "magnification": fields["magnification"],
        "seq": fields["seq"],
    }


def load_breakhis(
    root: str | Path, task: str = "binary", magnification: str | int = "all"
) -> LabeledImageSet:
    """Index every BreakHis PNG under `root` (metadata only; pixels are read lazily).

    task: "binary" (benign/malignant) or "subtype" (the 8 tumour types, benign ones first).
    magnification: "all" or one of 40/100/200/400 (also "40X").
    The returned set's `root` is `root` as given (resolved), and `meta.path` is relative to it, so split files
    written against it stay valid wherever the user keeps the tree.
    """
    if task not in TASKS:
        raise SemimedError(f"breakhis: unknown task {task!r} (valid: {', '.join(TASKS)})")
    wanted_mag = _parse_magnification(magnification)
    root = Path(root).resolve()
    breast = find_breakhis_root(root)

    # Linked folders are followed when they stay inside root (hidden entries, archive debris, are skipped).
    pngs = walk_files(breast, root, lambda name: name.lower().endswith(".png"))
    check_distinct_files(pngs)  # the walk's files are the rows: none may be listed twice
    pngs.sort(key=lambda path: path.relative_to(root).as_posix())

    rows = []
    for path in pngs:
        record = _record(path, breast)
        if wanted_mag is None or record["magnification"] == wanted_mag:
            rows.append({"path": path.relative_to(root).as_posix(), **record})
    if not rows:
        which = "any magnification" if wanted_mag is None else f"magnification {wanted_mag}X"
        raise SemimedError(f"{breast}: no BreakHis images at {which}")

    meta = pd.DataFrame(
        rows, columns=["path", "patient_id", "subtype", "tumor_class", "magnification", "seq"]
    )
    meta["magnification"] = meta["magnification"].astype(np.int64)
    meta["seq"] = meta["seq"].astype(np.int64)
    meta.attrs["channels"] = 3
    classes = TASKS[task]
    label_column = "tumor_class" if task == "binary" else "subtype"
    labels = meta[label_column].map({name: index for index, name in enumerate(classes)}).to_numpy(np.int64)
    return LabeledImageSet(
        name="breakhis",
        task=task,
        root=root,
        classes=list(classes),
        multilabel=False,
        labels=labels,
        meta=meta,
        positive_class=POSITIVE_CLASS.get(task),
    )


# ------------------------------------------------------------------------------------------------ registration


@dataclass(frozen=True)
class BreakHisOptions:
    magnification: str = option(
        "all",
        "keep the images of one magnification (40, 100, 200 or 400X), or all four",
        choices=("all", *map(str, MAGNIFICATIONS)),
    )


def _load(root: Path, task: str, options: BreakHisOptions) -> LabeledImageSet:
    return load_breakhis(root, task=task, magnification=options.magnification)


def check_release(dataset: LabeledImageSet, options: BreakHisOptions) -> tuple[dict[str, int], list[str]]:
    """The load against Table 1 of the release, filtered to the loaded magnification: per subtype (images and
    patients) and, for all magnifications, per magnification."""
    wanted = _parse_magnification(options.magnification)
    columns = list(range(len(MAGNIFICATIONS))) if wanted is None else [MAGNIFICATIONS.index(wanted)]
    expected = {
        "images": int(sum(sum(counts[c] for c in columns) for counts in RELEASE_IMAGES.values())),
        "patients": TOTAL_PATIENTS,
    }
    meta = dataset.meta
    missing = []
    for subtype, counts in RELEASE_IMAGES.items():
        have = meta[meta["subtype"] == subtype]
        want_images = sum(counts[c] for c in columns)
        have_patients = have["patient_id"].nunique()
        if len(have) < want_images or have_patients < RELEASE_PATIENTS[subtype]:
            missing.append(
                f"{subtype}: {len(have)} of {want_images} images, {have_patients} of "
                f"{RELEASE_PATIENTS[subtype]} patients"
            )
    if wanted is None:
        for c, mag in enumerate(MAGNIFICATIONS):
            want = sum(counts[c] for counts in RELEASE_IMAGES.values())
            have = int((meta["magnification"] == mag).sum())
            if have < want:
                missing.append(f"{mag}X: {have} of {want} images")
    return expected, missing


SPEC = register_dataset(
    DatasetSpec(
        name="breakhis",
        description="BreakHis (Spanhol et al. 2016): the original BreaKHis_v1 tree of histology PNGs",
        root_help="the BreaKHis_v1 folder, or any folder up to a few levels above histology_slides/breast",
        options=BreakHisOptions,
        tasks=tuple(TASKS),
        default_task="binary",
        task_help="binary: benign/malignant; subtype: the 8 tumour types",
        load=_load,
        release=f"{TOTAL_IMAGES:,} images / {TOTAL_PATIENTS} patients (Spanhol et al. 2016, Table 1)",
        check_release=check_release,
        split_rule=(
            "random patient-disjoint: data.test_fraction of the patients to test (0.3: the 70/30 of Spanhol "
            "et al. 2016), val = data.val_fraction of the train patients"
        ),
        patient_level=True,
    )
)
