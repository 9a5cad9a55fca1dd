"""THE training loop. Every method and every entry point (CLI, Ray Train worker, tests, benchmarks) runs through
`fit`, which never imports Ray: under Ray Train the adapter passes `report` and the device.

`fit` reads as the loop it is — next batch, the method's step, the parameter update, the hooks — over small
parts: the method's declared streams (`TrainStreams`), the parameter update (`engine.optim.Optimization`,
overridable per method), evaluation and checkpoint selection (`engine.evaluate.Evaluator`), checkpoints
(`engine.checkpoint`) and curves (`engine.log`).

Where the views are built (`augment_device`): "cpu" = per image in the data loader (`semimed.data.augment`'s
torchvision transforms, in loader worker processes when `train.loader_workers` > 0); "cuda" = per batch on the
training device after the copy (`augment_batch`: the loader only gathers raw uint8 rows). On a CPU-only run
"cuda" runs the same batched code on the CPU: the training device is where it runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from semimed.config import TrainConfig
from semimed.data.augment import Normalizer, augment_batch, step_generator
from semimed.data.views import RunData, step_loader, unlabeled_pool
from semimed.engine.checkpoint import (
    latest_checkpoint,
    method_state,
    prune_checkpoints,
    resume_state,
    save_checkpoint,
)
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
    the unlabeled one with `seed + 1`, so the batches of step s depend only on (seed, s). With
    `augment_device` "cuda" the loaders yield raw uint8 rows and the views are built here, on the device, from a
    generator seeded by (seed, step, rank) (`step_generator`): a resumed run is exact with any loader_workers.
    """

    def __init__(
        self,
        data: RunData,
        needs: Needs,
        cfg: TrainConfig,
        seed: int,
        start_step: int,
        rank: int,
        world: int,
        augment_device: str = "cpu",
    ) -> None:
        self.seed, self.step, self.rank = seed, start_step, rank
        # (loader key, batch key, view kind) of the views built on the device; none on the CPU path.
        self.device_views: list[tuple[str, str, str]] = []
        on_device = augment_device != "cpu"
        self.loaders = []
        if needs.labeled:
            source = dataclasses.replace(data, labeled_augment="none") if on_device else data
            if on_device:
                self.device_views.append(("x", "x", data.labeled_augment))
            self.loaders.append(
                iter(
                    step_loader(
                        source.labeled_stream(),
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
            if on_device:  # one raw copy of each image; its views are built from it on the device
                unlabeled = data.unlabeled_stream([("u_image", "none")], needs.labeled)
                self.device_views += [("u_image", key, kind) for key, kind in needs.view_keys()]
            else:
                unlabeled = data.unlabeled_stream(needs.view_keys(), needs.labeled)
            size = cfg.batch_size * cfg.unlabeled_ratio
            self.loaders.append(
                iter(step_loader(unlabeled, size, seed + 1, start_step, rank, world, cfg.loader_workers))
            )

    def next(self, device: torch.device, channels_last: bool, normalize: Normalizer) -> Batch:
        raw: dict[str, torch.Tensor] = {}
        for loader in self.loaders:
            raw.update(next(loader))
        if self.device_views:
            raw = self._views_on(device, raw)
        self.step += 1
        return Batch({key: to_device(value, device, channels_last, normalize) for key, value in raw.items()})

    def _views_on(self, device: torch.device, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The loader's raw uint8 images replaced, in place in the key order, by their views built on `device`
        (drawn in a fixed order from this step's generator)."""
        generator = step_generator(self.seed, self.step, self.rank)
        out: dict[str, torch.Tensor] = {}
        for key, value in raw.items():
            views = [(batch_key, kind) for source, batch_key, kind in self.device_views if source == key]
            if not views:
                out[key] = value
                continue
            images = value.to(device, non_blocking=True)
            for batch_key, kind in views:
                out[batch_key] = augment_batch(kind, images, generator)
        return out


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
    augment_device: str = "cpu",
) -> dict[str, Any]:
    """Train `method` for `cfg.steps` optimizer steps; returns the final metrics (also passed to `report`).

    Resumes from `resume_from`, or else from the newest checkpoint under `run_dir/checkpoints` (only a checkpoint
    with the same `fingerprint`, when one is given). Reported at every evaluation: `step`, `train/*` and
    `val/*`; at the end: `test/*` at the reported checkpoint (selected on val by `cfg.select_metric`, else the
    last), `test_last/*`, and which checkpoint and network they come from. Writes checkpoints, TensorBoard
    curves and `predictions.parquet` under `run_dir` (rank 0). On return `method` holds the reported weights.
    `augment_device` (`data.augment_device`): where the training views are built, "cpu" (the data loader) or
    "cuda" (batched, on the training device).
    """
    run = _Run(
        method, data, cfg, seed, run_dir, resume_from, device, show_progress, fingerprint, augment_device
    )
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
        augment_device: str = "cpu",
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
        if cfg.compile:
            # After the state is loaded and the networks wrapped (in place: checkpoints keep canonical names).
            compile_networks(method, self.device)
        self.normalize = data.normalize or Normalizer(data.channels)
        self.streams = TrainStreams(
            data, needs, cfg, seed, self.start_step, self.rank, self.world, augment_device
        )
        if state is not None and "torch_rng" in state:
            # Augmentations and dropout draw from torch's generator: continue its stream, so a resumed run sees
            # the same random crops as an uninterrupted one (exact with loader_workers=0). Restored after the
            # loaders are built, because creating a loader iterator draws from the same generator.
            torch.set_rng_state(state["torch_rng"])
            # The GPU's generator too (GAN-SSL's noise, dropout and device-side draws on a CUDA run).
            if self.device.type == "cuda" and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(state["cuda_rng"], self.device)
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
                "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
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
        self.board.texts(final, self.cfg.steps)
        self.board.close()
        if self.rank == 0 and self.run_dir is not None:
            # The run is over: its last checkpoint holds the last weights and the val-selected ones (its "best"),
            # so the older one kept for resuming mid-run is no longer needed.
            prune_checkpoints(self.run_dir / "checkpoints", keep=1)
        if self.rank == 0 and self.run_dir is not None and predictions:
            write_predictions(predictions, self.run_dir / PREDICTIONS_FILE)
        return final

    def latest_checkpoint(self) -> str | None:
        if self.run_dir is None or self.rank != 0:
            return None
        found = latest_checkpoint(self.run_dir / "checkpoints")
        return str(found) if found is not None else None


def compile_networks(method: Method, device: torch.device) -> None:
    """`train.compile`: torch.compile, in place (`nn.Module.compile`), of the networks the method trains (those
    with trainable parameters; not an EMA teacher or a momentum target). In place, so parameter names, state
    dicts and the DDP wrapper stay as they are. Raises a SemimedError, before any training, when torch.compile
    cannot compile on this machine (no C++ compiler for the CPU backend, no Triton for CUDA, an unsupported
    Python)."""
    try:
        torch.compile(lambda t: t * 2 + 1)(torch.ones(2, device=device))
    except Exception as exc:  # whatever the backend raises: say which option to change
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise SemimedError(
            f"train.compile=true, but torch.compile does not work here on {device.type} "
            f"({type(exc).__name__}: {first[:300]}); set train.compile=false"
        ) from exc
    for network in method.networks():
        if any(p.requires_grad for p in network.parameters()):
            network.compile()


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
