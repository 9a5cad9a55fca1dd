"""MedMNIST loader (the official BreastMNIST file and hand-made .npz files), `train.augment`, and the report's
published-row comparison for the BreastMNIST reproduction."""

from __future__ import annotations

import json
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from semimed.cli import main
from semimed.config import Config, DataConfig, ModelConfig, TrainConfig
from semimed.data.chestxray14 import FINDINGS
from semimed.data.medmnist import NO_PATIENT_NOTE, download_medmnist, load_medmnist, medmnist_flag
from semimed.data.splits import make_split
from semimed.errors import SemimedError
from semimed.report import published_comparison, write_report


@pytest.fixture(scope="module")
def breast_npz(sample_data: Path) -> Path:
    path = sample_data / "medmnist" / "breastmnist.npz"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def _npz(path: Path, n=(6, 2, 3), shape=(28, 28), labels=None, drop: tuple[str, ...] = (), **changes) -> Path:
    """A MedMNIST-format file: images[i] is filled with i (per split), labels default to i % 2 as [N, 1]."""
    arrays = {}
    for split, count in zip(("train", "val", "test"), n, strict=True):
        arrays[f"{split}_images"] = np.stack([np.full(shape, i, np.uint8) for i in range(count)])
        arrays[f"{split}_labels"] = (np.arange(count) % 2).reshape(-1, 1) if labels is None else labels(count)
    arrays.update(changes)
    np.savez_compressed(path, **{k: v for k, v in arrays.items() if k not in drop})
    return path


# --------------------------------------------------------------------------------------------------- real file


def test_breastmnist_matches_the_release(breast_npz: Path) -> None:
    dataset = load_medmnist(breast_npz)
    assert (dataset.name, dataset.task, dataset.multilabel, dataset.channels) == (
        "medmnist",
        "breastmnist",
        False,
        1,
    )
    assert dataset.classes == ["malignant", "normal_benign"] and dataset.labels.dtype == np.int64
    with np.load(breast_npz) as raw:
        for split, counts in (("train", [147, 399]), ("val", [21, 57]), ("test", [42, 114])):
            rows = np.flatnonzero(dataset.official_split == split)
            assert np.bincount(dataset.labels[rows]).tolist() == counts
            assert np.array_equal(dataset.labels[rows], raw[f"{split}_labels"][:, 0])
            for i in (0, len(rows) - 1):  # first and last row of each split, through the reader
                assert dataset.meta["path"].iat[rows[i]] == f"{split}:{i}"
                assert np.array_equal(dataset.read_image(int(rows[i]))[:, :, 0], raw[f"{split}_images"][i])
    assert len(dataset) == 780 and dataset.read_image(0).shape == (28, 28, 1)
    assert (dataset.meta["patient_id"] == dataset.meta["path"]).all()
    assert dataset.notes == [NO_PATIENT_NOTE]
    # The reader pickles without its arrays (cache workers) and loads them again on first use.
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone.reader._images is None and np.array_equal(clone.read_image(700), dataset.read_image(700))


def test_breastmnist_split_uses_the_release_split_and_says_there_are_no_patients(breast_npz: Path) -> None:
    dataset = load_medmnist(breast_npz)
    split = make_split(dataset, 0.1, seed=3)
    assert (len(split.train), len(split.val), len(split.test)) == (546, 78, 156)
    assert split.test == [f"test:{i}" for i in range(156)] and split.protocol == "official"
    assert len(split.labeled) == 15 + 40  # round(0.1 x 147) + round(0.1 x 399), per class
    assert NO_PATIENT_NOTE in split.warnings


def test_cli_split_prints_the_no_patient_note(breast_npz: Path, tmp_path: Path, capsys) -> None:
    assert (
        main(
            [
                "split",
                "medmnist",
                "--root",
                str(breast_npz),
                "--fraction",
                "0.5",
                "--out",
                str(tmp_path / "split.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"note: {NO_PATIENT_NOTE}" in out and "medmnist/breastmnist: 780 images" in out
    assert json.loads((tmp_path / "split.json").read_text())["dataset"] == "medmnist"


# ---------------------------------------------------------------------------------------------- made-up files


def test_multilabel_rgb_and_size_suffix(tmp_path: Path) -> None:
    path = _npz(
        tmp_path / "chestmnist_64.npz",
        shape=(64, 64, 3),
        labels=lambda count: (np.arange(count * 14).reshape(count, 14) % 3 == 0).astype(np.uint8),
    )
    dataset = load_medmnist(path)
    assert (dataset.task, dataset.multilabel, dataset.channels, dataset.classes) == (
        "chestmnist",
        True,
        3,
        FINDINGS,
    )
    assert dataset.labels.dtype == np.float32 and dataset.labels.shape == (11, 14)
    assert dataset.labels[1].tolist() == [float(v % 3 == 0) for v in range(14, 28)]
    assert dataset.read_image(7).shape == (64, 64, 3) and int(dataset.read_image(7)[0, 0, 0]) == 1  # val:1
    assert medmnist_flag("/x/BreastMNIST_224.npz") == "breastmnist"


def test_unknown_file_gets_generic_class_names(tmp_path: Path) -> None:
    dataset = load_medmnist(
        _npz(tmp_path / "mystery.npz", labels=lambda count: (np.arange(count) % 3)[:, None])
    )
    assert dataset.task == "mystery" and dataset.classes == ["class_0", "class_1", "class_2"]
    assert dataset.official_split.tolist() == ["train"] * 6 + ["val"] * 2 + ["test"] * 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"drop": ("val_images",)}, r"breastmnist\.npz: no 'val_images' array"),
        ({"drop": ("test_labels",)}, r"breastmnist\.npz: no 'test_labels' array"),
        ({"train_labels": np.zeros((5, 1), np.int64)}, r"train_labels has 5 rows but train_images has 6"),
        ({"val_images": np.zeros((2, 28, 28), np.float32)}, r"'val_images' is float32 \[2, 28, 28\]"),
        ({"test_images": np.zeros((3, 32, 32), np.uint8)}, r"the splits' images differ in shape"),
        ({"train_labels": np.full((6, 1), 2)}, r"label 2 is out of range for breastmnist's 2 classes"),
        ({"train_labels": np.full((6, 1), -1)}, r"labels must be non-negative integers"),
    ],
)
def test_bad_files_are_named(tmp_path: Path, kwargs: dict, message: str) -> None:
    path = _npz(tmp_path / "breastmnist.npz", **kwargs)
    with pytest.raises(SemimedError, match=message) as error:
        load_medmnist(path)
    assert str(path.resolve()) in str(error.value)


def test_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(SemimedError, match="is a folder"):
        load_medmnist(tmp_path)
    with pytest.raises(SemimedError, match="MedMNIST file not found"):
        load_medmnist(tmp_path / "absent.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(SemimedError, match="not a readable .npz"):
        load_medmnist(tmp_path / "junk.npz")
    multi = _npz(tmp_path / "m.npz", labels=lambda count: np.full((count, 3), 2))
    with pytest.raises(SemimedError, match="multi-label labels must be 0/1"):
        load_medmnist(multi)


def test_download_fails_with_a_clear_message_offline(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "medmnist", None)  # not installed
    with pytest.raises(SemimedError, match=r"'medmnist' package is not installed .* pass its path"):
        download_medmnist("breastmnist", tmp_path)

    class Offline:
        def __init__(self, **kwargs):
            raise ConnectionError("Name or service not known")

    fake = types.SimpleNamespace(INFO={"breastmnist": {"python_class": "BreastMNIST"}}, BreastMNIST=Offline)
    monkeypatch.setitem(sys.modules, "medmnist", fake)
    with pytest.raises(
        SemimedError, match=r"could not download breastmnist \(Name or service not known\); offline"
    ):
        download_medmnist("breastmnist", tmp_path)
    with pytest.raises(SemimedError, match="unknown flag 'nosuchmnist'"):
        download_medmnist("nosuchmnist", tmp_path)
    assert (
        main(
            [
                "prepare",
                "medmnist",
                "--root",
                str(tmp_path / "breastmnist.npz"),
                "--size",
                "28",
                "--out",
                str(tmp_path / "cache"),
                "--download",
            ]
        )
        == 2
    )


# ------------------------------------------------------------------------------------- train.augment, report


def test_train_augment_none_keeps_the_labeled_view_fixed(tmp_path: Path) -> None:
    from semimed.experiment import build_run

    path = _npz(tmp_path / "breastmnist.npz", n=(8, 4, 4))
    # Pixels that differ across the image, so a flip or shift would change them.
    with np.load(path) as raw:
        arrays = dict(raw)
    arrays["train_images"] = np.arange(8 * 28 * 28, dtype=np.int64).reshape(8, 28, 28).astype(np.uint8)
    np.savez(path, **arrays)

    def labeled_views(augment: str) -> list[torch.Tensor]:
        cfg = Config(
            data=DataConfig(
                dataset="medmnist",
                root=str(path),
                image_size=28,
                fraction=1.0,
                cache_dir=str(tmp_path / "cache"),
            ),
            model=ModelConfig(backbone="small_cnn"),
            train=TrainConfig(augment=augment, batch_size=8),  # no larger than the 8 training images
        )
        _, data, _ = build_run(cfg)
        stream = data.labeled_stream()
        return [stream[0]["x"] for _ in range(6)]

    torch.manual_seed(0)
    fixed = labeled_views("none")
    assert all(torch.equal(view, fixed[0]) for view in fixed)
    weak = labeled_views("weak")
    assert any(not torch.equal(view, weak[0]) for view in weak)
    with pytest.raises(SemimedError, match="unknown train.augment 'strong'"):
        labeled_views("strong")


def _fake_run(folder: Path, root: str, backbone: str, seed: int, auc: float, acc: float) -> None:
    folder.mkdir(parents=True)
    cfg = Config(
        seed=seed,
        data=DataConfig(dataset="medmnist", root=root, image_size=28, fraction=1.0),
        model=ModelConfig(backbone=backbone),
    )
    cfg.save(folder / "config.yaml")
    (folder / "split.json").write_text(json.dumps({"labeled": ["train:0"] * 546}))
    metrics = {
        "test/roc_auc": auc,
        "test/accuracy": acc,
        "test/balanced_accuracy": acc,
        "test_last/roc_auc": auc - 0.01,
        "test_last/accuracy": acc - 0.02,
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_report_puts_the_published_row_beside_a_breastmnist_reproduction(tmp_path: Path) -> None:
    for seed, (auc, acc) in enumerate([(0.88, 0.80), (0.90, 0.84)]):
        _fake_run(tmp_path / "exp" / "runs" / f"s{seed}", "/d/breastmnist.npz", "resnet18_28", seed, auc, acc)
    text = published_comparison(tmp_path / "exp")
    assert "## Published row: breastmnist, MedMNIST v2" in text
    assert "| roc_auc | 0.901 | 0.890 ± 0.014 (n=2) | 0.880 ± 0.014 (n=2) | -0.011 |" in text
    assert "| accuracy | 0.863 | 0.820 ± 0.028 (n=2) | 0.800 ± 0.028 (n=2) | -0.043 |" in text
    _, markdown = write_report(tmp_path / "exp")
    assert "| roc_auc | 0.901 |" in markdown
    # Another backbone, size or file: no published row to compare with.
    _fake_run(tmp_path / "other" / "runs" / "s0", "/d/breastmnist.npz", "resnet18", 0, 0.9, 0.8)
    _fake_run(tmp_path / "other" / "runs" / "s1", "/d/pneumoniamnist_64.npz", "resnet18_28", 0, 0.9, 0.8)
    assert published_comparison(tmp_path / "other") == ""
    cfg = yaml.safe_load((tmp_path / "exp" / "runs" / "s0" / "config.yaml").read_text())
    assert cfg["train"]["augment"] == "weak"  # the new keys' defaults
    # medmnist's task, its one option at its default
    assert (cfg["data"]["task"], cfg["data"]["options"]) == ("default", {"class_names": []})
