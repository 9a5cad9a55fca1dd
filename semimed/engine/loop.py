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
from semimed.engine.ema import WeightEMA
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
            unlabeled = data.unlabeled_stream(needs.view_keys(), needs.labeled)
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
    run = _Run(method, data, cfg, seed, run_dir, resume_from, device, show_progress, fingerprint)
    metrics: dict[str, Any] = {}
    method.train()
    for step in range(run.start_step, cfg.steps):
        batch = run.streams.next(run.device, cfg.channels_last, run.normalize)
        with run.autocast():
            out = method.train_step(batch, step)
        if not torch.isfinite(out.loss.detach()):
            raise SemimedError(
                f"loss became {float(out.loss)} at step {step}; lower train.lr or enable grad_clip"
            )
        method.update_parameters(out.loss, run.optimization, step)
        method.after_optimizer_step(step)
        if run.ema is not None:
            run.ema.update()
        run.log.record(out, len(next(iter(batch.values()))) * run.world)
        done = step + 1
        run.log.flush(done, run.optimization.lr)
        if _due(done, cfg.eval_every, cfg.steps) or _due(done, cfg.checkpoint_every, cfg.steps):
            metrics = run.evaluate_and_save(done)
            if report is not None and done < cfg.steps:
                report(metrics, run.last_checkpoint if _due(done, cfg.checkpoint_every, cfg.steps) else None)
    final = run.finish(metrics)
    if report is not None:
        # Not "done": Tune reads a result with done=True as "stop this trial", which would kill the worker
        # before run_training writes metrics.json.
        report({**final, "final": True}, run.latest_checkpoint())
    return final


class _Run:
    """Everything one `fit` call sets up and keeps (device, resume, optimizers, EMA, streams, evaluator,
    curves) and the hooks around the loop: evaluate and checkpoint, finish."""

    def __init__(
        self,
        method: Method,
        data: RunData,
        cfg: TrainConfig,
        seed: int,
        run_dir: str | Path | None,
        resume_from: str | Path | None,
        device: torch.device | None,
        show_progress: bool,
        fingerprint: str | None,
    ) -> None:
        _check_budget(cfg)
        self.method, self.cfg, self.fingerprint = method, cfg, fingerprint
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.device = device or resolve_device(cfg.device)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        needs = method.needs
        pool = len(unlabeled_pool(data.rows, needs.labeled)) if needs.unlabeled else 0
        if needs.unlabeled and not pool:
            raise SemimedError(
                f"method {type(method).__name__} needs unlabeled images, but the split has none"
            )
        counts = data.labeled_class_counts()
        labeled = len(data.rows["labeled"])
        method.setup(DataInfo(labeled, pool, list(data.classes), data.multilabel, counts, cfg.steps))
        state = resume_state(resume_from, self.run_dir, self.world, fingerprint)
        self.start_step = int(state["step"]) if state is not None else 0
        if state is not None:
            method.load_state_dict(state["method"])
        _same_on_every_rank(self.start_step, self.world)
        method.to(self.device)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            method.wrap_models(lambda net: nn.parallel.DistributedDataParallel(net, device_ids=ids))
        self.optimization = Optimization(method, cfg, self.device)
        self.ema = WeightEMA(self.optimization, cfg.ema) if cfg.ema > 0 else None
        if state is not None:
            self.optimization.load_state_dict(state)
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
        self.autocast = _autocast(cfg.amp, self.device)
        if cfg.channels_last:
            method.to(memory_format=torch.channels_last)
        self.normalize = data.normalize or Normalizer(data.channels)
        self.streams = TrainStreams(data, needs, cfg, seed, self.start_step, self.rank, self.world)
        if state is not None and "torch_rng" in state:
            # Augmentations and dropout draw from torch's generator: continue its stream, so a resumed run sees
            # the same random crops as an uninterrupted one (exact with loader_workers=0). Restored after the
            # loaders are built, because creating a loader iterator draws from the same generator.
            torch.set_rng_state(state["torch_rng"])
        self.evaluator = Evaluator(
            method,
            data,
            cfg.select_metric,
            max(cfg.batch_size // self.world, 64),
            self.device,
            self.autocast,
            self.rank,
            self.world,
            cfg.channels_last,
            self.normalize,
            self.ema,
        )
        if state is not None:
            self.evaluator.best = Best.from_dict(state["best"])
        self.board = Tensorboard(self.run_dir, self.rank == 0)
        self.log = TrainLog(
            self.board, cfg.steps, self.start_step, cfg.eval_every, show_progress and self.rank == 0
        )
        self.last_checkpoint: str | None = None

    def evaluate_and_save(self, done: int) -> dict[str, Any]:
        """At an evaluation or checkpoint step: val metrics (and the best-so-far), then the checkpoint."""
        metrics: dict[str, Any] = {"step": done, **self.log.last}
        if _due(done, self.cfg.eval_every, self.cfg.steps):
            values = self.evaluator.validate(done)
            if values:
                self.board.scalars(values, done)
                if self.rank == 0:
                    self.board.images(self.method.tensorboard_images(), done)
            metrics.update(values)
        if (
            _due(done, self.cfg.checkpoint_every, self.cfg.steps)
            and self.rank == 0
            and self.run_dir is not None
        ):
            state = {
                "step": done,
                "method": method_state(self.method),
                **self.optimization.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "best": self.evaluator.best.to_dict(),
                "torch_rng": torch.get_rng_state(),
                "fingerprint": self.fingerprint,
            }
            self.last_checkpoint = str(save_checkpoint(state, self.run_dir / "checkpoints", done))
        return metrics

    def finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """The final metrics: the last curves (when this call trained), test at the last and reported
        checkpoints; writes the test scalars and predictions.parquet."""
        self.log.close()
        final: dict[str, Any] = {"step": self.cfg.steps, "resumed_from_step": self.start_step}
        if self.start_step < self.cfg.steps:
            final.update({k: v for k, v in metrics.items() if k.startswith(("train/", "val/"))})
        test_metrics, predictions = self.evaluator.finish(self.cfg.steps)
        final.update(test_metrics)
        self.board.scalars({k: v for k, v in final.items() if k.startswith("test")}, self.cfg.steps)
        self.board.close()
        if self.rank == 0 and self.run_dir is not None and predictions:
            write_predictions(predictions, self.run_dir / PREDICTIONS_FILE)
        return final

    def latest_checkpoint(self) -> str | None:
        if self.run_dir is None or self.rank != 0:
            return None
        found = latest_checkpoint(self.run_dir / "checkpoints")
        return str(found) if found is not None else None


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
