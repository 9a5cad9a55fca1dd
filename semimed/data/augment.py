"""Weak / strong / eval transforms on uint8 tensors [C, H, W] -> normalized float tensors.

Weak (FixMatch's and the supervised control's): random flips and a reflect-padded translation of up to
12.5% of the side. Strong: weak + RandAugment (2 ops, magnitude 10) + Cutout (a square of half the side) —
ops that make sense for both H&E histology and grayscale X-rays (no colour-jitter that invents stains on
grayscale; torchvision's RandAugment is channel-agnostic). Normalization: the backbone's pretrained_cfg
mean/std for pretrained networks, 0.5/0.5 otherwise.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from semimed.errors import UnknownNameError

AUGMENTATIONS = ("none", "weak", "strong")


def normalization(channels: int, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
    mean = tuple(mean) if mean else (0.5,) * channels
    std = tuple(std) if std else (0.5,) * channels
    if len(mean) != channels:
        # A grayscale input into ImageNet statistics: timm sums the first conv over RGB, so average the stats.
        mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def build_transform(kind: str, image_size: int, channels: int, mean=None, std=None) -> v2.Transform:
    """`kind` in none|weak|strong; input uint8 [C, H, W] of side image_size, output float [C, H, W]."""
    if kind not in AUGMENTATIONS:
        raise UnknownNameError(f"unknown augmentation {kind!r}; valid: {', '.join(AUGMENTATIONS)}")
    steps: list[v2.Transform] = []
    if kind in ("weak", "strong"):
        pad = max(1, image_size // 8)
        steps += [
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomCrop(image_size, padding=pad, padding_mode="reflect"),
        ]
    if kind == "strong":
        steps += [v2.RandAugment(num_ops=2, magnitude=10)]
    steps.append(normalization(channels, mean, std))
    if kind == "strong":
        # Cutout (DeVries & Taylor 2017) as in FixMatch: one square of half the side, erased to the mean (0).
        steps.append(v2.RandomErasing(p=1.0, scale=(0.25, 0.25), ratio=(1.0, 1.0), value=0))
    return v2.Compose(steps)
