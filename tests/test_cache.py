"""The decode-once cache: resize policy, reuse, subsets, corrupt files, atomic/resumable builds, the build lock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from semimed.data import cache as cache_module
from semimed.data.base import LabeledImageSet
from semimed.data.cache import (
    RowSubset,
    cache_folder,
    fingerprint,
    load_pixels,
    resize_center_crop,
    verify_cache,
)
from semimed.data.chestxray14 import load_chestxray14
from semimed.errors import SemimedError


def _rows(n: int) -> list[tuple[str, str, int, str]]:
    return [(f"{i + 1:08d}_000.png", "Mass" if i % 3 else "No Finding", i + 1, "PA") for i in range(n)]


class CountingReader:
    """Row i -> a 12x12 gray image of value i; counts calls and can stop a build at a given row."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.calls, self.stop_at = 0, stop_at

    def __call__(self, row: int) -> np.ndarray:
        if row == self.stop_at:
            raise KeyboardInterrupt  # what Ctrl-C or a killed job does half-way
        self.calls += 1
        return np.full((12, 12, 1), row, np.uint8)


def _memory_set(n: int = 40, reader=None, name: str = "memset", paths=None) -> LabeledImageSet:
    import pandas as pd

    paths = paths if paths is not None else [f"img/{i:03d}.png" for i in range(n)]
    meta = pd.DataFrame({"path": paths, "patient_id": [f"p{i // 2}" for i in range(len(paths))]})
    meta.attrs["channels"] = 1
    return LabeledImageSet(
        name=name,
        task="t",
        root=Path("/nonexistent/memset"),
        classes=["a", "b"],
        multilabel=False,
        labels=np.arange(len(paths)) % 2,
        meta=meta,
        reader=reader or CountingReader(),
    )


def test_resize_center_crop_keeps_the_aspect_ratio() -> None:
    wide = np.zeros((4, 8, 1), np.uint8)
    wide[:, :, 0] = np.arange(8)  # columns 0..7; a 4x4 centre crop keeps columns 2..5 without resizing
    assert resize_center_crop(wide, 4)[0].tolist() == [[2, 3, 4, 5]] * 4
    tall = np.zeros((16, 8, 3), np.uint8)
    tall[:4] = 255  # the top quarter is cropped away when the shorter side is already 8
    out = resize_center_crop(tall, 8)
    assert out.shape == (3, 8, 8) and int(out.max()) == 0
    flat = resize_center_crop(np.full((1024, 1024, 1), 77, np.uint8), 32)
    assert flat.shape == (1, 32, 32) and (flat == 77).all()


def test_build_reuse_and_manifest(tmp_path: Path) -> None:
    reader = CountingReader()
    dataset = _memory_set(reader=reader)
    first = load_pixels(dataset, 12, tmp_path, workers=1)
    assert reader.calls == 40 and first.path == cache_folder(dataset, 12, tmp_path)
    assert [int(first.pixels[i].max()) for i in (0, 17, 39)] == [0, 17, 39]
    manifest = json.loads((first.path / "manifest.json").read_text())
    assert (manifest["count"], manifest["size"], manifest["channels"], manifest["patients"]) == (
        40,
        12,
        1,
        20,
    )
    assert manifest["dataset"] == "memset" and manifest["bad_rows"] == {} and manifest["missing_dropped"] == 0
    assert manifest["source_root"] == "/nonexistent/memset" and verify_cache(first.path) == []
    assert sorted(os.listdir(tmp_path)) == [first.path.name]  # no staging or lock left behind
    second = load_pixels(dataset, 12, tmp_path, workers=1)
    assert reader.calls == 40 and second.path == first.path  # read from the cache, nothing decoded again
    assert isinstance(second.pixels, np.memmap) and np.array_equal(second.pixels, first.pixels)
    assert fingerprint(dataset, 12) != fingerprint(dataset, 16)
    assert fingerprint(dataset, 12) != fingerprint(_memory_set(paths=[f"x/{i}.png" for i in range(40)]), 12)


def test_subset_reads_the_superset_cache(tmp_path: Path) -> None:
    full = _memory_set(reader=CountingReader())
    load_pixels(full, 12, tmp_path, workers=1)
    reader = CountingReader()
    picked = [5, 1, 30]
    subset = _memory_set(reader=reader, paths=[f"img/{i:03d}.png" for i in picked])
    decoded = load_pixels(subset, 12, tmp_path, workers=1)
    assert reader.calls == 0 and isinstance(decoded.pixels, RowSubset)
    assert decoded.pixels.shape == (3, 1, 12, 12) and len(decoded.pixels) == 3
    assert [int(decoded.pixels[i].max()) for i in range(3)] == picked
    assert np.asarray(decoded.pixels).reshape(3, -1).max(axis=1).tolist() == picked
    outsider = _memory_set(reader=CountingReader(), paths=["img/005.png", "img/999.png"])
    assert load_pixels(outsider, 12, tmp_path, workers=1).path != decoded.path  # not a subset: its own cache


def test_corrupt_and_zero_byte_images_are_listed_not_fatal(tmp_path: Path, make_chest_release) -> None:
    root = make_chest_release(tmp_path / "nih", _rows(6), test=("00000006_000.png",))
    images = root / "images_001" / "images"
    (images / "00000002_000.png").write_bytes(b"")
    (images / "00000004_000.png").write_bytes((images / "00000004_000.png").read_bytes()[:30])
    dataset = load_chestxray14(root)
    decoded = load_pixels(dataset, 8, tmp_path / "cache", workers=2)  # the parallel path
    assert sorted(decoded.bad_rows) == [1, 3]
    assert "00000002_000.png" in decoded.bad_rows[1] and "00000004_000.png" in decoded.bad_rows[3]
    assert [int(decoded.pixels[i].max()) for i in (0, 2, 4, 5)] == [0, 2, 4, 5]
    assert int(decoded.pixels[1].max()) == 0  # left as zeros
    manifest = json.loads((decoded.path / "manifest.json").read_text())
    assert manifest["bad_count"] == 2 and set(manifest["bad_rows"]) == {"1", "3"}
    serial = load_pixels(dataset, 8, workers=1, use_cache=False)
    assert np.array_equal(np.asarray(serial.pixels), np.asarray(decoded.pixels))
    assert serial.bad_rows.keys() == decoded.bad_rows.keys()


@pytest.mark.filterwarnings("ignore:no positive training image")
def test_training_on_a_split_with_a_corrupt_image_stops_naming_it(tmp_path: Path, make_chest_release) -> None:
    from semimed.config import Config, DataConfig
    from semimed.experiment import build_run

    root = make_chest_release(tmp_path / "nih", _rows(12), test=("00000011_000.png", "00000012_000.png"))
    (root / "images_001" / "images" / "00000003_000.png").write_bytes(b"")
    cfg = Config(
        data=DataConfig(
            dataset="chestxray14",
            root=str(root),
            image_size=8,
            fraction=1.0,
            cache_dir=str(tmp_path / "cache"),
        )
    )
    with pytest.raises(
        SemimedError, match=r"1 image\(s\) of the split cannot be decoded; first: .*00000003_000"
    ):
        build_run(cfg)


def test_interrupted_build_leaves_nothing_complete_and_resumes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(cache_module, "_SAVE_EVERY_S", 0.0)  # record progress after every chunk
    dataset = _memory_set(reader=CountingReader(stop_at=12))  # chunks of 5 rows: rows 0-9 get written
    with pytest.raises(KeyboardInterrupt):
        load_pixels(dataset, 12, tmp_path, workers=1)
    folder = cache_folder(dataset, 12, tmp_path)
    assert sorted(os.listdir(tmp_path)) == [f".{folder.name}.partial"]  # hidden, and the lock is released
    reader = CountingReader()
    resumed = load_pixels(_memory_set(reader=reader), 12, tmp_path, workers=1)
    assert reader.calls == 30 and resumed.manifest["resumed_rows"] == 10
    assert np.asarray(resumed.pixels).reshape(40, -1).max(axis=1).tolist() == list(range(40))
    assert sorted(os.listdir(tmp_path)) == [folder.name] and verify_cache(folder) == []
    # A staging folder of another build (different fingerprint) is discarded, not mixed in.
    staging = tmp_path / "other" / f".{folder.name}.partial"
    staging.mkdir(parents=True)
    (staging / "fingerprint").write_text("something else\n")
    reader = CountingReader()
    load_pixels(_memory_set(reader=reader), 12, tmp_path / "other", workers=1)
    assert reader.calls == 40


def test_rebuild_and_tampered_index(tmp_path: Path) -> None:
    dataset = _memory_set()
    folder = load_pixels(dataset, 12, tmp_path, workers=1).path
    index = folder / "index.csv"
    index.write_text(index.read_text().replace("img/003.png", "img/zzz.png"))
    assert any("sha256 differs" in problem for problem in verify_cache(folder))
    reader = CountingReader()
    rebuilt = load_pixels(_memory_set(reader=reader), 12, tmp_path, workers=1, rebuild=True)
    assert reader.calls == 40 and verify_cache(rebuilt.path) == []


def test_the_build_lock(tmp_path: Path) -> None:
    dataset = _memory_set()
    folder = cache_folder(dataset, 12, tmp_path)
    lock = tmp_path / f".{folder.name}.lock"
    tmp_path.mkdir(exist_ok=True)
    lock.write_text(f"{socket.gethostname()} pid {os.getpid()}\n")  # a live holder
    with pytest.raises(SemimedError, match=rf"another process \({socket.gethostname()} pid {os.getpid()}\)"):
        load_pixels(dataset, 12, tmp_path, workers=1, wait_for_lock=False)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    lock.write_text(f"{socket.gethostname()} pid {int(dead.stdout)}\n")  # its process is gone: a stale lock
    decoded = load_pixels(dataset, 12, tmp_path, workers=1, wait_for_lock=False)
    assert decoded.path == folder and not lock.exists()
