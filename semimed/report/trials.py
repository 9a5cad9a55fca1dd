"""Reading trial folders and deciding what is averaged with what: trials, studies, arms, cells, matched controls.

What is averaged with what (the flattened result keys of each trial's config, semimed.config.result_keys):
- A *study* is the trials that share every `data.*` key except `data.fraction` and `data.split_seed`: the same
  dataset, task, files, options, image size and split/validation protocol, hence the same kind of test set.
  Studies get separate sections and are never averaged or compared; a note names the keys that differ.
- An *arm* is the trials of a study that share every other result key (method, its params, model, training)
  except `seed`; a *cell* is an arm at one label fraction, its trials are its seeds. Arms are never merged: an
  arm's label is its method plus the keys that vary between the study's arms (`fixmatch(threshold=0.9)`).
- The *matched control* of an arm is the plain `supervised` arm (no method params, no pretraining) whose result
  keys equal the arm's except the method-side ones (`method.*`, `pretrain.*`, `model.pretrained*`,
  `train.unlabeled_ratio`).
"""

from __future__ import annotations

import json
import math
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from semimed import storage
from semimed.config import config_from_dict, load_yaml, result_keys
from semimed.errors import SemimedError, SemimedWarning

CONTROL = "supervised"
# What varies inside a cell (its seeds) or between an arm's cells (fractions).
NOT_A_CELL_KEY = ("seed", "data.split_seed", "data.fraction")
METHOD_SIDE = ("model.pretrained", "model.pretrained_checkpoint", "train.unlabeled_ratio")
ABSENT = '"(absent)"'


@dataclass
class Trial:
    name: str
    path: Path
    keys: dict[str, Any]  # flattened result keys of its config
    metrics: dict[str, Any]
    # run.json's code version (semimed's version, git commit, source hash, library versions); {}: unknown
    code: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.seed = int(self.keys.get("seed") or 0)
        self.fraction = float(self.keys.get("data.fraction", math.nan))
        split_seed = self.keys.get("data.split_seed")
        # What tells the seeds of a cell apart (and pairs an arm's seed with its control's).
        self.replicate = (self.seed, self.seed if split_seed is None else int(split_seed))
        self.multilabel = any(k.endswith("roc_auc_macro") for k in self.metrics)
        # Whose sensitivity, specificity, ... a binary trial reports: part of its study, so that trials with
        # different positive classes (or one run before data.positive_class, when it was class index 1) are
        # never averaged together. None for other tasks.
        self.positive = self.metrics.get("positive_class")
        if (
            self.positive is None
            and "positive_class" not in self.metrics
            and "test/sensitivity" in self.metrics
        ):
            self.positive = "class index 1 (a run from before data.positive_class)"
        # "selected" (on val) or "last"; runs older than the reported_checkpoint key: "selected" iff the
        # selected step is not the last one.
        kind, m = self.metrics.get("reported_checkpoint"), self.metrics
        if kind is None and m.get("selected_step") is not None and m.get("step") is not None:
            kind = "selected" if m["selected_step"] != m["step"] else "last"
        self.checkpoint = str(kind or "unknown")

    def value(self, column: str) -> float:
        value = self.metrics.get(column)
        return math.nan if value is None else float(value)


@dataclass
class TrialSet:
    trials: list[Trial]
    unfinished: list[str] = field(default_factory=list)  # trial folders without metrics.json
    skipped: list[str] = field(default_factory=list)  # "trial: why" for unreadable files
    root: Path = Path()  # the local folder the trials were read from (for a URI: a temporary copy)
    location: Path | Location = Path()  # the experiment as the user named it: a path or a storage URI

    def write_back(self) -> list[str]:
        """For an experiment on a storage URI: upload what the report wrote into `root` (everything but the
        copied `runs/`) next to the experiment's runs; returns what was uploaded. A path: nothing to do."""
        if not isinstance(self.location, Location):
            return []
        written = sorted(
            p for p in self.root.rglob("*") if p.is_file() and p.relative_to(self.root).parts[0] != "runs"
        )
        for path in written:
            storage.copy_file(path, storage.join(self.location, path.relative_to(self.root).as_posix()))
        return [p.relative_to(self.root).as_posix() for p in written]


class Location(str):
    """A storage URI as the report prints it, with a Path's `.name` (`s3://bucket/x/exp` -> `exp`)."""

    @property
    def name(self) -> str:
        return storage.name_of(self)


# What the report reads from each trial folder: all that is copied from a storage URI.
REPORT_INPUTS = ("metrics.json", "config.yaml", "split.json", "predictions.parquet", "run.json")
_COPIES: list[tempfile.TemporaryDirectory] = []  # kept until the process exits (Trial.path points into them)


def _local_copy(uri: str) -> Path:
    """The report's inputs of the experiment at a storage URI (pyarrow.fs), copied into a temporary folder
    with the same layout (`runs/<trial>/…`; a trial folder without them is still made: it is unfinished)."""
    if not storage.is_dir(uri):
        raise SemimedError(f"{uri}: experiment directory not found")
    runs = storage.list_files(storage.join(uri, "runs"))
    holder = tempfile.TemporaryDirectory(prefix="semimed-report-")
    _COPIES.append(holder)
    local = Path(holder.name)
    for rel in runs:
        (local / "runs" / rel.split("/")[0]).mkdir(parents=True, exist_ok=True)
    wanted = [rel for rel in runs if rel.count("/") == 1 and rel.split("/")[1] in REPORT_INPUTS]
    storage.download(storage.join(uri, "runs"), local / "runs", wanted)
    return local


def warn(message: str) -> None:
    """A RuntimeWarning that `semimed report` prints after its tables (stacklevel: the caller's caller)."""
    warnings.warn(f"semimed report: {message}", SemimedWarning, stacklevel=3)


def collect_trials(experiment_dir: str | Path) -> TrialSet:
    """Every trial folder under `runs/`: finished ones read, unfinished ones named, unreadable ones skipped
    (each with a warning that names it). No finished trial at all is an error.

    `experiment_dir` is a path or a storage URI (s3://…, gs://…: whatever pyarrow.fs opens, semimed.storage);
    a URI's trial files are read from a local copy of the few files the report needs (REPORT_INPUTS)."""
    if storage.is_uri(experiment_dir):
        location: Path | Location = Location(storage.normalize(experiment_dir))
        root = _local_copy(location)
    else:
        location = root = Path(experiment_dir).resolve()
        if not root.is_dir():
            raise SemimedError(f"{experiment_dir}: experiment directory not found")
    experiment_dir = location
    out = TrialSet([], root=root, location=location)
    for folder in sorted(p for p in root.glob("runs/*") if p.is_dir() and p.name[0] != "."):
        if not (folder / "metrics.json").is_file():
            out.unfinished.append(folder.name)
            continue
        try:
            metrics = json.loads((folder / "metrics.json").read_text())
            raw = load_yaml(folder / "config.yaml")  # duplicate keys and alias bombs refused, as for configs
            if not isinstance(metrics, dict) or not raw:  # an empty config.yaml is no run's config
                raise ValueError("not a mapping")
        except (OSError, ValueError, yaml.YAMLError) as exc:
            out.skipped.append(
                f"{folder.name}: unreadable metrics.json or config.yaml ({str(exc).splitlines()[0]})"
            )
            warn(f"skipping trial {out.skipped[-1]}")
            continue
        try:  # today's schema with its defaults, so that trials written before a key existed still match
            raw = config_from_dict(raw).to_dict()
        except (SemimedError, TypeError, ValueError):
            pass
        out.trials.append(Trial(folder.name, folder, result_keys(raw), metrics, code_version(folder)))
    if not out.trials:
        unfinished = f"; unfinished: {', '.join(out.unfinished)}" if out.unfinished else ""
        skipped = f"; skipped: {'; '.join(out.skipped)}" if out.skipped else ""
        raise SemimedError(
            f"{experiment_dir}: no finished trial (no runs/*/metrics.json){unfinished}{skipped}"
        )
    return out


def code_version(folder: Path) -> dict[str, Any]:
    """The code version a trial ran (`code` in its run.json); {} when run.json is missing or unreadable: the
    report then cannot tell that trial's code from another's, and says nothing about it."""
    try:
        code = json.loads((folder / "run.json").read_text()).get("code")
    except (OSError, ValueError, AttributeError):
        return {}
    return code if isinstance(code, dict) else {}


def canon(value: Any) -> str:
    """A key's value as canonical JSON: what trials are grouped by."""
    return json.dumps(value, sort_keys=True, default=str)


def show(canonical: str) -> str:
    """A canonical value as the tables print it: floats with %g, booleans as JSON, the rest as str."""
    value = json.loads(canonical)
    return (
        f"{value:g}"
        if isinstance(value, float)
        else json.dumps(value)
        if isinstance(value, bool)
        else str(value)
    )


def group_keys(trial: Trial, data: bool) -> dict[str, str]:
    """The trial's study keys (data=True) or arm keys (data=False), values canonical JSON."""
    items = trial.keys.items()
    keys = {k: canon(v) for k, v in items if k.startswith("data.") == data and k not in NOT_A_CELL_KEY}
    if data and trial.positive is not None:  # the class the run resolved, not "" (the dataset's default)
        keys["data.positive_class"] = canon(trial.positive)
    return keys


def _method_side(key: str) -> bool:
    return key.startswith(("method.", "pretrain.")) or key in METHOD_SIDE


def _varying(dicts: list[dict[str, str]]) -> list[str]:
    """Keys whose value (or presence) differs between the dicts."""
    return [k for k in sorted(set().union(*dicts)) if len({d.get(k, ABSENT) for d in dicts}) > 1]


def _arm_labels(arms: list[dict[str, str]]) -> list[str]:
    """Readable, unique labels: method (+pretrained) and the keys that vary between the arms; method-side keys
    only where they vary between arms of the same method."""
    varying = _varying(arms)
    short = {k: k.rsplit(".", 1)[-1] for k in varying}
    short = {k: s if list(short.values()).count(s) == 1 else k for k, s in short.items()}

    def label(arm: dict[str, str], everything: bool) -> str:
        name = json.loads(arm.get("method.name", '"?"')) + _start_label(arm)
        same = [a for a in arms if a.get("method.name") == arm.get("method.name")]
        shown = [
            f"{k if everything else short[k]}={show(arm[k])}"
            for k in varying
            if k in arm and arm[k] != "{}" and k not in ("method.name", "model.pretrained", "pretrain.method")
            # A method-side key shows where it varies among the arms of this method that set it.
            if everything or not _method_side(k) or len({a[k] for a in same if k in a}) > 1
        ]
        return name + (f"({', '.join(shown)})" if shown else "")

    labels = [label(a, False) for a in arms]
    return labels if len(set(labels)) == len(labels) else [label(a, True) for a in arms]


def _plain(arm: dict[str, str]) -> bool:
    """Trained from random weights: no timm weights, no checkpoint, no self-supervised pretraining."""
    return (
        arm.get("model.pretrained", "false") == "false"
        and arm.get("model.pretrained_checkpoint", '""') == '""'
        and arm.get("pretrain.method", '""') == '""'
    )


def _start_label(arm: dict[str, str]) -> str:
    """'' from random weights, '+simclr' after self-supervised pretraining, '+pretrained' from given weights."""
    pretrain = json.loads(arm.get("pretrain.method", '""'))
    if pretrain:
        return f"+{pretrain}"
    return "" if _plain(arm) else "+pretrained"


def is_control(arm: dict[str, str]) -> bool:
    """Whether arm keys (`group_keys(trial, data=False)`) are a plain supervised arm: a matched control."""
    params = any(k.startswith("method.params.") for k in arm)
    return arm.get("method.name") == canon(CONTROL) and not params and _plain(arm)


@dataclass
class Study:
    label: str
    data: dict[str, Any]  # its data keys
    multilabel: bool
    arms: dict[str, list[Trial]]  # arm label -> trials, controls first
    control: dict[str, str | None]  # arm label -> its matched control's label (None: no matched control)

    @property
    def fractions(self) -> list[float]:
        return sorted({t.fraction for trials in self.arms.values() for t in trials})


def _matched_controls(arms: dict[str, dict[str, str]]) -> dict[str, str | None]:
    """Each non-control arm -> the control arm with the same non-method-side keys (the same unlabeled_ratio
    preferred), or None."""
    out = {}
    for label, arm in arms.items():
        if is_control(arm):
            continue
        same = {k: v for k, v in arm.items() if not _method_side(k)}
        found = [
            c
            for c, a in arms.items()
            if is_control(a) and {k: v for k, v in a.items() if not _method_side(k)} == same
        ]
        ratio = [c for c in found if arms[c].get("train.unlabeled_ratio") == arm.get("train.unlabeled_ratio")]
        out[label] = (ratio or found or [None])[0]
    return out


def _study_labels(studies: list[dict[str, str]], differ: list[str]) -> list[str]:
    """The fewest differing keys (dataset, task, root first) that tell the studies apart, e.g. `dataset=breakhis`."""
    differ = sorted(
        differ, key=lambda k: (k not in ("data.dataset", "data.task", "data.root"), differ.index(k))
    )
    for count in range(1, len(differ) + 1):
        labels = [
            ", ".join(f"{k.removeprefix('data.')}={show(s[k])}" for k in differ[:count] if k in s)
            for s in studies
        ]
        if len(set(labels)) == len(labels) and all(labels):
            return labels
    return [f"study {i}" for i in range(1, len(studies) + 1)]


def group_studies(trials: list[Trial]) -> tuple[list[Study], str]:
    """Studies (see the module docstring) and a one-line note on what differs between them ("" for one)."""
    by_study: dict[tuple, list[Trial]] = {}
    for trial in trials:
        by_study.setdefault(tuple(group_keys(trial, data=True).items()), []).append(trial)
    differ = _varying([dict(k) for k in by_study])
    note = ""
    if len(by_study) > 1:
        common = [k for k in differ if all(k in dict(s) for s in by_study)]  # not dataset-specific options
        parts = [
            f"{k}: " + " vs ".join(sorted({show(dict(s).get(k, ABSENT)) for s in by_study}))
            for k in common or differ
        ]
        note = f"{len(by_study)} studies, reported separately and never averaged or compared: " + "; ".join(
            parts
        )
    labels = _study_labels([dict(k) for k in by_study], differ)
    studies = []
    for index, (key, members) in enumerate(by_study.items(), 1):
        by_arm: dict[tuple, list[Trial]] = {}
        for trial in members:
            by_arm.setdefault(tuple(group_keys(trial, data=False).items()), []).append(trial)
        arm_keys = dict(zip(_arm_labels([dict(k) for k in by_arm]), by_arm, strict=True))
        order = sorted(arm_keys, key=lambda label: (not is_control(dict(arm_keys[label])), label))
        arms = {label: by_arm[arm_keys[label]] for label in order}
        control = _matched_controls({label: dict(arm_keys[label]) for label in order})
        label = labels[index - 1] if len(by_study) > 1 else show(dict(key).get("data.dataset", '"all"'))
        data = {k: json.loads(v) for k, v in key}
        studies.append(Study(label, data, any(t.multilabel for t in members), arms, control))
    return sorted(studies, key=lambda s: s.label), note
