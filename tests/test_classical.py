"""Classical baselines: features against hand-computed values, the feature cache (reuse, a changed pixel row
recomputed), seeded classifiers, one-line parameter errors, and runs through experiment.run_training whose
files read like a deep run's (metrics recomputable from predictions.parquet; unlabeled labels never read)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from semimed.classical import features as F
from semimed.classical.cache import load_block, load_features
from semimed.classical.classifiers import CLASSIFIERS, ClassicalModel, resolve_params
from semimed.classical.fit import refuse_closed_form_run
from semimed.config import DataConfig, load_config
from semimed.data import load_dataset
from semimed.data.cache import load_pixels
from semimed.errors import SemimedError
from semimed.experiment import build_run, run_training
from semimed.explain import explain_run
from semimed.methods import METHODS, check_method, create_method
from semimed.metrics import evaluate_scores

# ------------------------------------------------------------------------------------ features by hand

# 4 grey levels. Pairs (r, c) -> (r, c+1) at 0 degrees, (r, c) -> (r+1, c) at 90 degrees (skimage's pi/2).
IMAGE_4X4 = np.array([[0, 1, 1, 2], [0, 1, 2, 3], [1, 1, 2, 3], [0, 0, 3, 3]], np.uint8)
# row by row: (0,1) (1,1) (1,2) | (0,1) (1,2) (2,3) | (1,1) (1,2) (2,3) | (0,0) (0,3) (3,3)
COUNTS_0 = np.array([[1, 2, 0, 1], [0, 2, 3, 0], [0, 0, 0, 2], [0, 0, 0, 1]])
# column by column: (0,0) (0,1) (1,0) | (1,1) (1,1) (1,0) | (1,2) (2,2) (2,3) | (2,3) (3,3) (3,3)
COUNTS_90 = np.array([[1, 1, 0, 0], [2, 2, 1, 0], [0, 0, 1, 2], [0, 0, 0, 2]])


def test_glcm_counts_and_properties_by_hand() -> None:
    from skimage.feature import graycomatrix

    counts = graycomatrix(IMAGE_4X4, [1], [0.0, np.pi / 2], levels=4)
    np.testing.assert_array_equal(counts[:, :, 0, 0], COUNTS_0)
    np.testing.assert_array_equal(counts[:, :, 0, 1], COUNTS_90)
    # Symmetric 0-degree matrix S = P + P^T over 24 pairs: diagonal (0,0)=2 (1,1)=4 (3,3)=2; |i-j| = 1:
    # (0,1)=(1,0)=2, (1,2)=(2,1)=3, (2,3)=(3,2)=2; |i-j| = 3: (0,3)=(3,0)=1.
    contrast = (4 * 1 + 6 * 1 + 4 * 1 + 2 * 9) / 24  # sum p (i-j)^2 = 32/24
    dissimilarity = (4 + 6 + 4 + 2 * 3) / 24  # sum p |i-j| = 20/24
    homogeneity = (8 + 14 / 2 + 2 / 10) / 24  # sum p / (1 + (i-j)^2) = 15.2/24
    asm = (2**2 + 4**2 + 2**2 + 2 * 2**2 + 2 * 3**2 + 2 * 2**2 + 2 * 1**2) / 24**2  # sum p^2 = 60/576
    values = F.glcm_features(IMAGE_4X4, levels=4, distances=(1,), angles=(0.0,))
    named = dict(zip(F.GLCM_PROPERTIES, values, strict=True))
    assert named["contrast"] == pytest.approx(contrast)
    assert named["dissimilarity"] == pytest.approx(dissimilarity)
    assert named["homogeneity"] == pytest.approx(homogeneity)
    assert named["ASM"] == pytest.approx(asm) and asm == pytest.approx(60 / 576)
    assert named["energy"] == pytest.approx(np.sqrt(60) / 24)
    # Averaged over angles: the 90-degree contrast is (1 + 2 + 1 + 2) / 12 = 0.5 (pairs one level apart).
    both = F.glcm_features(IMAGE_4X4, levels=4, distances=(1,), angles=(0.0, np.pi / 2))
    assert both[0] == pytest.approx((32 / 24 + 0.5) / 2)


def test_uniform_lbp_histogram_by_hand() -> None:
    image = np.array([[8, 3, 1], [6, 5, 7], [4, 2, 9]], np.uint8)
    # P = 4, R = 1: neighbours right, up, left, down; bit = neighbour >= centre; outside the image reads 0.
    # (0,0)=8: 0000 -> 0   (0,1)=3: 0011 -> 2   (0,2)=1: 0011 -> 2
    # (1,0)=6: 0100 -> 1   (1,1)=5: 1010 -> 4 transitions, non-uniform -> P+1 = 5   (1,2)=7: 0001 -> 1
    # (2,0)=4: 0100 -> 1   (2,1)=2: 1110 -> 3   (2,2)=9: 0000 -> 0
    expected = np.array([2, 3, 2, 1, 0, 1]) / 9
    np.testing.assert_allclose(F.lbp_histogram(image, 4, 1), expected, rtol=1e-6)


def test_color_histogram_and_grey_by_hand() -> None:
    image = np.zeros((3, 2, 2), np.uint8)
    image[0] = [[0, 15], [16, 255]]  # bins 0, 0, 1, 15 of 16 (width 16)
    image[1] = [[100, 100], [100, 100]]  # bin 6, all four
    image[2] = [[31, 32], [47, 48]]  # bins 1, 2, 2, 3
    hist = F.color_histogram(image).reshape(3, 16) * 4
    np.testing.assert_array_equal(np.flatnonzero(hist[0]), [0, 1, 15])
    np.testing.assert_array_equal(hist[0][[0, 1, 15]], [2, 1, 1])
    np.testing.assert_array_equal(hist[1][6], 4)
    np.testing.assert_array_equal(hist[2][[1, 2, 3]], [1, 2, 1])
    # luma of (16, 100, 47): (299*16 + 587*100 + 114*47 + 500) // 1000 = (4784 + 58700 + 5358 + 500) // 1000
    assert F.grey(image)[1, 0] == 69


@pytest.mark.parametrize("size", [16, 32])
def test_every_feature_set_has_a_size_independent_length(size: int) -> None:
    rng = np.random.default_rng(0)
    rgb, gray = (rng.integers(0, 256, (c, size, size), dtype=np.uint8) for c in (3, 1))
    lengths = {"glcm": 18, "lbp": 28, "hog": 324}
    for name, extractor in F.EXTRACTORS.items():
        for image, channels in ((rgb, 3), (gray, 1)):
            out = extractor.fn(image)
            assert out.dtype == np.float32 and np.isfinite(out).all()
            assert out.shape == (lengths.get(name, 16 * channels),), (name, channels)


# -------------------------------------------------------------------------------------------- the cache


class Counting:
    """Replace an extractor by a wrapper that counts the images it computes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.calls = 0
        original = F.EXTRACTORS[name]

        def fn(image: np.ndarray) -> np.ndarray:
            self.calls += 1
            return original.fn(image)

        monkeypatch.setitem(F.EXTRACTORS, name, dataclasses.replace(original, fn=fn))


def _fake_pixel_cache(folder: Path, n: int = 10, size: int = 16) -> Path:
    folder.mkdir(parents=True)
    pixels = np.lib.format.open_memmap(
        folder / "pixels.npy", mode="w+", dtype=np.uint8, shape=(n, 3, size, size)
    )
    pixels[:] = np.random.default_rng(0).integers(0, 256, pixels.shape, dtype=np.uint8)
    pixels.flush()
    (folder / "manifest.json").write_text("{}")
    return folder / "pixels.npy"


def test_feature_cache_is_read_back_and_a_changed_row_is_computed_again(tmp_path, monkeypatch) -> None:
    path = _fake_pixel_cache(tmp_path / "fake-16px-0123")
    count = Counting(monkeypatch, "color")
    rows = np.array([7, 2, 3, 2, 9])  # out of order, with a repeat
    first = load_features(np.load(path, mmap_mode="r"), rows, "color")
    assert count.calls == 4  # distinct rows only
    assert (tmp_path / "fake-16px-0123" / "features" / "color-v1.npz").is_file()
    again = load_features(np.load(path, mmap_mode="r"), rows, "color")
    assert count.calls == 4
    np.testing.assert_array_equal(first, again)
    writable = np.load(path, mmap_mode="r+")
    writable[3] = 255 - writable[3]  # the pixel cache re-decoded row 3 (a changed file)
    writable.flush()
    del writable
    changed = load_features(np.load(path, mmap_mode="r"), rows, "color")
    assert count.calls == 5  # row 3 alone
    np.testing.assert_array_equal(changed[[0, 1, 3, 4]], first[[0, 1, 3, 4]])
    assert not np.array_equal(changed[2], first[2])
    direct = F.extract_rows(np.load(path, mmap_mode="r"), rows, "color")
    np.testing.assert_array_equal(changed, direct)


def test_a_row_the_pixel_cache_redecodes_gets_new_features(demo_roots, tmp_path, monkeypatch) -> None:
    """Through the real pixel cache: a replaced image file is decoded again (its stats changed) and its features
    are computed again; every other row's come from the feature cache."""
    root = tmp_path / "breakhis"
    shutil.copytree(demo_roots["breakhis"], root)
    dataset = load_dataset(DataConfig(dataset="breakhis", root=str(root)))
    cache = tmp_path / "cache"
    count = Counting(monkeypatch, "glcm")
    rows = np.arange(len(dataset))
    before = load_block(load_pixels(dataset, 16, cache).pixels, rows, "glcm")
    assert count.calls == len(dataset)
    file = root / dataset.meta["path"].iloc[5]
    with Image.open(file) as image:
        Image.fromarray(255 - np.asarray(image)).save(file)
    os.utime(file, ns=(file.stat().st_atime_ns, file.stat().st_mtime_ns + 10**9))
    after = load_block(load_pixels(dataset, 16, cache).pixels, rows, "glcm")
    assert count.calls == len(dataset) + 1
    assert not np.array_equal(after[5], before[5])
    np.testing.assert_array_equal(np.delete(after, 5, axis=0), np.delete(before, 5, axis=0))


def test_parallel_extraction_equals_serial(tmp_path) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (70, 1, 16, 16), dtype=np.uint8)
    rows = np.arange(70)
    np.testing.assert_array_equal(
        F.extract_rows(pixels, rows, "lbp", 2), F.extract_rows(pixels, rows, "lbp", 1)
    )


# ------------------------------------------------------------------------------------------ classifiers


def _blobs(n: int = 60, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    return rng.normal(size=(n, 8)) + y[:, None] * 0.8, y


@pytest.mark.parametrize("classifier", CLASSIFIERS)
def test_same_seed_same_scores_and_scores_are_probabilities(classifier: str) -> None:
    x, y = _blobs()
    params = resolve_params(classifier, {})
    unlabeled = x[30:]

    def fit(seed: int) -> np.ndarray:
        return ClassicalModel(classifier, params, 3, False, seed).fit(x[:30], y[:30], unlabeled).scores(x)

    a, b = fit(0), fit(0)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a.sum(axis=1), 1.0, rtol=1e-5)
    assert (a.argmax(axis=1) == y).mean() > 0.5  # it learned the blobs


def test_random_forest_depends_on_the_seed_and_svm_scores_follow_its_decisions() -> None:
    x, y = _blobs()
    params = resolve_params("random_forest", {"n_estimators": 20})
    a = ClassicalModel("random_forest", params, 3, False, 0).fit(x[:30], y[:30]).scores(x)
    b = ClassicalModel("random_forest", params, 3, False, 1).fit(x[:30], y[:30]).scores(x)
    assert not np.array_equal(a, b)
    model = ClassicalModel("svm_rbf", resolve_params("svm_rbf", {}), 2, False, 0)
    yb = (y > 0).astype(int)
    model.fit(x[:30], yb[:30])
    np.testing.assert_array_equal(model.scores(x).argmax(axis=1), model.models[0].predict(x))


def test_multilabel_is_one_vs_rest_over_known_labels() -> None:
    x, y = _blobs(n=80, k=2)
    labels = np.stack([y, 1 - y, np.zeros_like(y)], axis=1).astype(np.float64)
    labels[::5, 0] = np.nan
    for classifier in ("logistic", "label_spreading"):
        model = ClassicalModel(classifier, resolve_params(classifier, {}), 3, True, 0)
        with pytest.warns(RuntimeWarning, match="finding 2 has one class"):
            model.fit(x[:40], labels[:40], x[40:])
        scores = model.scores(x)
        assert scores.shape == (80, 3) and (scores[:, 2] == 0.0).all()
        assert ((scores[:, 0] > 0.5) == (y == 1)).mean() > 0.7


def test_label_spreading_scores_images_no_label_reaches_by_the_labeled_prior() -> None:
    rng = np.random.default_rng(0)
    near = rng.normal(size=(20, 4))  # 3 labeled (classes 0, 0, 1) + 17 unlabeled images
    far = rng.normal(size=(12, 4)) + 100.0  # unlabeled only: their 7 nearest neighbours are each other
    x = np.concatenate([near, far])
    model = ClassicalModel("label_spreading", resolve_params("label_spreading", {}), 2, False, 0)
    model.fit(x[:3], np.array([0, 0, 1]), x[3:])
    with pytest.warns(RuntimeWarning, match="2 of 4 images are reached by no labeled image"):
        scores = model.scores(np.concatenate([near[:2], far[:2]]))
    np.testing.assert_allclose(scores[2:], [[2 / 3, 1 / 3]] * 2)  # the labeled class frequencies
    assert model.unreached == 2 and np.isfinite(scores).all()
    with pytest.raises(SemimedError, match="no labeled image reaches any of 2 images"):
        model.scores(far[:2])


@pytest.mark.parametrize(
    ("params", "key"),
    [
        (
            {"classifier": "random_forest", "C": 1.0},
            "method.params.C does not apply to classifier random_forest",
        ),
        ({"classifier": "svm"}, "unknown method.params.classifier 'svm'; valid: svm_linear, svm_rbf"),
        ({"features": "haralick"}, "unknown method.params.features 'haralick'; valid: glcm, lbp"),
        ({"C": 0}, "method.params.C=0 must be a number > 0"),
        ({"classifier": "label_spreading", "gamma": 1.0}, "method.params.gamma does not apply"),
        (
            {"classifier": "random_forest", "n_estimators": 2.5},
            "method.params.n_estimators=2.5 must be an integer",
        ),
        ({"classifier": "self_training", "base": "svm_rbf"}, "unknown method.params.base 'svm_rbf'"),
    ],
)
def test_bad_parameters_are_one_line_errors_naming_the_key(params: dict, key: str) -> None:
    with pytest.raises(SemimedError) as error:
        create_method("classical", None, 2, False, **params)
    assert key in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(SemimedError, match=re.escape(key)):
        METHODS.get("classical").check_params(params)  # the same check, without data (config load)


# --------------------------------------------------------------------------------- runs, end to end


def _config(root: Path, *overrides: str):
    return load_config(
        None,
        [f"data.root={root}", "data.image_size=16", "data.fraction=0.2", "method.name=classical", *overrides],
    )


def test_a_classical_run_writes_the_files_of_any_run(demo_roots, tmp_path) -> None:
    cfg = _config(
        demo_roots["breakhis"], "method.params.classifier=logistic", "method.params.features=glcm_lbp"
    )
    folder = tmp_path / "run"
    returned = run_training(cfg, folder, show_progress=False)
    metrics = json.loads((folder / "metrics.json").read_text())
    for name in ("run.json", "config.yaml", "split.json", "env.json", "predictions.parquet"):
        assert (folder / name).is_file(), name
    assert not (folder / "backbone.safetensors").exists()  # no network; nothing pickled either
    assert list((folder / "tb").glob("events.out.tfevents.*"))
    assert metrics["reported_checkpoint"] == "last" and metrics["selected_step"] == 0
    assert metrics["evaluated_model"] == "glcm_lbp features + logistic(C=1, class_weight=None)"
    assert metrics["select_metric"] == "roc_auc" and metrics["test/roc_auc"] == returned["test/roc_auc"]
    with pytest.raises(SemimedError, match="has no network for explain") as error:
        refuse_closed_form_run(folder, "explain")
    assert "\n" not in str(error.value)
    image = next(Path(demo_roots["breakhis"]).rglob("*.png"))
    with pytest.raises(SemimedError, match="has no network for explain"):
        explain_run(folder, [image])  # `semimed explain` on it says so (not "the run has not finished")
    with pytest.raises(SemimedError, match="has no network for model.pretrained_checkpoint"):
        run_training(
            _config(
                demo_roots["breakhis"], "method.name=supervised", f"model.pretrained_checkpoint={folder}"
            ),
            tmp_path / "t",
        )
    with pytest.raises(SemimedError, match="unknown method.params.classifier|classifier"):
        check_method("classical", {"classifier": "svm_rbff"})  # checked at config load, before any data
    table = pd.read_parquet(folder / "predictions.parquet")
    _, data, _ = build_run(cfg)
    for part in ("val", "test"):
        rows = table[table["split"] == part]
        assert sorted(rows["row"]) == sorted(data.rows[part])
        recomputed = evaluate_scores(
            rows["label"].to_numpy(),
            rows[["score/benign", "score/malignant"]].to_numpy(),
            ["benign", "malignant"],
            False,
            rows["patient_id"].to_numpy(),
        )
        for key, value in recomputed.items():
            assert metrics[f"{part}/{key}"] == pytest.approx(value), key
            if part == "test":
                assert metrics[f"test_last/{key}"] == pytest.approx(value), key


@pytest.mark.parametrize("classifier", ["label_spreading", "self_training"])
def test_few_label_classifiers_use_the_unlabeled_images_but_never_their_labels(
    demo_roots, classifier: str
) -> None:
    cfg = _config(
        demo_roots["breakhis"], f"method.params.classifier={classifier}", "method.params.features=color"
    )
    method, data, _ = build_run(cfg)
    scores = method.fit_predict(data, seed=0)
    poisoned = np.array(data.targets)
    poisoned[data.rows["unlabeled"]] = 1 - poisoned[data.rows["unlabeled"]]
    again = method.fit_predict(dataclasses.replace(data, targets=poisoned), seed=0)
    for part in ("val", "test"):
        np.testing.assert_array_equal(scores[part], again[part])
    assert method.fit_logs["unlabeled_used"] == len(data.rows["unlabeled"]) > 0
    fewer = {**data.rows, "unlabeled": data.rows["unlabeled"][:5], "train": np.zeros(0, np.int64)}
    without = method.fit_predict(dataclasses.replace(data, rows=fewer), seed=0)
    assert not np.array_equal(scores["test"], without["test"])


def test_a_classical_method_refuses_the_step_loop() -> None:
    method = create_method("classical", None, 2, False)
    with pytest.raises(SemimedError, match="fits in closed form"):
        method.parameter_groups()
    with pytest.raises(SemimedError, match="no network to export"):
        method.backbone()


def test_the_real_breakhis_sample(sample_data, tmp_path) -> None:
    cfg = _config(
        sample_data / "breakhis",
        "data.image_size=64",
        "data.fraction=0.1",
        "method.params.classifier=label_spreading",
    )
    metrics = run_training(cfg, tmp_path / "run", show_progress=False)
    table = pd.read_parquet(tmp_path / "run" / "predictions.parquet")
    assert len(table[table["split"] == "test"]) > 20
    assert 0.0 <= metrics["test/roc_auc"] <= 1.0 and 0.0 <= metrics["test/balanced_accuracy"] <= 1.0
