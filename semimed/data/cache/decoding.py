"""Decoding images into a uint8 array [N, C, S, S]: the resize policy and the worker pool.

Resize policy: the shorter side is scaled to S (antialiased bilinear), then the centre S×S is cropped —
the aspect ratio is kept (BreakHis is 700×460; cropping loses ~17% at each long side rather than squashing
nuclei).

A row whose image cannot be decoded is recorded with the reason (`decode_all` returns them), never fatal.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from semimed.data.base import LabeledImageSet
from semimed.errors import SemimedError
from semimed.optional import MissingPackageError


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
        except MissingPackageError:  # this machine lacks a package, the file is fine: not a bad row to record
            raise
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
        # None: tqdm draws the bar only on a terminal (in a log or pipe it is one endless `\r` line).
        disable=True if ((len(rows) < 500) if progress is None else not progress) else None,
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
