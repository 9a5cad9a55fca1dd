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
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3]])
    out = align(probs)
    # p_model = 0.5 * (0.5, 0.5) + 0.5 * mean(probs) = 0.5 * (0.5, 0.5) + 0.5 * (0.8, 0.2) = (0.65, 0.35)
    assert align.p_model.tolist() == pytest.approx([0.65, 0.35])
    ratio = torch.tensor([0.25 / 0.65, 0.75 / 0.35])
    expected = probs * ratio
    expected = expected / expected.sum(dim=1, keepdim=True)  # row 0: (0.346, 0.214) -> (0.618, 0.382)
    torch.testing.assert_close(out, expected)
    assert out[0].tolist() == pytest.approx([0.6180, 0.3820], abs=1e-3)
    assert align.state_dict()["p_model"].tolist() == pytest.approx([0.65, 0.35])  # checkpointed
    align.set_target([0, 0])  # no labeled image counted: the uniform prior stays
    assert align.p_target.tolist() == pytest.approx([0.25, 0.75])


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
