"""The dataset contract every loader returns.

A `LabeledImageSet` is metadata plus a way to read pixels; loaders parse metadata only, pixels are read
lazily (`read_image`) or from the decode-once cache. Label convention, used everywhere in semimed:

- single-label: `labels` is int64 [N] with class indices into `classes`;
- multi-label:  `labels` is float32 [N, K], 1 = present, 0 = absent, NaN = unknown.

`meta` is a DataFrame aligned row-for-row with `labels`, with at least `patient_id` and `path` (the image path
relative to `root`, or `"<split>:<index>"` for arrays such as MedMNIST `.npz` files).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from semimed.data.intensity import check_dicom, is_dicom, is_wide_mode, read_dicom, to_channels, wide_to_uint8
from semimed.errors import SemimedError


@dataclass
class LabeledImageSet:
    name: str
    task: str
    root: Path
    classes: list[str]
    multilabel: bool
    labels: np.ndarray
    meta: pd.DataFrame
    # Reads row i's pixels as an HxWxC uint8 array (C = 1 or 3). Default: open meta.path[i] under root.
    reader: Callable[[int], np.ndarray] | None = None
    # Official split assignment per row ("train"/"val"/"test"), when the release ships one.
    official_split: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    # A binary task's positive (disease) class, as the dataset declares it: its sensitivity, specificity,
    # precision, F1, ROC-AUC and AP are the ones reported (`data.positive_class` overrides it). None: the
    # dataset declares none (multi-class, multi-label, or a two-class file whose names say nothing).
    positive_class: str | None = None

    def __post_init__(self) -> None:
        if len(self.meta) != len(self.labels):
            raise ValueError(f"{self.name}: meta has {len(self.meta)} rows but labels has {len(self.labels)}")
        for column in ("patient_id", "path"):
            if column not in self.meta.columns:
                raise ValueError(f"{self.name}: meta lacks the {column!r} column")
        self.meta = self.meta.reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        """Channels the model sees: 1 for grayscale modalities (X-ray, ultrasound), 3 for histology."""
        return int(self.meta.attrs.get("channels", 3))

    def positive_index(self, requested: str = "") -> int | None:
        """The positive class's index for a binary task (`requested`, else the declared default); None for
        other tasks. Raises naming data.positive_class where it is missing, unknown or does not apply."""
        binary = not self.multilabel and self.num_classes == 2
        if not binary:
            if requested:
                kind = "multi-label" if self.multilabel else f"{self.num_classes}-class"
                raise SemimedError(
                    f"data.positive_class={requested!r} applies to binary tasks; {self.name} ({self.task}) is "
                    f"{kind}"
                )
            return None
        name = requested or self.positive_class
        if not name:
            raise SemimedError(
                f"{self.name} ({self.task}) has two classes ({', '.join(self.classes)}) and declares no positive "
                f"class: set data.positive_class to the one whose sensitivity you report (e.g. "
                f"data.positive_class={self.classes[1]})"
            )
        if name not in self.classes:
            raise SemimedError(
                f"unknown data.positive_class {name!r} for {self.name} ({self.task}); valid: "
                f"{', '.join(self.classes)}"
            )
        return self.classes.index(name)

    @property
    def patients(self) -> np.ndarray:
        return self.meta["patient_id"].to_numpy()

    def stratify_labels(self) -> np.ndarray:
        """Labels as a [N, K] 0/1 matrix (NaN = unknown), the form the multi-label split code works on."""
        if self.multilabel:
            return self.labels.astype(np.float32)
        return np.eye(self.num_classes, dtype=np.float32)[self.labels]

    def read_image(self, index: int) -> np.ndarray:
        """Row `index`'s pixels as HxWxC uint8 with C == self.channels."""
        if self.reader is not None:
            return self.reader(index)
        return read_image_file(self.root / self.meta["path"].iat[index], self.channels)

    def source_files(self, rows: Sequence[int] | None = None) -> list[Path | None]:
        """The file each row's pixels come from (all rows, or `rows`): what the cache stats to notice an
        image replaced on disk. The default reader opens `root / path`; an array reader (`reader.decoded`,
        MedMNIST) reads every row from the one file `root`; any other reader (a closure in tests or notebooks)
        reads from somewhere semimed cannot see: None, and the cache cannot tell whether such a row changed.
        """
        paths = self.meta["path"] if rows is None else self.meta["path"].iloc[list(rows)]
        if self.reader is None:
            root = Path(self.root)
            return [root / str(path) for path in paths]
        if getattr(self.reader, "decoded", False):
            return [Path(self.root)] * len(paths)
        return [None] * len(paths)

    def source_file(self, row: int) -> Path | None:
        """`source_files` for one row."""
        return self.source_files([row])[0]

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.read_image(index), self.labels[index]


@contextlib.contextmanager
def open_image_file(path: Path) -> Iterator[Image.Image]:
    """`Image.open(path)` (header read, pixels not yet decoded) whose every failure, in opening or in decoding
    within the `with` block, is one SemimedError naming the file: missing, zero-byte, truncated or
    unidentifiable, or larger than PIL's decompression-bomb limit. PIL-readable files only: DICOM files are
    read by `read_image_file` / `check_image_file` through semimed/data/intensity.py."""
    try:
        with Image.open(path) as image:
            yield image
    except SemimedError:
        raise
    except FileNotFoundError:
        raise SemimedError(f"{path}: image file not found") from None
    except Image.DecompressionBombError as exc:  # not an OSError: it would escape as a raw traceback
        raise SemimedError(f"{path}: image too large to decode ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:  # UnidentifiedImageError and truncation are OSErrors
        raise SemimedError(f"{path}: cannot decode image ({exc})") from None


def check_image_file(path: Path) -> None:
    """Raise what `read_image_file` would for what the header tells (missing, unidentifiable, too large; for
    DICOM also multi-frame, an unread photometric interpretation, a decoder or pydicom not installed) without
    decoding the pixels: a cheap check of user-given files before a long job starts."""
    path = Path(path)
    if is_dicom(path):
        check_dicom(path)
        return
    with open_image_file(path):
        pass


def file_channels(path: Path) -> int:
    """1 for a grayscale image file (PIL modes 1, L, LA, I, F, I;16*; DICOM MONOCHROME1/2), else 3; from the
    header, with `check_image_file`'s refusals."""
    path = Path(path)
    if is_dicom(path):
        return 1 if check_dicom(path).startswith("MONOCHROME") else 3
    with open_image_file(path) as image:
        return 1 if image.mode in ("1", "L", "LA") or is_wide_mode(image.mode) else 3


def as_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """HxWxC uint8 -> HxWxchannels: a gray plane replicated, or RGB to gray by PIL's "L" (ITU-R 601-2 luma),
    the conversions `read_image_file` applies to a file. For data read by a dataset's own reader (an .npz)
    that a network of another channel count must see (`semimed evaluate` on another site's data)."""
    have = pixels.shape[2]
    if have == channels:
        return pixels
    if have == 1:
        return np.ascontiguousarray(np.repeat(pixels, channels, axis=2))
    return np.asarray(Image.fromarray(np.ascontiguousarray(pixels[:, :, :3])).convert("L"))[:, :, None]


def read_image_file(path: Path, channels: int) -> np.ndarray:
    """Decode one image file to HxWxC uint8; RGBA/palette files are converted, not rejected.

    The one function through which semimed reads an image file (datasets, the cache, predict, explain); every
    failure is one SemimedError naming the file. 8-bit files go through PIL's convert("L"/"RGB") unchanged;
    16-bit, 32-bit and float grayscale files and DICOM files are mapped to uint8 by the documented intensity
    path of semimed/data/intensity.py (per-image percentile clip; DICOM Modality LUT and window), never
    clipped by PIL. semimed fails on unreadable images rather than silently training on fewer (the cache,
    `semimed prepare`, lists and skips them explicitly).
    """
    path = Path(path)
    if is_dicom(path):
        return read_dicom(path, channels)
    with open_image_file(path) as image:
        image.load()
        if is_wide_mode(image.mode):
            # PIL's convert would clip every value above 255: the percentile clip instead.
            return to_channels(wide_to_uint8(np.asarray(image), path, image.mode), channels)
        image = image.convert("L" if channels == 1 else "RGB")
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def safe_relative_path(root: Path, name: str, where: str) -> str:
    """Validate a path read from a metadata file: it must stay under root (no '..', no absolute path)."""
    candidate = Path(name)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise SemimedError(f"{where}: image name {name!r} escapes the data root {root}")
    return candidate.as_posix()


def check_distinct_files(paths: Sequence[Path]) -> None:
    """Raise naming both when two of `paths` are one file (links, `..`): listed twice, one image would count
    twice and could be both a training and a test image."""
    first_of: dict[str, Path] = {}
    for path in paths:
        real = os.path.realpath(path)
        first = first_of.setdefault(real, path)
        if first != path:
            raise SemimedError(
                f"{path} and {first} are the same file {real}, reached twice through links; an image must be "
                "listed once: remove one of the links"
            )


def walk_files(top: Path, root: Path, keep: Callable[[str], bool]) -> list[Path]:
    """Every file at any depth under `top` whose name passes `keep`, sorted by path; hidden entries (names
    starting with ".": .DS_Store, macOS "._" forks, our own staging) are skipped.

    Symbolic links are followed (a tree assembled from links to patient folders is common; os.walk would skip
    linked folders and with them their images), but only those that resolve inside `root`. A link that leads
    outside `root`, a dangling one, one that loops back to a folder above it, and a folder that cannot be
    listed are refused naming the link or folder: skipping any of them would train on fewer images than the
    tree holds, without a word. A loader whose rows are the files found checks them with
    `check_distinct_files` (two links to one folder would list its images twice).
    """
    root_real = Path(os.path.realpath(root))
    found: list[Path] = []
    # (folder as reached, the real paths of it and its ancestors: a link to one of them is a loop)
    stack: list[tuple[Path, tuple[Path, ...]]] = [(Path(top), (Path(os.path.realpath(top)),))]
    while stack:
        folder, chain = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as exc:
            raise SemimedError(f"{folder}: cannot list this folder ({exc.strerror or exc})") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            link = entry.is_symlink()
            if link:
                real = Path(os.path.realpath(path))
                if not real.exists():
                    raise SemimedError(
                        f"{path}: dangling or looping link (to {os.readlink(path)}); fix or remove it"
                    )
            else:
                real = chain[-1] / entry.name
            if entry.is_dir():  # follows a link
                if real in chain:
                    raise SemimedError(f"{path}: link loops back to {real}, a folder above it; remove it")
            elif not keep(entry.name):
                continue
            if link and not real.is_relative_to(root_real):
                raise SemimedError(
                    f"{path}: link leads outside the data root {root_real} (to {real}); copy or move that "
                    "data under the root, or make the root a folder above both"
                )
            if entry.is_dir():
                stack.append((path, (*chain, real)))
            else:
                found.append(path)
    return sorted(found, key=lambda path: path.as_posix())
