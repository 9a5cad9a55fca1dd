"""`semimed report`: statistics over seeds against scipy, label efficiency, the paired difference to the
supervised control, and the files it writes — on a hand-built experiment folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from semimed.cli import main
from semimed.errors import SemimedError
from semimed.report import label_efficiency, mean_ci, summarize, write_report

# (method, fraction) -> balanced accuracy per seed 0, 1, 2
VALUES = {
    ("supervised", 0.05): [0.60, 0.64, 0.62],
    ("supervised", 0.25): [0.74, 0.78, 0.76],
    ("supervised", 1.0): [0.80, 0.82, 0.84],
    ("fixmatch", 0.05): [0.66, 0.69, 0.66],
    ("fixmatch", 0.25): [0.79, 0.80, 0.81],
    ("fixmatch", 1.0): [0.81, 0.83, 0.85],
}


def make_experiment(root: Path) -> Path:
    for (method, fraction), values in VALUES.items():
        for seed, value in enumerate(values):
            run = root / "runs" / f"{method}_{fraction}_{seed}"
            run.mkdir(parents=True)
            cfg = {
                "seed": seed,
                "data": {"dataset": "breakhis", "fraction": fraction},
                "method": {"name": method},
                "model": {"backbone": "small_cnn", "pretrained": False},
            }
            (run / "config.yaml").write_text(yaml.safe_dump(cfg))
            (run / "split.json").write_text(json.dumps({"labeled": ["a"] * int(100 * fraction)}))
            metrics = {
                "step": 100,
                "test/balanced_accuracy": value,
                "test/accuracy": value + 0.01,
                "test/roc_auc": value + 0.1,
                "test/patient_accuracy": value,
                "test_last/balanced_accuracy": value - 0.01,
                "test/roc_auc/benign": 0.5,
            }
            (run / "metrics.json").write_text(json.dumps(metrics))
    (root / "runs" / "unfinished_trial").mkdir()  # no metrics.json: ignored
    return root


def test_mean_ci_matches_scipy_t_interval():
    values = np.array([0.60, 0.64, 0.62, 0.70])
    mean, std, low, high, n = mean_ci(values)
    expected = stats.t.interval(0.95, 3, loc=values.mean(), scale=stats.sem(values))
    assert (mean, std, n) == (pytest.approx(values.mean()), pytest.approx(values.std(ddof=1)), 4)
    assert (low, high) == (pytest.approx(expected[0]), pytest.approx(expected[1]))
    assert mean_ci(np.array([0.5, np.nan]))[4] == 1 and np.isnan(mean_ci(np.array([0.5]))[1])


def test_summary_statistics_and_paired_difference(tmp_path):
    from semimed.report import collect_trials

    summary = summarize(collect_trials(make_experiment(tmp_path)))
    row = summary[
        (summary.method == "fixmatch")
        & (summary.label_fraction == 0.05)
        & (summary.metric == "balanced_accuracy")
    ].iloc[0]
    assert row["mean"] == pytest.approx(np.mean([0.66, 0.69, 0.66])) and row["n"] == 3
    assert row["std"] == pytest.approx(np.std([0.66, 0.69, 0.66], ddof=1))
    # paired by seed: (0.66-0.60, 0.69-0.64, 0.66-0.62) = (0.06, 0.05, 0.04)
    diff = summary[
        (summary.method == "fixmatch")
        & (summary.label_fraction == 0.05)
        & (summary.metric == "balanced_accuracy-vs-supervised")
    ].iloc[0]
    low, high = stats.t.interval(0.95, 2, loc=0.05, scale=stats.sem([0.06, 0.05, 0.04]))
    assert diff["mean"] == pytest.approx(0.05) and diff["n"] == 3
    assert (diff["ci95_low"], diff["ci95_high"]) == (pytest.approx(low), pytest.approx(high))
    last = summary[
        (summary.method == "supervised")
        & (summary.label_fraction == 1.0)
        & (summary.metric == "balanced_accuracy@last")
    ].iloc[0]
    assert last["mean"] == pytest.approx(0.81)


def test_label_efficiency():
    summary = pd.DataFrame(
        [
            {"method": "a", "label_fraction": f, "metric": "m", "mean": v}
            for f, v in ((0.01, 0.5), (0.1, 0.77), (0.5, 0.79), (1.0, 0.8))
        ]
        + [
            {"method": "b", "label_fraction": f, "metric": "m", "mean": v}
            for f, v in ((0.1, 0.5), (1.0, 0.9))
        ]
        + [{"method": "c", "label_fraction": 0.1, "metric": "m", "mean": 0.5}]
    )
    # a: 95% of 0.80 = 0.76 -> first reached at 0.1; b: 0.855 never reached below 1.0 -> 1; c: no full run
    assert label_efficiency(summary, "m") == {"a": "0.1", "b": "1", "c": "no full-label run"}


def test_write_report_files_and_cli(tmp_path, capsys):
    experiment = make_experiment(tmp_path / "exp")
    assert main(["report", str(experiment)]) == 0
    printed = capsys.readouterr().out
    csv = pd.read_csv(experiment / "report.csv")
    assert {"method", "label_fraction", "metric", "mean", "std", "ci95_low", "ci95_high", "n"} <= set(
        csv.columns
    )
    assert set(csv.label_fraction) == {0.05, 0.25, 1.0}
    text = (experiment / "report.md").read_text()
    assert "## balanced_accuracy" in text and "## patient_accuracy" in text and str(experiment) in text
    assert "| supervised | 0.620 ± 0.020" in text
    assert "## Label efficiency (balanced_accuracy)" in text
    assert (experiment / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## balanced_accuracy" in printed


def test_report_errors_name_the_folder(tmp_path):
    with pytest.raises(SemimedError, match="experiment directory not found"):
        write_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SemimedError, match=r"no finished trial \(no runs/\*/metrics.json\)"):
        write_report(tmp_path / "empty")
