"""Supervised baseline — the matched control every SSL method is compared with (Oliver et al. 2018):
same backbone, weak augmentation, step budget, optimizer and schedule; it simply ignores unlabeled data."""

from __future__ import annotations

from semimed.losses import supervised_loss
from semimed.methods.base import METHODS, Batch, Method, StepOutput


@METHODS.register("supervised")
class Supervised(Method):
    """Cross-entropy (single-label) or masked BCE (multi-label) on the labeled batch."""

    def train_step(self, batch: Batch, step: int) -> StepOutput:
        loss = supervised_loss(self.model(batch.x), batch.y, self.multilabel)
        return StepOutput(loss, {"sup_loss": loss.detach()})
