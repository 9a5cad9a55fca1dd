"""THE training loop. Every method and every entry point (CLI, Ray Train worker, tests, benchmarks) runs
through `fit`; it never imports Ray — under Ray Train the adapter passes `report` and the device.

The engine owns: device placement, DDP wrapping (when torch.distributed is initialized), the optimizer and LR
schedule, AMP, gradient clipping, step-budgeted iteration, periodic evaluation with checkpoint selection on
val, checkpoint save/resume (weights_only=True), TensorBoard scalars, and final test metrics.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from semimed.config import TrainConfig
from semimed.data.augment import Normalizer
from semimed.data.views import ImageView, TwoView, eval_loader, step_loader
from semimed.errors import SemimedError
from semimed.losses import probabilities
from semimed.methods.base import Batch, Method
from semimed.metrics import choose_thresholds, evaluate_scores

ReportFn = Callable[[dict[str, Any], "str | None"], None]
CHECKPOINTS_KEPT = 2


@dataclass
class RunData:
    """What a training run reads: views over one decoded pixel array, plus per-row targets for metrics."""

    labeled: ImageView
    unlabeled: TwoView | None
    val: ImageView | None
    test: ImageView | None
    classes: list[str]
    multilabel: bool
    targets: np.ndarray  # per dataset row: int [N] or float [N, K] with NaN
    patient_ids: np.ndarray | None = None  # per dataset row; enables patient-level accuracy
    # Views yield uint8 images; the engine normalizes them on the device with this.
    normalize: Normalizer | None = None


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the base LR at `step`: linear warm-up, then cosine to 0, constant, or ×0.1 at milestones."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if cfg.schedule == "step":
        return 0.1 ** sum(step >= int(m * cfg.steps) for m in cfg.milestones)
    raise SemimedError(f"unknown train.schedule {cfg.schedule!r}; valid: constant, cosine, step")


def build_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    param_groups = [
        {
            "params": g["params"],
            "lr": cfg.lr * g.get("lr_scale", 1.0),
            "initial_lr": cfg.lr * g.get("lr_scale", 1.0),
        }
        for g in groups
        if g["params"]
    ]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            param_groups,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.momentum > 0,
        )
    raise SemimedError(f"unknown train.optimizer {cfg.optimizer!r}; valid: adam, adamw, sgd")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _canonical_key(key: str) -> str:
    # DDP nests the network under `.module`; checkpoints store the unwrapped names so they load anywhere.
    return re.sub(r"(^|\.)module\.", r"\1", key)


def method_state(method: Method) -> dict[str, Any]:
    return {_canonical_key(k): _cpu_copy(v) for k, v in method.state_dict().items()}


def _cpu_copy(value: Any) -> Any:
    """Tensors -> detached CPU copies, recursively through the dicts and lists of a module's extra state
    (nn.Module.get_extra_state, e.g. GAN-SSL's generator optimizer); other values as they are."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(v) for v in value)
    return value


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(folder.glob("step_*/state.pt")) if folder.is_dir() else []
    return found[-1].parent if found else None


def load_checkpoint(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SemimedError(f"{path}: checkpoint not found") from None
    except Exception as exc:
        raise SemimedError(
            f"{path}: not a loadable semimed checkpoint ({type(exc).__name__}: {exc})"
        ) from None


def save_checkpoint(state: dict[str, Any], folder: Path, step: int) -> Path:
    """Write `folder/step_XXXXXXX/state.pt` atomically (temp dir, then rename) and prune old checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"step_{step:07d}"
    staging = Path(tempfile.mkdtemp(prefix=".staging_", dir=folder))
    torch.save(state, staging / "state.pt")
    if target.exists():
        shutil.rmtree(target)
    staging.replace(target)
    for old in sorted(folder.glob("step_*"))[:-CHECKPOINTS_KEPT]:
        shutil.rmtree(old, ignore_errors=True)
    return target


class _Tensorboard:
    """Rank-0 scalars; a no-op elsewhere or when the run has no directory."""

    def __init__(self, run_dir: Path | None, enabled: bool) -> None:
        self.writer = None
        if run_dir is not None and enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)) and np.isfinite(value):
                self.writer.add_scalar(key, value, step)

    def images(self, grids: dict[str, torch.Tensor], step: int) -> None:
        if self.writer is None:
            return
        for key, images in grids.items():
            self.writer.add_images(key, images.detach().float().clamp(0, 1).cpu(), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _to_device(batch, device: torch.device, channels_last: bool, normalize: Normalizer | None):
    """Move a loader batch to the device; image tensors [B, C, H, W] are normalized there (uint8 -> float)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    out = []
    for item in batch:
        if isinstance(item, torch.Tensor):
            item = item.to(device, non_blocking=True)
            if item.ndim == 4:
                item = (normalize(item) if normalize is not None else item).contiguous(
                    memory_format=memory_format
                )
        out.append(item)
    return out


@torch.no_grad()
def predict_scores(
    method: Method,
    view: ImageView,
    batch_size: int,
    device: torch.device,
    autocast,
    rank: int,
    world: int,
    channels_last: bool = False,
    normalize: Normalizer | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, probabilities [n, K]) over the whole view, gathered from every rank in row order."""
    was_training = method.training
    method.eval()
    rows, scores = [], []
    for x, _, row in eval_loader(view, batch_size, rank, world):
        (x,) = _to_device([x], device, channels_last, normalize)
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


def _resume_state(resume_from: str | Path | None, run_dir: Path | None, world: int) -> dict[str, Any] | None:
    """The checkpoint to resume from: the newer of the one handed in (Ray's) and the run folder's own.

    Ray persists a reported checkpoint asynchronously; a run killed right after its last report can come back
    with an older checkpoint from Ray than the one already in its folder, and should not train those steps
    twice. With several ranks the local folder is used only if every rank sees the same newest step there
    (on several nodes each has its own disk; then Ray's checkpoint is the common ground).
    """
    given = load_checkpoint(resume_from) if resume_from else None
    local = latest_checkpoint(run_dir / "checkpoints") if run_dir is not None else None
    local_step = int(local.name.removeprefix("step_")) if local is not None else -1
    if world > 1:
        steps: list[Any] = [None] * world
        dist.all_gather_object(steps, local_step)
        if len(set(steps)) != 1:
            local_step = -1
    if local_step > (int(given["step"]) if given is not None else -1):
        return load_checkpoint(local)
    return given


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
) -> dict[str, Any]:
    """Train `method` for `cfg.steps` optimizer steps; returns the final metrics (also passed to `report`).

    Resumes from `resume_from`, or else from the newest checkpoint under `run_dir/checkpoints`. Reported at
    every evaluation: `step`, `train/*` and `val/*`; at the end: `test/*` for the checkpoint selected on val
    (`cfg.select_metric`, default roc_auc; the last one under val_policy none) and `test_last/*`.
    """
    for key in ("steps", "batch_size", "eval_every", "checkpoint_every", "unlabeled_ratio"):
        if getattr(cfg, key) < 1:
            raise SemimedError(f"train.{key}={getattr(cfg, key)} must be >= 1")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = device or resolve_device(cfg.device)
    run_dir = Path(run_dir) if run_dir is not None else None
    select_metric = cfg.select_metric or "roc_auc"
    if data.unlabeled is None and method.uses_unlabeled:
        raise SemimedError(f"method {type(method).__name__} needs unlabeled images, but the split has none")

    start_step, best, state = 0, {"score": -math.inf, "step": -1, "state": None, "thresholds": None}, None
    state = _resume_state(resume_from, run_dir, world)
    if state is not None:
        method.load_state_dict(state["method"])
        start_step = int(state["step"])
        best = state["best"]
    if world > 1:
        # Every rank must start from the same step, or the first collective op hangs forever.
        starts: list[Any] = [None] * world
        dist.all_gather_object(starts, start_step)
        if len(set(starts)) != 1:
            raise SemimedError(f"DDP ranks would resume from different steps {starts}; is run_dir shared?")
    method.to(device)
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        method.wrap_models(lambda net: nn.parallel.DistributedDataParallel(net, device_ids=ids))
    optimizer = build_optimizer(method.parameter_groups(), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    use_fp16 = cfg.amp == "fp16" and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_fp16)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    if cfg.amp not in ("off", "bf16", "fp16"):
        raise SemimedError(f"unknown train.amp {cfg.amp!r}; valid: off, bf16, fp16")

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    if cfg.channels_last:
        method.to(memory_format=torch.channels_last)

    data.normalize = data.normalize or Normalizer(int(data.labeled.pixels.shape[1]))
    local_batch = cfg.batch_size // world
    labeled_iter = iter(
        step_loader(data.labeled, cfg.batch_size, seed, start_step, rank, world, cfg.loader_workers)
    )
    unlabeled_iter = None
    if method.uses_unlabeled and data.unlabeled is not None:
        unlabeled_iter = iter(
            step_loader(
                data.unlabeled,
                cfg.batch_size * cfg.unlabeled_ratio,
                seed + 1,
                start_step,
                rank,
                world,
                cfg.loader_workers,
            )
        )

    if state is not None and "torch_rng" in state:
        # Augmentations and dropout draw from torch's generator: continue its stream, so a resumed run sees the
        # same random crops as an uninterrupted one (exact with loader_workers=0). Restored after the loaders
        # are built, because creating a loader iterator draws from the same generator.
        torch.set_rng_state(state["torch_rng"])

    def evaluate(
        view: ImageView, thresholds: np.ndarray | None, choose: bool
    ) -> tuple[dict, np.ndarray | None]:
        rows, scores = predict_scores(
            method,
            view,
            max(local_batch, 64),
            device,
            autocast,
            rank,
            world,
            cfg.channels_last,
            data.normalize,
        )
        targets = data.targets[rows]
        if choose and data.multilabel:
            thresholds = choose_thresholds(targets, scores, "youden", classes=data.classes)
        patients = data.patient_ids[rows] if data.patient_ids is not None else None
        return evaluate_scores(
            targets, scores, data.classes, data.multilabel, patients, thresholds
        ), thresholds

    board = _Tensorboard(run_dir, rank == 0)
    log_every = max(1, min(50, cfg.eval_every // 4))
    running: dict[str, list] = {}
    method.train()
    progress = tqdm(
        total=cfg.steps,
        initial=start_step,
        desc="train",
        unit="step",
        mininterval=5.0,
        disable=not show_progress or rank != 0,
    )
    tick, images, last_train, metrics = time.perf_counter(), 0, {}, {}
    for step in range(start_step, cfg.steps):
        x, y, _ = _to_device(next(labeled_iter), device, cfg.channels_last, data.normalize)
        batch = Batch(x, y)
        if unlabeled_iter is not None:
            batch.u_weak, batch.u_strong, batch.u_true, _ = _to_device(
                next(unlabeled_iter), device, cfg.channels_last, data.normalize
            )
        with autocast():
            out = method.train_step(batch, step)
        if not torch.isfinite(out.loss.detach()):
            raise SemimedError(
                f"loss became {float(out.loss)} at step {step}; lower train.lr or enable grad_clip"
            )
        scaler.scale(out.loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        method.after_optimizer_step(step)
        images += len(x) * world
        running.setdefault("train/loss", []).append(out.loss.detach())
        for key, value in out.logs.items():
            running.setdefault(f"train/{key}", []).append(value)
        done = step + 1
        progress.update(1)
        if done % log_every == 0 or done == cfg.steps:
            elapsed = time.perf_counter() - tick
            # nanmean: a log may be undefined at a step (pseudo_acc with no confident pseudo-label is NaN).
            scalars = {
                k: float(torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in vals]).nanmean())
                for k, vals in running.items()
            }
            scalars["train/lr"] = optimizer.param_groups[0]["lr"]
            scalars["train/images_per_s"] = images / max(elapsed, 1e-9)
            board.scalars(scalars, done)
            progress.set_postfix(loss=f"{scalars['train/loss']:.3f}", refresh=False)
            running, tick, images = {}, time.perf_counter(), 0
            last_train = scalars
        if done % cfg.eval_every == 0 or done % cfg.checkpoint_every == 0 or done == cfg.steps:
            metrics = {"step": done, **last_train}
            if (
                data.val is not None
                and len(data.val) > 0
                and (done % cfg.eval_every == 0 or done == cfg.steps)
            ):
                val_metrics, thresholds = evaluate(data.val, None, choose=True)
                metrics.update({f"val/{k}": v for k, v in val_metrics.items()})
                board.scalars({f"val/{k}": v for k, v in val_metrics.items()}, done)
                if rank == 0:
                    board.images(method.tensorboard_images(), done)
                score = val_metrics.get(select_metric, math.nan)
                if score is not None and np.isfinite(score) and score > best["score"]:
                    best = {
                        "score": float(score),
                        "step": done,
                        "state": method_state(method),
                        "thresholds": None if thresholds is None else torch.as_tensor(thresholds),
                    }
            checkpoint_path = None
            if rank == 0 and run_dir is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
                checkpoint_path = str(
                    save_checkpoint(
                        {
                            "step": done,
                            "method": method_state(method),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "scaler": scaler.state_dict(),
                            "best": best,
                            "torch_rng": torch.get_rng_state(),
                        },
                        run_dir / "checkpoints",
                        done,
                    )
                )
            if report is not None and done < cfg.steps:
                report(metrics, checkpoint_path)
    progress.close()

    final: dict[str, Any] = {
        "step": cfg.steps,
        "selected_step": best["step"] if best["state"] else cfg.steps,
        "resumed_from_step": start_step,
    }
    if start_step < cfg.steps:
        final.update({k: v for k, v in metrics.items() if k.startswith(("train/", "val/"))})
    last_state = method_state(method)
    if data.test is not None and len(data.test) > 0:
        # Multi-label thresholds come from val (chosen at the selected checkpoint), never from test.
        val_thresholds = None
        if data.multilabel and data.val is not None and len(data.val) > 0:
            _, val_thresholds = evaluate(data.val, None, choose=True)
        last_metrics, _ = evaluate(data.test, val_thresholds, choose=False)
        final.update({f"test_last/{k}": v for k, v in last_metrics.items()})
        selected = last_metrics
        if best["state"] is not None and best["step"] != cfg.steps:
            load_canonical_state(method, best["state"])
            thresholds = best["thresholds"].numpy() if best["thresholds"] is not None else None
            selected, _ = evaluate(data.test, thresholds, choose=False)
            load_canonical_state(method, last_state)
        final.update({f"test/{k}": v for k, v in selected.items()})
    board.scalars({k: v for k, v in final.items() if k.startswith("test")}, cfg.steps)
    board.close()
    if report is not None:
        checkpoint_path = str(latest_checkpoint(run_dir / "checkpoints")) if run_dir and rank == 0 else None
        # Not "done": Tune reads a result with done=True as "stop this trial", which would kill the worker
        # before run_training writes metrics.json.
        report({**final, "final": True}, checkpoint_path)
    return final


def load_canonical_state(method: Method, state: dict[str, torch.Tensor]) -> None:
    """Load a checkpoint's canonical (unwrapped) state into `method`, DDP-wrapped or not."""
    method.load_state_dict({key: state[_canonical_key(key)] for key in method.state_dict()})
