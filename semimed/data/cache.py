"""Decode once -> a uint8 array [N, C, S, S] on disk (memory-mapped), aligned with the dataset's rows.

Resize policy: the shorter side is scaled to S (antialiased bilinear), then the centre S×S is cropped —
the aspect ratio is kept (BreakHis is 700×460; cropping loses ~17% at each long side rather than squashing
nuclei). The cache folder is written under a temporary name and renamed when complete, so an interrupted
run never leaves a cache that looks finished; a manifest records what is inside.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from semimed.data.base import LabeledImageSet
from semimed.errors import SemimedError

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("SEMIMED_CACHE", Path.home() / ".cache" / "semimed"))


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


@dataclass
class DecodedPixels:
    pixels: np.ndarray  # [N, C, S, S] uint8, rows aligned with the dataset
    bad_rows: dict[int, str]  # row -> why it could not be decoded (those rows are zeros in `pixels`)
    path: Path | None  # the cache folder, None when decoded in memory only


def fingerprint(dataset: LabeledImageSet, size: int) -> str:
    digest = hashlib.sha256()
    digest.update(f"{CACHE_VERSION}|{dataset.name}|{Path(dataset.root).resolve()}|{dataset.channels}|{size}".encode())
    for path in dataset.meta["path"]:
        digest.update(path.encode() + b"\n")
    return digest.hexdigest()


def _decode_chunk(args: tuple[LabeledImageSet, list[int], int]) -> list[tuple[int, np.ndarray | None, str]]:
    dataset, rows, size = args
    out = []
    for row in rows:
        try:
            out.append((row, resize_center_crop(dataset.read_image(row), size), ""))
        except SemimedError as exc:
            out.append((row, None, str(exc)))
    return out


def decode_all(dataset: LabeledImageSet, size: int, out: np.ndarray, workers: int, desc: str) -> dict[int, str]:
    """Fill `out` [N, C, S, S] with every row's pixels; returns the rows that failed, with the reason."""
    rows = list(range(len(dataset)))
    chunk = max(1, min(256, len(rows) // max(1, 8 * workers)))
    jobs = [(dataset, rows[i : i + chunk], size) for i in range(0, len(rows), chunk)]
    bad: dict[int, str] = {}
    bar = tqdm(total=len(rows), desc=desc, unit="img", mininterval=2.0, disable=len(rows) < 500)
    results = map(_decode_chunk, jobs) if workers <= 1 else ProcessPoolExecutor(workers).map(_decode_chunk, jobs)
    for chunk_result in results:
        for row, pixels, error in chunk_result:
            if pixels is None:
                bad[row] = error
            else:
                out[row] = pixels
        bar.update(len(chunk_result))
    bar.close()
    return bad


def load_pixels(
    dataset: LabeledImageSet, size: int, cache_dir: str | Path | None = None, workers: int | None = None,
    use_cache: bool = True,
) -> DecodedPixels:
    """The dataset's pixels at `size`, from the cache when one exists, else decoded (and cached)."""
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    shape = (len(dataset), dataset.channels, size, size)
    if not use_cache:
        pixels = np.zeros(shape, dtype=np.uint8)
        return DecodedPixels(pixels, decode_all(dataset, size, pixels, workers, f"decode {dataset.name}"), None)
    key = fingerprint(dataset, size)
    folder = Path(cache_dir or default_cache_dir()) / f"{dataset.name}-{size}px-{key[:16]}"
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("fingerprint") == key:
            pixels = np.load(folder / "pixels.npy", mmap_mode="r")
            return DecodedPixels(pixels, {int(k): v for k, v in manifest["bad_rows"].items()}, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        pixels = np.lib.format.open_memmap(staging / "pixels.npy", mode="w+", dtype=np.uint8, shape=shape)
        bad = decode_all(dataset, size, pixels, workers, f"cache {dataset.name} at {size}px")
        pixels.flush()
        del pixels
        dataset.meta.assign(row=np.arange(len(dataset))).to_csv(staging / "index.csv", index=False)
        index_sha = hashlib.sha256((staging / "index.csv").read_bytes()).hexdigest()
        manifest = {
            "version": CACHE_VERSION, "fingerprint": key, "dataset": dataset.name, "task": dataset.task,
            "source_root": str(Path(dataset.root).resolve()), "count": len(dataset), "size": size,
            "channels": dataset.channels, "patients": int(len(set(dataset.patients.astype(str)))),
            "index_sha256": index_sha, "bad_rows": {str(k): v for k, v in sorted(bad.items())},
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if folder.exists():
            shutil.rmtree(folder)  # a stale cache with another fingerprint under the same name
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return DecodedPixels(np.load(folder / "pixels.npy", mmap_mode="r"), bad, folder)
