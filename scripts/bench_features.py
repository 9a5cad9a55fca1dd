"""Hand-crafted feature extraction throughput on real 224-px BreakHis images: images/s/core, 1 core vs all cores.

    python scripts/bench_features.py [--data $SEMIMED_SAMPLE_DATA] [--size 224] [--workers N] [--repeat 2]

The real BreakHis sample (700x460 RGB) is decoded once into a pixel cache at --size in a temporary folder (what a
run reads), its rows repeated --repeat times, and each extractor of semimed/classical/features.py (and the
feature set `all`) run over them with `extract_rows`: in this process (1 core), then over --workers joblib
(loky) processes (default: every core this process may use, as a classical run does). The feature cache is not
involved: every row is computed.

Two rates per run. Wall clock: images / elapsed seconds, and the speed-up ratio N-process / 1-process, which is
what a user waits for, and which other jobs on the machine lower. Per core: images / CPU-seconds spent by this
process and every process it started (the loky workers; read from /proc), which other jobs do not change: its
N-process / 1-process ratio is the parallel efficiency (1.0 = no overhead from chunking, pickling and
process start). Also timed: the per-row digest the feature cache takes of every row it serves (MB/s).

This is a measurement, not a test: no number here is asserted anywhere.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from semimed.classical.cache import row_digests
from semimed.classical.features import EXTRACTORS, FEATURE_SETS, extract_rows
from semimed.config import DataConfig
from semimed.data import load_dataset
from semimed.data.cache import default_workers, load_pixels

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and all its descendants alive now (Linux /proc)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(
            fields[1]
        )  # fields after "(comm)": state, ppid, ..., utime (12), stime (13)
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / TICKS
    mine, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in mine]
        mine.update(children)
        frontier.extend(children)
    return sum(times.get(pid, 0.0) for pid in mine)


def timed(pixels: np.ndarray, names: tuple[str, ...], workers: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process tree) to run extractors `names` over every row."""
    rows = np.arange(len(pixels))
    cpu, wall = cpu_seconds(), time.perf_counter()
    for name in names:
        extract_rows(pixels, rows, name, workers)
    return time.perf_counter() - wall, cpu_seconds() - cpu


def load() -> str:
    return ", ".join(f"{v:.1f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("SEMIMED_SAMPLE_DATA", ""))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=default_workers(), help="processes for the N-core run")
    parser.add_argument("--repeat", type=int, default=2, help="passes over the sample's images")
    args = parser.parse_args()

    if not args.data:
        parser.error("give --data (the sample data folder) or set SEMIMED_SAMPLE_DATA")
    dataset = load_dataset(DataConfig(dataset="breakhis", root=str(Path(args.data) / "breakhis")))
    with tempfile.TemporaryDirectory() as cache, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decoded = load_pixels(dataset, args.size, cache, progress=False)
        # A memory-mapped file, as a run reads its pixel cache (joblib then sends workers its file name).
        path = Path(cache) / "repeated.npy"
        np.save(path, np.concatenate([np.asarray(decoded.pixels)] * args.repeat))
        pixels = np.load(path, mmap_mode="r")
        run(pixels, len(dataset), args)


def run(pixels: np.ndarray, distinct: int, args: argparse.Namespace) -> None:
    n, workers = len(pixels), args.workers
    machine = platform.processor() or platform.machine()
    print(
        f"{n} BreakHis images ({distinct} x {args.repeat}) at {args.size} px RGB, memory-mapped; {machine}, "
    )
    print(f"{os.cpu_count()} logical CPUs, N = {workers} loky processes; load average at start {load()}\n")
    timed(pixels[:8], tuple(EXTRACTORS), 1)  # warm-up: imports, allocators
    timed(pixels[:64], ("glcm",), workers)  # start the worker pool (loky keeps it for the next calls)
    header = (
        f"{'extractor':<9} {'dims':>4} | {'wall img/s, 1':>13} {f'wall img/s, {workers}':>13} {'speed-up':>8} | "
        f"{'img/s/core, 1':>13} {f'img/s/core, {workers}':>13} {'efficiency':>10}"
    )
    print(header)
    print("-" * len(header))
    jobs = [(name, (name,)) for name in EXTRACTORS] + [("all", FEATURE_SETS["all"])]
    for label, names in jobs:
        dims = sum(extract_rows(pixels[:1], np.array([0]), name).shape[1] for name in names)
        wall_1, cpu_1 = timed(pixels, names, 1)
        wall_n, cpu_n = timed(pixels, names, workers)
        print(
            f"{label:<9} {dims:>4} | {n / wall_1:>13.1f} {n / wall_n:>13.1f} {wall_1 / wall_n:>8.2f} | "
            f"{n / cpu_1:>13.1f} {n / cpu_n:>13.1f} {cpu_1 / cpu_n:>10.2f}"
        )
    print(f"\nload average (1, 5, 15 min) at the end: {load()}")
    started = time.perf_counter()
    row_digests(pixels, np.arange(n))
    seconds = time.perf_counter() - started
    rate = pixels.nbytes / seconds / 1e6
    print(f"row digests (the feature cache's freshness check): {rate:.0f} MB/s, {n / seconds:.0f} img/s")


if __name__ == "__main__":
    main()
