"""Pseudo-Label (Lee 2013, "Pseudo-Label: The Simple and Efficient Semi-Supervised Learning Method for Deep
Neural Networks"), in the thresholded form of Oliver et al. 2018 and USB: the network's own confident
predictions on unlabeled images become hard targets for those same images."""

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
    linear_rampup,
    pseudo_label_logs,
    pseudo_label_loss,
    register_thresholds,
)


@METHODS.register("pseudo_label")
class PseudoLabel(AlignsDistribution, Method):
    """loss = L_sup(x, y) + λ_u · ramp(step) · L_pl(u), one forward over [x; u_weak] (shared BatchNorm batch).

    Single-label: the pseudo-label of u is argmax_k p_k(u) of the current (detached) prediction, kept where
    max_k p_k(u) >= `threshold`; L_pl is cross-entropy to it, averaged over all μB unlabeled images.
    Multi-label (NaN = unknown labels): each finding k is its own binary problem on the sigmoid p_k(u): a
    confident positive where p_k >= threshold[k] (target 1), a confident negative where
    p_k <= negative_threshold[k] (target 0), ignored in between; L_pl is BCE over the confident entries,
    averaged over all μB·K entries. Both thresholds may be one number or one per finding.
    ramp: Lee's α(t), linear from 0 at step 0 to 1 at `rampup_steps`, so early, mostly wrong predictions
    barely count.

    Shapes: batch.x [B, C, H, W], batch.y [B] or [B, K]; batch.u_weak [μB, C, H, W]; logits [(1+μ)B, K].
    `distribution_alignment=True` (single-label) aligns the probabilities to the labeled class distribution
    first (ReMixMatch), as in FixMatch.
    Logs: sup_loss, unsup_loss, mask_rate, pseudo_acc (vs the hidden labels; never trained on), unsup_weight,
    and mask_rate / pseudo_acc per class.
    """

    needs = Needs(unlabeled=("weak",))
    param_rules = {
        "threshold": "[0, 1]",
        "negative_threshold": "[0, 1]",
        "lambda_u": "[0, inf)",
        "rampup_steps": "[0, inf)",
    }

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        multilabel: bool,
        threshold: float | Sequence[float] = 0.95,
        negative_threshold: float | Sequence[float] | None = None,
        lambda_u: float = 1.0,
        rampup_steps: int = 200,
        distribution_alignment: bool = False,
    ) -> None:
        super().__init__(model, num_classes, multilabel)
        if lambda_u < 0 or rampup_steps < 0:
            raise SemimedError(
                f"pseudo_label: lambda_u={lambda_u} and rampup_steps={rampup_steps} must be >= 0"
            )
        register_thresholds(self, threshold, negative_threshold, num_classes, multilabel, "pseudo_label")
        self.lambda_u = float(lambda_u)
        self.rampup_steps = int(rampup_steps)
        self.init_alignment(distribution_alignment, num_classes, multilabel, "pseudo_label")

    def train_step(self, batch: Batch, step: int) -> StepOutput:
        n = len(batch.x)
        logits = self.model(torch.cat([batch.x, batch.u_weak]))
        logits_x, logits_u = logits[:n], logits[n:]
        sup = supervised_loss(logits_x, batch.y, self.multilabel)
        probs = self.aligned(probabilities(logits_u.detach(), self.multilabel))
        targets, mask = confidence_targets(probs, self.multilabel, self.threshold, self.negative_threshold)
        unsup = pseudo_label_loss(logits_u, targets, mask, self.multilabel)
        weight = self.lambda_u * linear_rampup(step, self.rampup_steps)
        logs = {
            "sup_loss": sup.detach(),
            "unsup_loss": unsup.detach(),
            "unsup_weight": weight,
            **pseudo_label_logs(targets, mask, batch.u_true, self.multilabel, self.class_names),
        }
        return StepOutput(sup + weight * unsup, logs)
