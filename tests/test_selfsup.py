"""Self-supervised pretraining (SimCLR, BYOL): it never reads a label nor sees a val/test image, its loss falls,
BYOL's target follows its schedule by hand, and `pretrain.method` pretrains once per seed and reuses it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from semimed.config import TrainConfig, load_config
from semimed.data.augment import Normalizer, build_transform
from semimed.data.views import RunData, StreamView
from semimed.engine import fit
from semimed.errors import SemimedError
from semimed.experiment import run_training
from semimed.methods import DataInfo, create_method
from semimed.models.backbones import create_backbone
from semimed.pretrain import pretraining_folder

pytestmark = pytest.mark.filterwarnings("ignore:.* is undefined:RuntimeWarning")
SELF_SUPERVISED = ("simclr", "byol")


def _method(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return create_method(name, create_backbone("small_cnn", 2, 3), 2, False, hidden_dim=32, projection_dim=16)


def _data(targets: np.ndarray) -> RunData:
    # Bright and dark images: two clusters an embedding can learn to tell apart.
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 100, (60, 3, 16, 16), dtype=np.uint8)
    pixels[::2] += 120
    rows = np.arange(60)
    parts = {"labeled": rows[:6], "unlabeled": rows[6:40], "val": rows[40:50], "test": rows[50:]}
    return RunData(pixels=pixels, targets=targets, rows=parts, classes=["a", "b"], multilabel=False)


def _cfg(steps: int) -> TrainConfig:
    return TrainConfig(
        steps=steps, batch_size=16, lr=3e-3, eval_every=steps, checkpoint_every=steps, device="cpu"
    )


@pytest.mark.parametrize("name", SELF_SUPERVISED)
def test_pretraining_reads_no_label_and_no_val_or_test_image(name: str, monkeypatch) -> None:
    seen: list[int] = []
    original = StreamView.__getitem__

    def recording(self, position):
        sample = original(self, position)
        seen.append(int(sample["u_rows"]))
        return sample

    monkeypatch.setattr(StreamView, "__getitem__", recording)
    monkeypatch.setattr("semimed.engine.evaluate.predict_scores", lambda *a, **k: pytest.fail("evaluated"))
    states = []
    for targets in (np.arange(60) % 2, np.random.default_rng(7).integers(0, 2, 60)):  # true, then poisoned
        method = _method(name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            final = fit(method, _data(targets), _cfg(4), show_progress=False)
        states.append({k: v.clone() for k, v in method.backbone().state_dict().items()})
        assert not any(k.startswith(("test", "val")) for k in final)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0]), "a label changed the pretraining"
    assert set(seen) <= set(range(40)) and set(seen) & set(range(6))  # training images only, labeled ones too


@pytest.mark.parametrize("seed", [0, 1])
def test_simclr_loss_falls_on_held_out_view_pairs(seed: int) -> None:
    """NT-Xent on fixed strong-view pairs of 40 images (chance: log(2·40 − 1) = 4.37) before and after 80 steps;
    the training batches' own loss is too noisy at batch 16 to show it."""
    data = _data(np.arange(60) % 2)
    strong, normalize = build_transform("strong", 16), Normalizer(3)
    images = torch.from_numpy(data.pixels[:40].copy())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        pairs = [normalize(torch.stack([strong(image) for image in images])) for _ in range(2)]

    def held_out_loss(method) -> float:
        method.eval()
        with torch.no_grad():
            z = method.model(torch.cat(pairs))
        return float(method.criterion(z[:40], z[40:]))

    method = _method("simclr", seed)
    before = held_out_loss(method)
    cfg = TrainConfig(steps=80, batch_size=16, lr=3e-3, eval_every=80, checkpoint_every=100, device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fit(method, data, cfg, show_progress=False)
    assert before == pytest.approx(np.log(79), abs=0.1)  # an untrained embedding is near chance
    assert held_out_loss(method) < before - 0.1  # measured 0.14-0.25 lower over seeds 0-2


def test_byol_target_is_the_scheduled_average_by_hand() -> None:
    method = _method("byol")
    method.setup(DataInfo(0, 10, ["a", "b"], False, steps=10))
    assert method.momentum_at(0) == pytest.approx(0.99) and method.momentum_at(10) == pytest.approx(1.0)
    # lightly's cosine schedule reaches the end value at the last step (9 of 0..9): 1 - 0.01 (cos(π t / 9) + 1) / 2
    assert method.momentum_at(5) == pytest.approx(1 - 0.01 * (np.cos(np.pi * 5 / 9) + 1) / 2)
    assert method.momentum_at(9) == pytest.approx(1.0)
    target_before = {k: v.clone() for k, v in method.target.backbone.named_parameters()}
    with torch.no_grad():
        for p in method.model.parameters():
            p.add_(1.0)
    method.after_optimizer_step(0)
    online = dict(method.model.backbone.named_parameters())
    for key, value in method.target.backbone.named_parameters():
        torch.testing.assert_close(value, 0.99 * target_before[key] + 0.01 * online[key].detach())
    assert not any(p.requires_grad for p in method.target.parameters())


def _config(demo_roots, *overrides: str):
    return load_config(
        None,
        [
            f"data.root={demo_roots['breakhis']}",
            "data.image_size=16",
            "train.steps=2",
            "train.batch_size=8",
            "train.device=cpu",
            "pretrain.method=simclr",
            "pretrain.steps=3",
            "pretrain.batch_size=8",
            "pretrain.params.hidden_dim=32",
            *overrides,
        ],
    )


def test_one_pretraining_per_seed_serves_every_fraction(demo_roots, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SEMIMED_CACHE", str(tmp_path / "cache"))
    import semimed.experiment as experiment

    calls: list[str] = []
    original = experiment.run_training

    def counting(cfg, run_dir, **kwargs):
        calls.append(cfg.method.name)
        return original(cfg, run_dir, **kwargs)

    monkeypatch.setattr(experiment, "run_training", counting)
    for fraction in (0.1, 0.5):
        experiment.run_training(
            _config(demo_roots, f"data.fraction={fraction}", "method.name=fixmatch"),
            tmp_path / f"f{fraction}",
        )
    assert calls == ["fixmatch", "simclr", "fixmatch"]  # pretrained once, for the first fraction
    folders = list((tmp_path / "cache" / "pretrain").iterdir())
    assert len(folders) == 1 and (folders[0] / "backbone.safetensors").is_file()
    assert json.loads((folders[0] / "metrics.json").read_text())["step"] == 3
    identity = json.loads((tmp_path / "f0.1" / "run.json").read_text())["config"]
    assert identity["pretrain.method"] == "simclr" and identity["pretrain.steps"] == 3
    experiment.run_training(_config(demo_roots, "seed=1", "method.name=supervised"), tmp_path / "seed1")
    assert len(list((tmp_path / "cache" / "pretrain").iterdir())) == 2  # another seed, another pretraining
    assert folders[0] != pretraining_folder(
        _config(demo_roots, "seed=1"), _identity(_config(demo_roots, "seed=1"))
    )


def _identity(cfg):
    from semimed.data import load_dataset
    from semimed.experiment import load_split
    from semimed.pretrain import pretraining_config
    from semimed.runs import run_identity

    pre = pretraining_config(cfg)
    return run_identity(pre, load_split(pre, load_dataset(cfg.data)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["pretrain.method=fixmatch"], "unknown pretrain.method 'fixmatch'; valid .*byol, simclr"),
        (["pretrain.params.temp=0.1"], r"unknown parameter\(s\) temp for method 'simclr'"),
        (["model.pretrained_checkpoint=/x"], "pretrain.method and model.pretrained"),
        (["method.name=byol"], "pretrain.method is for a run that fine-tunes a classifier"),
        # Every DDP rank would wait for the pretraining lock that another rank holds inside a collective.
        (["scaling.num_workers=2"], r"pretrain.method with scaling.num_workers=2 \(DDP\) is not supported"),
    ],
)
def test_bad_pretraining_settings_are_named(demo_roots, tmp_path: Path, overrides, message) -> None:
    with pytest.raises(SemimedError, match=message):
        run_training(_config(demo_roots, *overrides), tmp_path, show_progress=False)
