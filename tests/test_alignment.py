"""Distribution alignment (ReMixMatch) by hand, and that the option really reaches the pseudo-labels of every
method that offers it (an option that is silently ignored would be a wrong answer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semimed.errors import SemimedError
from semimed.methods import Batch, DataInfo, create_method
from semimed.methods.common import DistributionAlignment
from semimed.models.backbones import create_backbone


def test_alignment_by_hand() -> None:
    align = DistributionAlignment(2, momentum=0.5)
    align.set_target([1, 3])  # labeled prior (0.25, 0.75)
    first = torch.tensor([[0.9, 0.1], [0.7, 0.3]])
    out = align(first)
    # The first batch sets p_model to its mean (0.8, 0.2): no uniform start to average away.
    assert align.p_model.tolist() == pytest.approx([0.8, 0.2])
    expected = first * torch.tensor([0.25 / 0.8, 0.75 / 0.2])
    torch.testing.assert_close(out, expected / expected.sum(dim=1, keepdim=True))
    assert out[0].tolist() == pytest.approx([0.4286, 0.5714], abs=1e-3)  # (0.28125, 0.375) renormalized
    second = torch.tensor([[0.6, 0.4], [0.4, 0.6]])
    out = align(second)
    # then the running mean: 0.5 * (0.8, 0.2) + 0.5 * (0.5, 0.5) = (0.65, 0.35)
    assert align.p_model.tolist() == pytest.approx([0.65, 0.35])
    expected = second * torch.tensor([0.25 / 0.65, 0.75 / 0.35])
    torch.testing.assert_close(out, expected / expected.sum(dim=1, keepdim=True))
    state = align.state_dict()  # checkpointed, the start included: a resumed run does not restart the mean
    assert state["p_model"].tolist() == pytest.approx([0.65, 0.35]) and bool(state["started"])
    align.set_target([0, 0])  # no labeled image counted: the prior stays
    assert align.p_target.tolist() == pytest.approx([0.25, 0.75])


def test_alignment_raises_the_minority_class_from_the_first_step() -> None:
    """A network whose predictions lean to the majority class more than the labeled prior does gets its
    minority-class probabilities raised, from the first step on. With p_model starting uniform (momentum
    0.999, 82% of the start left after 200 steps) the rescaling was about the prior itself and LOWERED the
    minority class for the whole of a short run."""
    align = DistributionAlignment(2)  # the default momentum 0.999
    align.set_target([27, 73])  # BreastMNIST-like: 27% malignant
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        minority = 0.15 + 0.05 * torch.rand(64, generator=generator)  # mean prediction ~(0.175, 0.825)
        probs = torch.stack([minority, 1 - minority], dim=1)
        out = align(probs)
        assert float(out[:, 0].mean()) > float(probs[:, 0].mean())  # raised toward the 0.27 prior
    assert float(out[:, 0].mean()) == pytest.approx(0.27, abs=0.03)


@pytest.mark.parametrize("name", ["pseudo_label", "fixmatch", "flexmatch"])
def test_the_option_reaches_the_pseudo_labels(name: str, monkeypatch) -> None:
    """The probabilities the pseudo-labels are made from are the aligned ones (with the labeled prior set by
    setup), and the raw ones without the option."""
    seen: dict[bool, torch.Tensor] = {}
    from semimed.methods import common

    original = common.confidence_targets

    def capture(probs, *args, **kwargs):
        seen[flag] = probs.clone()
        return original(probs, *args, **kwargs)

    monkeypatch.setattr(f"semimed.methods.{name}.confidence_targets", capture, raising=False)
    g = torch.Generator().manual_seed(0)
    batch = Batch(
        x=torch.randn(4, 3, 16, 16, generator=g),
        y=torch.tensor([0, 1, 1, 1]),
        u_weak=torch.randn(8, 3, 16, 16, generator=g),
        u_strong=torch.randn(8, 3, 16, 16, generator=g),
        u_true=torch.zeros(8, dtype=torch.long),
        u_index=torch.arange(8),
    )
    raw = {}
    for flag in (False, True):
        torch.manual_seed(0)
        method = create_method(
            name, create_backbone("small_cnn", 2, 3), 2, False, distribution_alignment=flag
        )
        method.setup(DataInfo(4, 8, ["a", "b"], False, np.array([1.0, 3.0])))
        method.eval()  # BatchNorm on running statistics: the raw probabilities are the same for both runs
        if name == "flexmatch":  # FlexMatch makes its targets itself: capture what its thresholds see
            monkeypatch.setattr(type(method), "update_state", _recorder(seen, flag))
        torch.manual_seed(1)
        method.train_step(batch, 0)
        raw[flag] = method
    assert not torch.allclose(seen[False], seen[True])
    assert raw[True].align.p_target.tolist() == pytest.approx([0.25, 0.75])
    expected = seen[False] * (raw[True].align.p_target / raw[True].align.p_model)
    torch.testing.assert_close(seen[True], expected / expected.sum(dim=1, keepdim=True), rtol=1e-5, atol=1e-6)


def _recorder(seen: dict, flag: bool):
    def update_state(self, probs, index) -> None:
        seen[flag] = probs.clone()

    return update_state


def test_alignment_refuses_multilabel() -> None:
    with pytest.raises(SemimedError, match="distribution_alignment is for single-label"):
        create_method("fixmatch", create_backbone("small_cnn", 3, 3), 3, True, distribution_alignment=True)
