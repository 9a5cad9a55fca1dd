"""FlexMatch (Zhang et al. 2021, "FlexMatch: Boosting Semi-Supervised Learning with Curriculum Pseudo
Labeling"): FixMatch with one confidence threshold per class that rises as the class is learned, so that a
class the network is still bad at (often the minority class of a medical set) is not starved of pseudo-labels
by one high threshold that mostly the majority class clears.

It needs what the old engine could not give a method: the position of each unlabeled image in the pool
(`batch.u_index`) and state sized by the pool (`setup`), kept in the checkpoint.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from semimed.errors import SemimedError
from semimed.methods.base import METHODS, Batch, DataInfo
from semimed.methods.fixmatch import FixMatch

MAPPINGS = ("convex", "linear")


@METHODS.register("flexmatch")
class FlexMatch(FixMatch):
    """FixMatch's loss (weak view makes the targets, strong view is trained on them), with class-wise thresholds.

    State: `selected[i]` for every unlabeled image i of the pool: the class its weak view was last predicted
    with confidence above `threshold` (τ), or -1 if never. Each step, for the batch's images:

        selected[u_index] <- argmax p(u_weak)   where max p(u_weak) > τ          (the update)
        σ(c) = #{i : selected[i] = c}                                            (learning effect of c)
        β(c) = σ(c) / max(max_c' σ(c'), #{i : selected[i] = -1})                 (threshold_warmup=True)
             = σ(c) / max_c' σ(c')                                                (threshold_warmup=False)
        T(c) = M(β(c)) · τ,  M(x) = x / (2 − x) (convex) or x (linear)
        mask = max p(u_weak) >= T(argmax p(u_weak))                               (after the update)

    With warm-up, thresholds start at 0 for every class (nothing is learned yet: every image counts as unused)
    and rise to τ for the best-learned class; the denominator keeps them low while most of the pool is still
    unused. Under DDP the batch's (index, class) updates are gathered from every rank, so all ranks keep the
    same state. Single-label only.

    Logs (besides FixMatch's, which include mask_rate and pseudo_acc per class): `threshold/<class>` T(c).
    """

    supports_multilabel = False
    param_rules = {"mapping": MAPPINGS}  # with FixMatch's

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        multilabel: bool,
        threshold: float = 0.95,
        lambda_u: float = 1.0,
        mapping: str = "convex",
        threshold_warmup: bool = True,
        distribution_alignment: bool = False,
    ) -> None:
        super().__init__(
            model,
            num_classes,
            multilabel,
            threshold=threshold,
            lambda_u=lambda_u,
            distribution_alignment=distribution_alignment,
        )
        if mapping not in MAPPINGS:
            raise SemimedError(f"flexmatch: mapping={mapping!r}; valid: {', '.join(MAPPINGS)}")
        self.mapping, self.threshold_warmup = mapping, bool(threshold_warmup)
        self.register_buffer("selected", torch.zeros(0, dtype=torch.long))

    def setup(self, info: DataInfo) -> None:
        super().setup(info)
        # Sized by the unlabeled pool; a persistent buffer, so a resumed run continues with the same state.
        self.register_buffer("selected", torch.full((info.num_unlabeled,), -1, dtype=torch.long))

    @torch.no_grad()
    def class_thresholds(self) -> torch.Tensor:
        """T(c) for every class [K], from the current state."""
        counts = torch.bincount(self.selected[self.selected >= 0], minlength=self.num_classes).float()
        denominator = counts.max()
        if self.threshold_warmup:
            denominator = torch.maximum(denominator, (self.selected < 0).sum().float())
        beta = counts / denominator.clamp(min=1.0)
        mapped = beta / (2.0 - beta) if self.mapping == "convex" else beta
        return mapped * self.threshold

    @torch.no_grad()
    def update_state(self, probs: torch.Tensor, index: torch.Tensor) -> None:
        """Record the confident predictions of the images at pool positions `index` [μB] (probs [μB, K])."""
        if len(self.selected) == 0:
            raise SemimedError("flexmatch: setup() was not called with the unlabeled pool's size")
        confidence, predicted = probs.max(dim=1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            index, predicted, confidence = (_gather(t) for t in (index, predicted, confidence))
        confident = confidence > self.threshold
        self.selected[index[confident].to(self.selected.device)] = predicted[confident].to(
            self.selected.device
        )

    def pseudo_targets(
        self, probs: torch.Tensor, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        self.update_state(probs, batch.u_index)
        thresholds = self.class_thresholds().to(probs.device)
        confidence, targets = probs.max(dim=1)
        mask = (confidence >= thresholds[targets]).float()
        logs = {f"threshold/{name}": thresholds[k] for k, name in enumerate(self.class_names)}
        return targets, mask, logs


def _gather(tensor: torch.Tensor) -> torch.Tensor:
    """The concatenation of `tensor` over every DDP rank (equal shapes: each rank holds an equal batch share)."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)
