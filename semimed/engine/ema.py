"""An exponential moving average (EMA) of the trained weights, evaluated in place of the raw weights
(`train.ema`: the decay m, 0 = off).

FixMatch and USB report the accuracy of an EMA of the weights (m = 0.999); it smooths the last steps' noise,
which matters most when a few labels make each step's gradient noisy. Every method gets it alike (the
matched control too), so comparisons stay paired. The average covers the parameters the optimizers train;
buffers (BatchNorm statistics) are the current network's, as in the reference implementations. The decay
warms up as min(m, (1 + t) / (10 + t)) after t updates, so a short budget's average is not dominated by the
random initial weights (with m = 0.999 and no warm-up, 200 steps would keep 82% of the initialization).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from semimed.engine.optim import Optimization


def ema_decay_at(updates: int, decay: float) -> float:
    """The decay used for the update after `updates` earlier ones."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


class WeightEMA:
    """Shadow copies of the parameters `optimization` trains, updated after every optimizer step."""

    def __init__(self, optimization: Optimization, decay: float) -> None:
        self.decay = decay
        optimizers = [optimization.optimizer, *optimization.extra.values()]
        self.params: list[nn.Parameter] = [
            p for opt in optimizers for g in opt.param_groups for p in g["params"]
        ]
        self.shadow = [p.detach().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        decay = ema_decay_at(self.updates, self.decay)
        for shadow, param in zip(self.shadow, self.params, strict=True):
            shadow.lerp_(param.detach(), 1.0 - decay)  # s + (1-d)(p - s) = d s + (1-d) p
        self.updates += 1

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Put the averaged weights into the network (for good: at the end of training)."""
        for param, shadow in zip(self.params, self.shadow, strict=True):
            param.copy_(shadow)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the network for the duration of the block (evaluation), then the raw ones."""
        saved = [p.detach().clone() for p in self.params]
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(self.params, saved, strict=True):
                    param.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "updates": self.updates,
            "shadow": [s.detach().cpu().clone() for s in self.shadow],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(
                f"EMA state holds {len(state['shadow'])} tensors, the method trains {len(self.shadow)}"
            )
        self.updates = int(state["updates"])
        for shadow, saved in zip(self.shadow, state["shadow"], strict=True):
            shadow.copy_(saved)
