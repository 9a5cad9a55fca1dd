"""Grad-CAM: the heat map is hottest where the test planted the evidence, and `semimed explain` writes overlays
that explain exactly what the run's evaluation predicted."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from semimed.cli import main
from semimed.config import load_config
from semimed.errors import SemimedError
from semimed.explain import explain_run, gradcam, overlay, target_layer_name
from semimed.models.backbones import create_backbone


class BrightnessNet(nn.Module):
    """A model whose answer is known: class 1's logit is the mean of relu(x) pooled 4x4, class 0's its negative.

    Its Grad-CAM for class 1 is therefore relu(x) at 1/4 resolution: the bright square and nothing else.
    """

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()
        self.pool = nn.AvgPool2d(4)
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[-1.0], [1.0]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.act(x)).mean(dim=(2, 3)))


def planted(rows: slice, cols: slice, size: int = 64, seed: int = 0) -> torch.Tensor:
    """[1, 1, size, size]: faint noise below zero, a bright square at rows x cols."""
    image = torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 0.2 - 0.25
    image[..., rows, cols] = 1.0
    return image


def test_known_model_heat_map_is_the_planted_square() -> None:
    # Off-centre and not symmetric in x/y, so a transposed or flipped map would miss it.
    x = planted(slice(40, 52), slice(8, 20))
    cams, chosen, logits = gradcam(BrightnessNet(), x, targets=[1], layer="pool")
    cam = cams[0]
    assert chosen.tolist() == [1] and logits[0, 1] > logits[0, 0]
    row, col = np.unravel_index(cam.argmax(), cam.shape)
    assert 40 <= row < 52 and 8 <= col < 20
    inside = cam[40:52, 8:20].mean()
    outside = np.delete(
        cam.reshape(-1), (np.arange(40, 52)[:, None] * 64 + np.arange(8, 20)).reshape(-1)
    ).mean()
    assert inside > 0.8 and outside < 0.1
    # Class 0's evidence is the negative of class 1's: no pixel supports it, Grad-CAM's ReLU leaves nothing.
    cams0, _, _ = gradcam(BrightnessNet(), x, targets=[0], layer="pool")
    assert np.all(cams0 == 0.0)


def blob_batch(n: int, generator: torch.Generator, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images; label 1 carries a bright 6x6 blob at a random place, label 0 has none."""
    x = torch.randn(n, 1, size, size, generator=generator) * 0.3
    y = torch.randint(0, 2, (n,), generator=generator)
    for i in torch.nonzero(y).flatten().tolist():
        r, c = torch.randint(0, size - 6, (2,), generator=generator).tolist()
        x[i, 0, r : r + 6, c : c + 6] += 2.0
    return x, y


@pytest.fixture(scope="module")
def blob_detector() -> nn.Module:
    """small_cnn trained to say whether a blob is present (never told where): 60 steps of 16, a few seconds."""
    torch.manual_seed(0)
    model = create_backbone("small_cnn", num_classes=2, in_chans=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(60):
        x, y = blob_batch(16, generator)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    x, y = blob_batch(200, torch.Generator().manual_seed(2))
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.95  # the model knows the answer; Grad-CAM must say where it found it
    return model


@pytest.mark.parametrize(("row", "col"), [(3, 4), (4, 22), (22, 5), (21, 23), (12, 13)])
def test_trained_cnn_heat_map_peaks_on_the_blob(blob_detector: nn.Module, row: int, col: int) -> None:
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(row * 32 + col)) * 0.3
    x[0, 0, row : row + 6, col : col + 6] += 2.0
    cams, chosen, _ = gradcam(blob_detector, x, backbone="small_cnn")  # layer features.2.5: an 8x8 map
    assert chosen.tolist() == [1]
    cam = cams[0]
    peak_row, peak_col = np.unravel_index(cam.argmax(), cam.shape)
    # The 8x8 map (one cell = 4 px) is upsampled bilinearly to 32 px; its peak still falls inside the 6x6 blob.
    assert row <= peak_row < row + 6 and col <= peak_col < col + 6
    mask = np.zeros_like(cam, dtype=bool)
    mask[row : row + 6, col : col + 6] = True
    assert cam[mask].mean() > 3 * cam[~mask].mean()


def test_layer_choice() -> None:
    assert target_layer_name(create_backbone("resnet18", 2), "resnet18") == "layer4"
    # A timm model outside the table: its last feature_info module.
    assert (
        target_layer_name(create_backbone("mobilenetv3_small_050", 2), "mobilenetv3_small_050") == "blocks.5"
    )
    with pytest.raises(SemimedError, match="Grad-CAM layer 'layer9' is not in ResNet"):
        gradcam(create_backbone("resnet18", 2), torch.randn(1, 3, 32, 32), layer="layer9")


def test_overlay_is_rgb_uint8() -> None:
    image = np.full((1, 8, 8), 128, np.uint8)
    cam = np.zeros((8, 8), np.float32)
    cam[2, 3] = 1.0
    out = overlay(image, cam)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    # jet colormap: the hot pixel is red-dominant, a cold one blue-dominant.
    assert out[2, 3, 0] > out[2, 3, 2] and out[0, 0, 2] > out[0, 0, 0]


# ------------------------------------------------------------------------------------------- semimed explain


@pytest.fixture(scope="module")
def trained_run(demo_roots: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from semimed.experiment import run_training

    cfg = load_config(
        None,
        [
            f"data.root={demo_roots['breakhis']}",
            "data.image_size=32",
            "model.backbone=small_cnn",
            "train.steps=30",
            "train.eval_every=30",
            "train.checkpoint_every=30",
            "train.device=cpu",
            "data.fraction=0.5",
        ],
    )
    run_dir = tmp_path_factory.mktemp("explain") / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_training(cfg, run_dir, show_progress=False)
    return run_dir


def test_explain_writes_overlays_and_matches_the_evaluation(
    trained_run: Path, demo_roots: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from semimed.experiment import build_run

    images = sorted((demo_roots["breakhis"]).rglob("*-100-001.png"))[:3]
    out = tmp_path / "maps"
    assert main(["explain", str(trained_run), "--images", *map(str, images), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    files = sorted(out.glob("*_gradcam.png"))
    assert len(files) == 3
    with Image.open(files[0]) as picture:
        assert picture.size == (2 * 32 * 8, 32 * 8)  # image | overlay, each 32 px scaled x8
        assert picture.mode == "RGB"

    # explain preprocesses like the evaluation: its probabilities are the engine's for the same images.
    results = explain_run(trained_run, images, out, tensorboard=False)
    cfg = load_config(trained_run / "config.yaml")
    method, data, _ = build_run(cfg)
    state = torch.load(sorted((trained_run / "checkpoints").glob("step_*/state.pt"))[-1], weights_only=True)
    method.load_state_dict(state["method"])
    method.eval()
    from semimed.data.base import read_image_file
    from semimed.data.cache import resize_center_crop

    classes = data.classes
    for item, path in zip(results, images, strict=True):
        pixels = torch.from_numpy(resize_center_crop(read_image_file(path, 3), 32))[None]
        with torch.no_grad():
            probs = torch.softmax(method.predict(data.normalize(pixels)), 1)[0]
        assert item.prediction == classes[int(probs.argmax())]
        assert item.score == pytest.approx(float(probs[classes.index(item.target)]), abs=1e-5)
        assert f"{path}: predicted {item.prediction}" in printed

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # With --out, TensorBoard's images go under it too: nothing is written into the run folder.
    events = EventAccumulator(str(out / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert "gradcam" in events.Tags()["images"]
    logged = events.Images("gradcam")
    # One grid of the three panels (image | overlay, 64 x 32 each), at the checkpoint's step.
    assert logged[-1].step == 30 and logged[-1].width == 3 * 64 and logged[-1].height == 32


def test_explain_target_class(trained_run: Path, demo_roots: dict[str, Path], tmp_path: Path) -> None:
    image = sorted(demo_roots["breakhis"].rglob("*.png"))[0]
    results = explain_run(trained_run, [image], tmp_path, target="malignant", tensorboard=False)
    assert results[0].target == "malignant"
    assert results[0].output.name == f"{image.stem}_malignant_gradcam.png"


def test_explain_bad_input(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(image)
    cases = [
        (["explain", str(tmp_path), "--images", str(image)], f"{tmp_path}: not a semimed run directory"),
        (
            ["explain", str(trained_run), "--images", str(tmp_path / "no.png")],
            f"{tmp_path / 'no.png'}: image file",
        ),
        (
            ["explain", str(trained_run), "--images", str(image), "--target", "cat"],
            "--target 'cat' is not a class",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
