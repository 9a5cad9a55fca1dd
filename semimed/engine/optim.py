"""The parameter update: optimizer(s), LR schedule, gradient scaler and clipping, in one object.

`Optimization.update(loss)` is one step of the default update (backward, unscale and clip, optimizer step,
scaler update, zero the gradients, schedule step). A method that trains a second network with its own optimizer
(GAN-SSL's generator) declares it in `Method.extra_optimizers` and steps it in `Method.update_parameters`; the
engine builds, checkpoints and restores it here like the main one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from semimed.config import TrainConfig
from semimed.errors import SemimedError


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
    """The engine's optimizer over `groups` (`lr_scale` per group multiplies the base LR)."""
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


class Optimization:
    """The method's optimizers, the LR schedule of the main one, and the fp16 gradient scaler."""

    def __init__(self, method: nn.Module, cfg: TrainConfig, device: torch.device) -> None:
        self.optimizer = build_optimizer(method.parameter_groups(), cfg)
        self.extra: dict[str, torch.optim.Optimizer] = method.extra_optimizers()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16" and device.type == "cuda")
        self.grad_clip = cfg.grad_clip

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        """Step the main optimizer on the gradients it holds: unscale and clip, step (GradScaler skips a step with
        non-finite fp16 gradients), update the scale, zero the gradients, advance the schedule."""
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def update(self, loss: torch.Tensor) -> None:
        """The default parameter update of one training step."""
        self.backward(loss)
        self.step()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "extra_optimizers": {name: opt.state_dict() for name, opt in self.extra.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        saved = state.get("extra_optimizers", {})
        if set(saved) != set(self.extra):
            raise SemimedError(
                f"checkpoint holds optimizers {sorted(saved)} but the method has {sorted(self.extra)}"
            )
        for name, optimizer in self.extra.items():
            optimizer.load_state_dict(saved[name])
