"""`semimed evaluate`: a finished run's reported network scored on another dataset (external validation).

One tiny run on the packaged BreastMNIST (module fixture, a few seconds). The key check: evaluated on the official
test part of the same file, the metrics are the run's own test/* numbers (metrics.json), also when the classes come
in another order (mapped by name). Intervals hold the point value and depend only on the seed; refused inputs
(other classes, a run of another label kind, an unfinished run, no positive image, --out inside or beside a run)
write nothing, and the run folder is byte-identical after everything.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from semimed.cli import main
from semimed.demo_run import breastmnist_path
from semimed.errors import SemimedError
from semimed.evaluate import evaluate_run, label_order, map_labels, ratio_metrics

CLASSES = ["malignant", "normal_benign"]
N_BOOT = 200  # enough to test the intervals' properties, fast


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished supervised run (small CNN, 4 steps, 16 px, CPU) on the packaged BreastMNIST, alone in its
    folder's parent (so that tmp_path outputs are not beside it)."""
    from semimed.config import load_config
    from semimed.experiment import run_training

    root = tmp_path_factory.mktemp("evaluate")
    cfg = load_config(
        None,
        [
            "data.dataset=medmnist",
            f"data.root={breastmnist_path()}",
            "data.image_size=16",
            f"data.cache_dir={root / 'cache'}",
            "model.backbone=small_cnn",
            "train.steps=4",
            "train.eval_every=2",
            "train.batch_size=8",
            "train.device=cpu",
            "train.loader_workers=0",
            "train.lr=0.01",  # predicts both classes after 4 steps (the default lr: one class only)
        ],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # barely trained: some metrics undefined
        run_training(cfg, root / "runs" / "run", show_progress=False)
    return root / "runs" / "run"


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under `folder`: content hash and mtime (byte-identical and untouched)."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _run_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)):
        return (a is None or math.isnan(a)) and (b is None or math.isnan(b))
    return a == pytest.approx(b, abs=1e-9)


def _assert_equals_runs_test(values: dict[str, float], run: dict) -> None:
    run_test = {k.removeprefix("test/"): v for k, v in run.items() if k.startswith("test/")}
    assert set(values) == set(run_test)
    different = {k: (values[k], run_test[k]) for k in values if not _same(values[k], run_test[k])}
    assert not different


def _quiet_evaluate(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return evaluate_run(*args, show_progress=False, **kwargs)


def test_evaluate_on_the_runs_test_part_equals_its_test_metrics(run_dir, tmp_path):
    before = _snapshot(run_dir)
    out = tmp_path / "ext"
    result = _quiet_evaluate(run_dir, out, root=breastmnist_path(), part="test", n_boot=N_BOOT)
    run = _run_metrics(run_dir)
    _assert_equals_runs_test(result.metrics, run)
    assert result.images == result.patients == 156 and result.positive_class == "malignant"
    assert result.step == run["selected_step"]
    # predictions.parquet: a run's columns and the run's own test rows, scores and labels.
    ours = pd.read_parquet(out / "predictions.parquet")
    theirs = pd.read_parquet(run_dir / "predictions.parquet")
    theirs = theirs[theirs["split"] == "test"].reset_index(drop=True)
    assert list(ours.columns) == list(theirs.columns)
    assert ours["path"].tolist() == theirs["path"].tolist() and (ours["step"] == run["selected_step"]).all()
    assert (ours["label"].to_numpy() == theirs["label"].to_numpy()).all()
    for c in CLASSES:
        np.testing.assert_allclose(ours[f"score/{c}"], theirs[f"score/{c}"], atol=1e-6)
    written = json.loads((out / "metrics.json").read_text())
    assert written["metrics"]["roc_auc"] == pytest.approx(run["test/roc_auc"], abs=1e-9)
    assert written["positive_class"] == "malignant" and written["part"] == "its official test part"
    assert written["images"] == 156 and written["checkpoint_step"] == run["selected_step"]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "predictions.parquet", "report.md"]
    # The run's own split.json names the same test part (the way for data without an official one).
    again = _quiet_evaluate(
        run_dir,
        tmp_path / "by_split",
        root=breastmnist_path(),
        split_file=run_dir / "split.json",
        n_boot=N_BOOT,
    )
    _assert_equals_runs_test(again.metrics, run)
    assert again.intervals == result.intervals  # the same rows, patients and seed: the same resamples
    assert _snapshot(run_dir) == before


def test_intervals_hold_the_value_and_follow_the_seed(run_dir, tmp_path):
    runs = [
        _quiet_evaluate(run_dir, tmp_path / name, root=breastmnist_path(), part="test", n_boot=N_BOOT, seed=s)
        for name, s in (("a", 3), ("b", 3), ("c", 4))
    ]
    first = runs[0]
    # Resampled: stats' metrics and the sensitivity/specificity added here.
    expected = {"accuracy", "balanced_accuracy", "roc_auc", "average_precision", "patient_accuracy"}
    expected |= {"sensitivity", "specificity", "sensitivity_macro", "specificity_macro"}
    finite = {m for m in expected if np.isfinite(first.metrics[m])}
    assert set(first.intervals) == finite and {"roc_auc", "accuracy", "specificity"} <= finite
    for metric, (low, high) in first.intervals.items():
        assert low <= first.metrics[metric] <= high, metric
        assert 0 <= low <= high <= 1
    # One set of patient resamples for every metric: macro sensitivity is balanced accuracy, resample by resample.
    assert first.intervals["sensitivity_macro"] == first.intervals["balanced_accuracy"]
    assert runs[1].intervals == first.intervals  # the same seed: the same intervals
    assert runs[2].intervals != first.intervals
    assert (tmp_path / "a" / "metrics.json").read_text() == (tmp_path / "b" / "metrics.json").read_text()
    report = (tmp_path / "a" / "report.md").read_text()
    low, high = first.intervals["roc_auc"]
    assert f"| roc_auc | {first.metrics['roc_auc']:.4f} | {low:.4f} – {high:.4f} |" in report
    assert "positive class: malignant" in report and "156 images, 156 patients" in report


def test_resampled_sensitivity_and_specificity_with_unit_weights_are_the_registrys():
    from semimed import stats
    from semimed.evaluate import _ratio_counts
    from semimed.metrics import evaluate_scores

    rng = np.random.default_rng(0)
    names = ["sensitivity", "specificity", "sensitivity_macro", "specificity_macro"]
    # Single-label, 3 classes, patients with several images.
    y = rng.integers(0, 3, 40)
    scores = rng.dirichlet(np.ones(3), 40)
    patients = np.repeat(np.arange(10), 4)
    pred = stats.Predictions(np.arange(40), np.arange(10), patients, y, scores, ["a", "b", "c"], False)
    got = ratio_metrics(pred, _ratio_counts(pred, None), np.ones((1, 10)), names[2:])
    want = evaluate_scores(y, scores, ["a", "b", "c"], False)
    for m in names[2:]:
        assert got[m][0] == pytest.approx(want[m])
    # Binary, positive class 0.
    y2 = rng.integers(0, 2, 40)
    s2 = rng.dirichlet(np.ones(2), 40)
    pred = stats.Predictions(np.arange(40), np.arange(10), patients, y2, s2, ["p", "n"], False, positive=0)
    got = ratio_metrics(pred, _ratio_counts(pred, None), np.ones((1, 10)), names)
    want = evaluate_scores(y2, s2, ["p", "n"], False, positive=0)
    for m in names:
        assert got[m][0] == pytest.approx(want[m])
    # Multi-label with unknown labels and thresholds.
    y3 = rng.integers(0, 2, (40, 3)).astype(float)
    y3[rng.random((40, 3)) < 0.2] = np.nan
    s3 = rng.random((40, 3))
    thresholds = np.array([0.3, 0.5, 0.7])
    pred = stats.Predictions(np.arange(40), np.arange(10), patients, y3, s3, ["x", "y", "z"], True)
    got = ratio_metrics(pred, _ratio_counts(pred, thresholds), np.ones((1, 10)), names[2:])
    want = evaluate_scores(y3, s3, ["x", "y", "z"], True, thresholds=thresholds)
    for m in names[2:]:
        assert got[m][0] == pytest.approx(want[m])


def test_a_class_set_that_differs_is_refused_naming_both(run_dir, tmp_path, capsys):
    other = tmp_path / "pneumoniamnist.npz"  # the file name gives the classes: normal, pneumonia
    shutil.copy(breastmnist_path(), other)
    out = tmp_path / "ext"
    code = main(["evaluate", str(run_dir), "--root", str(other), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "has classes [normal, pneumonia], the run [malignant, normal_benign]" in err
    assert "not in the run: normal, pneumonia; not in the dataset: malignant, normal_benign" in err
    assert not out.exists()


def test_the_same_classes_in_another_order_are_mapped_by_name(run_dir, tmp_path):
    from semimed.data.base import LabeledImageSet
    from semimed.data.medmnist import load_medmnist

    data = load_medmnist(breastmnist_path())
    swapped = LabeledImageSet(
        name="swapped",
        task="default",
        root=data.root,
        classes=list(reversed(data.classes)),
        multilabel=False,
        labels=1 - data.labels,
        meta=data.meta.copy(),
        reader=data.reader,
        official_split=data.official_split,
    )
    result = _quiet_evaluate(run_dir, tmp_path / "ext", images=swapped, part="test", n_boot=N_BOOT)
    _assert_equals_runs_test(result.metrics, _run_metrics(run_dir))
    assert result.classes == CLASSES and result.positive_class == "malignant"
    frame = pd.read_parquet(tmp_path / "ext" / "predictions.parquet")
    theirs = pd.read_parquet(run_dir / "predictions.parquet")
    assert (frame["label"].to_numpy() == theirs[theirs["split"] == "test"]["label"].to_numpy()).all()
    assert [c for c in frame.columns if c.startswith("score/")] == [f"score/{c}" for c in CLASSES]
    written = json.loads((tmp_path / "ext" / "metrics.json").read_text())
    assert written["dataset_classes"] == ["normal_benign", "malignant"] and written["classes"] == CLASSES
    assert "mapped by name" in (tmp_path / "ext" / "report.md").read_text()


def test_an_npz_with_class_names_in_another_order_is_mapped(run_dir, tmp_path, capsys):
    """Another site's own .npz (a name semimed does not know), its classes named by the medmnist class_names
    option in the other order, labels to match: the same images, so the run's own test numbers."""
    with np.load(breastmnist_path()) as npz:
        arrays = dict(npz)
    for split in ("train", "val", "test"):
        arrays[f"{split}_labels"] = 1 - arrays[f"{split}_labels"]  # 0 = normal_benign, 1 = malignant
    site = tmp_path / "site_b.npz"
    np.savez(site, **arrays)
    out = tmp_path / "ext"
    argv = ["evaluate", str(run_dir), "--root", str(site), "--out", str(out), "--split", "test"]
    code = main([*argv, "--class-names", "normal_benign,malignant", "--n-boot", "50"])
    assert code == 0, capsys.readouterr().err
    written = json.loads((out / "metrics.json").read_text())
    assert written["dataset_classes"] == ["normal_benign", "malignant"] and written["classes"] == CLASSES
    _assert_equals_runs_test(written["metrics"], _run_metrics(run_dir))


def test_label_order_and_map_labels():
    assert label_order(["a", "b", "c"], ["a", "b", "c"], "x") is None
    order = label_order(["c", "a", "b"], ["a", "b", "c"], "x")
    # Single-label: dataset index 0 (c) -> run index 2, 1 (a) -> 0, 2 (b) -> 1.
    assert map_labels(np.array([0, 1, 2, 0]), order, False).tolist() == [2, 0, 1, 2]
    # Multi-label: columns permuted into the run's order, unknowns kept.
    labels = np.array([[1.0, 0.0, np.nan], [0.0, 1.0, 1.0]])  # columns c, a, b
    np.testing.assert_array_equal(
        map_labels(labels, order, True), np.array([[0.0, np.nan, 1.0], [1.0, 1.0, 0.0]])
    )
    with pytest.raises(
        SemimedError, match=r"has classes \[a, b\], the run \[a, b, c\].*not in the dataset: c"
    ):
        label_order(["a", "b"], ["a", "b", "c"], "the data")


def test_the_run_folder_is_byte_identical_and_out_is_never_inside_or_beside_it(run_dir, tmp_path, capsys):
    before = _snapshot(run_dir)
    out = tmp_path / "all"
    code = main(
        ["evaluate", str(run_dir), "--root", str(breastmnist_path()), "--out", str(out), "--n-boot", "50"]
    )
    printed, err = capsys.readouterr()
    assert code == 0 and "780 image(s), 780 patient(s), positive class malignant" in printed
    # The run's own file, all of it: a warning says it holds the images the run trained on.
    assert "the run's own data.root and all its images are scored" in err
    assert f"wrote {out}: report.md, metrics.json, predictions.parquet" in printed
    assert len(pd.read_parquet(out / "predictions.parquet")) == 780
    assert json.loads((out / "metrics.json").read_text())["part"] == "all images"
    for inside in (run_dir, run_dir / "external", run_dir / "tb" / "x"):
        with pytest.raises(SemimedError, match="inside the run folder"):
            evaluate_run(run_dir, inside, root=breastmnist_path())
    beside = run_dir.parent / "external"
    with pytest.raises(SemimedError, match="beside the run folder run in .*would read it as a run"):
        evaluate_run(run_dir, beside, root=breastmnist_path())
    assert not (run_dir / "external").exists() and not beside.exists()
    assert _snapshot(run_dir) == before


def test_refusals_write_nothing(run_dir, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from semimed.data.base import LabeledImageSet
    from semimed.data.medmnist import load_medmnist

    out = tmp_path / "ext"
    # An unfinished run: no metrics.json; no backbone.safetensors.
    for missing, message in (
        ("metrics.json", "no readable metrics.json"),
        ("backbone.safetensors", "no backbone"),
    ):
        copy = tmp_path / f"no-{missing}" / "run"
        shutil.copytree(run_dir, copy)
        (copy / missing).unlink()
        code = main(["evaluate", str(copy), "--root", str(breastmnist_path()), "--out", str(out)])
        assert code == 2 and message in capsys.readouterr().err
    # A multi-label run on a single-label set (the run's export says multilabel).
    multi = tmp_path / "multi" / "run"
    shutil.copytree(run_dir, multi)
    with safe_open(str(run_dir / "backbone.safetensors"), framework="pt") as handle:
        meta, tensors = dict(handle.metadata()), {k: handle.get_tensor(k) for k in handle.keys()}
    save_file(tensors, str(multi / "backbone.safetensors"), metadata={**meta, "multilabel": "true"})
    with pytest.raises(SemimedError, match="the run is multi-label .*is single-label"):
        evaluate_run(multi, out, root=breastmnist_path())
    # No image of the positive class in the scored part.
    with np.load(breastmnist_path()) as npz:
        arrays = dict(npz)
    arrays["test_labels"] = np.ones_like(arrays["test_labels"])  # all normal_benign
    no_positive = tmp_path / "nopos" / "breastmnist.npz"
    no_positive.parent.mkdir()
    np.savez(no_positive, **arrays)
    with pytest.raises(SemimedError, match="has no image of the run's positive class 'malignant'"):
        evaluate_run(run_dir, out, root=no_positive, part="test")
    # --split test where the data has no official test part.
    data = load_medmnist(breastmnist_path())
    unsplit = LabeledImageSet(
        "plain", "default", data.root, data.classes, False, data.labels, data.meta, data.reader
    )
    with pytest.raises(SemimedError, match="has no official test part"):
        evaluate_run(run_dir, out, images=unsplit, part="test")
    # A dataset option the dataset lacks: one line naming the flag.
    code = main(
        ["evaluate", str(run_dir), "--root", str(breastmnist_path()), "--out", str(out), "--view", "PA"]
    )
    assert code == 2 and "--view: not an option of dataset 'medmnist'" in capsys.readouterr().err
    assert not out.exists()
