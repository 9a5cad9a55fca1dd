"""Freshness at load: the rows whose source file changed since the cache decoded them are decoded again.

What is checked at load (exact cache and superset alike): one os.stat per row's source file
(`LabeledImageSet.source_files`; 1.4 s for 112,120 files, ChestX-ray14's count, on a local disk; no decoding).
A row whose file's size or mtime_ns differs from stats.npy, or that appeared or disappeared, is never served
stale: those rows alone are decoded again, in place, under the lock file (pixels first, then manifest.json's
bad_rows, then stats.npy, each written atomically; a crash in between only makes the next load decode them
again), with one line on stderr. So a corrupt file that is fixed stops being a bad row, and a file that
becomes corrupt or goes missing becomes one. A cache folder this process cannot write raises a SemimedError
naming the `semimed prepare ... --rebuild` to run. `semimed prepare --rebuild` stays the explicit full
rebuild.

Limits: rows read by a custom reader with no file (`source_files` gives None: closures in tests and notebooks)
are trusted as before; a replacement that keeps both the size and the mtime_ns (rare: `touch -r`, or an
equal-length edit within the filesystem's time resolution) is not noticed: use `semimed prepare ...
--rebuild`; and every node that shares one cache folder must see the same files with the same mtimes (copy
data with `cp -p` / `rsync -a`), or each decodes again the rows that differ for it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from semimed.data.base import LabeledImageSet
from semimed.data.cache.decoding import decode_all
from semimed.data.cache.layout import (
    NO_FILE,
    DecodedPixels,
    RowSubset,
    npy_bytes,
    rebuild_command,
    source_stats,
)
from semimed.data.cache.lock import release_lock, take_lock
from semimed.errors import SemimedError
from semimed.files import atomic_write_bytes, atomic_write_text


def _changed_rows(
    dataset: LabeledImageSet, found: DecodedPixels, rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(dataset rows among `rows` (default: all) whose source file differs from what `found`'s cache recorded,
    their stats now). A row with no file to stat (NO_FILE) never counts as changed."""
    assert found.file_stats is not None
    now = source_stats(dataset, None if rows is None else rows.tolist())
    rows = np.arange(len(dataset), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    recorded = found.file_stats[found.cache_rows[rows]]
    changed = (now[:, 0] != NO_FILE) & (now != recorded).any(axis=1)
    return rows[changed], now[changed]


def refresh_changed(
    dataset: LabeledImageSet,
    size: int,
    found: DecodedPixels,
    reopen: Callable[[], DecodedPixels | None],
    workers: int,
    progress: bool | None,
    wait_for_lock: bool,
    locked: bool,
) -> DecodedPixels:
    """`found` if none of the dataset's rows changed on disk since the cache decoded them; else those rows are
    decoded again into the cache (in place, under its lock file) and the cache is read again.

    locked: this process already holds the cache's lock file.
    """
    changed, _ = _changed_rows(dataset, found)
    if not len(changed):
        return found
    folder = found.path
    assert folder is not None
    try:
        if not locked:
            waited = take_lock(folder, wait_for_lock)
            assert waited is None
    except OSError as exc:  # a shared cache this user may read but not write (or a read-only filesystem)
        raise _unwritable(folder, found, len(changed), exc) from None
    try:
        # Again under the lock: the holder we waited for may have refreshed these rows, or rebuilt the folder.
        found = reopen()
        if found is None:
            raise SemimedError(
                f"{folder}: the cache was removed or replaced while this process read it; run again"
            )
        changed, now = _changed_rows(dataset, found, changed)
        if not len(changed):
            return found
        try:
            base = np.load(folder / "pixels.npy", mmap_mode="r+")
        except OSError as exc:
            raise _unwritable(folder, found, len(changed), exc) from None
        cache_rows = found.cache_rows
        bad = decode_all(
            dataset,
            size,
            RowSubset(base, cache_rows),
            workers,
            f"re-decode changed images into {folder.name}",
            rows=changed.tolist(),
            progress=progress,
        )
        for row in bad:
            base[cache_rows[row]] = 0  # bad rows are zeros, not the pixels of the file before it broke
        base.flush()
        del base
        # Order: pixels, then bad_rows, then stats. Until stats.npy is replaced these rows still look changed,
        # so a crash in between makes the next load decode them again rather than trust half-written state.
        manifest = dict(found.manifest)
        recorded = {int(k): v for k, v in manifest["bad_rows"].items()}
        for row in changed.tolist():
            recorded.pop(int(cache_rows[row]), None)
        recorded.update({int(cache_rows[row]): reason for row, reason in bad.items()})
        manifest["bad_rows"] = {str(k): v for k, v in sorted(recorded.items())}
        manifest["bad_count"] = len(recorded)
        manifest["refreshed_rows"] = int(manifest.get("refreshed_rows", 0)) + len(changed)
        manifest["refreshed_utc"] = datetime.now(UTC).isoformat(timespec="seconds")
        atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=1))
        assert found.file_stats is not None
        stats = found.file_stats.copy()
        stats[cache_rows[changed]] = now  # stat'ed before decoding: a file changed since is seen next time
        atomic_write_bytes(folder / "stats.npy", npy_bytes(stats))
    finally:
        if not locked:
            release_lock(folder)
    print(
        f"semimed: {len(changed)} image(s) changed on disk since they were cached; decoded them again into "
        f"{folder}" + (f" ({len(bad)} cannot be decoded: listed in its bad_rows)" if bad else ""),
        file=sys.stderr,
    )
    result = reopen()
    if result is None:
        raise SemimedError(
            f"{folder}: the cache was removed or replaced while this process read it; run again"
        )
    result.refreshed = len(changed)
    return result


def _unwritable(folder: Path, found: DecodedPixels, count: int, exc: OSError) -> SemimedError:
    return SemimedError(
        f"{folder}: {count} image(s) changed on disk since this cache decoded them, and this process cannot "
        f"update it ({exc.strerror or exc}); run {rebuild_command(found.manifest, folder)} as a user who can "
        "write it, or set data.cache_dir to a folder you can write"
    )
