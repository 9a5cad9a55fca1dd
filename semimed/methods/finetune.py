"""Fine-tuning a (pretrained) backbone: a linear probe, full fine-tuning, or the two in sequence.

Strategies (`strategy=`):

- `linear_probe`: only the head trains; the trunk is frozen, weights AND BatchNorm statistics (a frozen
  feature extractor whose running means still drift is not frozen).
- `full`: everything trains; the trunk at `trunk_lr_scale` x the base LR (default 1.0).
- `gradual` (LP-FT, Kumar et al. 2022): a linear probe for `probe_steps` steps, then the trunk is unfrozen at
  `trunk_lr_scale` x the base LR (default 0.1). Probing first means the trunk's first gradients come from a
  fitted head, not a random one, which would otherwise push noise back into the pretrained features.

`layer_decay` < 1 adds layer-wise LR decay (BEiT, Bao et al. 2022) on top: the head trains at the base LR, the
deepest trunk layer at trunk_lr_scale x decay, the one below at trunk_lr_scale x decay², … down to the stem,
using timm's layer grouping of the backbone (`group_matcher`). `freeze_bn=True` keeps every BatchNorm layer in
eval mode for the whole run (its affine weights still train): with batches of a few labeled images, batch
statistics are noisy and the pretrained running statistics are the better estimate.

Mechanics: the engine builds its optimizer once, before the first step. So under `gradual` the trunk is in an
optimizer group from the start, with requires_grad=False until the switch: its gradients stay None, and AdamW,
Adam and SGD skip parameters without a gradient (no update, no weight decay). The switch is decided by the
step number in `train_step`, so a run resumed after it unfreezes again at its first step.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from semimed.errors import SemimedError
from semimed.losses import supervised_loss
from semimed.methods.base import METHODS, Batch, Method, StepOutput
from semimed.models.parts import classifier_name, is_head_key, unwrap_model

STRATEGIES = ("linear_probe", "full", "gradual")


@METHODS.register("finetune")
class FineTune(Method):
    """Supervised loss on the labeled batch, with a freezing schedule and per-layer learning rates."""

    expects_pretrained = True  # from scratch it is plain supervised training: config check says so
    param_rules = {
        "strategy": STRATEGIES,
        "probe_steps": "[0, inf)",
        "trunk_lr_scale": "[0, inf)",
        "layer_decay": "(0, 1]",
    }

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        multilabel: bool,
        strategy: str = "gradual",
        probe_steps: int = 100,
        trunk_lr_scale: float | None = None,
        layer_decay: float = 1.0,
        freeze_bn: bool = False,
    ) -> None:
        super().__init__(model, num_classes, multilabel)
        if strategy not in STRATEGIES:
            raise SemimedError(f"unknown method.params.strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
        if probe_steps < 0:
            raise SemimedError(f"method.params.probe_steps={probe_steps} must be >= 0")
        if not 0.0 < layer_decay <= 1.0:
            raise SemimedError(f"method.params.layer_decay={layer_decay} must be in (0, 1]")
        if trunk_lr_scale is not None and trunk_lr_scale < 0:
            raise SemimedError(f"method.params.trunk_lr_scale={trunk_lr_scale} must be >= 0")
        self.head_name = classifier_name(model)
        if not self.head_name:
            raise SemimedError(
                f"finetune: backbone {type(model).__name__} has no classifier head (get_classifier)"
            )
        if layer_decay < 1.0 and not hasattr(model, "group_matcher"):
            raise SemimedError(
                f"method.params.layer_decay needs timm's layer grouping, which {type(model).__name__} lacks"
            )
        self.strategy = strategy
        self.probe_steps = probe_steps
        self.trunk_lr_scale = (
            trunk_lr_scale if trunk_lr_scale is not None else (0.1 if strategy == "gradual" else 1.0)
        )
        self.layer_decay = layer_decay
        self.freeze_bn = freeze_bn
        self.trunk_trainable = False
        self._set_trunk_trainable(strategy == "full")

    # ------------------------------------------------------------------------------------------- freezing
    def _named_trunk(self) -> list[tuple[str, nn.Parameter]]:
        net = unwrap_model(self.model)
        return [(n, p) for n, p in net.named_parameters() if not is_head_key(n, self.head_name)]

    def _set_trunk_trainable(self, trainable: bool) -> None:
        for _, param in self._named_trunk():
            param.requires_grad_(trainable)
        self.trunk_trainable = trainable
        self.train(self.training)  # re-apply the BatchNorm modes for the new phase

    def train(self, mode: bool = True) -> FineTune:
        """nn.Module.train, except that BatchNorm layers of a frozen trunk (or all, with freeze_bn) stay in eval
        mode. The engine calls train()/eval() around every evaluation, so the rule is applied here."""
        super().train(mode)
        if mode:
            for name, module in unwrap_model(self.model).named_modules():
                if isinstance(module, _BatchNorm) and (
                    self.freeze_bn or (not self.trunk_trainable and not is_head_key(name, self.head_name))
                ):
                    module.eval()
        return self

    def wrap_models(self, wrap) -> None:
        if self.strategy == "gradual":
            # DDP registers gradient hooks only for parameters that require grad when it wraps the network:
            # a trunk unfrozen later would train without gradient all-reduce and the workers would drift apart.
            raise SemimedError(
                "finetune strategy 'gradual' runs on one worker (scaling.num_workers=1); use 'full' or "
                "'linear_probe' with several workers"
            )
        super().wrap_models(wrap)

    # ------------------------------------------------------------------------------------------ optimizer
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Head at the base LR; trunk (except under linear_probe) at trunk_lr_scale x layer_decay^depth."""
        net = unwrap_model(self.model)
        head = [p for n, p in net.named_parameters() if is_head_key(n, self.head_name)]
        groups: list[dict[str, Any]] = [{"params": head, "lr_scale": 1.0, "name": "head"}]
        if self.strategy == "linear_probe":
            return groups
        trunk = self._named_trunk()
        layer_of = self._trunk_layers([n for n, _ in trunk])
        depth = max(layer_of.values(), default=0) + 1
        by_layer: dict[int, list[nn.Parameter]] = {}
        for name, param in trunk:
            by_layer.setdefault(layer_of[name], []).append(param)
        for layer in sorted(by_layer, reverse=True):
            scale = self.trunk_lr_scale * self.layer_decay ** (depth - layer)
            groups.append({"params": by_layer[layer], "lr_scale": scale, "name": f"trunk_layer_{layer}"})
        return groups

    def _trunk_layers(self, names: list[str]) -> dict[str, int]:
        """Layer id per trunk parameter (0 = stem); a single layer when no decay is asked for."""
        if self.layer_decay == 1.0:
            return {n: 0 for n in names}
        from timm.models import group_parameters

        net = unwrap_model(self.model)
        layer_map = group_parameters(net, net.group_matcher(coarse=False), reverse=True)
        # timm puts unmatched parameters (and the head) into the last group; renumber over the trunk only.
        ids = sorted({layer_map.get(n, 0) for n in names})
        dense = {old: new for new, old in enumerate(ids)}
        return {n: dense[layer_map.get(n, 0)] for n in names}

    # ------------------------------------------------------------------------------------------------ step
    def train_step(self, batch: Batch, step: int) -> StepOutput:
        if self.strategy == "gradual" and not self.trunk_trainable and step >= self.probe_steps:
            self._set_trunk_trainable(True)
        loss = supervised_loss(self.model(batch.x), batch.y, self.multilabel)
        return StepOutput(loss, {"sup_loss": loss.detach(), "trunk_trainable": float(self.trunk_trainable)})

    def extra_repr(self) -> str:
        return (
            f"strategy={self.strategy}, probe_steps={self.probe_steps}, trunk_lr_scale={self.trunk_lr_scale}"
        )
