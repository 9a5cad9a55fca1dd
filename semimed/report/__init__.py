"""`semimed report`: trials -> tables (CSV, Markdown) and a metric-vs-label-fraction plot (PNG). Pure files in,
files out: it reads `<experiment>/runs/*/{config.yaml,metrics.json,split.json,predictions.parquet}` and needs
no Ray.

- `semimed.report.trials`: reading trial folders; what is averaged with what (studies, arms, cells, matched
  controls);
- `semimed.report.summary`: which metrics a study reports, and the summary rows with their bootstrap intervals
  and paired verdicts (semimed.stats);
- `semimed.report.tables`: report.md's tables, label efficiency and the published anchors;
- `semimed.report.plot`: report.png.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from semimed import stats
from semimed.files import atomic_write_text
from semimed.report.plot import figure, save_plot
from semimed.report.summary import (
    COLUMNS,
    MULTI_LABEL_METRICS,
    PRIMARY,
    SINGLE_LABEL_METRICS,
    checkpoint_text,
    primary_metrics,
    summarize,
)
from semimed.report.tables import (
    EFFICIENCY,
    LEGEND,
    PUBLISHED,
    PUBLISHED_SOURCE,
    label_efficiency,
    markdown,
    published_comparison,
)
from semimed.report.trials import Study, Trial, TrialSet, collect_trials, group_studies

__all__ = [
    "COLUMNS",
    "EFFICIENCY",
    "LEGEND",
    "MULTI_LABEL_METRICS",
    "PRIMARY",
    "PUBLISHED",
    "PUBLISHED_SOURCE",
    "SINGLE_LABEL_METRICS",
    "Study",
    "Trial",
    "TrialSet",
    "checkpoint_text",
    "collect_trials",
    "figure",
    "group_studies",
    "label_efficiency",
    "markdown",
    "primary_metrics",
    "published_comparison",
    "save_plot",
    "summarize",
    "write_report",
]


def write_report(
    experiment_dir: str | Path, n_boot: int = stats.N_BOOT, seed: int = 0
) -> tuple[pd.DataFrame, str]:
    """Write report.csv, report.md and report.png into the experiment directory; return (summary, markdown).
    Skipped trials and other problems are also RuntimeWarnings."""
    experiment_dir = Path(experiment_dir).resolve()
    trials = collect_trials(experiment_dir)
    studies, note = group_studies(trials.trials)
    summary = summarize(studies, n_boot, seed)
    published = published_comparison(experiment_dir, trials)
    text = markdown(summary, studies, trials, note, experiment_dir) + ("\n" + published if published else "")
    atomic_write_text(experiment_dir / "report.csv", summary.to_csv(index=False))
    atomic_write_text(experiment_dir / "report.md", text)
    save_plot(summary, studies, experiment_dir / "report.png")
    return summary, text
