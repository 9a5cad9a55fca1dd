"""One training run from a Config, in plain Python: dataset -> split -> pixels -> method -> fit -> files.

This is what the Ray Train worker calls, what `semimed train --local` calls, and what tests and benchmarks
call. A run folder belongs to one run (semimed/runs.py): before anything is written, the folder is checked to
be free or to hold this very run (same config, split and code: then the run resumes). It then holds:

    run.json               the run's identity and fingerprint
    config.yaml            the resolved config
    split.json             the split (patients, labeled subset)
    env.json               package versions, git commit, platform
    checkpoints/step_*/    the two newest checkpoints (weights_only=True loadable)
    tb/                    TensorBoard curves
    metrics.json           final metrics: test/* at the reported checkpoint, test_last/*, which checkpoint
    predictions.parquet    per-image val/test scores at the reported checkpoint (row, path, patient, labels)
    backbone.safetensors   the evaluated network at the reported checkpoint (for transfer and `explain`)
"""

from __future__ import annotations

import contextlib
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semimed.classical.fit import fit_closed_form, is_closed_form
from semimed.config import Config
from semimed.data import load_dataset
from semimed.data.augment import Normalizer
from semimed.data.cache import load_pixels
from semimed.data.splits import Split, make_split
from semimed.data.views import RunData
from semimed.engine import ReportFn, fit, resolve_device
from semimed.errors import SemimedError
from semimed.files import atomic_write_text
from semimed.methods import Method, create_method
from semimed.models.backbones import create_backbone
from semimed.models.checkpoints import BACKBONE_FILE, save_backbone
from semimed.pretrain import pretrained_backbone
from semimed.runs import RunIdentity, RunLock, check_run_dir, git_commit, run_identity, write_identity


def check_config(cfg: Config) -> None:
    """What can be checked without data: names of the dataset, method (and its parameters) and backbone.
    Sweeps call it for every trial at load time, so a typo fails before anything runs."""
    import timm

    from semimed.data import DATASETS
    from semimed.methods import METHODS, check_method
    from semimed.models.backbones import LOCAL_BACKBONES, backbone_names

    if cfg.data.dataset not in DATASETS:
        raise SemimedError(f"unknown data.dataset {cfg.data.dataset!r}; valid: {', '.join(DATASETS.names())}")
    check_method(cfg.method.name, cfg.method.params)
    if cfg.train.ema and not METHODS.get(cfg.method.name).evaluates_trained_weights(cfg.method.params):
        raise SemimedError(
            f"train.ema={cfg.train.ema:g} averages the trained weights, but {cfg.method.name} evaluates another "
            "network (its own EMA teacher): set train.ema=0, or method.params.evaluate_teacher=false to evaluate "
            "an EMA of the student"
        )
    _check_pretrain(cfg)
    if cfg.model.backbone not in LOCAL_BACKBONES and not timm.is_model(cfg.model.backbone):
        raise SemimedError(
            f"unknown model.backbone {cfg.model.backbone!r}; valid: {', '.join(backbone_names())} "
            "(or any timm.list_models() name)"
        )


def _check_pretrain(cfg: Config) -> None:
    from semimed.methods import METHODS, check_method

    name = cfg.pretrain.method
    if not name:
        return
    if name not in METHODS or METHODS.get(name).classifies:
        valid = [m for m in METHODS.names() if not METHODS.get(m).classifies]
        raise SemimedError(
            f"unknown pretrain.method {name!r}; valid (methods that read no labels): {', '.join(valid)}"
        )
    check_method(name, cfg.pretrain.params)
    if not METHODS.get(cfg.method.name).classifies or getattr(
        METHODS.get(cfg.method.name), "closed_form", False
    ):
        raise SemimedError(
            f"pretrain.method is for a run that fine-tunes a classifier, not for {cfg.method.name!r}"
        )
    if cfg.model.pretrained or cfg.model.pretrained_checkpoint:
        raise SemimedError(
            "pretrain.method and model.pretrained / model.pretrained_checkpoint both give the start weights; pick one"
        )
    if cfg.scaling.num_workers > 1:
        # Every DDP rank would build the run and wait for the pretraining lock that another rank holds while
        # it waits in a collective for them: a deadlock. One process pretrains; fine-tuning can then be DDP.
        raise SemimedError(
            f"pretrain.method with scaling.num_workers={cfg.scaling.num_workers} (DDP) is not supported: train the "
            f"pretraining as its own run (method.name={name}) and start from it with "
            "model.pretrained_checkpoint=RUN_DIR, or use scaling.num_workers <= 1"
        )
    if cfg.pretrain.steps < 1 or cfg.pretrain.batch_size < 1:
        raise SemimedError(
            f"pretrain.steps={cfg.pretrain.steps} and pretrain.batch_size={cfg.pretrain.batch_size} must be >= 1"
        )


def load_split(cfg: Config, dataset) -> Split:
    if cfg.data.split_file:
        split = Split.load(cfg.data.split_file)
        if split.dataset != dataset.name or split.task != dataset.task:
            raise SemimedError(
                f"{cfg.data.split_file}: split is for {split.dataset}/{split.task}, "
                f"not {dataset.name}/{dataset.task}"
            )
        return split
    return make_split(
        dataset,
        cfg.data.fraction,
        cfg.split_seed,
        cfg.data.test_fraction,
        cfg.data.val_fraction,
        cfg.data.val_policy,
    )


def build_run(cfg: Config, show_progress: bool = True) -> tuple[Method, RunData, Split]:
    """The method, the data it reads, and the split, for `cfg` (draws the network's initial weights from torch's
    generator: `run_training` seeds it)."""
    check_config(cfg)  # names first: a typo should not wait for the data to load
    dataset = load_dataset(cfg.data)
    split = load_split(cfg, dataset)
    index = split.indices(dataset)
    decoded = load_pixels(dataset, cfg.data.image_size, cfg.data.cache_dir or None)
    used = np.concatenate([index[k] for k in ("train", "val", "test")])
    bad = sorted(set(decoded.bad_rows) & set(used.tolist()))
    if bad:
        raise SemimedError(decoded.bad_rows_message(bad))
    # A closed-form method (semimed/classical: hand-crafted features + scikit-learn) has no network.
    closed_form = is_closed_form(cfg.method.name)
    start_from = cfg.model.pretrained_checkpoint
    if cfg.pretrain.method and not closed_form:  # self-supervised pretraining on this split, cached per seed
        start_from = str(pretrained_backbone(cfg, dataset, show_progress=show_progress))
    model = (
        None
        if closed_form
        else create_backbone(
            cfg.model.backbone,
            dataset.num_classes,
            dataset.channels,
            cfg.model.pretrained,
            start_from,
            cfg.model.drop_rate,
            cfg.data.image_size,
        )
    )
    mean, std = _normalization_stats(model, cfg)
    method = create_method(
        cfg.method.name, model, dataset.num_classes, dataset.multilabel, **cfg.method.params
    )
    data = RunData(
        pixels=decoded.pixels,
        targets=np.asarray(dataset.labels),
        rows=index,
        classes=dataset.classes,
        multilabel=dataset.multilabel,
        patient_ids=dataset.patients.astype(str),
        labeled_augment=cfg.train.augment,
        normalize=Normalizer(dataset.channels, mean, std),
        paths=dataset.meta["path"].to_numpy().astype(str),
    )
    return method, data, split


def _normalization_stats(model, cfg: Config):
    if not (cfg.model.pretrained or cfg.model.pretrained_checkpoint or cfg.pretrain.method):
        return None, None
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    return pretrained_cfg.get("mean"), pretrained_cfg.get("std")


def environment() -> dict[str, str]:
    """Package versions and git commit: everything that produced a number is kept (docs/study-protocol.md)."""
    import timm

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "git_commit": git_commit(),
    }


def prepare_run_dir(cfg: Config, run_dir: str | Path) -> RunIdentity:
    """Check, without writing, that `run_dir` is free or holds this run; returns the run's identity (what a
    Ray driver calls before it starts workers, so that a refused run fails fast and touches nothing)."""
    dataset = load_dataset(cfg.data)
    identity = run_identity(cfg, load_split(cfg, dataset))
    check_run_dir(run_dir, identity)
    return identity


def run_training(
    cfg: Config,
    run_dir: str | Path,
    report: ReportFn | None = None,
    resume_from: str | Path | None = None,
    device: torch.device | None = None,
    write_files: bool = True,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Build and fit one run; returns the final metrics. `write_files` is False on non-zero DDP ranks.

    Resumes when `run_dir` (or `resume_from`) holds a checkpoint of this very run; refuses, before writing
    anything, a folder that holds another run.
    """
    run_dir = Path(run_dir)
    # Weight init, dropout and augmentations draw from torch's generators: seed them per run, inside a fork so
    # the caller's global RNG state is left as it was (splits use their own explicit generators). The fork
    # covers the training GPU's generator too: a pretraining run inside this one (pretrain.method) reseeds
    # it, and the fine-tune must draw the same whether the pretraining ran here or came from the cache.
    # `device`, when given, is the caller's (a Ray Train worker's own GPU); it is what `fit` trains on.
    training = device if device is not None else resolve_device(cfg.train.device)
    on_gpu = training.type == "cuda" and torch.cuda.is_available()  # else the engine says why it cannot run
    gpus = [training.index if training.index is not None else torch.cuda.current_device()] if on_gpu else []
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(cfg.seed)
        method, data, split = build_run(cfg, show_progress)
        identity = run_identity(cfg, split)
        if write_files:
            check_run_dir(run_dir, identity)
        with RunLock(run_dir) if write_files else contextlib.nullcontext():
            if write_files:
                check_run_dir(run_dir, identity)  # again, now that no other process can write here
                write_identity(run_dir, identity)
                cfg.save(run_dir / "config.yaml")
                split.save(run_dir / "split.json")
                atomic_write_text(run_dir / "env.json", json.dumps(environment(), indent=1))
            # The one seam for closed-form methods: fit once and evaluate, no step loop (semimed/classical/fit.py).
            closed_form = is_closed_form(cfg.method.name)
            final = (fit_closed_form if closed_form else fit)(
                method,
                data,
                cfg.train,
                seed=cfg.seed,
                run_dir=run_dir,
                report=report,
                resume_from=resume_from,
                device=device,
                show_progress=show_progress,
                fingerprint=identity.fingerprint,
                augment_device=cfg.data.augment_device,
            )
            if write_files:
                if not closed_form:  # nothing to export: no network (see semimed/classical/fit.py)
                    export_backbone(method, data, cfg, run_dir, final)
                atomic_write_text(
                    run_dir / "metrics.json", json.dumps(_jsonable(final), indent=1, sort_keys=True)
                )
    return final


def export_backbone(method: Method, data: RunData, cfg: Config, run_dir: Path, final: dict[str, Any]) -> Path:
    """`run_dir/backbone.safetensors`: the network the test metrics were reported for (`method.backbone()` at
    the reported checkpoint), so that another run can start from it (`model.pretrained_checkpoint=RUN_DIR`) and
    `semimed explain` shows what was evaluated. The metadata carries the input normalization it learned with."""
    network = method.backbone()
    mean, std = _normalization_stats(network, cfg)
    metadata = {
        "backbone": cfg.model.backbone,
        "in_chans": data.channels,
        "classes": list(data.classes),
        "multilabel": bool(data.multilabel),
        "image_size": cfg.data.image_size,
        "steps": cfg.train.steps,
        "step": int(final["selected_step"]),
        "checkpoint": final["reported_checkpoint"],
        "evaluated_model": final["evaluated_model"],
        "method": cfg.method.name,
        "mean": list(mean) if mean else [0.5] * data.channels,
        "std": list(std) if std else [0.5] * data.channels,
    }
    return save_backbone(network, run_dir / BACKBONE_FILE, metadata)


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in values.items()}
