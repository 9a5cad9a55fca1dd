"""Evaluation: scores over a view (sharded over DDP ranks), metrics, checkpoint selection on val, the final test
at the reported checkpoint, and the per-image predictions that make a run auditable.

Reported checkpoint: the one with the best `train.select_metric` on val ("selected"), or the last one when
there is no val set (val_policy none) or the metric was never defined on it ("last"; a warning says why).
The multi-label decision thresholds are chosen on val at that checkpoint (Youden), never on test.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from semimed.data.augment import Normalizer
from semimed.data.views import ImageView, RunData, eval_loader
from semimed.engine.checkpoint import load_canonical_state, method_state
from semimed.engine.ema import WeightEMA
from semimed.errors import SemimedError, SemimedWarning
from semimed.files import publish, staging_path
from semimed.losses import probabilities
from semimed.methods.base import Method
from semimed.metrics import choose_thresholds, evaluate_scores, metric_names, task_of

PREDICTIONS_FILE = "predictions.parquet"


def to_device(item: torch.Tensor, device: torch.device, channels_last: bool, normalize: Normalizer):
    """A loader tensor on the device; image batches [B, C, H, W] (uint8) are normalized there."""
    item = item.to(device, non_blocking=True)
    if item.ndim == 4:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        item = normalize(item).contiguous(memory_format=memory_format)
    return item


@torch.no_grad()
def predict_scores(
    method: Method,
    view: ImageView,
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], Any],
    rank: int,
    world: int,
    channels_last: bool = False,
    normalize: Normalizer | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, probabilities [n, K]) over the whole view, gathered from every rank in row order."""
    normalize = normalize or Normalizer(int(view.pixels.shape[1]))
    was_training = method.training
    method.eval()
    rows, scores = [], []
    for x, _, row in eval_loader(view, batch_size, rank, world):
        x = to_device(x, device, channels_last, normalize)
        with autocast():
            scores.append(probabilities(method.predict(x), method.multilabel).cpu().numpy())
        rows.append(row.numpy())
    method.train(was_training)
    local_rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    local_scores = np.concatenate(scores) if scores else np.zeros((0, method.num_classes), np.float32)
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (local_rows, local_scores))
        local_rows = np.concatenate([g[0] for g in gathered])
        local_scores = np.concatenate([g[1] for g in gathered])
    order = np.argsort(local_rows, kind="stable")
    return local_rows[order], local_scores[order]


@dataclass
class Best:
    """The best checkpoint on val so far: its score, step, canonical method state and thresholds."""

    score: float = -math.inf
    step: int = -1
    state: dict[str, Any] | None = None
    thresholds: torch.Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "step": self.step, "state": self.state, "thresholds": self.thresholds}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Best:
        return cls(values["score"], values["step"], values["state"], values["thresholds"])


@dataclass
class Scored:
    """One evaluation: metrics plus the per-image scores they came from."""

    metrics: dict[str, float]
    thresholds: np.ndarray | None
    rows: np.ndarray
    scores: np.ndarray


class Evaluator:
    """Evaluates `method` on the run's val/test views and keeps the checkpoint selection."""

    def __init__(
        self,
        method: Method,
        data: RunData,
        select_metric: str,
        batch_size: int,
        device: torch.device,
        autocast: Callable[[], Any],
        rank: int,
        world: int,
        channels_last: bool,
        normalize: Normalizer,
        ema: WeightEMA | None = None,
    ) -> None:
        self.method, self.data, self.ema = method, data, ema
        self.batch_size, self.device, self.autocast = batch_size, device, autocast
        self.rank, self.world, self.channels_last, self.normalize = rank, world, channels_last, normalize
        self.select_metric = select_metric or "roc_auc"
        # A self-supervised method classifies nothing: it is never shown val or test images.
        self.val, self.test = (data.view("val"), data.view("test")) if method.classifies else (None, None)
        self.best = Best()
        if not method.classifies:
            return
        task = task_of(len(data.classes), data.multilabel)
        available = metric_names(task, has_patients=data.patient_ids is not None)
        if self.select_metric not in available:
            raise SemimedError(
                f"train.select_metric {self.select_metric!r} is not defined for this {task} task; "
                f"valid: {', '.join(available)}"
            )

    def evaluate(self, view: ImageView, thresholds: np.ndarray | None = None, choose: bool = False) -> Scored:
        """Metrics of the method's current weights on `view`; `choose` picks multi-label thresholds on it."""
        rows, scores = predict_scores(
            self.method,
            view,
            self.batch_size,
            self.device,
            self.autocast,
            self.rank,
            self.world,
            self.channels_last,
            self.normalize,
        )
        targets = self.data.targets[rows]
        if choose and self.data.multilabel:
            thresholds = choose_thresholds(targets, scores, "youden", classes=self.data.classes)
        patients = self.data.patient_ids[rows] if self.data.patient_ids is not None else None
        metrics = evaluate_scores(
            targets, scores, self.data.classes, self.data.multilabel, patients, thresholds, self.data.positive
        )
        return Scored(metrics, thresholds, rows, scores)

    def validate(self, step: int) -> dict[str, float]:
        """val/* metrics at `step` (empty without a val set); a better select_metric becomes the best."""
        if self.val is None:
            return {}
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
            scored = self.evaluate(self.val, choose=True)
            score = scored.metrics.get(self.select_metric, math.nan)
            if score is not None and np.isfinite(score) and score > self.best.score:
                thresholds = None if scored.thresholds is None else torch.as_tensor(scored.thresholds)
                self.best = Best(float(score), step, method_state(self.method), thresholds)
        return {f"val/{k}": v for k, v in scored.metrics.items()}

    def finish(self, steps: int) -> tuple[dict[str, Any], list[pd.DataFrame]]:
        """Test metrics at the last and at the reported checkpoint; per-image predictions at the reported one.

        On return the method holds the REPORTED weights (what a run exports and explains).
        """
        if self.ema is not None:
            self.ema.copy_to_model()  # training is over: the averaged weights are the run's from here on
        selected = self.best.state is not None
        if not selected and self.val is not None:
            warnings.warn(
                f"val/{self.select_metric} was never defined during training; the test metrics are those of the "
                "last checkpoint",
                SemimedWarning,
                stacklevel=2,
            )
        final: dict[str, Any] = {
            "selected_step": self.best.step if selected else steps,
            "reported_checkpoint": "selected" if selected else "last",
            "select_metric": self.select_metric,
            # The class whose sensitivity, specificity, ... the binary headline metrics are (None otherwise).
            "positive_class": self.data.positive_class,
            "evaluated_model": self.method.evaluated_model()
            + (f" (EMA {self.ema.decay:g})" if self.ema is not None else ""),
        }
        if self.test is None:
            return final, []
        # Multi-label thresholds come from val (at the evaluated checkpoint), never from test.
        last_val = (
            self.evaluate(self.val, choose=True) if self.val is not None and self.data.multilabel else None
        )
        last = self.evaluate(self.test, last_val.thresholds if last_val is not None else None)
        final.update({f"test_last/{k}": v for k, v in last.metrics.items()})
        reported, reported_val = last, last_val
        if selected and self.best.step != steps:
            load_canonical_state(self.method, self.best.state)
            thresholds = self.best.thresholds.numpy() if self.best.thresholds is not None else None
            reported, reported_val = self.evaluate(self.test, thresholds), None
        final.update({f"test/{k}": v for k, v in reported.metrics.items()})
        if reported_val is None and self.val is not None:
            reported_val = self.evaluate(self.val, reported.thresholds)
        step = final["selected_step"]
        frames = [self.predictions("test", reported, step)]
        if reported_val is not None:
            frames.insert(0, self.predictions("val", reported_val, step))
        if reported.thresholds is not None:
            final.update(
                {
                    f"test/threshold/{c}": float(t)
                    for c, t in zip(self.data.classes, reported.thresholds, strict=True)
                }
            )
        return final, frames

    def predictions(self, part: str, scored: Scored, step: int) -> pd.DataFrame:
        """One row per image: split, dataset row, path, patient, label(s), score per class, checkpoint step."""
        data, rows = self.data, scored.rows
        columns: dict[str, Any] = {"split": part, "row": rows}
        columns["path"] = data.paths[rows] if data.paths is not None else rows.astype(str)
        columns["patient_id"] = data.patient_ids[rows] if data.patient_ids is not None else rows.astype(str)
        targets = data.targets[rows]
        if data.multilabel:
            columns.update(
                {f"label/{c}": targets[:, k].astype(np.float32) for k, c in enumerate(data.classes)}
            )
        else:
            columns["label"] = targets.astype(np.int64)
        columns.update({f"score/{c}": scored.scores[:, k] for k, c in enumerate(data.classes)})
        columns["step"] = step
        return pd.DataFrame(columns)


def write_predictions(frames: list[pd.DataFrame], path: Path) -> Path:
    """`predictions.parquet`, written atomically; and their PR curves and confusion matrix in the run's
    TensorBoard folder (`<run_dir>/tb`, engine.log.prediction_summaries)."""
    from semimed.engine.log import prediction_summaries

    staging = staging_path(path)
    pd.concat(frames, ignore_index=True).to_parquet(staging, index=False)
    published = publish(staging, path)
    prediction_summaries(Path(path).parent / "tb", frames)
    return published
