"""The data a run reads: one decoded pixel array, the rows of each part of the split, and the training streams a
method declares (`Needs`) built over them. Datasets never know the method; methods never know the dataset.

Batches are drawn by `StepBatchSampler`, a deterministic, resumable stream of global batches: the batch of
step s depends only on (seed, s), so a resumed run continues with exactly the batches it would have seen, and
each DDP rank takes its share (`rank::world_size`) of the same global batch. We do not use
`DistributedSampler` through Ray's `prepare_data_loader`, which would replace any custom sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from semimed.data.augment import Normalizer, build_transform


class ImageView(Dataset):
    """Rows `indices` of `pixels` [N, C, H, W] uint8 (in memory or a memmap of the decode-once cache),
    each as (transform(image), target, row index)."""

    def __init__(self, pixels: np.ndarray, targets: torch.Tensor, indices: np.ndarray, transform) -> None:
        self.pixels, self.targets, self.indices, self.transform = (
            pixels,
            targets,
            np.asarray(indices),
            transform,
        )

    def __len__(self) -> int:
        return len(self.indices)

    def image(self, row: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.pixels[row]))  # a copy: cache memmaps are read-only

    def __getitem__(self, position: int):
        row = int(self.indices[position])
        return self.transform(self.image(row)), self.targets[row], row


class StreamView(ImageView):
    """Rows of a training stream, each as a dict of named augmented views plus its target and row, so that the
    default collate gives a dict batch: {"x": …, "y": …, "x_rows": …, "x_index": …} for the labeled stream,
    {"u_weak": …, "u_strong": …, "u_true": …, "u_rows": …, "u_index": …} for the unlabeled one.

    `views` maps batch keys to transforms, applied in order: augmentations draw from torch's generator, so the
    order is part of a run's reproducibility (weak before strong, as the two-view wrapper always did).
    """

    def __init__(
        self,
        pixels: np.ndarray,
        targets: torch.Tensor,
        indices: np.ndarray,
        views: dict[str, Callable[[torch.Tensor], torch.Tensor]],
        prefix: str,
        target_key: str,
    ) -> None:
        super().__init__(pixels, targets, indices, None)
        self.views, self.prefix, self.target_key = views, prefix, target_key

    def __getitem__(self, position: int) -> dict[str, torch.Tensor | int]:
        row = int(self.indices[position])
        image = self.image(row)
        sample: dict[str, torch.Tensor | int] = {key: view(image) for key, view in self.views.items()}
        sample[self.target_key] = self.targets[row]
        sample[f"{self.prefix}_rows"] = row
        sample[f"{self.prefix}_index"] = position
        return sample


def unlabeled_pool(rows: dict[str, np.ndarray], labeled_stream: bool = True) -> np.ndarray:
    """The rows a method reads as unlabeled images (never val or test).

    A method without a labeled stream (self-supervised pretraining) reads every training image, its label
    hidden. At fraction 1.0 nothing is left unlabeled: SSL methods then see every training image as an
    unlabeled one too, as in FixMatch's fully supervised runs, so that the 1.0 cell of a label-fraction study
    exists for every method, not only the control.
    """
    if not labeled_stream:
        return rows["train"]
    return rows["unlabeled"] if len(rows["unlabeled"]) else rows["train"]


@dataclass
class RunData:
    """What a training run reads: one decoded pixel array [N, C, S, S] uint8 (in memory or a cache memmap),
    per-row targets (int [N], or float [N, K] with NaN = unknown) and patients, and the rows of each part of
    the split. The engine builds the streams a method declares from it (`labeled_stream`, `unlabeled_stream`)
    and evaluates on `view("val")` / `view("test")`.
    """

    pixels: np.ndarray
    targets: np.ndarray
    rows: dict[str, np.ndarray]  # labeled, unlabeled, val, test (and train = labeled + unlabeled)
    classes: list[str]
    multilabel: bool
    patient_ids: np.ndarray | None = None  # per dataset row; enables patient-level accuracy
    labeled_augment: str = "weak"  # train.augment: weak | none
    # Views yield uint8 images; the engine normalizes them on the device with this (None: 0.5/0.5).
    normalize: Normalizer | None = None
    paths: np.ndarray | None = None  # per dataset row: the image path (for per-image predictions)
    positive: int | None = None  # a binary task's positive class index (data.positive_class); None otherwise

    def __post_init__(self) -> None:
        self.rows = {name: np.asarray(self.rows.get(name, []), dtype=np.int64) for name in _PARTS}
        if not len(self.rows["train"]):
            self.rows["train"] = np.concatenate([self.rows["labeled"], self.rows["unlabeled"]])
        # A writable tensor copy for the loaders (a loader's label array may be read-only).
        self._target_tensor = torch.from_numpy(np.array(self.targets))

    @property
    def positive_class(self) -> str | None:
        """The positive class's name (what metrics.json records), None for a task that is not binary."""
        return None if self.positive is None else self.classes[self.positive]

    @property
    def image_size(self) -> int:
        return int(self.pixels.shape[-1])

    @property
    def channels(self) -> int:
        return int(self.pixels.shape[1])

    def view(self, part: str) -> ImageView | None:
        """An evaluation view (no augmentation) of `part` ("val" or "test"); None when that part is empty."""
        rows = self.rows[part]
        return (
            ImageView(self.pixels, self._target_tensor, rows, build_transform("none", self.image_size))
            if len(rows)
            else None
        )

    def labeled_stream(self) -> StreamView:
        transform = build_transform(self.labeled_augment, self.image_size)
        return StreamView(self.pixels, self._target_tensor, self.rows["labeled"], {"x": transform}, "x", "y")

    def unlabeled_stream(self, view_keys: list[tuple[str, str]], labeled_stream: bool = True) -> StreamView:
        """The unlabeled pool with one transform per (batch key, view kind), e.g. [("u_weak", "weak")]."""
        views = {key: build_transform(kind, self.image_size) for key, kind in view_keys}
        pool = unlabeled_pool(self.rows, labeled_stream)
        return StreamView(self.pixels, self._target_tensor, pool, views, "u", "u_true")

    def labeled_class_counts(self) -> np.ndarray:
        """Labeled images per class [K] (multi-label: known positives per finding)."""
        targets = self.targets[self.rows["labeled"]]
        if self.multilabel:
            return np.nansum(np.asarray(targets, dtype=np.float64), axis=0)
        return np.bincount(np.asarray(targets, dtype=np.int64), minlength=len(self.classes)).astype(
            np.float64
        )


_PARTS = ("train", "labeled", "unlabeled", "val", "test")


class StepBatchSampler:
    """Infinite stream of this rank's share of global batches, starting at `start_step`.

    The data is an endless concatenation of epoch permutations (epoch e shuffled by Generator([seed, e])); the
    global batch of step s is positions [s·B, (s+1)·B) of that stream, so batches may straddle epochs and a
    labeled set smaller than B repeats within a batch.
    """

    def __init__(
        self, n: int, global_batch: int, seed: int, start_step: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if n <= 0:
            raise ValueError("cannot sample batches from an empty set")
        if global_batch % world_size:
            raise ValueError(f"batch size {global_batch} is not divisible by {world_size} workers")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.start_step, self.rank, self.world_size = start_step, rank, world_size
        self._epoch, self._perm = -1, np.zeros(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perm

    def global_batch_positions(self, step: int) -> np.ndarray:
        start = step * self.global_batch
        out = np.empty(self.global_batch, dtype=np.int64)
        for i, position in enumerate(range(start, start + self.global_batch)):
            out[i] = self._permutation(position // self.n)[position % self.n]
        return out

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield self.global_batch_positions(step)[self.rank :: self.world_size].tolist()
            step += 1


def step_loader(
    dataset: Dataset,
    global_batch: int,
    seed: int,
    start_step: int,
    rank: int,
    world_size: int,
    workers: int = 0,
) -> DataLoader:
    sampler = StepBatchSampler(len(dataset), global_batch, seed, start_step, rank, world_size)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def eval_loader(
    dataset: ImageView, batch_size: int, rank: int, world_size: int, workers: int = 0
) -> DataLoader:
    """This rank's disjoint shard (positions rank::world_size) — no padding, so no duplicates to remove."""
    shard = torch.utils.data.Subset(dataset, list(range(rank, len(dataset), world_size)))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers)
