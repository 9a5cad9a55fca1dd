"""`semimed evaluate RUN_DIR --root OTHER --out DIR`: external validation of a finished run on another site's data.

The network is the one `semimed predict` loads (`predict.load_run_model`: the run's `backbone.safetensors`, the
checkpoint its test metrics were reported for), and each image is prepared and scored as predict scores it
(`predict.score_images`: the run's decode, resize, centre crop and normalization, fp32). The data is any
registered dataset (`--dataset`, default the run's data.dataset; for the run's own dataset kind the run's task
and options are the defaults, the dataset's defaults otherwise).

What is scored: every image of the external set (the default: the data came from elsewhere, so nothing of it was
seen in training), or with `part="test"` only its official test part (MedMNIST, ChestX-ray14's lists), or with
`split_file` the test part of a saved split (`semimed split ... --out S.json`; the run's own split.json gives its
test part). Evaluating the run's own data with the default includes the images it trained on: a warning says so.

Metrics: `semimed.metrics.evaluate_scores` as the run computed them: the run's classes (an external set whose
classes are the same in another order is mapped by name), its positive class (metrics.json `positive_class`) and
its multi-label decision thresholds chosen on val (metrics.json `test/threshold/<finding>`). With the run's own
test part they are the run's test/* numbers. Each headline metric that has a resampled form (semimed.stats:
accuracy, balanced accuracy, ROC-AUC, AP, patient accuracy; here also sensitivity and specificity, binary and
macro) gets a 95% percentile interval from a patient-cluster bootstrap (one run: patients are resampled, nothing
else); patients are the dataset's patient ids (a dataset without them makes each image its own patient).

Written into `out` (required, never inside a run folder nor beside run folders, which `semimed report` would
read as trials): `predictions.parquet` (a run's columns: split = "test" for every scored image, row, path,
patient_id, label(s) in the run's class order, score/<class>, step = the run's reported checkpoint),
`metrics.json` (written last) and `report.md`, each atomically. A refused evaluation writes nothing.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from semimed import stats
from semimed.config import DataConfig, check_device, load_config
from semimed.data import load_dataset
from semimed.data.base import as_channels
from semimed.data.splits import Split
from semimed.engine import resolve_device
from semimed.errors import SemimedError, SemimedWarning
from semimed.files import atomic_write_text, check_output_dir, publish, staging_path
from semimed.metrics import evaluate_scores
from semimed.predict import load_run_model, run_thresholds, score_images
from semimed.runs import METRICS_FILE, RUN_FILE

FILES = ("predictions.parquet", "report.md", "metrics.json")  # metrics.json last: its presence means complete
PARTS = ("all", "test")
MAX_BOOT = 100_000  # --n-boot above this is refused (a typo, not a wish for a tighter interval)
# Headline metrics with a resampled form beyond semimed.stats' (per class, then binary / macro): see _ratios.
RATIO_METRICS = ("sensitivity", "specificity", "sensitivity_macro", "specificity_macro")
# report.md's row order; any other headline (non per-class) metric follows in name order.
ORDER = (
    "accuracy",
    "balanced_accuracy",
    "roc_auc",
    "average_precision",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
    "patient_accuracy",
    "subset_accuracy",
    "hamming_accuracy",
)


@dataclass
class Evaluation:
    out: Path  # the folder written
    images: int
    patients: int
    classes: list[str]  # the run's, in its order
    positive_class: str | None
    step: int | None  # the run's reported checkpoint
    metrics: dict[str, float]  # evaluate_scores' names -> value
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)  # 95% cluster bootstrap
    device: str = "cpu"


def label_order(dataset_classes: Sequence[str], run_classes: Sequence[str], where: str) -> np.ndarray | None:
    """For each of the run's classes, its index in the dataset's classes: None when the orders are the same,
    else the permutation that puts the dataset's labels in the run's order (classes are matched by name). A
    class set that differs is refused, naming both lists."""
    dataset_classes, run_classes = list(dataset_classes), list(run_classes)
    if dataset_classes == run_classes:
        return None
    if sorted(dataset_classes) != sorted(run_classes) or len(set(run_classes)) != len(run_classes):
        only_data = [c for c in dataset_classes if c not in run_classes]
        only_run = [c for c in run_classes if c not in dataset_classes]
        detail = "; ".join(
            part
            for part in (
                f"not in the run: {', '.join(only_data)}" if only_data else "",
                f"not in the dataset: {', '.join(only_run)}" if only_run else "",
            )
            if part
        )
        raise SemimedError(
            f"evaluate: {where} has classes [{', '.join(dataset_classes)}], the run [{', '.join(run_classes)}]: "
            f"not the same classes ({detail or 'repeated names'}); the run can only be scored on data labeled "
            "with its classes"
        )
    return np.array([dataset_classes.index(c) for c in run_classes], dtype=np.int64)


def map_labels(labels: np.ndarray, order: np.ndarray | None, multilabel: bool) -> np.ndarray:
    """The dataset's labels in the run's class order (`label_order`): single-label class indices renumbered,
    multi-label columns permuted."""
    labels = np.asarray(labels)
    if order is None:
        return labels
    if multilabel:
        return labels[:, order]
    to_run = np.empty(len(order), dtype=np.int64)
    to_run[order] = np.arange(len(order))  # dataset index -> run index
    return to_run[labels.astype(np.int64)]


def check_out(out: str | Path, run_dir: str | Path) -> Path:
    """`out` as the folder evaluate writes: not the run folder nor inside it (a finished run is never
    modified), not inside another run, not beside run folders (`semimed report` reads every folder of an
    experiment's runs/ as a trial), and writable."""

    path = Path(out).expanduser()
    target, run = path.resolve(), Path(run_dir).expanduser().resolve()
    if target == run or run in target.parents:
        raise SemimedError(
            f"evaluate: --out {out}: inside the run folder {run_dir}, which is left as it is; give a folder "
            "outside it"
        )
    owner = next((p for p in (target, *target.parents) if (p / RUN_FILE).is_file()), None)
    if owner is not None:
        raise SemimedError(f"evaluate: --out {out}: inside the run folder {owner}; give a folder outside it")
    parent = target.parent
    if parent.is_dir():
        beside = next(
            (p for p in sorted(parent.iterdir()) if p != target and p.is_dir() and (p / RUN_FILE).is_file()),
            None,
        )
        if beside is not None:
            raise SemimedError(
                f"evaluate: --out {out}: beside the run folder {beside.name} in {parent}, where `semimed report` "
                "would read it as a run; give a folder elsewhere"
            )
    # An earlier evaluation there is replaced; a file of the same name that evaluate did not write (a run's or a
    # report's metrics.json, the user's own report.md) is not: it would be overwritten without a word.
    present = [name for name in FILES if (target / name).exists()]
    if present and not _is_evaluation(target / FILES[2]):
        raise SemimedError(
            f"evaluate: --out {out}: holds {present[0]}, which no earlier `semimed evaluate` wrote (its "
            "metrics.json would say so); it is left as it is: give a new or empty folder"
        )
    return check_output_dir(path, "evaluate: --out")


def _is_evaluation(metrics: Path) -> bool:
    """Whether `metrics` is an evaluation's metrics.json (its own keys, not a run's or a report's)."""
    try:
        found = json.loads(metrics.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(found, dict) and {"run", "ci95", "n_boot", "metrics"} <= set(found)


def run_dataset(run_dir: str | Path) -> str:
    """The run's data.dataset (the default `--dataset`)."""

    config = Path(run_dir) / "config.yaml"
    if not config.is_file():
        raise SemimedError(f"{run_dir}: not a semimed run directory (no config.yaml)")
    return load_config(config).data.dataset


class _Rows:
    """`read(i)` of the chosen rows only: the pixels of dataset row rows[i], with the run's channel count (an
    RGB run scoring grayscale data sees the gray plane three times, as it would from a file)."""

    def __init__(self, read: Callable[[int], np.ndarray], rows: np.ndarray, channels: int) -> None:
        self.read, self.rows, self.channels = read, rows, channels

    def __call__(self, index: int) -> np.ndarray:
        return as_channels(self.read(int(self.rows[index])), self.channels)


def evaluate_run(
    run_dir: str | Path,
    out: str | Path,
    root: str | Path | None = None,
    dataset: str | None = None,
    task: str = "",
    options: dict[str, Any] | None = None,
    part: str | None = None,
    split_file: str | Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 256,
    device: str = "auto",
    workers: int = 0,
    show_progress: bool = True,
    images: Any = None,
) -> Evaluation:
    """Score the run's reported network on the dataset `dataset` at `root` (or on `images`, a LabeledImageSet
    built in Python) and write predictions.parquet, metrics.json and report.md into `out`; see the module
    docstring. Everything is checked before anything is written."""

    run_dir = Path(run_dir)
    if (root is None) == (images is None):
        raise SemimedError("evaluate: give the external data's --root (or, from Python, images=)")
    if part is not None and part not in PARTS:
        raise SemimedError(f"evaluate: --split {part!r}; valid: {', '.join(PARTS)}")
    if split_file is not None and part == "all":
        raise SemimedError("evaluate: --split-file scores the file's test part; leave out --split all")
    for key, value in (("--n-boot", n_boot), ("--batch-size", batch_size)):
        if value < 1:
            raise SemimedError(f"evaluate: {key} {value} must be >= 1")
    if n_boot > MAX_BOOT:
        # Each replicate recomputes every metric: a mistyped count would run for days without a word.
        raise SemimedError(
            f"evaluate: --n-boot {n_boot} is more than {MAX_BOOT:,}; 1,000 (the default) to 10,000 replicates "
            "are usual"
        )
    output = check_out(out, run_dir)
    check_device(device, "--device")
    target = resolve_device(device)
    model, classes, multilabel, normalize, cfg, channels = load_run_model(run_dir, target, "evaluate")
    try:
        run_metrics = json.loads((run_dir / METRICS_FILE).read_text())
    except (OSError, ValueError):
        run_metrics = None
    if not isinstance(run_metrics, dict):
        raise SemimedError(
            f"{run_dir}: no readable {METRICS_FILE} (the run has not finished): evaluate uses its positive "
            "class, decision thresholds and reported checkpoint from it"
        )

    # The external data, its task type and classes against the run's.
    data_cfg = None
    if images is None:
        name = dataset or cfg.data.dataset
        same_kind = name == cfg.data.dataset
        data_cfg = DataConfig(
            dataset=name,
            root=str(Path(root).expanduser()),
            task=task or (cfg.data.task if same_kind else ""),
            options={**(cfg.data.options if same_kind else {}), **(options or {})},
        )
        external = load_dataset(data_cfg)
        where = f"the {name} data at {root}"
    else:
        external = images
        where = f"the data set {external.name}"
    if external.multilabel != multilabel:
        kinds = ("single-label", "multi-label")
        raise SemimedError(
            f"evaluate: the run is {kinds[multilabel]} ({', '.join(classes)}), {where} is "
            f"{kinds[external.multilabel]}; a classifier is scored on labels of its own kind"
        )
    order = label_order(external.classes, classes, where)
    labels = map_labels(external.labels, order, multilabel)

    # Which images.
    if split_file is not None:
        rows = Split.load(split_file).indices(external)["test"]
        part_text = f"the test part of {split_file}"
    elif part == "test":
        if external.official_split is None:
            raise SemimedError(
                f"evaluate: --split test: {where} has no official test part; score all its images (the "
                "default) or the test part of a saved split (semimed split ... --out S.json; --split-file S.json)"
            )
        rows = np.flatnonzero(np.asarray(external.official_split) == "test")
        part_text = "its official test part"
    else:
        rows = np.arange(len(external))
        part_text = "all images"
    if len(rows) == 0:
        raise SemimedError(f"evaluate: no images to score ({where}, {part_text})")
    y = labels[rows]

    positive_name = run_metrics.get("positive_class") or None
    positive = None
    if not multilabel and len(classes) == 2:
        if positive_name is not None and positive_name not in classes:
            raise SemimedError(
                f"{run_dir}/{METRICS_FILE}: positive_class {positive_name!r} is not one of the run's classes "
                f"({', '.join(classes)})"
            )
        positive = classes.index(positive_name) if positive_name else None
        shown = classes[1 if positive is None else positive]
        if not (y == (1 if positive is None else positive)).any():
            raise SemimedError(
                f"evaluate: {where} ({part_text}) has no image of the run's positive class {shown!r}: its "
                "sensitivity, ROC-AUC and AP would be undefined"
            )
        positive_name = shown
    else:
        positive_name = None
    if (
        data_cfg is not None
        and split_file is None
        and part != "test"
        and data_cfg.dataset == cfg.data.dataset
        and Path(data_cfg.root).resolve() == Path(cfg.data.root).expanduser().resolve()
    ):
        warnings.warn(
            f"evaluate: {root} is the run's own data.root and all its images are scored, including those the "
            "run trained and selected its checkpoint on; --split-file RUN_DIR/split.json scores its test part only",
            SemimedWarning,
            stacklevel=2,
        )

    # Score, then the metrics as the run computed them.
    scores = score_images(
        model,
        normalize,
        multilabel,
        _Rows(external.read_image, rows, channels),
        len(rows),
        cfg.data.image_size,
        target,
        batch_size,
        workers,
        show_progress,
        desc="evaluate",
    )
    patient_ids = external.patients.astype(str)[rows]
    thresholds = run_thresholds(run_dir, classes) if multilabel else None
    values = evaluate_scores(y, scores, classes, multilabel, patient_ids, thresholds, positive)
    intervals = _intervals(
        rows, patient_ids, y, scores, classes, multilabel, positive, thresholds, values, n_boot, seed
    )
    step = run_metrics.get("selected_step")
    result = Evaluation(
        output,
        len(rows),
        len(set(patient_ids.tolist())),
        list(classes),
        positive_name,
        int(step) if isinstance(step, int | float) else None,
        values,
        intervals,
        str(target),
    )

    # Write: the folder is made only now, each file atomically, metrics.json last.
    frame = _predictions(external, rows, patient_ids, y, scores, classes, multilabel, result.step)
    described = {
        "run": str(run_dir.resolve()),
        "checkpoint_step": result.step,
        "reported_checkpoint": run_metrics.get("reported_checkpoint"),
        "evaluated_model": run_metrics.get("evaluated_model"),
        "dataset": external.name,
        "task": external.task,
        "root": str(Path(data_cfg.root).resolve() if data_cfg else external.root),
        "options": dict(data_cfg.options) if data_cfg else {},
        "part": part_text,
        "images": result.images,
        "patients": result.patients,
        "classes": list(classes),
        "dataset_classes": list(external.classes),
        "positive_class": positive_name,
        "thresholds": None if thresholds is None else dict(zip(classes, map(float, thresholds), strict=True)),
        "interval": f"95% percentile, patient-cluster bootstrap, {n_boot} replicates, seed {seed}",
        "n_boot": n_boot,
        "seed": seed,
        "metrics": {k: _finite(v) for k, v in values.items()},
        "ci95": {k: [_finite(lo), _finite(hi)] for k, (lo, hi) in intervals.items()},
    }
    output.mkdir(parents=True, exist_ok=True)
    # metrics.json is written last and marks a complete evaluation: an earlier one's goes first, so a failure
    # below never leaves its metrics beside this evaluation's predictions.
    (output / FILES[2]).unlink(missing_ok=True)
    _write_parquet(frame, output / FILES[0])

    atomic_write_text(output / FILES[1], _report(described, run_metrics, run_dir))
    atomic_write_text(output / FILES[2], json.dumps(described, indent=1) + "\n")
    return result


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _intervals(
    rows: np.ndarray,
    patient_ids: np.ndarray,
    y: np.ndarray,
    scores: np.ndarray,
    classes: list[str],
    multilabel: bool,
    positive: int | None,
    thresholds: np.ndarray | None,
    values: dict[str, float],
    n_boot: int,
    seed: int,
) -> dict[str, tuple[float, float]]:
    """95% patient-cluster bootstrap interval of each headline metric that has a resampled form."""

    patients, patient = np.unique(patient_ids, return_inverse=True)
    pred = stats.Predictions(
        rows.astype(np.int64),
        patients,
        patient.reshape(-1),
        y.astype(np.float64) if multilabel else y.astype(np.int64),
        scores.astype(np.float64),
        list(classes),
        multilabel,
        1 if positive is None else positive,
    )
    finite = [m for m, v in values.items() if v is not None and math.isfinite(v)]
    # Keyed by the seed and the scored set: the same inputs draw the same resamples (as semimed report does).
    key = [seed, stats.test_set_key(pred)]
    reps = stats.metric_replicates(pred, [m for m in stats.BOOTSTRAP_METRICS if m in finite], key, n_boot)
    wanted = [m for m in RATIO_METRICS if m in finite]
    if wanted:
        # The same key and blocks as metric_replicates: the same patient resamples for every metric.
        block = stats.replicate_block(len(rows), len(patients), n_boot)
        counts = _ratio_counts(pred, thresholds)
        parts = [
            ratio_metrics(pred, counts, w, wanted)
            for w in stats.patient_counts(len(patients), n_boot, key, block)
        ]
        reps.update({m: np.concatenate([p[m] for p in parts]) for m in wanted})
    out = {}
    for metric, replicates in reps.items():
        interval = stats.seed_bootstrap(
            np.array([values[metric]]), replicates[None, :], n_boot, seed, shared_test_set=True
        )
        out[metric] = (interval.low, interval.high)
    return out


def _ratio_counts(pred, thresholds: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per patient and class [P, K]: positives, true positives, negatives, true negatives (one-vs-rest for a
    single-label task, per finding over known labels for a multi-label one)."""
    k = pred.scores.shape[1]
    if pred.multilabel:
        known = ~np.isnan(pred.y)
        truth = known & (pred.y == 1.0)
        called = pred.scores >= np.asarray(thresholds if thresholds is not None else np.full(k, 0.5))[None, :]
        negative = known & ~truth
    else:
        truth = pred.y[:, None] == np.arange(k)[None, :]
        called = pred.scores.argmax(axis=1)[:, None] == np.arange(k)[None, :]
        negative = ~truth
    masks = {"pos": truth, "tp": truth & called, "neg": negative, "tn": negative & ~called}
    out = {}
    for name, mask in masks.items():
        per = np.zeros((pred.n_patients, k))
        np.add.at(per, pred.patient, mask.astype(np.float64))
        out[name] = per
    return out


def ratio_metrics(
    pred, counts: dict[str, np.ndarray], weights: np.ndarray, metrics: Sequence[str]
) -> dict[str, np.ndarray]:
    """Sensitivity and specificity (binary: of the positive class; `_macro`: the mean over the classes where
    defined) under patient weights [b, P]: the registry's definitions with every image of a patient counted
    as often as its patient is drawn (weights of 1: the registry's values)."""
    w = np.asarray(weights, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        per = {
            "sensitivity": (w @ counts["tp"]) / (w @ counts["pos"]),
            "specificity": (w @ counts["tn"]) / (w @ counts["neg"]),
        }
    out = {}
    for metric in metrics:
        base = metric.removesuffix("_macro")
        if metric.endswith("_macro"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a class absent from a resample: NaN
                out[metric] = np.nanmean(per[base], axis=1)
        else:
            out[metric] = per[base][:, pred.positive]
    return out


def _predictions(external, rows, patient_ids, y, scores, classes, multilabel, step):
    """predictions.parquet's frame: a run's columns, labels and scores in the run's class order."""

    columns: dict[str, Any] = {"split": "test", "row": rows.astype(np.int64)}
    columns["path"] = external.meta["path"].astype(str).to_numpy()[rows]
    columns["patient_id"] = patient_ids
    if multilabel:
        columns.update({f"label/{c}": y[:, k].astype(np.float32) for k, c in enumerate(classes)})
    else:
        columns["label"] = y.astype(np.int64)
    columns.update({f"score/{c}": scores[:, k] for k, c in enumerate(classes)})
    columns["step"] = -1 if step is None else step
    return pd.DataFrame(columns)


def _write_parquet(frame, path: Path) -> None:

    staging = staging_path(path)
    try:
        frame.to_parquet(staging, index=False)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    publish(staging, path)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _report(described: dict[str, Any], run_metrics: dict[str, Any], run_dir: Path) -> str:
    """report.md: what was evaluated on what, and a table metric | value | 95% interval | the run's test."""
    metrics, ci = described["metrics"], described["ci95"]
    headline = [m for m in metrics if "/" not in m]
    rows = [m for m in ORDER if m in headline] + sorted(m for m in headline if m not in ORDER)
    positive = described["positive_class"]
    lines = [
        f"# External validation of {run_dir.name}",
        "",
        f"- run: `{described['run']}`, reported checkpoint: step {described['checkpoint_step']} "
        f"({described['reported_checkpoint'] or 'unknown'}; {described['evaluated_model'] or 'its network'})",
        f"- external data: {described['dataset']} (task {described['task']}) at `{described['root']}`, "
        f"options {json.dumps(described['options'], sort_keys=True)}; scored: {described['part']}",
        f"- {described['images']} images, {described['patients']} patients",
        f"- classes (the run's order): {', '.join(described['classes'])}"
        + (
            f" (the data's order: {', '.join(described['dataset_classes'])}, mapped by name)"
            if described["dataset_classes"] != described["classes"]
            else ""
        ),
        f"- positive class: {positive}" if positive else "- positive class: none (not a binary task)",
    ]
    if described["thresholds"]:
        shown = ", ".join(f"{k} {v:.3g}" for k, v in described["thresholds"].items())
        lines.append(f"- decision thresholds (the run's, chosen on val): {shown}")
    lines += [
        f"- intervals: {described['interval']} (patients resampled; — where a metric has no resampled form)",
        "",
        "| metric | value | 95% interval | the run's test |",
        "|---|---|---|---|",
    ]
    for m in rows:
        low, high = ci.get(m, (None, None))
        interval = "—" if low is None or high is None else f"{low:.4f} – {high:.4f}"
        own = run_metrics.get(f"test/{m}")
        lines.append(
            f"| {m} | {_fmt(metrics[m])} | {interval} | {_fmt(own if isinstance(own, int | float) else None)} |"
        )
    lines += ["", "Per-class values: metrics.json. Per-image scores: predictions.parquet.", ""]
    return "\n".join(lines)
