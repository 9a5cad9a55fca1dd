"""Method `finetune`: what each strategy trains, at which learning rate, and when; frozen BatchNorm statistics."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from semimed.config import TrainConfig
from semimed.engine import RunData, build_optimizer, fit, lr_factor
from semimed.errors import SemimedError
from semimed.methods import Batch, create_method
from semimed.models.backbones import create_backbone

TRUNK = "features.1.3.weight"  # a conv in the middle of small_cnn
BN = "features.1.1"  # a BatchNorm of small_cnn's trunk


def make(strategy: str, **params) -> nn.Module:
    torch.manual_seed(0)
    model = create_backbone("small_cnn", num_classes=3, in_chans=1)
    return create_method("finetune", model, num_classes=3, multilabel=False, strategy=strategy, **params)


def batch(seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    return Batch(
        x=torch.randn(8, 1, 16, 16, generator=generator), y=torch.randint(0, 3, (8,), generator=generator)
    )


def snapshot(method: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in method.model.state_dict().items()}


def run_steps(method: nn.Module, steps: range, lr: float = 0.01) -> list[dict[str, torch.Tensor]]:
    """The engine's update, step by step: optimizer built once from parameter_groups(); snapshots after each."""
    optimizer = build_optimizer(method.parameter_groups(), TrainConfig(lr=lr, optimizer="adamw"))
    method.train()
    states = []
    for step in steps:
        method.train_step(batch(step), step).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        states.append(snapshot(method))
    return states


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], key: str) -> bool:
    return not torch.equal(before[key], after[key])


def test_linear_probe_trains_only_the_head() -> None:
    method = make("linear_probe")
    groups = method.parameter_groups()
    assert len(groups) == 1 and groups[0]["lr_scale"] == 1.0
    assert {id(p) for p in groups[0]["params"]} == {id(method.model.fc.weight), id(method.model.fc.bias)}
    start = snapshot(method)
    end = run_steps(method, range(5))[-1]
    assert changed(start, end, "fc.weight") and changed(start, end, "fc.bias")
    for key in start:
        if not key.startswith("fc."):  # weights AND BatchNorm statistics of the trunk stay as they were
            assert torch.equal(start[key], end[key]), key
    assert not dict(method.model.named_modules())[BN].training


def test_full_trains_everything_at_the_trunk_scale() -> None:
    method = make("full", trunk_lr_scale=0.5)
    groups = method.parameter_groups()
    assert [g["lr_scale"] for g in groups] == [1.0, 0.5]
    assert sum(len(g["params"]) for g in groups) == len(list(method.model.parameters()))
    start = snapshot(method)
    end = run_steps(method, range(3))[-1]
    assert changed(start, end, TRUNK) and changed(start, end, "fc.weight")
    assert changed(start, end, f"{BN}.running_mean")  # BatchNorm statistics follow the batches
    optimizer = build_optimizer(groups, TrainConfig(lr=0.02))
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.02, 0.01])


def test_gradual_probes_then_unfreezes_the_trunk_at_a_lower_lr() -> None:
    method = make("gradual", probe_steps=3)
    groups = method.parameter_groups()
    # The trunk is in the optimizer from the start (the engine builds it once), at 0.1 x the base LR.
    assert [g["lr_scale"] for g in groups] == [1.0, 0.1]
    assert sum(len(g["params"]) for g in groups) == len(list(method.model.parameters()))
    start = snapshot(method)
    states = run_steps(method, range(6))
    for step in range(3):  # steps 0, 1, 2: a linear probe
        assert not changed(start, states[step], TRUNK)
        assert not changed(start, states[step], f"{BN}.running_mean")
        assert changed(start, states[step], "fc.weight")
    assert method.trunk_trainable
    assert changed(states[2], states[3], TRUNK)  # step 3: the trunk trains
    assert changed(states[2], states[3], f"{BN}.running_mean")
    assert dict(method.model.named_modules())[BN].training
    # The first trunk update of Adam(W) moves each weight by about lr x trunk scale (|m/sqrt(v)| ~ 1).
    step_size = (states[3][TRUNK] - states[2][TRUNK]).abs().max().item()
    assert 0.0005 < step_size < 0.0012


def test_gradual_resumed_after_the_switch_unfreezes_at_its_first_step() -> None:
    method = make("gradual", probe_steps=10)
    assert not method.model.features[0][0].weight.requires_grad
    out = method.train_step(batch(), step=12)
    assert method.trunk_trainable and method.model.features[0][0].weight.requires_grad
    assert float(out.logs["trunk_trainable"]) == 1.0


def test_layer_decay_scales_each_layer_of_the_trunk() -> None:
    model = create_backbone("resnet18", num_classes=2)
    method = create_method("finetune", model, 2, False, strategy="full", trunk_lr_scale=1.0, layer_decay=0.5)
    groups = method.parameter_groups()
    # timm groups resnet18 as stem + 8 basic blocks: the deepest block trains at 0.5, the stem at 0.5 ** 9.
    assert [g["lr_scale"] for g in groups] == pytest.approx([1.0] + [0.5**k for k in range(1, 10)])
    named = {id(p): n for n, p in model.named_parameters()}
    assert {named[id(p)] for p in groups[1]["params"]} == {
        n for n, _ in model.layer4[1].named_parameters(prefix="layer4.1")
    }
    assert "conv1.weight" in {named[id(p)] for p in groups[-1]["params"]}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_freeze_bn_keeps_statistics_while_affine_weights_train() -> None:
    method = make("full", freeze_bn=True)
    start = snapshot(method)
    end = run_steps(method, range(3))[-1]
    assert not any(m.training for m in method.model.modules() if isinstance(m, nn.BatchNorm2d))
    assert torch.equal(start[f"{BN}.running_mean"], end[f"{BN}.running_mean"])
    assert changed(start, end, f"{BN}.weight") and changed(start, end, TRUNK)
    method.eval()
    method.train()  # the engine toggles modes around every evaluation: the rule survives it
    assert not dict(method.model.named_modules())[BN].training


def test_multilabel_with_unknown_entries() -> None:
    model = create_backbone("small_cnn", num_classes=4, in_chans=1)
    method = create_method("finetune", model, 4, True, strategy="full")
    y = torch.tensor([[1.0, 0.0, float("nan"), 0.0]]).repeat(8, 1)
    out = method.train_step(Batch(x=torch.randn(8, 1, 16, 16), y=y), 0)
    assert torch.isfinite(out.loss) and out.loss.item() > 0


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"strategy": "lora"}, "unknown method.params.strategy 'lora'; valid: linear_probe, full, gradual"),
        ({"probe_steps": -1}, "method.params.probe_steps=-1 must be >= 0"),
        ({"layer_decay": 1.5}, "method.params.layer_decay=1.5 must be in (0, 1]"),
        ({"warmup": 3}, "unknown parameter(s) warmup for method 'finetune'"),
    ],
)
def test_bad_parameters(params: dict, message: str) -> None:
    with pytest.raises(SemimedError) as excinfo:
        create_method("finetune", create_backbone("small_cnn", 2), 2, False, **params)
    assert message in str(excinfo.value)


def test_gradual_refuses_several_workers() -> None:
    method = make("gradual")
    with pytest.raises(SemimedError, match="scaling.num_workers=1"):
        method.wrap_models(lambda net: net)


def test_engine_runs_a_gradual_schedule_end_to_end(make_single_label_set, tmp_path: Path) -> None:
    """Through `fit`: the trunk is untouched at the end of the probe (checkpoint at step 4), trained after."""
    dataset = make_single_label_set(num_classes=2, patients_per_class=4, images_per_patient=4, size=16)
    pixels = np.stack([dataset.read_image(i).transpose(2, 0, 1) for i in range(len(dataset))])
    rows = np.arange(len(dataset))
    data = RunData(
        pixels=pixels,
        targets=dataset.labels,
        rows={"labeled": rows, "test": rows},
        classes=dataset.classes,
        multilabel=False,
        labeled_augment="none",
    )
    torch.manual_seed(0)
    model = create_backbone("small_cnn", num_classes=2, in_chans=3)
    initial = model.features[1][3].weight.detach().clone()
    method = create_method("finetune", model, 2, False, strategy="gradual", probe_steps=4)
    cfg = TrainConfig(steps=8, batch_size=8, lr=0.01, eval_every=4, checkpoint_every=4, device="cpu")
    saved: dict[int, dict] = {}

    def report(
        metrics: dict, checkpoint: str | None
    ) -> None:  # read while the run keeps it (it ends with one)
        if checkpoint is not None:
            saved[metrics["step"]] = torch.load(Path(checkpoint) / "state.pt", weights_only=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        final = fit(method, data, cfg, run_dir=tmp_path, report=report, show_progress=False)
    probe_end = saved[4]
    assert torch.equal(probe_end["method"]["model.features.1.3.weight"], initial)
    assert not torch.equal(model.features[1][3].weight, initial)
    assert final["step"] == 8 and lr_factor(0, cfg) == 1.0
