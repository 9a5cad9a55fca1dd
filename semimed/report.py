"""Trials -> tables (CSV, Markdown), a metric-vs-label-fraction plot (PNG). Pure files in, files out: it
reads `<experiment>/runs/*/{config.yaml,metrics.json}` and needs no Ray.

Statistics per method × label fraction over seeds: mean, sample std, n, and a 95% CI from Student's t
(n − 1 degrees of freedom). SSL methods are also reported as the paired difference to the matched
`supervised` control (same fraction and seed), with the t-CI of that difference (STUDY_PROTOCOL rules 4, 6).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from semimed.errors import SemimedError
from semimed.files import atomic_write_text

SINGLE_LABEL_METRICS = (
    "accuracy",
    "balanced_accuracy",
    "roc_auc",
    "sensitivity",
    "specificity",
    "f1_macro",
    "average_precision",
    "patient_accuracy",
)
MULTI_LABEL_METRICS = (
    "roc_auc",
    "average_precision",
    "subset_accuracy",
    "sensitivity_macro",
    "specificity_macro",
)
CONTROL = "supervised"


def collect_trials(experiment_dir: str | Path) -> pd.DataFrame:
    """One row per finished trial: method, label_fraction, seed, multilabel and its final test metrics."""
    experiment_dir = Path(experiment_dir)
    if not experiment_dir.is_dir():
        raise SemimedError(f"{experiment_dir}: experiment directory not found")
    rows = []
    for metrics_path in sorted(experiment_dir.glob("runs/*/metrics.json")):
        config_path = metrics_path.with_name("config.yaml")
        try:
            metrics = json.loads(metrics_path.read_text())
            cfg = yaml.safe_load(config_path.read_text())
        except (OSError, json.JSONDecodeError, yaml.YAMLError) as exc:
            raise SemimedError(f"{metrics_path.parent}: unreadable trial files ({exc})") from None
        split = json.loads(metrics_path.with_name("split.json").read_text())
        row = {
            "trial": metrics_path.parent.name,
            "method": _method_label(cfg),
            "label_fraction": float(cfg["data"]["fraction"]),
            "seed": int(cfg["seed"]),
            "dataset": cfg["data"]["dataset"],
            "multilabel": "roc_auc_macro" in {k.split("/", 1)[-1] for k in metrics},
            "labeled_images": len(split["labeled"]),
        }
        row.update(
            {
                k: (math.nan if v is None else v)
                for k, v in metrics.items()
                if k.startswith(("test/", "test_last/"))
            }
        )
        rows.append(row)
    if not rows:
        raise SemimedError(f"{experiment_dir}: no finished trial (no runs/*/metrics.json)")
    return pd.DataFrame(rows)


def _method_label(cfg: dict) -> str:
    label = cfg["method"]["name"]
    if cfg["model"].get("pretrained") or cfg["model"].get("pretrained_checkpoint"):
        label += "+pretrained"
    return label


def mean_ci(values: np.ndarray) -> tuple[float, float, float, float, int]:
    """(mean, std, ci95_low, ci95_high, n) of the finite values; CI from Student's t with n-1 dof."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan, math.nan, 0
    mean = float(values.mean())
    if n == 1:
        return mean, math.nan, math.nan, math.nan, 1
    std = float(values.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n))
    return mean, std, mean - half, mean + half, n


def summarize(trials: pd.DataFrame) -> pd.DataFrame:
    """Long form: method, label_fraction, metric, mean, std, ci95_low, ci95_high, n (+ paired diffs)."""
    multilabel = bool(trials["multilabel"].any())
    names = MULTI_LABEL_METRICS if multilabel else SINGLE_LABEL_METRICS
    rows = []
    for (method, fraction), group in trials.groupby(["method", "label_fraction"], sort=True):
        for prefix in ("test", "test_last"):
            for name in names:
                column = f"{prefix}/{name}"
                if column in group:
                    mean, std, low, high, n = mean_ci(group[column].to_numpy())
                    metric = name if prefix == "test" else f"{name}@last"
                    rows.append(
                        {
                            "method": method,
                            "label_fraction": fraction,
                            "metric": metric,
                            "mean": mean,
                            "std": std,
                            "ci95_low": low,
                            "ci95_high": high,
                            "n": n,
                        }
                    )
    control = trials[trials["method"] == CONTROL]
    for method in sorted(set(trials["method"]) - {CONTROL}):
        paired = trials[trials["method"] == method].merge(
            control, on=["label_fraction", "seed"], suffixes=("", "_ctl")
        )
        for fraction, group in paired.groupby("label_fraction"):
            for name in names:
                column = f"test/{name}"
                if column in group and f"{column}_ctl" in group:
                    diff = group[column].to_numpy(float) - group[f"{column}_ctl"].to_numpy(float)
                    mean, std, low, high, n = mean_ci(diff)
                    rows.append(
                        {
                            "method": method,
                            "label_fraction": fraction,
                            "metric": f"{name}-vs-{CONTROL}",
                            "mean": mean,
                            "std": std,
                            "ci95_low": low,
                            "ci95_high": high,
                            "n": n,
                        }
                    )
    return pd.DataFrame(rows)


def label_efficiency(summary: pd.DataFrame, metric: str) -> dict[str, str]:
    """Per method: the smallest fraction whose mean reaches 95% of the same method's full-label mean."""
    out = {}
    for method, group in summary[summary["metric"] == metric].groupby("method"):
        full = group[np.isclose(group["label_fraction"], 1.0)]
        if full.empty or not np.isfinite(full["mean"].iloc[0]):
            out[method] = "no full-label run"
            continue
        target = 0.95 * float(full["mean"].iloc[0])
        reached = group[group["mean"] >= target].sort_values("label_fraction")
        out[method] = f"{reached['label_fraction'].iloc[0]:g}" if not reached.empty else "not reached"
    return out


def _cell(row: pd.Series) -> str:
    if not np.isfinite(row["mean"]):
        return "–"
    if row["n"] < 2:
        return f"{row['mean']:.3f} (n=1)"
    return (
        f"{row['mean']:.3f} ± {row['std']:.3f} [{row['ci95_low']:.3f}, {row['ci95_high']:.3f}] n={row['n']}"
    )


def markdown(summary: pd.DataFrame, primary: list[str], experiment_dir: Path, extra: str = "") -> str:
    lines = [
        f"# semimed report: {experiment_dir.name}",
        "",
        f"Experiment directory: `{experiment_dir}`",
        "",
        "Cells: mean ± std [95% CI] n over seeds, test set, checkpoint selected on val "
        "(`@last`: the last checkpoint).",
        "",
    ]
    for metric in primary + [f"{m}@last" for m in primary[:1]] + [f"{m}-vs-{CONTROL}" for m in primary[:1]]:
        table = summary[summary["metric"] == metric]
        if table.empty:
            continue
        fractions = sorted(table["label_fraction"].unique())
        lines += [
            f"## {metric}",
            "",
            "| method | " + " | ".join(f"{f:g}" for f in fractions) + " |",
            "|---|" + "---|" * len(fractions),
        ]
        for method, group in table.groupby("method"):
            cells = {row["label_fraction"]: _cell(row) for _, row in group.iterrows()}
            lines.append(f"| {method} | " + " | ".join(cells.get(f, "") for f in fractions) + " |")
        lines.append("")
    efficiency = label_efficiency(summary, primary[0])
    lines += [
        f"## Label efficiency ({primary[0]})",
        "",
        "Smallest label fraction whose mean reaches 95% of the same method's full-label mean.",
        "",
        "| method | fraction |",
        "|---|---|",
    ]
    lines += [f"| {m} | {v} |" for m, v in efficiency.items()]
    return "\n".join(lines + ["", extra]).rstrip() + "\n"


def plot(summary: pd.DataFrame, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4), dpi=120)
    for method, group in summary[summary["metric"] == metric].groupby("method"):
        group = group.sort_values("label_fraction")
        axis.plot(group["label_fraction"], group["mean"], marker="o", label=method)
        axis.fill_between(group["label_fraction"], group["ci95_low"], group["ci95_high"], alpha=0.2)
    axis.set_xscale("log")
    axis.set_xlabel("label fraction (log scale)")
    axis.set_ylabel(f"test {metric}")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    tmp.replace(path)


# Published anchors (STUDY_PROTOCOL rule 10): MedMNIST v2 (Yang et al., Sci Data 2023, Table 3), ResNet-18 (28).
# Key: (MedMNIST flag from data.root's file name, model.backbone, data.image_size) of a full-label supervised run.
PUBLISHED: dict[tuple[str, str, int], dict[str, float]] = {
    ("breastmnist", "resnet18_28", 28): {"roc_auc": 0.901, "accuracy": 0.863},
    ("pneumoniamnist", "resnet18_28", 28): {"roc_auc": 0.944, "accuracy": 0.854},
}
PUBLISHED_SOURCE = "MedMNIST v2 (Yang et al., Sci Data 2023), ResNet-18 (28)"


def published_comparison(experiment_dir: Path) -> str:
    """Markdown: our test AUC/ACC beside the published row, when the trials reproduce a known benchmark."""
    from semimed.data.medmnist import medmnist_flag, medmnist_size

    found: dict[tuple[str, str, int], list[dict]] = {}
    for config_path in sorted(Path(experiment_dir).glob("runs/*/config.yaml")):
        metrics_path = config_path.with_name("metrics.json")
        if not metrics_path.is_file():
            continue
        cfg = yaml.safe_load(config_path.read_text()) or {}
        data, model = cfg.get("data", {}), cfg.get("model", {})
        if (
            data.get("dataset") != "medmnist"
            or float(data.get("fraction", 0)) != 1.0
            or cfg.get("method", {}).get("name") != CONTROL
            or model.get("pretrained")
            or model.get("pretrained_checkpoint")
        ):
            continue
        key = (
            medmnist_flag(data.get("root", "")),
            str(model.get("backbone")),
            int(data.get("image_size", 0)),
        )
        if key in PUBLISHED and medmnist_size(data.get("root", "")) == key[2]:  # not a resized MedMNIST+ file
            found.setdefault(key, []).append(json.loads(metrics_path.read_text()))
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
                values = np.array([r.get(f"{prefix}/{metric}") for r in runs], dtype=float)
                mean, std, _, _, n = mean_ci(values)
                cells.append((mean, f"{mean:.3f} ± {std:.3f} (n={n})" if n > 1 else f"{mean:.3f} (n={n})"))
            lines.append(
                f"| {metric} | {published:.3f} | {cells[0][1]} | {cells[1][1]} | "
                f"{cells[0][0] - published:+.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


def write_report(experiment_dir: str | Path) -> tuple[pd.DataFrame, str]:
    """Write report.csv, report.md and report.png into the experiment directory; return (summary, markdown)."""
    experiment_dir = Path(experiment_dir).resolve()
    trials = collect_trials(experiment_dir)
    summary = summarize(trials)
    multilabel = bool(trials["multilabel"].any())
    primary = ["roc_auc", "average_precision"] if multilabel else ["balanced_accuracy", "accuracy", "roc_auc"]
    if not multilabel and trials["dataset"].eq("breakhis").any():
        primary.append("patient_accuracy")
    text = markdown(summary, primary, experiment_dir, extra=published_comparison(experiment_dir))
    atomic_write_text(experiment_dir / "report.csv", summary.to_csv(index=False))
    atomic_write_text(experiment_dir / "report.md", text)
    plot(summary, primary[0] if multilabel else "balanced_accuracy", experiment_dir / "report.png")
    return summary, text
