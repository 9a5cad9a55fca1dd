"""`load_pixels`: a dataset's pixels at a size, from its cache, a superset's cache, or decoded (and cached)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from semimed.data.base import LabeledImageSet
from semimed.data.cache.build import build_cache
from semimed.data.cache.decoding import decode_all, default_workers
from semimed.data.cache.layout import (
    CACHE_VERSION,
    DecodedPixels,
    RowSubset,
    cache_folder,
    find_superset,
    fingerprint,
    open_complete,
    open_superset,
    read_manifest,
)
from semimed.data.cache.lock import release_lock, take_lock
from semimed.data.cache.refresh import refresh_changed
from semimed.files import check_output_dir


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
    (and cached unless use_cache is False). Rows of a found cache whose source file changed since they were
    decoded are decoded again first (see semimed/data/cache/refresh.py).

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

    def exact() -> DecodedPixels | None:
        return open_complete(folder, key, shape)

    def fresh(found: DecodedPixels, locked: bool = False) -> DecodedPixels:
        if not isinstance(found.pixels, RowSubset):
            reopen = exact
        else:
            superset = found.path

            def reopen() -> DecodedPixels | None:
                return open_superset(dataset, size, superset)

        return refresh_changed(dataset, size, found, reopen, workers, progress, wait_for_lock, locked)

    if not rebuild:
        found = exact() or find_superset(dataset, size, folder.parent)
        if found is not None:
            return fresh(found)
    # A file, or a read-only folder, where the cache goes is one line naming the setting, not an OSError.
    check_output_dir(folder.parent, _cache_dir_key(cache_dir))
    folder.parent.mkdir(parents=True, exist_ok=True)
    found = take_lock(folder, wait_for_lock, None if rebuild else exact)
    if found is not None:  # built by the process we waited for
        return fresh(found)
    try:
        found = None if rebuild else exact()
        if found is not None:  # built by the process we waited for, between two polls
            return fresh(found, locked=True)
        if not cache_dir:
            # Say once, where a user can see it, that a (possibly many-GB) folder is being filled in $HOME.
            print(
                f"semimed: caching decoded {dataset.name} images in the default cache folder {folder.parent} "
                "(set data.cache_dir, or the SEMIMED_CACHE environment variable, to keep them elsewhere)",
                file=sys.stderr,
            )
        _note_older_caches(dataset, size, folder.parent)
        return build_cache(dataset, size, folder, key, shape, workers, progress, extra_manifest or {})
    finally:
        release_lock(folder)


def _cache_dir_key(cache_dir: str | Path | None) -> str:
    """The setting that chose the cache folder, for messages."""
    if cache_dir:
        return "data.cache_dir"
    return "SEMIMED_CACHE" if os.environ.get("SEMIMED_CACHE") else "the default cache folder"


def _note_older_caches(dataset: LabeledImageSet, size: int, cache_dir: Path) -> None:
    """Name caches of an older layout for the same source and size: not used (a new one is being built), so
    their disk space can be freed."""
    root = str(Path(dataset.root).resolve())
    for folder in sorted(cache_dir.glob(f"{dataset.name}-{size}px-*")):
        manifest = read_manifest(folder)
        if (
            manifest is not None
            and manifest.get("source_root") == root
            and manifest.get("version") != CACHE_VERSION
        ):
            print(
                f"semimed: {folder} is a cache of an older format (version {manifest.get('version')}; this "
                f"semimed writes version {CACHE_VERSION}) and is not used; delete it to free its space",
                file=sys.stderr,
            )
