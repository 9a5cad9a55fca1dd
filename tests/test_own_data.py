"""Your own data: the `imagefolder` and `csv` datasets and MedMNIST's `class_names`, on the real sample data.

An image folder with a given split (the uploader's 64-px ChestX-ray14 subset, NIH1000/{train,valid,test}/
{0_normal,1_abnormal}) and a manifest (breakhis_index.csv: path, label, patient_id, …), each copied in part into
tmp_path: classes, labels, the official split, patient-disjoint splits, patient ids from a regex or a CSV, the
one-line refusals, the split command, and one tiny training run per dataset.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from semimed.cli import main
from semimed.config import DataConfig, load_config
from semimed.data import load_dataset
from semimed.data.imagefolder import ImageFolderOptions, load_imagefolder, obvious_positive
from semimed.data.manifest import ManifestOptions, load_manifest
from semimed.data.medmnist import load_medmnist
from semimed.data.splits import make_split
from semimed.errors import SemimedError

NIH = Path("chestxray14/images_64/NIH1000")
TAKE = {"train": 8, "valid": 3, "test": 4}  # images per class folder copied from each split folder
PATIENT = r"(\d{8})_\d{3}\.png$"  # NIH file names: <patient>_<follow-up>.png


@pytest.fixture
def folders(sample_data: Path, tmp_path: Path) -> Path:
    """30 real X-rays: <root>/{train,valid,test}/{0_normal,1_abnormal}/<patient>_<n>.png (sorted first k)."""
    root = tmp_path / "nih"
    for part, count in TAKE.items():
        for name in ("0_normal", "1_abnormal"):
            source = sample_data / NIH / part / name
            (root / part / name).mkdir(parents=True)
            for file in sorted(source.iterdir())[:count]:
                shutil.copyfile(file, root / part / name / file.name)
    return root


def _files(root: Path, part: str) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in (root / part).rglob("*.png"))


def _patients_in_two_parts(dataset, split) -> set[str]:
    patient_of = dict(zip(dataset.meta["path"], dataset.patients.astype(str), strict=True))
    parts = [{patient_of[p] for p in getattr(split, name)} for name in ("train", "val", "test")]
    return (parts[0] & parts[1]) | (parts[0] & parts[2]) | (parts[1] & parts[2])


# ------------------------------------------------------------------------------------------------ imagefolder


def test_a_folder_split_is_the_official_split(folders: Path) -> None:
    dataset = load_dataset(DataConfig(dataset="imagefolder", root=str(folders)))
    assert len(dataset) == 30 and dataset.classes == ["0_normal", "1_abnormal"]
    assert dataset.positive_class == "1_abnormal" and dataset.positive_index() == 1
    assert dataset.channels == 3  # the uploader saved these X-rays as RGB PNGs
    assert list(dataset.labels) == [int("1_abnormal" in p) for p in dataset.meta["path"]]
    assert dataset.notes[:2] == [
        "classes (folder names, sorted): 0_normal, 1_abnormal",
        "no patient ids: image-level split (each image counts as its own patient, so patient-disjointness "
        "cannot be checked); set data.options.patient_regex or patient_csv if images share patients",
    ]
    assert dict(zip(*np.unique(dataset.official_split, return_counts=True), strict=True)) == {
        "test": 8,
        "train": 16,
        "val": 6,
    }
    split = make_split(dataset, fraction=0.5, seed=0)
    assert split.protocol == "official"
    assert split.test == _files(folders, "test") and split.val == _files(folders, "valid")
    assert sorted(split.train) == _files(folders, "train") and len(split.labeled) == 8
    assert dataset.read_image(0).shape == (64, 64, 3)


def test_without_val_folder_val_is_carved_from_train(folders: Path) -> None:
    shutil.rmtree(folders / "valid")
    dataset = load_imagefolder(folders)
    assert set(dataset.official_split) == {"train", "test"}
    split = make_split(dataset, fraction=1.0, seed=0, val_fraction=0.25)
    assert len(split.val) == 4 and set(split.val) <= set(_files(folders, "train"))
    assert split.test == _files(folders, "test") and not set(split.val) & set(split.train)


def test_patient_regex_gives_a_patient_disjoint_split(folders: Path) -> None:
    options = ImageFolderOptions(patient_regex=PATIENT, split_folders="pool")
    dataset = load_imagefolder(folders, options)
    assert dataset.official_split is None and "folder_split" not in dataset.meta
    assert dataset.meta["patient_id"].tolist() == [Path(p).name[:8] for p in dataset.meta["path"]]
    assert dataset.meta["patient_id"].nunique() == 20  # 00000008, 00000020, … have several images
    for seed in range(3):
        split = make_split(dataset, fraction=1.0, seed=seed, test_fraction=0.3, val_fraction=0.2)
        assert split.protocol.startswith("patient-disjoint random") and split.test and split.val
        assert not _patients_in_two_parts(dataset, split)
    # The folder split kept: its patients do not cross it here, so it is used as given.
    given = load_imagefolder(folders, ImageFolderOptions(patient_regex=PATIENT))
    assert make_split(given, fraction=1.0, seed=0).test == _files(folders, "test")


def test_a_folder_split_that_a_patient_crosses_is_refused(folders: Path, sample_data: Path) -> None:
    # Patient 00000174 is in the uploader's test/1_abnormal AND train/0_normal: a leak the given split hides.
    shutil.copyfile(
        sample_data / NIH / "train/0_normal/00000174_000.png", folders / "train/0_normal/00000174_000.png"
    )
    load_imagefolder(folders)  # without patient ids nothing can be checked
    with pytest.raises(
        SemimedError,
        match=r"patient '00000174' is in test \(test/1_abnormal/00000174_001\.png\) and train "
        r"\(train/0_normal/00000174_000\.png\): the given split is not patient-disjoint; .*split_folders=pool",
    ):
        load_imagefolder(folders, ImageFolderOptions(patient_regex=PATIENT))
    pooled = load_imagefolder(folders, ImageFolderOptions(patient_regex=PATIENT, split_folders="pool"))
    assert not _patients_in_two_parts(pooled, make_split(pooled, fraction=1.0, seed=0))


def test_patient_csv(folders: Path) -> None:
    paths = [p.relative_to(folders).as_posix() for p in sorted(folders.rglob("*.png"))]
    table = pd.DataFrame({"path": paths, "patient_id": [f"P{Path(p).name[:8]}" for p in paths]})
    table.to_csv(folders / "patients.csv", index=False)  # beside the split folders: not read as an image
    dataset = load_imagefolder(folders, ImageFolderOptions(patient_csv="patients.csv", split_folders="pool"))
    assert dataset.meta.set_index("path")["patient_id"].to_dict() == dict(
        zip(paths, table["patient_id"], strict=True)
    )
    assert "patient ids: patients.csv (data.options.patient_csv)" in dataset.notes
    assert not _patients_in_two_parts(dataset, make_split(dataset, fraction=1.0, seed=1))

    def refused(rows: pd.DataFrame, message: str) -> None:
        rows.to_csv(folders / "bad.csv", index=False)
        with pytest.raises(SemimedError, match=message) as error:
            load_imagefolder(folders, ImageFolderOptions(patient_csv=str(folders / "bad.csv")))
        assert "\n" not in str(error.value)

    refused(table.iloc[1:], rf"bad\.csv: no row for image '{paths[0]}' \(1 image\(s\) without a patient id\)")
    refused(
        pd.concat([table, table.iloc[:1]]),
        rf"bad\.csv line 32: path '{paths[0]}' is listed twice \(first on line 2\)",
    )
    unknown = table.copy()
    unknown.loc[3, "path"] = "train/0_normal/nothere.png"
    refused(unknown, r"bad\.csv line 5: path 'train/0_normal/nothere\.png' is not an image of the dataset")
    escaping = table.copy()
    escaping.loc[0, "path"] = "../outside.png"
    refused(escaping, r"bad\.csv line 2: image name '\.\./outside\.png' escapes the data root")
    refused(table.rename(columns={"patient_id": "pid"}), r"bad\.csv: lacks column\(s\) 'patient_id'")
    with pytest.raises(SemimedError, match="set one of data.options.patient_regex and patient_csv"):
        load_imagefolder(folders, ImageFolderOptions(patient_regex=PATIENT, patient_csv="patients.csv"))


def _tree(tmp_path: Path, layout: dict[str, int]) -> Path:
    """<root>/<folder>/i.png, `count` 8-bit grayscale images per folder (a folder path may be nested)."""
    from PIL import Image

    root = tmp_path / "tree"
    for folder, count in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(np.full((8, 8), 30 * i, np.uint8)).save(root / folder / f"{i}.png")
    return root


def test_class_folders_at_any_depth_junk_skipped_grayscale_auto(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"normal/site_a/day1": 2, "normal/site_b": 1, "tumour": 3})
    (root / "normal" / "Thumbs.db").write_bytes(b"junk")
    (root / "tumour" / ".DS_Store").write_bytes(b"junk")
    (root / "README.txt").write_text("top-level files other than images are not read")
    dataset = load_imagefolder(root)
    assert dataset.classes == ["normal", "tumour"] and list(dataset.labels) == [0, 0, 0, 1, 1, 1]
    assert dataset.meta["path"].iat[0] == "normal/site_a/day1/0.png" and dataset.official_split is None
    assert dataset.channels == 1 and dataset.positive_class == "tumour"
    assert load_imagefolder(root, ImageFolderOptions(channels=3)).read_image(0).shape == (8, 8, 3)


@pytest.mark.parametrize(
    ("names", "positive"),
    [
        (["0_normal", "1_abnormal"], "1_abnormal"),
        (["benign", "malignant"], "malignant"),
        (["Healthy", "Pneumonia"], "Pneumonia"),
        (["0", "1"], "1"),
        (["negative", "positive"], "positive"),
        (["cat", "dog"], None),  # the names say nothing
        (["normal", "benign"], None),  # both negative
        (["a", "normal", "c"], None),  # not binary
    ],
)
def test_a_positive_class_only_where_the_names_make_it_obvious(
    names: list[str], positive: str | None
) -> None:
    assert obvious_positive(names) == positive


def test_two_class_folders_whose_names_say_nothing_need_data_positive_class(tmp_path: Path) -> None:
    dataset = load_imagefolder(_tree(tmp_path, {"cat": 2, "dog": 2}))
    assert dataset.positive_class is None
    with pytest.raises(SemimedError, match=r"declares no positive class: set data\.positive_class"):
        dataset.positive_index()
    assert dataset.positive_index("cat") == 0


@pytest.mark.parametrize(
    ("layout", "extra", "options", "message"),
    [
        ({"a": 2}, None, {}, r"tree: one class folder \(a\); a classifier needs at least two"),
        ({}, None, {}, r"tree: no class folders; a classifier needs at least two"),
        ({"a": 2, "b": 0}, None, {}, r"tree/b: empty class folder \(no image files\)"),
        ({"a": 2, "b": 2}, "b/notes.txt", {}, r"tree/b/notes\.txt: not an image file \(1 such in .*tree/b\)"),
        ({"a": 2, "b": 2}, "b/x.gif", {}, r"tree/b/x\.gif: not an image file"),
        ({"a": 2, "b": 2}, "loose.png", {}, r"tree: image 'loose\.png' is outside any class folder"),
        (
            {"train/a": 2, "train/b": 2, "other/a": 1},
            None,
            {},
            r"tree: folders train are split names but 'other' is not",
        ),
        (
            {"train/a": 2, "train/b": 2, "val/a": 1},
            None,
            {},
            r"tree: split folders train, val need train/ and test/",
        ),
        (
            {"train/a": 2, "train/b": 2, "test/a": 1},
            None,
            {},
            r"tree/test: no class folder 'b' \(another split folder has it\)",
        ),
        ({"train/a": 1, "train/b": 1, "test/a": 1, "test/b": 1, "valid/a": 1, "val/b": 1}, None, {}, "both"),
        ({"a": 2, "b": 2}, None, {"patient_regex": "x"}, r"patient_regex 'x' has no group"),
        ({"a": 2, "b": 2}, None, {"patient_regex": "("}, r"data\.options\.patient_regex '\(': missing \)"),
        (
            {"a": 2, "b": 2},
            None,
            {"patient_regex": r"^(\d+)"},
            r"tree/a/0\.png: data\.options\.patient_regex",
        ),
        ({"a": 2, "b": 2}, None, {"channels": 2}, r"data\.options\.channels=2 must be 0 \(auto\), 1 or 3"),
    ],
)
def test_imagefolder_refusals_are_one_line(
    tmp_path: Path, layout: dict[str, int], extra: str | None, options: dict, message: str
) -> None:
    root = _tree(tmp_path, layout)
    root.mkdir(exist_ok=True)
    if extra:
        (root / extra).write_bytes(b"not an image")
    with pytest.raises(SemimedError, match=message) as error:
        load_imagefolder(root, ImageFolderOptions(**options))
    assert "\n" not in str(error.value)


def test_a_link_out_of_the_root_is_refused(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"a": 2, "b": 2})
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copyfile(root / "a" / "0.png", outside / "x.png")
    os.symlink(outside, root / "b" / "linked")
    with pytest.raises(SemimedError, match=r"tree/b/linked: link leads outside the data root"):
        load_imagefolder(root)
    with pytest.raises(SemimedError, match=r"image folder does not exist or is not a folder"):
        load_imagefolder(tmp_path / "absent")


# ------------------------------------------------------------------------------------------------ csv manifest


@pytest.fixture
def manifest(sample_data: Path, tmp_path: Path) -> Path:
    """breakhis_index.csv cut to 3 images of each of 8 patients (4 benign, 4 malignant), images copied beside it."""
    index = pd.read_csv(sample_data / "breakhis" / "breakhis_index.csv")
    patients = [
        p for label in ("benign", "malignant") for p in index[index.label == label].patient_id.unique()[:4]
    ]
    rows = index[index.patient_id.isin(patients)].groupby("patient_id").head(3).reset_index(drop=True)
    root = tmp_path / "bh"
    for path in rows["path"]:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sample_data / "breakhis" / path, root / path)
    rows.to_csv(root / "index.csv", index=False)
    return root / "index.csv"


def test_a_manifest_with_labels_and_patients(manifest: Path) -> None:
    rows = pd.read_csv(manifest)
    dataset = load_dataset(DataConfig(dataset="csv", root=str(manifest)))
    assert (len(dataset), dataset.root, dataset.classes) == (24, manifest.parent, ["benign", "malignant"])
    assert dataset.positive_class == "malignant" and not dataset.multilabel and dataset.channels == 3
    assert dataset.meta["path"].tolist() == rows["path"].tolist()
    assert list(dataset.labels) == [int(label == "malignant") for label in rows["label"]]
    assert dataset.meta["patient_id"].tolist() == rows["patient_id"].tolist()
    assert dataset.notes[:2] == [
        "classes (single-label): benign, malignant",
        "patient ids: column 'patient_id'",
    ]
    assert dataset.read_image(0).shape == (460, 700, 3)
    for seed in range(3):
        split = make_split(dataset, fraction=1.0, seed=seed, test_fraction=0.25, val_fraction=0.2)
        assert split.patients == {"train": 4, "val": 2, "test": 2}
        assert not _patients_in_two_parts(dataset, split)
    # Another label column: the tumour code B/M says nothing about which is positive; 8 subtypes are not binary.
    codes = load_manifest(manifest, ManifestOptions(label_column="tumor_class"))
    assert codes.classes == ["B", "M"] and codes.positive_class is None
    with pytest.raises(SemimedError, match=r"declares no positive class: set data\.positive_class"):
        codes.positive_index()
    # Rows elsewhere: image_root, relative to the manifest's folder.
    moved = manifest.parent / "lists" / "index.csv"
    moved.parent.mkdir()
    shutil.move(manifest, moved)
    assert (
        load_manifest(moved, ManifestOptions(image_root="..")).meta["path"].tolist() == rows["path"].tolist()
    )


def test_a_split_column_is_the_official_split(manifest: Path) -> None:
    rows = pd.read_csv(manifest)
    parts = {p: ("test", "valid", "train", "train")[i % 4] for i, p in enumerate(rows.patient_id.unique())}
    rows["split"] = rows["patient_id"].map(parts)
    rows["site"] = "lab_a"
    rows.to_csv(manifest, index=False)
    dataset = load_manifest(manifest)
    assert list(dataset.official_split) == [{"valid": "val"}.get(s, s) for s in rows["split"]]
    assert set(dataset.meta["site"]) == {"lab_a"}
    split = make_split(dataset, fraction=1.0, seed=0)
    assert split.protocol == "official" and split.test == rows.loc[rows.split == "test", "path"].tolist()
    assert load_manifest(manifest, ManifestOptions(split_column="")).official_split is None  # ignored
    rows.loc[0, "split"] = "train"  # patient 0 now in train (line 2) and test (lines 3, 4)
    rows.to_csv(manifest, index=False)
    with pytest.raises(
        SemimedError,
        match=r"patient '14-22549AB' is in train \(.*index\.csv line 2\) and test \(.*index\.csv line 3\): the "
        r"given split is not patient-disjoint; fix column 'split', or set data\.options\.split_column=''",
    ):
        load_manifest(manifest)


def test_multi_label_manifests(manifest: Path) -> None:
    rows = pd.read_csv(manifest)
    rows["tumour"] = (rows["label"] == "malignant").astype(int).astype(str)
    rows["large"] = ["1", "0", ""] * 8  # blank: unknown
    rows["findings"] = ["DC|large", "", "adenosis"] * 8  # empty: no finding
    rows.to_csv(manifest, index=False)
    columns = load_manifest(manifest, ManifestOptions(label_columns=["tumour", "large"]))
    assert columns.multilabel and columns.classes == ["tumour", "large"] and columns.positive_class is None
    np.testing.assert_array_equal(columns.labels[:3], [[0, 1], [0, 0], [0, np.nan]])
    joined = load_manifest(manifest, ManifestOptions(label_column="findings", labels_separator="|"))
    assert joined.classes == ["DC", "adenosis", "large"]
    np.testing.assert_array_equal(joined.labels[:3], [[1, 0, 1], [0, 0, 0], [0, 1, 0]])
    split = make_split(joined, fraction=1.0, seed=0, test_fraction=0.25)
    assert not _patients_in_two_parts(joined, split)


def _write(manifest: Path, rows: pd.DataFrame) -> None:
    rows.to_csv(manifest, index=False)


@pytest.mark.parametrize(
    ("edit", "options", "message"),
    [
        (
            lambda r: r,
            {"path_column": "file"},
            r"index\.csv: no column 'file' \(data\.options\.path_column\)",
        ),
        (
            lambda r: r,
            {"patient_column": "pid"},
            r"index\.csv \(data\.options\.patient_column\): no column 'pid'",
        ),
        (
            lambda r: r.drop(columns="label"),
            {},
            r"index\.csv: no column 'label' \(data\.options\.label_column\)",
        ),
        (
            lambda r: r.assign(path=[*r.path[:5], r.path[0], *r.path[6:]]),
            {},
            r"index\.csv line 7, column 'path': path '.*001\.png' is also on .*index\.csv line 2",
        ),
        (
            lambda r: r.assign(path=[*r.path[:3], "", *r.path[4:]]),
            {},
            r"index\.csv line 5, column 'path': empty path",
        ),
        (
            lambda r: r.assign(path=[*r.path[:3], "../x.png", *r.path[4:]]),
            {},
            r"index\.csv line 5, column 'path': image name '\.\./x\.png' escapes the data root",
        ),
        (
            lambda r: r.assign(path=[*r.path[:3], "/etc/passwd", *r.path[4:]]),
            {},
            r"index\.csv line 5, column 'path': image name '/etc/passwd' escapes the data root",
        ),
        (
            lambda r: r.assign(path=[*r.path[:3], "gone.png", *r.path[4:]]),
            {},
            r"index\.csv line 5, column 'path': image 'gone\.png' not found under",
        ),
        (
            lambda r: r.assign(split=["train"] * 9 + ["training"] + ["test"] * 14),
            {},
            r"index\.csv line 11, column 'split': unknown split 'training' \(valid: train, val, valid, validation, test\)",
        ),
        (lambda r: r.assign(split="train"), {}, r"index\.csv: the given split has no test images"),
        (
            lambda r: r.assign(label="benign"),
            {},
            r"index\.csv, column 'label': one class only \('benign'\); a classifier needs two",
        ),
        (
            lambda r: r.assign(label=[""] + ["benign"] * 23),
            {},
            r"index\.csv line 2, column 'label': empty label",
        ),
        (
            lambda r: r.assign(patient_id=[""] + ["p"] * 23),
            {},
            r"line 2, column 'patient_id': empty patient id",
        ),
        (
            lambda r: r.assign(a=["1", "2"] * 12, b="0"),
            {"label_columns": ["a", "b"]},
            r"index\.csv line 3, column 'a': '2' is not 0, 1 or blank \(unknown\)",
        ),
        (
            lambda r: r,
            {"label_columns": ["label"]},
            r"label_columns \['label'\]: needs two or more distinct columns",
        ),
        (
            lambda r: r,
            {"label_columns": ["x", "y"]},
            r"index\.csv: no column 'x' \(data\.options\.label_columns\)",
        ),
        (
            lambda r: r,
            {"label_columns": ["x", "y"], "labels_separator": "|"},
            "set one of data.options.label_columns and labels_separator",
        ),
        (
            lambda r: r.assign(label=["a||b"] * 24),
            {"labels_separator": "|"},
            r"index\.csv line 2, column 'label': empty class name in 'a\|\|b'",
        ),
        (lambda r: r, {"image_root": "nowhere"}, r"nowhere: data\.options\.image_root is not a folder"),
    ],
)
def test_manifest_refusals_name_the_file_row_and_column(
    manifest: Path, edit, options: dict, message: str
) -> None:
    _write(manifest, edit(pd.read_csv(manifest, dtype=str, keep_default_na=False)))
    with pytest.raises(SemimedError, match=message) as error:
        load_manifest(manifest, ManifestOptions(**options))
    assert "\n" not in str(error.value)


def test_manifest_formats(manifest: Path) -> None:
    rows = pd.read_csv(manifest)
    rows.to_csv(manifest.with_suffix(".csv.gz"), index=False)
    assert len(load_manifest(manifest.with_suffix(".csv.gz"))) == 24
    parquet = manifest.with_suffix(".parquet")
    rows.assign(label=(rows["label"] == "malignant").astype(int)).to_parquet(parquet)
    dataset = load_manifest(parquet)
    assert dataset.classes == ["0", "1"] and dataset.positive_class == "1"  # integer labels, as text
    rows.assign(path=[*rows.path[:3], "", *rows.path[4:]]).to_parquet(parquet)
    with pytest.raises(SemimedError, match=r"index\.parquet row 4, column 'path': empty path"):
        load_manifest(parquet)
    for name, data in (("bad.csv.gz", b"not gzip at all"), ("bad.parquet", b"PAR1 nope"), ("empty.csv", b"")):
        (manifest.parent / name).write_bytes(data)
        with pytest.raises(SemimedError, match=rf"{name}: cannot read the manifest \(") as error:
            load_manifest(manifest.parent / name)
        assert "\n" not in str(error.value)
    (manifest.parent / "header.csv").write_text("path,label\n")
    with pytest.raises(SemimedError, match=r"header\.csv: the manifest has no rows"):
        load_manifest(manifest.parent / "header.csv")
    with pytest.raises(SemimedError, match=r"a manifest is a \.csv, \.csv\.gz, \.parquet file"):
        load_manifest(manifest.parent / "index.tsv")
    with pytest.raises(SemimedError, match=r"is a folder; data\.root for csv is the manifest file"):
        load_manifest(manifest.parent)
    with pytest.raises(SemimedError, match=r"absent\.csv: manifest not found"):
        load_manifest(manifest.parent / "absent.csv")


# ------------------------------------------------------------------------------------------------ MedMNIST names


def test_medmnist_class_names_for_your_own_npz(sample_data: Path, tmp_path: Path) -> None:
    own = tmp_path / "my_ultrasound.npz"  # the BreastMNIST arrays under a name semimed does not know
    shutil.copyfile(sample_data / "medmnist" / "breastmnist.npz", own)
    assert load_medmnist(own).classes == ["class_0", "class_1"]
    cfg = load_config(
        None, ["data.dataset=medmnist", f"data.root={own}", "data.options.class_names=lesion,clear"]
    )
    assert cfg.data.options == {"class_names": ["lesion", "clear"]}
    named = load_dataset(cfg.data)
    assert named.classes == ["lesion", "clear"] and named.positive_class is None
    with pytest.raises(SemimedError, match=r"declares no positive class: set data\.positive_class"):
        named.positive_index()
    assert named.positive_index("lesion") == 0
    out = tmp_path / "split.json"  # the flag: one comma-separated string, not a list of its characters
    assert (
        main(["split", "medmnist", "--root", str(own), "--class-names", "lesion,clear", "--out", str(out)])
        == 0
    )
    assert json.loads(out.read_text())["classes"] == ["lesion", "clear"]
    for names, message in (
        (["a", "b", "c"], r"class_names has 3 names but the labels are 0\.\.1 \(2 classes\)"),
        (["a"], r"class_names has 1 names but the labels are 0\.\.1"),
        (["a", "a"], r"class_names \['a', 'a'\] must be distinct, non-empty names"),
    ):
        with pytest.raises(SemimedError, match=message):
            load_medmnist(own, names)
    known = tmp_path / "breastmnist.npz"
    shutil.copyfile(own, known)
    assert load_medmnist(known, ["malignant", "normal_benign"]).positive_class == "malignant"
    with pytest.raises(SemimedError, match="class_names is for a file semimed does not know; breastmnist's"):
        load_medmnist(known, ["a", "b"])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a,b", ["a", "b"]),
        (" a , b ,", ["a", "b"]),
        ("[a, 'b,c']", ["a", "b,c"]),
        ("[0, 1]", ["0", "1"]),
        ("", []),
    ],
)
def test_list_options_take_a_yaml_list_or_commas(value: str, expected: list[str]) -> None:
    cfg = load_config(None, ["data.dataset=csv", f"data.options.label_columns={value}"])
    assert cfg.data.options["label_columns"] == expected


def test_a_list_option_of_the_wrong_kind_is_refused() -> None:
    with pytest.raises(SemimedError, match=r"'data\.options\.label_columns': \{'a': 1\} is not a valid list"):
        load_config(None, ["data.dataset=csv", "data.options.label_columns={a: 1}"])
    with pytest.raises(SemimedError, match=r"'data\.options\.class_names': \[\[1\]\] is not a valid list"):
        load_config(None, ["data.dataset=medmnist", "data.options.class_names=[[1]]"])


# ------------------------------------------------------------------------------------------------ CLI and runs


def test_split_command_on_an_image_folder(folders: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "split.json"
    argv = [
        "split",
        "imagefolder",
        "--root",
        str(folders),
        "--fraction",
        "0.1",
        "--seed",
        "0",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "note: classes (folder names, sorted): 0_normal, 1_abnormal" in printed
    assert "note: no patient ids: image-level split" in printed
    saved = json.loads(out.read_text())
    assert saved["dataset"] == "imagefolder" and saved["protocol"] == "official"
    assert saved["classes"] == ["0_normal", "1_abnormal"] and saved["test"] == _files(folders, "test")
    assert len(saved["labeled"]) == 2  # round(0.1 × 8) = 1 per class
    pooled = tmp_path / "pooled.json"
    assert main([*argv[:-1], str(pooled), "--patient-regex", PATIENT, "--split-folders", "pool"]) == 0
    assert "patient-disjoint random" in json.loads(pooled.read_text())["protocol"]
    with pytest.raises(SystemExit):  # argparse: the flag's choices
        main([*argv[:-1], str(tmp_path / "x.json"), "--split-folders", "mixed"])
    assert "argument --split-folders: invalid choice: 'mixed'" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_split_command_takes_a_list_option_as_commas(manifest: Path, tmp_path: Path) -> None:
    rows = pd.read_csv(manifest)
    rows.assign(tumour=(rows.label == "malignant").astype(int), stain=[1, 0] * 12).to_csv(
        manifest, index=False
    )
    out = tmp_path / "split.json"
    argv = ["split", "csv", "--root", str(manifest), "--label-columns", "tumour,stain", "--out", str(out)]
    assert main([*argv, "--test-fraction", "0.25"]) == 0
    assert json.loads(out.read_text())["classes"] == ["tumour", "stain"]


def _tiny(root: Path, dataset: str, *overrides: str):
    return load_config(
        None,
        [
            f"data.dataset={dataset}",
            f"data.root={root}",
            "data.image_size=16",
            "data.fraction=1.0",
            "model.backbone=small_cnn",
            "train.steps=2",
            "train.eval_every=2",
            "train.batch_size=8",
            "train.device=cpu",
            "train.loader_workers=0",
            *overrides,
        ],
    )


@pytest.mark.filterwarnings("ignore:precision is undefined")  # 2 steps: the model may predict one class
@pytest.mark.parametrize("dataset", ["imagefolder", "csv"])
def test_a_tiny_training_run(dataset: str, request, tmp_path: Path) -> None:
    from semimed.experiment import run_training

    root = request.getfixturevalue("folders" if dataset == "imagefolder" else "manifest")
    extra = ["data.test_fraction=0.25"] if dataset == "csv" else []
    run_training(_tiny(root, dataset, *extra), tmp_path / "run", show_progress=False)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["positive_class"] == ("1_abnormal" if dataset == "imagefolder" else "malignant")
    assert 0.0 <= metrics["test/roc_auc"] <= 1.0
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["dataset"] == dataset and len(split["test"]) == (8 if dataset == "imagefolder" else 6)


def test_the_your_data_search_space_asks_for_data_root(tmp_path: Path, capsys) -> None:
    space = Path(__file__).resolve().parents[1] / "search_spaces" / "your_data.yaml"
    assert main(["sweep", str(space), "--storage", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"semimed: error: {space}: data.root is not set; give it on the command line, data.root=PATH "
        "(imagefolder: your image folder: one folder per class, or train/, val/ and test/ folders holding them)\n"
    )
    assert not any(tmp_path.iterdir())
