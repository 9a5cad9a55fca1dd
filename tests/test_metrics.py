"""semimed.metrics against scikit-learn (the reference) and hand-computed examples."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from semimed.errors import SemimedError
from semimed.metrics import (
    METRICS,
    TASKS,
    average_precision,
    choose_thresholds,
    confusion_matrix,
    evaluate_scores,
    metric_names,
    metrics_for,
    multilabel_metrics,
    roc_auc,
    single_label_metrics,
)

CLASSES_2 = ["benign", "malignant"]
CLASSES_4 = ["a", "b", "c", "d"]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _single_label_data(seed: int, k: int, n: int = 300, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """y [N] with every class present and probs [N, K] that carry signal about y.

    With ties=True the rows are drawn from a pool of 15 distinct rows, so every column has many tied
    scores while rows still sum to 1 exactly (sklearn's multi-class AUC insists on that).
    """
    rng = np.random.default_rng(seed)
    if ties:
        pool_y = np.r_[np.arange(k), rng.integers(0, k, 15 - k)]
        pool_p = _softmax(rng.normal(size=(15, k)) + 1.5 * np.eye(k)[pool_y])
        idx = rng.integers(0, 15, n)
        # Labels are noisy copies of the pool's labels so a tie group holds several classes.
        y = np.where(rng.random(n) < 0.7, pool_y[idx], rng.integers(0, k, n))
        return y, pool_p[idx]
    y = rng.integers(0, k, n)
    y[:k] = np.arange(k)
    return y, _softmax(rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y])


@pytest.fixture
def no_runtime_warnings():
    # Clean data must not trigger our NaN warnings (sklearn's own warnings are UserWarnings, not affected).
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield


# ----------------------------------------------------------------------------------------------------------
# building blocks


@pytest.mark.parametrize("seed", [0, 1])
def test_confusion_matrix_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 3, 100)  # class 3 never true
    y_pred = rng.integers(0, 4, 100)
    cm = confusion_matrix(y_true, y_pred, 4)
    assert cm.dtype == np.int64 and cm.shape == (4, 4)
    np.testing.assert_array_equal(cm, skm.confusion_matrix(y_true, y_pred, labels=range(4)))


def test_confusion_matrix_rejects_out_of_range():
    with pytest.raises(SemimedError, match="y_pred"):
        confusion_matrix(np.array([0, 1]), np.array([0, 2]), 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_binary_auc_and_ap_match_sklearn(seed, decimals, no_runtime_warnings):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    y[:2] = [0, 1]
    score = rng.normal(size=200) + y
    if decimals is not None:
        score = np.round(score, decimals)  # heavy ties
    assert roc_auc(y, score) == pytest.approx(skm.roc_auc_score(y, score), abs=1e-12)
    assert average_precision(y, score) == pytest.approx(skm.average_precision_score(y, score), abs=1e-12)


def test_binary_all_tied_scores():
    y = np.array([0, 1, 0, 1, 1])
    score = np.full(5, 0.3)
    assert roc_auc(y, score) == pytest.approx(0.5)
    assert average_precision(y, score) == pytest.approx(skm.average_precision_score(y, score))


@pytest.mark.parametrize("fn", [roc_auc, average_precision])
@pytest.mark.parametrize("y", [np.zeros(4), np.ones(4)])
def test_binary_single_class_is_nan_with_warning(fn, y):
    with pytest.warns(RuntimeWarning, match="'lesion'"):
        assert np.isnan(fn(y, np.linspace(0, 1, 4), name="lesion"))


def test_binary_rejects_nan_scores_and_bad_labels():
    with pytest.raises(SemimedError, match="NaN"):
        roc_auc(np.array([0, 1]), np.array([0.1, np.nan]))
    with pytest.raises(SemimedError, match="0 or 1"):
        average_precision(np.array([0, 2]), np.array([0.1, 0.2]))


# ----------------------------------------------------------------------------------------------------------
# single-label


def _check_against_sklearn(y, probs, classes, out):
    k = len(classes)
    y_pred = probs.argmax(axis=1)
    assert out["accuracy"] == pytest.approx(skm.accuracy_score(y, y_pred))
    assert out["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, y_pred))
    prec, rec, f1, _ = skm.precision_recall_fscore_support(y, y_pred, labels=range(k), zero_division=np.nan)
    cm = skm.confusion_matrix(y, y_pred, labels=range(k))
    aps = []
    for c, name in enumerate(classes):
        tn = cm.sum() - cm[c, :].sum() - cm[:, c].sum() + cm[c, c]
        spec = tn / (tn + cm[:, c].sum() - cm[c, c])
        # A class absent from y_true has no defined AUC/AP (sklearn would give NaN and 0 with a warning).
        both = 0 < np.sum(y == c) < len(y)
        auc = skm.roc_auc_score(y == c, probs[:, c]) if both else np.nan
        ap = skm.average_precision_score(y == c, probs[:, c]) if both else np.nan
        aps.append(ap)
        for key, want in [("precision", prec[c]), ("sensitivity", rec[c]), ("f1", f1[c]),
                          ("specificity", spec), ("roc_auc", auc), ("average_precision", ap)]:  # fmt: skip
            assert out[f"{key}/{name}"] == pytest.approx(want, abs=1e-12, nan_ok=True), (key, name)
    for key, avg in [("precision_macro", prec), ("sensitivity_macro", rec), ("f1_macro", f1)]:
        assert out[key] == pytest.approx(np.nanmean(avg), abs=1e-12)
    sk_macro = skm.precision_recall_fscore_support(
        y, y_pred, labels=range(k), average="macro", zero_division=np.nan
    )
    assert out["precision_macro"] == pytest.approx(sk_macro[0], abs=1e-12)
    assert out["sensitivity_macro"] == pytest.approx(sk_macro[1], abs=1e-12)
    assert out["f1_macro"] == pytest.approx(sk_macro[2], abs=1e-12)
    if k == 2:  # binary: the positive class's AP (test_single_label_k2_matches_sklearn)
        return
    assert out["average_precision"] == pytest.approx(np.nanmean(aps), abs=1e-12)
    if not np.isnan(aps).any():
        want = skm.average_precision_score(np.eye(k)[y], probs, average="macro")
        assert out["average_precision"] == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("ties", [False, True])
def test_single_label_k4_matches_sklearn(seed, ties, no_runtime_warnings):
    y, probs = _single_label_data(seed, 4, ties=ties)
    out = single_label_metrics(y, probs, CLASSES_4)
    _check_against_sklearn(y, probs, CLASSES_4, out)
    assert out["roc_auc"] == pytest.approx(
        skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-12
    )
    # Binary-only aliases and patient_accuracy are absent.
    assert not {"sensitivity", "specificity", "precision", "f1", "patient_accuracy"} & out.keys()
    assert all(isinstance(v, float) for v in out.values())


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("positive", [None, 0, 1])
def test_single_label_k2_matches_sklearn(seed, ties, positive, no_runtime_warnings):
    """The binary headline metrics are the positive class's (index 1 when none is given): scikit-learn's with
    pos_label = that class."""
    y, probs = _single_label_data(seed, 2, ties=ties)
    out = single_label_metrics(y, probs, CLASSES_2, positive=positive)
    _check_against_sklearn(y, probs, CLASSES_2, out)
    pos = 1 if positive is None else positive
    y_pred = probs.argmax(axis=1)
    assert out["roc_auc"] == pytest.approx(skm.roc_auc_score(y == pos, probs[:, pos]), abs=1e-12)
    assert out["average_precision"] == pytest.approx(
        skm.average_precision_score(y == pos, probs[:, pos]), abs=1e-12
    )
    assert out["sensitivity"] == pytest.approx(skm.recall_score(y, y_pred, pos_label=pos))
    assert out["specificity"] == pytest.approx(skm.recall_score(y, y_pred, pos_label=1 - pos))
    assert out["precision"] == pytest.approx(skm.precision_score(y, y_pred, pos_label=pos))
    assert out["f1"] == pytest.approx(skm.f1_score(y, y_pred, pos_label=pos))


def test_a_positive_class_index_outside_a_binary_task_is_refused():
    y, probs = _single_label_data(0, 4)
    with pytest.raises(SemimedError, match="positive class index 1 given for a multiclass task"):
        single_label_metrics(y, probs, CLASSES_4, positive=1)


def test_single_label_key_names():
    y, probs = _single_label_data(0, 2, n=40)
    keys = set(single_label_metrics(y, probs, CLASSES_2, patient_ids=np.arange(40) % 5))
    per_class = {
        f"{m}/{c}"
        for m in ("precision", "sensitivity", "specificity", "f1", "roc_auc", "average_precision")
        for c in CLASSES_2
    }
    scalar = {"accuracy", "balanced_accuracy", "precision_macro", "sensitivity_macro", "specificity_macro",
              "f1_macro", "average_precision", "roc_auc", "sensitivity", "specificity", "precision", "f1",
              "patient_accuracy"}  # fmt: skip
    assert keys == per_class | scalar


def test_patient_accuracy_hand_example():
    # Patient A: 3 images, 2 right; patient B: 1 image, right -> (2/3 + 1) / 2 = 0.8333.
    y = np.array([0, 1, 1, 0])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4]])
    out = single_label_metrics(y, probs, CLASSES_2, patient_ids=np.array(["A", "A", "A", "B"]))
    assert out["patient_accuracy"] == pytest.approx(5 / 6)
    assert out["accuracy"] == pytest.approx(3 / 4)  # image-level differs: the patient score is not pooled


def test_class_absent_from_y_true_gives_nan_auc_and_macro_skips_it():
    y, probs = _single_label_data(3, 4)
    y = np.where(y == 3, 0, y)  # class "d" never true, but still predicted sometimes
    assert (probs.argmax(axis=1) == 3).any()
    with pytest.warns(RuntimeWarning, match="'d'") as record:
        out = single_label_metrics(y, probs, CLASSES_4)
    assert any("ROC AUC" in str(w.message) for w in record)
    assert np.isnan(out["roc_auc/d"]) and np.isnan(out["average_precision/d"])
    assert np.isnan(out["sensitivity/d"])
    want_auc = np.mean([skm.roc_auc_score(y == c, probs[:, c]) for c in range(3)])
    assert out["roc_auc"] == pytest.approx(want_auc, abs=1e-12)
    assert out["precision/d"] == 0.0  # predicted but never true: defined, and zero
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that y_pred holds a class absent from y_true
        _check_against_sklearn(y, probs, CLASSES_4, out)


def test_never_predicted_class_gives_nan_precision():
    y, probs = _single_label_data(4, 4)
    probs[:, 2] = 0.0  # class "c" is never the argmax
    with pytest.warns(RuntimeWarning, match="precision is undefined for class 'c'"):
        out = single_label_metrics(y, probs, CLASSES_4)
    assert np.isnan(out["precision/c"])
    assert out["f1/c"] == 0.0  # sklearn >= 1.3: F1 = 2TP / (2TP + FP + FN) = 0 here
    _check_against_sklearn(y, probs, CLASSES_4, out)


def test_all_nan_macro_is_silent_nan():
    # One class only in y_true: every AUC is undefined; the macro must be NaN without numpy's warning.
    y = np.zeros(6, dtype=int)
    probs = _softmax(np.random.default_rng(0).normal(size=(6, 2)))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = single_label_metrics(y, probs, CLASSES_2)
    assert np.isnan(out["roc_auc"]) and np.isnan(out["average_precision"])
    assert not any("empty slice" in str(w.message) for w in record)
    assert all(issubclass(w.category, RuntimeWarning) for w in record)


def test_single_label_input_errors():
    y, probs = _single_label_data(0, 4, n=20)
    with pytest.raises(SemimedError, match="class names"):
        single_label_metrics(y, probs, CLASSES_2)
    with pytest.raises(SemimedError, match="unique"):
        single_label_metrics(y, probs, ["a", "a", "b", "c"])
    with pytest.raises(SemimedError, match="y_true"):
        single_label_metrics(y[:-1], probs, CLASSES_4)
    with pytest.raises(SemimedError, match="patient_ids"):
        single_label_metrics(y, probs, CLASSES_4, patient_ids=np.arange(3))


# ----------------------------------------------------------------------------------------------------------
# multi-label


def _multilabel_data(seed: int, n: int = 250, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < 0.3).astype(np.float64)
    y[:2] = [[0.0] * k, [1.0] * k]  # both classes in every column
    scores = 1 / (1 + np.exp(-(rng.normal(size=(n, k)) + 1.5 * y - 0.5)))
    scores = np.round(scores, 2)  # ties
    unknown = rng.random((n, k)) < 0.2
    unknown[:2] = False
    y[unknown] = np.nan
    return y, scores


@pytest.mark.parametrize("seed", [0, 1])
def test_multilabel_masked_matches_sklearn_per_column(seed, no_runtime_warnings):
    y, scores = _multilabel_data(seed)
    thresholds = np.array([0.3, 0.5, 0.6, 0.45])
    out = multilabel_metrics(y, scores, CLASSES_4, thresholds=thresholds)
    aucs, aps, sens, spec = [], [], [], []
    for j, name in enumerate(CLASSES_4):
        m = ~np.isnan(y[:, j])
        yj, sj = y[m, j].astype(int), scores[m, j]
        pj = (sj >= thresholds[j]).astype(int)
        aucs.append(skm.roc_auc_score(yj, sj))
        aps.append(skm.average_precision_score(yj, sj))
        sens.append(skm.recall_score(yj, pj, pos_label=1))
        spec.append(skm.recall_score(yj, pj, pos_label=0))
        assert out[f"roc_auc/{name}"] == pytest.approx(aucs[-1], abs=1e-12)
        assert out[f"average_precision/{name}"] == pytest.approx(aps[-1], abs=1e-12)
        assert out[f"sensitivity/{name}"] == pytest.approx(sens[-1])
        assert out[f"specificity/{name}"] == pytest.approx(spec[-1])
    assert out["roc_auc_macro"] == out["roc_auc"] == pytest.approx(np.mean(aucs))
    assert out["average_precision_macro"] == out["average_precision"] == pytest.approx(np.mean(aps))
    assert out["sensitivity_macro"] == pytest.approx(np.mean(sens))
    assert out["specificity_macro"] == pytest.approx(np.mean(spec))
    known = ~np.isnan(y)
    pred = scores >= thresholds
    assert out["hamming_accuracy"] == pytest.approx(np.mean(pred[known] == (y[known] == 1)))
    # Without unknowns, subset accuracy is sklearn's accuracy_score on indicator matrices.
    full = multilabel_metrics(np.nan_to_num(y), scores, CLASSES_4, thresholds=thresholds)
    assert full["subset_accuracy"] == pytest.approx(skm.accuracy_score(np.nan_to_num(y), pred.astype(float)))


def test_multilabel_default_threshold_is_half():
    y = np.array([[1.0], [0.0], [1.0], [0.0]])
    scores = np.array([[0.5], [0.49], [0.2], [0.7]])
    out = multilabel_metrics(y, scores, ["x"])
    assert out["sensitivity/x"] == 0.5  # 0.5 >= 0.5 counts as positive
    assert out["specificity/x"] == 0.5


def test_subset_and_hamming_accuracy_hand_example():
    y = np.array(
        [
            [1.0, 0.0, np.nan],  # known labels both right -> counts as right despite the unknown
            [0.0, 1.0, 1.0],  # one wrong
            [np.nan, np.nan, np.nan],  # nothing known: excluded from both
            [0.0, 0.0, 0.0],  # all right
        ]
    )
    scores = np.array(
        [
            [0.9, 0.1, 0.9],
            [0.1, 0.2, 0.8],
            [0.9, 0.9, 0.9],
            [0.1, 0.1, 0.1],
        ]
    )
    out = multilabel_metrics(y, scores, ["p", "q", "r"])
    assert out["subset_accuracy"] == pytest.approx(2 / 3)
    assert out["hamming_accuracy"] == pytest.approx(7 / 8)


def test_multilabel_single_class_column_is_nan_and_skipped():
    y, scores = _multilabel_data(5)
    y[:, 2] = np.where(np.isnan(y[:, 2]), np.nan, 0.0)  # finding "c" has no known positive
    with pytest.warns(RuntimeWarning, match="'c'"):
        out = multilabel_metrics(y, scores, CLASSES_4)
    assert (
        np.isnan(out["roc_auc/c"]) and np.isnan(out["average_precision/c"]) and np.isnan(out["sensitivity/c"])
    )
    want = np.mean([out[f"roc_auc/{f}"] for f in ("a", "b", "d")])
    assert out["roc_auc_macro"] == pytest.approx(want)
    assert not np.isnan(out["specificity/c"])


def test_multilabel_rejects_non_binary_labels():
    with pytest.raises(SemimedError, match="0 or 1"):
        multilabel_metrics(np.array([[2.0], [0.0]]), np.array([[0.1], [0.2]]), ["x"])


# ----------------------------------------------------------------------------------------------------------
# thresholds


def test_youden_threshold_hand_example():
    # Negatives 0.1, 0.3, 0.6; positives 0.4, 0.7, 0.8, 0.9.
    # t=0.7: sens 3/4, spec 3/3 -> J = 0.75;  t=0.4: sens 4/4, spec 2/3 -> J = 0.667;  t=0.8: J = 0.5.
    y = np.array([0, 0, 0, 1, 1, 1, 1], dtype=float)[:, None]
    scores = np.array([0.1, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])[:, None]
    assert choose_thresholds(y, scores)[0] == pytest.approx(0.7)
    # F1: t=0.4 -> 2*4 / (2*4 + 1 + 0) = 0.889;  t=0.7 -> 6 / (6 + 0 + 1) = 0.857.
    assert choose_thresholds(y, scores, rule="f1")[0] == pytest.approx(0.4)


@pytest.mark.parametrize("rule", ["youden", "f1"])
def test_thresholds_match_brute_force(rule):
    y, scores = _multilabel_data(7, n=120)
    got = choose_thresholds(y, scores, rule=rule)
    for j in range(y.shape[1]):
        m = ~np.isnan(y[:, j])
        yj, sj = y[m, j].astype(int), scores[m, j]
        best, best_t = -np.inf, None
        for t in np.unique(sj)[::-1]:  # highest first: ties keep the highest threshold
            pred = (sj >= t).astype(int)
            if rule == "youden":
                val = skm.recall_score(yj, pred) + skm.recall_score(yj, pred, pos_label=0) - 1
            else:
                val = skm.f1_score(yj, pred)
            if val > best + 1e-12:
                best, best_t = val, t
        assert got[j] == pytest.approx(best_t), j


def test_thresholds_single_class_column_and_unknown_rule():
    y = np.array([[1.0, 0.0], [0.0, 0.0], [np.nan, 0.0]])
    scores = np.array([[0.9, 0.2], [0.1, 0.3], [0.5, 0.4]])
    with pytest.warns(RuntimeWarning, match="'q'"):
        t = choose_thresholds(y, scores, classes=["p", "q"])
    assert t.shape == (2,) and t[0] == pytest.approx(0.9) and t[1] == 0.5
    with pytest.raises(ValueError, match="youden, f1"):
        choose_thresholds(y, scores, rule="max_acc")


# ----------------------------------------------------------------------------------------------------------
# dispatch


def test_evaluate_scores_dispatches():
    y, probs = _single_label_data(0, 4, n=60)
    pids = np.arange(60) % 7
    assert evaluate_scores(y, probs, CLASSES_4, multilabel=False, patient_ids=pids) == single_label_metrics(
        y, probs, CLASSES_4, patient_ids=pids
    )
    ym, scores = _multilabel_data(0, n=60)
    t = np.full(4, 0.4)
    assert evaluate_scores(ym, scores, CLASSES_4, multilabel=True, thresholds=t) == multilabel_metrics(
        ym, scores, CLASSES_4, thresholds=t
    )


# ------------------------------------------------------------------------------------------- the registry


def _perfect(task: str) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray | None]:
    """(y_true, scores, classes, patients) of a classifier that is right on every image, with margins."""
    rng = np.random.default_rng(0)
    if task == "multilabel":
        y = rng.integers(0, 2, (30, 3)).astype(float)
        y[0, :] = [1, 0, 1]
        y[1, :] = [0, 1, 0]  # every finding has both values
        y[2, 1] = np.nan  # unknown labels are masked, not errors
        scores = np.where(np.nan_to_num(y) > 0.5, 0.9, 0.1)
        return y, scores, ["a", "b", "c"], None
    k = 2 if task == "binary" else 4
    y = np.arange(30) % k
    scores = np.full((30, k), 0.1 / (k - 1))
    scores[np.arange(30), y] = 0.9
    return y, scores, [f"c{i}" for i in range(k)], np.arange(30) // 3


@pytest.mark.parametrize("name", METRICS.names())
def test_every_registered_metric_is_one_for_a_perfect_classifier(name: str) -> None:
    """All registered metrics are 'higher is better' in [0, 1]: a classifier right on every image scores 1,
    per class too; each declares the tasks it applies to and its average."""
    metric = METRICS.get(name)
    assert metric.tasks and set(metric.tasks) <= set(TASKS) and metric.average
    for task in metric.tasks:
        y, scores, classes, patients = _perfect(task)
        values = evaluate_scores(y, scores, classes, task == "multilabel", patients)
        keys = [name.replace("{class}", c) for c in classes] if metric.per_class else [name]
        for key in keys:
            assert values[key] == pytest.approx(1.0), (task, key)


def test_evaluate_scores_gives_exactly_the_registered_metrics_of_the_task() -> None:
    for task in TASKS:
        y, scores, classes, patients = _perfect(task)
        values = evaluate_scores(y, scores, classes, task == "multilabel", patients)
        expected = set()
        for metric in metrics_for(task, has_patients=patients is not None):
            expected |= (
                {metric.name.replace("{class}", c) for c in classes} if metric.per_class else {metric.name}
            )
        assert set(values) == expected, task
    assert "patient_accuracy" in metric_names("binary") and "patient_accuracy" not in metric_names(
        "multilabel"
    )
    assert "sensitivity" in metric_names("binary") and "sensitivity" not in metric_names("multiclass")
