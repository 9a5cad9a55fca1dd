"""The method contract: a method owns its model(s) and computes losses; the engine owns everything else
(backward, optimizer, AMP, clipping, checkpointing, device placement, evaluation)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from semimed.errors import SemimedError
from semimed.registry import Registry


@dataclass
class Batch:
    """One training step's data, already on the device.

    x: labeled images [B, C, H, W]; y: int [B] or float [B, K] (NaN = unknown).
    u_weak / u_strong: unlabeled images [μB, C, H, W] (SSL methods only); u_true: their hidden labels, ONLY
    for logging pseudo-label accuracy in simulated label-fraction studies — never for training.
    """

    x: torch.Tensor
    y: torch.Tensor
    u_weak: torch.Tensor | None = None
    u_strong: torch.Tensor | None = None
    u_true: torch.Tensor | None = None


@dataclass
class StepOutput:
    loss: torch.Tensor  # the scalar the engine backpropagates
    # Per-step scalars (sup_loss, unsup_loss, mask_rate…) as detached tensors: the engine reads them only every
    # few steps, so logging never forces a GPU sync per step.
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)


class Method(nn.Module):
    """Base class. Subclasses take typed keyword hyperparameters and implement `train_step`.

    Being an nn.Module, a method's state_dict holds every network it owns (student, teacher, generator),
    which is what the engine checkpoints.
    """

    uses_unlabeled: bool = False
    supports_multilabel: bool = True

    def __init__(self, model: nn.Module, num_classes: int, multilabel: bool) -> None:
        super().__init__()
        if multilabel and not self.supports_multilabel:
            raise SemimedError(f"method {type(self).__name__} does not support multi-label targets")
        self.model = model
        self.num_classes = num_classes
        self.multilabel = multilabel

    def train_step(self, batch: Batch, step: int) -> StepOutput:
        raise NotImplementedError

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, K] of the network that is evaluated (the student by default)."""
        return self.model(x)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups; `lr_scale` multiplies the base LR (fine-tuning uses it)."""
        return [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr_scale": 1.0}]

    def after_optimizer_step(self, step: int) -> None:
        """Hook for updates outside the engine's optimizer: EMA teachers, or a second network's own step
        (GAN-SSL's generator keeps its optimizer in the method; nn.Module's get_extra_state/set_extra_state
        puts that optimizer's state into the checkpoint)."""

    def tensorboard_images(self) -> dict[str, torch.Tensor]:
        """Image grids [N, C, H, W] in [0, 1] to log at each evaluation (e.g. GAN samples)."""
        return {}

    def wrap_models(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Replace trained networks by `wrap(network)` (DDP). The unwrapped module stays at `.module`."""
        self.model = wrap(self.model)

    def networks(self) -> Iterator[nn.Module]:
        yield self.model


METHODS: Registry[Method] = Registry("method")


def check_method(name: str, params: dict[str, Any]) -> None:
    """Raise if `name` is no method or `params` holds a keyword its __init__ does not take (cheap: no model)."""
    factory = METHODS.get(name)
    accepted = [
        p
        for p in inspect.signature(factory.__init__).parameters
        if p not in ("self", "model", "num_classes", "multilabel")
    ]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise SemimedError(
            f"unknown parameter(s) {', '.join(unknown)} for method {name!r}; valid: {', '.join(accepted) or 'none'}"
        )


def create_method(name: str, model: nn.Module, num_classes: int, multilabel: bool, **params: Any) -> Method:
    """Build a method by name; unknown names or hyperparameters raise with the valid ones listed."""
    check_method(name, params)
    return METHODS.get(name)(model=model, num_classes=num_classes, multilabel=multilabel, **params)
