"""MedMNIST v2/v3 (Yang et al., Sci Data 2023): any 2D `.npz` of the release.

A file holds `{train,val,test}_images` (uint8 [N, H, W] grayscale or [N, H, W, 3] RGB; H = W = 28, or 64/128/224
for the MedMNIST+ files `<flag>_<size>.npz`) and `{train,val,test}_labels` (int [N, 1] for single-label tasks,
0/1 [N, K] for the multi-label ChestMNIST). The task type follows the label array's shape.

Rows are the three splits concatenated (train, val, test); `meta.path` is `"<split>:<index>"`. The release has
no patient ids, so each image is its own "patient" (`patient_id` = path): semimed cannot check patient
disjointness here and says so in `dataset.notes` (hence in every split summary). The official splits are used.

Class names come from a small table of the known files (MedMNIST's own `INFO` labels, snake_cased); an unknown
file (your own .npz) gets `data.options.class_names` in label order, else `class_0`, `class_1`, …; its positive
class, if it has two, is data.positive_class (required). Downloading through the `medmnist` package is optional (`download_medmnist`);
the loader itself only reads a local file.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from semimed.data.base import LabeledImageSet
from semimed.data.chestxray14 import FINDINGS
from semimed.data.spec import DatasetSpec, option, register_dataset
from semimed.errors import SemimedError

SPLITS = ("train", "val", "test")
SIZES = (28, 64, 128, 224)
# flag -> class names in label order (MedMNIST INFO["<flag>"]["label"]), for the 2D files.
CLASSES: dict[str, list[str]] = {
    "breastmnist": ["malignant", "normal_benign"],
    "pneumoniamnist": ["normal", "pneumonia"],
    "chestmnist": list(FINDINGS),
    "pathmnist": [
        "adipose",
        "background",
        "debris",
        "lymphocytes",
        "mucus",
        "smooth_muscle",
        "normal_colon_mucosa",
        "cancer_associated_stroma",
        "colorectal_adenocarcinoma_epithelium",
    ],
    "dermamnist": [
        "actinic_keratoses_and_intraepithelial_carcinoma",
        "basal_cell_carcinoma",
        "benign_keratosis_like_lesions",
        "dermatofibroma",
        "melanoma",
        "melanocytic_nevi",
        "vascular_lesions",
    ],
    "octmnist": ["choroidal_neovascularization", "diabetic_macular_edema", "drusen", "normal"],
    "retinamnist": ["grade_0", "grade_1", "grade_2", "grade_3", "grade_4"],
}
# flag -> the positive (disease) class of a two-class file: its sensitivity, specificity, ... are reported.
POSITIVE_CLASS: dict[str, str] = {"breastmnist": "malignant", "pneumoniamnist": "pneumonia"}
# flag -> (train, val, test) image counts of the release (what `semimed prepare` checks a file against).
KNOWN_COUNTS: dict[str, tuple[int, int, int]] = {
    "breastmnist": (546, 78, 156),
    "pneumoniamnist": (4708, 524, 624),
    "chestmnist": (78468, 11219, 22433),
    "pathmnist": (89996, 10004, 7180),
    "dermamnist": (7007, 1003, 2005),
    "octmnist": (97477, 10832, 1000),
    "retinamnist": (1080, 120, 400),
}
NO_PATIENT_NOTE = (
    "MedMNIST .npz files carry no patient ids: each image counts as its own patient, so "
    "patient-disjointness cannot be checked; the official train/val/test split is used as released"
)


def medmnist_flag(path: str | Path) -> str:
    """`breastmnist` for `.../BreastMNIST.npz` and `.../breastmnist_224.npz` (MedMNIST+ size suffix dropped)."""
    return re.sub(r"_(28|64|128|224)$", "", Path(path).name.removesuffix(".npz").lower())


def medmnist_size(path: str | Path) -> int:
    """The release's image side from the file name: 28, or the MedMNIST+ suffix (`_64`, `_128`, `_224`)."""
    match = re.search(r"_(28|64|128|224)$", Path(path).name.removesuffix(".npz").lower())
    return int(match.group(1)) if match else 28


class NpzReader:
    """Reads row i's pixels from the file's arrays, loaded once per process on first use.

    A picklable object (not a closure), so the cache's worker processes can receive it; it pickles without the
    arrays, and each process loads them itself only if it reads pixels. `decoded = True` tells the cache that
    these are already pixels: parallel decoding would only copy them between processes.
    """

    decoded = True

    def __init__(self, path: Path, offsets: dict[str, int]) -> None:
        self.path, self.offsets = path, offsets
        self._images: dict[str, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "offsets": self.offsets, "_images": None}

    def _load(self) -> dict[str, np.ndarray]:
        if self._images is None:
            with _open(self.path) as npz:
                self._images = {split: _images(npz, self.path, split) for split in SPLITS}
        return self._images

    def __call__(self, row: int) -> np.ndarray:
        images = self._load()
        for split in reversed(SPLITS):
            if row >= self.offsets[split]:
                pixels = images[split][row - self.offsets[split]]
                return pixels[:, :, None] if pixels.ndim == 2 else pixels
        raise IndexError(row)


def _open(path: Path):
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise SemimedError(f"{path}: MedMNIST file not found") from None
    except (OSError, ValueError) as exc:
        raise SemimedError(f"{path}: not a readable .npz file ({exc})") from None


def _array(npz, path: Path, key: str) -> np.ndarray:
    if key not in npz.files:
        raise SemimedError(
            f"{path}: no {key!r} array (a MedMNIST .npz has {{train,val,test}}_images and _labels)"
        )
    try:
        return npz[key]
    except (OSError, ValueError) as exc:
        raise SemimedError(f"{path}: cannot read {key!r} ({exc})") from None


def _header(npz, path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of one array, read from its .npy header without decompressing the data."""
    if key not in npz.files:
        raise SemimedError(
            f"{path}: no {key!r} array (a MedMNIST .npz has {{train,val,test}}_images and _labels)"
        )
    try:
        with npz.zip.open(f"{key}.npy") as handle:
            version = np.lib.format.read_magic(handle)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read(handle)
    except (OSError, ValueError, KeyError) as exc:
        raise SemimedError(f"{path}: cannot read {key!r} ({exc})") from None
    return tuple(shape), dtype


def _check_images(path: Path, key: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if dtype != np.uint8 or not (len(shape) == 3 or (len(shape) == 4 and shape[3] in (1, 3))):
        raise SemimedError(
            f"{path}: {key!r} is {dtype} {list(shape)}; expected uint8 [N, H, W] or [N, H, W, 3]"
        )


def _images(npz, path: Path, split: str) -> np.ndarray:
    key = f"{split}_images"
    _check_images(path, key, *_header(npz, path, key))
    return _array(npz, path, key)


def _named_classes(path: Path, flag: str, class_names: Sequence[str]) -> list[str] | None:
    """`class_names` checked (distinct, non-empty; only for a file not in CLASSES), or None when not given."""
    if not class_names:
        return None
    names = [str(name).strip() for name in class_names]
    if "" in names or len(set(names)) != len(names):
        raise SemimedError(f"{path}: data.options.class_names {names} must be distinct, non-empty names")
    known = CLASSES.get(flag)
    if known is not None and names != known:
        raise SemimedError(
            f"{path}: data.options.class_names is for a file semimed does not know; {flag}'s classes are "
            f"{', '.join(known)}"
        )
    return names


def load_medmnist(root: str | Path, class_names: Sequence[str] = ()) -> LabeledImageSet:
    """Index a MedMNIST 2D `.npz` file (the labels are read now, the images on first use); `class_names`
    names the classes of a file not in CLASSES, in label order."""
    path = Path(root).expanduser().resolve()
    if path.is_dir():
        raise SemimedError(f"{path}: is a folder; data.root for medmnist is the .npz file itself")
    flag = medmnist_flag(path)
    labels, shapes, offsets, official = [], [], {}, []
    with _open(path) as npz:
        for split in SPLITS:
            shape, dtype = _header(npz, path, f"{split}_images")
            _check_images(path, f"{split}_images", shape, dtype)
            if shape[0] == 0 and split != "val":
                # Not a usable release; an empty val is fine (make_split carves val from train instead).
                raise SemimedError(
                    f"{path}: {split}_images holds 0 images (shape {list(shape)}); a MedMNIST file needs "
                    "training and test images"
                )
            split_labels = _array(npz, path, f"{split}_labels")
            if split_labels.ndim == 0 or len(split_labels) != shape[0]:
                rows = "no" if split_labels.ndim == 0 else len(split_labels)
                raise SemimedError(
                    f"{path}: {split}_labels has {rows} rows but {split}_images has {shape[0]}"
                )
            offsets[split] = sum(len(x) for x in labels)
            # Explicit width, not -1: numpy cannot infer it for an empty split (an empty val is allowed).
            labels.append(split_labels.reshape(len(split_labels), int(np.prod(split_labels.shape[1:]))))
            shapes.append(shape[1:])
            official += [split] * shape[0]
    if len({shape for shape in shapes}) != 1:
        raise SemimedError(f"{path}: the splits' images differ in shape ({', '.join(map(str, shapes))})")
    if len({x.shape[1] for x in labels}) != 1:
        raise SemimedError(f"{path}: the splits' label arrays differ in width")
    matrix = np.concatenate(labels)
    if not np.issubdtype(matrix.dtype, np.number):
        raise SemimedError(f"{path}: labels are {matrix.dtype}, not numbers")
    multilabel = matrix.shape[1] > 1
    if multilabel and not np.isin(matrix, (0, 1)).all():
        raise SemimedError(f"{path}: multi-label labels must be 0/1")
    known = CLASSES.get(flag)
    named = _named_classes(path, flag, class_names)
    owner = "data.options.class_names" if named else flag
    if multilabel:
        classes = named or known or [f"class_{k}" for k in range(matrix.shape[1])]
        if len(classes) != matrix.shape[1]:
            raise SemimedError(
                f"{path}: {owner} has {len(classes)} names but the labels have {matrix.shape[1]} columns"
            )
        targets = matrix.astype(np.float32)
    else:
        values = matrix[:, 0]
        if not np.array_equal(values, np.round(values)) or values.min() < 0:
            raise SemimedError(f"{path}: single-label labels must be non-negative integers")
        classes = named or known or [f"class_{k}" for k in range(int(values.max()) + 1)]
        if named and len(named) != int(values.max()) + 1:
            raise SemimedError(
                f"{path}: data.options.class_names has {len(named)} names but the labels are 0..{int(values.max())}"
                f" ({int(values.max()) + 1} classes)"
            )
        if values.max() >= len(classes):
            raise SemimedError(
                f"{path}: label {int(values.max())} is out of range for {flag}'s "
                f"{len(classes)} classes ({', '.join(classes)})"
            )
        targets = values.astype(np.int64)

    official_split = np.array(official)
    paths = [f"{split}:{i}" for split in SPLITS for i in range(int((official_split == split).sum()))]
    meta = pd.DataFrame({"path": paths, "patient_id": paths, "official_split": official_split})
    channels = 1 if len(shapes[0]) == 2 or shapes[0][2] == 1 else 3
    meta.attrs = {"channels": channels, "image_shape": tuple(int(v) for v in shapes[0])}
    return LabeledImageSet(
        name="medmnist",
        task=flag,
        root=path,
        classes=list(classes),
        multilabel=multilabel,
        labels=targets,
        meta=meta,
        reader=NpzReader(path, offsets),
        official_split=official_split,
        notes=[NO_PATIENT_NOTE],
        positive_class=POSITIVE_CLASS.get(flag) if known else None,
    )


def download_medmnist(flag: str, folder: str | Path, size: int = 28) -> Path:
    """Fetch `<flag>.npz` (or `<flag>_<size>.npz`) into `folder` through the optional `medmnist` package.

    Every failure (package missing, no network, unknown flag) is one SemimedError that says how to proceed
    by hand: semimed never needs the package to read a file the user already has.
    """
    if size not in SIZES:
        raise SemimedError(f"medmnist: size {size} is not one of {', '.join(map(str, SIZES))}")
    manual = (
        f"download {flag}{'' if size == 28 else f'_{size}'}.npz from the MedMNIST Zenodo record and pass "
        "its path as --root / data.root"
    )
    try:
        import medmnist
    except ImportError:
        raise SemimedError(
            f"medmnist: the 'medmnist' package is not installed (pip install medmnist), or {manual}"
        ) from None
    info = getattr(medmnist, "INFO", {}).get(flag)
    if info is None:
        raise SemimedError(f"medmnist: unknown flag {flag!r}")
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        dataset_class = getattr(medmnist, info["python_class"])
        kwargs = {"split": "train", "download": True, "root": str(folder)}
        if size != 28:
            kwargs["size"] = size
        dataset_class(**kwargs)
    except Exception as exc:  # the package raises whatever its HTTP stack raises; all mean "not downloaded"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SemimedError(f"medmnist: could not download {flag} ({reason}); offline? {manual}") from None
    path = folder / (f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz")
    if not path.is_file():
        raise SemimedError(f"medmnist: the download left no {path}; {manual}")
    return path


# ------------------------------------------------------------------------------------------------ registration


@dataclass(frozen=True)
class MedMnistOptions:
    class_names: list[str] = option(
        [],
        "the class names, in label order, of an .npz semimed does not know (your own file); default class_0, …",
    )


def _load(root: Path, task: str, options: MedMnistOptions) -> LabeledImageSet:
    return load_medmnist(root, options.class_names)


def check_release(dataset: LabeledImageSet, options: Any) -> tuple[dict[str, int] | None, list[str]]:
    """Per-split image counts of the known files (`KNOWN_COUNTS`); an unknown file is only reported."""
    known = KNOWN_COUNTS.get(dataset.task)
    if known is None:
        return None, []
    missing = []
    for split, want in zip(SPLITS, known, strict=True):
        have = int((dataset.official_split == split).sum())
        if have != want:
            missing.append(f"{split}: {have} images, the release has {want}")
    return {"images": int(sum(known)), "patients": int(sum(known))}, missing


def _fetch(root: Path) -> Path:
    """`semimed prepare --download`: the file `root` names, from the release (through the medmnist package)."""
    return download_medmnist(medmnist_flag(root), root.parent, medmnist_size(root))


SPEC = register_dataset(
    DatasetSpec(
        name="medmnist",
        description="MedMNIST v2/v3 (Yang et al. 2023): any 2D .npz of the release, 28 px or MedMNIST+ sizes",
        root_help="the .npz file itself (e.g. breastmnist.npz, pneumoniamnist_224.npz)",
        options=MedMnistOptions,
        tasks=("default",),
        default_task="default",
        task_help="the labels the file holds: single- or multi-label by the label array's shape",
        load=_load,
        release="per-split image counts of the known files (breastmnist: 546 / 78 / 156, …)",
        check_release=check_release,
        split_rule="official: the .npz file's train/val/test arrays (no patient ids: one image, one patient)",
        patient_level=False,
        fetch=_fetch,
    )
)
