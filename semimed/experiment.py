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
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semimed.classical.fit import fit_closed_form, is_closed_form
from semimed.config import Config, check_device
from semimed.data import load_dataset
from semimed.data.augment import Normalizer
from semimed.data.base import LabeledImageSet
from semimed.data.cache import load_pixels
from semimed.data.splits import Split, make_split
from semimed.data.views import RunData
from semimed.engine import ReportFn, fit, resolve_device
from semimed.errors import SemimedError, SemimedWarning
from semimed.files import atomic_write_text
from semimed.methods import Method, create_method
from semimed.models.backbones import create_backbone
from semimed.models.checkpoints import BACKBONE_FILE, save_backbone
from semimed.pretrain import pretrained_backbone
from semimed.runs import (
    METRICS_FILE,
    RunIdentity,
    RunLock,
    check_run_dir,
    finished_metrics,
    git_commit,
    run_identity,
    write_identity,
)


def check_config(cfg: Config) -> None:
    """What can be checked without data: names of the dataset, method and backbone, the method's parameters
    (types and ranges) and how they fit the rest of the config. The config's own values were checked when it
    was built (semimed/config.py). `semimed train` and `semimed config` call it, and sweeps for every trial at
    load time (`--dry-run` too), so a typo fails before anything runs or is written."""
    import timm

    from semimed.data import DATASETS
    from semimed.methods import METHODS, check_method
    from semimed.models.backbones import LOCAL_BACKBONES, backbone_names

    if cfg.data.dataset not in DATASETS:
        raise SemimedError(f"unknown data.dataset {cfg.data.dataset!r}; valid: {', '.join(DATASETS.names())}")
    method = METHODS.get(cfg.method.name)
    method.check_with_config(check_method(cfg.method.name, cfg.method.params), cfg)
    if method.expects_pretrained and not (
        cfg.model.pretrained or cfg.model.pretrained_checkpoint or cfg.pretrain.method
    ):
        # A warning, not an error: fine-tuning from scratch is a legitimate control. Said once per process
        # (Python's warning registry; the CLI says each message once).
        warnings.warn(
            f"method {cfg.method.name} without pretrained weights (model.pretrained, "
            "model.pretrained_checkpoint or pretrain.method) fine-tunes a randomly initialized network",
            SemimedWarning,
            stacklevel=1,  # one location for every caller: the default filter then says it once
        )
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
    check_method(name, cfg.pretrain.params, "pretrain.params")
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
        split.check_patients(dataset, cfg.data.split_file)  # Split.load checked the parts against each other
        return split
    return make_split(
        dataset,
        cfg.data.fraction,
        cfg.split_seed,
        cfg.data.test_fraction,
        cfg.data.val_fraction,
        cfg.data.val_policy,
    )


def build_run(
    cfg: Config, show_progress: bool = True, dataset: LabeledImageSet | None = None
) -> tuple[Method, RunData, Split]:
    """The method, the data it reads, and the split, for `cfg` (draws the network's initial weights from torch's
    generator: `run_training` seeds it). `dataset`: cfg.data already loaded (by `run_training`), else loaded."""
    check_config(cfg)  # names first: a typo should not wait for the data to load
    dataset = dataset if dataset is not None else load_dataset(cfg.data)
    split = load_split(cfg, dataset)
    check_batch_sizes(cfg, len(split.train))
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
    if model is not None:
        _check_input_size(model, cfg, dataset.channels)
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
        positive=dataset.positive_index(cfg.data.positive_class),
    )
    return method, data, split


def check_batch_sizes(cfg: Config, train_images: int) -> None:
    """A batch cannot be larger than the training split it is drawn from: train.batch_size=100000 on a few
    hundred images would stack the pool hundreds of times into each batch (minutes per step). Refused once
    the split is known, before anything is decoded or written. (A batch larger than the labeled subset is
    fine: the labeled stream repeats its images, as few-label training needs.)"""
    if is_closed_form(cfg.method.name):  # one fit on the whole pool: no batches
        return
    sizes = [("train.batch_size", cfg.train.batch_size)]
    if cfg.pretrain.method:
        sizes.append(("pretrain.batch_size", cfg.pretrain.batch_size))
    for key, size in sizes:
        if size > train_images:
            raise SemimedError(
                f"{key}={size} is larger than the training split ({train_images} images); "
                f"use {key} <= {train_images}"
            )


def _check_input_size(model: torch.nn.Module, cfg: Config, channels: int) -> None:
    """One zero image through the new network (eval mode, no gradient: its weights, buffers and the random
    generators are untouched), so that a data.image_size the backbone cannot take (densenet121 below 29 px,
    a ViT below its patch) fails here with one line, not at the first step after the run folder is written."""
    size, was_training = cfg.data.image_size, model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, channels, size, size))
    except (RuntimeError, ValueError, AssertionError) as exc:  # torch's size checks; timm's asserts
        raise SemimedError(
            f"model.backbone {cfg.model.backbone} cannot take data.image_size={size} images "
            f"({str(exc).strip().splitlines()[0]}); use a larger data.image_size"
        ) from None
    finally:
        model.train(was_training)


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
    check_config(cfg)  # the workers would only find a bad config after they made the run folder
    identity = _identity(cfg)
    check_run_dir(run_dir, identity)
    return identity


def _identity(cfg: Config, dataset: LabeledImageSet | None = None) -> RunIdentity:
    """The run's identity from metadata only (dataset table, split, file stats): no pixels, no network."""
    dataset = dataset if dataset is not None else load_dataset(cfg.data)
    dataset.positive_index(
        cfg.data.positive_class
    )  # a missing or unknown positive class: before Ray's workers
    split = load_split(cfg, dataset)
    check_batch_sizes(cfg, len(split.train))  # with the split known, before anything is built or written
    return run_identity(cfg, split, dataset)


def kept_results(
    run_dir: str | Path, shown: str | Path | None = None, say: bool = True
) -> dict[str, Any] | None:
    """The metrics of the finished run in `run_dir` (None when unfinished), said on stderr: a finished run is
    never trained, evaluated or written again (its data may have changed since; `shown` names the folder in
    the message when `run_dir` is a local copy of it)."""
    final = finished_metrics(run_dir)
    if final is not None and say:
        print(
            f"semimed: run {shown or run_dir} is finished ({METRICS_FILE}); its results are kept",
            file=sys.stderr,
        )
    return final


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
    anything, a folder that holds another run (another config, split, data or code). A finished run
    (metrics.json) is not run again: its metrics are returned and its folder is left byte for byte.
    """
    run_dir = Path(run_dir)
    # Weight init, dropout and augmentations draw from torch's generators: seed them per run, inside a fork so
    # the caller's global RNG state is left as it was (splits use their own explicit generators). The fork
    # covers the training GPU's generator too: a pretraining run inside this one (pretrain.method) reseeds
    # it, and the fine-tune must draw the same whether the pretraining ran here or came from the cache.
    # `device`, when given, is the caller's (a Ray Train worker's own GPU); it is what `fit` trains on.
    if device is None:
        check_device(cfg.train.device)  # train.device=cuda without a GPU: one line, before any folder exists
    training = device if device is not None else resolve_device(cfg.train.device)
    on_gpu = training.type == "cuda" and torch.cuda.is_available()  # else the engine says why it cannot run
    gpus = [training.index if training.index is not None else torch.cuda.current_device()] if on_gpu else []
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(cfg.seed)
        # The identity first, from metadata alone: a run refused from the folder, or one finished there, stops
        # before anything is built (pixels decoded, a pretraining run, weights drawn) or written. Every rank
        # computes it (the checkpoints carry its fingerprint); only rank 0 checks the folder and says so.
        check_config(cfg)  # names first: a typo should not wait for the data to load
        dataset = load_dataset(cfg.data)
        identity = _identity(cfg, dataset)
        if write_files:
            check_run_dir(run_dir, identity)
        kept = kept_results(run_dir, say=write_files)
        if kept is not None:
            return _report_kept(kept, report)
        method, data, split = build_run(cfg, show_progress, dataset)
        with RunLock(run_dir) if write_files else contextlib.nullcontext():
            if write_files:
                check_run_dir(run_dir, identity)  # again, now that no other process can write here
                kept = kept_results(run_dir)  # finished by another process while this one built
                if kept is not None:
                    return _report_kept(kept, report)
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
                    run_dir / METRICS_FILE, json.dumps(_jsonable(final), indent=1, sort_keys=True)
                )
    return final


def _report_kept(kept: dict[str, Any], report: ReportFn | None) -> dict[str, Any]:
    """A kept run's results go to `report` as the final result a run reports when it ends (no checkpoint):
    a Tune trial restored after its run finished still reports its result once."""
    if report is not None:
        report({**kept, "final": True}, None)
    return kept


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
