"""Splits as data: patient-disjoint, nested, stratified, deterministic — each invariant asserted as a value.

The invariants run on the demo BreakHis tree (binary and subtype), the real BreakHis sample (when
SEMIMED_SAMPLE_DATA is set) and in-memory single- and multi-label sets (the latter with NaN = unknown).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from semimed.data.base import LabeledImageSet
from semimed.data.breakhis import load_breakhis
from semimed.data.splits import Split, labeled_subset, make_split, summarize
from semimed.errors import SemimedError

FRACTIONS = (0.05, 0.1, 0.25, 0.5, 1.0)
SPLIT_KEYS = ("dataset", "task", "seed", "fraction", "train", "val", "test", "labeled", "unlabeled")
DATASETS = ("demo_binary", "demo_subtype", "sample_binary", "memory_single", "memory_multilabel")


def expected_count(fraction: float, n: int) -> int:
    """floor(f·n + 1/2), with f taken as the decimal the user typed (0.15 is 3/20, not 0.1499…)."""
    return math.floor(Fraction(str(fraction)) * n + Fraction(1, 2))


@pytest.fixture(params=DATASETS)
def dataset(request: pytest.FixtureRequest) -> LabeledImageSet:
    name = request.param
    if name.startswith("demo_"):
        return load_breakhis(
            request.getfixturevalue("demo_roots")["breakhis"], task=name.removeprefix("demo_")
        )
    if name == "sample_binary":
        root = request.getfixturevalue("sample_data") / "breakhis"
        if not root.is_dir():
            pytest.skip(f"{root} does not exist")
        return load_breakhis(root, task="binary")
    if name == "memory_single":
        return request.getfixturevalue("make_single_label_set")(num_classes=3, patients_per_class=[12, 9, 6])
    return request.getfixturevalue("make_multilabel_set")(num_findings=5, num_patients=60)


def split_quietly(dataset: LabeledImageSet, fraction: float, seed: int, **kwargs) -> Split:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return make_split(dataset, fraction, seed, **kwargs)


def positives(dataset: LabeledImageSet) -> np.ndarray:
    """[N, K] bool: row i is a known positive of class/finding k."""
    return np.nan_to_num(dataset.stratify_labels(), nan=0.0) > 0.5


# ------------------------------------------------------------------------------------------- the invariants


def test_patient_disjoint_and_complete(dataset: LabeledImageSet) -> None:
    split = split_quietly(dataset, 0.25, seed=0)
    index = split.indices(dataset)
    patients = {name: set(dataset.patients[index[name]].astype(str)) for name in ("train", "val", "test")}
    assert patients["train"] & patients["val"] == set()
    assert patients["train"] & patients["test"] == set()
    assert patients["val"] & patients["test"] == set()
    assert all(patients[name] for name in ("train", "test")), "train and test must not be empty"
    # val_policy full: every row in exactly one of train/val/test
    every = np.concatenate([index["train"], index["val"], index["test"]])
    assert len(every) == len(dataset)
    assert np.array_equal(np.sort(every), np.arange(len(dataset)))
    assert split.patients == {name: len(group) for name, group in patients.items()}
    assert len(set().union(*patients.values())) == len(set(dataset.patients.astype(str)))


def test_labeled_and_unlabeled_partition_train(dataset: LabeledImageSet) -> None:
    split = split_quietly(dataset, 0.25, seed=0)
    train, labeled, unlabeled = set(split.train), set(split.labeled), set(split.unlabeled)
    assert len(split.labeled) == len(labeled) and len(split.unlabeled) == len(unlabeled), "duplicates"
    assert labeled <= train
    assert unlabeled == train - labeled
    assert labeled & unlabeled == set()
    assert 0 < len(labeled) < len(train)


def test_nested_fractions_keep_patients_fixed(dataset: LabeledImageSet) -> None:
    splits = [split_quietly(dataset, f, seed=3) for f in FRACTIONS]
    first = splits[0]
    for split in splits[1:]:
        assert (split.train, split.val, split.test) == (first.train, first.val, first.test)
    for smaller, larger in zip(splits, splits[1:], strict=False):
        assert set(smaller.labeled) < set(larger.labeled), (smaller.fraction, larger.fraction)
    full = splits[-1]
    assert sorted(full.labeled) == sorted(full.train) and full.unlabeled == []


def test_stratified_counts(dataset: LabeledImageSet) -> None:
    known = positives(dataset)
    row = {path: i for i, path in enumerate(dataset.meta["path"])}
    for fraction in FRACTIONS:
        split = split_quietly(dataset, fraction, seed=1)
        train = known[[row[p] for p in split.train]]
        labeled = known[[row[p] for p in split.labeled]]
        if not dataset.multilabel:
            for k, cls in enumerate(dataset.classes):
                n_c = int(train[:, k].sum())
                assert int(labeled[:, k].sum()) == expected_count(fraction, n_c), (fraction, cls, n_c)
        else:
            present = train.any(axis=0)
            assert (labeled[:, present].sum(axis=0) >= 1).all(), fraction
            # documented size: round(f·N), raised to the number of findings that need a positive
            assert len(split.labeled) == max(int(present.sum()), expected_count(fraction, len(split.train)))


def test_single_label_counts_by_hand(make_single_label_set) -> None:
    # 3 classes of 12/9/6 patients x 4 images; test 0.3 and val 0.15 of patients per class:
    # class 0: test round(3.6)=4, val round(1.2)=1, train 7 patients = 28 images
    # class 1: test round(2.7)=3, val round(0.9)=1, train 5 = 20; class 2: test round(1.8)=2, val round(0.6)=1, train 3 = 12
    dataset = make_single_label_set(num_classes=3, patients_per_class=[12, 9, 6])
    split = make_split(dataset, 0.1, seed=0)
    assert split.patients == {"train": 15, "val": 3, "test": 9}
    assert (len(split.train), len(split.val), len(split.test)) == (60, 12, 36)
    by_class = {
        cls: sum(p.startswith(f"c{k}/") for p in split.labeled) for k, cls in enumerate(dataset.classes)
    }
    # 0.1·28 = 2.8 -> 3; 0.1·20 = 2.0 -> 2; 0.1·12 = 1.2 -> 1
    assert by_class == {"class_0": 3, "class_1": 2, "class_2": 1}
    # half-up, not Python's half-to-even: 0.125·12 = 1.5 -> 2 and 0.125·20 = 2.5 -> 3
    split = make_split(dataset, 0.125, seed=0)
    assert [sum(p.startswith(f"c{k}/") for p in split.labeled) for k in range(3)] == [4, 3, 2]


def test_multilabel_finding_without_training_positive_is_warned(make_multilabel_set) -> None:
    dataset = make_multilabel_set(num_findings=5, num_patients=40, empty_findings=(2,))
    with pytest.warns(RuntimeWarning, match="finding_2"):
        split = make_split(dataset, 0.1, seed=0)
    assert any("finding_2" in note for note in split.warnings)
    assert not any("finding_0" in note or "finding_1" in note for note in split.warnings)
    # the other findings still each get a labeled positive
    known = positives(dataset)
    labeled = known[split.indices(dataset)["labeled"]]
    assert (labeled[:, [0, 1, 3, 4]].sum(axis=0) >= 1).all()


def test_multilabel_finding_only_outside_train_is_warned(make_multilabel_set) -> None:
    # finding_4 is positive for one patient only; for some seed that patient lands outside train
    dataset = make_multilabel_set(num_findings=5, num_patients=40, empty_findings=(4,))
    dataset.labels[0, 4] = 1.0  # row 0 belongs to patient P0000
    for seed in range(50):
        split = split_quietly(dataset, 0.1, seed)
        if "images/00000.png" not in split.train:
            break
    else:
        pytest.fail("patient P0000 was in train for 50 seeds")
    with pytest.warns(RuntimeWarning, match="finding_4"):
        again = make_split(dataset, 0.1, seed)
    assert again == split and any("finding_4" in note for note in split.warnings)
    # ... and when the patient is in train, finding_4 is labeled at every fraction
    seed_in = next(s for s in range(50) if "images/00000.png" in split_quietly(dataset, 0.1, s).train)
    for fraction in (0.01, 0.05):
        assert "images/00000.png" in split_quietly(dataset, fraction, seed_in).labeled


def test_single_label_class_without_training_patient_is_an_error(make_single_label_set) -> None:
    dataset = make_single_label_set(num_classes=3, patients_per_class=[5, 5, 0])
    with pytest.raises(SemimedError, match="no positive training image for: class_2"):
        make_split(dataset, 0.5, seed=0)


# --------------------------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_other_seed_other_split(dataset: LabeledImageSet, tmp_path: Path) -> None:
    a, b = split_quietly(dataset, 0.1, seed=7), split_quietly(dataset, 0.1, seed=7)
    assert a.to_json() == b.to_json()
    a.save(tmp_path / "a.json")
    b.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    other = split_quietly(dataset, 0.1, seed=8)
    assert other.to_json() != a.to_json()
    assert set(other.test) != set(a.test) or set(other.labeled) != set(a.labeled)


def test_split_does_not_touch_global_rng(make_single_label_set) -> None:
    dataset = make_single_label_set()
    # the legacy global RNG is what a careless implementation would use, so the test pokes it on purpose
    np.random.seed(123)  # noqa: NPY002
    before = np.random.get_state()[1].copy()  # noqa: NPY002
    first = make_split(dataset, 0.1, seed=0)
    assert np.array_equal(np.random.get_state()[1], before)  # noqa: NPY002
    np.random.seed(999)  # noqa: NPY002  (a different global state must not change the split)
    assert make_split(dataset, 0.1, seed=0) == first


# ---------------------------------------------------------------------------------------------- save / load


def test_save_load_round_trip(dataset: LabeledImageSet, tmp_path: Path) -> None:
    split = split_quietly(dataset, 0.25, seed=2)
    path = split.save(tmp_path / "runs" / "split.json")
    assert path == tmp_path / "runs" / "split.json"
    assert os.listdir(path.parent) == ["split.json"], "no temporary file may be left behind"
    payload = json.loads(path.read_text())
    assert set(SPLIT_KEYS) <= set(payload)
    assert payload["seed"] == 2 and payload["fraction"] == 0.25 and payload["dataset"] == dataset.name
    loaded = Split.load(path)
    assert loaded == split
    assert loaded.to_json() == path.read_text()
    for name, rows in loaded.indices(dataset).items():
        assert dataset.meta["path"].to_numpy()[rows].tolist() == getattr(split, name)


def test_save_is_atomic_when_the_rename_fails(
    make_single_label_set, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = make_single_label_set()
    path = make_split(dataset, 0.1, seed=0).save(tmp_path / "split.json")
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("semimed.files.os.replace", fail)  # splits write through semimed.files
    with pytest.raises(OSError, match="disk full"):
        make_split(dataset, 0.5, seed=1).save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["split.json"]


@pytest.mark.parametrize("key", SPLIT_KEYS)
def test_load_names_a_missing_key(make_single_label_set, tmp_path: Path, key: str) -> None:
    payload = json.loads(make_split(make_single_label_set(), 0.1, seed=0).to_json())
    del payload[key]
    path = tmp_path / "split.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(SemimedError, match=rf"split\.json.*lacks key\(s\) {key}$"):
        Split.load(path)


@pytest.mark.parametrize("key", ["val_policy", "classes"])
def test_load_of_json_without_optional_looking_keys(make_single_label_set, tmp_path: Path, key: str) -> None:
    split = make_split(make_single_label_set(), 0.1, seed=0)
    payload = json.loads(split.to_json())
    del payload[key]
    path = tmp_path / "split.json"
    path.write_text(json.dumps(payload))
    try:
        loaded = Split.load(path)
    except SemimedError as exc:  # either a clear error naming the key ...
        assert key in str(exc)
    else:  # ... or a documented default
        assert loaded.train == split.train and loaded.labeled == split.labeled


def test_load_unreadable(tmp_path: Path) -> None:
    with pytest.raises(SemimedError, match="missing.json: cannot read split JSON"):
        Split.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SemimedError, match="bad.json: cannot read split JSON"):
        Split.load(tmp_path / "bad.json")


def test_indices_name_an_image_absent_from_the_dataset(make_single_label_set) -> None:
    dataset = make_single_label_set()
    split = make_split(dataset, 0.1, seed=0)
    smaller = make_single_label_set(patients_per_class=[5, 5, 5])
    with pytest.raises(
        SemimedError, match=r"split 'train' names \d+ image\(s\) absent from the dataset, e\.g\."
    ):
        split.indices(smaller)


# ----------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_fraction_out_of_range(make_single_label_set, fraction: float) -> None:
    with pytest.raises(SemimedError, match=re.escape(f"label fraction {fraction} must be in (0, 1]")):
        make_split(make_single_label_set(), fraction, seed=0)


def test_fraction_too_small_names_class_and_bound(make_single_label_set) -> None:
    # class_2 is the rarest: 6 patients -> test 2, val 1, train 3 patients = 12 images; 0.5/12 = 0.04167
    dataset = make_single_label_set(num_classes=3, patients_per_class=[12, 9, 6])
    with pytest.raises(SemimedError, match="class 'class_2' 0 of its 12 training images") as info:
        make_split(dataset, 0.04, seed=0)
    # 0.5/12 = 0.041666…, printed rounded up so that the printed value is itself accepted
    assert "smallest fraction that labels every class is 0.0417" in str(info.value)
    bound = float(re.search(r"is ([0-9.e-]+)", str(info.value)).group(1))
    split = make_split(dataset, bound, seed=0)
    assert sum(p.startswith("c2/") for p in split.labeled) == 1


def test_fraction_named_in_the_error_is_accepted() -> None:
    refused = []
    for n in range(1, 120):
        matrix = np.eye(2, dtype=np.float32)[np.repeat([0, 1], [n, 200])]
        with pytest.raises(SemimedError) as info:
            labeled_subset(matrix, 0.4 / n, np.random.default_rng(0), ["rare", "common"], False)
        bound = float(re.search(r"is ([0-9.e-]+)$", str(info.value)).group(1))
        try:
            labeled_subset(matrix, bound, np.random.default_rng(0), ["rare", "common"], False)
        except SemimedError:
            refused.append((n, bound))
    assert refused == []


def test_unknown_val_policy(make_single_label_set) -> None:
    with pytest.raises(SemimedError, match="unknown val_policy 'best'; valid: full, fraction, none"):
        make_split(make_single_label_set(), 0.1, seed=0, val_policy="best")


@pytest.mark.parametrize(("test_fraction", "val_fraction"), [(1.0, 0.1), (0.3, -0.1)])
def test_patient_fractions_out_of_range(make_single_label_set, test_fraction, val_fraction) -> None:
    with pytest.raises(SemimedError, match=r"data\.(test|val)_fraction=.* must be in \[0, 1\)"):
        make_split(
            make_single_label_set(), 0.1, seed=0, test_fraction=test_fraction, val_fraction=val_fraction
        )


# ------------------------------------------------------------------------------------------------- val policy


@pytest.mark.parametrize("fraction", [0.05, 0.25])
def test_val_policy_fraction(dataset: LabeledImageSet, fraction: float) -> None:
    # val_fraction 0.3: with the default 0.15, a demo subtype stratum of 4 patients gets round(0.45) = 0 val
    full = split_quietly(dataset, fraction, seed=4, val_fraction=0.3)
    scaled = split_quietly(dataset, fraction, seed=4, val_fraction=0.3, val_policy="fraction")
    assert scaled.val_policy == "fraction"
    assert (scaled.train, scaled.test, scaled.labeled) == (full.train, full.test, full.labeled)
    assert set(scaled.val) <= set(full.val) and len(set(scaled.val)) == len(scaled.val)
    assert 0 < len(scaled.val) < len(full.val)
    known = positives(dataset)
    row = {path: i for i, path in enumerate(dataset.meta["path"])}
    in_full = known[[row[p] for p in full.val]].sum(axis=0)
    in_scaled = known[[row[p] for p in scaled.val]].sum(axis=0)
    assert ((in_scaled >= 1) == (in_full >= 1)).all(), "every class present in val keeps an image"
    if not dataset.multilabel:
        expected = [max(1, expected_count(fraction, int(n))) if n else 0 for n in in_full]
        assert in_scaled.tolist() == expected
    assert scaled.patients["val"] == len(set(dataset.patients[[row[p] for p in scaled.val]].astype(str)))


def test_val_policy_none(dataset: LabeledImageSet) -> None:
    full = split_quietly(dataset, 0.1, seed=4, val_fraction=0.3)
    none = split_quietly(dataset, 0.1, seed=4, val_fraction=0.3, val_policy="none")
    assert full.val and none.val == [] and none.patients["val"] == 0 and none.val_policy == "none"
    assert (none.train, none.test, none.labeled, none.unlabeled) == (
        full.train,
        full.test,
        full.labeled,
        full.unlabeled,
    )


# --------------------------------------------------------------------------------------- official splits, summary


def test_official_split_is_kept(make_multilabel_set) -> None:
    dataset = make_multilabel_set(num_findings=4, num_patients=50)
    patient_number = np.array([int(p[1:]) for p in dataset.patients])
    dataset.official_split = np.where(patient_number < 35, "train", "test")
    split = split_quietly(dataset, 0.2, seed=0, val_fraction=0.2)
    index = split.indices(dataset)
    assert np.array_equal(np.sort(index["test"]), np.flatnonzero(patient_number >= 35))
    assert split.patients == {"train": 28, "val": 7, "test": 15}  # val: round(0.2 * 35) = 7 train patients
    assert set(dataset.patients[index["val"]]) & set(dataset.patients[index["train"]]) == set()
    assert split.protocol == "official"


def test_summarize_counts(demo_roots: dict[str, Path]) -> None:
    dataset = load_breakhis(demo_roots["breakhis"], task="binary")
    split = make_split(dataset, 0.1, seed=0)
    rows = {(r["split"], r["class"]): r for r in summarize(split, dataset)}
    assert len(rows) == 5 * 2
    index = split.indices(dataset)
    for name in ("train", "val", "test", "labeled", "unlabeled"):
        assert sum(rows[(name, c)]["images"] for c in dataset.classes) == len(index[name])
    for name in ("train", "val", "test"):
        assert sum(rows[(name, c)]["patients"] for c in dataset.classes) == split.patients[name]
    n_train = {c: rows[("train", c)]["images"] for c in dataset.classes}
    assert {c: rows[("labeled", c)]["images"] for c in dataset.classes} == {
        c: expected_count(0.1, n) for c, n in n_train.items()
    }
