"""The tables a field expects, appended to report.md for the studies they fit:

- ChestX-ray14 (any multi-label study): per-finding test ROC-AUC in CheXNet's layout (Rajpurkar et al. 2017,
  Table 1): one row per finding, one column per arm × label fraction (mean over seeds), then the mean of the
  rows and the macro AUC (`test/roc_auc_macro`, which skips a finding without positives in a seed's test set).
  CheXNet's published column is shown beside a full-label, ImageNet-pretrained DenseNet-121 supervised arm at
  224 px only — and marked as not the same test set: CheXNet used its own random 70/10/20 patient split, not
  the official `test_list.txt` that semimed evaluates on, so the difference is indicative, not a paired test.
- BreakHis: image-level and patient-level test accuracy per magnification (Spanhol et al. 2016, Table 3's
  layout: rows = methods, columns = 40X, 100X, 200X, 400X), mean ± std over seeds, computed from each trial's
  predictions.parquet (the argmax of its scores at the reported checkpoint). Patient-level accuracy is Spanhol
  et al.'s patient score: the mean over patients of each patient's image accuracy (semimed.metrics).
  No published BreakHis numbers are printed: the commonly quoted 84.6–90.0% patient-level range has not been
  checked against the paper here.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pandas as pd

from semimed.report.trials import Study, Trial, show

# CheXNet (Rajpurkar et al. 2017, arXiv:1711.05225 v3, Table 1): test AUROC per pathology, mean 0.8414.
CHEXNET = {
    "Atelectasis": 0.8094,
    "Cardiomegaly": 0.9248,
    "Effusion": 0.8638,
    "Infiltration": 0.7345,
    "Mass": 0.8676,
    "Nodule": 0.7802,
    "Pneumonia": 0.7680,
    "Pneumothorax": 0.8887,
    "Consolidation": 0.7901,
    "Edema": 0.8878,
    "Emphysema": 0.9371,
    "Fibrosis": 0.8047,
    "Pleural_Thickening": 0.8062,
    "Hernia": 0.9164,
}
CHEXNET_SOURCE = (
    "CheXNet (Rajpurkar et al. 2017, Table 1): DenseNet-121, ImageNet-pretrained, 224 px, all labels, on its own "
    "random 70/10/20 patient split, not the official test_list.txt: a different test set, so the difference is "
    "indicative only"
)
MAGNIFICATIONS = (40, 100, 200, 400)


def field_tables(studies: list[Study]) -> str:
    """Markdown sections for the studies these tables fit ("" when none does)."""
    parts = []
    for study in studies:
        dataset = study.data.get("data.dataset")
        if study.multilabel:
            parts.append(per_finding_auc(study, chexnet=dataset == "chestxray14"))
        elif dataset == "breakhis":
            parts.append(per_magnification(study))
    return "\n".join(p for p in parts if p)


def _columns(study: Study) -> list[tuple[str, float, list[Trial]]]:
    return [
        (arm, fraction, [t for t in trials if t.fraction == fraction])
        for arm, trials in study.arms.items()
        for fraction in study.fractions
        if any(t.fraction == fraction for t in trials)
    ]


def _mean(values: list[float]) -> float:
    values = [v for v in values if math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def _chexnet_comparable(trials: list[Trial], fraction: float) -> bool:
    first = trials[0].keys
    return (
        fraction == 1.0
        and first.get("method.name") == "supervised"
        and first.get("model.backbone") == "densenet121"
        and bool(first.get("model.pretrained"))
        and int(first.get("data.image_size", 0)) == 224
    )


def per_finding_auc(study: Study, chexnet: bool = False) -> str:
    """Rows = findings, columns = arm @ fraction, cells = mean test ROC-AUC over seeds."""
    columns = _columns(study)
    findings: list[str] = []
    for _, _, trials in columns:
        for trial in trials:
            for key in trial.metrics:
                name = key.removeprefix("test/roc_auc/")
                if key.startswith("test/roc_auc/") and name not in findings:
                    findings.append(name)
    if not findings:
        return ""
    comparable = chexnet and any(_chexnet_comparable(t, f) for _, f, t in columns)
    head = ["finding"] + [f"{arm} @ {fraction:g}" for arm, fraction, _ in columns]
    head += ["CheXNet 2017 ¹"] if comparable else []
    lines = [
        f"## Per-finding test ROC-AUC: {study.label}",
        "",
        "CheXNet's layout: mean over seeds (n = seeds per column: "
        + ", ".join(sorted({str(len(t)) for _, _, t in columns}))
        + "). `mean` = mean of the rows; `macro` = test/roc_auc_macro averaged over seeds.",
        "",
        "| " + " | ".join(head) + " |",
        "|---" * len(head) + "|",
    ]
    cells = {
        finding: [_mean([t.value(f"test/roc_auc/{finding}") for t in trials]) for _, _, trials in columns]
        for finding in findings
    }
    for finding in findings:
        row = [finding] + [f"{v:.3f}" if math.isfinite(v) else "–" for v in cells[finding]]
        row += [f"{CHEXNET[finding]:.3f}" if finding in CHEXNET else "–"] if comparable else []
        lines.append("| " + " | ".join(row) + " |")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a column of NaN: its mean is NaN, shown as –
        means = np.nanmean(np.array([cells[f] for f in findings], dtype=float), axis=0)
    macro = [_mean([t.value("test/roc_auc_macro") for t in trials]) for _, _, trials in columns]
    for name, values, published in (
        ("**mean**", means, np.mean([CHEXNET[f] for f in findings if f in CHEXNET]) if comparable else None),
        ("**macro**", macro, None),
    ):
        row = [name] + [f"{v:.3f}" if math.isfinite(v) else "–" for v in values]
        row += ([f"{published:.3f}"] if published is not None else ["–"]) if comparable else []
        lines.append("| " + " | ".join(row) + " |")
    if comparable:
        lines += ["", f"¹ {CHEXNET_SOURCE}."]
    return "\n".join(lines + [""])


def magnification_of(path: str) -> int | None:
    """40, 100, 200 or 400 from a BreakHis image path (its `<mag>X/` folder or `-<mag>-<seq>.png` name)."""
    match = re.search(r"(?:^|/)(40|100|200|400)X/", path) or re.search(r"-(40|100|200|400)-\d+\.png$", path)
    return int(match.group(1)) if match else None


def _accuracies(trial: Trial) -> dict[int, tuple[float, float]] | None:
    """{magnification: (image accuracy, patient accuracy)} on the trial's test rows, or None."""
    from semimed.metrics.core import patient_accuracy

    path = trial.path / "predictions.parquet"
    if not path.is_file():
        return None
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError):
        return None
    test = frame[frame["split"] == "test"]
    scores = [c for c in test.columns if c.startswith("score/")]
    if test.empty or not scores or "label" not in test:
        return None
    correct = test[scores].to_numpy().argmax(axis=1) == test["label"].to_numpy()
    mags = test["path"].astype(str).map(magnification_of).to_numpy()
    out = {}
    for mag in MAGNIFICATIONS:
        rows = mags == mag
        if rows.any():
            patients = test["patient_id"].astype(str).to_numpy()[rows]
            out[mag] = (float(correct[rows].mean()), patient_accuracy(correct[rows], patients))
    return out


def per_magnification(study: Study) -> str:
    """Image- and patient-level test accuracy per magnification, one row per arm @ fraction."""
    columns = _columns(study)
    found = {t.name: _accuracies(t) for _, _, trials in columns for t in trials}
    mags = [m for m in MAGNIFICATIONS if any(m in (a or {}) for a in found.values())]
    if not mags:
        return ""
    missing = sorted(name for name, a in found.items() if a is None)
    lines = [f"## Accuracy per magnification: {study.label}", ""]
    lines.append(
        "Spanhol et al. (2016)'s layout: test accuracy at the reported checkpoint, mean ± std over seeds (n), "
        "image level (share of images right) and patient level (mean over patients of their image accuracy)."
    )
    task = study.data.get("data.task")
    if task is not None:
        lines[-1] += f" Task: {show(_json(task))}."
    for level, index in (("Image-level", 0), ("Patient-level", 1)):
        head = ["arm @ fraction"] + [f"{m}X" for m in mags]
        lines += ["", f"### {level} accuracy", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for arm, fraction, trials in columns:
            row = [f"{arm} @ {fraction:g}"]
            for mag in mags:
                values = [found[t.name][mag][index] for t in trials if found[t.name] and mag in found[t.name]]
                if not values:
                    row.append("–")
                    continue
                std = f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else ""
                row.append(f"{np.mean(values):.3f}{std} (n={len(values)})")
            lines.append("| " + " | ".join(row) + " |")
    if missing:
        lines += ["", f"Without predictions.parquet (left out): {', '.join(missing)}."]
    return "\n".join(lines + [""])


def _json(value) -> str:
    import json

    return json.dumps(value, sort_keys=True, default=str)
