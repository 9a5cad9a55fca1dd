"""The training engine: `fit` (engine/loop.py) and its parts. It never imports Ray."""

from semimed.data.views import RunData
from semimed.engine.checkpoint import (
    CHECKPOINTS_KEPT,
    latest_checkpoint,
    load_canonical_state,
    load_checkpoint,
    method_state,
    save_checkpoint,
)
from semimed.engine.evaluate import PREDICTIONS_FILE, predict_scores
from semimed.engine.loop import ReportFn, fit, resolve_device
from semimed.engine.optim import Optimization, build_optimizer, lr_factor

__all__ = [
    "CHECKPOINTS_KEPT",
    "PREDICTIONS_FILE",
    "Optimization",
    "ReportFn",
    "RunData",
    "build_optimizer",
    "fit",
    "latest_checkpoint",
    "load_canonical_state",
    "load_checkpoint",
    "lr_factor",
    "method_state",
    "predict_scores",
    "resolve_device",
    "save_checkpoint",
]
