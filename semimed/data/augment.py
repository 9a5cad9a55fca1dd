"""Weak / strong / eval transforms on uint8 tensors [C, H, W] -> uint8 [C, H, W].

Transforms stay in uint8 on the CPU (cheap, 4x less to copy); the engine converts to float and normalizes on
the device (`Normalizer`), which keeps data loading off the critical path on a GPU.

Weak (FixMatch's and the supervised control's): random flips and a reflect-padded translation of up to
12.5% of the side. Strong: weak + RandAugment (2 ops, magnitude 10) + Cutout (a square of half the side,
filled with mid-grey) — ops that make sense for both H&E histology and grayscale X-rays (torchvision's
RandAugment is channel-agnostic; no colour jitter that would invent stains on grayscale). Normalization: the
backbone's pretrained_cfg mean/std for pretrained networks, 0.5/0.5 otherwise.

The same views of a whole uint8 batch [B, C, H, W], built on the training device with per-sample parameters
(`augment_batch`, `data.augment_device: cuda`), are in the second half of this file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
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


# ------------------------------------------------------------------------------------------------------------
# Batched views on the device (`data.augment_device: cuda`)
#
# The same weak and strong views, built from a whole uint8 batch [B, C, H, W] where it lives (the GPU, or the
# CPU in tests and CPU benchmarks), with PER-SAMPLE random parameters. The parameters (a few numbers per image)
# are drawn on the CPU from an explicit generator seeded by (run seed, step, rank): a resumed run draws exactly
# what the uninterrupted one did, torch's global generator is left alone, the same step gets the same views on
# any device, and which images take which RandAugment op is known on the host, so each op runs on its own
# images only, without a device sync. RandAugment samples each op's magnitude per sample and per call,
# uniformly over the op's full range, as FixMatch's RandAugmentMC and USB do (the per-image CPU path above keeps
# torchvision's fixed magnitude 10 of 30), so the two paths draw from different distributions: which one ran is
# part of a run's result (`data.augment_device` is not an operational key).
# ------------------------------------------------------------------------------------------------------------

CUTOUT_FILL = 127
# RandAugment's op pool (torchvision's, which is FixMatch's), with the largest magnitude of each op: a sample's
# op gets magnitude m·max, m ~ U(0, 1), with a random sign for the signed ones.
GEOMETRIC_OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate")
COLOR_OPS = (
    "brightness",
    "color",
    "contrast",
    "sharpness",
    "posterize",
    "solarize",
    "autocontrast",
    "equalize",
)
RAND_AUGMENT_OPS = GEOMETRIC_OPS + COLOR_OPS
MAX_SHEAR, MAX_TRANSLATE, MAX_ROTATE_DEG, MAX_FACTOR = 0.3, 0.3, 30.0, 0.9


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The CPU generator of step `step`'s view parameters, seeded from (seed, step, rank) alone: the views of
    step s are the same whether the run got there uninterrupted or resumed (SeedSequence mixes the three into
    well-separated streams)."""
    state = np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def _to(device: torch.device, tensor: torch.Tensor) -> torch.Tensor:
    """A host tensor of parameters on `device` without a sync: a copy from pageable memory would wait for the
    device's queue (the previous step's backward) before the next batch could be queued."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def weak_params(n: int, size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Per-sample flips (p = 0.5 each) and shifts in [-pad, pad], pad = max(1, size // 8) ([n] each, CPU)."""
    pad = max(1, size // 8)
    flips = torch.rand((2, n), generator=generator) < 0.5
    shifts = torch.randint(-pad, pad + 1, (2, n), generator=generator)
    return {"flip_v": flips[0], "flip_h": flips[1], "shift_y": shifts[0], "shift_x": shifts[1]}


def _source_index(size: int, shift: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """[n, size] source pixel of each output pixel: flip, then a reflect-padded shift (RandomCrop's
    padding_mode="reflect": the edge pixel is not repeated)."""
    k = torch.arange(size, device=shift.device) + shift[:, None]
    k = torch.where(k < 0, -k, k)
    k = torch.where(k > size - 1, 2 * (size - 1) - k, k)
    return torch.where(flip[:, None], size - 1 - k, k)


def flip_translate(images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """uint8 [B, C, H, W] -> the weak view with the given per-sample parameters (two gathers, no padding)."""
    b, c, h, w = images.shape
    p = {k: _to(images.device, v) for k, v in params.items()}
    rows = _source_index(h, p["shift_y"], p["flip_v"])
    cols = _source_index(w, p["shift_x"], p["flip_h"])
    out = images.gather(2, rows[:, None, :, None].expand(b, c, h, w))
    return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))


def weak_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Weak view of a uint8 batch [B, C, H, W]: per-sample random flips and reflect-padded translation."""
    return flip_translate(images, weak_params(len(images), images.shape[-1], generator))


def cutout_params(n: int, size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Top-left corner of each sample's square of side round(size / 2) (a quarter of the area), inside the image
    as torchvision's RandomErasing places it ([n] each, CPU)."""
    side = int(round(size / 2))
    corner = torch.randint(0, size - side + 1, (2, n), generator=generator)
    return {"top": corner[0], "left": corner[1], "side": torch.full((n,), side)}


def cutout(images: torch.Tensor, params: dict[str, torch.Tensor], fill: int = CUTOUT_FILL) -> torch.Tensor:
    """Fill each sample's square (`cutout_params`) with `fill` (Cutout, DeVries & Taylor 2017)."""
    h, w = images.shape[-2:]
    p = {k: _to(images.device, v) for k, v in params.items()}
    ys = torch.arange(h, device=images.device)[None, :] - p["top"][:, None]
    xs = torch.arange(w, device=images.device)[None, :] - p["left"][:, None]
    side = p["side"][:, None]
    inside = ((ys >= 0) & (ys < side))[:, :, None] & ((xs >= 0) & (xs < side))[:, None, :]
    return images.masked_fill(inside[:, None], fill)


def rand_augment_params(n: int, generator: torch.Generator, num_ops: int = 2) -> dict[str, torch.Tensor]:
    """Per op slot and sample ([num_ops, n] each, CPU): the op (index into RAND_AUGMENT_OPS), its magnitude
    m ~ U(0, 1) and its sign (±1, used by the signed ops)."""
    return {
        "op": torch.randint(0, len(RAND_AUGMENT_OPS), (num_ops, n), generator=generator),
        "magnitude": torch.rand((num_ops, n), generator=generator),
        "sign": torch.where(torch.rand((num_ops, n), generator=generator) < 0.5, -1.0, 1.0),
    }


def _affine(images: torch.Tensor, op: str, value: torch.Tensor) -> torch.Tensor:
    """Shear, translate (by value·side) or rotate (value degrees) each image by its signed value, about the
    image centre, nearest neighbour, filled with 0 (torchvision's RandAugment defaults)."""
    n = len(images)
    theta = torch.eye(2, 3, device=images.device).repeat(n, 1, 1)
    if op == "rotate":
        angle = value * (math.pi / 180.0)
        theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle), -torch.sin(angle)
        theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle), torch.cos(angle)
    elif op == "shear_x":
        theta[:, 0, 1] = value
    elif op == "shear_y":
        theta[:, 1, 0] = value
    else:  # affine_grid's coordinates span [-1, 1], so a shift of t·side is 2t
        theta[:, 0 if op == "translate_x" else 1, 2] = 2 * value
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    return torch.nn.functional.grid_sample(images, grid, mode="nearest", align_corners=False)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (other + factor.view(-1, 1, 1, 1) * (images - other)).clamp(0, 255)


def _gray(images: torch.Tensor) -> torch.Tensor:
    if images.shape[1] != 3:
        return images.mean(dim=1, keepdim=True)
    r, g, b = images[:, 0:1], images[:, 1:2], images[:, 2:3]
    return 0.2989 * r + 0.587 * g + 0.114 * b


def _smoothed(images: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter (3x3, centre 5, total 13) inside the image, the border pixels unchanged: what
    Sharpness blends away from."""
    c = images.shape[1]
    kernel = torch.ones(3, 3, device=images.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / 13.0).expand(c, 1, 3, 3)
    out = images.clone()
    out[..., 1:-1, 1:-1] = torch.nn.functional.conv2d(images, kernel, groups=c).round()
    return out


def _color(op: str, x: torch.Tensor, magnitude: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Colour op `op` on float images [n, C, H, W] in [0, 255], each with its own magnitude and sign [n]."""
    factor = 1.0 + sign * magnitude * MAX_FACTOR
    if op == "brightness":
        return _blend(x, torch.zeros_like(x), factor)
    if op == "color":
        return _blend(x, _gray(x).expand_as(x), factor)
    if op == "contrast":
        return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), factor)
    if op == "sharpness":
        return _blend(x, _smoothed(x), factor)
    if op == "posterize":  # keep 8 .. 4 bits
        bits = (8 - (magnitude * 4).round()).to(torch.uint8)
        mask = (torch.full_like(bits, 0xFF) << (8 - bits)).view(-1, 1, 1, 1)
        return (x.to(torch.uint8) & mask).float()
    if op == "solarize":
        return torch.where(x >= (255.0 * (1.0 - magnitude)).view(-1, 1, 1, 1), 255.0 - x, x)
    if op == "autocontrast":
        return v2.functional.autocontrast(x.to(torch.uint8)).float()
    if op == "equalize":
        return v2.functional.equalize(x.to(torch.uint8)).float()
    raise UnknownNameError(f"unknown RandAugment op {op!r}; valid: {', '.join(RAND_AUGMENT_OPS)}")


_MAX_GEOMETRIC = {
    "shear_x": MAX_SHEAR,
    "shear_y": MAX_SHEAR,
    "translate_x": MAX_TRANSLATE,
    "translate_y": MAX_TRANSLATE,
    "rotate": MAX_ROTATE_DEG,
}


def rand_augment(images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """uint8 [B, C, H, W] -> RandAugment with each sample's own ops and magnitudes (`rand_augment_params`).

    Each op runs on the images that drew it only: the samples are sorted by op on the host, so each op's
    images are a slice of one index tensor copied to the device once per slot (no device sync)."""
    x = images.float()
    for op, magnitude, sign in zip(params["op"], params["magnitude"], params["sign"], strict=True):
        order = torch.argsort(op, stable=True)
        bounds = [0, *torch.bincount(op, minlength=len(RAND_AUGMENT_OPS)).cumsum(0).tolist()]
        packed = _to(x.device, torch.stack([order.double(), magnitude[order].double(), sign[order].double()]))
        rows_all, m_all, s_all = packed[0].long(), packed[1].float(), packed[2].float()
        for index, name in enumerate(RAND_AUGMENT_OPS):
            start, end = bounds[index], bounds[index + 1]
            if name == "identity" or start == end:
                continue
            rows, m, s = rows_all[start:end], m_all[start:end], s_all[start:end]
            if name in _MAX_GEOMETRIC:
                x[rows] = _affine(x[rows], name, s * m * _MAX_GEOMETRIC[name])
            else:
                x[rows] = _color(name, x[rows], m, s)
        x = x.round_().clamp_(0, 255)
    return x.to(torch.uint8)


def strong_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Strong view of a uint8 batch: the weak view, RandAugment (2 ops, per-sample magnitudes), Cutout."""
    n, size = len(images), images.shape[-1]
    weak = flip_translate(images, weak_params(n, size, generator))
    augmented = rand_augment(weak, rand_augment_params(n, generator))
    return cutout(augmented, cutout_params(n, size, generator))


BATCH_VIEWS = {"none": lambda images, generator: images, "weak": weak_batch, "strong": strong_batch}


def augment_batch(kind: str, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The `kind` view (none|weak|strong) of a uint8 batch [B, C, H, W], on the batch's device; its random
    parameters come from `generator` (a CPU generator: `step_generator`)."""
    if kind not in BATCH_VIEWS:
        raise UnknownNameError(f"unknown augmentation {kind!r}; valid: {', '.join(AUGMENTATIONS)}")
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected a uint8 batch [B, C, H, W], got {images.dtype} {list(images.shape)}")
    return BATCH_VIEWS[kind](images, generator)
