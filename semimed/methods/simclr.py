"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations"):
self-supervised pretraining of the backbone on unlabeled images; the run's product is its backbone, which a
fine-tuning run starts from (`model.pretrained_checkpoint=RUN_DIR`, or `pretrain.method: simclr`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from semimed.methods.base import METHODS, Batch, StepOutput
from semimed.methods.common import Embedder, SelfSupervised
from semimed.optional import require


@METHODS.register("simclr")
class SimCLR(SelfSupervised):
    """loss = NT-Xent(z(u_strong), z(u_strong_2)): each image's two strong views are a positive pair, the other
    2(N − 1) views of the batch its negatives; z = projection MLP on the pooled trunk features (lightly's
    `SimCLRProjectionHead` and `NTXentLoss`, temperature τ).

    Reads no label and no val/test image: its stream is every training image, two strong views each (weak +
    RandAugment + Cutout — sensible for H&E and grayscale alike; no colour jitter that would invent stains).
    The two views go through one forward (one BatchNorm batch). Logs the mean cosine similarity of the
    positive pairs (it rises as the views' embeddings agree).
    Shapes: batch.u_strong, batch.u_strong_2 [N, C, H, W]; z [2N, projection_dim].
    """

    param_rules = {"temperature": "(0, inf)", "projection_dim": "[1, inf)", "hidden_dim": "[1, inf)"}

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        multilabel: bool,
        temperature: float = 0.5,
        projection_dim: int = 128,
        hidden_dim: int = 512,
    ) -> None:
        require("lightly", "selfsup", "method simclr")
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        head = SimCLRProjectionHead(int(model.num_features), int(hidden_dim), int(projection_dim))
        super().__init__(Embedder(model, head), num_classes, multilabel)
        self.temperature = float(temperature)
        self.criterion = NTXentLoss(temperature=self.temperature)

    def train_step(self, batch: Batch, step: int) -> StepOutput:
        n = len(batch.u_strong)
        z = self.model(torch.cat([batch.u_strong, batch.u_strong_2]))
        z0, z1 = z[:n], z[n:]
        loss = self.criterion(z0.float(), z1.float())
        similarity = F.cosine_similarity(z0.detach().float(), z1.detach().float()).mean()
        return StepOutput(loss, {"ssl_loss": loss.detach(), "positive_similarity": similarity})

    def wrap_models(self, wrap) -> None:
        from lightly.loss import NTXentLoss

        super().wrap_models(wrap)
        # Under DDP the negatives are every rank's views (SimCLR's large effective batch).
        self.criterion = NTXentLoss(temperature=self.temperature, gather_distributed=True)
