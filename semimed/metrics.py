"""Evaluation metrics as pure numpy functions.

Everything here takes numpy arrays and returns plain floats (or a flat ``dict[str, float]``) so the
training engine, Ray Tune reporting and the offline report all read the same numbers. There is no torch
and no scikit-learn here: the values are checked against scikit-learn in ``tests/test_metrics.py``.

Undefined values (an AUC for a class that has only one value in ``y_true``, a precision for a class that
is never predicted, ...) are NaN, each with a ``RuntimeWarning`` naming the class. Macro averages skip
NaN entries (``np.nanmean`` semantics) and are NaN, silently, when every entry is NaN.

Conventions:
    N = number of samples, K = number of classes (single-label) or findings (multi-label).
    A multi-label prediction is positive when ``score >= threshold``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from semimed.errors import SemimedError

__all__ = [
    "THRESHOLD_RULES",
    "average_precision",
    "choose_thresholds",
    "confusion_matrix",
    "evaluate_scores",
    "multilabel_metrics",
    "roc_auc",
    "single_label_metrics",
]

THRESHOLD_RULES = ("youden", "f1")
# Summary metrics (higher is better) that `train.select_metric` may name; which apply depends on the task.
SELECTABLE_METRICS = (
    "accuracy",
    "average_precision",
    "balanced_accuracy",
    "f1_macro",
    "hamming_accuracy",
    "patient_accuracy",
    "roc_auc",
    "sensitivity_macro",
    "specificity_macro",
    "subset_accuracy",
)
_MULTI_LABEL_ONLY = {"subset_accuracy", "hamming_accuracy"}


def available_metrics(multilabel: bool, has_patients: bool) -> set[str]:
    """The selectable summary metrics `evaluate_scores` gives for this kind of task."""
    if multilabel:
        return {"roc_auc", "average_precision", "sensitivity_macro", "specificity_macro"} | _MULTI_LABEL_ONLY
    names = set(SELECTABLE_METRICS) - _MULTI_LABEL_ONLY
    return names if has_patients else names - {"patient_accuracy"}


# ----------------------------------------------------------------------------------------------------------
# helpers


def _warn(message: str) -> None:
    # stacklevel=3 skips _warn and its caller, so a direct roc_auc(...) call points at the user's line.
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _label(name: str | None) -> str:
    return f" for class {name!r}" if name is not None else ""


def _nanmean(values: Sequence[float] | np.ndarray) -> float:
    """Mean over the finite entries; NaN (without numpy's 'Mean of empty slice' warning) if there are none."""
    arr = np.asarray(values, dtype=np.float64)
    keep = ~np.isnan(arr)
    if not keep.any():
        return float("nan")
    return float(arr[keep].mean())


def _ratio(num: float, den: float, what: str, name: str | None) -> float:
    """num / den, or NaN with a warning when the denominator is zero (sklearn's zero_division=np.nan)."""
    if den == 0:
        _warn(f"{what} is undefined{_label(name)}: zero denominator; returning NaN")
        return float("nan")
    return float(num) / float(den)


def _as_1d_scores(score: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(score, dtype=np.float64)
    if arr.ndim != 1:
        raise SemimedError(f"{what}: expected a 1-D array of scores, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        # A diverged model gives NaN scores; ranking them silently would produce a meaningless AUC.
        raise SemimedError(f"{what}: scores contain NaN or inf")
    return arr


def _as_binary(y: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise SemimedError(f"{what}: expected a 1-D array of 0/1 labels, got shape {arr.shape}")
    if arr.size and not np.isin(arr, (0, 1)).all():
        bad = np.unique(arr[~np.isin(arr, (0, 1))])[:5]
        raise SemimedError(f"{what}: labels must be 0 or 1, found {bad.tolist()}")
    return arr.astype(bool)


def _check_pair(y: np.ndarray, s: np.ndarray, what: str) -> None:
    if y.shape[0] != s.shape[0]:
        raise SemimedError(f"{what}: y_true has {y.shape[0]} samples but scores have {s.shape[0]}")


def _check_classes(classes: Sequence[str], k: int, what: str) -> list[str]:
    names = [str(c) for c in classes]
    if len(names) != k:
        raise SemimedError(f"{what}: {len(names)} class names given but scores have {k} columns")
    if len(set(names)) != len(names):
        # Duplicate names would silently overwrite each other's keys in the flat result dict.
        raise SemimedError(f"{what}: class names must be unique, got {names}")
    return names


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x [N], tied values sharing the mean of their ranks (scipy's rankdata 'average')."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # Start index of each run of equal values in the sorted array.
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]  # exclusive
    run_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def _threshold_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative true/false positives when predicting ``s >= t`` for each distinct t, highest t first.

    Args:
        y: bool [N] true labels.
        s: float [N] scores.

    Returns:
        thresholds [T] (distinct scores, descending), tps [T], fps [T] (int64 counts).
    """
    order = np.argsort(-s, kind="mergesort")
    ys = y[order]
    ss = s[order]
    # Last index of each run of equal scores: the threshold includes the whole tie group at once.
    last = np.r_[np.flatnonzero(ss[1:] != ss[:-1]), ss.size - 1]
    tps = np.cumsum(ys, dtype=np.int64)[last]
    fps = (last + 1) - tps
    return ss[last], tps, fps


# ----------------------------------------------------------------------------------------------------------
# building blocks


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion matrix of integer labels.

    Args:
        y_true: int [N] true class indices in [0, num_classes).
        y_pred: int [N] predicted class indices in [0, num_classes).
        num_classes: K.

    Returns:
        int64 [K, K]; entry [i, j] counts samples of true class i predicted as class j.
    """
    yt = np.asarray(y_true)
    yp = np.asarray(y_pred)
    if yt.ndim != 1 or yp.ndim != 1 or yt.shape != yp.shape:
        raise SemimedError(
            f"confusion_matrix: y_true {yt.shape} and y_pred {yp.shape} must be equal 1-D shapes"
        )
    if num_classes < 1:
        raise SemimedError(f"confusion_matrix: num_classes must be >= 1, got {num_classes}")
    for name, arr in (("y_true", yt), ("y_pred", yp)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes or not np.all(arr == np.round(arr))):
            raise SemimedError(f"confusion_matrix: {name} must hold integers in [0, {num_classes})")
    yt = yt.astype(np.int64)
    yp = yp.astype(np.int64)
    # bincount over the flattened (true, pred) pair index is a single O(N) pass.
    flat = np.bincount(yt * num_classes + yp, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def roc_auc(y_true_binary: np.ndarray, score: np.ndarray, *, name: str | None = None) -> float:
    """Area under the ROC curve of one binary problem, via the Mann-Whitney U statistic.

    AUC = P(score of a random positive > score of a random negative) + 0.5 * P(tie), which equals the
    trapezoidal area under the ROC curve (sklearn's ``roc_auc_score``) including tied scores.

    Args:
        y_true_binary: [N] labels in {0, 1} (bool, int or float).
        score: float [N], higher means more likely positive.
        name: class name used in the warning message only.

    Returns:
        The AUC in [0, 1], or NaN with a RuntimeWarning when y_true has only one class.
    """
    y = _as_binary(y_true_binary, "roc_auc")
    s = _as_1d_scores(score, "roc_auc")
    _check_pair(y, s, "roc_auc")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        _warn(f"ROC AUC is undefined{_label(name)}: y_true has only one class ({n_pos} pos, {n_neg} neg)")
        return float("nan")
    ranks = _average_ranks(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def average_precision(y_true_binary: np.ndarray, score: np.ndarray, *, name: str | None = None) -> float:
    """Average precision as sklearn defines it: sum_n (R_n - R_{n-1}) * P_n over distinct thresholds.

    Step-wise (no interpolation); tied scores enter as one threshold.

    Args:
        y_true_binary: [N] labels in {0, 1} (bool, int or float).
        score: float [N], higher means more likely positive.
        name: class name used in the warning message only.

    Returns:
        AP in [0, 1], or NaN with a RuntimeWarning when y_true has only one class (with no positives the
        recall is undefined; with no negatives AP is trivially 1, which says nothing, so it is NaN too).
    """
    y = _as_binary(y_true_binary, "average_precision")
    s = _as_1d_scores(score, "average_precision")
    _check_pair(y, s, "average_precision")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        _warn(
            f"average precision is undefined{_label(name)}: y_true has only one class "
            f"({n_pos} pos, {n_neg} neg)"
        )
        return float("nan")
    _, tps, fps = _threshold_counts(y, s)
    precision = tps / (tps + fps)  # tps + fps >= 1 at every threshold
    recall = tps / n_pos
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


# ----------------------------------------------------------------------------------------------------------
# single-label


def single_label_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    patient_ids: np.ndarray | None = None,
) -> dict[str, float]:
    """Metrics of a single-label (multi-class or binary) classifier; the prediction is argmax(probs).

    Args:
        y_true: int [N] class indices in [0, K).
        probs: float [N, K] class probabilities (rows sum to 1).
        classes: K class names, used in the keys; for K == 2 index 1 is the positive (disease) class.
        patient_ids: optional [N] patient identifier per image (any hashable dtype) for ``patient_accuracy``.

    Returns:
        A flat dict: ``accuracy``, ``balanced_accuracy``; per class c ``precision/c``, ``sensitivity/c``,
        ``specificity/c``, ``f1/c``, ``roc_auc/c``, ``average_precision/c``; macro ``precision_macro``,
        ``sensitivity_macro``, ``specificity_macro``, ``f1_macro``, ``average_precision``, ``roc_auc``
        (K == 2: AUC of class 1; K > 2: macro one-vs-rest AUC); for K == 2 also ``sensitivity``,
        ``specificity``, ``precision``, ``f1`` of class 1; ``patient_accuracy`` if patient_ids is given.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise SemimedError(f"single_label_metrics: probs must be [N, K], got shape {p.shape}")
    n, k = p.shape
    names = _check_classes(classes, k, "single_label_metrics")
    if k < 2:
        raise SemimedError(f"single_label_metrics: need at least 2 classes, got {k}")
    if n == 0:
        raise SemimedError("single_label_metrics: no samples")
    if not np.isfinite(p).all():
        raise SemimedError("single_label_metrics: probs contain NaN or inf")
    yt = np.asarray(y_true)
    if yt.shape != (n,):
        raise SemimedError(f"single_label_metrics: y_true must have shape ({n},), got {yt.shape}")
    y_pred = p.argmax(axis=1)
    cm = confusion_matrix(yt, y_pred, k)  # also validates the range of y_true
    yt = yt.astype(np.int64)

    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)  # true count per class
    predicted = cm.sum(axis=0)
    fp = predicted - tp
    fn = support - tp
    tn = n - tp - fp - fn

    out: dict[str, float] = {"accuracy": float(tp.sum() / n)}
    per: dict[str, list[float]] = {m: [] for m in ("precision", "sensitivity", "specificity", "f1")}
    per.update(roc_auc=[], average_precision=[])
    for c, name in enumerate(names):
        per["precision"].append(_ratio(tp[c], tp[c] + fp[c], "precision", name))
        per["sensitivity"].append(_ratio(tp[c], tp[c] + fn[c], "sensitivity (recall)", name))
        per["specificity"].append(_ratio(tn[c], tn[c] + fp[c], "specificity", name))
        # sklearn >= 1.3 defines F1 as 2TP / (2TP + FP + FN): it is 0 (not NaN) when precision alone is
        # undefined, and NaN only when the class is neither present nor predicted.
        per["f1"].append(_ratio(2 * tp[c], 2 * tp[c] + fp[c] + fn[c], "F1", name))
        is_c = yt == c
        per["roc_auc"].append(roc_auc(is_c, p[:, c], name=name))
        per["average_precision"].append(average_precision(is_c, p[:, c], name=name))
    for metric, values in per.items():
        for name, v in zip(names, values, strict=True):
            out[f"{metric}/{name}"] = v

    # Balanced accuracy = mean recall over the classes present in y_true (sklearn, adjusted=False).
    out["balanced_accuracy"] = _nanmean(per["sensitivity"])
    for metric in ("precision", "sensitivity", "specificity", "f1"):
        out[f"{metric}_macro"] = _nanmean(per[metric])
    out["average_precision"] = _nanmean(per["average_precision"])
    out["roc_auc"] = per["roc_auc"][1] if k == 2 else _nanmean(per["roc_auc"])
    if k == 2:
        # Binary tasks report the disease class (index 1) as "the" positive; specificity of class 1 equals
        # the recall of class 0.
        out["sensitivity"] = per["sensitivity"][1]
        out["specificity"] = per["specificity"][1]
        out["precision"] = per["precision"][1]
        out["f1"] = per["f1"][1]

    if patient_ids is not None:
        out["patient_accuracy"] = _patient_accuracy(yt == y_pred, patient_ids)
    return out


def _patient_accuracy(correct: np.ndarray, patient_ids: np.ndarray) -> float:
    """Spanhol et al. (2016) patient score: mean over patients of that patient's image accuracy.

    Args:
        correct: bool [N], image i classified correctly.
        patient_ids: [N] patient identifier per image.
    """
    pid = np.asarray(patient_ids)
    if pid.shape != correct.shape:
        raise SemimedError(f"patient_ids must have shape {correct.shape}, got {pid.shape}")
    _, inverse = np.unique(pid, return_inverse=True)
    inverse = inverse.reshape(-1)  # numpy 2.0/2.1 returned inverse in the input's shape
    right = np.bincount(inverse, weights=correct.astype(np.float64))
    total = np.bincount(inverse)
    return float(np.mean(right / total))


# ----------------------------------------------------------------------------------------------------------
# multi-label


def _as_multilabel(y_true: np.ndarray, scores: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise SemimedError(f"{what}: scores must be [N, K], got shape {s.shape}")
    if y.shape != s.shape:
        raise SemimedError(f"{what}: y_true shape {y.shape} differs from scores shape {s.shape}")
    if not np.isfinite(s).all():
        raise SemimedError(f"{what}: scores contain NaN or inf")
    known = ~np.isnan(y)
    if not np.isin(y[known], (0.0, 1.0)).all():
        bad = np.unique(y[known][~np.isin(y[known], (0.0, 1.0))])[:5]
        raise SemimedError(f"{what}: known labels must be 0 or 1 (NaN = unknown), found {bad.tolist()}")
    return y, s


def _as_thresholds(thresholds: np.ndarray | float | None, k: int, what: str) -> np.ndarray:
    if thresholds is None:
        return np.full(k, 0.5)
    t = np.asarray(thresholds, dtype=np.float64)
    if t.ndim == 0:
        t = np.full(k, float(t))
    if t.shape != (k,):
        raise SemimedError(f"{what}: thresholds must have shape ({k},), got {t.shape}")
    return t


def choose_thresholds(
    y_true: np.ndarray,
    scores: np.ndarray,
    rule: str = "youden",
    *,
    classes: list[str] | None = None,
) -> np.ndarray:
    """Per-finding decision thresholds chosen on (validation) data.

    Candidates are the distinct scores of the finding's known entries; a sample is positive when
    ``score >= threshold``. Among equally good candidates the highest threshold wins (fewest positives).

    Args:
        y_true: float [N, K] labels in {0, 1}, NaN = unknown (ignored for that finding).
        scores: float [N, K] sigmoid probabilities.
        rule: "youden" maximises sensitivity + specificity - 1; "f1" maximises F1 of the positive class.
        classes: optional K finding names, used in warning messages only.

    Returns:
        float64 [K] thresholds; 0.5 with a RuntimeWarning for a finding whose known labels have one class.
    """
    if rule not in THRESHOLD_RULES:
        raise SemimedError(
            f"choose_thresholds: unknown rule {rule!r}; valid rules: {', '.join(THRESHOLD_RULES)}"
        )
    y, s = _as_multilabel(y_true, scores, "choose_thresholds")
    k = s.shape[1]
    names = (
        _check_classes(classes, k, "choose_thresholds") if classes is not None else [str(j) for j in range(k)]
    )
    out = np.full(k, 0.5)
    for j in range(k):
        known = ~np.isnan(y[:, j])
        yj = y[known, j].astype(bool)
        n_pos = int(yj.sum())
        n_neg = yj.size - n_pos
        if n_pos == 0 or n_neg == 0:
            _warn(
                f"cannot choose a threshold for finding {names[j]!r}: known labels have one class "
                f"({n_pos} pos, {n_neg} neg); using 0.5"
            )
            continue
        cand, tps, fps = _threshold_counts(yj, s[known, j])
        if rule == "youden":
            objective = tps / n_pos - fps / n_neg
        else:
            objective = 2 * tps / (2 * tps + fps + (n_pos - tps))  # denominator >= n_pos > 0
        # argmax returns the first maximum, i.e. the highest threshold since candidates are descending.
        out[j] = cand[int(np.argmax(objective))]
    return out


def multilabel_metrics(
    y_true: np.ndarray,
    scores: np.ndarray,
    classes: list[str],
    thresholds: np.ndarray | None = None,
) -> dict[str, float]:
    """Metrics of a multi-label classifier; unknown labels (NaN) are masked out per finding.

    Args:
        y_true: float [N, K] labels in {0, 1}, NaN = unknown.
        scores: float [N, K] sigmoid probabilities.
        classes: K finding names, used in the keys.
        thresholds: float [K] decision thresholds (``score >= t`` is positive); default 0.5 each.

    Returns:
        A flat dict: per finding f ``roc_auc/f``, ``average_precision/f``, ``sensitivity/f``,
        ``specificity/f``; ``roc_auc_macro``, ``average_precision_macro`` (means over findings where they
        are defined) and their aliases ``roc_auc``, ``average_precision``; ``sensitivity_macro``,
        ``specificity_macro``; ``subset_accuracy`` (rows with at least one known label whose known labels
        are all right) and ``hamming_accuracy`` (fraction of known entries predicted right).
    """
    y, s = _as_multilabel(y_true, scores, "multilabel_metrics")
    n, k = s.shape
    names = _check_classes(classes, k, "multilabel_metrics")
    t = _as_thresholds(thresholds, k, "multilabel_metrics")
    known = ~np.isnan(y)
    pred = s >= t[None, :]
    truth = y == 1.0  # NaN compares False; masked by `known` wherever it matters

    out: dict[str, float] = {}
    per: dict[str, list[float]] = {
        m: [] for m in ("roc_auc", "average_precision", "sensitivity", "specificity")
    }
    for j, name in enumerate(names):
        m = known[:, j]
        yj, sj, pj = truth[m, j], s[m, j], pred[m, j]
        per["roc_auc"].append(roc_auc(yj, sj, name=name))
        per["average_precision"].append(average_precision(yj, sj, name=name))
        n_pos = int(yj.sum())
        n_neg = yj.size - n_pos
        per["sensitivity"].append(_ratio(int((pj & yj).sum()), n_pos, "sensitivity", name))
        per["specificity"].append(_ratio(int((~pj & ~yj).sum()), n_neg, "specificity", name))
    for metric, values in per.items():
        for name, v in zip(names, values, strict=True):
            out[f"{metric}/{name}"] = v

    out["roc_auc_macro"] = _nanmean(per["roc_auc"])
    out["average_precision_macro"] = _nanmean(per["average_precision"])
    # The report reads `roc_auc` / `average_precision` for every task type.
    out["roc_auc"] = out["roc_auc_macro"]
    out["average_precision"] = out["average_precision_macro"]
    out["sensitivity_macro"] = _nanmean(per["sensitivity"])
    out["specificity_macro"] = _nanmean(per["specificity"])

    right = (pred == truth) | ~known
    rows = known.any(axis=1)  # a row with no known label says nothing about the classifier
    out["subset_accuracy"] = _ratio(
        int(right[rows].all(axis=1).sum()), int(rows.sum()), "subset accuracy", None
    )
    out["hamming_accuracy"] = _ratio(int((right & known).sum()), int(known.sum()), "hamming accuracy", None)
    return out


# ----------------------------------------------------------------------------------------------------------
# dispatch


def evaluate_scores(
    y_true: np.ndarray,
    scores: np.ndarray,
    classes: list[str],
    multilabel: bool,
    patient_ids: np.ndarray | None = None,
    thresholds: np.ndarray | None = None,
) -> dict[str, float]:
    """Metrics for either task type.

    Args:
        y_true: int [N] (single-label) or float [N, K] with NaN = unknown (multi-label).
        scores: float [N, K]: softmax probabilities (single-label) or sigmoid probabilities (multi-label).
        classes: K class / finding names.
        multilabel: selects :func:`multilabel_metrics` (True) or :func:`single_label_metrics` (False).
        patient_ids: optional [N] patient ids; single-label only (adds ``patient_accuracy``), else ignored.
        thresholds: optional [K] thresholds; multi-label only, else ignored (single-label uses argmax).

    Returns:
        The flat metric dict of the selected function.
    """
    # Callers may pass both optional arguments for any task; each applies to one task type only, so the
    # other is ignored rather than rejected.
    if multilabel:
        return multilabel_metrics(y_true, scores, classes, thresholds=thresholds)
    return single_label_metrics(y_true, scores, classes, patient_ids=patient_ids)
