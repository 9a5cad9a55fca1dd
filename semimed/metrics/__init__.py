"""Evaluation metrics as pure numpy functions (no torch, no scikit-learn; checked against scikit-learn in
tests/test_metrics.py).

- `semimed.metrics.core`: the building blocks (ROC-AUC, average precision, confusion matrix, thresholds);
- `semimed.metrics.registry`: every reported metric, registered with the tasks it applies to and its average;
  `evaluate_scores` computes all that apply, and the names the engine, Ray Tune and the report use come from it.
"""

from semimed.metrics.core import (
    THRESHOLD_RULES,
    average_precision,
    choose_thresholds,
    confusion_matrix,
    roc_auc,
)
from semimed.metrics.registry import (
    METRICS,
    TASKS,
    Metric,
    Scores,
    evaluate_scores,
    metric_names,
    metrics_for,
    multilabel_metrics,
    register_metric,
    single_label_metrics,
    task_of,
)

# Every name `train.select_metric` may take, across tasks (which apply depends on the run's task).
SELECTABLE_METRICS = tuple(metric_names())


__all__ = [
    "METRICS",
    "SELECTABLE_METRICS",
    "TASKS",
    "THRESHOLD_RULES",
    "Metric",
    "Scores",
    "average_precision",
    "choose_thresholds",
    "confusion_matrix",
    "evaluate_scores",
    "metric_names",
    "metrics_for",
    "multilabel_metrics",
    "register_metric",
    "roc_auc",
    "single_label_metrics",
    "task_of",
]
