"""Datasets by name: the registry `DATASETS` (one `DatasetSpec` per dataset) and `load_dataset(DataConfig)`.

Importing this package registers every dataset; a new one is a module that calls `register_dataset` and one
import line below (semimed/data/spec.py says what a spec declares).
"""

from __future__ import annotations

from semimed.config import DataConfig
from semimed.data import breakhis, chestxray14, imagefolder, manifest, medmnist  # noqa: F401  (registers)
from semimed.data.base import LabeledImageSet
from semimed.data.spec import DATASETS, DatasetSpec, register_dataset
from semimed.errors import SemimedError, UnknownNameError

__all__ = ["DATASETS", "DatasetSpec", "LabeledImageSet", "dataset_spec", "load_dataset", "register_dataset"]


def dataset_spec(name: str) -> DatasetSpec:
    """The registered spec of `name`; an unknown name raises, listing the registered ones."""
    try:
        return DATASETS.get(name)  # type: ignore[return-value]
    except UnknownNameError:
        raise UnknownNameError(
            f"unknown data.dataset {name!r}; valid: {', '.join(DATASETS.names())}"
        ) from None


def load_dataset(cfg: DataConfig) -> LabeledImageSet:
    """Load `cfg.dataset` through its spec. `cfg` was validated when it was built (semimed.config): the task is
    one of the dataset's and `cfg.options` holds every option of its options dataclass."""
    if not cfg.root:
        raise SemimedError("data.root is empty: point it at the dataset folder (or the .npz file)")
    spec = dataset_spec(cfg.dataset)
    return spec.load(cfg.root, cfg.task, spec.make_options(cfg.options))
