"""Summary rows: which metrics a study reports (and which few it shows first), and one row per study × arm ×
label fraction × metric with its statistics (the long form that becomes report.csv).

Statistics (semimed.stats): the mean and sample std over seeds of each seed's metric (metrics.json); a 95%
bootstrap interval over seeds and, with per-image predictions, over test patients; for each arm with a matched
control, the paired bootstrap of the difference on the seeds both have, resampling the same patients for both,
and its verdict.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from semimed import stats
from semimed.data import DATASETS, dataset_spec
from semimed.errors import SemimedError
from semimed.metrics import TASKS, metric_names
from semimed.report.trials import Study, Trial, canon, warn

# The rows of report.csv, in this order, of a single-label and of a multi-label study; a study keeps those its
# trials reported (metrics.json holds what the metric registry defines for the run's task).
SINGLE_LABEL_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity", "f1_macro")
SINGLE_LABEL_METRICS += ("average_precision", "patient_accuracy")
MULTI_LABEL_METRICS = ("roc_auc", "average_precision", "subset_accuracy", "sensitivity_macro")
MULTI_LABEL_METRICS += ("specificity_macro",)
# The few metrics a study's tables show first (the first one plotted), by `multilabel`. patient_accuracy is
# Spanhol et al.'s patient-level BreakHis score: shown where the dataset's spec is patient_level.
PRIMARY = {
    False: ("balanced_accuracy", "accuracy", "roc_auc", "patient_accuracy"),
    True: ("roc_auc", "average_precision"),
}
COLUMNS = ["study", "arm", "method", "label_fraction", "metric", "mean", "std", "ci95_low", "ci95_high", "n"]
COLUMNS += ["ci_method", "checkpoint", "control", "verdict", "positive_class"]


def patient_level(dataset: Any) -> bool:
    """Whether `data.dataset` names a registered dataset with several images per patient (an unknown name:
    no)."""
    return isinstance(dataset, str) and dataset in DATASETS and dataset_spec(dataset).patient_level


def primary_metrics(data_keys: dict[str, Any], multilabel: bool) -> list[str]:
    """The metrics a study's tables show, the first one plotted: PRIMARY less those the metric registry does not
    define for the study's tasks and patients. A single-label study may be binary or multi-class (the report
    does not tell them apart), so its metrics must be defined for both."""
    patients = patient_level(data_keys.get("data.dataset"))
    tasks = [task for task in TASKS if (task == "multilabel") == multilabel]
    defined = set.intersection(*(set(metric_names(task, patients)) for task in tasks))
    return [m for m in PRIMARY[multilabel] if m in defined]


def checkpoint_text(trials: list[Trial]) -> str:
    """Which checkpoint a cell's test numbers come from: 'selected on val (metric, steps a–b)', 'last', or
    'mixed across seeds: ...'."""
    parts = []
    for kind in ("selected", "last", "unknown"):
        group = [t for t in trials if t.checkpoint == kind]
        text = kind
        if group and kind == "selected":
            names = {
                str(t.metrics.get("select_metric") or t.keys.get("train.select_metric") or "roc_auc")
                for t in group
            }
            steps = sorted(
                {int(t.metrics["selected_step"]) for t in group if t.metrics.get("selected_step") is not None}
            )
            span = (
                f", steps {steps[0]}–{steps[-1]}" if len(steps) > 1 else f", step {steps[0]}" if steps else ""
            )
            text = f"selected on val ({', '.join(sorted(names))}{span})"
        if group:
            parts.append(text if len(group) == len(trials) else f"{text} ×{len(group)}")
    return parts[0] if len(parts) == 1 else "mixed across seeds: " + ", ".join(parts)


def _replicates(trial: Trial, names: list[str], n_boot: int, seed: int) -> stats.Replicates | None:
    """The trial's metrics on patient resamples of its test set (keyed by seed), or None without usable
    predictions.parquet (then its cell's interval resamples seeds only)."""
    path = trial.path / "predictions.parquet"
    if not path.is_file():
        return None
    wanted = [m for m in names if m in stats.BOOTSTRAP_METRICS and np.isfinite(trial.value(f"test/{m}"))]
    try:
        pred = stats.Predictions.read(path, trial.metrics.get("positive_class"))
        if pred.multilabel != trial.multilabel:
            raise SemimedError("its labels are not of the run's task type")
    except (OSError, ValueError, KeyError) as exc:  # SemimedError and pyarrow's errors derive from these
        warn(f"trial {trial.name}: predictions.parquet unusable ({exc}); its intervals resample seeds only")
        return None
    for metric, value in stats.point_metrics(pred, wanted).items():
        if abs(value - trial.value(f"test/{metric}")) > 1e-6:
            warn(
                f"trial {trial.name}: test/{metric} {trial.value(f'test/{metric}'):.6f} in metrics.json, {value:.6f} "
                "from predictions.parquet"
            )
    # Keyed by the test set, not the seed: trials on one test set draw the same patient resamples (stats.py).
    return stats.Replicates.of(pred, wanted, [seed, stats.test_set_key(pred)], n_boot)


def _by_seed(trials: list[Trial]) -> dict[tuple[int, int], Trial]:
    out: dict[tuple[int, int], Trial] = {}
    for trial in sorted(trials, key=lambda t: t.name):
        if trial.replicate in out:
            warn(
                f"trials {out[trial.replicate].name} and {trial.name} are the same cell and seed; using the first"
            )
        out.setdefault(trial.replicate, trial)
    return out


def reported_metrics(study: Study) -> list[str]:
    """The metrics `summarize` reports for a study: the task's list, less those no trial of it reported."""
    names = MULTI_LABEL_METRICS if study.multilabel else SINGLE_LABEL_METRICS
    return [m for m in names if any(f"test/{m}" in t.metrics for ts in study.arms.values() for t in ts)]


def study_notes(studies: list[Study]) -> list[str]:
    """One line per thing a reader of the means must know and the tables do not show (report.md and the
    terminal say them): an arm whose trials ran different code versions (run.json's `code`), averaged together;
    a trial whose reported metric is null or NaN (an undefined metric), left out of that cell's mean (the
    cell's n counts the seeds kept)."""
    notes = []
    for study in studies:
        where = f" in study {study.label}" if len(studies) > 1 else ""
        names = reported_metrics(study)
        for arm, trials in study.arms.items():
            versions: dict[str, list[Trial]] = {}
            for trial in sorted(trials, key=lambda t: t.name):
                if trial.code:  # unknown (no run.json): nothing to compare
                    versions.setdefault(canon(trial.code), []).append(trial)
            if len(versions) > 1:
                codes = [group[0].code for group in versions.values()]
                differ = [k for k in sorted(set().union(*codes)) if len({canon(c.get(k)) for c in codes}) > 1]
                what = "; ".join(f"{k} " + " vs ".join(_short(c.get(k)) for c in codes) for k in differ)
                who = " | ".join(", ".join(t.name for t in group) for group in versions.values())
                notes.append(
                    f"arm {arm}{where} averages trials of {len(versions)} code versions ({what}): {who}"
                )
            for trial in sorted(trials, key=lambda t: t.name):
                undefined = [
                    f"{prefix}/{m}"
                    for prefix in ("test", "test_last")
                    for m in names
                    if f"{prefix}/{m}" in trial.metrics and not np.isfinite(trial.value(f"{prefix}/{m}"))
                ]
                if undefined:
                    notes.append(
                        f"trial {trial.name} (arm {arm}{where}, fraction {trial.fraction:g}, seed {trial.seed}): "
                        f"{', '.join(undefined)} null/NaN, left out of that mean (n = the seeds kept)"
                    )
    return notes


def _short(value: Any) -> str:
    """A code-version value as a note shows it: hashes and commits cut to 10 characters."""
    text = "(none)" if value in (None, "") else str(value)
    return text[:10] if len(text) >= 32 and all(c in "0123456789abcdef" for c in text) else text


def summarize(studies: list[Study], n_boot: int = stats.N_BOOT, seed: int = 0) -> pd.DataFrame:
    """Long form, one row per study × arm × fraction × metric (COLUMNS): `<metric>` at the reported checkpoint,
    `<metric>@last`, and `<metric>-vs-control` (the paired difference to the matched control, with a verdict)."""
    rows = []
    for study in studies:
        names = reported_metrics(study)
        for fraction in study.fractions:
            # Predictions are read one fraction at a time: only their replicates are kept.
            cells = {
                arm: _by_seed([t for t in ts if t.fraction == fraction]) for arm, ts in study.arms.items()
            }
            reps = {
                t.name: _replicates(t, names, n_boot, seed) for cell in cells.values() for t in cell.values()
            }
            for arm, cell in cells.items():
                if not cell:
                    continue
                base = {
                    "study": study.label,
                    "arm": arm,
                    "method": next(iter(cell.values())).keys.get("method.name"),
                    "label_fraction": fraction,
                    "checkpoint": checkpoint_text(list(cell.values())),
                    "control": study.control.get(arm) or "",
                    "verdict": "",
                    # A binary task's positive class (metrics.json): whose sensitivity, specificity, ... these are.
                    "positive_class": next(iter(cell.values())).metrics.get("positive_class") or "",
                }
                # Predictions are at the reported checkpoint: they resample the @last numbers only if that is last.
                last_only = all(t.checkpoint == "last" for t in cell.values())
                for metric in names:
                    for prefix, suffix in (("test", ""), ("test_last", "@last")):
                        kept = [t for t in cell.values() if np.isfinite(t.value(f"{prefix}/{metric}"))]
                        kept_reps = [reps[t.name] for t in kept]
                        boot = stats.stack(kept_reps, metric) if not suffix or last_only else None
                        row = stats.summary(
                            [t.value(f"{prefix}/{metric}") for t in kept],
                            boot,
                            n_boot,
                            seed,
                            stats.one_test_set(kept_reps),
                        )
                        rows.append({**base, "metric": metric + suffix, **row})
                if arm in study.control:  # not a control itself
                    control = cells.get(study.control[arm] or "", {})
                    rows += _paired(base, cell, control, study.control[arm], reps, names, n_boot, seed)
    return pd.DataFrame(rows, columns=COLUMNS)


def _paired(
    base: dict, cell: dict, control: dict, label, reps: dict, names: list, n_boot: int, seed: int
) -> list:
    """`<metric>-vs-control` rows: arm − control on the seeds both have, the same patient resamples for both."""
    pairs = [(cell[k], control[k]) for k in sorted(set(cell) & set(control))]
    if not pairs:
        why = "no matched control" if label is None else "no seed in common with the control"
        empty = stats.summary([], None, n_boot, seed)
        return [{**base, "metric": f"{m}-vs-control", **empty, "verdict": why} for m in names]
    for a, c in pairs:
        if (
            reps[a.name] is not None
            and reps[c.name] is not None
            and not reps[a.name].same_test_set(reps[c.name])
        ):
            raise SemimedError(f"trials {a.name} and {c.name} (paired: same seed) have different test rows")
    rows = []
    for metric in names:
        col = f"test/{metric}"
        kept = [(a, c) for a, c in pairs if np.isfinite(a.value(col)) and np.isfinite(c.value(col))]
        arm, ctl = (
            stats.stack([reps[t.name] for t, _ in kept], metric),
            stats.stack([reps[t.name] for _, t in kept], metric),
        )
        boot = arm - ctl if arm is not None and ctl is not None else None
        shared = stats.one_test_set([reps[t.name] for t, _ in kept])  # the control's rows equal the arm's
        row = stats.summary([a.value(col) - c.value(col) for a, c in kept], boot, n_boot, seed, shared)
        row["verdict"] = stats.verdict(row["ci95_low"], row["ci95_high"], row["n"]) if row["n"] else ""
        rows.append({**base, "metric": f"{metric}-vs-control", **row})
    return rows
