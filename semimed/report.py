"""Trials -> tables (CSV, Markdown) and a metric-vs-label-fraction plot (PNG). Pure files in, files out: it reads
`<experiment>/runs/*/{config.yaml,metrics.json,split.json,predictions.parquet}` and needs no Ray.

What is averaged with what (the flattened result keys of each trial's config, semimed.config.result_keys):
- A *study* is the trials that share every `data.*` key except `data.fraction` and `data.split_seed`: the same
  dataset, task, files, options, image size and split/validation protocol, hence the same kind of test set.
  Studies get separate sections and are never averaged or compared; a note names the keys that differ.
- An *arm* is the trials of a study that share every other result key (method, its params, model, training)
  except `seed`; a *cell* is an arm at one label fraction, its trials are its seeds. Arms are never merged: an
  arm's label is its method plus the keys that vary between the study's arms (`fixmatch(threshold=0.9)`).
- The *matched control* of an arm is the plain `supervised` arm (no method params, no pretraining) whose result
  keys equal the arm's except the method-side ones (`method.*`, `model.pretrained*`, `train.unlabeled_ratio`).

Statistics (semimed.stats): the mean and sample std over seeds of each seed's metric (metrics.json); a 95%
bootstrap interval over seeds and, with per-image predictions, over test patients; for each arm with a matched
control, the paired bootstrap of the difference on the seeds both have, resampling the same patients for both,
and its verdict.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from semimed import stats
from semimed.config import config_from_dict, result_keys
from semimed.errors import SemimedError
from semimed.files import atomic_write_text, publish, staging_path

SINGLE_LABEL_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity", "f1_macro")
SINGLE_LABEL_METRICS += ("average_precision", "patient_accuracy")
MULTI_LABEL_METRICS = ("roc_auc", "average_precision", "subset_accuracy", "sensitivity_macro")
MULTI_LABEL_METRICS += ("specificity_macro",)
CONTROL = "supervised"
# What varies inside a cell (its seeds) or between an arm's cells (fractions).
NOT_A_CELL_KEY = ("seed", "data.split_seed", "data.fraction")
METHOD_SIDE = ("model.pretrained", "model.pretrained_checkpoint", "train.unlabeled_ratio")
COLUMNS = ["study", "arm", "method", "label_fraction", "metric", "mean", "std", "ci95_low", "ci95_high", "n"]
COLUMNS += ["ci_method", "checkpoint", "control", "verdict"]
ABSENT = '"(absent)"'
LEGEND = (
    "Cells: mean ± std over seeds [95% bootstrap interval] n = seeds. The interval resamples seeds and, within a "
    "seed, the test set's patients (per-image predictions); it stays inside the metric's range. ‡ the interval "
    "resamples seeds only (no per-image predictions). † fewer than 3 seeds: the interval understates the "
    "seed-to-seed spread. (last: …) the last checkpoint's mean, beside numbers from a checkpoint selected on val. "
    "Paired differences: arm − matched control (plain supervised, otherwise the same settings) on the seeds both "
    "have, with the same resampled patients for both; better / worse when the interval excludes 0."
)
EFFICIENCY = "Smallest label fraction whose mean reaches 95% of the same arm's full-label mean."


def primary_metrics(data_keys: dict[str, Any], multilabel: bool) -> list[str]:
    """The metrics a study's tables show, the first one plotted: the one place that knows which fit a task."""
    if multilabel:
        return ["roc_auc", "average_precision"]
    primary = ["balanced_accuracy", "accuracy", "roc_auc"]
    if data_keys.get("data.dataset") == "breakhis":
        primary.append("patient_accuracy")  # Spanhol et al.'s patient-level score
    return primary


@dataclass
class Trial:
    name: str
    path: Path
    keys: dict[str, Any]  # flattened result keys of its config
    metrics: dict[str, Any]

    def __post_init__(self) -> None:
        self.seed = int(self.keys.get("seed") or 0)
        self.fraction = float(self.keys.get("data.fraction", math.nan))
        split_seed = self.keys.get("data.split_seed")
        # What tells the seeds of a cell apart (and pairs an arm's seed with its control's).
        self.replicate = (self.seed, self.seed if split_seed is None else int(split_seed))
        self.multilabel = any(k.endswith("roc_auc_macro") for k in self.metrics)
        # "selected" (on val) or "last"; runs older than the reported_checkpoint key: "selected" iff the
        # selected step is not the last one.
        kind, m = self.metrics.get("reported_checkpoint"), self.metrics
        if kind is None and m.get("selected_step") is not None and m.get("step") is not None:
            kind = "selected" if m["selected_step"] != m["step"] else "last"
        self.checkpoint = str(kind or "unknown")

    def value(self, column: str) -> float:
        value = self.metrics.get(column)
        return math.nan if value is None else float(value)


@dataclass
class TrialSet:
    trials: list[Trial]
    unfinished: list[str] = field(default_factory=list)  # trial folders without metrics.json
    skipped: list[str] = field(default_factory=list)  # "trial: why" for unreadable files


def _warn(message: str) -> None:
    warnings.warn(f"semimed report: {message}", RuntimeWarning, stacklevel=3)


def collect_trials(experiment_dir: str | Path) -> TrialSet:
    """Every trial folder under `runs/`: finished ones read, unfinished ones named, unreadable ones skipped
    (each with a warning that names it). No finished trial at all is an error."""
    experiment_dir = Path(experiment_dir)
    if not experiment_dir.is_dir():
        raise SemimedError(f"{experiment_dir}: experiment directory not found")
    out = TrialSet([])
    for folder in sorted(p for p in experiment_dir.glob("runs/*") if p.is_dir() and p.name[0] != "."):
        if not (folder / "metrics.json").is_file():
            out.unfinished.append(folder.name)
            continue
        try:
            metrics = json.loads((folder / "metrics.json").read_text())
            raw = yaml.safe_load((folder / "config.yaml").read_text())
            if not isinstance(metrics, dict) or not isinstance(raw, dict):
                raise ValueError("not a mapping")
        except (OSError, ValueError, yaml.YAMLError) as exc:
            out.skipped.append(
                f"{folder.name}: unreadable metrics.json or config.yaml ({str(exc).splitlines()[0]})"
            )
            _warn(f"skipping trial {out.skipped[-1]}")
            continue
        try:  # today's schema with its defaults, so that trials written before a key existed still match
            raw = config_from_dict(raw).to_dict()
        except (SemimedError, TypeError, ValueError):
            pass
        out.trials.append(Trial(folder.name, folder, result_keys(raw), metrics))
    if not out.trials:
        unfinished = f"; unfinished: {', '.join(out.unfinished)}" if out.unfinished else ""
        skipped = f"; skipped: {'; '.join(out.skipped)}" if out.skipped else ""
        raise SemimedError(
            f"{experiment_dir}: no finished trial (no runs/*/metrics.json){unfinished}{skipped}"
        )
    return out


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _show(canon: str) -> str:
    value = json.loads(canon)
    return (
        f"{value:g}"
        if isinstance(value, float)
        else json.dumps(value)
        if isinstance(value, bool)
        else str(value)
    )


def _keys(trial: Trial, data: bool) -> dict[str, str]:
    """The trial's study keys (data=True) or arm keys (data=False), values canonical JSON."""
    items = trial.keys.items()
    return {k: _canon(v) for k, v in items if k.startswith("data.") == data and k not in NOT_A_CELL_KEY}


def _method_side(key: str) -> bool:
    return key.startswith("method.") or key in METHOD_SIDE


def _varying(dicts: list[dict[str, str]]) -> list[str]:
    """Keys whose value (or presence) differs between the dicts."""
    return [k for k in sorted(set().union(*dicts)) if len({d.get(k, ABSENT) for d in dicts}) > 1]


def _arm_labels(arms: list[dict[str, str]]) -> list[str]:
    """Readable, unique labels: method (+pretrained) and the keys that vary between the arms; method-side keys
    only where they vary between arms of the same method."""
    varying = _varying(arms)
    short = {k: k.rsplit(".", 1)[-1] for k in varying}
    short = {k: s if list(short.values()).count(s) == 1 else k for k, s in short.items()}

    def label(arm: dict[str, str], everything: bool) -> str:
        name = json.loads(arm.get("method.name", '"?"')) + ("" if _plain(arm) else "+pretrained")
        same = [a for a in arms if a.get("method.name") == arm.get("method.name")]
        shown = [
            f"{k if everything else short[k]}={_show(arm[k])}"
            for k in varying
            if k in arm and arm[k] != "{}" and k not in ("method.name", "model.pretrained")
            if everything or not _method_side(k) or len({a.get(k) for a in same}) > 1
        ]
        return name + (f"({', '.join(shown)})" if shown else "")

    labels = [label(a, False) for a in arms]
    return labels if len(set(labels)) == len(labels) else [label(a, True) for a in arms]


def _plain(arm: dict[str, str]) -> bool:
    return (
        arm.get("model.pretrained", "false") == "false"
        and arm.get("model.pretrained_checkpoint", '""') == '""'
    )


def _is_control(arm: dict[str, str]) -> bool:
    params = any(k.startswith("method.params.") for k in arm)
    return arm.get("method.name") == _canon(CONTROL) and not params and _plain(arm)


@dataclass
class Study:
    label: str
    data: dict[str, Any]  # its data keys
    multilabel: bool
    arms: dict[str, list[Trial]]  # arm label -> trials, controls first
    control: dict[str, str | None]  # arm label -> its matched control's label (None: no matched control)

    @property
    def fractions(self) -> list[float]:
        return sorted({t.fraction for trials in self.arms.values() for t in trials})


def _matched_controls(arms: dict[str, dict[str, str]]) -> dict[str, str | None]:
    """Each non-control arm -> the control arm with the same non-method-side keys (the same unlabeled_ratio
    preferred), or None."""
    out = {}
    for label, arm in arms.items():
        if _is_control(arm):
            continue
        same = {k: v for k, v in arm.items() if not _method_side(k)}
        found = [
            c
            for c, a in arms.items()
            if _is_control(a) and {k: v for k, v in a.items() if not _method_side(k)} == same
        ]
        ratio = [c for c in found if arms[c].get("train.unlabeled_ratio") == arm.get("train.unlabeled_ratio")]
        out[label] = (ratio or found or [None])[0]
    return out


def _study_labels(studies: list[dict[str, str]], differ: list[str]) -> list[str]:
    """The fewest differing keys (dataset, task, root first) that tell the studies apart, e.g. `dataset=breakhis`."""
    differ = sorted(
        differ, key=lambda k: (k not in ("data.dataset", "data.task", "data.root"), differ.index(k))
    )
    for count in range(1, len(differ) + 1):
        labels = [
            ", ".join(f"{k.removeprefix('data.')}={_show(s[k])}" for k in differ[:count] if k in s)
            for s in studies
        ]
        if len(set(labels)) == len(labels) and all(labels):
            return labels
    return [f"study {i}" for i in range(1, len(studies) + 1)]


def group_studies(trials: list[Trial]) -> tuple[list[Study], str]:
    """Studies (see the module docstring) and a one-line note on what differs between them ("" for one)."""
    by_study: dict[tuple, list[Trial]] = {}
    for trial in trials:
        by_study.setdefault(tuple(_keys(trial, data=True).items()), []).append(trial)
    differ = _varying([dict(k) for k in by_study])
    note = ""
    if len(by_study) > 1:
        common = [k for k in differ if all(k in dict(s) for s in by_study)]  # not dataset-specific options
        parts = [
            f"{k}: " + " vs ".join(sorted({_show(dict(s).get(k, ABSENT)) for s in by_study}))
            for k in common or differ
        ]
        note = f"{len(by_study)} studies, reported separately and never averaged or compared: " + "; ".join(
            parts
        )
    labels = _study_labels([dict(k) for k in by_study], differ)
    studies = []
    for index, (key, members) in enumerate(by_study.items(), 1):
        by_arm: dict[tuple, list[Trial]] = {}
        for trial in members:
            by_arm.setdefault(tuple(_keys(trial, data=False).items()), []).append(trial)
        arm_keys = dict(zip(_arm_labels([dict(k) for k in by_arm]), by_arm, strict=True))
        order = sorted(arm_keys, key=lambda label: (not _is_control(dict(arm_keys[label])), label))
        arms = {label: by_arm[arm_keys[label]] for label in order}
        control = _matched_controls({label: dict(arm_keys[label]) for label in order})
        label = labels[index - 1] if len(by_study) > 1 else _show(dict(key).get("data.dataset", '"all"'))
        data = {k: json.loads(v) for k, v in key}
        studies.append(Study(label, data, any(t.multilabel for t in members), arms, control))
    return sorted(studies, key=lambda s: s.label), note


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
        pred = stats.Predictions.read(path)
        if pred.multilabel != trial.multilabel:
            raise SemimedError("its labels are not of the run's task type")
    except (OSError, ValueError, KeyError) as exc:  # SemimedError and pyarrow's errors derive from these
        _warn(f"trial {trial.name}: predictions.parquet unusable ({exc}); its intervals resample seeds only")
        return None
    for metric, value in stats.point_metrics(pred, wanted).items():
        if abs(value - trial.value(f"test/{metric}")) > 1e-6:
            _warn(
                f"trial {trial.name}: test/{metric} {trial.value(f'test/{metric}'):.6f} in metrics.json, {value:.6f} "
                "from predictions.parquet"
            )
    return stats.Replicates.of(pred, wanted, [seed, *trial.replicate], n_boot)


def _by_seed(trials: list[Trial]) -> dict[tuple[int, int], Trial]:
    out: dict[tuple[int, int], Trial] = {}
    for trial in sorted(trials, key=lambda t: t.name):
        if trial.replicate in out:
            _warn(
                f"trials {out[trial.replicate].name} and {trial.name} are the same cell and seed; using the first"
            )
        out.setdefault(trial.replicate, trial)
    return out


def summarize(studies: list[Study], n_boot: int = stats.N_BOOT, seed: int = 0) -> pd.DataFrame:
    """Long form, one row per study × arm × fraction × metric (COLUMNS): `<metric>` at the reported checkpoint,
    `<metric>@last`, and `<metric>-vs-control` (the paired difference to the matched control, with a verdict)."""
    rows = []
    for study in studies:
        names = MULTI_LABEL_METRICS if study.multilabel else SINGLE_LABEL_METRICS
        names = [m for m in names if any(f"test/{m}" in t.metrics for ts in study.arms.values() for t in ts)]
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
                }
                # Predictions are at the reported checkpoint: they resample the @last numbers only if that is last.
                last_only = all(t.checkpoint == "last" for t in cell.values())
                for metric in names:
                    for prefix, suffix in (("test", ""), ("test_last", "@last")):
                        kept = [t for t in cell.values() if np.isfinite(t.value(f"{prefix}/{metric}"))]
                        boot = (
                            stats.stack([reps[t.name] for t in kept], metric)
                            if not suffix or last_only
                            else None
                        )
                        row = stats.summary([t.value(f"{prefix}/{metric}") for t in kept], boot, n_boot, seed)
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
        row = stats.summary([a.value(col) - c.value(col) for a, c in kept], boot, n_boot, seed)
        row["verdict"] = stats.verdict(row["ci95_low"], row["ci95_high"], row["n"]) if row["n"] else ""
        rows.append({**base, "metric": f"{metric}-vs-control", **row})
    return rows


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


def markdown(summary: pd.DataFrame, studies: list[Study], trials: TrialSet, note: str, folder: Path) -> str:
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
    lines += ["", note, ""] if note else [""]
    lines += [LEGEND, ""]
    for study in studies:
        primary = primary_metrics(study.data, study.multilabel)
        table = summary[summary["study"] == study.label]
        data = ", ".join(f"{k.removeprefix('data.')}={_show(_canon(v))}" for k, v in study.data.items())
        lines += [f"## Study: {study.label}", "", f"Data: {data}", ""]
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


def plot(summary: pd.DataFrame, studies: list[Study], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = figure(summary, studies)
    staging = staging_path(path)
    try:
        fig.savefig(staging, format="png")
    finally:
        plt.close(fig)
    return publish(staging, path)


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
        full_label_control = trial.fraction == 1.0 and _is_control(_keys(trial, data=False))
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
    plot(summary, studies, experiment_dir / "report.png")
    return summary, text
