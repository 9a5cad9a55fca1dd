"""The method contract: a method owns its model(s), declares the data it consumes, and computes losses; the
engine owns everything else (streams, backward, optimizers, AMP, clipping, checkpoints, evaluation).

A new method is one file: subclass `Method`, declare `needs`, write `train_step`, register it with
`@METHODS.register("name")` and import the module in `semimed/methods/__init__.py` (docs/extending.md).
"""

from __future__ import annotations

import collections.abc
import difflib
import inspect
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from semimed.errors import SemimedError
from semimed.models.parts import unwrap_model as unwrap
from semimed.registry import Registry

if TYPE_CHECKING:
    from semimed.engine.optim import Optimization

# Augmentations a stream view can ask for (semimed/data/augment.py): "weak" = flips + translation, "strong" =
# weak + RandAugment + Cutout, "none" = the image as cached.
VIEW_KINDS = ("weak", "strong", "none")


@dataclass(frozen=True)
class Needs:
    """What a method reads each step; the data side builds exactly these streams and views, nothing more.

    labeled: a labeled stream (batch keys `x`, `y`, `x_rows`, `x_index`), augmented as `train.augment` says (the
        matched control's weak augmentation by default). False for methods that never see a label
        (self-supervised pretraining): their unlabeled stream is then every training image.
    unlabeled: the views of each unlabeled image, in order, e.g. ("weak", "strong") for FixMatch, ("weak",) for
        Pseudo-Label, ("strong", "strong") for SimCLR; () = no unlabeled stream. A view's batch key is `u_<kind>`,
        and `u_<kind>_2`, `u_<kind>_3`, … for repeats of one kind. Unlabeled batches also carry `u_rows`
        (dataset rows), `u_index` (positions 0..N_u-1 in the unlabeled pool, for per-sample state) and `u_true`
        (hidden labels, for logging pseudo-label accuracy only — never for training).
    """

    labeled: bool = True
    unlabeled: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        bad = [kind for kind in self.unlabeled if kind not in VIEW_KINDS]
        if bad:
            raise SemimedError(f"unknown view kind(s) {bad}; valid: {', '.join(VIEW_KINDS)}")
        if not self.labeled and not self.unlabeled:
            raise SemimedError("a method must read a labeled or an unlabeled stream")

    def view_keys(self) -> list[tuple[str, str]]:
        """(batch key, view kind) per unlabeled view, in order: [("u_weak", "weak"), ("u_strong", "strong")]."""
        seen: dict[str, int] = {}
        keys = []
        for kind in self.unlabeled:
            seen[kind] = seen.get(kind, 0) + 1
            keys.append((f"u_{kind}" if seen[kind] == 1 else f"u_{kind}_{seen[kind]}", kind))
        return keys


class Batch(dict):
    """One step's data on the device, as a mapping with attribute access (`batch.x`, `batch["u_weak"]`).

    Keys (present as the method's `needs` declare): x [B, C, H, W] float (normalized), y int64 [B] or float
    [B, K] (NaN = unknown), x_rows / x_index int64 [B]; u_<view> [μB, C, H, W], u_true, u_rows, u_index [μB].
    """

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(
                f"batch has no {key!r} (has: {', '.join(self)}); declare it in the method's `needs`"
            ) from None


@dataclass(frozen=True)
class DataInfo:
    """What a method may size its state by, given before training starts (`Method.setup`)."""

    num_labeled: int
    num_unlabeled: int
    classes: list[str]
    multilabel: bool
    # Labeled images per class [K] (multi-label: known positives per finding); e.g. a prior for distribution
    # alignment or class-balanced thresholds.
    labeled_class_counts: np.ndarray = field(default_factory=lambda: np.zeros(0))
    steps: int = 0  # the run's step budget (schedules inside a method, e.g. BYOL's momentum)


@dataclass
class StepOutput:
    loss: torch.Tensor  # the scalar the engine backpropagates
    # Per-step scalars (sup_loss, unsup_loss, mask_rate…) as detached tensors: the engine reads them only every
    # few steps, so logging never forces a GPU sync per step.
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)


class Method(nn.Module):
    """Base class. Subclasses take typed keyword hyperparameters and implement `train_step`.

    Being an nn.Module, a method's state_dict holds every network and buffer it owns (student, teacher,
    generator, per-sample thresholds), which is what the engine checkpoints; optimizer state is the engine's.
    """

    needs: Needs = Needs()
    supports_multilabel: bool = True
    # False for self-supervised pretraining: nothing to evaluate on val/test (the engine never shows those images
    # to it); what it produces is its backbone.
    classifies: bool = True
    # Value rules of hyperparameters, checked at config load (`check_params`) beside the types of __init__'s
    # annotations: an interval ("[0, 1]", "(0, inf)"; each number of a list) or a tuple of the valid values.
    # A subclass's rules add to its parents' (FlexMatch adds `mapping` to FixMatch's).
    param_rules: ClassVar[dict[str, str | tuple[Any, ...]]] = {}
    # True for a method meant to start from pretrained weights (finetune): config check warns when none are
    # given (model.pretrained, model.pretrained_checkpoint or pretrain.method), since it then trains from
    # scratch, which is allowed but rarely meant.
    expects_pretrained: ClassVar[bool] = False

    def __init__(self, model: nn.Module, num_classes: int, multilabel: bool) -> None:
        super().__init__()
        if multilabel and not self.supports_multilabel:
            raise SemimedError(f"method {type(self).__name__} does not support multi-label targets")
        self.model = model
        self.num_classes = num_classes
        self.multilabel = multilabel
        self.class_names = [str(k) for k in range(num_classes)]  # until setup() gives the dataset's

    # --------------------------------------------------------------------------------------- what it computes
    def setup(self, info: DataInfo) -> None:
        """Called once before training (and before a checkpoint is loaded): size per-sample state here.
        Overrides call `super().setup(info)`, which keeps the class names (for per-class logs)."""
        self.class_names = list(info.classes)

    def train_step(self, batch: Batch, step: int) -> StepOutput:
        raise NotImplementedError

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, K] of the network that is evaluated (by default the trained network)."""
        return self.model(x)

    def backbone(self) -> nn.Module:
        """The classifier network `predict` evaluates, unwrapped, in its timm layout: what a run exports,
        what `explain` opens and what another run transfers from. Override when `self.model` is not it
        (GAN-SSL's discriminator wraps it; Mean Teacher evaluates its teacher)."""
        return unwrap(self.model)

    def evaluated_model(self) -> str:
        """A word for the report: which network the test metrics come from."""
        return "model"

    @classmethod
    def check_params(cls, params: dict[str, Any], where: str = "method.params") -> dict[str, Any]:
        """`params` checked against __init__'s annotations and `param_rules` before any model or data exists,
        as one-line errors naming `where`.<key> and the value; returns them with text converted to the
        annotated type ("1e-3" -> 0.001, which YAML 1.1 reads as text). Overrides add checks that need
        several parameters (and call this)."""
        try:
            hints = typing.get_type_hints(cls.__init__)
        except (NameError, TypeError):  # an annotation importable only for type checkers: ranges only
            hints = {}
        rules: dict[str, str | tuple[Any, ...]] = {}
        for klass in reversed(cls.__mro__):
            rules.update(vars(klass).get("param_rules", {}))
        checked = {}
        for key, value in params.items():
            rule = rules.get(key)
            valid = f"; valid: {', '.join(map(str, rule))}" if isinstance(rule, tuple) else ""
            value = _conform(value, hints.get(key, Any), f"{where}.{key}", valid)
            if isinstance(rule, tuple) and value not in rule:
                raise SemimedError(f"unknown {where}.{key} {value!r}{valid}")
            if isinstance(rule, str):
                from semimed.config import check_range

                check_range(value, rule, f"{where}.{key}")
            checked[key] = value
        return checked

    @classmethod
    def check_with_config(cls, params: dict[str, Any], cfg: Any) -> None:
        """Checks of the (checked) params against the rest of the run config `cfg` (a semimed.config.Config),
        at config load: e.g. a size that must equal data.image_size. Default: none."""

    @classmethod
    def evaluates_trained_weights(cls, params: dict[str, Any]) -> bool:
        """Whether `predict` runs the weights the engine's optimizers train (what `train.ema` averages).
        Checked at config load with the method's params: False makes `train.ema` an error, not a no-op."""
        return True

    # ------------------------------------------------------------------------------------- how it is updated
    def parameter_groups(self) -> list[dict[str, Any]]:
        """The engine optimizer's parameter groups; `lr_scale` multiplies the base LR (fine-tuning uses it)."""
        return [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr_scale": 1.0}]

    def extra_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Optimizers of networks outside the engine's optimizer (GAN-SSL's generator), built after the method
        is on its device. The engine checkpoints and restores them; the method steps them in
        `update_parameters`."""
        return {}

    def update_parameters(self, loss: torch.Tensor, optimization: Optimization, step: int) -> None:
        """The parameter update of one step: by default backward, clip, optimizer and schedule step
        (`Optimization.update`). Override to add steps of `extra_optimizers` (USB's ParamUpdateHook)."""
        optimization.update(loss)

    def after_optimizer_step(self, step: int) -> None:
        """After the parameter update: EMA teachers and other state that follows the weights."""

    # ------------------------------------------------------------------------------------------ bookkeeping
    def tensorboard_images(self) -> dict[str, torch.Tensor]:
        """Image grids [N, C, H, W] in [0, 1] to log at each evaluation (e.g. GAN samples)."""
        return {}

    def wrap_models(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Replace trained networks by `wrap(network)` (DDP). The unwrapped module stays at `.module`."""
        self.model = wrap(self.model)

    def networks(self) -> Iterator[nn.Module]:
        yield self.model


METHODS: Registry[Method] = Registry("method")
_CONSTRUCTOR_ARGS = ("self", "model", "num_classes", "multilabel")


def method_parameters(name: str) -> list[str]:
    """The hyperparameters method `name` takes (its __init__ keywords beyond the model and the task)."""
    factory = METHODS.get(name)
    return [p for p in inspect.signature(factory.__init__).parameters if p not in _CONSTRUCTOR_ARGS]


def check_method(name: str, params: Any, where: str = "method.params") -> dict[str, Any]:
    """Raise if `name` is no method, `params` holds a keyword its __init__ does not take, or a value of the
    wrong type or out of range (`Method.check_params`; cheap: no model, no data). Returns the params with
    text converted to the annotated types. `where` names the params in messages (pretrain.params)."""
    if not isinstance(params, dict):
        raise SemimedError(f"{where}: expected a mapping, got {type(params).__name__}")
    accepted = method_parameters(name)
    unknown = sorted(set(params) - set(accepted), key=str)
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), accepted, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SemimedError(
            f"unknown parameter(s) {', '.join(map(str, unknown))} for method {name!r}; valid: "
            f"{', '.join(accepted) or 'none'}{hint}"
        )
    return METHODS.get(name).check_params(params, where)


def create_method(name: str, model: nn.Module, num_classes: int, multilabel: bool, **params: Any) -> Method:
    """Build a method by name; unknown names or hyperparameters raise with the valid ones listed."""
    params = check_method(name, params)
    return METHODS.get(name)(model=model, num_classes=num_classes, multilabel=multilabel, **params)


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _conform(value: Any, hint: Any, key: str, valid: str = "") -> Any:
    """`value` if it fits the annotation `hint` (a union: any of its members), text converted to a number
    or bool where the hint asks for one; else a SemimedError naming `key`, the value and the type."""
    if hint is Any:
        return value
    options = (
        typing.get_args(hint)
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        else (hint,)
    )
    for option in options:
        try:
            return _conform_one(value, option)
        except (TypeError, ValueError, OverflowError):
            continue
    kinds = " or ".join(_type_name(option) for option in options)
    raise SemimedError(f"{key}: {value!r} is not a valid {kinds}{valid}")


def _conform_one(value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if hint is type(None):
        if value is not None:
            raise TypeError
        return None
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise TypeError
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError
        number = float(value) if isinstance(value, (float, str)) else value
        if isinstance(number, float) and not number.is_integer():
            raise ValueError
        return int(number) if not isinstance(value, int) else value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError
        return float(value) if isinstance(value, str) else value  # an int is a valid float (kept as given)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError
        return value
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            raise TypeError
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [value_ if item is Any else _conform_one(value_, item) for value_ in value]
    return value  # an annotation without a rule here (a module, a callable): __init__ checks it


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) in (list, tuple, collections.abc.Sequence):
        args = typing.get_args(hint)
        return f"list of {_type_name(args[0]) if args else 'values'}"
    return getattr(hint, "__name__", str(hint))
