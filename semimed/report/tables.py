"""The Markdown side of the report: the legend, the per-study tables (primary metrics, paired differences to
the matched control, reported checkpoints), label efficiency, and the published anchors (MedMNIST v2) that a
full-label supervised reproduction is set beside.
"""

from __future__ import annotations

import math
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from semimed.errors import SemimedError
from semimed.report.summary import primary_metrics
from semimed.report.trials import Study, Trial, TrialSet, canon, collect_trials, group_keys, is_control, show

LEGEND = (
    "Cells: mean ± std over seeds [95% bootstrap interval] n = seeds. The interval resamples seeds and, within a "
    "seed, the test set's patients (per-image predictions; seeds tested on one test set share each patient "
    "resample, so its sampling error is not averaged away); it stays inside the metric's range. ‡ the interval "
    "resamples seeds only (no per-image predictions). † fewer than 3 seeds: the interval understates the "
    "seed-to-seed spread. (last: …) the last checkpoint's mean, beside numbers from a checkpoint selected on val. "
    "Paired differences: arm − matched control (plain supervised, otherwise the same settings) on the seeds both "
    "have, with the same resampled patients for both; better / worse when the interval excludes 0."
)
EFFICIENCY = "Smallest label fraction whose mean reaches 95% of the same arm's full-label mean."


def label_efficiency(summary: pd.DataFrame, metric: str) -> dict[str, str]:
    """Per arm: the smallest fraction whose mean reaches 95% of the same arm's full-label mean."""
    out = {}
    for arm, group in summary[summary["metric"] == metric].groupby("arm", sort=False):
        full = group[np.isclose(group["label_fraction"], 1.0)]
        if full.empty or not np.isfinite(full["mean"].iloc[0]):
            out[arm] = "no full-label run"
            continue
        reached = group[group["mean"] >= 0.95 * float(full["mean"].iloc[0])].sort_values("label_fraction")
        out[arm] = f"{reached['label_fraction'].iloc[0]:g}" if not reached.empty else "not reached"
    return out


def _cell(row: pd.Series, last: pd.DataFrame | None = None) -> str:
    if not np.isfinite(row["mean"]):
        return "–"
    text = f"{row['mean']:.3f}" + (f" ± {row['std']:.3f}" if np.isfinite(row["std"]) else "")
    text += f" [{row['ci95_low']:.3f}, {row['ci95_high']:.3f}]" if np.isfinite(row["ci95_low"]) else ""
    text += f" n={row['n']}" + ("†" if row["n"] < 3 else "") + ("‡" if row["ci_method"] == "seeds" else "")
    key = (row["arm"], row["label_fraction"])
    if last is not None and key in last.index and row["checkpoint"] != "last":
        text += f" (last: {last.loc[key, 'mean']:.3f})" if np.isfinite(last.loc[key, "mean"]) else ""
    return text


def _diff_cell(row: pd.Series) -> str:
    if not row["n"]:
        return row["verdict"]
    interval = f" [{row['ci95_low']:+.3f}, {row['ci95_high']:+.3f}]" if np.isfinite(row["ci95_low"]) else ""
    return f"{row['mean']:+.3f}{interval} n={row['n']}{'‡' if row['ci_method'] == 'seeds' else ''}: {row['verdict']}"


def _table(summary: pd.DataFrame, metric: str, fractions: list[float], render, control: bool = False) -> list:
    """A Markdown table of `metric`: rows = arms, columns = fractions, cells = render(summary row)."""
    table = summary[summary["metric"] == metric]
    head = ["arm"] + ["matched control"] * control + [f"{f:g}" for f in fractions]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for arm, group in table.groupby("arm", sort=False):
        cells = {row["label_fraction"]: render(row) for _, row in group.iterrows()}
        first = [arm] + [group["control"].iloc[0] or "–"] * control
        lines.append("| " + " | ".join(first + [cells.get(f, "") for f in fractions]) + " |")
    return lines + [""]


def markdown(
    summary: pd.DataFrame,
    studies: list[Study],
    trials: TrialSet,
    note: str,
    folder: Path,
    notes: list[str] | None = None,
) -> str:
    """report.md: the counts, `notes` (semimed.report.summary.study_notes, one line each), the legend and
    each study's tables."""
    counts = (
        f"{len(trials.trials)} finished trial(s) in {len(studies)} stud{'y' if len(studies) == 1 else 'ies'}."
    )
    lines = [f"# semimed report: {folder.name}", "", f"Experiment directory: `{folder}`", "", counts]
    if trials.unfinished:
        lines.append(
            f"{len(trials.unfinished)} unfinished (no metrics.json): {', '.join(trials.unfinished)}."
        )
    if trials.skipped:
        lines.append(f"{len(trials.skipped)} skipped (unreadable): {'; '.join(trials.skipped)}.")
    if notes:  # a Markdown list: one line each
        lines += ["", *(f"- Note: {line}." for line in notes)]
    lines += ["", note, ""] if note else [""]
    lines += [LEGEND, ""]
    for study in studies:
        primary = primary_metrics(study.data, study.multilabel)
        table = summary[summary["study"] == study.label]
        data = ", ".join(f"{k.removeprefix('data.')}={show(canon(v))}" for k, v in study.data.items())
        lines += [f"## Study: {study.label}", "", f"Data: {data}", ""]
        positive = sorted(
            {
                str(t.metrics["positive_class"])
                for ts in study.arms.values()
                for t in ts
                if t.metrics.get("positive_class")
            }
        )
        if positive:
            lines += [
                f"Positive class: {' / '.join(positive)} (sensitivity, specificity, precision, F1, ROC-AUC and AP "
                "are this class's)",
                "",
            ]
        for metric in primary:
            last = table[table["metric"] == f"{metric}@last"].set_index(["arm", "label_fraction"])
            lines += [f"### {metric}", ""] + _table(table, metric, study.fractions, partial(_cell, last=last))
        for metric in primary:
            if (table["metric"] == f"{metric}-vs-control").any():
                lines += [f"### {metric}: paired difference to the matched control", ""]
                lines += _table(table, f"{metric}-vs-control", study.fractions, _diff_cell, control=True)
        lines += ["### Reported checkpoint", ""]
        lines += _table(table, primary[0], study.fractions, lambda row: row["checkpoint"])
        lines += [
            f"### Label efficiency ({primary[0]})",
            "",
            EFFICIENCY,
            "",
            "| arm | fraction |",
            "|---|---|",
        ]
        lines += [f"| {a} | {v} |" for a, v in label_efficiency(table, primary[0]).items()] + [""]
    return "\n".join(lines).rstrip() + "\n"


# Published anchors: MedMNIST v2 (Yang et al., Sci Data 2023, Table 3), ResNet-18 (28).
# Key: (MedMNIST flag from data.root's file name, model.backbone, data.image_size) of a full-label supervised run.
PUBLISHED: dict[tuple[str, str, int], dict[str, float]] = {
    ("breastmnist", "resnet18_28", 28): {"roc_auc": 0.901, "accuracy": 0.863},
    ("pneumoniamnist", "resnet18_28", 28): {"roc_auc": 0.944, "accuracy": 0.854},
}
PUBLISHED_SOURCE = "MedMNIST v2 (Yang et al., Sci Data 2023), ResNet-18 (28)"


def published_comparison(experiment_dir: Path, trials: TrialSet | None = None) -> str:
    """Markdown: our test AUC/ACC beside the published row, when the trials reproduce a known benchmark."""
    from semimed.data.medmnist import medmnist_flag, medmnist_size

    if trials is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # the report itself names skipped trials
                trials = collect_trials(experiment_dir)
        except SemimedError:
            return ""
    found: dict[tuple[str, str, int], list[Trial]] = {}
    for trial in trials.trials:
        root = str(trial.keys.get("data.root", ""))
        key = (
            medmnist_flag(root),
            str(trial.keys.get("model.backbone")),
            int(trial.keys.get("data.image_size", 0)),
        )
        full_label_control = trial.fraction == 1.0 and is_control(group_keys(trial, data=False))
        # medmnist_size: not a resized MedMNIST+ file
        if trial.keys.get("data.dataset") == "medmnist" and full_label_control and key in PUBLISHED:
            if medmnist_size(root) == key[2]:
                found.setdefault(key, []).append(trial)
    lines = []
    for key, runs in sorted(found.items()):
        lines += [
            f"## Published row: {key[0]}, {PUBLISHED_SOURCE}",
            "",
            "| metric | published | ours (selected on val) | ours (last checkpoint) | ours − published |",
            "|---|---|---|---|---|",
        ]
        for metric, published in PUBLISHED[key].items():
            cells = []
            for prefix in ("test", "test_last"):
                values = np.array([r.value(f"{prefix}/{metric}") for r in runs])
                values = values[np.isfinite(values)]
                mean = float(values.mean()) if len(values) else math.nan
                std = f" ± {values.std(ddof=1):.3f}" if len(values) > 1 else ""
                cells.append((mean, f"{mean:.3f}{std} (n={len(values)})"))
            lines.append(
                f"| {metric} | {published:.3f} | {cells[0][1]} | {cells[1][1]} | {cells[0][0] - published:+.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


# The terminal view (`semimed demo`): the headline metrics and their paired verdicts, one short line per arm.
BRIEF_METRICS = ("roc_auc", "balanced_accuracy", "average_precision")


def _brief_cell(row: pd.Series) -> str:
    if not np.isfinite(row["mean"]):
        return "–"
    text = f"{row['mean']:.3f}" + (f" ± {row['std']:.3f}" if np.isfinite(row["std"]) else "")
    text += f" [{row['ci95_low']:.3f}, {row['ci95_high']:.3f}]" if np.isfinite(row["ci95_low"]) else ""
    return text + ("†" if row["n"] < 3 else "")


def _brief_diff(row: pd.Series) -> str:
    if not row["n"]:
        return row["verdict"]
    interval = f" [{row['ci95_low']:+.3f}, {row['ci95_high']:+.3f}]" if np.isfinite(row["ci95_low"]) else ""
    return f"{row['mean']:+.3f}{interval} {row['verdict']}"


def brief(summary: pd.DataFrame, count: int = 2) -> str:
    """Per study, the first `count` of BRIEF_METRICS it reports: the test table (mean ± std [95% interval]) and
    the paired difference to the matched control with its verdict. report.md has everything else."""
    lines = []
    for study, table in summary.groupby("study", sort=False):
        fractions = sorted(table["label_fraction"].unique())
        metrics = [m for m in BRIEF_METRICS if (table["metric"] == m).any()][:count]
        seeds = int(table.loc[table["metric"].isin(metrics), "n"].max() or 0)
        lines.append(
            f"Study {study}: test metrics at the reported checkpoint, mean ± std over {seeds} seed(s) "
            "[95% bootstrap interval over seeds and test patients]; columns = label fraction"
        )
        for metric in metrics:
            lines += [f"test {metric}:"] + _table(table, metric, fractions, _brief_cell)
            if (table["metric"] == f"{metric}-vs-control").any():
                lines.append(
                    f"{metric}, arm − matched control (same seeds, same resampled patients), verdict:"
                )
                lines += _table(table, f"{metric}-vs-control", fractions, _brief_diff)
    if any("†" in line for line in lines):
        lines.append("† fewer than 3 seeds: the interval understates the seed-to-seed spread")
    if any(summary["metric"].str.endswith("-vs-control")):
        lines.append("verdict: better / worse when the paired 95% interval excludes 0")
    return "\n".join(lines).rstrip()
