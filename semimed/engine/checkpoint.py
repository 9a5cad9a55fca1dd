"""Checkpoints: `<run_dir>/checkpoints/step_XXXXXXX/state.pt`, written atomically, loaded with weights_only=True.

A checkpoint holds the method's state (canonical names: no DDP `module.`, no torch.compile `_orig_mod.`), the
optimizers', the best-so-far selection, torch's RNG state, and the run's fingerprint: a checkpoint resumes only
the run that wrote it (semimed/runs.py), never a run with another configuration or split.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from semimed.errors import SemimedError
from semimed.files import current_umask

# Two while a run trains (a crash while writing one leaves the other); one when it has finished.
CHECKPOINTS_KEPT = 2


def canonical_key(key: str) -> str:
    # DDP nests the network under `.module`, torch.compile's wrapper (OptimizedModule) under `._orig_mod`;
    # checkpoints store the unwrapped names so they load anywhere. (`train.compile` compiles in place and adds
    # no prefix; a network compiled by its caller does.)
    return re.sub(r"(?<![^.])(module|_orig_mod)\.", "", key)


def method_state(method: torch.nn.Module) -> dict[str, Any]:
    """The method's state dict with canonical keys, as detached CPU copies."""
    return {canonical_key(k): _cpu_copy(v) for k, v in method.state_dict().items()}


def load_canonical_state(method: torch.nn.Module, state: dict[str, Any]) -> None:
    """Load a checkpoint's canonical (unwrapped) state into `method`, DDP-wrapped or not."""
    method.load_state_dict({key: state[canonical_key(key)] for key in method.state_dict()})


def _cpu_copy(value: Any) -> Any:
    """Tensors -> detached CPU copies, recursively through dicts and lists; other values as they are."""
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
    from semimed.models.checkpoints import UnsafePickleError, load_torch_file

    path = Path(folder) / "state.pt"
    if not path.is_file():
        raise SemimedError(f"{path}: checkpoint not found")
    try:
        state = load_torch_file(path)
    except UnsafePickleError as exc:
        raise SemimedError(f"{path}: not a loadable semimed checkpoint ({exc}; never unpickled)") from None
    except SemimedError as exc:  # semimed's words: torch's advise to retry with weights_only=False is dropped
        raise SemimedError(f"{path}: not a semimed checkpoint ({exc})") from None
    if not isinstance(state, dict) or not isinstance(state.get("method"), dict):
        raise SemimedError(f"{path}: not a semimed checkpoint (no 'method' state: another program's file?)")
    return state


def save_checkpoint(state: dict[str, Any], folder: Path, step: int) -> Path:
    """Write `folder/step_XXXXXXX/state.pt` atomically (temp dir, then rename) and prune old checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"step_{step:07d}"
    staging = Path(tempfile.mkdtemp(prefix=".staging_", dir=folder))
    torch.save(state, staging / "state.pt")
    # mkdtemp makes a 0700 folder: give it the mode any other folder of the run gets from the umask.
    staging.chmod(0o777 & ~current_umask())
    if target.exists():
        shutil.rmtree(target)
    staging.replace(target)
    prune_checkpoints(folder, CHECKPOINTS_KEPT)
    return target


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the `keep` newest `step_*` checkpoints in `folder`."""
    for old in sorted(folder.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def resume_state(
    resume_from: str | Path | None, run_dir: Path | None, world: int, fingerprint: str | None
) -> dict[str, Any] | None:
    """The checkpoint to resume from: the newer of the one handed in (Ray's) and the run folder's own.

    Ray persists a reported checkpoint asynchronously; a run killed right after its last report can come back
    with an older checkpoint from Ray than the one already in its folder, and should not train those steps
    twice. With several ranks the local folder is used only if every rank sees the same newest step there
    (on several nodes each has its own disk; then Ray's checkpoint is the common ground).

    With a `fingerprint`, a checkpoint written by another run (another config or split: e.g. Ray Train restoring
    an old run of the same name) is an error, never resumed.
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
        state, source = load_checkpoint(local), local
    else:
        state, source = given, resume_from
    if state is not None and fingerprint is not None and state.get("fingerprint") != fingerprint:
        raise SemimedError(
            f"{source}: this checkpoint was written by another run (fingerprint "
            f"{(state.get('fingerprint') or 'none')[:12]} vs {fingerprint[:12]}: another config, split or "
            "code version); refusing to resume from it. Start the run under another name, or delete that folder."
        )
    return state
