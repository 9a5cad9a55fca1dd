"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent"): non-contrastive self-supervised pretraining — the
online network predicts a slowly moving target network's projection of the other view; no negatives."""

from __future__ import annotations

import copy

import torch
from torch import nn

from semimed.methods.base import METHODS, Batch, DataInfo, StepOutput
from semimed.methods.common import Embedder, SelfSupervised
from semimed.models.parts import unwrap_model as unwrap
from semimed.optional import require


@METHODS.register("byol")
class BYOL(SelfSupervised):
    """loss = ½ [d(q(u_strong), z'(u_strong_2)) + d(q(u_strong_2), z'(u_strong))], d = negative cosine
    similarity (lightly's `NegativeCosineSimilarity`), q = predictor(projector(trunk)) of the online network,
    z' = projector(trunk) of the target network (no gradient).

    Target: a copy of the online trunk + projector, updated after every optimizer step as an EMA of them with
    momentum m(t) rising from `momentum` to 1 on a cosine over the run's steps (the paper's schedule;
    lightly's `cosine_schedule` and `update_momentum`). Only parameters are averaged; the target's BatchNorm
    keeps the statistics of its own forward passes (it runs in train mode, like the online network).
    Reads no label and no val/test image. Shapes: views [N, C, H, W]; projections [N, projection_dim].
    """

    param_rules = {"projection_dim": "[1, inf)", "hidden_dim": "[1, inf)", "momentum": "[0, 1]"}

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        multilabel: bool,
        projection_dim: int = 128,
        hidden_dim: int = 512,
        momentum: float = 0.99,
    ) -> None:
        require("lightly", "selfsup", "method byol")
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead

        projector = BYOLProjectionHead(int(model.num_features), int(hidden_dim), int(projection_dim))
        online = Embedder(
            model, nn.Sequential(projector, BYOLPredictionHead(projection_dim, hidden_dim, projection_dim))
        )
        super().__init__(online, num_classes, multilabel)
        self.target = Embedder(copy.deepcopy(model), copy.deepcopy(projector))
        self.target.requires_grad_(False)
        self.momentum, self.steps = float(momentum), 0
        self.criterion = NegativeCosineSimilarity()

    def setup(self, info: DataInfo) -> None:
        super().setup(info)
        self.steps = info.steps

    def train_step(self, batch: Batch, step: int) -> StepOutput:
        n = len(batch.u_strong)
        views = torch.cat([batch.u_strong, batch.u_strong_2])
        q = self.model(views).float()
        with torch.no_grad():
            z = self.target(views).float()
        loss = 0.5 * (self.criterion(q[:n], z[n:]) + self.criterion(q[n:], z[:n]))
        return StepOutput(loss, {"ssl_loss": loss.detach(), "target_momentum": self.momentum_at(step)})

    def momentum_at(self, step: int) -> float:
        from lightly.utils.scheduler import cosine_schedule

        return cosine_schedule(step, max(1, self.steps), self.momentum, 1.0)

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        from lightly.models.utils import update_momentum

        online = unwrap(self.model)
        m = self.momentum_at(step)
        update_momentum(online.backbone, self.target.backbone, m)
        update_momentum(online.head[0], self.target.head, m)

    def networks(self):
        yield self.model
        yield self.target
