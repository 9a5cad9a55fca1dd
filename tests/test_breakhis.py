"""BreakHis loader: the real sample tree (when SEMIMED_SAMPLE_DATA is set) and hand-built bad trees."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from semimed.data.breakhis import SUBTYPES, find_breakhis_root, load_breakhis, parse_breakhis_name
from semimed.errors import SemimedError

BREAST = Path("BreaKHis_v1", "histology_slides", "breast")


@pytest.fixture(scope="module")
def sample_root() -> Path:
    data = os.environ.get("SEMIMED_SAMPLE_DATA")
    if not data:
        pytest.skip("SEMIMED_SAMPLE_DATA is not set")
    root = Path(data) / "breakhis"
    if not (root / "breakhis_index.csv").is_file():
        pytest.skip(f"{root} has no breakhis_index.csv")
    return root


@pytest.fixture(scope="module")
def index(sample_root: Path) -> pd.DataFrame:
    return pd.read_csv(sample_root / "breakhis_index.csv").sort_values("path").reset_index(drop=True)


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(path)
    return path


def _tree_file(root: Path, rel: str) -> Path:
    return _png(root / BREAST / rel)


GOOD = "benign/SOB/adenosis/SOB_B_A_14-22549AB/100X/SOB_B_A-14-22549AB-100-001.png"


# ----------------------------------------------------------------------------------------------- real sample


def test_sample_matches_index(sample_root: Path, index: pd.DataFrame) -> None:
    ds = load_breakhis(sample_root)
    meta = ds.meta.sort_values("path").reset_index(drop=True)
    assert ds.name == "breakhis" and ds.task == "binary" and ds.classes == ["benign", "malignant"]
    assert ds.root == sample_root.resolve() and ds.channels == 3 and ds.labels.dtype == np.int64
    assert len(ds) == len(index) == 156
    assert meta["path"].tolist() == index["path"].tolist()
    assert meta["patient_id"].tolist() == index["patient_folder"].tolist()
    assert meta["subtype"].tolist() == index["subtype"].tolist()
    assert meta["tumor_class"].tolist() == index["label"].tolist()
    assert meta["magnification"].tolist() == index["magnification"].tolist()
    assert meta["seq"].tolist() == index["seq"].tolist()
    assert ds.meta["patient_id"].nunique() == index["patient_folder"].nunique() == 25
    assert ds.meta["subtype"].value_counts().to_dict() == index["subtype"].value_counts().to_dict()
    assert (
        ds.meta["magnification"].value_counts().to_dict() == index["magnification"].value_counts().to_dict()
    )
    # labels follow tumor_class, and every path resolves under ds.root
    assert (ds.labels == (ds.meta["tumor_class"] == "malignant").to_numpy()).all()
    assert all((ds.root / path).is_file() for path in ds.meta["path"])
    assert ds.read_image(0).shape[2] == 3


def test_sample_patient_folders_keep_shared_numbers_apart(sample_root: Path) -> None:
    meta = load_breakhis(sample_root).meta
    shared = meta[meta["patient_id"].str.contains("14-22549")]["patient_id"].unique()
    assert sorted(shared) == ["SOB_B_A_14-22549AB", "SOB_B_A_14-22549CD"]


@pytest.mark.parametrize("magnification", [40, 100, "200", "400X"])
def test_sample_magnification_filter(sample_root: Path, index: pd.DataFrame, magnification) -> None:
    mag = int(str(magnification).rstrip("X"))
    ds = load_breakhis(sample_root, magnification=magnification)
    assert len(ds) == int((index["magnification"] == mag).sum())
    assert set(ds.meta["magnification"]) == {mag}


def test_sample_subtype_task(sample_root: Path, index: pd.DataFrame) -> None:
    ds = load_breakhis(sample_root, task="subtype")
    assert ds.classes == SUBTYPES and len(SUBTYPES) == 8
    assert SUBTYPES[:4] == ["adenosis", "fibroadenoma", "phyllodes_tumor", "tubular_adenoma"]
    assert set(ds.labels.tolist()) == set(range(8))
    assert [ds.classes[label] for label in ds.labels] == ds.meta["subtype"].tolist()


@pytest.mark.parametrize("depth", range(5))
def test_sample_root_at_any_level(sample_root: Path, depth: int) -> None:
    # <data>, <data>/breakhis, …/BreaKHis_v1, …/histology_slides, …/breast all find the same tree
    root = [
        sample_root.parent,
        sample_root,
        sample_root / "BreaKHis_v1",
        sample_root / BREAST.parent,
        sample_root / BREAST,
    ][depth]
    assert find_breakhis_root(root) == sample_root / BREAST
    ds = load_breakhis(root)
    assert len(ds) == 156 and (ds.root / ds.meta["path"].iat[0]).is_file()


# ------------------------------------------------------------------------------------------------ file names


def test_parse_name() -> None:
    assert parse_breakhis_name("SOB_B_A-14-22549AB-100-001.png") == {
        "tumor_class": "B",
        "tumor_type": "A",
        "yy": "14",
        "patient": "14-22549AB",
        "magnification": 100,
        "seq": 1,
    }
    fields = parse_breakhis_name("SOB_M_PC-15-190EF-400-012.png")
    assert fields["tumor_type"] == "PC" and fields["patient"] == "15-190EF" and fields["seq"] == 12


@pytest.mark.parametrize(
    "name",
    [
        "SOB_B_A-14-22549AB-100.png",  # no sequence number
        "SOB_B_X-14-22549AB-100-001.png",  # unknown tumour type
        "SOB_B_A-14-22549AB-300-001.png",  # no such magnification
        "SOB_B_A-14-22549AB-100-001.jpg",
        "image_001.png",
    ],
)
def test_parse_malformed_name(name: str) -> None:
    with pytest.raises(SemimedError, match=rf"^{re.escape(name)}: not a BreakHis file name"):
        parse_breakhis_name(name)


def test_parse_class_disagrees_with_type() -> None:
    with pytest.raises(SemimedError, match="tumour type DC is malignant but the name says B"):
        parse_breakhis_name("SOB_B_DC-14-2523-100-001.png")


# ---------------------------------------------------------------------------------------------- built trees


def test_tiny_tree_loads(tmp_path: Path) -> None:
    _tree_file(tmp_path, GOOD)
    _tree_file(tmp_path, "malignant/SOB/ductal_carcinoma/SOB_M_DC_14-2523/40X/SOB_M_DC-14-2523-40-002.png")
    _png(tmp_path / BREAST / "benign" / "SOB" / "adenosis" / "SOB_B_A_14-22549AB" / "100X" / "._junk.png")
    (tmp_path / BREAST / "README.txt").write_text("not an image")
    ds = load_breakhis(tmp_path)
    assert ds.labels.tolist() == [0, 1]
    assert ds.meta["patient_id"].tolist() == ["SOB_B_A_14-22549AB", "SOB_M_DC_14-2523"]
    assert ds.meta["magnification"].tolist() == [100, 40] and ds.meta["seq"].tolist() == [1, 2]
    assert ds.read_image(1).shape == (8, 8, 3)
    with pytest.raises(SemimedError, match="no BreakHis images at magnification 200X"):
        load_breakhis(tmp_path, magnification=200)


def test_no_tree(tmp_path: Path) -> None:
    (tmp_path / "breast" / "benign").mkdir(parents=True)  # no SOB level: not a BreakHis tree
    with pytest.raises(SemimedError, match=r"no BreakHis tree \(expected .*histology_slides/breast"):
        load_breakhis(tmp_path)
    with pytest.raises(SemimedError, match="does not exist"):
        load_breakhis(tmp_path / "missing")


def test_malformed_file_name_in_tree(tmp_path: Path) -> None:
    bad = _tree_file(tmp_path, "benign/SOB/adenosis/SOB_B_A_14-22549AB/100X/SOB_B_A-14-22549AB-100.png")
    with pytest.raises(SemimedError, match=rf"^{re.escape(str(bad))}: not a BreakHis file name"):
        load_breakhis(tmp_path)


@pytest.mark.parametrize(
    ("rel", "what"),
    [
        ("malignant/SOB/adenosis/SOB_B_A_14-22549AB/100X/SOB_B_A-14-22549AB-100-001.png", "class folder"),
        ("benign/SOB/fibroadenoma/SOB_B_A_14-22549AB/100X/SOB_B_A-14-22549AB-100-001.png", "subtype folder"),
        ("benign/SOB/adenosis/SOB_B_A_14-22549CD/100X/SOB_B_A-14-22549AB-100-001.png", "patient folder"),
        ("benign/SOB/adenosis/SOB_B_A_14-22549AB/40X/SOB_B_A-14-22549AB-100-001.png", "magnification folder"),
    ],
)
def test_name_disagrees_with_folder(tmp_path: Path, rel: str, what: str) -> None:
    _tree_file(tmp_path, GOOD)
    bad = _tree_file(tmp_path, rel)
    with pytest.raises(SemimedError, match=rf"^{re.escape(str(bad))}: file name disagrees with its {what}"):
        load_breakhis(tmp_path)


def test_file_at_wrong_depth(tmp_path: Path) -> None:
    _tree_file(tmp_path, GOOD)
    bad = _tree_file(tmp_path, "benign/SOB/adenosis/SOB_B_A-14-22549AB-100-002.png")
    with pytest.raises(SemimedError, match=rf"^{re.escape(str(bad))}: not at <benign\|malignant>/SOB/"):
        load_breakhis(tmp_path)


def test_unknown_task_and_magnification(tmp_path: Path) -> None:
    _tree_file(tmp_path, GOOD)
    with pytest.raises(SemimedError, match=r"unknown task 'multiclass' \(valid: binary, subtype\)"):
        load_breakhis(tmp_path, task="multiclass")
    for magnification in (50, "50X", "high"):
        with pytest.raises(SemimedError, match=r"unknown magnification .* \(valid: all, 40, 100, 200, 400\)"):
            load_breakhis(tmp_path, magnification=magnification)


def test_two_trees_are_ambiguous(tmp_path: Path) -> None:
    _tree_file(tmp_path / "a", GOOD)
    _tree_file(tmp_path / "b", GOOD)
    with pytest.raises(SemimedError, match="several BreakHis trees"):
        load_breakhis(tmp_path)
