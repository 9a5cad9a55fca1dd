"""`semimed report`: which trials are averaged or compared with which (studies, arms, matched controls), what
happens to unfinished and unreadable trials, bootstrap intervals inside the metric's range, paired verdicts, the
weighted metrics behind the bootstrap (against scikit-learn with repeated rows), the plot and the files' modes.

Experiments are built by `write_trial`: a real `Config.save`, a split.json, predictions.parquet and the
metrics.json that semimed.metrics computes from those predictions."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, average_precision_score, balanced_accuracy_score, roc_auc_score

from semimed.cli import main
from semimed.config import Config, DataConfig, MethodConfig, ModelConfig, PretrainConfig
from semimed.errors import SemimedError
from semimed.metrics import multilabel_metrics, single_label_metrics
from semimed.report import write_report

# The regression tests use only `write_report`, the CLI and the files, so that they run (and fail) on the code
# before the report was rewritten; the others import the new functions where they need them.

CLASSES = ["benign", "malignant"]
FINDINGS = ["Mass", "Nodule", "Effusion"]


def make_test_frame(n_patients: int = 30, per_patient: int = 4, multilabel: bool = False) -> pd.DataFrame:
    """The same test images for every trial: patient i has `per_patient` images and one label (single-label:
    class i % 2; multi-label: finding j present when (i + j) % 3 == 0, Nodule unknown for every fifth patient)."""
    patient = np.repeat(np.arange(n_patients), per_patient)
    frame = pd.DataFrame({"split": "test", "row": np.arange(len(patient)) + 1000, "path": "x.png"})
    frame["patient_id"] = [f"patient{p:03d}" for p in patient]
    if multilabel:
        for j, finding in enumerate(FINDINGS):
            label = ((patient + j) % 3 == 0).astype(np.float32)
            frame[f"label/{finding}"] = np.where((patient % 5 == 0) & (j == 1), np.nan, label)
    else:
        frame["label"] = patient % 2
    return frame


def write_trial(
    root: Path,
    name: str,
    *,
    method: str = "supervised",
    params: dict | None = None,
    seed: int = 0,
    fraction: float = 0.1,
    skill: float = 1.0,
    noise: int = 0,
    data: dict | None = None,
    model: dict | None = None,
    pretrain: dict | None = None,
    predictions: bool = True,
    checkpoint: tuple[str, int] = ("selected", 300),
    n_patients: int = 30,
) -> Path:
    """One finished trial whose scores separate the classes with strength `skill` (0: chance), noise drawn
    from (seed, noise): two trials with equal skill, seed and noise have identical predictions."""
    data = {"dataset": "breakhis", **(data or {})}
    cfg = Config(
        seed=seed,
        data=DataConfig(fraction=fraction, **data),
        method=MethodConfig(name=method, params=params or {}),
        model=ModelConfig(**(model or {})),
        pretrain=PretrainConfig(**(pretrain or {})),
    )
    run = root / "runs" / name
    cfg.save(run / "config.yaml")
    multilabel = data["dataset"] == "chestxray14"
    frame = make_test_frame(n_patients, multilabel=multilabel)
    names = FINDINGS if multilabel else CLASSES
    (run / "split.json").write_text(json.dumps({"labeled": ["a"] * 10, "classes": names}))
    rng = np.random.default_rng([seed, noise])
    if multilabel:
        y = frame[[f"label/{f}" for f in FINDINGS]].to_numpy()
        logits = skill * (2 * np.nan_to_num(y) - 1) + rng.normal(size=y.shape)
        scores = 1 / (1 + np.exp(-logits))
        metrics = multilabel_metrics(y, scores, FINDINGS)
    else:
        y = frame["label"].to_numpy()
        p1 = 1 / (1 + np.exp(-(skill * (2 * y - 1) + rng.normal(size=len(y)))))
        scores = np.stack([1 - p1, p1], axis=1)
        metrics = single_label_metrics(y, scores, CLASSES, patient_ids=frame["patient_id"].to_numpy())
    for j, c in enumerate(names):
        frame[f"score/{c}"] = scores[:, j].astype(np.float64)
    frame["step"] = checkpoint[1]
    if predictions:
        frame.to_parquet(run / "predictions.parquet", index=False)
    out = {"step": 500, "selected_step": checkpoint[1], "reported_checkpoint": checkpoint[0]}
    out["select_metric"] = "roc_auc"
    out.update({f"test/{k}": v for k, v in metrics.items()})
    out.update({f"test_last/{k}": v - 0.01 for k, v in metrics.items()})
    (run / "metrics.json").write_text(json.dumps(out))
    return run


def rows(summary: pd.DataFrame, **where) -> pd.DataFrame:
    keep = np.ones(len(summary), dtype=bool)
    for column, value in where.items():
        keep &= summary[column] == value
    return summary[keep]


# ---------------------------------------------------------------------------------------------------------
# what is averaged with what


def test_two_datasets_are_two_studies_never_one_row(tmp_path):
    for seed in (0, 1):
        write_trial(tmp_path, f"breakhis_{seed}", seed=seed, fraction=1.0, skill=2.0)
        write_trial(
            tmp_path, f"chest_{seed}", seed=seed, fraction=1.0, skill=0.1, data={"dataset": "chestxray14"}
        )
    summary, text = write_report(tmp_path)
    auc = rows(summary, metric="roc_auc", label_fraction=1.0)
    assert list(auc["n"]) == [2, 2]  # not one row of 4 trials
    assert list(auc["study"]) == ["dataset=breakhis", "dataset=chestxray14"]
    for study, prefix in zip(auc["study"], ("breakhis", "chest"), strict=True):
        runs = [
            json.loads((tmp_path / "runs" / f"{prefix}_{s}" / "metrics.json").read_text()) for s in (0, 1)
        ]
        mean = rows(auc, study=study)["mean"].item()
        assert mean == pytest.approx(np.mean([r["test/roc_auc"] for r in runs]))
    assert (
        "2 studies, reported separately and never averaged or compared: data.dataset: breakhis vs chestxray14"
        in text
    )
    assert text.count("## Study: ") == 2


def test_fixmatch_arms_with_different_thresholds_are_not_merged(tmp_path):
    for seed in range(3):
        write_trial(tmp_path, f"sup_{seed}", seed=seed)
        write_trial(
            tmp_path, f"fm09_{seed}", method="fixmatch", params={"threshold": 0.9}, seed=seed, noise=1
        )
        write_trial(
            tmp_path, f"fm95_{seed}", method="fixmatch", params={"threshold": 0.95}, seed=seed, noise=2
        )
    summary, text = write_report(tmp_path)
    cell = rows(summary, metric="balanced_accuracy")
    assert list(cell["n"]) == [3, 3, 3]  # not fixmatch with 6 trials
    assert list(cell["arm"]) == ["supervised", "fixmatch(threshold=0.9)", "fixmatch(threshold=0.95)"]
    assert "| fixmatch(threshold=0.95) | supervised |" in text  # both compared with the same control


def test_arm_labels_and_matched_controls(tmp_path):
    from semimed.report import collect_trials, group_studies, summarize

    write_trial(tmp_path, "sup", seed=0)
    write_trial(tmp_path, "sup_pre", seed=0, model={"pretrained": True})
    write_trial(tmp_path, "fm_r18", method="fixmatch", seed=0, model={"backbone": "resnet18"})
    write_trial(tmp_path, "fm", method="fixmatch", seed=0)
    (study,), note = group_studies(collect_trials(tmp_path).trials)
    assert note == ""
    assert list(study.arms) == [
        "supervised(backbone=small_cnn)",
        "fixmatch(backbone=resnet18)",
        "fixmatch(backbone=small_cnn)",
        "supervised+pretrained(backbone=small_cnn)",
    ]
    assert study.control == {
        "fixmatch(backbone=resnet18)": None,  # no supervised resnet18 run
        "fixmatch(backbone=small_cnn)": "supervised(backbone=small_cnn)",
        "supervised+pretrained(backbone=small_cnn)": "supervised(backbone=small_cnn)",
    }
    summary = summarize([study], n_boot=200)
    assert set(rows(summary, arm="fixmatch(backbone=resnet18)", metric="roc_auc-vs-control")["verdict"]) == {
        "no matched control"
    }


def test_self_supervised_pretraining_arms_are_compared_with_the_plain_control(tmp_path):
    from semimed.report import collect_trials, group_studies

    write_trial(tmp_path, "sup", seed=0)
    write_trial(tmp_path, "sup_simclr", seed=0, pretrain={"method": "simclr", "steps": 300})
    write_trial(tmp_path, "flex", method="flexmatch", seed=0)
    write_trial(
        tmp_path, "flex_simclr", method="flexmatch", seed=0, pretrain={"method": "simclr", "steps": 300}
    )
    (study,), _ = group_studies(collect_trials(tmp_path).trials)
    assert sorted(study.arms) == ["flexmatch", "flexmatch+simclr", "supervised", "supervised+simclr"]
    assert study.control == {a: "supervised" for a in ("flexmatch", "flexmatch+simclr", "supervised+simclr")}


# ---------------------------------------------------------------------------------------------------------
# unfinished and unreadable trials


def test_unfinished_trial_is_listed_by_name(tmp_path, capsys):
    write_trial(tmp_path, "done_0", seed=0)
    (tmp_path / "runs" / "still_running_1").mkdir()
    Config().save(tmp_path / "runs" / "still_running_1" / "config.yaml")
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1 unfinished (no metrics.json): still_running_1." in out
    assert "1 unfinished (no metrics.json): still_running_1." in (tmp_path / "report.md").read_text()


def test_truncated_metrics_json_is_named_and_does_not_block_the_report(tmp_path, capsys):
    for seed in range(3):
        write_trial(tmp_path, f"ok_{seed}", seed=seed)
    broken = write_trial(tmp_path, "broken_3", seed=3)
    text = (broken / "metrics.json").read_text()
    (broken / "metrics.json").write_text(text[: len(text) // 2])
    with pytest.warns(RuntimeWarning, match="skipping trial broken_3: unreadable metrics.json"):
        summary, markdown = write_report(tmp_path)
    assert rows(summary, metric="accuracy")["n"].item() == 3
    assert "1 skipped (unreadable): broken_3: unreadable metrics.json or config.yaml" in markdown
    assert main(["report", str(tmp_path)]) == 0
    assert "warning: semimed report: skipping trial broken_3" in capsys.readouterr().err


def test_report_errors_name_the_folder(tmp_path):
    with pytest.raises(SemimedError, match="experiment directory not found"):
        write_report(tmp_path / "missing")
    (tmp_path / "empty" / "runs" / "unfinished").mkdir(parents=True)
    with pytest.raises(
        SemimedError, match=r"no finished trial \(no runs/\*/metrics.json\); unfinished: unfinished"
    ):
        write_report(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------------------
# intervals and verdicts


@pytest.mark.parametrize("with_predictions", [True, False])
def test_two_seed_intervals_stay_inside_the_metric_range(tmp_path, with_predictions):
    # Two seeds far apart: a Student-t interval (12.7 standard errors) would reach far outside [0, 1].
    write_trial(tmp_path, "s0", seed=0, skill=0.0, predictions=with_predictions)
    write_trial(tmp_path, "s1", seed=1, skill=4.0, predictions=with_predictions)
    summary, text = write_report(tmp_path)
    cells = summary[~summary["metric"].str.endswith("-vs-control")]
    assert (cells["n"] == 2).all()
    assert ((cells["ci95_low"] >= 0) & (cells["ci95_high"] <= 1) & (cells["ci95_low"] <= cells["mean"])).all()
    method = "seeds×patients" if with_predictions else "seeds"
    assert set(rows(cells, metric="roc_auc")["ci_method"]) == {method}
    assert "n=2†" + ("" if with_predictions else "‡") in text


def test_paired_verdicts(tmp_path):
    for seed in range(3):
        write_trial(tmp_path, f"sup_{seed}", seed=seed, skill=0.3)
        write_trial(tmp_path, f"fm_{seed}", method="fixmatch", seed=seed, skill=3.0, noise=1)
        # the control's predictions exactly
        write_trial(tmp_path, f"pl_{seed}", method="pseudo_label", seed=seed, skill=0.3)
    summary, text = write_report(tmp_path)
    assert "### roc_auc: paired difference to the matched control" in text
    assert "| fixmatch | supervised | +" in text and ": better |" in text
    diff = rows(summary, metric="roc_auc-vs-control").set_index("arm")
    assert diff.loc["fixmatch", "verdict"] == "better" and diff.loc["fixmatch", "ci95_low"] > 0
    assert diff.loc["fixmatch", "n"] == 3 and diff.loc["fixmatch", "ci_method"] == "seeds×patients"
    assert diff.loc["pseudo_label", "verdict"] == "no detectable difference"
    assert diff.loc["pseudo_label", ["mean", "ci95_low", "ci95_high"]].tolist() == [0.0, 0.0, 0.0]


def test_paired_verdict_with_two_seeds_says_so(tmp_path):
    for seed in range(2):
        write_trial(tmp_path, f"sup_{seed}", seed=seed, skill=0.3)
        write_trial(tmp_path, f"fm_{seed}", method="fixmatch", seed=seed, skill=3.0, noise=1)
    summary, text = write_report(tmp_path)
    assert ": better (only n=2 seeds) |" in text
    assert (
        rows(summary, metric="roc_auc-vs-control", arm="fixmatch")["verdict"].item()
        == "better (only n=2 seeds)"
    )


def test_unusable_or_inconsistent_predictions_are_named(tmp_path):
    for seed in range(3):
        write_trial(tmp_path, f"sup_{seed}", seed=seed)
    (tmp_path / "runs" / "sup_1" / "predictions.parquet").write_bytes(b"PAR1 truncated")
    metrics_path = tmp_path / "runs" / "sup_2" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["test/roc_auc"] -= 0.1  # not the checkpoint the predictions come from
    metrics_path.write_text(json.dumps(metrics))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary, text = write_report(tmp_path)
    messages = " | ".join(str(w.message) for w in caught)
    assert "trial sup_1: predictions.parquet unusable" in messages
    assert "trial sup_2: test/roc_auc" in messages and "from predictions.parquet" in messages
    assert set(rows(summary, metric="roc_auc")["ci_method"]) == {"seeds"}  # one seed lacks predictions
    assert "n=3‡" in text


def test_paired_trials_with_different_test_rows_are_an_error(tmp_path):
    write_trial(tmp_path, "sup_0", seed=0)
    write_trial(tmp_path, "fm_0", method="fixmatch", seed=0, n_patients=20)
    with pytest.raises(SemimedError, match="trials fm_0 and sup_0 .* have different test rows"):
        write_report(tmp_path)


def test_bootstrap_is_deterministic(tmp_path):
    from semimed.report import collect_trials, group_studies, summarize

    for seed in range(3):
        write_trial(tmp_path, f"sup_{seed}", seed=seed, skill=0.5)
        write_trial(tmp_path, f"fm_{seed}", method="fixmatch", seed=seed, skill=1.0, noise=1)
    (study,), _ = group_studies(collect_trials(tmp_path).trials)
    first, again = summarize([study], n_boot=300), summarize([study], n_boot=300)
    pd.testing.assert_frame_equal(first, again)
    other = summarize([study], n_boot=300, seed=1)
    assert not np.allclose(first["ci95_low"].fillna(0), other["ci95_low"].fillna(0))


def test_seeds_on_one_test_set_share_its_patient_resamples(tmp_path):
    """Five seeds with the same predictions on one official test set are one test set's worth of evidence: the
    interval is that test set's patient-bootstrap interval. Resampling the patients independently per seed
    averaged the test set's sampling error away and shrank the interval by ~sqrt(5) (too many verdicts)."""
    import shutil

    from semimed import stats
    from semimed.report import collect_trials, group_studies, summarize

    first = write_trial(tmp_path, "sup_0", seed=0, skill=0.7, n_patients=40)
    for seed in range(1, 5):
        run = write_trial(tmp_path, f"sup_{seed}", seed=seed, skill=0.7, n_patients=40)
        for name in ("predictions.parquet", "metrics.json"):  # seed 0's scores: only the seed differs
            shutil.copy(first / name, run / name)
    (study,), _ = group_studies(collect_trials(tmp_path).trials)
    row = rows(summarize([study], n_boot=2000), arm="supervised", metric="roc_auc").iloc[0]
    pred = stats.Predictions.read(first / "predictions.parquet")
    single = np.percentile(
        stats.metric_replicates(pred, ["roc_auc"], key=[99], n_boot=2000)["roc_auc"], [2.5, 97.5]
    )
    width, single_width = row["ci95_high"] - row["ci95_low"], single[1] - single[0]
    assert row["n"] == 5 and width == pytest.approx(single_width, rel=0.15), (width, single_width)


def test_seed_bootstrap_and_verdict_values():
    from semimed import stats

    # seeds only: every replicate is a mean of the two values -> inside [0.2, 0.8]
    interval = stats.seed_bootstrap(np.array([0.2, 0.8]), None, n_boot=2000, seed=0)
    assert interval.method == "seeds" and 0.2 <= interval.low < 0.5 < interval.high <= 0.8
    assert np.isnan(stats.seed_bootstrap(np.array([0.5]), None).low)  # one seed, no predictions: no interval
    reps = np.tile(np.linspace(0.6, 0.7, 1000), (3, 1))
    interval = stats.seed_bootstrap(np.array([0.65] * 3), reps, n_boot=1000)
    assert interval.method == "seeds×patients" and 0.6 <= interval.low < interval.high <= 0.7
    assert stats.verdict(0.01, 0.05, 3) == "better" and stats.verdict(-0.05, -0.01, 5) == "worse"
    assert stats.verdict(-0.01, 0.02, 2) == "no detectable difference (only n=2 seeds)"


# ---------------------------------------------------------------------------------------------------------
# weighted metrics (the bootstrap's engine) = the metric of the data set with rows repeated


def _frame(y: np.ndarray, scores: np.ndarray, patients: np.ndarray, names: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame({"split": "test", "row": np.arange(len(patients)), "patient_id": patients})
    if y.ndim == 2:
        frame = frame.assign(**{f"label/{c}": y[:, j] for j, c in enumerate(names)})
    else:
        frame["label"] = y
    return frame.assign(**{f"score/{c}": scores[:, j] for j, c in enumerate(names)})


@pytest.mark.parametrize("k", [2, 4])
def test_weighted_single_label_metrics_equal_repeated_rows(k):
    from semimed import stats

    rng = np.random.default_rng(k)
    n = 80
    y = rng.integers(0, k, n)
    scores = np.round(rng.dirichlet(np.ones(k), n), 1)  # rounded: many tied scores
    weights = rng.integers(0, 4, n)  # 0 = left out
    names = [f"c{j}" for j in range(k)]
    pred = stats.Predictions.from_frame(_frame(y, scores, np.array([f"p{i:03d}" for i in range(n)]), names))
    got = {
        m: v[0] for m, v in stats.weighted_metrics(pred, weights[None, :], stats.BOOTSTRAP_METRICS).items()
    }
    y_rep, s_rep = np.repeat(y, weights), np.repeat(scores, weights, axis=0)
    # a patient drawn twice is two patients
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = single_label_metrics(y_rep, s_rep, names, patient_ids=np.arange(len(y_rep)))
    for metric in stats.BOOTSTRAP_METRICS:
        assert got[metric] == pytest.approx(expected[metric], abs=1e-12), metric
    assert got["accuracy"] == pytest.approx(accuracy_score(y, scores.argmax(1), sample_weight=weights))
    assert got["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(y, scores.argmax(1), sample_weight=weights)
    )
    if k == 2:
        assert got["roc_auc"] == pytest.approx(roc_auc_score(y, scores[:, 1], sample_weight=weights))
    per_class_ap = [average_precision_score(y == j, scores[:, j], sample_weight=weights) for j in range(k)]
    # Binary: the positive class's AP (index 1 unless the run names another); else the macro.
    assert got["average_precision"] == pytest.approx(per_class_ap[1] if k == 2 else np.mean(per_class_ap))
    if k == 2:  # the run's positive class, by name, as metrics.json's positive_class gives it
        frame = _frame(y, scores, np.array([f"p{i:03d}" for i in range(n)]), names)
        first = stats.Predictions.from_frame(frame, positive_class="c0")
        values = stats.weighted_metrics(first, weights[None, :], ("roc_auc", "average_precision"))
        assert values["average_precision"][0] == pytest.approx(per_class_ap[0])
        assert values["roc_auc"][0] == pytest.approx(
            roc_auc_score(y == 0, scores[:, 0], sample_weight=weights)
        )


def test_weighted_multilabel_metrics_equal_repeated_rows():
    from semimed import stats

    rng = np.random.default_rng(3)
    n, k = 120, 4
    y = (rng.random((n, k)) < [0.05, 0.2, 0.5, 0.8]).astype(float)
    y[rng.random((n, k)) < 0.1] = np.nan  # unknown
    scores = np.round(rng.random((n, k)), 2)
    weights = rng.integers(0, 3, n)
    names = [f"f{j}" for j in range(k)]
    pred = stats.Predictions.from_frame(_frame(y, scores, np.array([f"p{i:03d}" for i in range(n)]), names))
    got = stats.weighted_metrics(pred, weights[None, :], ["roc_auc", "average_precision"])
    expected = multilabel_metrics(np.repeat(y, weights, axis=0), np.repeat(scores, weights, axis=0), names)
    assert got["roc_auc"][0] == pytest.approx(expected["roc_auc"], abs=1e-12)
    assert got["average_precision"][0] == pytest.approx(expected["average_precision"], abs=1e-12)
    known = ~np.isnan(y[:, 0])
    assert stats.weighted_metrics(pred, weights[None, :], ["roc_auc"])["roc_auc"][0] == pytest.approx(
        np.mean(
            [
                roc_auc_score(y[m, j], scores[m, j], sample_weight=weights[m])
                for j in range(k)
                for m in [~np.isnan(y[:, j])]
            ]
        )
    )
    assert known.any()


def test_patient_resample_weights_every_image_of_a_drawn_patient():
    """Counts per patient (a cluster bootstrap) = the images of each patient repeated that many times."""
    from semimed import stats

    rng = np.random.default_rng(5)
    patients = np.repeat([f"p{i}" for i in range(12)], 3)
    y = np.repeat(np.arange(12) % 2, 3)
    scores = rng.dirichlet([1, 1], len(y))
    pred = stats.Predictions.from_frame(_frame(y, scores, patients, CLASSES))
    counts = np.array([[2, 0, 1, 1, 0, 3, 1, 0, 2, 1, 1, 0]])
    got = stats.weighted_metrics(pred, counts, ["roc_auc", "patient_accuracy"])
    image_weights = counts[0][pred.patient]
    assert got["roc_auc"][0] == pytest.approx(roc_auc_score(y, scores[:, 1], sample_weight=image_weights))
    correct = scores.argmax(1) == y
    per_patient = pd.Series(correct).groupby(patients).mean().to_numpy()
    assert got["patient_accuracy"][0] == pytest.approx(np.average(per_patient, weights=counts[0]))


def test_metric_replicates_are_deterministic_and_shared_by_equal_test_sets():
    from semimed import stats

    frame = make_test_frame(n_patients=40)
    frame["score/benign"], frame["score/malignant"] = 0.4, 0.6
    frame.loc[frame["label"] == 1, ["score/benign", "score/malignant"]] = [0.3, 0.7]
    frame.loc[::7, "score/malignant"] = 0.1
    pred = stats.Predictions.from_frame(frame)
    first = stats.metric_replicates(pred, ["roc_auc", "accuracy"], key=[0, 1, 1], n_boot=500)
    again = stats.metric_replicates(
        stats.Predictions.from_frame(frame), ["roc_auc", "accuracy"], [0, 1, 1], 500
    )
    other = stats.metric_replicates(pred, ["roc_auc", "accuracy"], key=[0, 2, 2], n_boot=500)
    assert np.array_equal(first["roc_auc"], again["roc_auc"]) and first["roc_auc"].shape == (500,)
    assert not np.array_equal(first["roc_auc"], other["roc_auc"])
    assert ((first["accuracy"] >= 0) & (first["accuracy"] <= 1)).all()


# ---------------------------------------------------------------------------------------------------------
# checkpoints, label efficiency, plot, files


def test_checkpoint_is_stated_per_cell(tmp_path):
    write_trial(tmp_path, "a0", seed=0, checkpoint=("selected", 200))
    write_trial(tmp_path, "a1", seed=1, checkpoint=("selected", 400))
    write_trial(tmp_path, "b0", fraction=0.5, seed=0, checkpoint=("selected", 300))
    write_trial(tmp_path, "b1", fraction=0.5, seed=1, checkpoint=("last", 500))
    old = write_trial(tmp_path, "c0", fraction=1.0, seed=0)  # written before reported_checkpoint existed
    metrics = json.loads((old / "metrics.json").read_text())
    del metrics["reported_checkpoint"], metrics["select_metric"]
    metrics["selected_step"] = 500
    (old / "metrics.json").write_text(json.dumps(metrics))
    summary, text = write_report(tmp_path)
    assert "| selected on val (roc_auc, steps 200–400) |" in text
    cells = rows(summary, metric="accuracy").set_index("label_fraction")["checkpoint"]
    assert cells[0.1] == "selected on val (roc_auc, steps 200–400)"
    assert cells[0.5] == "mixed across seeds: selected on val (roc_auc, step 300) ×1, last ×1"
    assert cells[1.0] == "last"
    assert "### Reported checkpoint" in text and "(last: " in text  # @last beside selected numbers


def test_primary_metrics_come_from_the_dataset_and_metric_registries(monkeypatch):
    from dataclasses import replace

    from semimed.data import DATASETS, dataset_spec
    from semimed.metrics import METRICS, metric_names
    from semimed.report import MULTI_LABEL_METRICS, PRIMARY, SINGLE_LABEL_METRICS, primary_metrics

    single = set(metric_names("binary")) | set(metric_names("multiclass"))
    assert set(SINGLE_LABEL_METRICS) <= single and set(MULTI_LABEL_METRICS) <= set(metric_names("multilabel"))
    # a single-label study may be binary or multi-class: its primary metrics are defined for both
    assert set(PRIMARY[False]) <= set(metric_names("binary")) & set(metric_names("multiclass"))
    assert set(PRIMARY[True]) <= set(metric_names("multilabel"))
    assert all(name in METRICS for names in PRIMARY.values() for name in names)
    for name in DATASETS.names():  # the patient-level score where the dataset's spec says so, and only there
        shown = primary_metrics({"data.dataset": name}, multilabel=False)
        assert ("patient_accuracy" in shown) == dataset_spec(name).patient_level, name
    assert primary_metrics({"data.dataset": "breakhis"}, multilabel=False) == [
        "balanced_accuracy",
        "accuracy",
        "roc_auc",
        "patient_accuracy",
    ]
    assert primary_metrics({"data.dataset": "not_registered"}, multilabel=False) == [
        "balanced_accuracy",
        "accuracy",
        "roc_auc",
    ]
    assert primary_metrics({}, multilabel=True) == ["roc_auc", "average_precision"]
    # the spec decides, not the dataset's name
    flipped = replace(dataset_spec("breakhis"), patient_level=False)
    monkeypatch.setitem(DATASETS._factories, "breakhis", flipped)
    assert "patient_accuracy" not in primary_metrics({"data.dataset": "breakhis"}, multilabel=False)


def test_label_efficiency():
    from semimed.report import label_efficiency

    summary = pd.DataFrame(
        [
            {"arm": "a", "label_fraction": f, "metric": "m", "mean": v}
            for f, v in ((0.01, 0.5), (0.1, 0.77), (1.0, 0.8))
        ]
        + [{"arm": "b", "label_fraction": f, "metric": "m", "mean": v} for f, v in ((0.1, 0.5), (1.0, 0.9))]
        + [{"arm": "c", "label_fraction": 0.1, "metric": "m", "mean": 0.5}]
    )
    # a: 95% of 0.80 = 0.76 -> first reached at 0.1; b: 0.855 never reached below 1.0 -> 1; c: no full run
    assert label_efficiency(summary, "m") == {"a": "0.1", "b": "1", "c": "no full-label run"}


def test_plot_ticks_are_the_swept_fractions_and_y_stays_in_range(tmp_path):
    from semimed.report import collect_trials, figure, group_studies, summarize

    for fraction in (0.05, 0.2, 1.0):
        for seed in range(2):
            write_trial(tmp_path, f"sup_{fraction}_{seed}", fraction=fraction, seed=seed, skill=0.5)
            write_trial(
                tmp_path, f"fm_{fraction}_{seed}", method="fixmatch", fraction=fraction, seed=seed, noise=1
            )
    (study,), _ = group_studies(collect_trials(tmp_path).trials)
    summary = summarize([study], n_boot=200)
    fig = figure(summary, [study])
    metric_axis, diff_axis = fig.axes[:2]
    for axis in (metric_axis, diff_axis):
        assert list(axis.get_xticks()) == [0.05, 0.2, 1.0]
        assert [t.get_text() for t in axis.get_xticklabels()] == ["0.05", "0.2", "1"]
        assert axis.get_xscale() == "log"
    low, high = metric_axis.get_ylim()
    assert 0.0 <= low < high <= 1.0
    low, high = diff_axis.get_ylim()
    assert -1.0 <= low <= 0.0 <= high <= 1.0
    assert any(line.get_ydata()[0] == 0 and len(set(line.get_ydata())) == 1 for line in diff_axis.get_lines())


def test_report_files_follow_the_umask(tmp_path, capsys):
    for seed in range(2):
        write_trial(tmp_path, f"sup_{seed}", seed=seed)
    previous = os.umask(0o022)
    try:
        assert main(["report", str(tmp_path)]) == 0
    finally:
        os.umask(previous)
    for name in ("report.csv", "report.md", "report.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".report*"))  # no staging file left behind
    csv = pd.read_csv(tmp_path / "report.csv")
    expected = {"method", "label_fraction", "metric", "mean", "std", "ci95_low", "ci95_high", "n"}
    assert expected | {"study", "arm", "verdict", "checkpoint", "ci_method"} <= set(csv.columns)
    printed = capsys.readouterr().out
    assert (
        "### balanced_accuracy" in printed and "### patient_accuracy" in printed and str(tmp_path) in printed
    )


# ---------------------------------------------------------------------------------------------------------
# the study in TensorBoard (tb_report/), the tables a field expects, the demo's terminal view


def _scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def _study(tmp_path: Path) -> None:
    for seed in range(3):
        for fraction in (0.05, 1.0):
            write_trial(
                tmp_path, f"sup_{fraction}_{seed}", seed=seed, fraction=fraction, skill=0.5 + fraction
            )
            write_trial(
                tmp_path,
                f"fm_{fraction}_{seed}",
                method="fixmatch",
                seed=seed,
                fraction=fraction,
                skill=3.0,
                noise=1,
            )


def test_report_writes_the_study_to_tensorboard(tmp_path):
    from semimed.report import TB_REPORT

    _study(tmp_path)
    summary, _ = write_report(tmp_path)
    board = tmp_path / TB_REPORT
    for arm in ("supervised", "fixmatch"):
        scalars = _scalars(board / "breakhis" / arm)
        for metric in ("roc_auc", "balanced_accuracy"):
            cells = rows(summary, arm=arm, metric=metric).set_index("label_fraction")
            # x = label fraction x 1000 (per mille), y = the report's mean and interval, to float32 precision
            assert scalars[f"{metric}/mean"] == pytest.approx(
                {50: cells.loc[0.05, "mean"], 1000: cells.loc[1.0, "mean"]}
            )
            assert scalars[f"{metric}/ci95_low"][50] == pytest.approx(cells.loc[0.05, "ci95_low"])
            assert scalars[f"{metric}/last"][1000] == pytest.approx(
                rows(summary, arm=arm, metric=f"{metric}@last").set_index("label_fraction").loc[1.0, "mean"]
            )
        paired = [tag for tag in scalars if "vs_control" in tag]
        assert bool(paired) == (arm == "fixmatch")
    diff = rows(summary, arm="fixmatch", metric="roc_auc-vs-control").set_index("label_fraction")
    assert _scalars(board / "breakhis" / "fixmatch")["roc_auc/vs_control"][50] == pytest.approx(
        diff.loc[0.05, "mean"]
    )
    # HParams: one run per trial, its config and its final test metrics
    trials = sorted(p.name for p in (board / "hparams").iterdir())
    assert trials == sorted(p.name for p in (tmp_path / "runs").iterdir())
    metrics = json.loads((tmp_path / "runs" / "fm_0.05_1" / "metrics.json").read_text())
    logged = _scalars(board / "hparams" / "fm_0.05_1")
    assert logged["hparam/test/roc_auc"][0] == pytest.approx(metrics["test/roc_auc"])
    # a second report replaces tb_report/ instead of adding a second copy of every curve
    count = len(list(board.rglob("events.out.tfevents.*")))
    write_report(tmp_path)
    assert len(list(board.rglob("events.out.tfevents.*"))) == count
    assert not list(tmp_path.glob(f".{TB_REPORT}*"))


def test_brief_view_has_the_tables_and_the_verdicts(tmp_path):
    from semimed.report import brief

    _study(tmp_path)
    summary, _ = write_report(tmp_path)
    text = brief(summary)
    assert "test roc_auc:" in text and "test balanced_accuracy:" in text
    verdicts = [line for line in text.splitlines() if line.startswith("| fixmatch |") and "better" in line]
    assert len(verdicts) == 2  # roc_auc and balanced accuracy, each at both fractions
    assert "| supervised | 0." in text and "-vs-control" not in text
    assert len(text.splitlines()) < 30


def test_per_finding_auc_table_in_chexnets_layout(tmp_path):
    chexnet_like = {"model": {"backbone": "densenet121", "pretrained": True}}
    data = {"dataset": "chestxray14", "image_size": 224}
    for seed in range(2):
        write_trial(tmp_path, f"full_{seed}", seed=seed, fraction=1.0, data=data, skill=2.0, **chexnet_like)
        write_trial(tmp_path, f"tenth_{seed}", seed=seed, fraction=0.1, data=data, skill=0.5, **chexnet_like)
    _, text = write_report(tmp_path)
    table = text[text.index("## Per-finding test ROC-AUC") :].split("\n\n")[2].splitlines()
    assert (
        table[0] == "| finding | supervised+pretrained @ 0.1 | supervised+pretrained @ 1 | CheXNet 2017 ¹ |"
    )
    body = {line.split(" | ")[0].removeprefix("| "): line.strip("| ").split(" | ")[1:] for line in table[2:]}
    assert list(body) == [*FINDINGS, "**mean**", "**macro**"]
    runs = {
        name: json.loads((tmp_path / "runs" / name / "metrics.json").read_text())
        for name in ("full_0", "full_1")
    }
    for finding in FINDINGS:
        expected = np.mean([m[f"test/roc_auc/{finding}"] for m in runs.values()])
        assert body[finding][1] == f"{expected:.3f}"
    assert (
        body["Mass"][2] == "0.868" and body["Nodule"][2] == "0.780"
    )  # CheXNet's published per-finding AUROC
    assert body["**macro**"][1] == f"{np.mean([m['test/roc_auc_macro'] for m in runs.values()]):.3f}"
    assert "not the official test_list.txt" in text


def test_chexnet_column_only_beside_a_comparable_arm(tmp_path):
    for seed in range(2):
        write_trial(tmp_path, f"small_{seed}", seed=seed, fraction=1.0, data={"dataset": "chestxray14"})
    _, text = write_report(tmp_path)
    assert "## Per-finding test ROC-AUC" in text and "CheXNet 2017" not in text


def test_breakhis_accuracy_per_magnification(tmp_path):
    from semimed.metrics.core import patient_accuracy

    expected: dict[int, list[tuple[float, float]]] = {40: [], 400: []}
    for seed in range(2):
        run = write_trial(tmp_path, f"s{seed}", seed=seed, skill=1.0)
        frame = pd.read_parquet(run / "predictions.parquet")
        mags = np.where(np.arange(len(frame)) % 2 == 0, 40, 400)
        frame["path"] = [
            f"benign/SOB/adenosis/SOB_B_A_14-{i}/{m}X/SOB_B_A-14-{i}-{m}-001.png" for i, m in enumerate(mags)
        ]
        frame.to_parquet(run / "predictions.parquet", index=False)
        correct = (
            frame[["score/benign", "score/malignant"]].to_numpy().argmax(axis=1) == frame["label"].to_numpy()
        )
        for m in (40, 400):
            keep = mags == m
            expected[m].append(
                (correct[keep].mean(), patient_accuracy(correct[keep], frame["patient_id"].to_numpy()[keep]))
            )
    _, text = write_report(tmp_path)
    section = text[text.index("## Accuracy per magnification") :]
    for level, index in (("### Image-level accuracy", 0), ("### Patient-level accuracy", 1)):
        lines = section[section.index(level) :].splitlines()
        assert lines[2] == "| arm @ fraction | 40X | 400X |"
        cells = lines[4].strip("| ").split(" | ")
        for cell, mag in zip(cells[1:], (40, 400), strict=True):
            values = [v[index] for v in expected[mag]]
            assert cell == f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f} (n=2)"
