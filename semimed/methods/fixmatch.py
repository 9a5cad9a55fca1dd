"""FixMatch (Sohn et al. 2020, "FixMatch: Simplifying Semi-Supervised Learning with Consistency and
Confidence"): a confident prediction on a weakly augmented unlabeled image is the hard target for a strongly
augmented view of the same image."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from semimed.errors import SemimedError
from semimed.losses import probabilities, supervised_loss
from semimed.methods.base import METHODS, Batch, Method, Needs, StepOutput
from semimed.methods.common import (
    AlignsDistribution,
    confidence_targets,
    pseudo_label_logs,
    pseudo_label_loss,
    register_thresholds,
)


@METHODS.register("fixmatch")
class FixMatch(AlignsDistribution, Method):
    """loss = L_sup(x, y) + λ_u · L_u, one forward over [x; u_weak; u_strong] (the paper's shared BatchNorm
    batch; the weak half's prediction is detached and only makes targets).

    Views come from the data's two-view wrapper (`semimed.data.augment`): weak = flips + translation; strong =
    weak + RandAugment (2 ops, magnitude 10) + Cutout of half the side — ops chosen to be sensible for both H&E
    histology and grayscale X-rays. μ (unlabeled images per labeled one; the paper's 7) is the engine's
    `train.unlabeled_ratio`. There is no ramp-up: the threshold keeps early, unconfident predictions out.

    Single-label: target = argmax_k p_k(u_weak), used where max_k p_k >= `threshold` (0.95 in the paper);
    L_u = cross-entropy of the strong view's logits to it, averaged over all μB unlabeled images.
    Multi-label (NaN = unknown labels): per finding k on the weak view's sigmoid p_k, a confident positive
    where p_k >= threshold[k], a confident negative where p_k <= negative_threshold[k] (default
    1 − threshold), ignored in between; L_u = BCE of the strong view's logits over the confident entries,
    averaged over all μB·K entries.

    `distribution_alignment=True` (single-label): the weak view's probabilities are first aligned to the
    labeled class distribution (ReMixMatch; `common.DistributionAlignment`), for imbalanced sets.

    Shapes: batch.x [B, C, H, W]; batch.u_weak, batch.u_strong [μB, C, H, W]; logits [(1+2μ)B, K].
    Logs: sup_loss, unsup_loss, mask_rate, pseudo_acc (vs the hidden labels; never trained on), and both per
    class (`mask_rate/<class>`, `pseudo_acc/<class>`).
    """

    needs = Needs(unlabeled=("weak", "strong"))
    param_rules = {"threshold": "[0, 1]", "negative_threshold": "[0, 1]", "lambda_u": "[0, inf)"}

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        multilabel: bool,
        threshold: float | Sequence[float] = 0.95,
        negative_threshold: float | Sequence[float] | None = None,
        lambda_u: float = 1.0,
        distribution_alignment: bool = False,
    ) -> None:
        super().__init__(model, num_classes, multilabel)
        if lambda_u < 0:
            raise SemimedError(f"fixmatch: lambda_u={lambda_u} must be >= 0")
        register_thresholds(self, threshold, negative_threshold, num_classes, multilabel, "fixmatch")
        self.lambda_u = float(lambda_u)
        self.init_alignment(distribution_alignment, num_classes, multilabel, "fixmatch")

    def train_step(self, batch: Batch, step: int) -> StepOutput:
        n, m = len(batch.x), len(batch.u_weak)
        logits = self.model(torch.cat([batch.x, batch.u_weak, batch.u_strong]))
        logits_x, logits_weak, logits_strong = logits[:n], logits[n : n + m], logits[n + m :]
        sup = supervised_loss(logits_x, batch.y, self.multilabel)
        probs = self.aligned(probabilities(logits_weak.detach(), self.multilabel))
        targets, mask, extra_logs = self.pseudo_targets(probs, batch)
        unsup = pseudo_label_loss(logits_strong, targets, mask, self.multilabel)
        logs = {
            "sup_loss": sup.detach(),
            "unsup_loss": unsup.detach(),
            **pseudo_label_logs(targets, mask, batch.u_true, self.multilabel, self.class_names),
            **extra_logs,
        }
        return StepOutput(sup + self.lambda_u * unsup, logs)

    def pseudo_targets(
        self, probs: torch.Tensor, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(hard targets, mask, extra logs) from the weak view's detached probabilities [μB, K]: the fixed
        confidence threshold here; class-aware variants (FlexMatch) override this."""
        targets, mask = confidence_targets(probs, self.multilabel, self.threshold, self.negative_threshold)
        return targets, mask, {}
