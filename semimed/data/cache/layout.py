"""The cache on disk: folder names, the fingerprint, manifest.json and stats.npy; reading a complete cache.

On disk, under the cache directory (`data.cache_dir`, `semimed prepare --out`, default $SEMIMED_CACHE or
~/.cache/semimed; a run that fills the default folder says so once on stderr):

    <name>-<S>px-<fingerprint[:16]>/      a COMPLETE cache: only ever created by one rename
        pixels.npy      uint8 [N, C, S, S], opened with mmap_mode="r" (pages are read on demand)
        index.csv       the dataset's meta table plus `row` (the row of pixels.npy), aligned row for row
        stats.npy       int64 [N, 2]: (size in bytes, mtime_ns) of each row's source file, taken just
                        BEFORE the row was decoded; (-1, -1): the file was missing; (-2, -2): no file to
                        check (refresh.py, Limits)
        manifest.json   dataset, task, counts, size, channels, source root, sha256 of index.csv, bad rows
                        (corrupt / zero-byte / missing images: listed with the reason, left as zeros), rows
                        dropped as missing at load time, rows re-decoded since, and whatever `semimed prepare`
                        adds (checks against known totals)
    .<name>-<S>px-<fingerprint[:16]>.partial/   a build in progress (pixels, stats, done.npy, bad.json)
    .<name>-<S>px-<fingerprint[:16]>.lock       who is building or refreshing it (host and pid)

The fingerprint hashes the cache version, the dataset name, its resolved root, channels, S and every row's
path, so a training run finds the cache that `semimed prepare` wrote for the same loader settings. A run whose
rows are a SUBSET of a complete cache's rows (e.g. view=PA after preparing all views) reads that cache through
a row map instead of decoding again.

Caches of an older version are not used: the version is part of the fingerprint, so a new cache is built
beside them (a note on stderr names the old folder, which can be deleted). Version 1 had no stats.npy (stat'ing
today's files could not tell whether the old pixels were decoded from them); version 2 stored 16-bit images
clipped by PIL, or as bad rows, and could not read DICOM, where version 3 stores the uint8 of the documented
intensity path (semimed/data/intensity.py): their (size, mtime_ns) are unchanged, so only the version can tell
those pixels apart. 8-bit images decode to the same bytes in versions 2 and 3.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from semimed.data.base import LabeledImageSet

# 2: stats.npy (per-row source file size and mtime_ns) is part of a complete cache; version-1 caches lack it.
# 3: 16-bit/32-bit/float grayscale and DICOM files decoded by semimed/data/intensity.py (a version-2 cache holds
#    them clipped to 8 bits by PIL, or as bad rows): any change to how a file's pixels are decoded bumps this.
CACHE_VERSION = 3
MISSING = -1  # stats.npy value: the row's source file did not exist (or could not be stat'ed)
NO_FILE = -2  # stats.npy value: the row has no source file semimed can stat (a custom reader): not checked


def default_cache_dir() -> Path:
    return Path(os.environ.get("SEMIMED_CACHE", Path.home() / ".cache" / "semimed"))


class RowSubset:
    """Rows `rows` of a cached pixel array, indexed as if it held only those rows (row i -> base[rows[i]]).

    What a dataset that is a subset of a prepared cache reads: `ImageView` indexes `pixels[row]` with the
    dataset's own row numbers, and this maps them without copying the (possibly many-GB) array.
    """

    def __init__(self, base: np.ndarray, rows: np.ndarray) -> None:
        self.base, self.rows = base, np.asarray(rows, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.base.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):
            return self.base[(self.rows[key[0]], *key[1:])]
        return self.base[self.rows[key]]

    def __setitem__(self, key: Any, value: Any) -> None:
        # Only used on a writable base (the cache re-decoding changed rows through a subset's row numbers).
        self.base[self.rows[key]] = value

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.asarray(self.base[self.rows])
        return out if dtype is None else out.astype(dtype)


@dataclass
class DecodedPixels:
    pixels: np.ndarray | RowSubset  # [N, C, S, S] uint8, rows aligned with the dataset
    bad_rows: dict[int, str]  # row -> why it could not be decoded (those rows are zeros in `pixels`)
    path: Path | None  # the cache folder, None when decoded in memory only
    manifest: dict[str, Any] = field(default_factory=dict)  # the cache's manifest ({} when not cached)
    # stats.npy of the cache folder: [rows of its pixels.npy, 2] (size, mtime_ns) recorded when decoded
    file_stats: np.ndarray | None = field(default=None, repr=False)
    refreshed: int = 0  # rows of the dataset decoded again by this load because their file had changed

    @property
    def cache_rows(self) -> np.ndarray:
        """Row of the cache's pixels.npy for each dataset row (the identity unless read from a superset)."""
        if isinstance(self.pixels, RowSubset):
            return self.pixels.rows
        return np.arange(len(self.pixels), dtype=np.int64)

    def bad_rows_message(self, rows: Sequence[int]) -> str:
        """Why a run cannot use `rows` (dataset rows, all in `bad_rows`): how many, the first one's reason,
        the cache that recorded them and what to do. The text of the SemimedError `experiment.build_run`
        raises."""
        rows = sorted(int(row) for row in rows)
        text = f"{len(rows)} image(s) of the split cannot be decoded; first: {self.bad_rows[rows[0]]}"
        if self.path is None:
            return text + " (decoded without a cache: fix or remove the file and run again)"
        return (
            f"{text}. Recorded in the cache {self.path} (manifest.json, bad_rows); fix or replace the file "
            "and run again: a changed file is noticed (size, mtime) and only it is decoded again. "
            f"To decode every image again: {rebuild_command(self.manifest, self.path)}"
        )


def rebuild_command(manifest: dict[str, Any], folder: Path) -> str:
    """The `semimed prepare ... --rebuild` that decodes the cache in `folder` again, from its manifest.

    A cache built by `semimed prepare` records its loader options (`loader`); one a run built does not, and
    the command then says to add the run's dataset options.
    """
    loader = manifest.get("loader")
    if loader is None:
        options = " --drop-missing" if manifest.get("missing_dropped") else ""
        options += " (plus the run's dataset options)"
    else:
        options = ""
        for key, value in loader.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                options += f" {flag}"
            elif value not in (False, None, "", "all"):
                options += f" {flag} {value}"
    dataset, root = manifest.get("dataset", "<dataset>"), manifest.get("source_root", "<root>")
    return (
        f"semimed prepare {dataset} --root {root} --size {manifest.get('size', '<size>')} "
        f"--out {Path(folder).parent} --rebuild{options}"
    )


def source_stats(dataset: LabeledImageSet, rows: Sequence[int] | None = None) -> np.ndarray:
    """int64 [len(rows), 2]: (size, mtime_ns) of each row's source file (all rows, or `rows`); (MISSING,
    MISSING) where it cannot be stat'ed, (NO_FILE, NO_FILE) where the row has none. One os.stat per distinct
    file: a MedMNIST .npz is stat'ed once for all its rows."""
    files = dataset.source_files(rows)
    out = np.empty((len(files), 2), dtype=np.int64)
    seen: dict[str, tuple[int, int]] = {}
    for i, path in enumerate(files):
        if path is None:
            out[i] = NO_FILE
            continue
        key = str(path)
        stat = seen.get(key)
        if stat is None:
            try:
                result = os.stat(key)
                stat = (result.st_size, result.st_mtime_ns)
            except OSError:
                stat = (MISSING, MISSING)
            seen[key] = stat
        out[i] = stat
    return out


def fingerprint(dataset: LabeledImageSet, size: int) -> str:
    digest = hashlib.sha256()
    digest.update(
        f"{CACHE_VERSION}|{dataset.name}|{Path(dataset.root).resolve()}|{dataset.channels}|{size}".encode()
    )
    for path in dataset.meta["path"]:
        digest.update(path.encode() + b"\n")
    return digest.hexdigest()


def cache_folder(dataset: LabeledImageSet, size: int, cache_dir: str | Path | None = None) -> Path:
    """Where the complete cache of `dataset` at `size` lives (whether or not it exists yet)."""
    key = fingerprint(dataset, size)
    return Path(cache_dir or default_cache_dir()).expanduser() / f"{dataset.name}-{size}px-{key[:16]}"


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a complete cache folder, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(folder) / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_cache(folder: str | Path) -> list[str]:
    """Problems with a complete cache (empty list: consistent): manifest, index checksum, array shapes."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return [f"{folder}: no readable manifest.json"]
    problems = []
    index = folder / "index.csv"
    if not index.is_file() or file_sha256(index) != manifest.get("index_sha256"):
        problems.append(f"{index}: missing or its sha256 differs from the manifest's")
    try:
        pixels = np.load(folder / "pixels.npy", mmap_mode="r")
        expected = (manifest["count"], manifest["channels"], manifest["size"], manifest["size"])
        if pixels.shape != tuple(expected) or pixels.dtype != np.uint8:
            problems.append(
                f"{folder / 'pixels.npy'}: {pixels.dtype} {pixels.shape}, manifest says uint8 "
                f"{tuple(expected)}"
            )
    except (OSError, ValueError, KeyError) as exc:
        problems.append(f"{folder / 'pixels.npy'}: unreadable ({exc})")
    if read_stats(folder, manifest.get("count", -1)) is None:
        problems.append(f"{folder / 'stats.npy'}: missing, unreadable or not int64 [count, 2]")
    return problems


def read_stats(folder: Path, count: int) -> np.ndarray | None:
    try:
        stats = np.load(folder / "stats.npy")
    except (OSError, ValueError):
        return None
    return stats if stats.dtype == np.int64 and stats.shape == (count, 2) else None


def open_complete(folder: Path, key: str, shape: tuple[int, ...]) -> DecodedPixels | None:
    """The complete cache in `folder` as it is on disk (rows not yet checked against their files), or None."""
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("fingerprint") != key:
        return None
    try:
        pixels = np.load(folder / "pixels.npy", mmap_mode="r")
    except (OSError, ValueError):
        return None
    stats = read_stats(folder, shape[0])
    if pixels.shape != shape or stats is None:
        return None
    bad = {int(k): v for k, v in manifest["bad_rows"].items()}
    return DecodedPixels(pixels, bad, folder, manifest, file_stats=stats)


def open_superset(dataset: LabeledImageSet, size: int, folder: Path) -> DecodedPixels | None:
    """`folder` read through a row map, if it is a complete cache of the same source at the same size whose
    rows include all of `dataset`'s rows; else None."""
    manifest = read_manifest(folder)
    if (
        manifest is None
        or manifest.get("version") != CACHE_VERSION
        or manifest.get("source_root") != str(Path(dataset.root).resolve())
        or manifest.get("channels") != dataset.channels
        or manifest.get("size") != size
        or manifest.get("count", 0) < len(dataset)
    ):
        return None
    index_path = folder / "index.csv"
    try:
        if file_sha256(index_path) != manifest.get("index_sha256"):
            return None  # an edited or half-copied index: its rows cannot be trusted to match pixels.npy
        cached_paths = pd.read_csv(index_path, usecols=["path"], dtype=str, keep_default_na=False)["path"]
        pixels = np.load(folder / "pixels.npy", mmap_mode="r")
    except (OSError, ValueError, KeyError):
        return None
    rows = pd.Index(cached_paths).get_indexer(dataset.meta["path"].astype(str))
    stats = read_stats(folder, len(cached_paths))
    if (rows < 0).any() or pixels.shape[0] != len(cached_paths) or stats is None:
        return None
    back = {int(cache_row): i for i, cache_row in enumerate(rows)}
    bad = {back[int(k)]: v for k, v in manifest["bad_rows"].items() if int(k) in back}
    return DecodedPixels(RowSubset(pixels, rows), bad, folder, manifest, file_stats=stats)


def find_superset(dataset: LabeledImageSet, size: int, cache_dir: Path) -> DecodedPixels | None:
    """A complete cache of the same source at the same size whose rows include all of `dataset`'s rows."""
    if not cache_dir.is_dir():
        return None
    for folder in sorted(cache_dir.glob(f"{dataset.name}-{size}px-*")):
        found = open_superset(dataset, size, folder)
        if found is not None:
            return found
    return None


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()
