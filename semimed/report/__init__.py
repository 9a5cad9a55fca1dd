"""`semimed report`: trials -> tables (CSV, Markdown) and a metric-vs-label-fraction plot (PNG). Pure files in,
files out: it reads `<experiment>/runs/*/{config.yaml,metrics.json,split.json,predictions.parquet}` and needs
no Ray.

- `semimed.report.trials`: reading trial folders; what is averaged with what (studies, arms, cells, matched
  controls);
- `semimed.report.summary`: which metrics a study reports, and the summary rows with their bootstrap intervals
  and paired verdicts (semimed.stats);
- `semimed.report.tables`: report.md's tables, label efficiency and the published anchors;
- `semimed.report.plot`: report.png;
- `semimed.report.fields`: the tables a field expects (ChestX-ray14 per finding, BreakHis per magnification);
- `semimed.report.tensorboard`: `<experiment>/tb_report/` (metric vs label fraction per arm, HParams).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from semimed import stats
from semimed.files import atomic_write_text
from semimed.report.fields import field_tables
from semimed.report.plot import figure, save_plot
from semimed.report.summary import (
    COLUMNS,
    MULTI_LABEL_METRICS,
    PRIMARY,
    SINGLE_LABEL_METRICS,
    checkpoint_text,
    primary_metrics,
    study_notes,
    summarize,
)
from semimed.report.tables import (
    EFFICIENCY,
    LEGEND,
    PUBLISHED,
    PUBLISHED_SOURCE,
    brief,
    label_efficiency,
    markdown,
    published_comparison,
)
from semimed.report.tensorboard import TB_REPORT, write_tensorboard
from semimed.report.trials import Study, Trial, TrialSet, collect_trials, group_studies, warn

__all__ = [
    "COLUMNS",
    "EFFICIENCY",
    "LEGEND",
    "MULTI_LABEL_METRICS",
    "PRIMARY",
    "PUBLISHED",
    "PUBLISHED_SOURCE",
    "SINGLE_LABEL_METRICS",
    "TB_REPORT",
    "Study",
    "Trial",
    "TrialSet",
    "brief",
    "checkpoint_text",
    "collect_trials",
    "field_tables",
    "figure",
    "group_studies",
    "label_efficiency",
    "markdown",
    "primary_metrics",
    "published_comparison",
    "save_plot",
    "study_notes",
    "summarize",
    "write_report",
    "write_tensorboard",
]


def write_report(
    experiment_dir: str | Path, n_boot: int = stats.N_BOOT, seed: int = 0
) -> tuple[pd.DataFrame, str]:
    """Write report.csv, report.md, report.png and tb_report/ (TensorBoard) into the experiment directory;
    return (summary, markdown). Skipped trials and other problems are also RuntimeWarnings."""
    trials = collect_trials(experiment_dir)  # a path, or a storage URI (s3://…) read through pyarrow.fs
    experiment_dir = trials.root  # written here: for a URI, a local copy, sent back at the end
    studies, note = group_studies(trials.trials)
    summary = summarize(studies, n_boot, seed)
    notes = study_notes(studies)  # in report.md, and on the terminal (`semimed report` prints the warnings)
    for line in notes:
        warn(line)
    published = published_comparison(experiment_dir, trials)
    text = markdown(summary, studies, trials, note, trials.location, notes)
    text += "\n" + published if published else ""
    fields = field_tables(studies)
    text += "\n" + fields if fields else ""
    atomic_write_text(experiment_dir / "report.csv", summary.to_csv(index=False))
    atomic_write_text(experiment_dir / "report.md", text)
    save_plot(summary, studies, experiment_dir / "report.png")
    write_tensorboard(summary, studies, trials, experiment_dir, text)
    trials.write_back()  # a storage URI: report.* and tb_report/ are uploaded next to its runs/
    return summary, text
