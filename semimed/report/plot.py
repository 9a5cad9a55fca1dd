"""report.png: per study, the first primary metric against the label fraction and the paired difference to the
matched control. matplotlib is imported when a figure is drawn (Agg: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from semimed.files import publish, staging_path
from semimed.report.summary import primary_metrics
from semimed.report.trials import Study


def figure(summary: pd.DataFrame, studies: list[Study]):
    """One row per study: the first primary metric vs label fraction (x ticks at the swept fractions, y inside
    the metric's range) and the paired difference to the matched control (with a 0 line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullLocator

    fig, axes = plt.subplots(len(studies), 2, figsize=(11, 4 * len(studies)), dpi=120, squeeze=False)
    for (left, right), study in zip(axes, studies, strict=True):
        metric = primary_metrics(study.data, study.multilabel)[0]
        table = summary[summary["study"] == study.label]
        colors = {arm: f"C{i % 10}" for i, arm in enumerate(study.arms)}  # one color per arm in both panels
        for axis, name, bounds in ((left, metric, (0.0, 1.0)), (right, f"{metric}-vs-control", (-1.0, 1.0))):
            part = table[(table["metric"] == name) & (table["n"] > 0)].sort_values("label_fraction")
            for arm, group in part.groupby("arm", sort=False):
                x, color = group["label_fraction"], colors[arm]
                axis.plot(x, group["mean"], marker="o", color=color, label=arm)
                axis.fill_between(x, group["ci95_low"], group["ci95_high"], color=color, alpha=0.2)
            values = part[["mean", "ci95_low", "ci95_high"]].to_numpy(float)
            values = values[np.isfinite(values)]
            low, high = (values.min(), values.max()) if values.size else bounds
            if name != metric:
                axis.axhline(0.0, color="black", linewidth=0.8)
                low, high = min(low, 0.0), max(high, 0.0)
                if part.empty:
                    axis.text(
                        0.5, 0.6, "no arm with a matched control", transform=axis.transAxes, ha="center"
                    )
            pad = max(0.02, 0.05 * (high - low))
            axis.set_ylim(max(bounds[0], low - pad), min(bounds[1], high + pad))
            axis.set_xscale("log")
            axis.set_xlim(study.fractions[0] / 1.25, study.fractions[-1] * 1.25)
            axis.xaxis.set_major_locator(FixedLocator(study.fractions))
            axis.xaxis.set_major_formatter(FixedFormatter([f"{f:g}" for f in study.fractions]))
            axis.xaxis.set_minor_locator(NullLocator())
            axis.set_xlabel("label fraction (log scale)")
            axis.grid(True, alpha=0.3)
            if len(part):
                axis.legend(fontsize="small")
        left.set_ylabel(f"test {metric}")
        left.set_title(study.label, fontsize="medium")
        right.set_ylabel(f"{metric}: arm − matched control")
    fig.tight_layout()
    return fig


def save_plot(summary: pd.DataFrame, studies: list[Study], path: Path) -> Path:
    """Write `figure` as a PNG to `path` through a staging file (no half-written report.png)."""
    import matplotlib.pyplot as plt

    fig = figure(summary, studies)
    staging = staging_path(path)
    try:
        fig.savefig(staging, format="png")
    finally:
        plt.close(fig)
    return publish(staging, path)
