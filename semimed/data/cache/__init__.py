"""Decode once -> a uint8 array [N, C, S, S] on disk (memory-mapped), aligned with the dataset's rows.

`load_pixels(dataset, size)` gives a dataset's pixels at size S: from its cache, else from the cache of a superset
of its rows, else decoded (and cached). Its parts, one module each:

    layout.py     the on-disk format (folders, fingerprint, manifest.json, stats.npy) and reading a complete cache
    decoding.py   the resize policy (`resize_center_crop`) and the decoding worker pool (`decode_all`)
    build.py      a new cache: decoded into a hidden `.partial` folder (resumable), published by one rename
    refresh.py    the check at load: rows whose source file changed since they were decoded are decoded again
    lock.py       the lock file through which processes that need one cache folder take turns
    load.py       `load_pixels`, which ties them together

A row whose image cannot be decoded is recorded, not fatal: `semimed prepare` lists it and carries on, and
`experiment.build_run` refuses to train on a split that contains it (`DecodedPixels.bad_rows_message` names
the first such image and the cache that recorded it).
"""

from semimed.data.cache.decoding import decode_all, default_workers, effective_workers, resize_center_crop
from semimed.data.cache.layout import (
    CACHE_VERSION,
    MISSING,
    NO_FILE,
    DecodedPixels,
    RowSubset,
    cache_folder,
    default_cache_dir,
    fingerprint,
    read_manifest,
    rebuild_command,
    source_stats,
    verify_cache,
)
from semimed.data.cache.load import load_pixels

__all__ = [
    "CACHE_VERSION",
    "MISSING",
    "NO_FILE",
    "DecodedPixels",
    "RowSubset",
    "cache_folder",
    "decode_all",
    "default_cache_dir",
    "default_workers",
    "effective_workers",
    "fingerprint",
    "load_pixels",
    "read_manifest",
    "rebuild_command",
    "resize_center_crop",
    "source_stats",
    "verify_cache",
]
