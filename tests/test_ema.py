"""train.ema: the evaluated weights are an exponential moving average of the trained ones — by hand after 3
steps, in the export, in the checkpoint (a resumed run equals an uninterrupted one), and said in metrics.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from semimed.config import TrainConfig, load_config
from semimed.engine import Optimization, RunData, fit, latest_checkpoint, load_checkpoint
from semimed.engine.ema import WeightEMA, ema_decay_at
from semimed.errors import SemimedError
from semimed.experiment import run_training
from semimed.methods import create_method
from semimed.models.backbones import create_backbone

pytestmark = pytest.mark.filterwarnings("ignore:.* is undefined:RuntimeWarning")


class Constant(nn.Module):
    """One parameter whose every step we set by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, 2.0]))


def test_ema_equals_the_hand_computed_average_after_three_steps() -> None:
    net = Constant()
    optimization = Optimization(_Wrapper(net), TrainConfig(device="cpu"), torch.device("cpu"))
    ema = WeightEMA(optimization, decay=0.5)
    # The decay warms up: min(0.5, (1 + t) / (10 + t)) = 0.1, 2/11, 0.25 for t = 0, 1, 2 (all below 0.5).
    assert [ema_decay_at(t, 0.5) for t in range(3)] == pytest.approx([0.1, 2 / 11, 0.25])
    assert ema_decay_at(100, 0.5) == 0.5
    expected = torch.tensor([1.0, 2.0])
    for t, value in enumerate(([3.0, 0.0], [5.0, 4.0], [-1.0, 8.0])):
        with torch.no_grad():
            net.w.copy_(torch.tensor(value))
        ema.update()
        d = ema_decay_at(t, 0.5)
        expected = d * expected + (1 - d) * torch.tensor(value)
    # by hand: 0.1·[1,2] + 0.9·[3,0] = [2.8, 0.2]; then 2/11·that + 9/11·[5,4] = [4.6, 3.3091]; then 0.25·… + 0.75·[-1,8]
    assert expected.tolist() == pytest.approx(
        [0.25 * 4.6 + 0.75 * -1.0, 0.25 * (2 / 11 * 0.2 + 9 / 11 * 4.0) + 6.0]
    )
    torch.testing.assert_close(ema.shadow[0], expected)
    with ema.applied():
        torch.testing.assert_close(net.w.detach(), expected)
    assert net.w.tolist() == [-1.0, 8.0]  # the raw weights are back after evaluation


class _Wrapper(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.model = net

    def parameter_groups(self):
        return [{"params": list(self.model.parameters())}]

    def extra_optimizers(self):
        return {}


def test_ema_decay_is_checked() -> None:
    with pytest.raises(SemimedError, match=r"train.ema=1.0 must be in \[0, 1\)"):
        TrainConfig(ema=1.0)


def _data() -> RunData:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 3, 16, 16), dtype=np.uint8)
    rows = np.arange(40)
    parts = {"labeled": rows[:16], "unlabeled": rows[16:28], "val": rows[28:34], "test": rows[34:]}
    return RunData(pixels=pixels, targets=np.arange(40) % 2, rows=parts, classes=["a", "b"], multilabel=False)


def test_a_resumed_ema_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=6, batch_size=4, eval_every=2, checkpoint_every=2, device="cpu", ema=0.9)

    def run(folder: Path, stop: int | None = None) -> dict:
        torch.manual_seed(0)
        method = create_method("supervised", create_backbone("small_cnn", 2, 3), 2, False)

        def report(metrics: dict, checkpoint: str | None) -> None:
            if metrics["step"] == stop:
                raise KeyboardInterrupt

        return fit(method, _data(), cfg, run_dir=folder, report=report, show_progress=False)

    straight = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", stop=4)
    resumed = run(tmp_path / "b")
    assert resumed["resumed_from_step"] == 4 and resumed["evaluated_model"] == "model (EMA 0.9)"
    a, b = (load_checkpoint(latest_checkpoint(tmp_path / f / "checkpoints"))["ema"] for f in ("a", "b"))
    assert a["updates"] == b["updates"] == 6
    assert all(torch.equal(x, y) for x, y in zip(a["shadow"], b["shadow"], strict=True))
    assert resumed["test/roc_auc"] == straight["test/roc_auc"]


def test_the_export_is_the_average_not_the_raw_weights(demo_roots, tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            f"data.root={demo_roots['breakhis']}",
            "data.image_size=16",
            "data.val_policy=none",  # the last checkpoint is the reported one
            "train.steps=3",
            "train.batch_size=8",
            "train.checkpoint_every=3",
            "train.ema=0.99",
            "train.lr=0.05",
            "train.device=cpu",
        ],
    )
    final = run_training(cfg, tmp_path, show_progress=False)
    assert final["reported_checkpoint"] == "last" and final["evaluated_model"] == "model (EMA 0.99)"
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "step_0000003")
    exported = load_file(str(tmp_path / "backbone.safetensors"))
    raw = {k.removeprefix("model."): v for k, v in checkpoint["method"].items() if k.startswith("model.")}
    trained = [k for k in raw if k.endswith(("weight", "bias"))]
    # The shadow lists the trained parameters in the method's order: the export holds them, not the raw ones.
    for key, shadow in zip(trained, checkpoint["ema"]["shadow"], strict=True):
        torch.testing.assert_close(exported[key], shadow)
    assert any(not torch.equal(exported[k], raw[k]) for k in trained)
    # BatchNorm statistics are the network's own (not averaged).
    assert all(torch.equal(exported[k], raw[k]) for k in raw if "running_" in k)


def test_ema_with_a_method_that_evaluates_another_network_is_refused_at_config_load() -> None:
    """Mean Teacher evaluates its teacher, which the method updates itself: train.ema averaged the student (not
    evaluated) and the report said "teacher (EMA 0.999)" of numbers no EMA had touched."""
    from semimed.experiment import check_config

    teacher = load_config(None, ["method.name=mean_teacher", "train.ema=0.999"])
    with pytest.raises(SemimedError, match=r"train.ema=0.999 .* mean_teacher evaluates another network"):
        check_config(teacher)
    student = load_config(
        None, ["method.name=mean_teacher", "method.params.evaluate_teacher=false", "train.ema=0.999"]
    )
    check_config(student)  # the student is trained by the optimizer: its EMA is what is evaluated
    check_config(load_config(None, ["method.name=fixmatch", "train.ema=0.999"]))
