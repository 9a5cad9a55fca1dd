"""The dataset contract every loader returns.

A `LabeledImageSet` is metadata plus a way to read pixels; loaders parse metadata only, pixels are read
lazily (`read_image`) or from the decode-once cache. Label convention, used everywhere in semimed:

- single-label: `labels` is int64 [N] with class indices into `classes`;
- multi-label:  `labels` is float32 [N, K], 1 = present, 0 = absent, NaN = unknown.

`meta` is a DataFrame aligned row-for-row with `labels`, with at least `patient_id` and `path` (the image path
relative to `root`, or `"<split>:<index>"` for arrays such as MedMNIST `.npz` files).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

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


def read_image_file(path: Path, channels: int) -> np.ndarray:
    """Decode one image file to HxWxC uint8; RGBA/palette/16-bit files are converted, not rejected.

    A zero-byte or truncated file raises SemimedError naming the file: semimed fails on corrupt images rather
    than silently training on fewer (the cache, `semimed prepare`, lists and skips them explicitly).
    """
    try:
        with Image.open(path) as image:
            image.load()
            image = image.convert("L" if channels == 1 else "RGB")
    except FileNotFoundError:
        raise SemimedError(f"{path}: image file not found") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise SemimedError(f"{path}: cannot decode image ({exc})") from None
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def safe_relative_path(root: Path, name: str, where: str) -> str:
    """Validate a path read from a metadata file: it must stay under root (no '..', no absolute path)."""
    candidate = Path(name)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise SemimedError(f"{where}: image name {name!r} escapes the data root {root}")
    return candidate.as_posix()
