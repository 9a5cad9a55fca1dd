"""`semimed predict RUN_DIR --images … | --root DATASET_ROOT`: per-image class probabilities from a finished run.

The network is the run's `backbone.safetensors`: the one its test metrics were reported for (the checkpoint
selected on val, Mean Teacher's teacher, …), loaded as `semimed explain` loads it. Each image is prepared as the
run's evaluation prepared it: decoded to the run's channels, shorter side scaled to data.image_size and centre
cropped (the decode-once cache's policy, semimed.data.cache), normalized with the statistics stored in the
export. Batches go to the GPU when there is one (`--device`).

Output: a CSV with one row per image: `image` (the file, or the dataset's own path for `--root`), for `--root`
also `patient_id` and the dataset's label(s) (`label` = class name; multi-label `label/<finding>` 0/1, empty =
unknown), then `score/<class>` (softmax probabilities; multi-label: per-finding sigmoids) and `predicted`
(single-label: the top class; multi-label: the findings at or above the run's decision thresholds chosen on val,
`test/threshold/<finding>` in metrics.json, else 0.5, joined by `|`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from semimed.errors import SemimedError
from semimed.files import atomic_write_text

DEFAULT_OUTPUT = "predict.csv"


@dataclass
class Prediction:
    output: Path  # the CSV written
    images: int
    classes: list[str]
    device: str


class _Images(torch.utils.data.Dataset):
    """uint8 [C, S, S] per image, prepared like the run's evaluation (decode, shorter side to S, centre crop)."""

    def __init__(self, read, count: int, size: int) -> None:
        self.read, self.count, self.size = read, count, size

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        from semimed.data.cache import resize_center_crop

        return torch.from_numpy(resize_center_crop(self.read(index), self.size).copy())  # a writable copy


def load_run_model(run_dir: Path, device: torch.device, purpose: str = "predict"):
    """(model in eval mode on `device`, classes, multilabel, Normalizer, config, channels) of a finished,
    classifying run: its `backbone.safetensors`, the network its test metrics were reported for. A clear
    one-line error for anything else (no run, a closed-form method, self-supervised pretraining, unfinished);
    `purpose` ("predict", "explain") is named in it. `semimed predict` and `semimed explain` both load this."""
    from semimed.classical.fit import refuse_closed_form_run
    from semimed.config import load_config
    from semimed.data.augment import Normalizer
    from semimed.data.splits import Split
    from semimed.methods import METHODS
    from semimed.models.backbones import create_backbone
    from semimed.models.checkpoints import BACKBONE_FILE, read_backbone_metadata

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise SemimedError(f"{run_dir}: not a semimed run directory (no config.yaml)")
    refuse_closed_form_run(run_dir, purpose)
    cfg = load_config(run_dir / "config.yaml")
    if cfg.method.name in METHODS and not METHODS.get(cfg.method.name).classifies:
        raise SemimedError(
            f"{run_dir}: a {cfg.method.name} run pretrains a backbone without labels, so it has no classifier to "
            f"{purpose} with; use a run fine-tuned from it (model.pretrained_checkpoint=RUN_DIR)"
        )
    exported = run_dir / BACKBONE_FILE
    if not exported.is_file():
        raise SemimedError(
            f"{run_dir}: no {BACKBONE_FILE} (the run has not finished): {purpose} uses the network the run "
            "reported its test metrics for, which a run exports when it ends"
        )
    meta = read_backbone_metadata(exported)
    classes = json.loads(meta["classes"]) if "classes" in meta else Split.load(run_dir / "split.json").classes
    channels = int(json.loads(meta.get("in_chans", "3")))
    multilabel = bool(json.loads(meta.get("multilabel", "false")))
    model = create_backbone(
        cfg.model.backbone,
        len(classes),
        channels,
        checkpoint=str(exported),
        drop_rate=cfg.model.drop_rate,
        image_size=cfg.data.image_size,
    )
    mean, std = model.checkpoint_report.normalization or (None, None)
    model.eval().to(device)
    return model, list(classes), multilabel, Normalizer(channels, mean, std), cfg, channels


def run_thresholds(run_dir: Path, classes: list[str]) -> np.ndarray:
    """The run's multi-label decision thresholds (chosen on val), 0.5 where it has none."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        metrics = {}
    values = [metrics.get(f"test/threshold/{c}") for c in classes]
    return np.array([v if isinstance(v, int | float) and math.isfinite(v) else 0.5 for v in values])


def score_images(
    model: torch.nn.Module,
    normalize,
    multilabel: bool,
    read,
    count: int,
    image_size: int,
    device: torch.device,
    batch_size: int = 256,
    workers: int = 0,
    show_progress: bool = True,
    desc: str = "predict",
) -> np.ndarray:
    """Probabilities [count, K] (softmax; multi-label: sigmoids) of `model` for images `read(0..count-1)`, each
    prepared as the run's evaluation prepared it (`_Images`), in fp32: `semimed predict` and `semimed evaluate`
    score through this."""
    from tqdm.auto import tqdm

    from semimed.losses import probabilities

    loader = torch.utils.data.DataLoader(
        _Images(read, count, image_size), batch_size=batch_size, num_workers=workers
    )
    scores = []
    with (
        torch.no_grad(),
        tqdm(
            total=count,
            desc=desc,
            unit="img",
            disable=None if show_progress else True,  # None: TTY only
        ) as bar,
    ):
        for batch in loader:
            x = normalize(batch.to(device, non_blocking=True))
            scores.append(probabilities(model(x), multilabel).float().cpu().numpy())
            bar.update(len(batch))
    return np.concatenate(scores)


def check_output_path(path: Path, key: str) -> Path:
    """`path` as the file predict writes: a writable file (not a folder), and none of a run's own files
    (`--out RUN/metrics.json` would replace the run's results with a CSV)."""
    from semimed.files import check_output_file
    from semimed.runs import run_owning

    owner = run_owning(path)
    if owner is not None:
        raise SemimedError(
            f"{key} {path}: that is one of the files of the run {owner}, left as they are; write the "
            f"predictions elsewhere (default: RUN_DIR/{DEFAULT_OUTPUT})"
        )
    return check_output_file(path, key)


def predict(
    run_dir: str | Path,
    images: Sequence[str | Path] | None = None,
    root: str | None = None,
    out: str | Path | None = None,
    batch_size: int = 256,
    device: str = "auto",
    workers: int = 0,
    show_progress: bool = True,
) -> Prediction:
    """Write the CSV (default RUN_DIR/predict.csv) of class probabilities for `images` or for every image of
    the dataset at `root` (the run's dataset, task and options, another root)."""
    import pandas as pd

    from semimed.config import check_device
    from semimed.data.base import check_image_file, read_image_file
    from semimed.engine import resolve_device

    run_dir = Path(run_dir)
    if bool(images) == bool(root):
        raise SemimedError("predict: give either --images FILE ... or --root DATASET_ROOT")
    if batch_size < 1:
        raise SemimedError(f"predict: --batch-size {batch_size} must be >= 1")
    output = check_output_path(Path(out) if out else run_dir / DEFAULT_OUTPUT, "predict: --out")
    check_device(device, "--device")  # cuda without a GPU: one line, before the model is read
    target = resolve_device(device)
    model, classes, multilabel, normalize, cfg, channels = load_run_model(run_dir, target)
    columns: dict[str, object] = {}
    if images:
        paths = [Path(p) for p in images]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise SemimedError(f"predict: image file(s) not found: {', '.join(missing[:5])}")
        for path in paths:
            # Headers now (16-bit, too large, not an image): one line before any work, not an error raised
            # in a loader worker, which torch reports with its traceback.
            check_image_file(path)
        columns["image"] = [str(p) for p in paths]

        def read(index: int) -> np.ndarray:
            return read_image_file(paths[index], channels)

        count = len(paths)
    else:
        from semimed.data import load_dataset

        dataset = load_dataset(dataclasses.replace(cfg.data, root=str(root)))
        if list(dataset.classes) != classes:
            raise SemimedError(
                f"predict: the dataset at {root} has classes {list(dataset.classes)}, the run {classes}"
            )
        columns["image"] = dataset.meta["path"].astype(str).tolist()
        columns["patient_id"] = dataset.meta["patient_id"].astype(str).tolist()
        labels = np.asarray(dataset.labels)
        if multilabel:
            for k, name in enumerate(classes):
                columns[f"label/{name}"] = labels[:, k]
        else:
            columns["label"] = [classes[int(v)] for v in labels]
        read, count = dataset.read_image, len(dataset)
    if count == 0:
        raise SemimedError("predict: no images")
    scores = score_images(
        model,
        normalize,
        multilabel,
        read,
        count,
        cfg.data.image_size,
        target,
        batch_size,
        workers,
        show_progress,
    )
    for k, name in enumerate(classes):
        columns[f"score/{name}"] = scores[:, k]
    if multilabel:
        above = scores >= run_thresholds(run_dir, classes)
        columns["predicted"] = ["|".join(c for c, a in zip(classes, row, strict=True) if a) for row in above]
    else:
        columns["predicted"] = [classes[i] for i in scores.argmax(axis=1)]
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, pd.DataFrame(columns).to_csv(index=False, float_format="%.6g"))
    return Prediction(output, count, classes, str(target))
