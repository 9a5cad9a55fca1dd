"""Building a cache: decode into a hidden `.<folder>.partial`, then publish it by one rename.

An interrupted build leaves only the hidden `.partial` folder, never a folder that looks complete; the next
build resumes from the rows its `done.npy` marks as written. The caller holds the cache's lock file.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from semimed.data.base import LabeledImageSet
from semimed.data.cache.decoding import decode_all, effective_workers
from semimed.data.cache.layout import (
    CACHE_VERSION,
    NO_FILE,
    DecodedPixels,
    file_sha256,
    npy_bytes,
    read_stats,
    source_stats,
)
from semimed.files import atomic_write_bytes

_SAVE_EVERY_S = 5.0  # how often a build records its progress (a crash loses at most this much decoding)


def build_cache(
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
    stats_path = staging / "stats.npy"
    done = bad = pixels = stats = None
    if staging.is_dir():
        try:
            if key_path.read_text().strip() == key:
                pixels = np.load(staging / "pixels.npy", mmap_mode="r+")
                done = np.load(done_path)
                bad = {int(k): v for k, v in json.loads(bad_path.read_text()).items()}
                stats = read_stats(staging, shape[0])
                if pixels.shape != shape or done.shape != (shape[0],) or stats is None:
                    pixels = None
        except (OSError, ValueError, json.JSONDecodeError):
            pixels = None
        if pixels is None:
            shutil.rmtree(staging)
    if pixels is None:
        staging.mkdir(parents=True)
        key_path.write_text(key + "\n")
        # Stat'ed before any row is decoded (here, not at the end): a file replaced during the build then
        # looks changed at the next load and is decoded again, never recorded as current with old pixels.
        stats = source_stats(dataset)
        atomic_write_bytes(stats_path, npy_bytes(stats))
        pixels = np.lib.format.open_memmap(staging / "pixels.npy", mode="w+", dtype=np.uint8, shape=shape)
        done, bad = np.zeros(shape[0], dtype=bool), {}
    assert done is not None and bad is not None and stats is not None
    todo = np.flatnonzero(~done).tolist()
    resumed = shape[0] - len(todo)
    started = time.perf_counter()
    last_save = [started]

    def save_progress(force: bool = False) -> None:
        # Order matters: pixels reach the file before done.npy claims them.
        if not force and time.perf_counter() - last_save[0] < _SAVE_EVERY_S:
            return
        pixels.flush()
        _atomic_bytes(done_path, npy_bytes(done))
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
        "index_sha256": file_sha256(staging / "index.csv"),
        "bad_count": len(bad),
        "bad_rows": {str(k): v for k, v in sorted(bad.items())},
        "missing_dropped": int(dataset.meta.attrs.get("missing_dropped", 0)),
        "notes": list(dataset.notes),
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "decode_seconds": round(seconds, 2),
        "resumed_rows": resumed,
        "workers": effective_workers(dataset, workers),
        # stats.npy: rows with no file to stat (custom readers) are served without a change check
        "unchecked_rows": int((stats[:, 0] == NO_FILE).sum()),
        "refreshed_rows": 0,  # rows decoded again since, because their file changed (see refresh_changed)
        **extra_manifest,
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for scratch in (done_path, bad_path, key_path):
        scratch.unlink()
    if folder.exists():
        shutil.rmtree(folder)  # a broken or stale folder under this name (we hold the lock)
    os.replace(staging, folder)
    pixels = np.load(folder / "pixels.npy", mmap_mode="r")
    return DecodedPixels(pixels, dict(bad), folder, manifest, file_stats=stats)


def _atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
