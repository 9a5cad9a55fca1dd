"""Semi-supervised methods: one train_step each (single- and multi-label), the masks and ramps by hand, the EMA
teacher by hand, GAN-SSL's separation of discriminator and generator gradients, checkpoints through the engine."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from semimed.config import TrainConfig
from semimed.engine import Optimization, RunData, fit, latest_checkpoint, load_checkpoint
from semimed.errors import SemimedError
from semimed.methods import METHODS, Batch, DataInfo, create_method
from semimed.methods.common import (
    confidence_targets,
    ema_decay,
    ema_update_,
    linear_rampup,
    pseudo_label_logs,
    pseudo_label_loss,
    sigmoid_rampup,
    threshold_tensor,
)
from semimed.models.backbones import create_backbone
from semimed.models.gan import Generator, seed_side

SIZE = 16
# The methods of the published SSL studies (search_spaces/*_ssl.yaml).
STUDY_SSL_METHODS = {"pseudo_label", "fixmatch", "mean_teacher", "gan_ssl"}


def _params(name: str, **extra) -> dict:
    # A narrow generator keeps the GAN tests fast; the mechanics do not depend on its width.
    return (
        {"image_size": SIZE, "generator_width": 16, "latent_dim": 16, **extra} if name == "gan_ssl" else extra
    )


def _method(name: str, multilabel: bool, seed: int = 0, **params):
    """The method, set up (as the engine does) for the unlabeled pool of `_batch` (12 images)."""
    num_classes = 3 if multilabel else 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_backbone("small_cnn", num_classes, 3)
        method = create_method(name, model, num_classes, multilabel, **_params(name, **params))
    classes = [f"c{k}" for k in range(num_classes)]
    method.setup(DataInfo(num_labeled=6, num_unlabeled=12, classes=classes, multilabel=multilabel))
    return method


def _supports(name: str, multilabel: bool) -> bool:
    return not multilabel or METHODS.get(name).supports_multilabel


# Every registered semi-supervised method (labeled and unlabeled streams): a new one is tested here without
# editing this file. Self-supervised ones (no labeled stream) have tests/test_selfsup.py.
SSL_METHODS = [
    name
    for name in METHODS.names()
    if _method(name, False).needs.labeled and _method(name, False).needs.unlabeled
]


def _batch(multilabel: bool, seed: int = 0, n: int = 6, mu: int = 2) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, SIZE, SIZE, generator=g)
    u_weak = torch.randn(mu * n, 3, SIZE, SIZE, generator=g)
    u_strong = u_weak + 0.3 * torch.randn(mu * n, 3, SIZE, SIZE, generator=g)
    if multilabel:
        y = torch.randint(0, 2, (n, 3), generator=g).float()
        y[0, 1] = y[2, 0] = float("nan")  # unknown labels must be ignored, not propagate NaN
        u_true = torch.randint(0, 2, (mu * n, 3), generator=g).float()
        u_true[1, 2] = float("nan")
    else:
        y = torch.randint(0, 2, (n,), generator=g)
        u_true = torch.randint(0, 2, (mu * n,), generator=g)
    u_index = torch.arange(mu * n)
    return Batch(x=x, y=y, u_weak=u_weak, u_strong=u_strong, u_true=u_true, u_index=u_index)


def _step(method, batch: Batch, step: int = 0, seed: int = 0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return method.train_step(batch, step)


# ------------------------------------------------------------------------------------------------ mechanics


def test_rampups_and_ema_decay_by_hand():
    assert sigmoid_rampup(0, 10) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(5, 10) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(10, 10) == sigmoid_rampup(99, 10) == 1.0
    assert sigmoid_rampup(3, 0) == 1.0
    assert linear_rampup(0, 4) == 0.0 and linear_rampup(1, 4) == 0.25 and linear_rampup(8, 4) == 1.0
    assert linear_rampup(0, 0) == 1.0
    assert ema_decay(1, 0.99) == pytest.approx(1 / 2)
    assert ema_decay(2, 0.99) == pytest.approx(2 / 3)
    assert ema_decay(1000, 0.99) == pytest.approx(0.99)


def test_single_label_confidence_mask_loss_and_logs_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    targets, mask = confidence_targets(probs, False, torch.tensor(0.7))
    assert targets.tolist() == [0, 0, 1]
    assert mask.tolist() == [1.0, 0.0, 1.0]
    logs = pseudo_label_logs(targets, mask, torch.tensor([0, 1, 0]), multilabel=False)
    assert float(logs["mask_rate"]) == pytest.approx(2 / 3)
    assert float(logs["pseudo_acc"]) == pytest.approx(1 / 2)  # row 0 right, row 2 wrong, row 1 unused
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0))) / 3  # over ALL 3 images
    assert float(pseudo_label_loss(logits, targets, mask, False)) == pytest.approx(expected)
    # No confident prediction: the loss is 0 and the accuracy undefined (NaN, skipped by the engine's average).
    none_used = pseudo_label_logs(targets, torch.zeros(3), torch.tensor([0, 1, 0]), multilabel=False)
    assert math.isnan(float(none_used["pseudo_acc"]))


def test_multilabel_confidence_mask_loss_and_logs_by_hand():
    probs = torch.tensor([[0.97, 0.5, 0.01], [0.3, 0.96, 0.04]])
    targets, mask = confidence_targets(probs, True, torch.tensor(0.95))  # negative threshold 1 - 0.95
    assert targets.tolist() == [[1, 0, 0], [0, 1, 0]]
    assert mask.tolist() == [[1, 0, 1], [0, 1, 1]]
    # Per-finding thresholds: finding 1 needs 0.99 to be positive, finding 0 is negative below 0.4.
    targets2, mask2 = confidence_targets(
        probs, True, torch.tensor([0.95, 0.99, 0.95]), torch.tensor([0.4, 0.05, 0.05])
    )
    assert mask2.tolist() == [[1, 0, 1], [1, 0, 1]]
    assert targets2.tolist() == [[1, 0, 0], [0, 0, 0]]
    true = torch.tensor([[1.0, 1.0, float("nan")], [0.0, 0.0, 1.0]])
    logs = pseudo_label_logs(targets, mask, true, multilabel=True)
    assert float(logs["mask_rate"]) == pytest.approx(4 / 6)
    # Used entries with known truth: (0,0) right, (1,1) wrong, (1,2) wrong; (0,2) is used but unknown.
    assert float(logs["pseudo_acc"]) == pytest.approx(1 / 3)
    logits = torch.zeros(2, 3)
    assert float(pseudo_label_loss(logits, targets, mask, True)) == pytest.approx(4 * math.log(2) / 6)


def test_thresholds_are_validated():
    assert threshold_tensor([0.9, 0.8], 2, True, "t").tolist() == pytest.approx([0.9, 0.8])
    with pytest.raises(SemimedError, match="only for multi-label"):
        threshold_tensor([0.9, 0.8], 2, False, "threshold")
    with pytest.raises(SemimedError, match="3 findings"):
        threshold_tensor([0.9, 0.8], 3, True, "threshold")
    with pytest.raises(SemimedError, match=r"in \[0, 1\]"):
        threshold_tensor(1.5, 2, False, "threshold")
    with pytest.raises(SemimedError, match="negative_threshold"):
        _method("fixmatch", False, negative_threshold=0.1)


def test_ema_update_by_hand():
    student, teacher = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([1.0, 3.0]))
        teacher.weight.copy_(torch.tensor([0.0, 1.0]))
        student.running_mean.copy_(torch.tensor([4.0, 8.0]))
    student.num_batches_tracked.fill_(7)
    ema_update_(teacher, student, 0.75)
    assert teacher.weight.tolist() == pytest.approx([0.25, 1.5])  # 0.75 * t + 0.25 * s
    # By default the teacher keeps its own BatchNorm statistics.
    assert teacher.running_mean.tolist() == [0.0, 0.0] and int(teacher.num_batches_tracked) == 0
    ema_update_(teacher, student, 0.75, buffers=True)
    assert teacher.weight.tolist() == pytest.approx([0.4375, 1.875])
    assert teacher.running_mean.tolist() == pytest.approx([1.0, 2.0])
    assert int(teacher.num_batches_tracked) == 7


def test_every_ssl_method_is_registered():
    assert STUDY_SSL_METHODS <= set(SSL_METHODS)
    assert "supervised" in METHODS.names() and "supervised" not in SSL_METHODS


# ----------------------------------------------------------------------------------------- one train_step


@pytest.mark.parametrize("multilabel", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize("name", SSL_METHODS)
def test_one_step_gives_finite_loss_and_gradients_where_expected(name: str, multilabel: bool):
    if not _supports(name, multilabel):
        with pytest.raises(SemimedError, match="does not support multi-label"):
            _method(name, multilabel)
        return
    thresholded = name in ("pseudo_label", "fixmatch", "flexmatch")
    method = _method(name, multilabel, **({"threshold": 0.0} if thresholded else {}))
    method.train()
    out = _step(method, _batch(multilabel), step=500)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    for key in ("sup_loss", "unsup_loss", "mask_rate", "pseudo_acc"):
        assert key in out.logs, key
        assert not out.logs[key].requires_grad if isinstance(out.logs[key], torch.Tensor) else True
    assert float(out.logs["unsup_loss"]) > 0
    out.loss.backward()
    trained = list(method.model.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
    assert sum(float(p.grad.abs().sum()) for p in trained) > 0
    if name == "mean_teacher":
        assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    if name == "gan_ssl":
        generator = list(method.generator.parameters())
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in generator)
        assert sum(float(p.grad.abs().sum()) for p in generator) > 0
        # The engine's optimizer gets D's parameters only; G keeps its own Adam.
        engine_params = {id(p) for group in method.parameter_groups() for p in group["params"]}
        assert engine_params == {id(p) for p in trained}
        assert not engine_params & {id(p) for p in generator}


@pytest.mark.parametrize("multilabel", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize("name", ["pseudo_label", "fixmatch"])
def test_unsupervised_term_is_zero_at_threshold_one_and_positive_at_zero(name: str, multilabel: bool):
    batch = _batch(multilabel)
    strict = _step(_method(name, multilabel, threshold=1.0), batch, step=500)
    assert float(strict.logs["unsup_loss"]) == 0.0
    assert float(strict.logs["mask_rate"]) == 0.0
    assert math.isnan(float(strict.logs["pseudo_acc"]))
    assert float(strict.loss.detach()) == pytest.approx(float(strict.logs["sup_loss"]))
    loose = _step(_method(name, multilabel, threshold=0.0), batch, step=500)
    assert float(loose.logs["unsup_loss"]) > 0.0
    assert float(loose.logs["mask_rate"]) == 1.0
    # pseudo_acc is the share of pseudo-labels that match the hidden labels (known entries only).
    assert 0.0 <= float(loose.logs["pseudo_acc"]) <= 1.0


def test_pseudo_label_ramps_the_unlabeled_weight_linearly():
    method = _method("pseudo_label", False, threshold=0.0, lambda_u=2.0, rampup_steps=100)
    batch = _batch(False)
    for step, weight in ((0, 0.0), (25, 0.5), (100, 2.0), (400, 2.0)):
        out = _step(method, batch, step=step)
        assert out.logs["unsup_weight"] == pytest.approx(weight)
        expected = float(out.logs["sup_loss"]) + weight * float(out.logs["unsup_loss"])
        assert float(out.loss) == pytest.approx(expected, rel=1e-5)


def test_fixmatch_targets_come_from_the_weak_view_and_the_loss_from_the_strong_one():
    method = _method("fixmatch", False, threshold=0.0)
    method.eval()  # BatchNorm on running statistics: each image's logits do not depend on the rest of the batch
    batch = _batch(False)
    out = _step(method, batch)
    with torch.no_grad():
        targets = method.model(batch.u_weak).argmax(dim=1)
        expected = nn.functional.cross_entropy(method.model(batch.u_strong), targets)
    assert float(out.logs["unsup_loss"]) == pytest.approx(float(expected), rel=1e-5)


# ------------------------------------------------------------------------------------------- Mean Teacher


@pytest.mark.parametrize("multilabel", [False, True], ids=["single", "multi"])
def test_mean_teacher_teacher_is_the_ema_of_the_student_by_hand(multilabel: bool):
    method = _method("mean_teacher", multilabel, ema_decay=0.6)
    method.train()
    assert method.teacher.training  # batch statistics for the targets, as in the paper's code
    assert all(
        torch.equal(t, s)
        for t, s in zip(method.teacher.state_dict().values(), method.model.state_dict().values(), strict=True)
    )
    optimizer = torch.optim.SGD(method.parameter_groups()[0]["params"], lr=0.5)
    # α after update t: min(1 - 1/(t+1), 0.6) -> 1/2, then 0.6 (capped, not 2/3).
    for step, alpha in ((0, 0.5), (1, 0.6)):
        teacher_before = copy.deepcopy(method.teacher.state_dict())
        batch = _batch(multilabel, seed=step)
        out = _step(method, batch, step=step)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        method.after_optimizer_step(step)
        student = dict(method.model.named_parameters())
        for key, value in method.teacher.named_parameters():
            expected = alpha * teacher_before[key] + (1 - alpha) * student[key]
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=key)
        # BatchNorm statistics are the teacher's own: its first BN saw conv(u_weak) with the pre-update weights,
        # momentum 0.1.
        conv = teacher_before["features.0.0.weight"]
        batch_mean = nn.functional.conv2d(batch.u_weak, conv, padding=1).mean(dim=(0, 2, 3))
        expected_mean = 0.9 * teacher_before["features.0.1.running_mean"] + 0.1 * batch_mean
        torch.testing.assert_close(method.teacher.state_dict()["features.0.1.running_mean"], expected_mean)
        assert out.logs["ema_decay"] == pytest.approx(alpha)
    # The student moved, so teacher and student now differ; evaluation uses the teacher (in eval mode).
    method.eval()
    assert not method.teacher.training
    x = _batch(multilabel).x
    with torch.no_grad():
        assert torch.allclose(method.predict(x), method.teacher(x))
        assert not torch.allclose(method.predict(x), method.model(x))


def test_mean_teacher_consistency_by_hand_and_rampup():
    method = _method("mean_teacher", False, lambda_u=4.0, rampup_steps=10, student_view="weak")
    method.eval()
    with torch.no_grad():
        method.model.fc.bias.add_(torch.tensor([0.5, -0.5]))  # the student drifts from its teacher
    batch = _batch(False)
    out = _step(method, batch, step=5)
    with torch.no_grad():
        p_student = method.model(batch.u_weak).softmax(dim=1)
        p_teacher = method.teacher(batch.u_weak).softmax(dim=1)
    expected = float(((p_student - p_teacher) ** 2).mean())  # mean over all μB·K entries
    assert expected > 1e-4
    assert float(out.logs["unsup_loss"]) == pytest.approx(expected, rel=1e-5)
    assert out.logs["unsup_weight"] == pytest.approx(4.0 * math.exp(-5 * 0.25))
    with pytest.raises(SemimedError, match="student_view"):
        _method("mean_teacher", False, student_view="both")


class _FakeDDP(nn.Module):
    """Stands in for DistributedDataParallel: keeps the network at `.module`; a forward on it from one rank
    alone would hang in real DDP, so here it fails loudly."""

    def __init__(self, module: nn.Module, forward_ok: bool = True) -> None:
        super().__init__()
        self.module, self.forward_ok = module, forward_ok

    def forward(self, *args, **kwargs):
        if not self.forward_ok:
            raise AssertionError("forward through the DDP wrapper")
        return self.module(*args, **kwargs)


def test_mean_teacher_under_a_ddp_wrapper_updates_from_the_unwrapped_student():
    method = _method("mean_teacher", False)
    method.wrap_models(_FakeDDP)
    assert isinstance(method.model, _FakeDDP) and not isinstance(method.teacher, _FakeDDP)
    out = _step(method, _batch(False))
    out.loss.backward()
    with torch.no_grad():
        for p in method.model.parameters():
            p.add_(1.0)
    method.after_optimizer_step(0)  # α = 1/2
    for (name, t), s in zip(method.teacher.named_parameters(), method.model.module.parameters(), strict=True):
        assert torch.allclose(t, s - 0.5), name  # teacher = student_before; student = before + 1


# ------------------------------------------------------------------------------------------------ GAN-SSL


@pytest.mark.parametrize(
    ("size", "side", "ups"), [(28, 7, 2), (32, 4, 3), (64, 4, 4), (224, 7, 5), (6, 6, 0)]
)
def test_generator_is_sized_to_the_image(size: int, side: int, ups: int):
    assert seed_side(size) == (side, ups)
    for channels in (1, 3):
        images = Generator(size, channels, latent_dim=8, width=8)(torch.randn(2, 8))
        assert images.shape == (2, channels, size, size)
        assert float(images.abs().max()) <= 1.0


def test_gan_ssl_needs_the_image_size_and_checks_it():
    with pytest.raises(SemimedError, match="image_size"):
        create_method("gan_ssl", create_backbone("small_cnn", 2, 3), 2, False)
    method = _method("gan_ssl", False)
    bigger = Batch(x=torch.randn(2, 3, 32, 32), y=torch.tensor([0, 1]), u_weak=torch.randn(4, 3, 32, 32))
    with pytest.raises(SemimedError, match="data.image_size"):
        method.train_step(bigger, 0)
    assert method.generator.channels == 3
    gray = create_method("gan_ssl", create_backbone("small_cnn", 2, 1), 2, False, image_size=SIZE)
    assert gray.generator.channels == 1


def _grads(module: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("multilabel", [False, True], ids=["single", "multi"])
def test_gan_ssl_discriminator_and_generator_gradients_are_separate(multilabel: bool, monkeypatch):
    batch = _batch(multilabel)

    def grads_after_step(lambda_u: float, feature_matching: bool):
        method = _method("gan_ssl", multilabel, lambda_u=lambda_u)
        if not feature_matching:
            monkeypatch.setattr(method, "feature_matching_loss", lambda u, fake: 0.0 * fake.sum())
        _step(method, batch).loss.backward()
        return _grads(method.model), _grads(method.generator)

    d_full, g_full = grads_after_step(1.0, True)
    d_no_fm, g_no_fm = grads_after_step(1.0, False)
    d_heavier, g_heavier = grads_after_step(3.0, True)
    # Feature matching moves G only: without it D's gradients are unchanged and G has none.
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(d_full, d_no_fm, strict=True))
    assert all(float(g.abs().max()) == 0.0 for g in g_no_fm)
    # The discriminator's loss moves D only: weighting its unlabeled term changes D's gradients, not G's.
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_full, g_heavier, strict=True))
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(d_full, d_heavier, strict=True))


def test_gan_ssl_losses_match_the_k_plus_one_formulas():
    """Salimans et al.: D(x) = Z/(Z+1), unlabeled loss ½[-log D(u) - log(1 - D(G(z)))], written naively here."""
    method = _method("gan_ssl", False)
    method.eval()  # running statistics, so the per-image logits do not depend on the batch composition
    batch = _batch(False)
    out = _step(method, batch, seed=3)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(3)
        fake = method.generator(torch.randn(len(batch.u_weak), method.latent_dim))
        z_u = method.model(batch.u_weak).double().exp().sum(dim=1)
        z_g = method.model(fake).double().exp().sum(dim=1)
        d_u, d_g = z_u / (z_u + 1), z_g / (z_g + 1)
        expected = 0.5 * (-d_u.log().mean() - (1 - d_g).log().mean())
        sup = nn.functional.cross_entropy(method.model(batch.x), batch.y)
    assert float(out.logs["unsup_loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(out.logs["sup_loss"]) == pytest.approx(float(sup), rel=1e-5)
    assert float(out.logs["d_real"]) == pytest.approx(float(d_u.mean()), rel=1e-5)


def test_gan_ssl_multilabel_has_a_real_fake_head_on_the_shared_trunk():
    method = _method("gan_ssl", True)
    assert method.model.real_fake is not None and method.model.real_fake.in_features == 128
    assert _method("gan_ssl", False).model.real_fake is None
    logits = method.predict(_batch(True).x)
    assert logits.shape == (6, 3)


def _optimization(method) -> Optimization:
    return Optimization(method, TrainConfig(device="cpu"), torch.device("cpu"))


def test_gan_ssl_generator_steps_in_the_method_and_samples_use_the_unwrapped_generator():
    method = _method("gan_ssl", False, samples=5)
    optimization = _optimization(method)
    assert set(optimization.extra) == {"generator"}
    generator_params = {id(p) for g in optimization.extra["generator"].param_groups for p in g["params"]}
    assert generator_params == {id(p) for p in method.generator.parameters()}
    before = [p.detach().clone() for p in method.generator.parameters()]
    d_before = [p.detach().clone() for p in method.model.parameters()]
    method.update_parameters(_step(method, _batch(False)).loss, optimization, 0)
    assert any(not torch.equal(a, b) for a, b in zip(before, method.generator.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(d_before, method.model.parameters(), strict=True))
    assert all(p.grad is None for p in method.generator.parameters())
    method.wrap_models(lambda net: _FakeDDP(net, forward_ok=net is not method.generator))
    grid = method.tensorboard_images()["gan/samples"]
    assert grid.shape == (5, 3, SIZE, SIZE)
    assert 0.0 <= float(grid.min()) and float(grid.max()) <= 1.0
    assert method.generator.module.training  # restored after sampling in eval mode


def test_gan_ssl_skips_a_generator_step_with_non_finite_gradients():
    method = _method("gan_ssl", False)
    optimization = _optimization(method)
    before = [p.detach().clone() for p in method.generator.parameters()]
    out = _step(method, _batch(False))
    for p in method.generator.parameters():
        p.grad = torch.full_like(p, float("inf"))  # the backward below adds to them: still not finite
    method.update_parameters(out.loss, optimization, 0)
    assert all(torch.equal(a, b) for a, b in zip(before, method.generator.parameters(), strict=True))
    assert all(p.grad is None for p in method.generator.parameters())


def test_gan_ssl_exports_the_classifier_in_its_own_layout():
    method = _method("gan_ssl", True)
    plain = create_backbone("small_cnn", 3, 3)
    assert method.backbone() is method.model.backbone
    assert list(method.backbone().state_dict()) == list(
        plain.state_dict()
    )  # no `backbone.` prefix, no D head


# ------------------------------------------------------------------------------ through the engine's loop


def _run_data(multilabel: bool, n: int = 40) -> RunData:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (n, 3, SIZE, SIZE), dtype=np.uint8)
    if multilabel:
        labels = rng.integers(0, 2, (n, 3)).astype(np.float32)
        labels[::7, 1] = np.nan
        classes = ["a", "b", "c"]
    else:
        labels = np.arange(n) % 2
        classes = ["benign", "malignant"]
    rows = np.arange(n)
    parts = {"labeled": rows[:8], "unlabeled": rows[8:28], "val": rows[28:34], "test": rows[34:]}
    return RunData(pixels=pixels, targets=labels, rows=parts, classes=classes, multilabel=multilabel)


def _cfg(steps: int, **extra) -> TrainConfig:
    return TrainConfig(
        steps=steps, batch_size=4, unlabeled_ratio=2, eval_every=2, checkpoint_every=2, device="cpu", **extra
    )


class _Stop(RuntimeError):
    pass


# Methods with a training loop; closed-form ones (classical) have no steps to resume (tests/test_classical.py).
LOOP_METHODS = [name for name in METHODS.names() if not getattr(METHODS.get(name), "closed_form", False)]


@pytest.mark.parametrize("name", LOOP_METHODS)
def test_every_method_resumes_exactly_like_an_uninterrupted_run(name: str, tmp_path):
    """Stopped after step 4 and resumed in a fresh process-like setting (new method object, other init), a run
    ends with the same weights and optimizer state as one that ran through: the method's buffers, its extra
    optimizers (GAN-SSL's generator Adam), the schedule and the data streams all continue where they were."""

    def stop_at_4(metrics: dict, checkpoint: str | None) -> None:
        if metrics["step"] == 4:
            raise _Stop

    def run(folder, report=None, seed=0):
        method = _method(name, False, seed=seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            final = fit(method, _run_data(False), _cfg(6), run_dir=folder, report=report, show_progress=False)
        return method, final

    straight, straight_final = run(tmp_path / "straight")
    with pytest.raises(_Stop):
        run(tmp_path / "resumed", report=stop_at_4)
    resumed, resumed_final = run(tmp_path / "resumed", seed=1)  # other init: the checkpoint must overwrite it
    assert resumed_final["resumed_from_step"] == 4
    a = load_checkpoint(latest_checkpoint(tmp_path / "straight" / "checkpoints"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "resumed" / "checkpoints"))
    assert a["method"].keys() == b["method"].keys()
    for key in a["method"]:
        assert torch.equal(a["method"][key], b["method"][key]), key
    assert a["extra_optimizers"].keys() == b["extra_optimizers"].keys()
    for opt in a["extra_optimizers"]:
        for index, values in a["extra_optimizers"][opt]["state"].items():
            for key, value in values.items():
                assert torch.equal(value, b["extra_optimizers"][opt]["state"][index][key]), (opt, key)
    if METHODS.get(name).classifies:
        assert resumed_final["test/roc_auc"] == straight_final["test/roc_auc"]
    if name == "gan_ssl":
        assert a["extra_optimizers"]["generator"]["state"]  # G's Adam moments are in the checkpoint
    if name == "mean_teacher":
        assert any("teacher." in key for key in a["method"])


def test_fit_multilabel_ssl_smoke(tmp_path):
    for name in (n for n in SSL_METHODS if _supports(n, True)):
        final = fit(_method(name, True), _run_data(True), _cfg(2), show_progress=False)
        assert np.isfinite(final["train/loss"]), name


# ------------------------------------------------------------------------------------------ search spaces


@pytest.mark.parametrize(
    ("space", "num_classes", "multilabel"),
    [("breakhis_ssl", 2, False), ("chestxray14_ssl", 14, True), ("medmnist_ssl", 2, False)],
)
def test_ssl_search_spaces_build_every_method_with_the_matched_control(
    space: str, num_classes: int, multilabel: bool
):
    from pathlib import Path

    from semimed.tune import load_search_space

    loaded = load_search_space(Path(__file__).parents[1] / "search_spaces" / f"{space}.yaml")
    configs = [loaded.trial_config(cell) for cell in loaded.cells]
    names = {cfg.method.name for cfg in configs}
    assert names == {"supervised", *STUDY_SSL_METHODS}
    # The control and the SSL methods differ only in the method: same data, model and training settings.
    for field in ("data", "model", "train"):
        assert (
            len({(repr(getattr(cfg, field)), cfg.seed) for cfg in configs if cfg.data.fraction == 0.1}) == 3
        )
    assert {cfg.seed for cfg in configs} == {0, 1, 2}
    for cfg in configs:
        if cfg.method.name == "gan_ssl":
            assert cfg.method.params["image_size"] == cfg.data.image_size
        create_method(
            cfg.method.name,
            create_backbone("small_cnn", num_classes, 1),
            num_classes,
            multilabel,
            **cfg.method.params,
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("name", SSL_METHODS)
def test_fit_and_resume_on_cuda(name: str, amp: str, tmp_path):
    """Device placement without .cuda() in any method: the teacher and the generator follow the method, G's
    Adam state from a checkpoint lands on the GPU, fp16's GradScaler path runs."""

    def cfg(steps: int) -> TrainConfig:
        return _cfg(steps, device="cuda", amp=amp)

    final = fit(_method(name, False), _run_data(False), cfg(2), run_dir=tmp_path, show_progress=False)
    assert np.isfinite(final["train/loss"])
    resumed = _method(name, False, seed=1)
    again = fit(resumed, _run_data(False), cfg(4), run_dir=tmp_path, show_progress=False)
    assert again["resumed_from_step"] == 2 and np.isfinite(again["train/loss"])
    if name == "gan_ssl":
        assert next(resumed.generator.parameters()).device.type == "cuda"
        assert resumed.tensorboard_images()["gan/samples"].device.type == "cuda"
    if name == "mean_teacher":
        assert next(resumed.teacher.parameters()).device.type == "cuda"
