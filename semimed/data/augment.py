"""Weak / strong / eval transforms on uint8 tensors [C, H, W] -> uint8 [C, H, W].

Transforms stay in uint8 on the CPU (cheap, 4x less to copy); the engine converts to float and normalizes on
the device (`Normalizer`), which keeps data loading off the critical path on a GPU.

Weak (FixMatch's and the supervised control's): random flips and a reflect-padded translation of up to
12.5% of the side. Strong: weak + RandAugment (2 ops, magnitude 10) + Cutout (a square of half the side,
filled with mid-grey) — ops that make sense for both H&E histology and grayscale X-rays (torchvision's
RandAugment is channel-agnostic; no colour jitter that would invent stains on grayscale). Normalization: the
backbone's pretrained_cfg mean/std for pretrained networks, 0.5/0.5 otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

from semimed.errors import UnknownNameError

AUGMENTATIONS = ("none", "weak", "strong")


def build_transform(kind: str, image_size: int) -> v2.Transform:
    """`kind` in none|weak|strong; input and output uint8 [C, H, W] of side image_size."""
    if kind not in AUGMENTATIONS:
        raise UnknownNameError(f"unknown augmentation {kind!r}; valid: {', '.join(AUGMENTATIONS)}")
    if kind == "none":
        return v2.Identity()
    pad = max(1, image_size // 8)
    steps: list[v2.Transform] = [
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.RandomCrop(image_size, padding=pad, padding_mode="reflect"),
    ]
    if kind == "strong":
        # Cutout (DeVries & Taylor 2017) as in FixMatch: one square of half the side (a quarter of the area).
        steps += [
            v2.RandAugment(num_ops=2, magnitude=10),
            v2.RandomErasing(p=1.0, scale=(0.25, 0.25), ratio=(1.0, 1.0), value=127),
        ]
    return v2.Compose(steps)


class Normalizer:
    """uint8 [B, C, H, W] on the device -> float (x/255 - mean) / std, with per-channel statistics.

    A grayscale input with RGB statistics (ImageNet weights adapted by timm's `in_chans`, which sums the first
    conv over RGB) uses the average of the RGB statistics.
    """

    def __init__(
        self, channels: int, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
    ):
        mean = tuple(mean) if mean else (0.5,) * channels
        std = tuple(std) if std else (0.5,) * channels
        if len(mean) != channels:
            mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images  # already float (e.g. tensors built by a test or a benchmark)
        key = (images.device, images.dtype)
        if key not in self._cache:
            self._cache[key] = (self.mean.to(images.device), self.std.to(images.device))
        mean, std = self._cache[key]
        return (images.float().div_(255.0) - mean) / std
