"""`semimed predict` and the per-run TensorBoard summaries written at the reported checkpoint.

One short run on the packaged BreastMNIST (fp32, so that predicting again gives the same numbers): predict must
reproduce the run's own test scores (predictions.parquet) from its exported network and preprocessing, for the
whole dataset (`--root`) and for image files (`--images`); a run without a classifier is refused. The run's
TensorBoard folder must hold the PR curves and the confusion matrix of exactly those test predictions.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from semimed.cli import main
from semimed.demo_run import breastmnist_path
from semimed.errors import SemimedError
from semimed.predict import predict

CLASSES = ["malignant", "normal_benign"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished supervised run (small CNN, 12 steps, fp32) on the packaged BreastMNIST (~5 s)."""
    import warnings

    from semimed.config import load_config
    from semimed.experiment import run_training

    root = tmp_path_factory.mktemp("predict")
    cfg = load_config(
        None,
        [
            "data.dataset=medmnist",
            f"data.root={breastmnist_path()}",
            "data.image_size=28",
            f"data.cache_dir={root / 'cache'}",
            "data.fraction=0.2",
            "model.backbone=small_cnn",
            "train.steps=12",
            "train.batch_size=16",
            "train.eval_every=6",
            "train.checkpoint_every=12",
            "train.lr=0.003",
        ],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # barely trained: some metrics undefined
        run_training(cfg, root / "run", show_progress=False)
    return root / "run"


def _test_predictions(run_dir: Path) -> pd.DataFrame:
    frame = pd.read_parquet(run_dir / "predictions.parquet")
    return frame[frame["split"] == "test"].reset_index(drop=True)


def test_predict_root_reproduces_the_runs_test_scores(run_dir, tmp_path):
    result = predict(run_dir, root=str(breastmnist_path()), out=tmp_path / "all.csv", show_progress=False)
    table = pd.read_csv(result.output)
    assert result.images == len(table) == 780 and result.classes == CLASSES
    assert list(table.columns) == [
        "image",
        "patient_id",
        "label",
        *[f"score/{c}" for c in CLASSES],
        "predicted",
    ]
    ours = table.set_index("image").loc[_test_predictions(run_dir)["path"]]
    run = _test_predictions(run_dir)
    for c in CLASSES:
        np.testing.assert_allclose(ours[f"score/{c}"].to_numpy(), run[f"score/{c}"].to_numpy(), atol=2e-5)
    assert (ours["label"].to_numpy() == np.array(CLASSES)[run["label"].to_numpy()]).all()
    scores = table[[f"score/{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-4)
    assert (table["predicted"] == np.array(CLASSES)[scores.argmax(axis=1)]).all()


def test_predict_images_matches_the_dataset_rows(run_dir, tmp_path, capsys):
    npz = np.load(breastmnist_path())
    files = []
    for i in (0, 5, 9):
        path = tmp_path / f"test_{i}.png"
        Image.fromarray(npz["test_images"][i]).save(path)
        files.append(str(path))
    files.append(files[0])  # the same file twice: two rows
    out = tmp_path / "few.csv"
    code = main(["predict", str(run_dir), "--images", *files, "--out", str(out), "--batch-size", "2"])
    assert code == 0 and f"wrote {out}: 4 image(s)" in capsys.readouterr().out
    table = pd.read_csv(out)
    assert table["image"].tolist() == files
    run = _test_predictions(run_dir).set_index("path")
    for row, i in zip(table.itertuples(index=False), (0, 5, 9, 0), strict=True):
        np.testing.assert_allclose(row[1:3], run.loc[f"test:{i}", [f"score/{c}" for c in CLASSES]], atol=2e-5)


def test_predict_refuses_what_has_no_classifier(run_dir, tmp_path, capsys):
    ssl = tmp_path / "simclr_run"
    shutil.copytree(run_dir, ssl)
    values = yaml.safe_load((ssl / "config.yaml").read_text())
    values["method"] = {"name": "simclr", "params": {}}
    (ssl / "config.yaml").write_text(yaml.safe_dump(values))
    with pytest.raises(SemimedError, match="pretrains a backbone without labels, so it has no classifier"):
        predict(ssl, images=["x.png"])
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run_dir, unfinished)
    (unfinished / "backbone.safetensors").unlink()
    code = main(["predict", str(unfinished), "--root", str(breastmnist_path())])
    assert code == 2 and "no backbone.safetensors" in capsys.readouterr().err
    with pytest.raises(SemimedError, match="not found"):
        predict(run_dir, images=[str(tmp_path / "missing.png")])
    with pytest.raises(SystemExit):  # --images and --root are mutually exclusive, one is required
        main(["predict", str(run_dir)])


# ---------------------------------------------------------------------------- TensorBoard at the reported step


def make_ndarray(proto) -> np.ndarray:
    from tensorboard.util.tensor_util import make_ndarray as to_array

    return to_array(proto)


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    return events


def test_run_tensorboard_has_pr_curves_and_the_confusion_matrix_of_its_test_predictions(run_dir):
    from semimed.engine.log import confusion_image

    run = _test_predictions(run_dir)
    step = int(run["step"].iloc[0])
    events = _events(run_dir / "tb")
    labels = run["label"].to_numpy()
    for k, name in enumerate(CLASSES):
        (curve,) = events.Tensors(f"pr_curve/test/{name}")
        assert curve.step == step
        values = make_ndarray(curve.tensor_proto)
        tp, fp = values[0], values[1]  # at the lowest threshold every image is a positive
        assert (tp[0], fp[0]) == ((labels == k).sum(), (labels != k).sum())
    (image,) = events.Images("confusion_matrix/test")
    predicted = run[[f"score/{c}" for c in CLASSES]].to_numpy().argmax(axis=1)
    expected = np.zeros((2, 2), np.int64)
    np.add.at(expected, (labels, predicted), 1)
    drawn = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
    assert image.step == step and np.array_equal(drawn, confusion_image(expected, CLASSES))


def test_multilabel_pr_curves_leave_unknown_labels_out(tmp_path):
    from semimed.engine.log import prediction_summaries

    frame = pd.DataFrame(
        {
            "split": ["test"] * 4 + ["val"],
            "label/Mass": [1.0, 0.0, np.nan, 1.0, 1.0],
            "label/Edema": [0.0, 0.0, 0.0, 1.0, 0.0],
            "score/Mass": [0.9, 0.2, 0.5, 0.7, 0.1],
            "score/Edema": [0.1, 0.3, 0.2, 0.8, 0.4],
            "step": 40,
        }
    )
    prediction_summaries(tmp_path, [frame])
    events = _events(tmp_path)
    assert events.Tags()["images"] == []  # no single confusion matrix for a multi-label run
    tp_fp = {}
    for name in ("Mass", "Edema"):
        (curve,) = events.Tensors(f"pr_curve/test/{name}")
        values = make_ndarray(curve.tensor_proto)
        tp_fp[name] = (values[0][0], values[1][0])
    assert tp_fp == {"Mass": (2, 1), "Edema": (1, 3)}  # Mass: the NaN row and the val row are left out
