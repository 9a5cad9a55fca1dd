"""The metric registry: every number a run reports is a registered `Metric`, a small pure function of the
scores with an explicit `average`, and everything that names metrics (the engine's evaluation,
`train.select_metric`, what goes to Ray Tune, the report) reads the names from here.

A metric applies to some tasks: "binary" (single-label, K = 2; the dataset declares which class is positive: a
run's `data.positive_class`, e.g. `malignant`, passed here as `positive`; class index 1 when none is passed),
"multiclass" (single-label, K > 2) and "multilabel" (K findings, NaN = unknown label). A per-class metric
(`per_class=True`) gives one value per class, reported as `<name>/<class>`.

Adding a metric: one function decorated with `@register_metric(...)` below (docs/extending.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from semimed.errors import SemimedError
from semimed.metrics.core import (
    as_multilabel,
    as_thresholds,
    average_precision,
    check_classes,
    confusion_matrix,
    nanmean,
    patient_accuracy,
    roc_auc,
    safe_ratio,
)
from semimed.registry import Registry

TASKS = ("binary", "multiclass", "multilabel")
SINGLE = ("binary", "multiclass")


def task_of(num_classes: int, multilabel: bool) -> str:
    return "multilabel" if multilabel else ("binary" if num_classes == 2 else "multiclass")


class Scores:
    """Validated inputs of one evaluation, with the per-class quantities that several metrics share computed
    once (so each undefined value warns once).

    y_true: int [N] (single-label) or float [N, K] with NaN = unknown (multi-label); scores: float [N, K]
    (softmax or sigmoid probabilities); patient_ids: optional [N]; thresholds: multi-label decision thresholds
    [K] (default 0.5; a prediction is positive when score >= threshold); positive: the index of the positive class
    of a binary task (its sensitivity, specificity, precision, F1, ROC-AUC and AP are the headline numbers), 1
    when None.
    """

    def __init__(
        self,
        y_true: np.ndarray,
        scores: np.ndarray,
        classes: Sequence[str],
        multilabel: bool,
        patient_ids: np.ndarray | None = None,
        thresholds: np.ndarray | None = None,
        positive: int | None = None,
    ) -> None:
        self.multilabel, self.patient_ids = multilabel, patient_ids
        if multilabel:
            self.y, self.s = as_multilabel(y_true, scores, "multilabel_metrics")
            self.n, self.k = self.s.shape
            self.names = check_classes(classes, self.k, "multilabel_metrics")
            self.thresholds = as_thresholds(thresholds, self.k, "multilabel_metrics")
            self.known = ~np.isnan(self.y)
            self.predicted = self.s >= self.thresholds[None, :]
            self.truth = self.y == 1.0  # NaN compares False; masked by `known` wherever it matters
        else:
            self.s = np.asarray(scores, dtype=np.float64)
            if self.s.ndim != 2:
                raise SemimedError(f"single_label_metrics: probs must be [N, K], got shape {self.s.shape}")
            self.n, self.k = self.s.shape
            self.names = check_classes(classes, self.k, "single_label_metrics")
            if self.k < 2:
                raise SemimedError(f"single_label_metrics: need at least 2 classes, got {self.k}")
            if self.n == 0:
                raise SemimedError("single_label_metrics: no samples")
            if not np.isfinite(self.s).all():
                raise SemimedError("single_label_metrics: probs contain NaN or inf")
            y = np.asarray(y_true)
            if y.shape != (self.n,):
                raise SemimedError(f"single_label_metrics: y_true must have shape ({self.n},), got {y.shape}")
            self.predicted = self.s.argmax(axis=1)
            self.confusion = confusion_matrix(y, self.predicted, self.k)  # also validates the range of y_true
            self.y = y.astype(np.int64)
        self.task = task_of(self.k, multilabel)
        if positive is not None and (self.task != "binary" or positive not in (0, 1)):
            raise SemimedError(
                f"positive class index {positive} given for a {self.task} task of {self.k} classes"
            )
        self.positive = 1 if positive is None else int(positive)

    # ------------------------------------------------------------------------------ per-class, computed once
    @cached_property
    def counts(self) -> dict[str, np.ndarray]:
        """Single-label one-vs-rest counts per class: tp, fp, fn, tn (float [K])."""
        cm = self.confusion
        tp = np.diag(cm).astype(np.float64)
        fp, fn = cm.sum(axis=0) - tp, cm.sum(axis=1) - tp
        return {"tp": tp, "fp": fp, "fn": fn, "tn": self.n - tp - fp - fn}

    @cached_property
    def per_class(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        if self.multilabel:
            for name in ("roc_auc", "average_precision", "sensitivity", "specificity"):
                out[name] = []
            for j, name in enumerate(self.names):
                m = self.known[:, j]
                yj, sj, pj = self.truth[m, j], self.s[m, j], self.predicted[m, j]
                out["roc_auc"].append(roc_auc(yj, sj, name=name))
                out["average_precision"].append(average_precision(yj, sj, name=name))
                n_pos = int(yj.sum())
                out["sensitivity"].append(safe_ratio(int((pj & yj).sum()), n_pos, "sensitivity", name))
                out["specificity"].append(
                    safe_ratio(int((~pj & ~yj).sum()), yj.size - n_pos, "specificity", name)
                )
            return out
        c = self.counts
        ratios = {
            "precision": (c["tp"], c["tp"] + c["fp"], "precision"),
            "sensitivity": (c["tp"], c["tp"] + c["fn"], "sensitivity (recall)"),
            "specificity": (c["tn"], c["tn"] + c["fp"], "specificity"),
            # sklearn >= 1.3 defines F1 as 2TP / (2TP + FP + FN): 0 (not NaN) when precision alone is
            # undefined, NaN only when the class is neither present nor predicted.
            "f1": (2 * c["tp"], 2 * c["tp"] + c["fp"] + c["fn"], "F1"),
        }
        for metric, (num, den, what) in ratios.items():
            out[metric] = [safe_ratio(num[j], den[j], what, name) for j, name in enumerate(self.names)]
        out["roc_auc"] = [roc_auc(self.y == j, self.s[:, j], name=name) for j, name in enumerate(self.names)]
        out["average_precision"] = [
            average_precision(self.y == j, self.s[:, j], name=name) for j, name in enumerate(self.names)
        ]
        return out


@dataclass(frozen=True)
class Metric:
    """A registered metric: `compute(scores) -> float` (or [K] values when `per_class`)."""

    name: str
    compute: Callable[[Scores], float | list[float]]
    tasks: tuple[str, ...]
    average: str  # how per-class values become the number: "positive class", "macro", ...
    per_class: bool = False
    selectable: bool = True  # may be train.select_metric (and Tune's search metric): higher is better
    needs_patients: bool = False

    def applies(self, task: str, has_patients: bool) -> bool:
        return task in self.tasks and (has_patients or not self.needs_patients)


METRICS: Registry[Metric] = Registry("metric")


def register_metric(
    name: str,
    tasks: Sequence[str],
    average: str,
    *,
    per_class: bool = False,
    selectable: bool = True,
    needs_patients: bool = False,
) -> Callable[[Callable[[Scores], float | list[float]]], Callable[[Scores], float | list[float]]]:
    def decorator(fn: Callable[[Scores], float | list[float]]) -> Callable[[Scores], float | list[float]]:
        metric = Metric(
            name, fn, tuple(tasks), average, per_class, selectable and not per_class, needs_patients
        )
        METRICS.register(name)(metric)  # the registry holds the Metric itself
        return fn

    return decorator


def metrics_for(task: str, has_patients: bool = False, selectable_only: bool = False) -> list[Metric]:
    """The registered metrics that apply to `task`, in name order."""
    found = [METRICS.get(name) for name in METRICS.names()]
    return [
        m
        for m in found
        if m.applies(task, has_patients) and (m.selectable or not selectable_only)  # type: ignore[union-attr]
    ]  # type: ignore[return-value]


def metric_names(
    task: str | None = None, has_patients: bool = True, selectable_only: bool = True
) -> list[str]:
    """Names of the (selectable, summary) metrics of `task`, or of any task when None."""
    tasks = TASKS if task is None else (task,)
    return sorted({m.name for t in tasks for m in metrics_for(t, has_patients, selectable_only)})


def evaluate_scores(
    y_true: np.ndarray,
    scores: np.ndarray,
    classes: Sequence[str],
    multilabel: bool,
    patient_ids: np.ndarray | None = None,
    thresholds: np.ndarray | None = None,
    positive: int | None = None,
) -> dict[str, float]:
    """Every registered metric that applies: a flat dict {name: value, name/<class>: value}.

    patient_ids apply to single-label tasks only (patient_accuracy); thresholds to multi-label only; positive
    (the positive class's index) to binary tasks only.
    """
    inputs = Scores(
        y_true, scores, classes, multilabel, None if multilabel else patient_ids, thresholds, positive
    )
    out: dict[str, float] = {}
    for metric in metrics_for(inputs.task, inputs.patient_ids is not None):
        value = metric.compute(inputs)
        if metric.per_class:
            per = zip(inputs.names, value, strict=True)  # type: ignore[arg-type]
            out.update({metric.name.replace("{class}", name): v for name, v in per})
        else:
            out[metric.name] = value  # type: ignore[assignment]
    return out


def single_label_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    patient_ids: np.ndarray | None = None,
    positive: int | None = None,
) -> dict[str, float]:
    """`evaluate_scores` of a single-label (binary or multi-class) classifier; the prediction is argmax."""
    return evaluate_scores(y_true, probs, classes, False, patient_ids=patient_ids, positive=positive)


def multilabel_metrics(
    y_true: np.ndarray, scores: np.ndarray, classes: list[str], thresholds: np.ndarray | None = None
) -> dict[str, float]:
    """`evaluate_scores` of a multi-label classifier; unknown labels (NaN) are masked out per finding."""
    return evaluate_scores(y_true, scores, classes, True, thresholds=thresholds)


# ---------------------------------------------------------------------------------------------------------
# the metrics


@register_metric("accuracy", SINGLE, "micro: share of images whose argmax is right")
def _accuracy(s: Scores) -> float:
    return float(s.counts["tp"].sum() / s.n)


@register_metric("balanced_accuracy", SINGLE, "macro sensitivity over the classes present in y_true")
def _balanced_accuracy(s: Scores) -> float:
    return nanmean(s.per_class["sensitivity"])


@register_metric(
    "roc_auc", TASKS, "binary: the positive class; multiclass: macro one-vs-rest; multilabel: macro"
)
def _roc_auc(s: Scores) -> float:
    values = s.per_class["roc_auc"]
    return values[s.positive] if s.task == "binary" else nanmean(values)


@register_metric("average_precision", TASKS, "binary: the positive class; else macro over classes (findings)")
def _average_precision(s: Scores) -> float:
    # Binary: the AP a reader means (scikit-learn's average_precision_score with pos_label); the other class's
    # AP is reported beside it as average_precision/<class>.
    values = s.per_class["average_precision"]
    return values[s.positive] if s.task == "binary" else nanmean(values)


@register_metric("roc_auc_macro", ("multilabel",), "macro over findings (alias of roc_auc)")
def _roc_auc_macro(s: Scores) -> float:
    return nanmean(s.per_class["roc_auc"])


@register_metric(
    "average_precision_macro", ("multilabel",), "macro over findings (alias of average_precision)"
)
def _average_precision_macro(s: Scores) -> float:
    return nanmean(s.per_class["average_precision"])


def _register_ratio(name: str, tasks: Sequence[str]) -> None:
    """`<name>/<class>`, `<name>_macro`, and for binary tasks `<name>` of the positive class."""
    register_metric(name + "/{class}", tasks, "none: one value per class", per_class=True)(
        lambda s: s.per_class[name]
    )
    register_metric(name + "_macro", tasks, "macro over classes (findings)")(
        lambda s: nanmean(s.per_class[name])
    )
    if "binary" in tasks:
        register_metric(name, ("binary",), "the positive class")(lambda s: s.per_class[name][s.positive])


for _name in ("sensitivity", "specificity"):
    _register_ratio(_name, TASKS)
for _name in ("precision", "f1"):
    _register_ratio(_name, SINGLE)


@register_metric("roc_auc/{class}", TASKS, "none: one-vs-rest per class / per finding", per_class=True)
def _roc_auc_per_class(s: Scores) -> list[float]:
    return s.per_class["roc_auc"]


@register_metric("average_precision/{class}", TASKS, "none: per class / per finding", per_class=True)
def _average_precision_per_class(s: Scores) -> list[float]:
    return s.per_class["average_precision"]


@register_metric(
    "patient_accuracy", SINGLE, "macro over patients of each patient's image accuracy", needs_patients=True
)
def _patient_accuracy(s: Scores) -> float:
    return patient_accuracy(s.y == s.predicted, s.patient_ids)  # type: ignore[arg-type]


@register_metric(
    "subset_accuracy", ("multilabel",), "images with a known label whose known labels are all right"
)
def _subset_accuracy(s: Scores) -> float:
    right = (s.predicted == s.truth) | ~s.known
    rows = s.known.any(axis=1)  # a row with no known label says nothing about the classifier
    return safe_ratio(int(right[rows].all(axis=1).sum()), int(rows.sum()), "subset accuracy", None)


@register_metric("hamming_accuracy", ("multilabel",), "micro over known (image, finding) entries")
def _hamming_accuracy(s: Scores) -> float:
    right = (s.predicted == s.truth) | ~s.known
    return safe_ratio(int((right & s.known).sum()), int(s.known.sum()), "hamming accuracy", None)
