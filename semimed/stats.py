"""Bootstrap intervals for `semimed report`: over seeds and, within a seed, over the test set's patients.

One replicate of a cell draws its seeds with replacement and, for each drawn seed, the test set's patients with
replacement (a cluster bootstrap: the images of one patient are correlated, so patients, not images, are the
independent units), recomputes the metric on that resample and averages over the drawn seeds; the 95% interval is
the 2.5th-97.5th percentile of B such replicates. Every replicate is a value the metric can take, so the interval
stays inside the metric's range (a Student-t interval over 2 seeds does not: [-1.19, 2.48] for an accuracy).

A patient resample is a vector of counts (how often each patient was drawn), and an image's weight is its
patient's count, so every metric here is a *weighted* metric, computed for a block of replicates at once: the
counting metrics are matrix products, and ROC-AUC / average precision sort the scores once and then need only
cumulative sums of the weights per distinct score (`_Ranked`). With integer weights each equals the metric of the
data set with every row repeated that many times (tests/test_report.py checks this against scikit-learn).

Paired comparisons reuse the same patient counts for both trials of a seed (`patient_counts` depends only on the
key and the number of patients), so arm and control are resampled identically.

Seeds that share one test set (an official split: MedMNIST, ChestX-ray14's official lists) share its sampling
error too: a hard patient is hard for every seed. A replicate then draws ONE patient resample and applies it to
every seed it draws (`seed_bootstrap(..., shared_test_set=True)`); the key is the test set's identity
(`test_set_key`), not the seed. Independent resamples per seed would average that error away over n seeds and
shrink the interval by up to sqrt(n). Seeds with their own test sets (BreakHis, whose patient split follows the
seed) are resampled independently, as before.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from semimed.errors import SemimedError

# Metrics recomputed from per-image predictions (definitions as in semimed.metrics); others are resampled over
# seeds only.
BOOTSTRAP_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "average_precision", "patient_accuracy")
N_BOOT = 1000
# Replicates per block: the dense [groups, block] intermediates stay under 2**18 floats (2 MiB, cache-sized;
# measured fastest on a ChestX-ray14-size test set).
_BLOCK_ELEMENTS = 1 << 18


@dataclass
class Predictions:
    """One trial's test predictions, in dataset-row order.

    rows: int [N] dataset row ids; patient: int [N] index into `patients` (P distinct ids, sorted);
    y: int [N] class index (single-label) or float [N, K] 0/1 with NaN = unknown (multi-label);
    scores: float [N, K] (softmax or sigmoid probabilities); classes: the K names (score column order);
    positive: a binary task's positive class index (the run's `positive_class`, metrics.json), whose AUC and AP
    are the headline ones.
    """

    rows: np.ndarray
    patients: np.ndarray
    patient: np.ndarray
    y: np.ndarray
    scores: np.ndarray
    classes: list[str]
    multilabel: bool
    positive: int = 1
    _ranked: dict[int, _Ranked] = field(default_factory=dict, repr=False)

    @classmethod
    def from_frame(
        cls, frame: pd.DataFrame, split: str = "test", positive_class: str | None = None
    ) -> Predictions:
        """From predictions.parquet's columns: split, row, patient_id, `label` or `label/<finding>`,
        `score/<class>`; `positive_class` names a binary task's positive class (None: class index 1)."""
        frame = frame[frame["split"] == split].sort_values("row", kind="stable")
        if frame.empty:
            raise SemimedError(f"no {split!r} rows")
        score_cols = [c for c in frame.columns if c.startswith("score/")]
        label_cols = [c for c in frame.columns if c.startswith("label/")]
        if not score_cols:
            raise SemimedError("no score/<class> columns")
        multilabel = bool(label_cols)
        classes = [c.split("/", 1)[1] for c in score_cols]
        if multilabel:
            if [c.split("/", 1)[1] for c in label_cols] != classes:
                raise SemimedError("label/<finding> columns do not match the score/<finding> columns")
            y = frame[label_cols].to_numpy(np.float64)
        else:
            if "label" not in frame:
                raise SemimedError("no label column")
            y = frame["label"].to_numpy(np.int64)
            if y.min() < 0 or y.max() >= len(classes):
                raise SemimedError(f"labels outside [0, {len(classes)})")
        patients, patient = np.unique(frame["patient_id"].astype(str).to_numpy(), return_inverse=True)
        scores = frame[score_cols].to_numpy(np.float64)
        if not np.isfinite(scores).all():
            raise SemimedError("scores contain NaN or inf")
        if positive_class is not None and positive_class not in classes:
            raise SemimedError(f"positive class {positive_class!r} is not one of the score columns {classes}")
        positive = 1 if positive_class is None else classes.index(positive_class)
        return cls(
            frame["row"].to_numpy(np.int64),
            patients,
            patient.reshape(-1),
            y,
            scores,
            classes,
            multilabel,
            positive,
        )

    @classmethod
    def read(cls, path: str | Path, positive_class: str | None = None) -> Predictions:
        """The test rows of a predictions.parquet."""
        return cls.from_frame(
            pd.read_parquet(path, filters=[("split", "==", "test")]), "test", positive_class
        )

    @property
    def n_patients(self) -> int:
        return len(self.patients)

    def ranked(self, k: int) -> _Ranked:
        """The binary problem of class / finding k (one-vs-rest), sorted once and cached."""
        if k not in self._ranked:
            if self.multilabel:
                known = ~np.isnan(self.y[:, k])
                positive = self.y[known, k] == 1.0
            else:
                known = np.ones(len(self.y), dtype=bool)
                positive = self.y == k
            self._ranked[k] = _Ranked.build(
                self.scores[known, k], positive, self.patient[known], self.n_patients
            )
        return self._ranked[k]


@dataclass
class _Ranked:
    """One binary problem (a class or finding against the rest), sorted once, as sparse [G, P] image counts.

    The G groups are the distinct scores that some positive image has, ascending. Rows of `pos`: positive
    images with that score, per patient; `neg_tie`: negative images with exactly that score; `neg_upto`:
    negative images scored at most that score and above the previous group (ties included); `neg_all` [P]:
    negative images per patient. Nothing else matters to the AUC or the average precision, and with rare findings
    G is the number of positives, not the number of images.
    """

    pos: sparse.csr_matrix
    neg_tie: sparse.csr_matrix
    neg_upto: sparse.csr_matrix
    neg_all: np.ndarray

    @classmethod
    def build(cls, score: np.ndarray, positive: np.ndarray, patient: np.ndarray, n_patients: int) -> _Ranked:
        levels = np.unique(score[positive])  # ascending distinct scores of positives: the groups
        n_groups = len(levels)
        pos_group = np.searchsorted(levels, score[positive])
        neg_score, neg_patient = score[~positive], patient[~positive]
        # The first group whose score is >= the negative's score; == n_groups above every positive.
        upto = np.searchsorted(levels, neg_score, side="left")
        tie = upto < n_groups
        tie[tie] = levels[upto[tie]] == neg_score[tie]
        below = upto < n_groups

        def counts(group: np.ndarray, who: np.ndarray) -> sparse.csr_matrix:
            ones = np.ones(len(group))
            return sparse.csr_matrix((ones, (group, who)), shape=(n_groups, n_patients))

        return cls(
            counts(pos_group, patient[positive]),
            counts(upto[tie], neg_patient[tie]),
            counts(upto[below], neg_patient[below]),
            np.bincount(neg_patient, minlength=n_patients).astype(np.float64),
        )

    def areas(self, weights_t: np.ndarray, want_auc: bool, want_ap: bool) -> tuple[np.ndarray, np.ndarray]:
        """(ROC-AUC [b], average precision [b]) under patient weights `weights_t` [P, b]; NaN without both
        classes. With Wp_g / Tn_g the positive / tied negative weight at group g and Bn_g the negative weight
        below it: AUC = sum_g Wp_g (Bn_g + Tn_g / 2) / (Wp Wn) (Mann-Whitney, ties count half) and
        AP = sum_g Wp_g * precision_g / Wp, precision_g over the images scored >= s_g."""
        b = weights_t.shape[1]
        wp = self.pos @ weights_t  # [G, b]
        total_p = wp.sum(axis=0)
        total_n = self.neg_all @ weights_t
        defined = (total_p > 0) & (total_n > 0)
        cum_n = np.cumsum(self.neg_upto @ weights_t, axis=0)  # negatives scored <= s_g
        tie = self.neg_tie @ weights_t if self.neg_tie.nnz else None
        auc = ap = np.full(b, np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            if want_auc:
                num = np.einsum("gb,gb->b", wp, cum_n)
                if tie is not None:
                    num -= 0.5 * np.einsum("gb,gb->b", wp, tie)
                auc = np.where(defined, num / (total_p * total_n), np.nan)
            if want_ap:
                fp = np.subtract(total_n, cum_n, out=cum_n)  # negatives scored > s_g ...
                if tie is not None:
                    fp += tie  # ... and == s_g
                tp = np.cumsum(wp, axis=0)
                np.subtract(total_p, tp, out=tp)
                tp += wp  # positives scored >= s_g (> 0 wherever wp > 0)
                fp += tp
                np.maximum(fp, 1e-300, out=fp)
                precision = np.divide(tp, fp, out=tp)
                ap = np.where(defined, np.einsum("gb,gb->b", wp, precision) / total_p, np.nan)
        return auc, ap


def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices are NaN, as in semimed.metrics
        return np.nanmean(values, axis=axis)


def weighted_metrics(pred: Predictions, counts: np.ndarray, metrics: Sequence[str]) -> dict[str, np.ndarray]:
    """Each metric under patient weights `counts` [b, P] (int or float): a [b] array per metric.

    Definitions as in semimed.metrics: single-label `roc_auc` and `average_precision` are the positive class's
    for two classes, else the macro one-vs-rest AUC / AP over classes (findings); multi-label macros skip
    findings without both values; `patient_accuracy` is the (weighted) mean over patients of their image accuracy.
    """
    unknown = set(metrics) - set(BOOTSTRAP_METRICS)
    if unknown:
        raise SemimedError(f"no bootstrap from predictions for {sorted(unknown)}; valid: {BOOTSTRAP_METRICS}")
    w = np.asarray(counts, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] != pred.n_patients:
        raise SemimedError(f"counts must be [b, {pred.n_patients}], got {w.shape}")
    out: dict[str, np.ndarray] = {}
    k = pred.scores.shape[1]
    if not pred.multilabel:
        correct = (pred.scores.argmax(axis=1) == pred.y).astype(np.float64)
        images = np.bincount(pred.patient, minlength=pred.n_patients).astype(np.float64)  # [P]
        right = np.bincount(pred.patient, weights=correct, minlength=pred.n_patients)
        with np.errstate(divide="ignore", invalid="ignore"):
            if "accuracy" in metrics:
                out["accuracy"] = (w @ right) / (w @ images)
            if "balanced_accuracy" in metrics:
                index = pred.patient * k + pred.y  # per (patient, true class): images and right ones
                per_class = np.bincount(index, minlength=pred.n_patients * k).reshape(-1, k)
                right_class = np.bincount(index, weights=correct, minlength=pred.n_patients * k).reshape(
                    -1, k
                )
                support = w @ per_class  # [b, K]
                recall = np.where(support > 0, (w @ right_class) / support, np.nan)
                out["balanced_accuracy"] = _nanmean(recall, axis=1)
            if "patient_accuracy" in metrics:
                out["patient_accuracy"] = (w @ (right / images)) / w.sum(axis=1)
    want_auc, want_ap = "roc_auc" in metrics, "average_precision" in metrics
    if want_auc or want_ap:
        weights_t = np.ascontiguousarray(w.T)
        per = [pred.ranked(j).areas(weights_t, want_auc, want_ap) for j in range(k)]
        aucs, aps = (np.stack([p[i] for p in per], axis=1) for i in (0, 1))  # [b, K] each
        binary = not pred.multilabel and k == 2
        if want_auc:
            out["roc_auc"] = aucs[:, pred.positive] if binary else _nanmean(aucs, axis=1)
        if want_ap:
            out["average_precision"] = aps[:, pred.positive] if binary else _nanmean(aps, axis=1)
    return {m: out[m] for m in metrics}


def patient_counts(n_patients: int, n_boot: int, key: Sequence[int], block: int) -> Iterator[np.ndarray]:
    """`block` rows of [n_boot, P] resample counts at a time (an iterator), drawn from default_rng(key)."""
    rng = np.random.default_rng(list(key))
    for start in range(0, n_boot, block):
        rows = min(block, n_boot - start)
        draws = rng.integers(0, n_patients, size=(rows, n_patients))
        offset = np.arange(rows)[:, None] * n_patients
        yield np.bincount((draws + offset).ravel(), minlength=rows * n_patients).reshape(rows, n_patients)


def replicate_block(n_rows: int, n_patients: int, n_boot: int) -> int:
    """Replicates drawn per block: the dense [rows or patients, block] intermediates stay cache-sized. Whoever
    resamples with `patient_counts` must use it, so that one key gives the same resamples everywhere."""
    return max(1, min(n_boot, _BLOCK_ELEMENTS // max(n_rows, n_patients)))


def metric_replicates(
    pred: Predictions, metrics: Sequence[str], key: Sequence[int], n_boot: int = N_BOOT
) -> dict[str, np.ndarray]:
    """Each metric on `n_boot` patient resamples of the test set: [n_boot] per metric. Deterministic in `key`
    (and in the number of patients and images), so two trials with the same test set and key get the same
    resamples: that is what pairs them."""
    block = replicate_block(len(pred.rows), pred.n_patients, n_boot)
    parts = [weighted_metrics(pred, c, metrics) for c in patient_counts(pred.n_patients, n_boot, key, block)]
    return {m: np.concatenate([p[m] for p in parts]) for m in metrics}


def point_metrics(pred: Predictions, metrics: Sequence[str]) -> dict[str, float]:
    """The metrics on the test set as it is (every patient once)."""
    values = weighted_metrics(pred, np.ones((1, pred.n_patients)), metrics)
    return {m: float(v[0]) for m, v in values.items()}


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    method: str  # "seeds×patients" | "seeds" | "" (no interval)


def seed_bootstrap(
    values: np.ndarray,
    replicates: np.ndarray | None,
    n_boot: int = N_BOOT,
    seed: int = 0,
    shared_test_set: bool = False,
) -> Interval:
    """95% percentile interval of the mean over seeds.

    Args:
        values: float [n] the per-seed metric (used when `replicates` is None).
        replicates: float [n, n_boot] the per-seed metric on patient resamples (`metric_replicates`), or None.
        n_boot: number of replicates B.
        seed: the generator's seed; the same inputs give the same interval.
        shared_test_set: every seed was tested on the same rows, and `replicates` column b is the same patient
            resample for every seed (`test_set_key`): replicate b then uses resample b for all its slots.

    Replicate b draws n seeds with replacement; with separate test sets, slot j of it takes patient resample
    (b + j * B // n) mod B of its seed, so a seed drawn twice in one replicate gets two different resamples.
    """
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0 or (replicates is None and n < 2):
        return Interval(np.nan, np.nan, "")  # one seed and no predictions: no spread to resample
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, n, size=(n_boot, n))
    if replicates is None:
        boot, method = values[pick].mean(axis=1), "seeds"
    else:
        replicates = np.asarray(replicates, dtype=np.float64)
        if replicates.shape != (n, n_boot):
            raise SemimedError(f"replicates must be [{n}, {n_boot}], got {replicates.shape}")
        offset = 0 if shared_test_set else n_boot // n
        column = (np.arange(n_boot)[:, None] + np.arange(n)[None, :] * offset) % n_boot
        boot, method = _nanmean(replicates[pick, column], axis=1), "seeds×patients"
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return Interval(np.nan, np.nan, method)
    low, high = np.percentile(boot, [2.5, 97.5])
    return Interval(float(low), float(high), method)


def verdict(low: float, high: float, n: int) -> str:
    """The paired difference's verdict from its 95% interval (higher is better for every reported metric)."""
    if not (np.isfinite(low) and np.isfinite(high)):
        text = "no interval"
    elif low > 0:
        text = "better"
    elif high < 0:
        text = "worse"
    else:
        text = "no detectable difference"
    return text if n >= 3 else f"{text} (only n={n} seed{'s' if n != 1 else ''})"


@dataclass
class Replicates:
    """A trial's test rows and patients (to check that paired trials share them) and each metric on the
    `n_boot` patient resamples of its key."""

    rows: np.ndarray
    patients: np.ndarray
    values: dict[str, np.ndarray]

    @classmethod
    def of(
        cls, pred: Predictions, metrics: Sequence[str], key: Sequence[int], n_boot: int = N_BOOT
    ) -> Replicates:
        return cls(pred.rows, pred.patients[pred.patient], metric_replicates(pred, metrics, key, n_boot))

    def same_test_set(self, other: Replicates) -> bool:
        return np.array_equal(self.rows, other.rows) and np.array_equal(self.patients, other.patients)


def test_set_key(pred: Predictions) -> int:
    """A number that identifies the test set (its rows and patients): the patient-resample key, so that every
    trial on the same test set, whatever its seed, draws the same resamples."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(pred.rows, dtype=np.int64).tobytes())
    digest.update("\0".join(map(str, pred.patients[pred.patient])).encode())
    return int.from_bytes(digest.digest()[:4], "little")


def one_test_set(replicates: Sequence[Replicates | None]) -> bool:
    """Whether all of a cell's seeds were tested on the same rows and patients."""
    present = [r for r in replicates if r is not None]
    return bool(present) and all(present[0].same_test_set(r) for r in present[1:])


def stack(replicates: Sequence[Replicates | None], metric: str) -> np.ndarray | None:
    """[n, n_boot] replicates of `metric` over a cell's seeds, or None if a seed has none (no predictions)."""
    if not replicates or any(r is None or metric not in r.values for r in replicates):
        return None
    return np.stack([r.values[metric] for r in replicates])


def summary(
    values: Sequence[float],
    replicates: np.ndarray | None,
    n_boot: int = N_BOOT,
    seed: int = 0,
    shared_test_set: bool = False,
) -> dict:
    """mean and std (ddof 1) over seeds of the per-seed values, their 95% bootstrap interval (`seed_bootstrap`),
    n and the interval's method."""
    v = np.asarray(values, dtype=np.float64)
    interval = seed_bootstrap(v, replicates, n_boot, seed, shared_test_set)
    return {
        "mean": float(v.mean()) if len(v) else np.nan,
        "std": float(v.std(ddof=1)) if len(v) > 1 else np.nan,
        "ci95_low": interval.low,
        "ci95_high": interval.high,
        "n": len(v),
        "ci_method": interval.method,
    }
