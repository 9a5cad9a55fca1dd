"""FlexMatch's curriculum thresholds by hand: the per-image state, the learning effects, the warm-up
denominator, the convex and linear mappings, the mask after the update — and its state in the checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semimed.errors import SemimedError
from semimed.methods import Batch, DataInfo, create_method
from semimed.methods.common import pseudo_label_logs
from semimed.models.backbones import create_backbone


def flexmatch(**params):
    method = create_method("flexmatch", create_backbone("small_cnn", 3, 3), 3, False, threshold=0.9, **params)
    method.setup(DataInfo(num_labeled=4, num_unlabeled=6, classes=["a", "b", "c"], multilabel=False))
    return method


def step(method, rows: list[int], probs: list[list[float]]):
    return method.pseudo_targets(torch.tensor(probs), Batch(u_index=torch.tensor(rows)))


def test_thresholds_and_mask_by_hand_with_warmup_and_the_convex_mapping() -> None:
    method = flexmatch()
    assert method.selected.tolist() == [-1] * 6
    assert method.class_thresholds().tolist() == [0.0, 0.0, 0.0]  # nothing learned: every image unused
    # Step 1: images 0 and 3 confidently class a (> 0.9), image 1 class b, image 2 not confident.
    targets, mask, logs = step(
        method, [0, 1, 2, 3], [[0.95, 0.03, 0.02], [0.05, 0.92, 0.03], [0.5, 0.3, 0.2], [0.97, 0.02, 0.01]]
    )
    assert method.selected.tolist() == [0, 1, -1, 0, -1, -1]
    # σ = (2, 1, 0), 3 unused -> β = σ / max(2, 3) = (2/3, 1/3, 0); M(x) = x / (2 - x) -> (1/2, 1/5, 0); × 0.9
    expected = [0.45, 0.18, 0.0]
    assert method.class_thresholds().tolist() == pytest.approx(expected)
    assert [float(logs[f"threshold/{c}"]) for c in "abc"] == pytest.approx(expected)
    assert targets.tolist() == [0, 1, 0, 0] and mask.tolist() == [
        1.0,
        1.0,
        1.0,
        1.0,
    ]  # 0.5 >= 0.45 for image 2
    # Step 2: image 2 now confidently b; image 5 is b at 0.85 (below τ: no update); image 4 is c at 0.5.
    targets, mask, logs = step(method, [4, 5, 2], [[0.2, 0.3, 0.5], [0.1, 0.85, 0.05], [0.05, 0.93, 0.02]])
    assert method.selected.tolist() == [0, 1, 1, 0, -1, -1]
    # σ = (2, 2, 0), 2 unused -> β = (1, 1, 0) -> thresholds (0.9, 0.9, 0)
    assert method.class_thresholds().tolist() == pytest.approx([0.9, 0.9, 0.0])
    assert targets.tolist() == [2, 1, 1] and mask.tolist() == [1.0, 0.0, 1.0]  # 0.85 < 0.9: image 5 unused
    per_class = pseudo_label_logs(targets, mask, None, False, ["a", "b", "c"])
    assert float(per_class["mask_rate/b"]) == pytest.approx(0.5) and float(per_class["mask_rate/c"]) == 1.0
    assert np.isnan(float(per_class["mask_rate/a"]))  # no image predicted as a in this batch


def test_without_warmup_and_with_the_linear_mapping() -> None:
    method = flexmatch(threshold_warmup=False, mapping="linear")
    step(method, [0, 1, 3], [[0.95, 0.03, 0.02], [0.05, 0.92, 0.03], [0.97, 0.02, 0.01]])
    # σ = (2, 1, 0) -> β = σ / max σ = (1, 1/2, 0); linear M -> × 0.9
    assert method.class_thresholds().tolist() == pytest.approx([0.9, 0.45, 0.0])


def test_state_is_sized_by_the_pool_checkpointed_and_checked() -> None:
    method = flexmatch()
    step(method, [0], [[0.95, 0.03, 0.02]])
    state = method.state_dict()
    assert state["selected"].tolist() == [0, -1, -1, -1, -1, -1]
    restored = flexmatch()
    restored.load_state_dict(state)
    assert restored.class_thresholds().tolist() == method.class_thresholds().tolist()
    unset = create_method("flexmatch", create_backbone("small_cnn", 3, 3), 3, False)
    with pytest.raises(SemimedError, match="setup"):
        unset.update_state(torch.tensor([[0.9, 0.05, 0.05]]), torch.tensor([0]))
    with pytest.raises(SemimedError, match="does not support multi-label"):
        create_method("flexmatch", create_backbone("small_cnn", 3, 3), 3, True)
    with pytest.raises(SemimedError, match="mapping"):
        flexmatch(mapping="concave")
