"""One training run from a Config, in plain Python: dataset -> split -> pixels -> views -> method -> fit.

This is what the Ray Train worker calls, what `semimed train --local` calls, and what tests and benchmarks
call. It writes, into the run directory: `config.yaml` (resolved), `split.json`, `env.json` (versions, git
commit), TensorBoard curves under `tb/`, checkpoints, and at the end `metrics.json` and `backbone.safetensors`
(the trained network, for `model.pretrained_checkpoint=RUN_DIR` in a later run).
"""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semimed.config import Config
from semimed.data import load_dataset
from semimed.data.augment import Normalizer, build_transform
from semimed.data.cache import load_pixels
from semimed.data.splits import Split, make_split
from semimed.data.views import ImageView, TwoView
from semimed.engine import ReportFn, RunData, fit
from semimed.errors import SemimedError
from semimed.files import atomic_write_text
from semimed.methods import create_method
from semimed.models.backbones import BACKBONE_FILE, create_backbone, save_backbone, unwrap_model


def check_config(cfg: Config) -> None:
    """What can be checked without data: names of the dataset, method (and its parameters) and backbone.
    Sweeps call it for every trial at load time, so a typo fails before anything runs."""
    import timm

    from semimed.data import DATASETS
    from semimed.methods import check_method
    from semimed.models.backbones import LOCAL_BACKBONES, backbone_names

    if cfg.data.dataset not in DATASETS:
        raise SemimedError(f"unknown data.dataset {cfg.data.dataset!r}; valid: {', '.join(DATASETS)}")
    check_method(cfg.method.name, cfg.method.params)
    if cfg.model.backbone not in LOCAL_BACKBONES and not timm.is_model(cfg.model.backbone):
        raise SemimedError(
            f"unknown model.backbone {cfg.model.backbone!r}; valid: {', '.join(backbone_names())} "
            "(or any timm.list_models() name)"
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


def build_run(cfg: Config) -> tuple[Any, RunData, Split]:
    """Dataset, split and views for `cfg`, plus the method (returned first)."""
    check_config(cfg)  # names first: a typo should not wait for the data to load
    dataset = load_dataset(cfg.data)
    split = load_split(cfg, dataset)
    index = split.indices(dataset)
    decoded = load_pixels(dataset, cfg.data.image_size, cfg.data.cache_dir or None)
    used = np.concatenate([index[k] for k in ("train", "val", "test")])
    bad = sorted(set(decoded.bad_rows) & set(used.tolist()))
    if bad:
        first = decoded.bad_rows[bad[0]]
        raise SemimedError(f"{len(bad)} image(s) of the split cannot be decoded; first: {first}")
    model = create_backbone(
        cfg.model.backbone,
        dataset.num_classes,
        dataset.channels,
        cfg.model.pretrained,
        cfg.model.pretrained_checkpoint,
        cfg.model.drop_rate,
        cfg.data.image_size,
    )
    mean, std = _normalization_stats(model, cfg)

    def transform(kind: str):
        return build_transform(kind, cfg.data.image_size)

    targets = torch.from_numpy(
        np.array(dataset.labels)
    )  # a writable copy: the loader's array may be read-only
    method = create_method(
        cfg.method.name, model, dataset.num_classes, dataset.multilabel, **cfg.method.params
    )
    unlabeled = None
    if method.uses_unlabeled:
        # At fraction 1.0 nothing is left unlabeled: SSL methods then also see every training image as an
        # unlabeled one (its label hidden), as in FixMatch's fully supervised runs, so that the 1.0 cell of a
        # label-fraction study exists for every method, not only the control.
        pool = index["unlabeled"] if len(index["unlabeled"]) else index["train"]
        unlabeled = TwoView(decoded.pixels, targets, pool, transform("weak"), transform("strong"))
    data = RunData(
        labeled=ImageView(decoded.pixels, targets, index["labeled"], transform(_labeled_augment(cfg))),
        unlabeled=unlabeled,
        val=ImageView(decoded.pixels, targets, index["val"], transform("none"))
        if len(index["val"])
        else None,
        test=ImageView(decoded.pixels, targets, index["test"], transform("none")),
        classes=dataset.classes,
        multilabel=dataset.multilabel,
        targets=np.asarray(dataset.labels),
        patient_ids=dataset.patients.astype(str),
        normalize=Normalizer(dataset.channels, mean, std),
    )
    return method, data, split


def _labeled_augment(cfg: Config) -> str:
    """`train.augment` for the labeled view: weak (the matched-control default) or none (MedMNIST v2 protocol)."""
    if cfg.train.augment not in ("weak", "none"):
        raise SemimedError(f"unknown train.augment {cfg.train.augment!r}; valid: weak, none")
    return cfg.train.augment


def _normalization_stats(model, cfg: Config):
    if not (cfg.model.pretrained or cfg.model.pretrained_checkpoint):
        return None, None
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    return pretrained_cfg.get("mean"), pretrained_cfg.get("std")


def environment() -> dict[str, str]:
    """Package versions and git commit: everything that produced a number is kept (STUDY_PROTOCOL rule 9)."""
    import timm

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = ""
    return info


def run_training(
    cfg: Config,
    run_dir: str | Path,
    report: ReportFn | None = None,
    resume_from: str | Path | None = None,
    device: torch.device | None = None,
    write_files: bool = True,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Build and fit one run; returns the final metrics. `write_files` is False on non-zero DDP ranks."""
    run_dir = Path(run_dir)
    # Weight init, dropout and augmentations draw from torch's generator: seed it per run, inside a fork so
    # the caller's global RNG state is left as it was (splits use their own explicit generators).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        method, data, split = build_run(cfg)
        if write_files:
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(run_dir / "config.yaml")
            split.save(run_dir / "split.json")
            atomic_write_text(run_dir / "env.json", json.dumps(environment(), indent=1))
        final = fit(
            method,
            data,
            cfg.train,
            seed=cfg.seed,
            run_dir=run_dir,
            report=report,
            resume_from=resume_from,
            device=device,
            show_progress=show_progress,
        )
    if write_files:
        _export_backbone(method, data, cfg, run_dir)
        atomic_write_text(run_dir / "metrics.json", json.dumps(_jsonable(final), indent=1, sort_keys=True))
    return final


def _export_backbone(method, data: RunData, cfg: Config, run_dir: Path) -> Path:
    """`run_dir/backbone.safetensors`: the trained network (last step), so that another run can start from it
    with `model.pretrained_checkpoint=RUN_DIR`; the metadata carries the input normalization it learned with."""
    model = unwrap_model(method.model)
    channels = int(data.labeled.pixels.shape[1])
    mean, std = _normalization_stats(model, cfg)
    metadata = {
        "backbone": cfg.model.backbone,
        "in_chans": channels,
        "classes": list(data.classes),
        "multilabel": bool(data.multilabel),
        "image_size": cfg.data.image_size,
        "steps": cfg.train.steps,
        "mean": list(mean) if mean else [0.5] * channels,
        "std": list(std) if std else [0.5] * channels,
    }
    return save_backbone(model, run_dir / BACKBONE_FILE, metadata)


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in values.items()}
