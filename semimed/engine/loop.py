"""THE training loop. Every method and every entry point (CLI, Ray Train worker, tests, benchmarks) runs through
`fit`, which never imports Ray: under Ray Train the adapter passes `report` and the device.

`fit` reads as the loop it is — next batch, the method's step, the parameter update, the hooks — over small
parts: the method's declared streams (`TrainStreams`), the parameter update (`engine.optim.Optimization`,
overridable per method), evaluation and checkpoint selection (`engine.evaluate.Evaluator`), checkpoints
(`engine.checkpoint`) and curves (`engine.log`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from semimed.config import TrainConfig
from semimed.data.augment import Normalizer
from semimed.data.views import RunData, step_loader, unlabeled_pool
from semimed.engine.checkpoint import latest_checkpoint, method_state, resume_state, save_checkpoint
from semimed.engine.evaluate import PREDICTIONS_FILE, Best, Evaluator, to_device, write_predictions
from semimed.engine.log import Tensorboard, TrainLog
from semimed.engine.optim import Optimization
from semimed.errors import SemimedError
from semimed.methods.base import Batch, DataInfo, Method, Needs

ReportFn = Callable[[dict[str, Any], "str | None"], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TrainStreams:
    """The streams a method declares, as one Batch per step on the device.

    Each stream is a resumable sampler over its rows (`StepBatchSampler`): the labeled one seeded with `seed`,
    the unlabeled one with `seed + 1`, so the batches of step s depend only on (seed, s).
    """

    def __init__(
        self, data: RunData, needs: Needs, cfg: TrainConfig, seed: int, start_step: int, rank: int, world: int
    ) -> None:
        self.loaders = []
        if needs.labeled:
            self.loaders.append(
                iter(
                    step_loader(
                        data.labeled_stream(),
                        cfg.batch_size,
                        seed,
                        start_step,
                        rank,
                        world,
                        cfg.loader_workers,
                    )
                )
            )
        if needs.unlabeled:
            unlabeled = data.unlabeled_stream(needs.view_keys())
            size = cfg.batch_size * cfg.unlabeled_ratio
            self.loaders.append(
                iter(step_loader(unlabeled, size, seed + 1, start_step, rank, world, cfg.loader_workers))
            )

    def next(self, device: torch.device, channels_last: bool, normalize: Normalizer) -> Batch:
        batch = Batch()
        for loader in self.loaders:
            for key, value in next(loader).items():
                batch[key] = to_device(value, device, channels_last, normalize)
        return batch


def fit(
    method: Method,
    data: RunData,
    cfg: TrainConfig,
    *,
    seed: int = 0,
    run_dir: str | Path | None = None,
    report: ReportFn | None = None,
    resume_from: str | Path | None = None,
    device: torch.device | None = None,
    show_progress: bool = True,
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """Train `method` for `cfg.steps` optimizer steps; returns the final metrics (also passed to `report`).

    Resumes from `resume_from`, or else from the newest checkpoint under `run_dir/checkpoints` (only a checkpoint
    with the same `fingerprint`, when one is given). Reported at every evaluation: `step`, `train/*` and
    `val/*`; at the end: `test/*` at the reported checkpoint (selected on val by `cfg.select_metric`, else the
    last), `test_last/*`, and which checkpoint and network they come from. Writes checkpoints, TensorBoard
    curves and `predictions.parquet` under `run_dir` (rank 0). On return `method` holds the reported weights.
    """
    _check_budget(cfg)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = device or resolve_device(cfg.device)
    run_dir = Path(run_dir) if run_dir is not None else None
    needs = method.needs
    if needs.unlabeled and not len(unlabeled_pool(data.rows)):
        raise SemimedError(f"method {type(method).__name__} needs unlabeled images, but the split has none")
    num_unlabeled = len(unlabeled_pool(data.rows)) if needs.unlabeled else 0
    method.setup(
        DataInfo(
            len(data.rows["labeled"]),
            num_unlabeled,
            list(data.classes),
            data.multilabel,
            data.labeled_class_counts(),
        )
    )
    state = resume_state(resume_from, run_dir, world, fingerprint)
    start_step = 0
    if state is not None:
        method.load_state_dict(state["method"])
        start_step = int(state["step"])
    _same_on_every_rank(start_step, world)
    method.to(device)
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        method.wrap_models(lambda net: nn.parallel.DistributedDataParallel(net, device_ids=ids))
    optimization = Optimization(method, cfg, device)
    if state is not None:
        optimization.load_state_dict(state)
    autocast = _autocast(cfg.amp, device)
    if cfg.channels_last:
        method.to(memory_format=torch.channels_last)
    normalize = data.normalize or Normalizer(data.channels)
    streams = TrainStreams(data, needs, cfg, seed, start_step, rank, world)
    if state is not None and "torch_rng" in state:
        # Augmentations and dropout draw from torch's generator: continue its stream, so a resumed run sees the
        # same random crops as an uninterrupted one (exact with loader_workers=0). Restored after the loaders
        # are built, because creating a loader iterator draws from the same generator.
        torch.set_rng_state(state["torch_rng"])
    batch_size = max(cfg.batch_size // world, 64)
    evaluator = Evaluator(
        method,
        data,
        cfg.select_metric,
        batch_size,
        device,
        autocast,
        rank,
        world,
        cfg.channels_last,
        normalize,
    )
    if state is not None:
        evaluator.best = Best.from_dict(state["best"])
    board = Tensorboard(run_dir, rank == 0)
    log = TrainLog(board, cfg.steps, start_step, cfg.eval_every, show_progress and rank == 0)

    method.train()
    metrics: dict[str, Any] = {}
    for step in range(start_step, cfg.steps):
        batch = streams.next(device, cfg.channels_last, normalize)
        with autocast():
            out = method.train_step(batch, step)
        if not torch.isfinite(out.loss.detach()):
            raise SemimedError(
                f"loss became {float(out.loss)} at step {step}; lower train.lr or enable grad_clip"
            )
        method.update_parameters(out.loss, optimization, step)
        method.after_optimizer_step(step)
        log.record(out, len(next(iter(batch.values()))) * world)
        done = step + 1
        log.flush(done, optimization.lr)
        evaluate, save = _due(done, cfg.eval_every, cfg.steps), _due(done, cfg.checkpoint_every, cfg.steps)
        if evaluate or save:
            metrics = {"step": done, **log.last}
            if evaluate:
                metrics.update(_validate(evaluator, board, method, done, rank))
            path = None
            if save and rank == 0 and run_dir is not None:
                path = str(_save(run_dir, done, method, optimization, evaluator.best, fingerprint))
            if report is not None and done < cfg.steps:
                report(metrics, path)
    log.close()

    final: dict[str, Any] = {"step": cfg.steps, "resumed_from_step": start_step}
    if start_step < cfg.steps:
        final.update({k: v for k, v in metrics.items() if k.startswith(("train/", "val/"))})
    test_metrics, predictions = evaluator.finish(cfg.steps)
    final.update(test_metrics)
    board.scalars({k: v for k, v in final.items() if k.startswith("test")}, cfg.steps)
    board.close()
    if rank == 0 and run_dir is not None and predictions:
        write_predictions(predictions, run_dir / PREDICTIONS_FILE)
    if report is not None:
        path = str(latest_checkpoint(run_dir / "checkpoints")) if run_dir is not None and rank == 0 else None
        # Not "done": Tune reads a result with done=True as "stop this trial", which would kill the worker
        # before run_training writes metrics.json.
        report({**final, "final": True}, path)
    return final


def _validate(
    evaluator: Evaluator, board: Tensorboard, method: Method, step: int, rank: int
) -> dict[str, float]:
    values = evaluator.validate(step)
    if values:
        board.scalars(values, step)
        if rank == 0:
            board.images(method.tensorboard_images(), step)
    return values


def _save(
    run_dir: Path, step: int, method: Method, optimization: Optimization, best: Best, fingerprint: str | None
) -> Path:
    state = {
        "step": step,
        "method": method_state(method),
        **optimization.state_dict(),
        "best": best.to_dict(),
        "torch_rng": torch.get_rng_state(),
        "fingerprint": fingerprint,
    }
    return save_checkpoint(state, run_dir / "checkpoints", step)


def _due(done: int, every: int, steps: int) -> bool:
    return done % every == 0 or done == steps


def _check_budget(cfg: TrainConfig) -> None:
    for key in ("steps", "batch_size", "eval_every", "checkpoint_every", "unlabeled_ratio"):
        if getattr(cfg, key) < 1:
            raise SemimedError(f"train.{key}={getattr(cfg, key)} must be >= 1")


def _same_on_every_rank(start_step: int, world: int) -> None:
    if world > 1:
        # Every rank must start from the same step, or the first collective op hangs forever.
        starts: list[Any] = [None] * world
        dist.all_gather_object(starts, start_step)
        if len(set(starts)) != 1:
            raise SemimedError(f"DDP ranks would resume from different steps {starts}; is run_dir shared?")


def _autocast(amp: str, device: torch.device) -> Callable[[], Any]:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    return autocast
