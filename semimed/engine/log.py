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

    def texts(self, values: dict[str, object], step: int) -> None:
        """The run's facts that are words (positive class, evaluated model, reported checkpoint): TEXT tab."""
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, str):
                self.writer.add_text(key, value, step)

    def images(self, grids: dict[str, torch.Tensor], step: int) -> None:
        if self.writer is None:
            return
        for key, images in grids.items():
            self.writer.add_images(key, images.detach().float().clamp(0, 1).cpu(), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def bar_disabled(show: bool) -> bool | None:
    """tqdm's `disable` for a bar that is wanted (`show`) only on a terminal: None makes tqdm check that the
    stream it writes to is a TTY. In a log file or pipe a bar is `\\r`-separated redraws on one endless line."""
    return None if show else True


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
            disable=bar_disabled(show_progress),
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


def prediction_summaries(tb_dir: Path, frames: list, part: str = "test") -> None:
    """PR curves and the confusion matrix of the reported checkpoint, from its per-image predictions.

    `frames`: `Evaluator.predictions` tables (columns split, label or label/<class>, score/<class>, step). For
    the `part` rows: one PR curve per class (single-label: that class against the rest; multi-label: per
    finding, unknown labels left out), tags `pr_curve/<part>/<class>`; single-label also the confusion matrix
    of the argmax as an image, `confusion_matrix/<part>` (rows = true class, columns = predicted, colour =
    share of the row, numbers = images). A multi-label run has no single confusion matrix: its decisions depend
    on per-finding thresholds (metrics.json). Step = the reported checkpoint's step."""
    import pandas as pd
    from torch.utils.tensorboard import SummaryWriter

    frame = pd.concat(frames, ignore_index=True) if frames else None
    if frame is None or "split" not in frame or not (frame["split"] == part).any():
        return
    frame = frame[frame["split"] == part]
    classes = [c.removeprefix("score/") for c in frame.columns if c.startswith("score/")]
    scores = frame[[f"score/{c}" for c in classes]].to_numpy(np.float64).clip(0.0, 1.0)
    step = int(frame["step"].iloc[0]) if "step" in frame else 0
    with SummaryWriter(str(tb_dir)) as writer:
        if "label" in frame:  # single-label
            labels = frame["label"].to_numpy(np.int64)
            for k, name in enumerate(classes):
                writer.add_pr_curve(f"pr_curve/{part}/{name}", labels == k, scores[:, k], step)
            matrix = np.zeros((len(classes), len(classes)), np.int64)
            np.add.at(matrix, (labels, scores.argmax(axis=1)), 1)
            writer.add_image(
                f"confusion_matrix/{part}", confusion_image(matrix, classes), step, dataformats="HWC"
            )
            return
        for k, name in enumerate(classes):
            known = frame[f"label/{name}"].to_numpy(np.float64)
            keep = np.isfinite(known)
            if keep.any():
                writer.add_pr_curve(f"pr_curve/{part}/{name}", known[keep] > 0.5, scores[keep, k], step)


def confusion_image(matrix: np.ndarray, classes: list[str], cell: int = 44) -> np.ndarray:
    """A confusion matrix [K, K] (rows true, columns predicted) as an RGB uint8 image [H, W, 3]: each cell
    shaded by its share of the row (white 0 -> blue 1) with its count, class names on both axes."""
    from PIL import Image, ImageDraw

    k = len(classes)
    names = [c[:14] for c in classes]
    left, top = 8 + 7 * max(len(n) for n in names), 8 + 7 * max(len(n) for n in names)
    image = Image.new("RGB", (left + k * cell + 8, top + k * cell + 22), "white")
    draw = ImageDraw.Draw(image)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, float), where=rows > 0)
    for i in range(k):
        for j in range(k):
            x, y = left + j * cell, top + i * cell
            shade = int(round(255 * (1 - share[i, j])))
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(shade, shade, 255), outline="gray")
            draw.text((x + 4, y + cell // 2 - 5), str(matrix[i, j]), fill="black" if shade > 110 else "white")
        draw.text((4, top + i * cell + cell // 2 - 5), names[i], fill="black")
    column_names = Image.new("RGB", (top, k * cell), "white")  # drawn sideways, then turned upright
    side = ImageDraw.Draw(column_names)
    for j in range(k):
        side.text((4, j * cell + cell // 2 - 5), names[j], fill="black")
    image.paste(column_names.rotate(90, expand=True), (left, 0))
    draw.text((left, top + k * cell + 6), "rows: true, columns: predicted", fill="black")
    return np.asarray(image, dtype=np.uint8)
