"""The positive class of binary metrics is the dataset's declared disease class (data.positive_class), not class
index 1: BreastMNIST's index 0 is `malignant`, and its sensitivity is malignant's recall.

One tiny run on the packaged BreastMNIST file serves every check (a few seconds).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sklearn.metrics as skm

from semimed.config import load_config
from semimed.data.medmnist import load_medmnist
from semimed.errors import SemimedError
from semimed.experiment import build_run, run_training
from semimed.report import write_report

DEMO_NPZ = Path(__file__).parents[1] / "semimed" / "demo_data" / "breastmnist.npz"
TINY = [
    "data.dataset=medmnist",
    "model.backbone=small_cnn",
    "data.image_size=16",
    "data.fraction=0.2",
    "train.steps=4",
    "train.eval_every=2",
    "train.batch_size=8",
    "train.device=cpu",
    "train.loader_workers=0",
]

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(scope="module")
def breast_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("experiment") / "runs" / "supervised-breast"
    run_training(load_config(None, [f"data.root={DEMO_NPZ}", *TINY]), run_dir, show_progress=False)
    return run_dir


def test_breastmnist_declares_malignant_which_is_class_index_0():
    dataset = load_medmnist(DEMO_NPZ)
    assert dataset.classes == ["malignant", "normal_benign"]
    assert dataset.positive_index() == 0
    assert dataset.positive_index("normal_benign") == 1


def test_the_demo_sensitivity_is_malignant_recall(breast_run: Path):
    metrics = json.loads((breast_run / "metrics.json").read_text())
    frame = pd.read_parquet(breast_run / "predictions.parquet")
    test = frame[frame["split"] == "test"]
    y = test["label"].to_numpy()
    predicted = test[["score/malignant", "score/normal_benign"]].to_numpy().argmax(axis=1)
    malignant = 0
    assert metrics["positive_class"] == "malignant"
    assert metrics["test/sensitivity"] == pytest.approx(skm.recall_score(y, predicted, pos_label=malignant))
    assert metrics["test/specificity"] == pytest.approx(skm.recall_score(y, predicted, pos_label=1))
    assert metrics["test/precision"] == pytest.approx(
        skm.precision_score(y, predicted, pos_label=malignant, zero_division=np.nan), nan_ok=True
    )
    assert metrics["test/f1"] == pytest.approx(skm.f1_score(y, predicted, pos_label=malignant))
    assert metrics["test/average_precision"] == pytest.approx(
        skm.average_precision_score(y == malignant, test["score/malignant"])
    )
    assert metrics["test/roc_auc"] == pytest.approx(
        skm.roc_auc_score(y == malignant, test["score/malignant"])
    )
    # The two classes' sensitivities differ on this run, so the check above can tell them apart.
    assert metrics["test/sensitivity/malignant"] != metrics["test/sensitivity/normal_benign"]


def test_report_and_tensorboard_name_the_positive_class(breast_run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary, text = write_report(breast_run.parent.parent, n_boot=20)
    # The report recomputes each metric from predictions.parquet and warns where it differs from metrics.json:
    # with the run's positive class, AP (the positive class's) agrees.
    assert not [w for w in caught if "predictions.parquet" in str(w.message)]
    assert "Positive class: malignant" in text
    assert set(summary["positive_class"]) == {"malignant"}
    # The report's bootstrap recomputes AP from predictions.parquet for the same class (no mismatch warning).
    point = summary[(summary["metric"] == "average_precision")]["mean"].item()
    assert point == pytest.approx(
        json.loads((breast_run / "metrics.json").read_text())["test/average_precision"]
    )
    board = EventAccumulator(str(breast_run / "tb"), size_guidance={"tensors": 0})
    board.Reload()
    assert "positive_class/text_summary" in board.Tags()["tensors"]


def test_the_option_flips_the_headline_class(tmp_path: Path):
    cfg = load_config(None, [f"data.root={DEMO_NPZ}", *TINY, "data.positive_class=normal_benign"])
    _, data, _ = build_run(cfg, show_progress=False)
    assert data.positive == 1


def test_a_two_class_file_without_a_declared_positive_class_needs_the_option(tmp_path: Path):
    own = tmp_path / "my_ultrasound.npz"  # not a MedMNIST name: classes class_0 / class_1, no default
    shutil.copy(DEMO_NPZ, own)
    run_dir = tmp_path / "run"
    cfg = load_config(None, [f"data.root={own}", *TINY])
    with pytest.raises(SemimedError, match=r"declares no positive class: set data.positive_class"):
        run_training(cfg, run_dir, show_progress=False)
    assert not run_dir.exists()
    cfg = load_config(None, [f"data.root={own}", *TINY, "data.positive_class=class_2"])
    with pytest.raises(SemimedError, match=r"unknown data.positive_class 'class_2'.*valid: class_0, class_1"):
        build_run(cfg, show_progress=False)
    cfg = load_config(None, [f"data.root={own}", *TINY, "data.positive_class=class_0"])
    assert build_run(cfg, show_progress=False)[1].positive == 0


def test_positive_class_on_a_multilabel_task_is_refused(demo_roots):
    cfg = load_config(
        None,
        [
            "data.dataset=chestxray14",
            f"data.root={demo_roots['chestxray14']}",
            "data.positive_class=Effusion",
            "model.backbone=small_cnn",
        ],
    )
    with pytest.raises(SemimedError, match="applies to binary tasks; chestxray14 .* is multi-label"):
        build_run(cfg, show_progress=False)
