"""Networks for GAN-based semi-supervised learning (Salimans et al. 2016; Odena 2016).

`Generator`: a DCGAN-style generator (Radford et al. 2016) sized to the image: z [B, latent_dim] -> a
[B, width, s0, s0] seed (s0 = image_size / 2^n, the first size <= 7 reached by halving) -> n transposed-conv
upsamplings (each doubling the side, halving the width, BatchNorm + ReLU) -> tanh image [B, C, H, W] in
[-1, 1], i.e. in the normalised space the discriminator sees under the 0.5/0.5 normalisation of
non-pretrained backbones. Salimans et al.'s CIFAR generator is this shape at 32 px: 4x4x512 -> 8 -> 16 -> 32.

`Discriminator`: the classifier backbone itself (any timm-style model with forward_features /
forward_head(pre_logits=True)), returning what GAN-SSL needs in one forward so that DDP sees one call:
class logits [B, K], a "real" logit [B] and the pooled features [B, F] used for feature matching.
"""

from __future__ import annotations

import torch
from torch import nn

from semimed.errors import SemimedError

MAX_SEED_SIDE = 7


def seed_side(image_size: int) -> tuple[int, int]:
    """(s0, n): halve `image_size` n times while it is even and above 7 (28 -> 7, n=2; 32 -> 4, n=3;
    64 -> 4, n=4; 224 -> 7, n=5)."""
    if image_size < 4:
        raise SemimedError(f"gan_ssl: image_size={image_size} is too small for a generator (>= 4)")
    side, n = image_size, 0
    while side > MAX_SEED_SIDE and side % 2 == 0:
        side, n = side // 2, n + 1
    return side, n


class Generator(nn.Module):
    """z [B, latent_dim] -> image [B, channels, image_size, image_size] in [-1, 1] (DCGAN-style)."""

    def __init__(self, image_size: int, channels: int, latent_dim: int = 100, width: int = 64) -> None:
        super().__init__()
        self.image_size, self.channels, self.latent_dim = image_size, channels, latent_dim
        side, n = seed_side(image_size)
        # Widths halve per upsampling and end at `width` before the output layer (DCGAN's 512-256-128-64 at
        # 64 px); the seed is capped at 8·width so 224 px stays a few million parameters.
        seed_width = width * 2 ** min(max(n - 1, 0), 3)
        self.seed = nn.Sequential(
            nn.Linear(latent_dim, seed_width * side * side, bias=False),
            nn.Unflatten(1, (seed_width, side, side)),
            nn.BatchNorm2d(seed_width),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        current = seed_width
        for _ in range(max(n - 1, 0)):
            out = max(width, current // 2)
            layers += [
                nn.ConvTranspose2d(current, out, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            current = out
        # The last layer makes the image: one more doubling when n >= 1, else a same-size 3x3 conv.
        if n >= 1:
            layers.append(nn.ConvTranspose2d(current, channels, 4, stride=2, padding=1))
        else:
            layers.append(nn.Conv2d(current, channels, 3, padding=1))
        layers.append(nn.Tanh())
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.seed(z))


class Discriminator(nn.Module):
    """The classifier as a GAN discriminator.

    `forward(x)` -> class logits [B, K] (what evaluation and `predict` use).
    `forward(x, with_features=True)` -> (class logits [B, K], real logit [B], pooled features [B, F]).

    Single-label (Salimans et al.): K+1 classes with the fake class's logit fixed at 0, so
    D(x) = Z/(Z+1) with Z = Σ_k exp(l_k), i.e. real logit = logsumexp_k l_k; no extra parameters.
    Multi-label: the K sigmoid outputs are independent findings, not a partition of "real", so a separate
    real/fake head `real_fake` (a linear layer on the pooled features, sharing the whole trunk) gives the real
    logit; D(x) = sigmoid(real logit).
    """

    def __init__(self, backbone: nn.Module, multilabel: bool) -> None:
        super().__init__()
        for name in ("forward_features", "forward_head", "num_features"):
            if not hasattr(backbone, name):
                raise SemimedError(
                    f"gan_ssl: backbone {type(backbone).__name__} lacks {name} (timm-style API)"
                )
        self.backbone = backbone
        self.real_fake = nn.Linear(int(backbone.num_features), 1) if multilabel else None

    def forward(self, x: torch.Tensor, with_features: bool = False):
        features = self.backbone.forward_features(x)
        logits = self.backbone.forward_head(features)
        if not with_features:
            return logits
        pooled = self.backbone.forward_head(features, pre_logits=True)
        if self.real_fake is None:
            real = torch.logsumexp(logits.float(), dim=1)
        else:
            real = self.real_fake(pooled).squeeze(1).float()
        return logits, real, pooled
