"""Silent wrong answers found by reviewing the trust round, each with the fix's regression test."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import build_single_label_set
from PIL import Image
from test_report import write_trial

from semimed.data.base import as_channels
from semimed.data.cache.decoding import _decode_rows
from semimed.data.imagefolder import load_imagefolder
from semimed.errors import SemimedError
from semimed.optional import MissingPackageError
from semimed.report.trials import collect_trials, group_studies
from semimed.runs import RunIdentity, data_fingerprint, finished_metrics


def test_relabelled_rows_are_other_data_in_the_run_identity():
    """The data fingerprint covered the image files only: a manifest or label CSV edited to relabel an image
    (same files, same split paths) resumed or returned the old run's results."""
    dataset = build_single_label_set()
    dataset.labels = dataset.labels.copy()  # writable
    before = data_fingerprint(dataset)
    dataset.labels[0] = 1 - dataset.labels[0]
    after = data_fingerprint(dataset)
    assert before["sha256"] == after["sha256"]  # no image file changed ...
    assert before != after  # ... but the identity did
    old, new = (RunIdentity({}, "s", {}, data) for data in (before, after))
    assert old.differences(new) == [
        "the dataset's labels, classes, patient ids or official split (its metadata) changed"
    ]
    dataset.labels[0] = 1 - dataset.labels[0]
    dataset.meta.loc[0, "patient_id"] = "someone_else"
    assert data_fingerprint(dataset)["table_sha256"] != before["table_sha256"]


def test_a_kept_run_gives_back_nan_not_none(tmp_path: Path):
    """metrics.json stores NaN as null; a finished run's kept metrics came back with None where a fresh run
    returns NaN (and went to Tune's searchers so)."""
    (tmp_path / "metrics.json").write_text(
        json.dumps({"test/precision/benign": None, "test/roc_auc": 0.7, "positive_class": None, "step": 4})
    )
    kept = finished_metrics(tmp_path)
    assert math.isnan(kept["test/precision/benign"]) and kept["test/roc_auc"] == 0.7
    assert kept["positive_class"] is None and kept["step"] == 4


def test_trials_with_different_positive_classes_are_never_one_study(tmp_path: Path):
    """A trial run before data.positive_class reported class index 1's sensitivity; one run after it, on
    BreastMNIST, malignant's (index 0). Same config keys: they were averaged in one cell."""
    old = write_trial(tmp_path, "old", seed=0)
    new = write_trial(tmp_path, "new", seed=1)
    metrics = json.loads((new / "metrics.json").read_text())
    (new / "metrics.json").write_text(json.dumps({**metrics, "positive_class": "benign"}))
    studies, _ = group_studies(collect_trials(tmp_path).trials)
    assert len(studies) == 2
    positives = {s.data["data.positive_class"] for s in studies}
    assert positives == {"benign", "class index 1 (a run from before data.positive_class)"}
    assert old.exists()


def test_as_channels_converts_like_a_file_read():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
    assert as_channels(gray, 3).shape == (3, 4, 3) and (as_channels(gray, 3) == gray).all()
    rgb = np.random.default_rng(0).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    assert (as_channels(rgb, 1)[:, :, 0] == np.asarray(Image.fromarray(rgb).convert("L"))).all()
    assert as_channels(rgb, 3) is rgb


def test_an_image_folder_linked_into_another_class_is_refused(tmp_path: Path):
    """A link from one class's folder to another's listed the same images under both classes (each its own
    patient: they could be in train and in test)."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / name / f"{name}{i}.png")
    (tmp_path / "a" / "more").symlink_to(tmp_path / "b")
    with pytest.raises(SemimedError, match=r"are the same file .*reached twice through links"):
        load_imagefolder(tmp_path)


def test_a_missing_package_is_not_recorded_as_a_bad_image():
    """A DICOM decoder (or pydicom) missing on this machine was cached as a bad row: after installing it the
    run still said "fix or replace the file". The error goes up instead."""
    dataset = build_single_label_set()

    def read(row: int) -> np.ndarray:
        raise MissingPackageError("x.dcm: reading DICOM needs the optional package pydicom")

    dataset.reader = read
    with pytest.raises(MissingPackageError, match="pydicom"):
        _decode_rows(dataset, [0, 1], 8)
