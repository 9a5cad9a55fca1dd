"""Images per second per core: (a) PNG decode + resize from the real sample images, (b) batches from the cache.

    python scripts/bench_data.py [--data $SEMIMED_SAMPLE_DATA] [--size 224] [--batch 64] [--json out.json]

(a) runs `read_image_file` + `resize_center_crop` (exactly what `semimed prepare` does per image) in this one
process, over each group of real images: the full-resolution ChestX-ray14 originals (1024x1024 8-bit gray), the
BreakHis originals (700x460 RGB), and the uploaders' downsampled ChestX-ray14 copies (64-512 px, mostly RGB).
(b) builds the decode-once cache of the same images (in a temporary folder), repeats its rows into a cache of
--min-mb MB (a handful of rows would sit in the CPU caches; a real cache does not), and reads random batches the
two ways training can: a fancy-indexed gather of a whole batch, and one row at a time (what a DataLoader
over `ImageView` does), stacked into a tensor. Both are single-threaded, so both numbers are per core; the
ratio compares them. The cache is read with a warm page cache (it was just written): on a cold disk, (b) is
bounded by the disk instead (S*S*C bytes per image: 50 KB at 224 px grayscale).

This is a measurement, not a test: no number here is asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from semimed.data.base import read_image_file
from semimed.data.cache import load_pixels, resize_center_crop


def _groups(data: Path) -> dict[str, tuple[list[Path], int]]:
    """Group name -> (image files, channels)."""
    chest = data / "chestxray14"
    breakhis = sorted((data / "breakhis").rglob("*.png"))
    small = [
        p
        for folder in ("images_512", "images_256", "images_128", "images_64")
        for p in sorted((chest / folder).rglob("*.png"))
    ]
    return {
        "chestxray14 1024px originals (gray)": (sorted((chest / "images").glob("*.png")), 1),
        "breakhis 700x460 originals (RGB)": (breakhis, 3),
        "chestxray14 downsampled copies (64-512px)": (small, 1),
    }


def bench_decode(files: list[Path], channels: int, size: int, min_seconds: float) -> tuple[float, int]:
    """(images/s, images timed) of decode + resize in this process; repeats the list until min_seconds."""
    for path in files[:2]:  # warm-up: imports, allocator, file cache
        resize_center_crop(read_image_file(path, channels), size)
    count, started = 0, time.perf_counter()
    while True:
        for path in files:
            resize_center_crop(read_image_file(path, channels), size)
            count += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return count / elapsed, count


def bench_cache(pixels: np.ndarray, batch: int, min_seconds: float) -> dict[str, float]:
    """images/s of random batches read from the cached array: whole-batch gather and row-by-row."""
    rng = np.random.default_rng(0)
    n = len(pixels)
    results = {}
    for mode in ("gather", "per_row"):
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < min_seconds:
            rows = rng.integers(0, n, batch)
            if mode == "gather":
                out = torch.from_numpy(np.ascontiguousarray(pixels[np.sort(rows)]))
            else:
                out = torch.stack([torch.from_numpy(np.ascontiguousarray(pixels[int(r)])) for r in rows])
            count += out.shape[0]
        results[mode] = count / (time.perf_counter() - started)
    return results


def _tile(rows: np.ndarray, path: Path, min_mb: int) -> np.ndarray:
    """A memory-mapped cache of at least `min_mb` MB made by repeating the real cached rows, so that the read
    benchmark runs from RAM like a real cache does, not from the CPU caches that a few rows would fit in."""
    repeats = max(1, int(np.ceil(min_mb * 2**20 / max(1, rows.nbytes))))
    out = np.lib.format.open_memmap(
        path, mode="w+", dtype=np.uint8, shape=(len(rows) * repeats, *rows.shape[1:])
    )
    for i in range(repeats):
        out[i * len(rows) : (i + 1) * len(rows)] = rows
    out.flush()
    del out
    return np.load(path, mmap_mode="r")


class _Files:
    """A minimal dataset over a list of files, for load_pixels (only what the cache reads)."""

    def __init__(self, files: list[Path], channels: int) -> None:
        import pandas as pd

        from semimed.data.base import LabeledImageSet

        root = Path(os.path.commonpath([str(p) for p in files]))
        meta = pd.DataFrame(
            {"path": [p.relative_to(root).as_posix() for p in files], "patient_id": [p.stem for p in files]}
        )
        meta.attrs["channels"] = channels
        self.dataset = LabeledImageSet(
            name="bench",
            task="bench",
            root=root,
            classes=["x"],
            multilabel=False,
            labels=np.zeros(len(files), np.int64),
            meta=meta,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("SEMIMED_SAMPLE_DATA", ""))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per measurement")
    parser.add_argument("--min-mb", type=int, default=512, help="size of the cache the reads run over")
    parser.add_argument("--json", default="", help="also write the numbers here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if not args.data:
        parser.error("give --data (the sample data folder) or set SEMIMED_SAMPLE_DATA")
    data = Path(args.data)
    groups = {name: value for name, value in _groups(data).items() if value[0]}
    if not groups:
        print(f"no sample images under {data}", file=sys.stderr)
        return 2

    report: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPU(s), {platform.platform()}",
        "python": platform.python_version(),
        "size": args.size,
        "batch": args.batch,
        "groups": {},
    }
    print(f"# data pipeline, {args.size}px, batch {args.batch}, one core each; {report['machine']}")
    print(
        "| images | n files | decode+resize img/s/core | cache gather img/s/core | cache per-row img/s/core "
        "| ratio (per-row / decode) |"
    )
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="semimed-bench-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (files, channels) in groups.items():
            decode_rate, timed = bench_decode(files, channels, args.size, args.seconds)
            cached = load_pixels(_Files(files, channels).dataset, args.size, tmp, workers=1, progress=False)
            if cached.bad_rows:
                print(f"warning: {len(cached.bad_rows)} undecodable file(s) in {name}", file=sys.stderr)
            tiled = _tile(
                np.asarray(cached.pixels), Path(tmp) / f"tiled{len(report['groups'])}.npy", args.min_mb
            )
            reads = bench_cache(tiled, args.batch, args.seconds)
            del tiled
            ratio = reads["per_row"] / decode_rate
            report["groups"][name] = {
                "files": len(files),
                "decode_per_s": decode_rate,
                "decoded": timed,
                "cache_gather_per_s": reads["gather"],
                "cache_per_row_per_s": reads["per_row"],
                "ratio_per_row": ratio,
                "ratio_gather": reads["gather"] / decode_rate,
            }
            print(
                f"| {name} | {len(files)} | {decode_rate:,.0f} | {reads['gather']:,.0f} | "
                f"{reads['per_row']:,.0f} | {ratio:,.0f}x |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
