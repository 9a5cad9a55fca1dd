"""Mechanics the semi-supervised methods share, written once (USB's lesson, without its god-object):

- ramp-ups of the unlabeled-loss weight (`linear_rampup`, `sigmoid_rampup`);
- the EMA teacher (`ema_decay`, `ema_update_`);
- confidence masks over predictions, single- and multi-label (`confidence_targets`), the masked pseudo-label
  loss (`pseudo_label_loss`) and what every SSL method logs about them (`pseudo_label_logs`).

Shapes: probabilities / logits [N, K]; single-label targets int64 [N] with a mask [N]; multi-label targets
float [N, K] (0/1) with a mask [N, K]. Masks are float (1 = used, 0 = ignored).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from semimed.errors import SemimedError
from semimed.methods.base import Method, Needs
from semimed.models.parts import unwrap_model as unwrap

# ---------------------------------------------------------------------------------------------------- ramp-ups


def linear_rampup(step: int, length: int) -> float:
    """0 at step 0 rising linearly to 1 at `length` (Lee 2013's alpha(t) with T1 = 0, T2 = length).

    length <= 0 means no ramp: 1.0 from the first step.
    """
    if length <= 0:
        return 1.0
    return min(1.0, max(0.0, step / length))


def sigmoid_rampup(step: int, length: int) -> float:
    """exp(-5 (1 - t)^2) with t = step / length clipped to [0, 1] (Laine & Aila 2017; Tarvainen & Valpola 2017).

    Starts at exp(-5) = 0.0067, not 0, and reaches 1 at `length`. length <= 0 means no ramp.
    """
    if length <= 0:
        return 1.0
    t = min(1.0, max(0.0, step / length))
    return math.exp(-5.0 * (1.0 - t) ** 2)


# ------------------------------------------------------------------------------------- self-supervised networks


class SelfSupervised(Method):
    """Base of the self-supervised pretraining methods: two strong views of every training image, no label, no
    val/test image, nothing to classify; the trained network (`self.model`) is an `Embedder` whose backbone is
    what the run exports."""

    needs = Needs(labeled=False, unlabeled=("strong", "strong"))
    classifies = False

    def backbone(self) -> nn.Module:
        return unwrap(self.model).backbone


class Embedder(nn.Module):
    """A classifier backbone's trunk, pooled, then a head (a projection MLP): x [B, C, H, W] -> [B, D].

    One module, so that DDP wraps one forward; `backbone` stays the timm-style network a run exports.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        for name in ("forward_features", "forward_head", "num_features"):
            if not hasattr(backbone, name):
                raise SemimedError(f"backbone {type(backbone).__name__} lacks {name} (timm-style API)")
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True))


# ------------------------------------------------------------------------------------------------ EMA teacher


def ema_decay(updates: int, max_decay: float) -> float:
    """Mean Teacher's decay after `updates` optimizer steps: min(1 - 1/(updates + 1), max_decay).

    Early on this makes the teacher the plain average of all students so far (1/2 after the first update,
    2/3 after the second, ...) instead of a copy dominated by the random initialisation.
    """
    return min(1.0 - 1.0 / (updates + 1), max_decay)


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, decay: float, buffers: bool = False) -> None:
    """In place: teacher = decay · teacher + (1 − decay) · student over the parameters. `student` must be the
    unwrapped network.

    Buffers (BatchNorm running statistics) are left alone by default: averaged weights do not produce the
    activations whose averaged statistics the student's buffers hold (why SWA recomputes them), so a Mean
    Teacher keeps the statistics of its own forward passes, as in the paper's code. `buffers=True` averages
    float buffers the same way and copies integer ones (for a teacher that never runs in train mode).
    """
    teacher_params, student_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    if teacher_params.keys() != student_params.keys():
        raise SemimedError("EMA teacher and student have different architectures (a DDP-wrapped student?)")
    for name, value in teacher_params.items():
        value.lerp_(student_params[name].detach(), 1.0 - decay)  # t + (1-d)(s - t) = d t + (1-d) s
    if not buffers:
        return
    student_buffers = dict(student.named_buffers())
    for name, value in teacher.named_buffers():
        if value.is_floating_point():
            value.lerp_(student_buffers[name], 1.0 - decay)
        else:
            value.copy_(student_buffers[name])


# ------------------------------------------------------------------------------------------ confidence masks


def threshold_tensor(
    value: float | Sequence[float], num_classes: int, multilabel: bool, name: str
) -> torch.Tensor:
    """A threshold as a float tensor: scalar [] or, for multi-label targets only, one per finding [K].

    Raises with the parameter's name when a value is outside [0, 1] or a list has the wrong length.
    """
    if isinstance(value, (list, tuple)):
        if not multilabel:
            raise SemimedError(
                f"{name}: one threshold per class is only for multi-label targets; give one number"
            )
        if len(value) != num_classes:
            raise SemimedError(f"{name}: {len(value)} thresholds for {num_classes} findings")
    tensor = torch.as_tensor(value, dtype=torch.float32)
    if tensor.ndim > 1 or not bool(((tensor >= 0) & (tensor <= 1)).all()):
        raise SemimedError(
            f"{name}: {value!r} must be a number (or, multi-label, a list of numbers) in [0, 1]"
        )
    return tensor


def confidence_targets(
    probs: torch.Tensor,
    multilabel: bool,
    threshold: torch.Tensor,
    negative_threshold: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard pseudo-labels and the mask of the confident ones, from detached probabilities [N, K].

    Single-label (FixMatch, Pseudo-Label): target = argmax_k p_k, used where max_k p_k >= threshold;
    returns (int64 [N], float [N]).
    Multi-label: each finding is a binary decision. Entry (i, k) is a confident positive (target 1) where
    p_ik >= threshold[k], otherwise a confident negative (target 0) where p_ik <= negative_threshold[k], and
    ignored in between; returns (float [N, K], float [N, K]). negative_threshold defaults to 1 - threshold.
    """
    probs = probs.detach().float()
    threshold = threshold.to(probs.device)
    if not multilabel:
        confidence, targets = probs.max(dim=1)
        return targets, (confidence >= threshold).float()
    negative = (1.0 - threshold) if negative_threshold is None else negative_threshold.to(probs.device)
    positive = probs >= threshold
    confident_negative = (probs <= negative) & ~positive
    return positive.float(), (positive | confident_negative).float()


def pseudo_label_loss(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, multilabel: bool
) -> torch.Tensor:
    """Cross-entropy (single-label) or BCE (multi-label) to hard pseudo-labels, masked, averaged over ALL
    unlabeled entries — FixMatch's 1/(μB) normalisation, so the term grows with the share of confident ones.

    logits [N, K]; targets int64 [N] / float [N, K]; mask float [N] / [N, K]. Zero (with a gradient path) when
    the mask is empty.
    """
    if multilabel:
        per_entry = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    else:
        per_entry = F.cross_entropy(logits.float(), targets.long(), reduction="none")
    return (per_entry * mask).mean()


def pseudo_label_logs(
    targets: torch.Tensor,
    mask: torch.Tensor,
    true: torch.Tensor | None,
    multilabel: bool,
    class_names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """mask_rate (share of unlabeled targets used) and pseudo_acc (accuracy of the used pseudo-labels against
    the hidden labels; multi-label: over used entries whose truth is known). pseudo_acc is NaN when no target
    is used (0/0) — the engine's log average skips NaN. `true` is only ever read here, never trained on.

    With `class_names`, also per class: `mask_rate/<c>` and `pseudo_acc/<c>` over the images pseudo-labelled c
    (multi-label: over finding c's entries) — where a fixed threshold mostly pseudo-labels the majority class,
    these show it.
    """
    mask = mask.detach().float()
    logs = {"mask_rate": mask.mean()}
    correct = used = None
    if true is not None:
        if multilabel:
            used = mask * (~torch.isnan(true)).float()
            correct = (targets == torch.nan_to_num(true.float())).float()
        else:
            used = mask
            correct = (targets == true.long()).float()
        logs["pseudo_acc"] = ((correct * used).sum() / used.sum()).detach()
    for k, name in enumerate(class_names or []):
        # The entries of class k: its column (multi-label), or the images pseudo-labelled k (single-label).
        member = torch.zeros_like(mask)
        if multilabel:
            member[:, k] = 1.0
        else:
            member = (targets == k).float()
        logs[f"mask_rate/{name}"] = (mask * member).sum() / member.sum()
        if correct is not None and used is not None:
            logs[f"pseudo_acc/{name}"] = ((correct * used * member).sum() / (used * member).sum()).detach()
    return logs


class AlignsDistribution:
    """For a method with a `distribution_alignment` option (Pseudo-Label, FixMatch, FlexMatch): call
    `init_alignment` in __init__ and pass the unlabeled probabilities through `aligned`; the labeled class
    prior reaches the alignment in `setup`. Listed before `Method` among the bases."""

    align: DistributionAlignment | None

    def init_alignment(self, enabled: bool, num_classes: int, multilabel: bool, name: str) -> None:
        if enabled and multilabel:
            raise SemimedError(
                f"{name}: distribution_alignment is for single-label targets (one class per image)"
            )
        self.align = DistributionAlignment(num_classes) if enabled else None

    def setup(self, info) -> None:  # type: ignore[no-untyped-def]
        super().setup(info)  # type: ignore[misc]
        if self.align is not None:
            self.align.set_target(info.labeled_class_counts)

    def aligned(self, probs: torch.Tensor) -> torch.Tensor:
        """`probs` [N, K] aligned to the labeled prior (updating the running model distribution), or as is."""
        return self.align(probs) if self.align is not None else probs


class DistributionAlignment(nn.Module):
    """Distribution alignment (Berthelot et al. 2020, ReMixMatch): unlabeled predictions [N, K] are rescaled by
    p_target / p_model and renormalized, where p_model is a running mean (momentum `momentum`) of the
    predictions on unlabeled images and p_target the labeled class distribution (uniform until `setup` gives
    the counts). On an imbalanced set the network's predictions lean to the majority class; alignment pulls
    their average back to the labeled prior, so the minority class gets its share of pseudo-labels.

    p_model starts at the first batch's mean prediction (as USB's DistAlignEMAHook does), not at the uniform
    distribution: with momentum 0.999 a uniform start would still weigh 82% after 200 steps, and p_target /
    uniform is the prior itself, which pushes predictions TOWARD the majority class — the opposite of the aim.
    Under DDP the batch mean is averaged over ranks, so every rank holds the same p_model (rank 0's is saved).
    Single-label only. Both distributions and the `started` flag are buffers (checkpointed: resume is exact).
    """

    def __init__(self, num_classes: int, momentum: float = 0.999) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("p_target", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("p_model", torch.full((num_classes,), 1.0 / num_classes))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    def set_target(self, class_counts: Sequence[float]) -> None:
        counts = torch.as_tensor(list(class_counts), dtype=torch.float32)
        if len(counts) == len(self.p_target) and float(counts.sum()) > 0:
            self.p_target.copy_(counts / counts.sum())

    @torch.no_grad()
    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        """Update p_model with this batch's mean prediction, then align `probs` [N, K] (rows sum to 1)."""
        batch_mean = probs.float().mean(dim=0)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(batch_mean)
            batch_mean /= torch.distributed.get_world_size()
        if bool(self.started):
            self.p_model.mul_(self.momentum).add_(batch_mean, alpha=1.0 - self.momentum)
        else:
            self.p_model.copy_(batch_mean)
            self.started.fill_(True)
        aligned = probs.float() * (self.p_target / self.p_model.clamp(min=1e-6))
        return aligned / aligned.sum(dim=1, keepdim=True)


def register_thresholds(
    method: torch.nn.Module,
    threshold: float | Sequence[float],
    negative_threshold: float | Sequence[float] | None,
    num_classes: int,
    multilabel: bool,
    name: str,
) -> None:
    """Confidence thresholds as `method.threshold` / `method.negative_threshold` buffers (pseudo_label, fixmatch).

    Buffers, not plain tensors, so they follow the method to its device; not persistent: they are
    hyperparameters (in config.yaml), not learned state.
    """
    if negative_threshold is not None and not multilabel:
        raise SemimedError(f"{name}: negative_threshold is only for multi-label targets")
    method.register_buffer(
        "threshold", threshold_tensor(threshold, num_classes, multilabel, "threshold"), persistent=False
    )
    negative = (
        None
        if negative_threshold is None
        else threshold_tensor(negative_threshold, num_classes, multilabel, "negative_threshold")
    )
    method.register_buffer("negative_threshold", negative, persistent=False)
