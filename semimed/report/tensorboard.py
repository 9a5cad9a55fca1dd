"""`<experiment>/tb_report/`: the study in TensorBoard, written by `semimed report` from the same summary rows as
report.csv (so the numbers are the report's, not a second computation).

    tb_report/<study>/<arm>/        scalars, x axis (the step) = label fraction × 1000 (per mille: 0.05 -> 50):
        <metric>/mean                 test metric at the reported checkpoint, mean over seeds
        <metric>/ci95_low, ci95_high  its 95% bootstrap interval
        <metric>/last                 the last checkpoint's mean (beside a selected one)
        <metric>/vs_control           arm − matched control, paired over seeds (non-control arms only)
        <metric>/vs_control_ci95_low, vs_control_ci95_high
    tb_report/<study>/              custom-scalar layout: each metric as a margin chart (mean inside its interval)
    tb_report/hparams/<trial>/      HParams: every trial's result keys (config without operational keys) and
                                    its final test metrics (test/*, test_last/*): the HPARAMS tab's table view
    tb_report/                      text: how to read these charts

One run per arm: TensorBoard overlays the arms of a study in each chart. Each `semimed report` replaces
tb_report/ as a whole. Per-run curves (train/val/test scalars, PR curves, the confusion matrix at the reported
checkpoint) are each run's own `runs/<trial>/tb/`; `tensorboard --logdir <experiment>` shows both.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from semimed.files import current_umask
from semimed.report.trials import Study, TrialSet

TB_REPORT = "tb_report"
FRACTION_SCALE = 1000  # the step of a label fraction: round(fraction × 1000)
README = (
    "semimed report: x axis = label fraction × {scale} (per mille; 0.05 -> 50, 1.0 -> 1000). One run per arm "
    "under `tb_report/<study>/`. `<metric>/mean` is the test metric at the reported checkpoint (mean over "
    "seeds) with its 95% bootstrap interval (`ci95_low`, `ci95_high`; the CUSTOM SCALARS tab draws them as a "
    "band); `<metric>/vs_control` is the paired difference to the matched supervised control (better / worse "
    "when its interval excludes 0). HPARAMS: one row per trial with its config and final test metrics. The same "
    "numbers are in report.csv."
)


def _safe(name: str) -> str:
    """A folder-safe run name (TensorBoard shows it as the run label)."""
    return re.sub(r"[^A-Za-z0-9_.,=+()-]+", "_", name).strip("_") or "_"


def fraction_step(fraction: float) -> int:
    return int(round(float(fraction) * FRACTION_SCALE))


def _hparam_value(value):
    """HParams accept int, float, str and bool: lists, dicts and None become text."""
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


def write_tensorboard(
    summary: pd.DataFrame, studies: list[Study], trials: TrialSet, experiment_dir: Path, text: str = ""
) -> Path:
    """Write `<experiment_dir>/tb_report/` (replacing it); returns its path. `text`: report.md, shown in the
    TEXT tab."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    experiment_dir = Path(experiment_dir)
    target = experiment_dir / TB_REPORT
    staging = Path(tempfile.mkdtemp(prefix=f".{TB_REPORT}.", dir=experiment_dir))
    try:
        with SummaryWriter(str(staging)) as writer:
            writer.add_text("how_to_read", README.format(scale=FRACTION_SCALE), 0)
            if text:
                # TensorBoard renders Markdown; a fenced block keeps wide tables legible.
                writer.add_text("report", text, 0)
        for study in studies:
            _write_study(SummaryWriter, summary[summary["study"] == study.label], study, staging)
        for trial in trials.trials:
            metrics = {
                f"hparam/{k}": float(v)
                for k, v in trial.metrics.items()
                if k.startswith(("test/", "test_last/"))
                and k.count("/") == 1
                and isinstance(v, int | float)
                and not isinstance(v, bool)
                and math.isfinite(float(v))
            }
            if not metrics:
                continue
            params = {k: _hparam_value(v) for k, v in trial.keys.items()}
            exp, ssi, sei = hparams(params, metrics)
            with SummaryWriter(str(staging / "hparams" / _safe(trial.name))) as writer:
                for summary_pb in (exp, ssi, sei):
                    writer.file_writer.add_summary(summary_pb)
                for key, value in metrics.items():
                    writer.add_scalar(key, value, 0)
        if target.exists():
            shutil.rmtree(target)
        staging.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700; a report folder follows the umask
        staging.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_study(writer_cls, table: pd.DataFrame, study: Study, root: Path) -> None:
    folder = root / _safe(study.label)
    metrics = [m for m in table["metric"].unique() if "@" not in m and not m.endswith("-vs-control")]
    layout = {}
    for metric in metrics:
        layout[metric] = ["Margin", [f"{metric}/mean", f"{metric}/ci95_low", f"{metric}/ci95_high"]]
        if (table["metric"] == f"{metric}-vs-control").any():
            layout[f"{metric} − control"] = [
                "Margin",
                [f"{metric}/vs_control", f"{metric}/vs_control_ci95_low", f"{metric}/vs_control_ci95_high"],
            ]
    with writer_cls(str(folder)) as writer:
        writer.add_custom_scalars({study.label: layout})
    for arm in study.arms:
        rows = table[table["arm"] == arm]
        if rows.empty:
            continue
        with writer_cls(str(folder / _safe(arm))) as writer:
            for _, row in rows.sort_values("label_fraction").iterrows():
                step, metric = fraction_step(row["label_fraction"]), str(row["metric"])
                if metric.endswith("-vs-control"):
                    base, names = metric.removesuffix("-vs-control"), ("vs_control", "vs_control_ci95_")
                elif metric.endswith("@last"):
                    base, names = metric.removesuffix("@last"), ("last", None)
                else:
                    base, names = metric, ("mean", "ci95_")
                values = {names[0]: row["mean"]}
                if names[1]:
                    values.update({names[1] + "low": row["ci95_low"], names[1] + "high": row["ci95_high"]})
                for name, value in values.items():
                    if value is not None and np.isfinite(value):
                        writer.add_scalar(f"{base}/{name}", float(value), step)
