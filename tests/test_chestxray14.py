"""ChestX-ray14 loader: the real NIH metadata and sample images (SEMIMED_SAMPLE_DATA), tiny hand-built releases
for every bad input, and the multi-label split invariants on top of it."""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from semimed.data.chestxray14 import (
    FINDINGS,
    NO_FINDING,
    PUBLISHED_COUNTS,
    TOTAL_IMAGES,
    TOTAL_PATIENTS,
    load_chestxray14,
    parse_findings,
    read_metadata,
)
from semimed.data.demo import CHEST_FINDINGS
from semimed.data.splits import make_split
from semimed.errors import SemimedError

# --------------------------------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def chest_root(sample_data: Path) -> Path:
    root = sample_data / "chestxray14"
    if not (root / "metadata" / "Data_Entry_2017_v2020.csv.gz").is_file():
        pytest.skip(f"{root} has no metadata/Data_Entry_2017_v2020.csv.gz")
    return root


@pytest.fixture(scope="module")
def sample(chest_root: Path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = load_chestxray14(chest_root, drop_missing=True)
    return dataset, [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def index(chest_root: Path) -> pd.DataFrame:
    return pd.read_csv(chest_root / "images_index.csv")


def test_full_table_official_lists_and_published_counts(chest_root: Path) -> None:
    meta = chest_root / "metadata"
    table = read_metadata(meta / "Data_Entry_2017_v2020.csv.gz")
    assert len(table) == TOTAL_IMAGES == 112_120
    assert table["patient_id"].nunique() == TOTAL_PATIENTS == 30_805
    test = set((meta / "test_list.txt").read_text().split())
    train_val = set((meta / "train_val_list.txt").read_text().split())
    assert (len(test), len(train_val)) == (25_596, 86_524)
    assert not test & train_val
    assert test | train_val == set(table["image_index"])  # the lists cover exactly the table
    in_test = table["image_index"].isin(test)
    assert not set(table["patient_id"][in_test]) & set(table["patient_id"][~in_test])  # patient-disjoint
    labels = parse_findings(table["finding_labels"], str)
    counts = dict(zip(FINDINGS, labels.sum(axis=0).astype(int).tolist(), strict=True))
    counts[NO_FINDING] = int((labels.sum(axis=1) == 0).sum())
    assert counts == PUBLISHED_COUNTS
    assert (counts["Hernia"], counts["Infiltration"], counts[NO_FINDING]) == (227, 19_894, 60_361)


def test_sample_rows_match_the_index(sample, index: pd.DataFrame, chest_root: Path) -> None:
    dataset, _ = sample
    assert (dataset.name, dataset.task, dataset.multilabel, dataset.channels) == (
        "chestxray14",
        "findings",
        True,
        1,
    )
    assert dataset.classes == FINDINGS == CHEST_FINDINGS
    assert dataset.labels.dtype == np.float32 and dataset.labels.shape == (440, 14)
    assert len(dataset) == index["image_index"].nunique() == 440
    assert dataset.meta.attrs["missing_dropped"] == TOTAL_IMAGES - 440
    by_name = index.drop_duplicates("image_index").set_index("image_index")
    meta = dataset.meta.set_index("image_index")
    assert (meta["patient_id"] == by_name.loc[meta.index, "patient_id"]).all()
    assert (meta["view"] == by_name.loc[meta.index, "view_position"]).all()
    expected_split = by_name.loc[meta.index, "official_split"].map({"train_val": "train", "test": "test"})
    assert (dataset.official_split == expected_split.to_numpy()).all()
    for row, labels in enumerate(by_name.loc[meta.index, "finding_labels"]):
        wanted = {name for name in labels.split("|") if name != NO_FINDING}
        assert {FINDINGS[k] for k in np.flatnonzero(dataset.labels[row])} == wanted
    assert all((chest_root / path).is_file() for path in dataset.meta["path"])


def test_sample_duplicate_names_resolve_to_the_largest_copy(sample, index: pd.DataFrame) -> None:
    dataset, messages = sample
    index = index.assign(area=index["width"] * index["height"])
    largest = index.sort_values(["area", "path"], ascending=[False, True]).drop_duplicates("image_index")
    chosen = dataset.meta.set_index("image_index")["path"]
    assert (chosen[largest["image_index"]].to_numpy() == largest["path"].to_numpy()).all()
    assert chosen["00000001_000.png"] == "images/00000001_000.png"  # 1024 px over 512 and 128
    assert chosen["00000003_000.png"] == "images_256/00000003_000.png"  # 256 over 128 (not sorted order)
    assert any("4 image name(s) occur more than once" in m for m in messages)
    assert any("dropped" in m and "111680" in m for m in messages)


def test_sample_rgb_and_rgba_copies_read_as_grayscale(sample, index: pd.DataFrame, chest_root: Path) -> None:
    dataset, _ = sample
    for mode in ("RGB", "RGBA"):
        used = index["path"].isin(set(dataset.meta["path"]))
        path = index[used & (index["mode"] == mode)]["path"].iloc[0]
        row = int(np.flatnonzero(dataset.meta["path"] == path)[0])
        pixels = dataset.read_image(row)
        with Image.open(chest_root / path) as image:
            expected = np.asarray(image.convert("L"))
        assert pixels.dtype == np.uint8 and pixels.shape == (*expected.shape, 1)
        assert np.array_equal(pixels[:, :, 0], expected)


def test_sample_missing_images_stop_by_default(chest_root: Path) -> None:
    with pytest.raises(SemimedError, match=r"111680 of 112120 rows .* \(first: 00000001_001\.png, ") as error:
        load_chestxray14(chest_root)
    assert "drop_missing" in str(error.value) and "\n" not in str(error.value)


def test_sample_view_filter(sample, chest_root: Path) -> None:
    dataset, _ = sample
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pa = load_chestxray14(chest_root, view="pa", drop_missing=True)
    assert set(pa.meta["view"]) == {"PA"}
    assert len(pa) == int((dataset.meta["view"] == "PA").sum()) > 0


def test_sample_split_invariants(sample) -> None:
    dataset, _ = sample
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small, large = (make_split(dataset, fraction, seed=0) for fraction in (0.05, 0.3))
    patient = dict(zip(dataset.meta["path"], dataset.patients, strict=True))
    groups = [{patient[p] for p in getattr(small, name)} for name in ("train", "val", "test")]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    official_test = set(dataset.meta["path"][dataset.official_split == "test"])
    assert set(small.test) == official_test  # the official test list, untouched
    assert set(small.labeled) < set(large.labeled) <= set(small.train)  # nested
    row = {p: i for i, p in enumerate(dataset.meta["path"])}
    train_pos = dataset.labels[[row[p] for p in small.train]].sum(axis=0) > 0
    labeled_pos = dataset.labels[[row[p] for p in small.labeled]].sum(axis=0) > 0
    assert (labeled_pos == train_pos).all()  # every finding with a training positive has a labeled one
    # Hernia's only positive (00000003_000) is in the official test set: named, not silently ignored.
    # (Others may land in val, depending on the seed's patient draw.)
    absent = [name for name, present in zip(FINDINGS, train_pos, strict=True) if not present]
    assert "Hernia" in absent
    assert f"no positive training image for: {', '.join(absent)}" in small.warnings
    assert any(str(w.message) == f"no positive training image for: {', '.join(absent)}" for w in caught)
    assert any("dropped 111680" in w for w in small.warnings)


# ------------------------------------------------------------------------------------------ hand-built releases

ROWS = [
    ("00000001_000.png", "Cardiomegaly", 1, "PA"),
    ("00000001_001.png", "Effusion|Hernia|Atelectasis", 1, "AP"),
    ("00000002_000.png", "No Finding", 2, "PA"),
    ("00000003_000.png", "Pleural_Thickening", 3, "AP"),
]


def test_labels_paths_and_official_split(tmp_path: Path, make_chest_release) -> None:
    root = make_chest_release(tmp_path / "nih", ROWS, test=("00000003_000.png",))
    dataset = load_chestxray14(root)
    expected = np.zeros((4, 14), np.float32)
    expected[0, FINDINGS.index("Cardiomegaly")] = 1
    expected[1, [FINDINGS.index("Effusion"), FINDINGS.index("Hernia"), FINDINGS.index("Atelectasis")]] = 1
    expected[3, FINDINGS.index("Pleural_Thickening")] = 1
    assert np.array_equal(dataset.labels, expected)
    assert dataset.meta["path"].tolist() == [f"images_001/images/{row[0]}" for row in ROWS]
    assert dataset.meta["patient_id"].tolist() == [1, 1, 2, 3]
    assert dataset.official_split.tolist() == ["train", "train", "train", "test"]
    assert [int(dataset.read_image(i)[0, 0, 0]) for i in range(4)] == [0, 1, 2, 3]
    assert dataset.meta.attrs["missing_dropped"] == 0 and dataset.notes == []


def test_flat_layout_gz_table_and_nested_metadata(tmp_path: Path, make_chest_release) -> None:
    root = make_chest_release(
        tmp_path / "flat", ROWS, test=("00000003_000.png",), folder="pngs", csv_name="Data_Entry_2017.csv.gz"
    )
    (root / "meta").mkdir()
    for name in ("Data_Entry_2017.csv.gz", "test_list.txt", "train_val_list.txt"):
        (root / name).rename(root / "meta" / name)
    dataset = load_chestxray14(root, view="AP")
    assert dataset.meta["path"].tolist() == ["pngs/00000001_001.png", "pngs/00000003_000.png"]
    assert dataset.meta.attrs["metadata"] == "meta/Data_Entry_2017.csv.gz"


def test_v2020_table_preferred_over_2017_at_the_same_depth(tmp_path: Path, make_chest_release) -> None:
    root = make_chest_release(tmp_path / "nih", ROWS, test=("00000003_000.png",))
    (root / "Data_Entry_2017.csv").write_text(
        (root / "Data_Entry_2017_v2020.csv").read_text().replace("Cardiomegaly", "Mass")
    )
    dataset = load_chestxray14(root)
    assert dataset.labels[0, FINDINGS.index("Cardiomegaly")] == 1
    assert any("using Data_Entry_2017_v2020.csv" in note for note in dataset.notes)


def test_drop_missing_records_the_count(tmp_path: Path, make_chest_release) -> None:
    root = make_chest_release(
        tmp_path / "nih", ROWS, test=("00000003_000.png",), skip_images=("00000002_000.png",)
    )
    with pytest.raises(SemimedError, match=r"1 of 4 rows name an image not found .*first: 00000002_000\.png"):
        load_chestxray14(root)
    with pytest.warns(RuntimeWarning, match="dropped"):
        dataset = load_chestxray14(root, drop_missing=True)
    assert len(dataset) == 3 and dataset.meta.attrs["missing_dropped"] == 1
    assert "00000002_000.png" not in set(dataset.meta["image_index"])
    assert any("dropped 1 of 4" in note for note in dataset.notes)


def test_duplicate_names_take_the_most_pixels_then_sorted_order(tmp_path: Path, make_chest_release) -> None:
    root = make_chest_release(tmp_path / "nih", ROWS, test=("00000003_000.png",))
    for folder, side in (("a_small", 4), ("z_large", 16), ("b_same", 8)):
        (root / folder).mkdir()
        Image.fromarray(np.full((side, side), 200, np.uint8)).save(root / folder / "00000001_000.png")
        Image.fromarray(np.full((8, 8), 100, np.uint8)).save(root / folder / "00000002_000.png")
    with pytest.warns(RuntimeWarning, match="2 image name"):
        dataset = load_chestxray14(root)
    paths = dict(zip(dataset.meta["image_index"], dataset.meta["path"], strict=True))
    assert paths["00000001_000.png"] == "z_large/00000001_000.png"
    assert paths["00000002_000.png"] == "a_small/00000002_000.png"  # four 8x8 copies: first in sorted order


def _edit_table(root: Path, old: str, new: str) -> None:
    path = root / "Data_Entry_2017_v2020.csv"
    path.write_text(path.read_text().replace(old, new, 1))


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("Effusion|Hernia", "Effusion|Hernie", r"line 3: unknown finding 'Hernie'"),
        ("Cardiomegaly", "No Finding|Mass", r"line 2: 'No Finding' combined with findings"),
        ("Cardiomegaly", "Mass||Nodule", r"line 2: empty finding"),
        (
            "00000002_000.png,",
            "../00000002_000.png,",
            r"line 4: image name '\.\./00000002_000\.png' .*escape",
        ),
        (
            "00000002_000.png,",
            "sub/00000002_000.png,",
            r"line 4: image name 'sub/00000002_000\.png' .*escape",
        ),
        ("00000002_000.png,", "00000001_000.png,", r"line 4: image '00000001_000\.png' appears twice"),
        (",2,50,M,PA", ",two,50,M,PA", r"line 4: Patient ID 'two' is not a number"),
        (",2,50,M,PA", ",2,50,M,LL", r"line 4: View Position 'LL' is not PA or AP"),
        ("Patient ID", "Patient", r"lacks column\(s\) 'Patient ID'"),
    ],
)
def test_bad_table_rows_are_named(
    tmp_path: Path, make_chest_release, old: str, new: str, message: str
) -> None:
    root = make_chest_release(tmp_path / "nih", ROWS, test=("00000003_000.png",))
    _edit_table(root, old, new)
    with pytest.raises(SemimedError, match=message) as error:
        load_chestxray14(root)
    assert "Data_Entry_2017_v2020.csv" in str(error.value) and "\n" not in str(error.value)


def test_bad_official_lists_are_named(tmp_path: Path, make_chest_release) -> None:
    root = make_chest_release(tmp_path / "nih", ROWS, test=("00000003_000.png",))
    (root / "test_list.txt").write_text("00000003_000.png\n00000002_000.png")
    with pytest.raises(SemimedError, match=r"line 4: image '00000002_000\.png' is in both"):
        load_chestxray14(root)
    (root / "test_list.txt").write_text("00000003_000.png")
    (root / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png")
    with pytest.raises(SemimedError, match=r"line 4: image '00000002_000\.png' is in neither"):
        load_chestxray14(root)
    (root / "test_list.txt").write_text("00000003_000.png\n00000001_001.png")
    (root / "train_val_list.txt").write_text("00000001_000.png\n00000002_000.png")
    with pytest.raises(SemimedError, match=r"patient 1 has images in both the test and the train_val list"):
        load_chestxray14(root)
    (root / "test_list.txt").write_text("00000003_000.png\n00000003_000.png")
    with pytest.raises(SemimedError, match=r"test_list\.txt: '00000003_000\.png' is listed twice"):
        load_chestxray14(root)
    (root / "test_list.txt").unlink()
    with pytest.raises(SemimedError, match=r"no test_list\.txt"):
        load_chestxray14(root)


def test_missing_or_ambiguous_files_and_bad_arguments(tmp_path: Path, make_chest_release) -> None:
    with pytest.raises(SemimedError, match="does not exist"):
        load_chestxray14(tmp_path / "nowhere")
    root = make_chest_release(tmp_path / "nih", ROWS, test=("00000003_000.png",))
    with pytest.raises(SemimedError, match=r"unknown view 'LAT'"):
        load_chestxray14(root, view="LAT")
    for copy in ("x", "y"):
        (root / copy).mkdir()
        (root / copy / "test_list.txt").write_text("00000003_000.png")
    (root / "test_list.txt").unlink()
    with pytest.raises(
        SemimedError, match=r"several test_list\.txt at the same depth \(x/test_list\.txt, y/"
    ):
        load_chestxray14(root)
    (root / "Data_Entry_2017_v2020.csv").unlink()
    with pytest.raises(SemimedError, match="no ChestX-ray14 metadata"):
        load_chestxray14(root)
    (root / "Data_Entry_2017_v2020.csv.gz").write_bytes(gzip.compress(b"Image Index,Finding")[:20])
    with pytest.raises(SemimedError, match="cannot read the metadata table"):
        load_chestxray14(root)
