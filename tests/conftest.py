"""Shared fixtures: demo data on disk, the real sample (when SEMIMED_SAMPLE_DATA is set), in-memory datasets.

At import, before any semimed module reads the environment, the tests are cut off from the network
(HF_HUB_OFFLINE) and from the user's cache: SEMIMED_CACHE points at a temporary folder removed at the end of
the session, so no test ever writes to ~/.cache/semimed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
_SESSION_CACHE = Path(tempfile.mkdtemp(prefix="semimed-test-cache-"))
os.environ["SEMIMED_CACHE"] = str(_SESSION_CACHE)

import torch  # noqa: E402

from semimed.data.base import LabeledImageSet  # noqa: E402  (after the environment is set)

# One intra-op thread: tests are tiny models on a 2-core machine, where torch's second thread spin-waits
# against the other processes (Ray workers, the data loader) — measured 50 s vs 1.3 s for the same 40 steps.
torch.set_num_threads(1)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def demo_roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The synthetic BreakHis tree and ChestX-ray14 release at write_demo's default sizes (~8 s, once)."""
    from semimed.data.demo import write_demo

    return write_demo(tmp_path_factory.mktemp("demo"), seed=0)


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """The real sample data folder ($SEMIMED_SAMPLE_DATA, e.g. /work/shared/data); skips when unset."""
    value = os.environ.get("SEMIMED_SAMPLE_DATA")
    if not value:
        pytest.skip("SEMIMED_SAMPLE_DATA is not set")
    path = Path(value)
    if not path.is_dir():
        pytest.skip(f"SEMIMED_SAMPLE_DATA={value} is not a folder")
    return path


def _random_reader(seed: int, size: int, channels: int) -> Callable[[int], np.ndarray]:
    def read(index: int) -> np.ndarray:
        return np.random.default_rng([seed, index]).integers(0, 256, (size, size, channels), dtype=np.uint8)

    return read


def build_single_label_set(
    num_classes: int = 3,
    patients_per_class: int | list[int] = 10,
    images_per_patient: int = 4,
    seed: int = 0,
    size: int = 16,
    name: str = "memory",
) -> LabeledImageSet:
    """K classes; each patient has one class and `images_per_patient` images (int64 labels [N]).

    `patients_per_class` may be a list to make some classes rarer than others.
    """
    counts = (
        [patients_per_class] * num_classes
        if isinstance(patients_per_class, int)
        else list(patients_per_class)
    )
    rows = []
    for k, n_patients in enumerate(counts):
        for p in range(n_patients):
            for i in range(images_per_patient):
                rows.append(
                    {"patient_id": f"c{k}_p{p:03d}", "path": f"c{k}/p{p:03d}/{i:03d}.png", "label": k}
                )
    meta = pd.DataFrame(rows)
    labels = meta.pop("label").to_numpy(np.int64)
    return LabeledImageSet(
        name=name,
        task="single",
        root=Path("."),
        classes=[f"class_{k}" for k in range(num_classes)],
        multilabel=False,
        labels=labels,
        meta=meta,
        reader=_random_reader(seed, size, 3),
    )


def build_multilabel_set(
    num_findings: int = 5,
    num_patients: int = 60,
    images_per_patient: int = 3,
    seed: int = 0,
    nan_rate: float = 0.1,
    empty_findings: tuple[int, ...] = (),
    size: int = 16,
) -> LabeledImageSet:
    """float32 labels [N, K]: prevalence falls with the finding index, ~nan_rate unknown entries (NaN).

    Findings listed in `empty_findings` have no positive anywhere (only 0 or NaN).
    """
    rng = np.random.default_rng([seed, 99])
    n = num_patients * images_per_patient
    prevalence = np.linspace(0.4, 0.05, num_findings)
    labels = (rng.random((n, num_findings)) < prevalence).astype(np.float32)
    labels[:, list(empty_findings)] = 0.0
    labels[rng.random(labels.shape) < nan_rate] = np.nan
    meta = pd.DataFrame(
        {
            "patient_id": [f"P{i // images_per_patient:04d}" for i in range(n)],
            "path": [f"images/{i:05d}.png" for i in range(n)],
        }
    )
    meta.attrs["channels"] = 1
    return LabeledImageSet(
        name="memory_ml",
        task="findings",
        root=Path("."),
        classes=[f"finding_{k}" for k in range(num_findings)],
        multilabel=True,
        labels=labels,
        meta=meta,
        reader=_random_reader(seed, size, 1),
    )


@pytest.fixture
def make_single_label_set() -> Callable[..., LabeledImageSet]:
    """Factory for an in-memory single-label set (see `build_single_label_set`)."""
    return build_single_label_set


@pytest.fixture
def make_multilabel_set() -> Callable[..., LabeledImageSet]:
    """Factory for an in-memory multi-label set with NaN = unknown (see `build_multilabel_set`)."""
    return build_multilabel_set


CHEST_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)


def write_chest_release(
    root: Path,
    rows: list[tuple[str, str, int, str]],
    test: tuple[str, ...] = (),
    *,
    folder: str = "images_001/images",
    size: int = 8,
    csv_name: str = "Data_Entry_2017_v2020.csv",
    skip_images: tuple[str, ...] = (),
) -> Path:
    """A minimal ChestX-ray14 release under `root`: the Data_Entry table (rows of (name, "A|B", patient, view)),
    test_list.txt (`test`) and train_val_list.txt (the rest), and one 8-bit grayscale PNG per row whose pixels
    are all equal to the row's position (so tests can tell images apart), except the names in `skip_images`."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    lines = [CHEST_HEADER] + [
        f"{name},{labels},0,{patient},50,M,{view},2500,2048,0.143,0.143"
        for name, labels, patient, view in rows
    ]
    text = "\n".join(lines) + "\n"
    if csv_name.endswith(".gz"):
        import gzip

        (root / csv_name).write_bytes(gzip.compress(text.encode()))
    else:
        (root / csv_name).write_text(text)
    names = [row[0] for row in rows]
    (root / "test_list.txt").write_text("\n".join(n for n in names if n in test))
    (root / "train_val_list.txt").write_text("\n".join(n for n in names if n not in test))
    (root / folder).mkdir(parents=True, exist_ok=True)
    for position, name in enumerate(names):
        if name not in skip_images:
            Image.fromarray(np.full((size, size), position, np.uint8)).save(root / folder / name)
    return root


@pytest.fixture
def make_chest_release() -> Callable[..., Path]:
    """Factory for a tiny ChestX-ray14-format release on disk (see `write_chest_release`)."""
    return write_chest_release
