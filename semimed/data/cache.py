"""Decode once -> a uint8 array [N, C, S, S] on disk (memory-mapped), aligned with the dataset's rows.

Resize policy: the shorter side is scaled to S (antialiased bilinear), then the centre S×S is cropped —
the aspect ratio is kept (BreakHis is 700×460; cropping loses ~17% at each long side rather than squashing
nuclei).

On disk, under the cache directory (`data.cache_dir`, `semimed prepare --out`, default ~/.cache/semimed):

    <name>-<S>px-<fingerprint[:16]>/      a COMPLETE cache: only ever created by one rename
        pixels.npy      uint8 [N, C, S, S], opened with mmap_mode="r" (pages are read on demand)
        index.csv       the dataset's meta table plus `row` (the row of pixels.npy), aligned row for row
        manifest.json   dataset, task, counts, size, channels, source root, sha256 of index.csv, bad rows
                        (corrupt / zero-byte images: listed with the reason, left as zeros), rows dropped as
                        missing at load time, and whatever `semimed prepare` adds (checks against known totals)
    .<name>-<S>px-<fingerprint[:16]>.partial/   a build in progress (pixels.npy, done.npy, bad.json)
    .<name>-<S>px-<fingerprint[:16]>.lock       who is building it (host and pid)

The fingerprint hashes the dataset name, its resolved root, channels, S and every row's path, so a training
run finds the cache that `semimed prepare` wrote for the same loader settings. A run whose rows are a SUBSET of
a complete cache's rows (e.g. view=PA after preparing all views) reads that cache through a row map instead of
decoding again. An interrupted build leaves only the hidden `.partial` folder, never a folder that looks
complete; the next build resumes from the rows its `done.npy` marks as written. Two processes that need the
same cache at once (parallel Ray trials) take turns through the lock file: the second waits and then reads.

A row whose image cannot be decoded is recorded, not fatal: `semimed prepare` lists it and carries on, and
`experiment.build_run` refuses to train on a split that contains it (naming the first such image).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from semimed.data.base import LabeledImageSet
from semimed.errors import SemimedError

CACHE_VERSION = 1
_SAVE_EVERY_S = 5.0  # how often a build records its progress (a crash loses at most this much decoding)
_WAIT_POLL_S = 1.0


def default_cache_dir() -> Path:
    return Path(os.environ.get("SEMIMED_CACHE", Path.home() / ".cache" / "semimed"))


def default_workers() -> int:
    """Cores this process may use (the affinity mask, which containers and taskset narrow), at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def resize_center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """HxWxC uint8 -> CxSxS uint8: shorter side to `size`, centre crop."""
    height, width, channels = pixels.shape
    if (height, width) != (size, size):
        scale = size / min(height, width)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        mode = "L" if channels == 1 else "RGB"
        image = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, mode=mode)
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=None)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)
        pixels = pixels[:, :, None] if pixels.ndim == 2 else pixels
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


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

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.asarray(self.base[self.rows])
        return out if dtype is None else out.astype(dtype)


@dataclass
class DecodedPixels:
    pixels: np.ndarray | RowSubset  # [N, C, S, S] uint8, rows aligned with the dataset
    bad_rows: dict[int, str]  # row -> why it could not be decoded (those rows are zeros in `pixels`)
    path: Path | None  # the cache folder, None when decoded in memory only
    manifest: dict[str, Any] = field(default_factory=dict)  # the cache's manifest ({} when not cached)


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


# ------------------------------------------------------------------------------------------------------ decoding

_WORKER_DATASET: LabeledImageSet | None = None


def _init_worker(dataset: LabeledImageSet) -> None:
    # The dataset reaches each worker once (inherited on fork, pickled once on spawn), not once per chunk.
    global _WORKER_DATASET
    _WORKER_DATASET = dataset


def _decode_rows(
    dataset: LabeledImageSet, rows: list[int], size: int
) -> list[tuple[int, np.ndarray | None, str]]:
    out = []
    for row in rows:
        try:
            out.append((row, resize_center_crop(dataset.read_image(row), size), ""))
        except (
            Exception
        ) as exc:  # one bad image (truncated, decompression bomb, odd mode) must not end a build
            reason = (
                str(exc)
                if isinstance(exc, SemimedError)
                else (f"{dataset.root / str(dataset.meta['path'].iat[row])}: {type(exc).__name__}: {exc}")
            )
            out.append((row, None, reason))
    return out


def _decode_chunk(rows: list[int], size: int) -> list[tuple[int, np.ndarray | None, str]]:
    assert _WORKER_DATASET is not None
    return _decode_rows(_WORKER_DATASET, rows, size)


def _decoded_chunks(
    dataset: LabeledImageSet, rows: list[int], size: int, workers: int
) -> Iterator[list[tuple[int, np.ndarray | None, str]]]:
    """Decoded chunks of `rows`, in completion order; in this process when workers <= 1."""
    chunk = max(1, min(256, len(rows) // max(1, 8 * workers)))
    jobs = [rows[i : i + chunk] for i in range(0, len(rows), chunk)]
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield _decode_rows(dataset, job, size)
        return
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(dataset,)) as pool:
        pending = {pool.submit(_decode_chunk, job, size) for job in jobs}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield future.result()
        except BrokenProcessPool:
            raise SemimedError(
                f"{dataset.name}: a decoding worker died (out of memory?); run again to resume, "
                "or use fewer workers"
            ) from None
        finally:
            for future in pending:
                future.cancel()


def decode_all(
    dataset: LabeledImageSet,
    size: int,
    out: np.ndarray,
    workers: int,
    desc: str,
    rows: list[int] | None = None,
    progress: bool | None = None,
    on_chunk: Any = None,
) -> dict[int, str]:
    """Fill `out[row]` ([N, C, S, S]) for `rows` (default: all); returns the rows that failed, with the reason.

    `on_chunk(done_rows, bad)` is called after each chunk is written (the cache records its progress there).
    progress: show a bar (None: only for 500+ rows).
    """
    rows = list(range(len(dataset))) if rows is None else list(rows)
    workers = effective_workers(dataset, workers)
    bad: dict[int, str] = {}
    bar = tqdm(
        total=len(rows),
        desc=desc,
        unit="img",
        mininterval=2.0,
        disable=(len(rows) < 500) if progress is None else not progress,
    )
    for chunk_result in _decoded_chunks(dataset, rows, size, workers):
        for row, pixels, error in chunk_result:
            if pixels is None:
                bad[row] = error
            elif pixels.shape != out.shape[1:]:
                bad[row] = f"decoded to shape {pixels.shape}, expected {out.shape[1:]}"
            else:
                out[row] = pixels
        bar.update(len(chunk_result))
        if on_chunk is not None:
            on_chunk([row for row, _, _ in chunk_result], bad)
    bar.close()
    return bad


def effective_workers(dataset: LabeledImageSet, workers: int) -> int:
    """`workers`, or 1 where processes cannot help: arrays already in memory (MedMNIST) would only be copied
    around, and a closure reader (tests, notebooks) cannot reach a process under spawn/forkserver."""
    if getattr(dataset.reader, "decoded", False) or not _picklable(dataset.reader):
        return 1
    return max(1, workers)


def _picklable(reader: Any) -> bool:
    if reader is None:
        return True
    try:
        pickle.dumps(reader)
    except (pickle.PicklingError, AttributeError, TypeError):
        return False
    return True


# ------------------------------------------------------------------------------------------------ cache on disk


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a complete cache folder, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(folder) / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_cache(folder: str | Path) -> list[str]:
    """Problems with a complete cache (empty list: consistent): manifest, index checksum, array shape."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return [f"{folder}: no readable manifest.json"]
    problems = []
    index = folder / "index.csv"
    if not index.is_file() or _sha256(index) != manifest.get("index_sha256"):
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
    return problems


def _open_complete(folder: Path, key: str, shape: tuple[int, ...]) -> DecodedPixels | None:
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("fingerprint") != key:
        return None
    try:
        pixels = np.load(folder / "pixels.npy", mmap_mode="r")
    except (OSError, ValueError):
        return None
    if pixels.shape != shape:
        return None
    return DecodedPixels(pixels, {int(k): v for k, v in manifest["bad_rows"].items()}, folder, manifest)


def _find_superset(dataset: LabeledImageSet, size: int, cache_dir: Path) -> DecodedPixels | None:
    """A complete cache of the same source at the same size whose rows include all of `dataset`'s rows."""
    if not cache_dir.is_dir():
        return None
    root = str(Path(dataset.root).resolve())
    for folder in sorted(cache_dir.glob(f"{dataset.name}-{size}px-*")):
        manifest = read_manifest(folder)
        if (
            manifest is None
            or manifest.get("version") != CACHE_VERSION
            or manifest.get("source_root") != root
            or manifest.get("channels") != dataset.channels
            or manifest.get("size") != size
            or manifest.get("count", 0) < len(dataset)
        ):
            continue
        index_path = folder / "index.csv"
        try:
            if _sha256(index_path) != manifest.get("index_sha256"):
                continue  # an edited or half-copied index: its rows cannot be trusted to match pixels.npy
            cached_paths = pd.read_csv(index_path, usecols=["path"], dtype=str, keep_default_na=False)["path"]
            pixels = np.load(folder / "pixels.npy", mmap_mode="r")
        except (OSError, ValueError, KeyError):
            continue
        rows = pd.Index(cached_paths).get_indexer(dataset.meta["path"].astype(str))
        if (rows < 0).any() or pixels.shape[0] != len(cached_paths):
            continue
        back = {int(cache_row): i for i, cache_row in enumerate(rows)}
        bad = {back[int(k)]: v for k, v in manifest["bad_rows"].items() if int(k) in back}
        return DecodedPixels(RowSubset(pixels, rows), bad, folder, manifest)
    return None


def _lock_holder(lock: Path) -> str:
    try:
        return lock.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _try_lock(lock: Path) -> bool:
    """Create the lock file (atomically, O_EXCL); clear it first if it names a dead process on this host."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            host, _, pid = _lock_holder(lock).partition(" pid ")
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                lock.unlink(missing_ok=True)  # left by a killed build: the .partial it left is resumable
                continue
            return False
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{socket.gethostname()} pid {os.getpid()}\n")
        return True
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_pixels(
    dataset: LabeledImageSet,
    size: int,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    use_cache: bool = True,
    *,
    wait_for_lock: bool = True,
    progress: bool | None = None,
    rebuild: bool = False,
    extra_manifest: dict[str, Any] | None = None,
) -> DecodedPixels:
    """The dataset's pixels at `size`: from its cache, else from a cache of a superset of its rows, else decoded
    (and cached unless use_cache is False).

    wait_for_lock: when another process is building the same cache, wait for it (training) rather than fail
    (`semimed prepare`). rebuild: decode again even if a complete cache exists. extra_manifest: more keys for
    the manifest of a cache built now.
    """
    workers = workers if workers is not None else default_workers()
    shape = (len(dataset), dataset.channels, size, size)
    if not use_cache:
        pixels = np.zeros(shape, dtype=np.uint8)
        bad = decode_all(dataset, size, pixels, workers, f"decode {dataset.name}", progress=progress)
        return DecodedPixels(pixels, bad, None)
    key = fingerprint(dataset, size)
    folder = cache_folder(dataset, size, cache_dir)
    if not rebuild:
        found = _open_complete(folder, key, shape) or _find_superset(dataset, size, folder.parent)
        if found is not None:
            return found
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = folder.parent / f".{folder.name}.lock"
    announced = False
    while not _try_lock(lock):
        if not wait_for_lock:
            raise SemimedError(
                f"{folder}: another process ({_lock_holder(lock)}) is building this cache; wait "
                f"for it, or delete {lock} if that process is gone"
            )
        if not announced:
            print(f"waiting for {_lock_holder(lock)} to finish building {folder}", file=sys.stderr)
            announced = True
        time.sleep(_WAIT_POLL_S)
        if not rebuild:
            found = _open_complete(folder, key, shape)
            if found is not None:
                return found
    try:
        if not rebuild:  # built by the process we waited for
            found = _open_complete(folder, key, shape)
            if found is not None:
                return found
        return _build(dataset, size, folder, key, shape, workers, progress, extra_manifest or {})
    finally:
        lock.unlink(missing_ok=True)


def _build(
    dataset: LabeledImageSet,
    size: int,
    folder: Path,
    key: str,
    shape: tuple[int, ...],
    workers: int,
    progress: bool | None,
    extra_manifest: dict[str, Any],
) -> DecodedPixels:
    """Decode into `.<folder>.partial` (resuming what an interrupted build left), then rename it to `folder`."""
    staging = folder.parent / f".{folder.name}.partial"
    done_path, bad_path, key_path = staging / "done.npy", staging / "bad.json", staging / "fingerprint"
    done = bad = pixels = None
    if staging.is_dir():
        try:
            if key_path.read_text().strip() == key:
                pixels = np.load(staging / "pixels.npy", mmap_mode="r+")
                done = np.load(done_path)
                bad = {int(k): v for k, v in json.loads(bad_path.read_text()).items()}
                if pixels.shape != shape or done.shape != (shape[0],):
                    pixels = None
        except (OSError, ValueError, json.JSONDecodeError):
            pixels = None
        if pixels is None:
            shutil.rmtree(staging)
    if pixels is None:
        staging.mkdir(parents=True)
        key_path.write_text(key + "\n")
        pixels = np.lib.format.open_memmap(staging / "pixels.npy", mode="w+", dtype=np.uint8, shape=shape)
        done, bad = np.zeros(shape[0], dtype=bool), {}
    assert done is not None and bad is not None
    todo = np.flatnonzero(~done).tolist()
    resumed = shape[0] - len(todo)
    started = time.perf_counter()
    last_save = [started]

    def save_progress(force: bool = False) -> None:
        # Order matters: pixels reach the file before done.npy claims them.
        if not force and time.perf_counter() - last_save[0] < _SAVE_EVERY_S:
            return
        pixels.flush()
        _atomic_bytes(done_path, _npy_bytes(done))
        _atomic_bytes(bad_path, json.dumps({str(k): v for k, v in bad.items()}).encode())
        last_save[0] = time.perf_counter()

    def on_chunk(rows: list[int], chunk_bad: dict[int, str]) -> None:
        done[rows] = True
        bad.update({row: chunk_bad[row] for row in rows if row in chunk_bad})
        save_progress()

    desc = f"cache {dataset.name} at {size}px" + (f" (resuming, {resumed} done)" if resumed else "")
    try:
        decode_all(dataset, size, pixels, workers, desc, rows=todo, progress=progress, on_chunk=on_chunk)
    finally:
        save_progress(force=True)
    seconds = time.perf_counter() - started
    pixels.flush()

    dataset.meta.assign(row=np.arange(len(dataset))).to_csv(staging / "index.csv", index=False)
    manifest = {
        "version": CACHE_VERSION,
        "fingerprint": key,
        "dataset": dataset.name,
        "task": dataset.task,
        "source_root": str(Path(dataset.root).resolve()),
        "count": len(dataset),
        "size": size,
        "channels": dataset.channels,
        "patients": int(len(set(dataset.patients.astype(str)))),
        "index_sha256": _sha256(staging / "index.csv"),
        "bad_count": len(bad),
        "bad_rows": {str(k): v for k, v in sorted(bad.items())},
        "missing_dropped": int(dataset.meta.attrs.get("missing_dropped", 0)),
        "notes": list(dataset.notes),
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "decode_seconds": round(seconds, 2),
        "resumed_rows": resumed,
        "workers": effective_workers(dataset, workers),
        **extra_manifest,
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for scratch in (done_path, bad_path, key_path):
        scratch.unlink()
    if folder.exists():
        shutil.rmtree(folder)  # a broken or stale folder under this name (we hold the lock)
    os.replace(staging, folder)
    return DecodedPixels(np.load(folder / "pixels.npy", mmap_mode="r"), dict(bad), folder, manifest)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
