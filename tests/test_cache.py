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
from semimed.data.cache import build as cache_build
from semimed.data.cache import lock as cache_lock
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
    from semimed.config import Config, DataConfig, TrainConfig
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
        ),
        train=TrainConfig(batch_size=4),  # no larger than the few training images
    )
    with pytest.raises(
        SemimedError, match=r"1 image\(s\) of the split cannot be decoded; first: .*00000003_000"
    ):
        build_run(cfg)


def test_interrupted_build_leaves_nothing_complete_and_resumes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(cache_build, "_SAVE_EVERY_S", 0.0)  # record progress after every chunk
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


# ----------------------------------------------------------------- rows whose file changed on disk (issue 9)


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the image files decoded from now on (in this process: the tests decode with workers=1)."""
    from semimed.data import base

    names: list[str] = []
    real = base.read_image_file

    def counting(path: Path, channels: int) -> np.ndarray:
        names.append(Path(path).name)
        return real(path, channels)

    monkeypatch.setattr(base, "read_image_file", counting)
    return names


def _replace_png(path: Path, value: int, later_s: int = 5) -> None:
    """Write a new 8x8 image of `value` at `path`, its mtime `later_s` s on (coarse-mtime filesystems)."""
    from PIL import Image

    before = os.stat(path).st_mtime_ns if path.exists() else 0
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)
    os.utime(path, ns=(before + later_s * 10**9, before + later_s * 10**9))


def _row_values(decoded) -> list[int]:
    return np.asarray(decoded.pixels).reshape(len(decoded.pixels), -1).max(axis=1).tolist()


def test_an_image_replaced_in_place_is_decoded_again_alone(
    tmp_path: Path, make_chest_release, monkeypatch, capfd
) -> None:
    root = make_chest_release(tmp_path / "nih", _rows(6), test=("00000006_000.png",))
    first = load_pixels(load_chestxray14(root), 8, tmp_path / "cache", workers=1)
    assert _row_values(first) == [0, 1, 2, 3, 4, 5]
    image = root / "images_001" / "images" / "00000003_000.png"
    size = image.stat().st_size
    _replace_png(image, 200)  # same path, new pixels; a flat 8x8 PNG keeps its byte size: only mtime differs
    assert image.stat().st_size == size
    capfd.readouterr()
    decodes = _count_decodes(monkeypatch)
    again = load_pixels(load_chestxray14(root), 8, tmp_path / "cache", workers=1)
    assert _row_values(again) == [0, 1, 200, 3, 4, 5]  # the new pixels for row 2, the cached ones elsewhere
    assert decodes == ["00000003_000.png"] and again.path == first.path and again.refreshed == 1
    err = capfd.readouterr().err
    assert f"1 image(s) changed on disk since they were cached; decoded them again into {first.path}" in err
    manifest = json.loads((first.path / "manifest.json").read_text())
    assert manifest["refreshed_rows"] == 1 and manifest["bad_rows"] == {}
    stats = np.load(first.path / "stats.npy")
    assert stats[2].tolist() == [image.stat().st_size, image.stat().st_mtime_ns]
    assert verify_cache(first.path) == []
    third = load_pixels(load_chestxray14(root), 8, tmp_path / "cache", workers=1)
    assert decodes == ["00000003_000.png"] and third.refreshed == 0  # recorded: not decoded a second time
    assert _row_values(third) == [0, 1, 200, 3, 4, 5] and capfd.readouterr().err == ""


def test_a_fixed_corrupt_image_is_no_longer_bad_and_a_broken_one_becomes_bad(
    tmp_path: Path, make_chest_release, monkeypatch
) -> None:
    root = make_chest_release(tmp_path / "nih", _rows(6), test=("00000006_000.png",))
    images = root / "images_001" / "images"
    (images / "00000002_000.png").write_bytes(b"")
    dataset = load_chestxray14(root)
    first = load_pixels(dataset, 8, tmp_path / "cache", workers=1)
    assert sorted(first.bad_rows) == [1]
    _replace_png(images / "00000002_000.png", 77)  # fixed
    (images / "00000005_000.png").write_bytes((images / "00000005_000.png").read_bytes()[:30])  # broken
    (images / "00000006_000.png").unlink()  # gone since the dataset was indexed
    decodes = _count_decodes(monkeypatch)
    again = load_pixels(dataset, 8, tmp_path / "cache", workers=1)
    assert sorted(again.bad_rows) == [4, 5] and int(again.pixels[1].max()) == 77
    assert sorted(decodes) == ["00000002_000.png", "00000005_000.png", "00000006_000.png"]
    assert "00000005_000.png: cannot decode" in again.bad_rows[4] and "not found" in again.bad_rows[5]
    assert _row_values(again) == [0, 77, 2, 3, 0, 0]  # bad rows are zeros, not the pixels from before
    manifest = json.loads((first.path / "manifest.json").read_text())
    assert set(manifest["bad_rows"]) == {"4", "5"} and manifest["bad_count"] == 2
    assert np.load(first.path / "stats.npy")[5].tolist() == [cache_module.MISSING] * 2
    _replace_png(images / "00000006_000.png", 66)  # back again
    assert sorted(load_pixels(dataset, 8, tmp_path / "cache", workers=1).bad_rows) == [4]


def test_a_subset_read_through_the_superset_cache_sees_a_changed_image(
    tmp_path: Path, make_chest_release, monkeypatch
) -> None:
    rows = [
        (name, labels, patient, "PA" if i % 2 == 0 else "AP")
        for i, (name, labels, patient, _) in enumerate(_rows(6))
    ]
    root = make_chest_release(tmp_path / "nih", rows, test=("00000006_000.png",))
    full = load_pixels(load_chestxray14(root), 8, tmp_path / "cache", workers=1)
    _replace_png(root / "images_001" / "images" / "00000003_000.png", 150)  # row 2 of the full set, PA
    decodes = _count_decodes(monkeypatch)
    pa = load_pixels(load_chestxray14(root, view="PA"), 8, tmp_path / "cache", workers=1)
    assert isinstance(pa.pixels, RowSubset) and pa.path == full.path  # read through the full set's cache
    assert _row_values(pa) == [0, 150, 4] and decodes == ["00000003_000.png"] and pa.refreshed == 1
    assert _row_values(load_pixels(load_chestxray14(root), 8, tmp_path / "cache", workers=1)) == [
        0,
        1,
        150,
        3,
        4,
        5,
    ]
    assert decodes == ["00000003_000.png"]  # the full set's cache was updated, not decoded twice


def test_an_npz_replaced_is_decoded_again(tmp_path: Path) -> None:
    from semimed.data.medmnist import load_medmnist

    def write(path: Path, offset: int) -> None:
        arrays = {}
        for split, count in (("train", 4), ("val", 2), ("test", 2)):
            arrays[f"{split}_images"] = np.stack(
                [np.full((8, 8), offset + i, np.uint8) for i in range(count)]
            )
            arrays[f"{split}_labels"] = (np.arange(count) % 2).reshape(-1, 1)
        np.savez(path, **arrays)

    path = tmp_path / "breastmnist.npz"
    write(path, 0)
    dataset = load_medmnist(path)
    assert dataset.source_files() == [path.resolve()] * 8
    first = load_pixels(dataset, 8, tmp_path / "cache", workers=1)
    assert _row_values(first)[:4] == [0, 1, 2, 3] and first.manifest["unchecked_rows"] == 0
    write(path, 100)
    stat = path.stat()
    os.utime(path, ns=(stat.st_mtime_ns + 5 * 10**9, stat.st_mtime_ns + 5 * 10**9))
    again = load_pixels(load_medmnist(path), 8, tmp_path / "cache", workers=1)
    assert again.refreshed == 8 and _row_values(again) == [100, 101, 102, 103, 100, 101, 100, 101]


def test_rows_without_a_source_file_are_served_unchecked(tmp_path: Path) -> None:
    dataset = _memory_set()
    assert dataset.source_file(3) is None  # a closure reader: no file semimed knows of
    first = load_pixels(dataset, 12, tmp_path, workers=1)
    assert first.manifest["unchecked_rows"] == 40
    assert (np.load(first.path / "stats.npy") == cache_module.NO_FILE).all()
    reader = CountingReader()
    assert load_pixels(_memory_set(reader=reader), 12, tmp_path, workers=1).refreshed == 0
    assert reader.calls == 0


def test_the_default_cache_folder_is_named_once(tmp_path: Path, monkeypatch, capfd) -> None:
    monkeypatch.setenv("SEMIMED_CACHE", str(tmp_path / "default"))
    load_pixels(_memory_set(), 12, tmp_path / "chosen", workers=1)
    assert "default cache" not in capfd.readouterr().err  # a folder the user chose: nothing to say
    first = load_pixels(_memory_set(), 12, workers=1)
    second = load_pixels(_memory_set(), 12, "", workers=1)
    err = capfd.readouterr().err
    assert first.path == second.path and first.path.parent == tmp_path / "default"
    assert err.count("default cache folder") == 1 and str(tmp_path / "default") in err
    assert "data.cache_dir" in err and "SEMIMED_CACHE" in err


def test_the_bad_row_message_names_the_cache(tmp_path: Path, make_chest_release) -> None:
    root = make_chest_release(tmp_path / "nih", _rows(6), test=("00000006_000.png",))
    (root / "images_001" / "images" / "00000002_000.png").write_bytes(b"")
    (root / "images_001" / "images" / "00000004_000.png").write_bytes(b"")
    dataset = load_chestxray14(root)
    decoded = load_pixels(dataset, 8, tmp_path / "cache", workers=1)
    message = decoded.bad_rows_message([3, 1])
    assert message.startswith("2 image(s) of the split cannot be decoded; first: ")
    assert "00000002_000.png" in message and f"Recorded in the cache {decoded.path}" in message
    assert "only it is decoded again" in message
    assert (
        f"semimed prepare chestxray14 --root {root.resolve()} --size 8 --out {tmp_path / 'cache'}" in message
    )
    uncached = load_pixels(dataset, 8, workers=1, use_cache=False)
    assert "decoded without a cache" in uncached.bad_rows_message([1])


def test_a_changed_image_in_a_cache_this_process_cannot_write(
    tmp_path: Path, make_chest_release, monkeypatch
) -> None:
    root = make_chest_release(tmp_path / "nih", _rows(6), test=("00000006_000.png",))
    folder = load_pixels(load_chestxray14(root), 8, tmp_path / "cache", workers=1).path
    _replace_png(root / "images_001" / "images" / "00000001_000.png", 9)

    def read_only(lock: Path) -> bool:
        raise PermissionError(13, "Permission denied", str(lock))

    monkeypatch.setattr(cache_lock, "_try_lock", read_only)  # what a shared read-only cache folder does
    with pytest.raises(SemimedError, match=r"1 image\(s\) changed on disk .* cannot update it") as caught:
        load_pixels(load_chestxray14(root), 8, tmp_path / "cache", workers=1)
    assert f"{folder}:" in str(caught.value) and "--rebuild" in str(caught.value)
