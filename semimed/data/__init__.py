"""Dataset loaders by name: `load_dataset(DataConfig)` -> LabeledImageSet."""

from __future__ import annotations

from semimed.config import DataConfig
from semimed.data.base import LabeledImageSet
from semimed.errors import SemimedError

DATASETS = ("breakhis", "chestxray14", "medmnist")


def load_dataset(cfg: DataConfig) -> LabeledImageSet:
    if not cfg.root:
        raise SemimedError("data.root is empty: point it at the dataset folder (or the .npz file)")
    if cfg.dataset == "breakhis":
        from semimed.data.breakhis import load_breakhis

        return load_breakhis(cfg.root, task=cfg.task, magnification=cfg.magnification)
    if cfg.dataset == "chestxray14":
        from semimed.data.chestxray14 import load_chestxray14

        return load_chestxray14(cfg.root, view=cfg.view, drop_missing=cfg.drop_missing)
    if cfg.dataset == "medmnist":
        from semimed.data.medmnist import load_medmnist

        return load_medmnist(cfg.root)
    raise SemimedError(f"unknown data.dataset {cfg.dataset!r}; valid: {', '.join(DATASETS)}")
