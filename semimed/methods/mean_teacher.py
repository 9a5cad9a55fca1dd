"""Mean Teacher (Tarvainen & Valpola 2017, "Mean teachers are better role models: Weight-averaged consistency
targets improve semi-supervised deep learning results"): the student is pulled towards the predictions of a
teacher whose weights are an exponential moving average (EMA) of the student's."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from semimed.errors import SemimedError
from semimed.losses import probabilities, supervised_loss
from semimed.methods.base import METHODS, Batch, Method, Needs, StepOutput
from semimed.methods.common import ema_decay, ema_update_, pseudo_label_logs, sigmoid_rampup
from semimed.models.parts import unwrap_model as unwrap

STUDENT_VIEWS = ("weak", "strong")


@METHODS.register("mean_teacher")
class MeanTeacher(Method):
    """loss = L_sup(student(x), y) + λ_u · ramp(step) · mean((f(student(u_s)) − f(teacher(u_weak)))²)

    f is the softmax (single-label) or the per-finding sigmoid (multi-label: each finding's probability is
    matched on its own, every entry of every unlabeled image counts — there is no mask); the squared error is
    averaged over all μB·K entries (the paper's MSE consistency). ramp is the paper's sigmoid ramp-up
    exp(−5(1 − t)²) over `rampup_steps`. u_s is the student's view: `strong` (default; RandAugment + Cutout
    from the two-view wrapper) or `weak` (the teacher's own view, so only the weights differ). The paper gives
    each network an independent weak noise draw; the data path yields one weak and one strong view.

    Teacher: a deep copy of the (unwrapped) student with requires_grad False, updated after every optimizer
    step with decay α_t = min(1 − 1/(t + 1), `ema_decay`) after t updates (the paper's ramp: 1/2 after the
    first update). Only the parameters are averaged: the teacher runs in train mode during training, as in the
    paper's code, so its BatchNorm uses batch statistics for the targets and its running statistics come from
    its own forward passes (averaged student statistics do not match averaged weights; that mismatch made the
    teacher's predictions worse than the student's in a first version). `predict` uses the teacher (eval mode),
    which the paper found usually better than the student (`evaluate_teacher=False` evaluates the student).
    Under DDP only the student is wrapped; each rank updates its own teacher (identical weights; BatchNorm
    statistics from its own shard).

    Shapes: batch.x [B, C, H, W]; batch.u_weak / u_strong [μB, C, H, W]; logits [B + μB, K].
    Logs: sup_loss, unsup_loss, unsup_weight, ema_decay, mask_rate (always 1) and pseudo_acc (the teacher's
    argmax — multi-label: p >= 0.5 — against the hidden labels; never trained on).
    """

    param_rules = {
        "ema_decay": "[0, 1)",
        "lambda_u": "[0, inf)",
        "rampup_steps": "[0, inf)",
        "student_view": STUDENT_VIEWS,
    }

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        multilabel: bool,
        ema_decay: float = 0.99,
        lambda_u: float = 10.0,
        rampup_steps: int = 200,
        student_view: str = "strong",
        evaluate_teacher: bool = True,
    ) -> None:
        super().__init__(model, num_classes, multilabel)
        if not 0.0 <= ema_decay < 1.0:
            raise SemimedError(f"mean_teacher: ema_decay={ema_decay} must be in [0, 1)")
        if lambda_u < 0 or rampup_steps < 0:
            raise SemimedError(
                f"mean_teacher: lambda_u={lambda_u} and rampup_steps={rampup_steps} must be >= 0"
            )
        if student_view not in STUDENT_VIEWS:
            raise SemimedError(
                f"mean_teacher: student_view={student_view!r}; valid: {', '.join(STUDENT_VIEWS)}"
            )
        self.ema_decay, self.lambda_u, self.rampup_steps = (
            float(ema_decay),
            float(lambda_u),
            int(rampup_steps),
        )
        self.student_view, self.evaluate_teacher = student_view, bool(evaluate_teacher)
        # From the unwrapped network: a deep copy of a DDP wrapper would carry its process group.
        self.teacher = copy.deepcopy(unwrap(model))
        self.teacher.requires_grad_(False)

    @property
    def needs(self) -> Needs:  # type: ignore[override]  (per instance: the student's view is a parameter)
        return Needs(unlabeled=("weak", "strong") if self.student_view == "strong" else ("weak",))

    def train_step(self, batch: Batch, step: int) -> StepOutput:
        n = len(batch.x)
        u_student = batch.u_strong if self.student_view == "strong" else batch.u_weak
        logits = self.model(torch.cat([batch.x, u_student]))
        logits_x, logits_u = logits[:n], logits[n:]
        with torch.no_grad():  # train mode (batch statistics), like the student; no gradient ever reaches it
            teacher_probs = probabilities(self.teacher(batch.u_weak), self.multilabel)
        sup = supervised_loss(logits_x, batch.y, self.multilabel)
        unsup = ((probabilities(logits_u, self.multilabel) - teacher_probs) ** 2).mean()
        weight = self.lambda_u * sigmoid_rampup(step, self.rampup_steps)
        teacher_targets = (teacher_probs >= 0.5).float() if self.multilabel else teacher_probs.argmax(dim=1)
        everything = torch.ones_like(teacher_probs if self.multilabel else teacher_probs[:, 0])
        logs = {
            "sup_loss": sup.detach(),
            "unsup_loss": unsup.detach(),
            "unsup_weight": weight,
            "ema_decay": ema_decay(step + 1, self.ema_decay),
            **pseudo_label_logs(teacher_targets, everything, batch.u_true, self.multilabel),
        }
        return StepOutput(sup + weight * unsup, logs)

    def after_optimizer_step(self, step: int) -> None:
        # `step` is 0-based, so step + 1 updates have been made.
        ema_update_(self.teacher, unwrap(self.model), ema_decay(step + 1, self.ema_decay))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(x) if self.evaluate_teacher else self.model(x)

    def backbone(self) -> nn.Module:
        return self.teacher if self.evaluate_teacher else unwrap(self.model)

    def evaluated_model(self) -> str:
        return "teacher" if self.evaluate_teacher else "student"

    @classmethod
    def evaluates_trained_weights(cls, params: dict[str, Any]) -> bool:
        # The teacher is updated from the student by the method, not by an optimizer: train.ema would average
        # the student, which is not evaluated, and the report would still say "EMA".
        return not params.get("evaluate_teacher", True)

    def networks(self):
        yield self.model
        yield self.teacher
