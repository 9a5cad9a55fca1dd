"""No silent wrong answers from the data: hand-made split files, linked folders, 16-bit and oversized images,
empty MedMNIST arrays, and cache locks left on shared storage by a dead node of another host."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from semimed.cli import main
from semimed.config import load_config
from semimed.data.base import read_image_file
from semimed.data.breakhis import load_breakhis
from semimed.data.cache import cache_folder, load_pixels
from semimed.data.cache import lock as cache_lock
from semimed.data.chestxray14 import load_chestxray14
from semimed.data.medmnist import load_medmnist
from semimed.data.splits import Split, make_split
from semimed.errors import SemimedError
from semimed.experiment import load_split, run_training

BREASTMNIST = Path(__file__).resolve().parent.parent / "semimed" / "demo_data" / "breastmnist.npz"


# ------------------------------------------------------------------------------------ 1. hand-made split files


def _edited_split(dataset, tmp_path: Path, edit) -> Path:
    """A split of `dataset` saved as JSON after `edit(payload)` changed its lists, as a hand-made file would."""
    payload = json.loads(make_split(dataset, 0.5, seed=0).to_json())
    edit(payload)
    path = tmp_path / "hand.json"
    path.write_text(json.dumps(payload))
    return path


def _leak_test_into_train(payload: dict) -> None:
    payload["train"].append(payload["test"][0])
    payload["labeled"].append(payload["test"][0])


def _label_a_val_image(payload: dict) -> None:
    payload["labeled"].append(payload["val"][0])


def _unlabel_a_test_image(payload: dict) -> None:
    payload["unlabeled"].append(payload["test"][1])


def _label_and_unlabel(payload: dict) -> None:
    payload["unlabeled"].append(payload["labeled"][0])


def _test_twice(payload: dict) -> None:
    payload["test"].append(payload["test"][0])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            _leak_test_into_train,
            r"split parts 'train' and 'test' share 1 image\(s\), e\.g\. '(?P<row>[^']+)'",
        ),
        (
            _label_a_val_image,
            r"split part 'labeled' has 1 image\(s\) not in 'train', e\.g\. '(?P<row>[^']+)'",
        ),
        (
            _unlabel_a_test_image,
            r"split part 'unlabeled' has 1 image\(s\) not in 'train', e\.g\. '(?P<row>[^']+)'",
        ),
        (
            _label_and_unlabel,
            r"split parts 'labeled' and 'unlabeled' share 1 image\(s\), e\.g\. '(?P<row>[^']+)'",
        ),
        (_test_twice, r"split part 'test' lists image '(?P<row>[^']+)' twice"),
    ],
)
def test_a_split_file_whose_parts_overlap_is_refused_on_load(
    make_single_label_set, tmp_path: Path, edit, message: str
) -> None:
    dataset = make_single_label_set()
    path = _edited_split(dataset, tmp_path, edit)
    with pytest.raises(SemimedError, match=rf"^{path}: {message}") as caught:
        Split.load(path)
    assert "\n" not in str(caught.value)
    row = re.search(message, str(caught.value))["row"]
    assert row in set(dataset.meta["path"])  # the example names a real row of the split


def test_a_split_file_that_puts_one_patient_in_train_and_test_is_refused(
    make_single_label_set, tmp_path: Path
) -> None:
    dataset = make_single_label_set()
    split = make_split(dataset, 0.5, seed=0)
    moved = split.test[0]  # one image of a test patient moves to train: parts stay disjoint, the patient not
    patient = dataset.meta.set_index("path").loc[moved, "patient_id"]

    def move(payload: dict) -> None:
        payload["test"].remove(moved)
        payload["train"].append(moved)
        payload["unlabeled"].append(moved)

    path = _edited_split(dataset, tmp_path, move)
    Split.load(path)  # the parts alone are consistent
    cfg = load_config(None, [f"data.split_file={path}"])
    with pytest.raises(
        SemimedError,
        match=rf"^{path}: patient '{patient}' has images in both split parts 'train' \('{moved}'\) and 'test' "
        r"\('[^']+'\); train/val/test must be patient-disjoint$",
    ):
        load_split(cfg, dataset)


def test_a_split_file_naming_rows_absent_from_the_dataset_names_the_file(
    make_single_label_set, tmp_path: Path
) -> None:
    dataset = make_single_label_set()
    path = _edited_split(dataset, tmp_path, lambda p: p["test"].append("c9/p999/000.png"))
    with pytest.raises(
        SemimedError,
        match=rf"^{path}: split part 'test' names 1 image\(s\) absent from the dataset at .*'c9/p999/000\.png'$",
    ):
        load_split(load_config(None, [f"data.split_file={path}"]), dataset)


def test_training_with_a_leaky_split_file_stops_before_writing(demo_roots, tmp_path: Path) -> None:
    dataset = load_breakhis(demo_roots["breakhis"])
    path = _edited_split(dataset, tmp_path, _leak_test_into_train)
    cfg = load_config(
        None,
        [
            f"data.root={demo_roots['breakhis']}",
            f"data.split_file={path}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "model.backbone=small_cnn",
            "data.image_size=16",
            "train.steps=2",
            "train.eval_every=2",
            "train.batch_size=8",
            "train.device=cpu",
            "train.loader_workers=0",
        ],
    )
    with pytest.raises(SemimedError, match=rf"^{path}: split parts 'train' and 'test' share 1 image"):
        run_training(cfg, tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------ 2. linked folders


PATIENTS = (
    "benign/SOB/adenosis/SOB_B_A_14-22549AB",
    "benign/SOB/fibroadenoma/SOB_B_F_14-14134E",
    "malignant/SOB/lobular_carcinoma/SOB_M_LC_14-12204",
)


@pytest.fixture
def breakhis_copy(sample_data: Path, tmp_path: Path) -> Path:
    """Three patients of the real sample BreakHis tree, copied under tmp_path/root (the data root)."""
    breast = sample_data / "breakhis" / "BreaKHis_v1" / "histology_slides" / "breast"
    root = tmp_path / "root"
    for patient in PATIENTS:
        shutil.copytree(breast / patient, root / "BreaKHis_v1" / "histology_slides" / "breast" / patient)
    return root


def _replace_by_link(folder: Path, store: Path) -> None:
    """Move `folder` to `store` and leave a symbolic link to it in its place."""
    store.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(folder, store)
    folder.symlink_to(store, target_is_directory=True)


def test_breakhis_follows_a_linked_patient_folder_inside_the_root(breakhis_copy: Path) -> None:
    plain = load_breakhis(breakhis_copy)
    assert plain.meta["patient_id"].nunique() == 3
    patient = breakhis_copy / "BreaKHis_v1" / "histology_slides" / "breast" / PATIENTS[0]
    _replace_by_link(patient, breakhis_copy / "store" / patient.name)
    linked = load_breakhis(breakhis_copy)
    assert linked.meta["path"].tolist() == plain.meta["path"].tolist()  # same rows, same relative paths
    assert linked.meta["patient_id"].tolist() == plain.meta["patient_id"].tolist()
    assert np.array_equal(linked.labels, plain.labels)
    assert np.array_equal(linked.read_image(0), plain.read_image(0))


def test_breakhis_refuses_a_link_that_leads_outside_the_root(breakhis_copy: Path, tmp_path: Path) -> None:
    patient = breakhis_copy / "BreaKHis_v1" / "histology_slides" / "breast" / PATIENTS[2]
    _replace_by_link(patient, tmp_path / "elsewhere" / patient.name)
    with pytest.raises(
        SemimedError, match=rf"^{patient}: link leads outside the data root {breakhis_copy} \(to .*elsewhere"
    ):
        load_breakhis(breakhis_copy)


def test_breakhis_refuses_a_looping_link(breakhis_copy: Path) -> None:
    patient = breakhis_copy / "BreaKHis_v1" / "histology_slides" / "breast" / PATIENTS[1]
    (patient / "again").symlink_to(patient.parent, target_is_directory=True)
    with pytest.raises(SemimedError, match=rf"^{patient / 'again'}: link loops back to {patient.parent}"):
        load_breakhis(breakhis_copy)


def test_chestxray14_follows_a_linked_image_folder(make_chest_release, tmp_path: Path) -> None:
    rows = [(f"{i + 1:08d}_000.png", "Mass" if i % 2 else "No Finding", i + 1, "PA") for i in range(6)]
    root = make_chest_release(tmp_path / "nih", rows, test=("00000006_000.png",))
    _replace_by_link(root / "images_001" / "images", root / "store" / "images")
    with pytest.warns(RuntimeWarning, match="6 image name"):  # the store inside root is walked too
        dataset = load_chestxray14(root)
    assert len(dataset) == 6
    assert dataset.meta["path"].tolist() == [f"images_001/images/{name}" for name, *_ in rows]


def test_chestxray14_refuses_a_link_outside_the_root_even_when_dropping_missing_rows(
    make_chest_release, tmp_path: Path
) -> None:
    rows = [(f"{i + 1:08d}_000.png", "Mass" if i % 2 else "No Finding", i + 1, "PA") for i in range(6)]
    root = make_chest_release(tmp_path / "nih", rows, test=("00000006_000.png",))
    link = root / "images_001" / "images"
    _replace_by_link(link, tmp_path / "elsewhere" / "images")
    # drop_missing=True would otherwise drop all six rows' images as "missing" with a warning, not an error.
    with pytest.raises(SemimedError, match=rf"^{link}: link leads outside the data root {root}"):
        load_chestxray14(root, drop_missing=True)


# ------------------------------------------------------------------------------------ 3-4. image files


_VALUES16 = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)


def _png16(path: Path) -> Path:
    """A 16-bit grayscale PNG whose values span 0..65535: clipped to 8 bits, almost all of it is white."""
    Image.fromarray(_VALUES16).save(path)
    assert Image.open(path).mode == "I;16"
    return path


def _mapped16() -> np.ndarray:
    """_png16's pixels as semimed/data/intensity.py documents: per-image 0.5/99.5 percentiles -> 0..255, rint."""
    x = _VALUES16.astype(np.float64)
    lo, hi = np.percentile(x, [0.5, 99.5])
    return np.rint((np.clip(x, lo, hi) - lo) / (hi - lo) * 255).astype(np.uint8)


def _bomb(path: Path) -> Path:
    """A 67-byte PNG whose header says 20000x20000 (over PIL's decompression-bomb limit); never decoded."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", 20000, 20000)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR's CRC
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("channels", [1, 3])
def test_a_16_bit_image_is_mapped_by_its_percentiles_not_clipped(tmp_path: Path, channels: int) -> None:
    # New API, imported here so that the other tests of this file still run against the old code.
    from semimed.data.base import check_image_file

    path = _png16(tmp_path / "x.png")
    check_image_file(path)
    pixels = read_image_file(path, channels)
    assert pixels.shape == (64, 64, channels)
    for k in range(channels):
        np.testing.assert_array_equal(pixels[:, :, k], _mapped16())
    assert (pixels == 255).mean() < 0.01  # PIL's clip made ~98% of it white


def test_an_image_over_the_decompression_bomb_limit_is_one_line(tmp_path: Path) -> None:
    from semimed.data.base import check_image_file

    path = _bomb(tmp_path / "huge.png")
    assert path.stat().st_size < 100
    for read in (lambda: read_image_file(path, 1), lambda: check_image_file(path)):
        with pytest.raises(
            SemimedError, match=rf"^{path}: image too large to decode \(Image size \(400000000 "
        ):
            read()


def test_unidentifiable_and_truncated_files_are_one_line(tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(SemimedError, match=rf"^{text}: cannot decode image \(cannot identify image file"):
        read_image_file(text, 1)
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)).save(good, "PNG")
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.getvalue()[:200])
    with pytest.raises(SemimedError, match=rf"^{cut}: cannot decode image \("):
        read_image_file(cut, 1)


def test_a_16_bit_file_in_a_dataset_tree_is_cached_mapped_not_clipped(
    make_chest_release, tmp_path: Path
) -> None:
    from semimed.data.cache import resize_center_crop

    rows = [(f"{i + 1:08d}_000.png", "Mass" if i % 2 else "No Finding", i + 1, "PA") for i in range(6)]
    root = make_chest_release(tmp_path / "nih", rows, test=("00000006_000.png",))
    _png16(root / "images_001" / "images" / "00000002_000.png")
    decoded = load_pixels(load_chestxray14(root), 8, tmp_path / "cache", workers=1)
    assert decoded.bad_rows == {}
    # The percentile mapping at full size, then the cache's resize like any 8-bit image.
    np.testing.assert_array_equal(decoded.pixels[1], resize_center_crop(_mapped16()[:, :, None], 8))
    assert (np.asarray(decoded.pixels[0]) == 0).all()  # its 8-bit neighbours are untouched


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step small-CNN run on the packaged BreastMNIST (grayscale), to predict and explain with."""
    folder = tmp_path_factory.mktemp("tiny")
    cfg = load_config(
        None,
        [
            "data.dataset=medmnist",
            f"data.root={BREASTMNIST}",
            f"data.cache_dir={folder / 'cache'}",
            "data.fraction=0.2",
            "model.backbone=small_cnn",
            "data.image_size=16",
            "train.steps=2",
            "train.eval_every=2",
            "train.batch_size=8",
            "train.device=cpu",
            "train.loader_workers=0",
        ],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 2 steps: some metrics undefined
        run_training(cfg, folder / "run", show_progress=False)
    return folder / "run"


@pytest.mark.parametrize("command", ["predict", "explain"])
def test_predict_and_explain_refuse_oversized_images(
    tiny_run: Path, tmp_path: Path, capsys, command: str
) -> None:
    before = sorted(p.name for p in tiny_run.iterdir())
    path = _bomb(tmp_path / "huge.png")
    assert main([command, str(tiny_run), "--images", str(path)]) == 2
    err = capsys.readouterr().err
    reason = "image too large to decode (Image size (400000000 pixels)"
    assert f"semimed: error: {path}: {reason}" in err and "Traceback" not in err
    assert sorted(p.name for p in tiny_run.iterdir()) == before  # no predict.csv, no gradcam folder


def test_predict_and_explain_score_a_16_bit_png_as_its_mapped_8_bit_png(
    tiny_run: Path, tmp_path: Path, sample_data: Path
) -> None:
    """A real radiograph as a 16-bit PNG (v = 40 * p + 1000, two outlier pixels) scores exactly as the 8-bit PNG
    of its documented mapping (semimed/data/intensity.py), written here by hand."""
    import pandas as pd

    from semimed.explain import explain_run

    real = sorted((sample_data / "chestxray14" / "images").glob("*.png"))[0]
    with Image.open(real) as image:
        values = np.asarray(image.convert("L"))[::8, ::8].astype(np.uint16) * 40 + 1000
    values[0, 0], values[-1, -1] = 65535, 0
    Image.fromarray(values).save(tmp_path / "x16.png")
    x = values.astype(np.float64)
    lo, hi = np.percentile(x, [0.5, 99.5])
    Image.fromarray(np.rint((np.clip(x, lo, hi) - lo) / (hi - lo) * 255).astype(np.uint8)).save(
        tmp_path / "x8.png"
    )
    out = tmp_path / "p.csv"
    assert main(["predict", str(tiny_run), "--images", str(tmp_path / "x16.png"), str(tmp_path / "x8.png"),
                 "--out", str(out), "--device", "cpu"]) == 0  # fmt: skip
    scores = pd.read_csv(out).drop(columns="image").to_numpy()
    assert scores.shape[0] == 2 and np.array_equal(scores[0], scores[1])
    wide, narrow = explain_run(tiny_run, [tmp_path / "x16.png", tmp_path / "x8.png"], tmp_path / "cam")
    assert (wide.prediction, wide.score) == (narrow.prediction, narrow.score)


# ------------------------------------------------------------------------------------ 5. MedMNIST arrays


def _npz(tmp_path: Path, **changes: np.ndarray) -> Path:
    arrays = dict(np.load(BREASTMNIST))
    arrays.update(changes)
    path = tmp_path / "breastmnist.npz"
    np.savez(path, **arrays)
    return path


def test_a_medmnist_file_without_training_images_is_refused(tmp_path: Path) -> None:
    empty = np.zeros((0, 28, 28), np.uint8)
    path = _npz(tmp_path, train_images=empty, train_labels=np.zeros((0, 1), np.uint8))
    with pytest.raises(SemimedError, match=rf"^{path}: train_images holds 0 images \(shape \[0, 28, 28\]\)"):
        load_medmnist(path)
    path = _npz(tmp_path, test_images=empty, test_labels=np.zeros((0, 1), np.uint8))
    with pytest.raises(SemimedError, match=rf"^{path}: test_images holds 0 images"):
        load_medmnist(path)


def test_a_medmnist_file_with_an_empty_val_loads(tmp_path: Path) -> None:
    path = _npz(tmp_path, val_images=np.zeros((0, 28, 28), np.uint8), val_labels=np.zeros((0, 1), np.uint8))
    dataset = load_medmnist(path)
    assert len(dataset) == 546 + 156 and set(dataset.official_split) == {"train", "test"}


def test_medmnist_label_arrays_that_do_not_match_the_images_are_refused(tmp_path: Path) -> None:
    path = _npz(tmp_path, val_labels=np.zeros((77, 1), np.uint8))
    with pytest.raises(SemimedError, match=rf"^{path}: val_labels has 77 rows but val_images has 78$"):
        load_medmnist(path)


# ------------------------------------------------------------------------------------ 6. the cache lock


def _foreign_lock(folder: Path, age_s: float) -> Path:
    """A lock beside `folder` held by pid 4242 of another host, last refreshed `age_s` seconds ago."""
    lock = cache_lock.lock_path(folder)
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text("otherhost pid 4242\n")
    stamp = time.time() - age_s
    os.utime(lock, (stamp, stamp))
    return lock


def test_a_cache_lock_of_a_dead_node_on_another_host_is_taken_over(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "cache" / "memset-8px-0123"
    lock = _foreign_lock(folder, age_s=3600)
    assert cache_lock.take_lock(folder, wait=False, stale_after_s=60) is None
    assert lock.read_text().strip() == f"{socket.gethostname()} pid {os.getpid()}"
    err = capsys.readouterr().err
    assert (
        f"taking over {lock} from otherhost pid 4242, refreshed 3600 s ago (not refreshed for 3600 s" in err
    )
    cache_lock.release_lock(folder)
    assert not lock.exists()


def test_a_fresh_cache_lock_of_another_host_is_waited_on(tmp_path: Path, capsys, monkeypatch) -> None:
    folder = tmp_path / "cache" / "memset-8px-0123"
    lock = _foreign_lock(folder, age_s=5)
    with pytest.raises(SemimedError, match=r"another process \(otherhost pid 4242\) is building this cache"):
        cache_lock.take_lock(folder, wait=False, stale_after_s=60)
    monkeypatch.setattr(cache_lock, "_WAIT_POLL_S", 0.01)
    polls: list[int] = []

    def ready():  # the holder finishes its cache at the third look
        polls.append(1)
        return "built by otherhost" if len(polls) == 3 else None

    assert cache_lock.take_lock(folder, wait=True, ready=ready, stale_after_s=60) == "built by otherhost"
    err = capsys.readouterr().err
    assert err.count("waiting for otherhost pid 4242, refreshed 5 s ago to finish writing") == 1  # said once
    assert lock.read_text() == "otherhost pid 4242\n"  # not taken over
    # The same lock under a shorter stale timeout is taken over.
    assert cache_lock.take_lock(folder, wait=False, stale_after_s=1) is None
    assert "not refreshed for 5 s, stale after 1 s" in capsys.readouterr().err
    cache_lock.release_lock(folder)


def test_load_pixels_takes_over_a_dead_foreign_lock(make_single_label_set, tmp_path: Path) -> None:
    dataset = make_single_label_set(num_classes=2, patients_per_class=2, images_per_patient=2, size=12)
    folder = cache_folder(dataset, 12, tmp_path)
    lock = _foreign_lock(folder, age_s=3600)
    decoded = load_pixels(dataset, 12, tmp_path, workers=1, wait_for_lock=False)
    assert decoded.path == folder and decoded.bad_rows == {} and not lock.exists()


def test_the_heartbeat_keeps_a_held_lock_fresh_and_stops_once_released(tmp_path: Path) -> None:
    from semimed.lockfile import Heartbeat

    lock = tmp_path / ".x.lock"
    lock.write_text(f"{socket.gethostname()} pid {os.getpid()}\n")
    os.utime(lock, (0, 0))
    beat = Heartbeat(lock, interval_s=0.01)
    deadline = time.monotonic() + 30
    while lock.stat().st_mtime == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lock.stat().st_mtime > 0
    lock.write_text("otherhost pid 1\n")  # taken over by another process: its lock is not ours to refresh
    beat._thread.join(timeout=30)
    assert not beat._thread.is_alive()
    beat.stop()
