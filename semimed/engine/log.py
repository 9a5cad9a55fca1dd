"""Training-curve logging: running averages of a method's step logs, TensorBoard scalars (rank 0) and the
progress bar. Values are read every `log_every` steps only, so logging never forces a device sync per step."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from semimed.methods.base import StepOutput


class Tensorboard:
    """Rank-0 scalars and images under `<run_dir>/tb`; a no-op elsewhere or when the run has no directory."""

    def __init__(self, run_dir: Path | None, enabled: bool) -> None:
        self.writer = None
        if run_dir is not None and enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"))

    def scalars(self, values: dict[str, object], step: int) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
                self.writer.add_scalar(key, value, step)

    def images(self, grids: dict[str, torch.Tensor], step: int) -> None:
        if self.writer is None:
            return
        for key, images in grids.items():
            self.writer.add_images(key, images.detach().float().clamp(0, 1).cpu(), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class TrainLog:
    """Running averages of `train/*` over the last `log_every` steps, throughput, LR; TensorBoard; progress."""

    def __init__(
        self, board: Tensorboard, steps: int, start_step: int, eval_every: int, show_progress: bool
    ) -> None:
        self.board = board
        self.log_every = max(1, min(50, eval_every // 4))
        self.steps = steps
        self.running: dict[str, list] = {}
        self.tick, self.images = time.perf_counter(), 0
        self.last: dict[str, float] = {}
        self.progress = tqdm(
            total=steps,
            initial=start_step,
            desc="train",
            unit="step",
            mininterval=5.0,
            disable=not show_progress,
        )

    def record(self, out: StepOutput, images: int) -> None:
        self.images += images
        self.running.setdefault("train/loss", []).append(out.loss.detach())
        for key, value in out.logs.items():
            self.running.setdefault(f"train/{key}", []).append(value)
        self.progress.update(1)

    def flush(self, done: int, lr: float) -> None:
        """Every `log_every` steps (and at the end): average, write, and remember as `last`."""
        if done % self.log_every and done != self.steps:
            return
        elapsed = time.perf_counter() - self.tick
        # nanmean: a log may be undefined at a step (pseudo_acc with no confident pseudo-label is NaN).
        scalars = {
            k: float(torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in vals]).nanmean())
            for k, vals in self.running.items()
        }
        scalars["train/lr"] = lr
        scalars["train/images_per_s"] = self.images / max(elapsed, 1e-9)
        self.board.scalars(scalars, done)
        self.progress.set_postfix(loss=f"{scalars['train/loss']:.3f}", refresh=False)
        self.running, self.tick, self.images = {}, time.perf_counter(), 0
        self.last = scalars

    def close(self) -> None:
        self.progress.close()
