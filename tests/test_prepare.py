"""`semimed prepare`: the cache a training run finds, release totals, missing rows, and multi-label training on
a prepared ChestX-ray14-format release through to the report."""

from __future__ import annotations

import json
import os
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest

from semimed.cli import main
from semimed.config import Config, DataConfig, ModelConfig, TrainConfig
from semimed.data import load_dataset
from semimed.data.breakhis import RELEASE_IMAGES, load_breakhis
from semimed.data.cache import cache_folder
from semimed.data.chestxray14 import FINDINGS
from semimed.errors import SemimedError
from semimed.prepare import check_totals, prepare


@pytest.fixture(scope="module")
def chest_sample(sample_data: Path) -> Path:
    root = sample_data / "chestxray14"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    return root


def test_prepare_the_chest_sample_is_the_cache_training_finds(chest_sample: Path, tmp_path: Path) -> None:
    with pytest.raises(SemimedError, match=r"111680 of 112120 rows name an image not found"):
        prepare("chestxray14", chest_sample, 16, tmp_path, progress=False)
    assert not any(tmp_path.iterdir())  # it stopped before decoding anything
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = prepare(
            "chestxray14", chest_sample, 16, tmp_path, drop_missing=True, workers=2, progress=False
        )
        data_cfg = DataConfig(
            dataset="chestxray14",
            root=str(chest_sample),
            image_size=16,
            options={"drop_missing": True},
            cache_dir=str(tmp_path),
        )
        assert cache_folder(load_dataset(data_cfg), 16, data_cfg.cache_dir) == result.folder
        again = prepare("chestxray14", chest_sample, 16, tmp_path, drop_missing=True, progress=False)
        pa = prepare("chestxray14", chest_sample, 16, tmp_path, drop_missing=True, view="PA", progress=False)
    manifest = json.loads((result.folder / "manifest.json").read_text())
    assert (manifest["count"], manifest["patients"], manifest["missing_dropped"]) == (440, 136, 111_680)
    assert manifest["totals"]["expected"] == {"images": 112_120, "patients": 30_805}
    assert manifest["totals"]["complete"] is False and manifest["bad_rows"] == {}
    assert manifest["prepared_by"] == "semimed prepare" and manifest["loader"]["drop_missing"] is True
    assert "release totals: 112120 images / 30805 patients -> INCOMPLETE" in result.lines
    assert any(
        line.startswith("missing: 111680 rows of metadata/Data_Entry_2017_v2020.csv.gz")
        for line in result.lines
    )
    assert again.reused and "cache already complete" in again.lines
    assert pa.folder == result.folder and any("superset" in line for line in pa.lines)
    assert len(list(tmp_path.iterdir())) == 1


def test_totals_name_what_is_missing(sample_data: Path) -> None:
    breakhis = load_breakhis(sample_data / "breakhis")
    totals = check_totals(breakhis, DataConfig(dataset="breakhis"))
    assert totals["expected"] == {"images": 7_909, "patients": 82} and totals["complete"] is False
    adenosis = breakhis.meta[breakhis.meta["subtype"] == "adenosis"]
    line = f"adenosis: {len(adenosis)} of 444 images, {adenosis['patient_id'].nunique()} of 4 patients"
    assert line in totals["missing"]
    assert f"40X: {int((breakhis.meta['magnification'] == 40).sum())} of 1995 images" in totals["missing"]
    assert sum(sum(v) for v in RELEASE_IMAGES.values()) == 7_909
    forty = check_totals(
        load_breakhis(sample_data / "breakhis", magnification=40),
        DataConfig(dataset="breakhis", options={"magnification": "40"}),
    )
    assert forty["expected"]["images"] == 1_995
    breast = sample_data / "medmnist" / "breastmnist.npz"
    medmnist_cfg = DataConfig(dataset="medmnist", root=str(breast))
    medmnist = check_totals(load_dataset(medmnist_cfg), medmnist_cfg)
    assert medmnist == {
        "expected": {"images": 780, "patients": 780},
        "found": {"images": 780, "patients": 780},
        "complete": True,
        "missing": [],
    }


def _release(make_chest_release, root: Path) -> Path:
    """24 patients, 1-2 images each, every finding present in train and test; one image missing on disk."""
    rng = np.random.default_rng(7)
    rows, test = [], []
    for patient in range(1, 25):
        for follow_up in range(1 + patient % 2):
            findings = [FINDINGS[k] for k in range(14) if rng.random() < 0.25]
            rows.append(
                (
                    f"{patient:08d}_{follow_up:03d}.png",
                    "|".join(findings) or "No Finding",
                    patient,
                    "PA" if follow_up else "AP",
                )
            )
            if patient > 16:
                test.append(rows[-1][0])
    return make_chest_release(root, rows, tuple(test), size=20, skip_images=("00000005_000.png",))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_prepared_cache_serves_a_multilabel_run_without_reading_images(
    tmp_path: Path, make_chest_release, monkeypatch, capsys
) -> None:
    from semimed.experiment import run_training
    from semimed.report import write_report

    root = _release(make_chest_release, tmp_path / "nih")
    cache = tmp_path / "cache"
    assert main(["prepare", "chestxray14", "--root", str(root), "--size", "16", "--out", str(cache)]) == 2
    error = capsys.readouterr().err
    assert "1 of 36 rows name an image not found" in error and "00000005_000.png" in error
    assert error.count("\n") == 1
    assert (
        main(
            [
                "prepare",
                "chestxray14",
                "--root",
                str(root),
                "--size",
                "16",
                "--out",
                str(cache),
                "--drop-missing",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "chestxray14/findings: 35 images, 24 patients, 16px" in out and "decoded 35 image(s)" in out
    (folder,) = cache.iterdir()
    assert json.loads((folder / "manifest.json").read_text())["missing_dropped"] == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("a training run with a prepared cache decoded an image file")

    monkeypatch.setattr("semimed.data.base.read_image_file", no_decoding)
    cfg = Config(
        data=DataConfig(
            dataset="chestxray14",
            root=str(root),
            image_size=16,
            fraction=1.0,
            options={"drop_missing": True},
            cache_dir=str(cache),
            val_fraction=0.2,
        ),
        model=ModelConfig(backbone="small_cnn"),
        train=TrainConfig(steps=4, batch_size=8, eval_every=2, checkpoint_every=4, device="cpu"),
    )
    final = run_training(cfg, tmp_path / "exp" / "runs" / "t0", show_progress=False)
    assert sorted(p.name for p in cache.iterdir()) == [folder.name]  # no second cache was written
    assert 0.0 <= final["test/roc_auc_macro"] <= 1.0 and final["test/roc_auc"] == final["test/roc_auc_macro"]
    assert {f"test/roc_auc/{name}" for name in FINDINGS} <= set(final)
    assert "test/subset_accuracy" in final and "test/sensitivity/Mass" in final
    _, text = write_report(tmp_path / "exp")
    assert "## roc_auc" in text and "balanced_accuracy" not in text


def test_cli_prepare_refuses_a_cache_being_built(tmp_path: Path, make_chest_release, capsys) -> None:
    root = make_chest_release(
        tmp_path / "nih",
        [("00000001_000.png", "Mass", 1, "PA"), ("00000002_000.png", "No Finding", 2, "PA")],
        test=("00000002_000.png",),
    )
    folder = cache_folder(load_dataset(DataConfig(dataset="chestxray14", root=str(root))), 16, tmp_path / "c")
    folder.parent.mkdir()
    (folder.parent / f".{folder.name}.lock").write_text(f"{socket.gethostname()} pid {os.getpid()}\n")
    assert (
        main(["prepare", "chestxray14", "--root", str(root), "--size", "16", "--out", str(tmp_path / "c")])
        == 2
    )
    assert "another process" in capsys.readouterr().err
    assert (
        main(["prepare", "chestxray14", "--root", str(root), "--size", "4", "--out", str(tmp_path / "c")])
        == 2
    )
    assert "too small" in capsys.readouterr().err
