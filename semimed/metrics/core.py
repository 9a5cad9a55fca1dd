"""Metric building blocks as pure numpy functions: ROC-AUC, average precision, confusion matrix, threshold
choice, and the helpers the registered metrics share (semimed/metrics/registry.py).

There is no torch and no scikit-learn here: the values are checked against scikit-learn in
``tests/test_metrics.py``. Undefined values (an AUC for a class that has only one value in ``y_true``, a
precision for a class that is never predicted, ...) are NaN, each with a ``RuntimeWarning`` naming the class.
Macro averages skip NaN entries (``np.nanmean`` semantics) and are NaN, silently, when every entry is NaN.

Conventions: N = number of samples, K = number of classes (single-label) or findings (multi-label). A
multi-label prediction is positive when ``score >= threshold``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from semimed.errors import SemimedError, SemimedWarning

THRESHOLD_RULES = ("youden", "f1")


# ----------------------------------------------------------------------------------------------------------
# helpers


def _warn(message: str) -> None:
    # stacklevel=3 skips _warn and its caller, so a direct roc_auc(...) call points at the user's line.
    warnings.warn(message, SemimedWarning, stacklevel=3)


def _label(name: str | None) -> str:
    return f" for class {name!r}" if name is not None else ""


def nanmean(values: Sequence[float] | np.ndarray) -> float:
    """Mean over the finite entries; NaN (without numpy's 'Mean of empty slice' warning) if there are none."""
    arr = np.asarray(values, dtype=np.float64)
    keep = ~np.isnan(arr)
    if not keep.any():
        return float("nan")
    return float(arr[keep].mean())


def safe_ratio(num: float, den: float, what: str, name: str | None) -> float:
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


def check_classes(classes: Sequence[str], k: int, what: str) -> list[str]:
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
# patients and multi-label inputs


def patient_accuracy(correct: np.ndarray, patient_ids: np.ndarray) -> float:
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


def as_multilabel(y_true: np.ndarray, scores: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
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


def as_thresholds(thresholds: np.ndarray | float | None, k: int, what: str) -> np.ndarray:
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
    y, s = as_multilabel(y_true, scores, "choose_thresholds")
    k = s.shape[1]
    names = (
        check_classes(classes, k, "choose_thresholds") if classes is not None else [str(j) for j in range(k)]
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
