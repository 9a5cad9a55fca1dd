"""Labeled / unlabeled / two-view wrappers over one decoded pixel array. Datasets never know the method.

Batches are drawn by `StepBatchSampler`, a deterministic, resumable stream of global batches: the batch of
step s depends only on (seed, s), so a resumed run continues with exactly the batches it would have seen, and
each DDP rank takes its share (`rank::world_size`) of the same global batch. We do not use
`DistributedSampler` through Ray's `prepare_data_loader`, which would replace any custom sampler.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


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


class TwoView(ImageView):
    """Unlabeled rows as (weak view, strong view, target, row). The target is only for logging pseudo-label
    accuracy in simulated label-fraction studies; methods must never train on it."""

    def __init__(self, pixels, targets, indices, weak, strong) -> None:
        super().__init__(pixels, targets, indices, weak)
        self.strong = strong

    def __getitem__(self, position: int):
        row = int(self.indices[position])
        image = self.image(row)
        return self.transform(image), self.strong(image), self.targets[row], row


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
