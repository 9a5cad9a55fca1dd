"""Local weights for a backbone: `load_backbone_checkpoint` reads them, `save_backbone` writes them.

Read: a semimed run directory (its `backbone.safetensors`, else its latest checkpoint), a semimed checkpoint, a
`.safetensors` file or a torch state dict, always with `weights_only=True`; the head is dropped when the number
of classes differs, a first conv saved for another channel count and a ViT's position embeddings are adapted
(`CheckpointReport` says what was done). Written: `backbone.safetensors` at the end of every run, with the
backbone's name and input normalization in its metadata (`read_backbone_metadata`, `checkpoint_normalization`).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed
from timm.models import adapt_input_conv
from torch import nn

from semimed.errors import SemimedError
from semimed.files import publish, staging_path
from semimed.models.parts import classifier_name, first_conv_key, is_head_key, unwrap_model

# What `run_training` writes at the end of every run: the trained network's weights (canonical names, no
# "model." prefix) with metadata, so another run can start from it with `model.pretrained_checkpoint=RUN_DIR`.
BACKBONE_FILE = "backbone.safetensors"


@dataclass
class CheckpointReport:
    """What `load_backbone_checkpoint` did: `loaded` tensors, `dropped` head tensors (a different number of
    classes), `adapted` tensors (first conv for another channel count, ViT position embeddings)."""

    source: str
    loaded: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def summary(self) -> str:
        parts = [f"{self.source}: loaded {len(self.loaded)} tensors"]
        if self.dropped:
            parts.append(f"dropped the head ({', '.join(self.dropped)}: another number of classes)")
        if self.adapted:
            parts.append(f"adapted {', '.join(self.adapted)}")
        return "; ".join(parts)


def load_backbone_checkpoint(model: nn.Module, path: str | Path, name: str | None = None) -> CheckpointReport:
    """Load local weights into `model`; returns what was loaded, dropped and adapted.

    `path` may be a semimed run directory (its `backbone.safetensors`, else its latest checkpoint), a semimed
    checkpoint (`state.pt` or its `step_*` folder: the `model.` entries of state["method"]), a `.safetensors`
    file, or a torch state dict (optionally under "state_dict" or "model"). Torch files are read with
    `weights_only=True`: one that needs arbitrary unpickling is refused, never executed.

    Rules: every trunk tensor of `model` must be in the file with its shape, and the file must hold nothing the
    model lacks (else it was saved from another architecture: an error naming the first mismatches). The head
    is loaded when its shape fits and dropped (reported) when the number of classes differs. A first conv saved
    for another channel count is adapted as timm does (`adapt_input_conv`: RGB summed into gray, gray spread
    over RGB at a third), and a ViT's position embeddings are resampled to this model's grid. When the file
    says which normalization its network was trained with (semimed exports do), `model.pretrained_cfg`'s
    mean/std are set to it, so the fine-tuning run feeds the trunk the inputs it learned on.
    """
    file, kind = _resolve_checkpoint(Path(path))
    state, metadata = _read_state(file, kind)
    label = str(file)
    saved_name = metadata.get("backbone")
    if name and saved_name and saved_name != name:
        raise SemimedError(f"{file}: weights of backbone {saved_name!r}, but model.backbone is {name!r}")
    what = f"backbone {name!r}" if name else type(model).__name__

    own = model.state_dict()
    head = classifier_name(model)
    first_conv = first_conv_key(model)
    report = CheckpointReport(source=label)
    usable: dict[str, torch.Tensor] = {}
    mismatched, unexpected = [], []
    for key, value in state.items():
        if key not in own:
            if not is_head_key(key, head):
                unexpected.append(key)
            continue
        target = own[key]
        if value.shape == target.shape:
            usable[key] = value
        elif is_head_key(key, head):
            report.dropped.append(key)
        elif key == first_conv and _is_channel_change(value, target):
            usable[key] = _adapt_stem(value, target.shape[1])
            report.adapted.append(f"{key} ({value.shape[1]}->{target.shape[1]} input channels)")
        elif key.endswith("pos_embed") and hasattr(model, "patch_embed") and value.ndim == 3:
            prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
            usable[key] = resample_abs_pos_embed(
                value, list(model.patch_embed.grid_size), num_prefix_tokens=prefix
            )
            report.adapted.append(f"{key} ({value.shape[1]}->{target.shape[1]} tokens)")
        else:
            mismatched.append(f"{key} {list(value.shape)} vs {list(target.shape)}")
    # BatchNorm's num_batches_tracked only matters with momentum=None; torchvision-era files may lack it.
    missing = [
        k
        for k in own
        if k not in state and not is_head_key(k, head) and not k.endswith("num_batches_tracked")
    ]
    if not any(key in own for key in state):
        raise SemimedError(
            f"{file}: no tensor name matches {what} (first in file: {next(iter(state), 'none')})"
        )
    if mismatched or missing or unexpected:
        problems = [
            f"{len(items)} {kind_} (first: {items[0]})"
            for kind_, items in (
                ("shape mismatch(es)", mismatched),
                ("missing", missing),
                ("unexpected", unexpected),
            )
            if items
        ]
        raise SemimedError(f"{file}: does not fit {what} (another architecture?): {'; '.join(problems)}")
    model.load_state_dict(usable, strict=False)
    report.loaded = sorted(usable)
    if "mean" in metadata and "std" in metadata:
        mean, std = tuple(json.loads(metadata["mean"])), tuple(json.loads(metadata["std"]))
        report.normalization = (mean, std)
        model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), "mean": mean, "std": std}
    return report


def _adapt_stem(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A first-conv weight [O, I, k, k] for `in_chans` inputs. From RGB: timm's `adapt_input_conv` (sum into
    gray; repeat and rescale for other counts). From gray: spread over the channels at 1/in_chans each, the
    inverse of the sum, so an image whose channels are all equal gives the response the gray network gave."""
    if weight.shape[1] == 1:
        return weight.repeat(1, in_chans, 1, 1) / in_chans
    return adapt_input_conv(in_chans, weight)


def _is_channel_change(saved: torch.Tensor, target: torch.Tensor) -> bool:
    """A 4D conv weight that differs only in its input channels, saved for gray or RGB input."""
    return (
        saved.ndim == 4
        and saved.shape[0] == target.shape[0]
        and saved.shape[2:] == target.shape[2:]
        and saved.shape[1] in (1, 3)
    )


def _resolve_checkpoint(path: Path) -> tuple[Path, str]:
    """(file, kind) for a run directory, a checkpoint folder or a file; kind is 'safetensors' or 'torch'."""
    if path.is_dir():
        from semimed.classical.fit import refuse_closed_form_run  # here: the classical package imports models

        refuse_closed_form_run(path, "model.pretrained_checkpoint")
        candidates = [path / BACKBONE_FILE, path / "state.pt"]
        steps = sorted((path / "checkpoints").glob("step_*/state.pt"))
        candidates += steps[-1:]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise SemimedError(
                f"{path}: folder has no {BACKBONE_FILE}, checkpoints/step_*/state.pt or state.pt "
                f"(model.pretrained_checkpoint wants a semimed run directory or a weights file)"
            )
        path = found
    elif not path.is_file():
        raise SemimedError(f"{path}: pretrained checkpoint not found (model.pretrained_checkpoint)")
    return path, ("safetensors" if path.suffix == ".safetensors" else "torch")


class UnsafePickleError(SemimedError):
    """A torch file that pickles Python objects (classes, functions): only full unpickling, which can run any
    code the file holds, would load it. semimed never does."""


# What every file torch.save writes starts with: a zip archive (the default since torch 1.6) or a pickle of
# protocol 2+ (the legacy format). Anything else is not a torch file, whatever the unpickler makes of it.
TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def load_torch_file(path: Path) -> object:
    """`torch.load(path, weights_only=True)` on the CPU, every failure one SemimedError in semimed's words
    (UnsafePickleError for a pickle of Python objects). torch's own text is not passed on: it advises retrying
    with weights_only=False, which would execute whatever the file holds."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as exc:
        raise SemimedError(f"unreadable ({exc.strerror or type(exc).__name__})") from None
    if not head.startswith(TORCH_MAGIC):
        raise SemimedError("not a file torch.save writes: neither a zip archive nor a pickle")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch words every weights-only failure alike; a Python class (GLOBAL) in the pickle is the case that
        # full unpickling would load, anything else (a bad opcode) is simply not a checkpoint.
        if "Unsupported global" in str(exc):
            raise UnsafePickleError("it holds pickled Python objects, not only tensors") from None
        raise SemimedError("damaged: not a pickle torch.load can parse") from None
    except Exception as exc:  # noqa: BLE001 - a truncated zip, a bad record: torch raises many types
        reason = next((line for line in str(exc).splitlines() if line.strip()), "")
        raise SemimedError(f"damaged ({type(exc).__name__}: {reason[:200]})") from None


def _read_state(path: Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors by canonical name (no 'module.'/'model.' wrappers) and string metadata."""
    metadata: dict[str, str] = {}
    if kind == "safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                state = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as exc:  # safetensors raises SafetensorError / OSError for a bad header
            raise SemimedError(f"{path}: not a readable .safetensors file ({exc})") from None
    else:
        try:
            loaded = load_torch_file(path)
        except UnsafePickleError:
            raise SemimedError(
                f"{path}: refused: it holds pickled Python objects that load only with weights_only=False "
                f"(which can run arbitrary code); re-save the weights with torch.save(model.state_dict(), path) "
                f"or as .safetensors"
            ) from None
        except SemimedError as exc:
            raise SemimedError(f"{path}: not a torch checkpoint ({exc})") from None
        state, metadata = _unwrap(loaded, path)
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None or not state:
        raise SemimedError(
            f"{path}: expected a state dict of tensors" + (f"; {bad!r} is not one" if bad else "")
        )
    return {k.removeprefix("module."): v for k, v in state.items()}, metadata


def _unwrap(loaded: object, path: Path) -> tuple[dict, dict[str, str]]:
    if not isinstance(loaded, dict):
        raise SemimedError(f"{path}: expected a state dict, got {type(loaded).__name__}")
    if isinstance(loaded.get("method"), dict):
        # A semimed checkpoint: the method's networks by attribute; the trained classifier is `model.`.
        state = {k.removeprefix("model."): v for k, v in loaded["method"].items() if k.startswith("model.")}
        if not state:
            raise SemimedError(f"{path}: semimed checkpoint without 'model.' tensors in state['method']")
        return state, _run_metadata(path)
    for key in ("state_dict", "model"):  # timm train scripts and many others nest the weights
        if isinstance(loaded.get(key), dict):
            return loaded[key], {}
    return loaded, {}


def _run_metadata(state_file: Path) -> dict[str, str]:
    """Normalization of the run that wrote `<run>/checkpoints/step_*/state.pt`, from its config.yaml.

    Only the unambiguous case is answered: a run that neither used timm's pretrained weights nor a checkpoint
    fed its network the 0.5/0.5 default. Otherwise the architecture's pretrained_cfg stays in force.
    """
    run_dir = state_file.parent.parent.parent
    config = run_dir / "config.yaml"
    if not config.is_file():
        return {}
    import yaml

    try:
        values = yaml.safe_load(config.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    model_cfg = values.get("model") or {}
    if model_cfg.get("pretrained") or model_cfg.get("pretrained_checkpoint"):
        return {"backbone": str(model_cfg.get("backbone", ""))}
    return {"backbone": str(model_cfg.get("backbone", "")), "mean": "[0.5]", "std": "[0.5]"}


def save_backbone(model: nn.Module, path: str | Path, metadata: dict[str, object]) -> Path:
    """Write `model`'s weights as safetensors with `metadata` (values JSON-encoded), atomically.

    semimed's loader reads "backbone" (to refuse another architecture early) and "mean"/"std" (the input
    normalization the network was trained with) back from the metadata.
    """
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in unwrap_model(model).state_dict().items()}
    text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    text["format"] = "semimed-backbone-1"
    tmp = staging_path(path)
    save_file(state, str(tmp), metadata=text)
    return publish(tmp, path)


def read_backbone_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a semimed `backbone.safetensors` ({} when the file has none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as exc:
        raise SemimedError(f"{path}: not a readable .safetensors file ({exc})") from None


def checkpoint_normalization(
    path: str | Path, model: nn.Module
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """(mean, std) a checkpoint's network was trained with: from its metadata (semimed exports and run
    checkpoints), else `model`'s pretrained_cfg (a timm/ImageNet file: the architecture's own statistics).
    Reads only headers and config files, not the weights."""
    meta: dict[str, str] = {}
    try:
        file, kind = _resolve_checkpoint(Path(path))
    except SemimedError:
        file, kind = None, ""
    if kind == "safetensors":
        meta = read_backbone_metadata(file)
    elif file is not None and file.name == "state.pt":
        meta = _run_metadata(file)
    if "mean" in meta and "std" in meta:
        return tuple(json.loads(meta["mean"])), tuple(json.loads(meta["std"]))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("mean"), cfg.get("std")
