"""The engine seam for methods that fit in closed form (no step loop): `fit_closed_form`.

A method that declares `closed_form = True` (semimed/methods/classical.py) cannot go through `engine.fit`:
it has no train_step, no optimizer, no checkpoints. `experiment.run_training` calls `fit_closed_form` in its
place, with the same arguments, inside the same run folder machinery (identity, lock, config, split and env
files). It asks the method for one thing, `fit_predict(data, seed, workers) -> {"val": scores, "test":
scores}`, and does the rest with the engine's own evaluation pieces, so a closed-form run's files read like
any run's:

- metrics: `semimed.metrics.evaluate_scores` on val and test; multi-label decision thresholds chosen on val
  (`choose_thresholds`, Youden), never on test; `test/*` and `test_last/*` (the same single model), `val/*`,
  `reported_checkpoint: "last"`, `selected_step: 0`, `select_metric`, `evaluated_model` (the feature set and
  classifier with every hyperparameter);
- `predictions.parquet`: `Evaluator.predictions` frames written by `write_predictions`;
- TensorBoard: the final val/test scalars (`engine.log.Tensorboard`), at step 0;
- `report(final + {"final": True}, None)` once, for Ray Tune.

There is nothing to resume: a closed-form run interrupted before metrics.json is simply run again (features
come from their cache). `step` is 0: no optimizer step was taken, whatever `train.steps` says.

Nothing is exported (no backbone.safetensors): the fitted scikit-learn pipeline could only be saved as a pickle,
which can run code when loaded, and a refit takes seconds from the cached features, the config, the split and
the seed. `refuse_closed_form_run` is the one-line error for `semimed explain` or `model.pretrained_checkpoint`
pointed at such a run.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from semimed.config import TrainConfig
from semimed.data.augment import Normalizer
from semimed.data.cache import default_workers
from semimed.data.views import RunData
from semimed.engine.evaluate import PREDICTIONS_FILE, Evaluator, Scored, write_predictions
from semimed.engine.log import Tensorboard
from semimed.errors import SemimedError
from semimed.methods.base import DataInfo, Method
from semimed.metrics import choose_thresholds, evaluate_scores


def is_closed_form(method_name: str) -> bool:
    """Whether registered method `method_name` fits in closed form (no network, no step loop)."""
    from semimed.methods import METHODS

    return bool(getattr(METHODS.get(method_name), "closed_form", False))


def refuse_closed_form_run(run_dir: str | Path, purpose: str) -> None:
    """Raise a one-line SemimedError when `run_dir` holds a run of a closed-form method: it has no network
    for `purpose` ("explain", "model.pretrained_checkpoint") to use. Anything else (no run, another method,
    an unreadable config) passes: the caller's own checks report it."""
    import yaml

    from semimed.methods import METHODS

    try:
        name = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())["method"]["name"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return
    if name in METHODS and is_closed_form(name):
        raise SemimedError(
            f"{run_dir}: a {name} run (hand-crafted features + scikit-learn) has no network for {purpose}; "
            "its per-image scores are in predictions.parquet"
        )


def fit_closed_form(
    method: Method,
    data: RunData,
    cfg: TrainConfig,
    *,
    seed: int = 0,
    run_dir: str | Path | None = None,
    report: Any = None,
    show_progress: bool = True,
    workers: int | None = None,
    **_loop_only: Any,  # resume_from, device, fingerprint: engine.fit's, nothing to do here
) -> dict[str, Any]:
    """Fit `method` once and evaluate it like `engine.fit` does at its end; returns the final metrics and
    writes TensorBoard scalars and predictions.parquet under `run_dir` (see the module docstring)."""
    run_dir = Path(run_dir) if run_dir is not None else None
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    counts = data.labeled_class_counts()
    method.setup(
        DataInfo(
            len(data.rows["labeled"]),
            len(data.rows["unlabeled"]),
            list(data.classes),
            data.multilabel,
            counts,
        )
    )
    # The engine's evaluator, for what it owns: the select_metric check and the predictions frame.
    evaluator = Evaluator(
        method,
        data,
        select_metric=cfg.select_metric,
        batch_size=64,
        device=torch.device("cpu"),
        autocast=contextlib.nullcontext,
        rank=0,
        world=1,
        channels_last=False,
        normalize=data.normalize or Normalizer(data.channels),
    )
    scores = method.fit_predict(data, seed, workers or default_workers())  # type: ignore[attr-defined]
    final: dict[str, Any] = {
        "step": 0,
        "resumed_from_step": 0,
        "selected_step": 0,
        "reported_checkpoint": "last",
        "select_metric": evaluator.select_metric,
        "positive_class": data.positive_class,
        "evaluated_model": method.evaluated_model(),
        **{f"train/{k}": v for k, v in getattr(method, "fit_logs", {}).items()},
    }
    thresholds, frames = None, []
    patients = data.patient_ids
    if "val" in scores:
        rows = data.rows["val"]
        targets = data.targets[rows]
        if data.multilabel:
            thresholds = choose_thresholds(targets, scores["val"], "youden", classes=list(data.classes))
        values = evaluate_scores(
            targets,
            scores["val"],
            data.classes,
            data.multilabel,
            None if patients is None else patients[rows],
            thresholds,
            data.positive,
        )
        final.update({f"val/{k}": v for k, v in values.items()})
        frames.append(evaluator.predictions("val", Scored(values, thresholds, rows, scores["val"]), 0))
    if "test" in scores:
        rows = data.rows["test"]
        values = evaluate_scores(
            data.targets[rows],
            scores["test"],
            data.classes,
            data.multilabel,
            None if patients is None else patients[rows],
            thresholds,
            data.positive,
        )
        # One model: the reported and the last "checkpoint" are the same, and both key families exist.
        final.update({f"test/{k}": v for k, v in values.items()})
        final.update({f"test_last/{k}": v for k, v in values.items()})
        frames.append(evaluator.predictions("test", Scored(values, thresholds, rows, scores["test"]), 0))
        if thresholds is not None:
            final.update(
                {f"test/threshold/{c}": float(t) for c, t in zip(data.classes, thresholds, strict=True)}
            )
    board = Tensorboard(run_dir, rank == 0)
    board.scalars({k: v for k, v in final.items() if k.startswith(("val/", "test", "train/"))}, 0)
    board.texts(final, 0)
    board.close()
    if rank == 0 and run_dir is not None and frames:
        write_predictions(frames, run_dir / PREDICTIONS_FILE)
    if report is not None:
        report({**final, "final": True}, None)
    return final
