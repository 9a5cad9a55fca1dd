"""GAN-based semi-supervised learning (Salimans et al. 2016, "Improved Techniques for Training GANs", §5;
Odena 2016, "Semi-Supervised Learning with Generative Adversarial Networks"): the classifier is also the
discriminator, with a "fake" class beside the K real ones; the generator is trained by feature matching."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from semimed.errors import SemimedError
from semimed.losses import supervised_loss
from semimed.methods.base import METHODS, Batch, Method, Needs, StepOutput
from semimed.methods.common import pseudo_label_logs
from semimed.models.gan import Discriminator, Generator
from semimed.models.parts import unwrap_model as unwrap


@METHODS.register("gan_ssl")
class GanSSL(Method):
    """Discriminator/classifier D (the backbone; `self.model`) and generator G (`self.generator`).

    D's loss (the engine's optimizer, AMP, clipping and schedule apply to it):
        L_D = L_sup(x, y) + λ_u · ½ [ −log D(u) − log(1 − D(G(z))) ]
    Single-label: K+1 logits with the fake logit fixed at 0, so D(x) = Z/(Z+1), Z = Σ_k exp(l_k(x)); with
    r = logsumexp_k l_k, −log D = softplus(−r) and −log(1 − D) = softplus(r) (stable forms); L_sup is the
    cross-entropy over the K real classes, i.e. −log p(y | x, real).
    Multi-label (NaN = unknown labels): K sigmoid outputs trained with masked BCE, and a separate real/fake
    head on the shared trunk's pooled features gives r, with the same softplus terms. ½ weights as in
    Salimans et al.'s code.

    G's loss, feature matching: ‖mean_u f(u) − mean_z f(G(z))‖² / F over D's pooled features f [·, F]. It is
    computed with D's weights detached (torch.func.functional_call), in a BatchNorm batch [u; G(z)] whose
    running-statistics updates are discarded, so it moves only G; L_D sees G(z) detached, so it moves only D.
    The method returns L_D + L_G and the engine's single backward fills both networks' gradients; G's own
    Adam (β1 = 0.5, constant `generator_lr`) is one of the method's `extra_optimizers`, which the engine builds,
    checkpoints and restores; it steps in `update_parameters`, after D's step. Under fp16 the engine's
    GradScaler also scales G's gradients: Adam's update is invariant to that scale (up to eps), and a step
    with non-finite gradients is skipped, as GradScaler does for D. The exported backbone (`backbone()`) is the
    classifier inside the discriminator, in its own timm layout.

    `image_size` must equal data.image_size (it sizes G; a mismatch stops at the first step); `channels`
    defaults to the backbone's first convolution's input channels. TensorBoard: `gan/samples`, a grid of G's
    images from a fixed noise batch at each evaluation, mapped from [−1, 1] to [0, 1] (exact under the 0.5/0.5
    normalisation of non-pretrained backbones).

    Shapes: batch.x [B, C, H, W]; batch.u_weak [μB, C, H, W]; z [μB, latent_dim]; G(z) [μB, C, H, W];
    D's batch [B + 2μB, C, H, W]. Logs: sup_loss, unsup_loss, g_loss, d_real (mean D(u)), d_fake (mean
    D(G(z))), mask_rate (always 1: every unlabeled image is used as "real") and pseudo_acc (the classifier's
    argmax on u — multi-label: p >= 0.5 — against the hidden labels; never trained on).
    """

    needs = Needs(unlabeled=("weak",))
    param_rules = {
        "image_size": "[1, inf)",
        "channels": "[1, inf)",
        "latent_dim": "[1, inf)",
        "generator_width": "[1, inf)",
        "generator_lr": "(0, inf)",
        "generator_beta1": "[0, 1)",
        "lambda_u": "[0, inf)",
        "samples": "[1, inf)",
    }

    @classmethod
    def check_with_config(cls, params: dict[str, Any], cfg: Any) -> None:
        # The generator is sized by image_size; a mismatch would only stop at the first training step.
        size = params.get("image_size")
        if size is None:
            raise SemimedError(
                f"gan_ssl: set method.params.image_size to data.image_size ({cfg.data.image_size}; it sizes "
                "the generator)"
            )
        if size != cfg.data.image_size:
            raise SemimedError(
                f"method.params.image_size={size} must equal data.image_size={cfg.data.image_size} "
                "(it sizes gan_ssl's generator)"
            )

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        multilabel: bool,
        image_size: int | None = None,
        channels: int | None = None,
        latent_dim: int = 100,
        generator_width: int = 64,
        generator_lr: float = 2e-4,
        generator_beta1: float = 0.5,
        lambda_u: float = 1.0,
        samples: int = 64,
    ) -> None:
        super().__init__(Discriminator(model, multilabel), num_classes, multilabel)
        if image_size is None:
            raise SemimedError(
                "gan_ssl: set method.params.image_size to data.image_size (it sizes the generator)"
            )
        if channels is None:
            first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
            if first_conv is None:
                raise SemimedError(
                    "gan_ssl: cannot infer the image channels from the backbone; set method.params.channels"
                )
            channels = first_conv.in_channels
        if lambda_u < 0 or generator_lr <= 0 or not 0 <= generator_beta1 < 1:
            raise SemimedError(
                f"gan_ssl: lambda_u={lambda_u} must be >= 0, generator_lr={generator_lr} > 0, "
                f"generator_beta1={generator_beta1} in [0, 1)"
            )
        self.image_size, self.latent_dim, self.lambda_u = int(image_size), int(latent_dim), float(lambda_u)
        self.generator = Generator(self.image_size, int(channels), self.latent_dim, int(generator_width))
        self.generator_lr, self.generator_beta1 = float(generator_lr), float(generator_beta1)
        # A fixed noise batch, so the sample grids of successive evaluations are comparable.
        self.register_buffer("sample_z", torch.randn(samples, self.latent_dim))

    def train_step(self, batch: Batch, step: int) -> StepOutput:
        x, u = batch.x, batch.u_weak
        n, m = len(x), len(u)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise SemimedError(
                f"gan_ssl: method.params.image_size={self.image_size} but the images are "
                f"{x.shape[-2]}x{x.shape[-1]}; set it to data.image_size"
            )
        # Drawn from the run's torch generator (seeded per run by run_training; never reseeded here).
        fake = self.generator(torch.randn(m, self.latent_dim, device=x.device)).to(x.dtype)

        # Discriminator: labeled, unlabeled and generated images in one BatchNorm batch; G(z) detached.
        logits, real, _ = self.model(torch.cat([x, u, fake.detach()]), with_features=True)
        sup = supervised_loss(logits[:n], batch.y, self.multilabel)
        real_u, real_g = real[n : n + m], real[n + m :]
        unsup = 0.5 * (F.softplus(-real_u).mean() + F.softplus(real_g).mean())

        g_loss = self.feature_matching_loss(u, fake)

        logits_u = logits[n : n + m].detach().float()
        predicted = (logits_u >= 0).float() if self.multilabel else logits_u.argmax(dim=1)
        everything = torch.ones_like(logits_u if self.multilabel else logits_u[:, 0])
        logs = {
            "sup_loss": sup.detach(),
            "unsup_loss": unsup.detach(),
            "g_loss": g_loss.detach(),
            "d_real": torch.sigmoid(real_u.detach()).mean(),
            "d_fake": torch.sigmoid(real_g.detach()).mean(),
            **pseudo_label_logs(predicted, everything, batch.u_true, self.multilabel),
        }
        return StepOutput(sup + self.lambda_u * unsup + g_loss, logs)

    def feature_matching_loss(self, u: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """‖mean f(u) − mean f(fake)‖² / F over D's pooled features, through D with detached weights (so only
        G gets gradients) in one BatchNorm batch [u; fake] whose running-statistics updates are discarded.
        u, fake: [μB, C, H, W] -> scalar."""
        discriminator = unwrap(self.model)
        frozen = {name: p.detach() for name, p in discriminator.named_parameters()}
        frozen.update({name: b.clone() for name, b in discriminator.named_buffers()})
        _, _, features = torch.func.functional_call(
            discriminator, frozen, (torch.cat([u, fake]),), {"with_features": True}
        )
        features = features.float()
        m = len(u)
        return ((features[:m].detach().mean(dim=0) - features[m:].mean(dim=0)) ** 2).mean()

    def extra_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {
            "generator": torch.optim.Adam(
                self.generator.parameters(), lr=self.generator_lr, betas=(self.generator_beta1, 0.999)
            )
        }

    def update_parameters(self, loss: torch.Tensor, optimization, step: int) -> None:
        # One backward fills D's and G's gradients (each loss term reaches one network only); D steps through
        # the engine's optimizer (clipping, GradScaler, schedule), then G through its own Adam.
        optimization.update(loss)
        generator_optimizer = optimization.extra["generator"]
        grads = [p.grad for p in self.generator.parameters() if p.grad is not None]
        if grads and bool(torch.stack([g.isfinite().all() for g in grads]).all()):
            generator_optimizer.step()
        generator_optimizer.zero_grad(set_to_none=True)

    def backbone(self) -> nn.Module:
        return unwrap(self.model).backbone

    def wrap_models(self, wrap) -> None:
        self.model = wrap(self.model)
        self.generator = wrap(self.generator)

    def networks(self):
        yield self.model
        yield self.generator

    @torch.no_grad()
    def tensorboard_images(self) -> dict[str, torch.Tensor]:
        # The unwrapped generator: a DDP forward on rank 0 alone would wait forever on its buffer broadcast.
        generator = unwrap(self.generator)
        was_training = generator.training
        generator.eval()
        images = generator(self.sample_z)
        generator.train(was_training)
        return {"gan/samples": (images.float() + 1.0) / 2.0}
