"""Typed, frozen run configuration: YAML in, dotted `key=value` overrides, unknown keys are errors.

The resolved config is saved beside every run (timm's habit), so a number can always be traced back to the
settings that produced it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, get_type_hints

import yaml

from semimed.errors import SemimedError

# Keys that say where or how a run executes, not what it computes. They may differ between a run and its resume,
# they are left out of a run's fingerprint, and `semimed report` does not split trials by them. A dotted prefix
# ("scaling") covers its whole section. Everything else (data, model, method, budget, schedule, seed, amp,
# evaluation interval) determines the result.
OPERATIONAL_KEYS = (
    "name",
    "output_dir",
    "data.cache_dir",
    "data.split_file",  # the split's content is fingerprinted, not the file's path
    "train.device",
    "train.loader_workers",
    "train.checkpoint_every",
    "train.compile",  # the same computation, compiled (float rounding may differ in the last bits)
    "scaling",
)
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"


def choices(*names: str, default: str) -> Any:
    """A str field whose value must be one of `names` (checked whenever a config is built)."""
    return field(default=default, metadata={"choices": names})


def check_device(name: str, key: str = "train.device") -> None:
    """Raise, naming `key`, unless `name` (auto | cpu | cuda | cuda:N) is a device this machine has. Called
    where the process that trains or predicts starts, before anything is written: not at config load, since a
    config may be written on a laptop for a GPU machine (and a Ray worker gets its device from Ray)."""
    if not re.fullmatch(DEVICE_PATTERN, name):
        raise SemimedError(f"unknown {key} {name!r}; valid: auto, cpu, cuda, cuda:N")
    if not name.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise SemimedError(
            f"{key}={name} but no CUDA device is available (torch.cuda.is_available() is False); "
            f"use {key}=cpu or auto"
        )
    index, count = int(name.partition(":")[2] or 0), torch.cuda.device_count()
    if index >= count:
        raise SemimedError(
            f"{key}={name} but this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}"
        )


def _select_metric_names() -> tuple[str, ...]:
    from semimed.metrics import SELECTABLE_METRICS

    return ("", *SELECTABLE_METRICS)


def _check_choices(section: Any, where: str) -> None:
    """Raise for a str field outside its closed set, naming the key and the valid values (a typo such as
    select_metric=balanced_acc would otherwise silently select nothing)."""
    for item in dataclasses.fields(section):
        valid = item.metadata.get("choices")
        if valid is None:
            continue
        valid = valid() if callable(valid) else valid
        value = getattr(section, item.name)
        if value not in valid:
            shown = ", ".join(v if v else '"" (default)' for v in valid)
            raise SemimedError(f"unknown {where}.{item.name} {value!r}; valid: {shown}")


_INTERVAL = re.compile(r"([\[(])\s*([^,\s]+)\s*,\s*([^,\s\])]+)\s*([\])])")


@functools.cache
def _interval(text: str) -> tuple[float, float, bool, bool]:
    """The bounds of an interval and whether each is included: "[1, inf)" -> (1.0, inf, True, False)."""
    match = _INTERVAL.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not an interval: {text!r}")
    opening, low, high, closing = match.groups()
    return float(low), float(high), opening == "[", closing == "]"


def in_interval(value: float, interval: str) -> bool:
    """Whether `value` lies in `interval` ("[0, 1)", "(0, inf)", …). NaN lies in none; inf only in one
    that includes it."""
    low, high, with_low, with_high = _interval(interval)
    value = float(value)
    return (low < value or (with_low and value == low)) and (value < high or (with_high and value == high))


def describe_interval(interval: str) -> str:
    """An interval in words: "[1, inf)" -> ">= 1", "(0, inf)" -> "> 0", "[0, 1)" -> "in [0, 1)"."""
    low, high, with_low, _ = _interval(interval)
    if math.isinf(high) and not math.isinf(low):
        return f"{'>=' if with_low else '>'} {int(low) if low.is_integer() else low}"
    return f"in {interval}"


def check_range(value: Any, interval: str, key: str) -> None:
    """Raise, naming `key` and the value, unless the number `value` (each number, for a list) lies in
    `interval`. Values that are no numbers are left to the type checks."""
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue
        if not in_interval(item, interval):
            where = f"{key}={value!r}" + (f": {item!r}" if items is value else "")
            finite = "" if math.isfinite(item) else "a finite number "
            raise SemimedError(f"{where} must be {finite}{describe_interval(interval)}")


def _check_ranges(section: Any, where: str) -> None:
    """Each numeric field named in the section's RANGES lies in its interval (a step count of -5 or a NaN
    learning rate fails at load, naming the key, not mid-run)."""
    for name, interval in type(section).RANGES.items():
        check_range(getattr(section, name), interval, f"{where}.{name}" if where else name)


# Seeds reach numpy (non-negative only) and torch.manual_seed (< 2^64); 2^32 is the usual convention.
SEED_RANGE = "[0, 4294967296)"
# The smallest data.image_size: the default backbone (small_cnn, three 2x poolings) needs 8 px, and so
# does any texture or augmentation to speak of; larger backbones need more, which build_run checks.
MIN_IMAGE_SIZE = 8


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "breakhis"  # a name in semimed.data.DATASETS: breakhis | chestxray14 | medmnist
    root: str = ""  # dataset root (a folder, or the .npz file for medmnist)
    task: str = ""  # one of the dataset's tasks; "" = its default (breakhis: binary)
    # A binary task's positive (disease) class by name; "" = the dataset's declared one (BreakHis and BreastMNIST:
    # malignant; PneumoniaMNIST: pneumonia). Its sensitivity, specificity, precision, F1, ROC-AUC and AP are the
    # headline metrics. Required for a two-class dataset that declares none; an error for other tasks.
    positive_class: str = ""
    # The dataset's own loader options (breakhis: magnification; chestxray14: view, drop_missing), checked against
    # its options dataclass and saved with every default filled in (semimed/data/spec.py).
    options: dict[str, Any] = field(default_factory=dict)
    image_size: int = 64
    fraction: float = 0.1  # share of the training images that keep their labels
    split_seed: int | None = None  # None: the run's seed (BreakHis' 5 repeats are 5 split seeds)
    test_fraction: float = 0.3  # of patients, when the dataset has no official split (Spanhol et al. 2016)
    val_fraction: float = 0.15  # of the remaining training patients
    val_policy: str = choices("full", "fraction", "none", default="full")  # docs/study-protocol.md rule 7
    split_file: str = ""  # use a saved split JSON instead of drawing one
    cache_dir: str = ""  # decode-once cache; "" = ~/.cache/semimed
    # Where the training views are built: cpu = per image in the data loader; cuda = per batch on the training
    # device (per-sample parameters, RandAugment magnitudes sampled per call; on a CPU-only run the same batched
    # code runs on the CPU). A result key: the two draw different augmentations (semimed/data/augment.py).
    augment_device: str = choices("cpu", "cuda", default="cpu")

    RANGES: ClassVar[dict[str, str]] = {
        "image_size": f"[{MIN_IMAGE_SIZE}, inf)",
        "fraction": "(0, 1]",
        "split_seed": SEED_RANGE,
        "test_fraction": "[0, 1)",
        "val_fraction": "[0, 1)",
    }

    def __post_init__(self) -> None:
        _check_choices(self, "data")
        _check_ranges(self, "data")
        task, options = resolve_dataset(self.dataset, self.task, self.options)
        # Resolved in place (a frozen dataclass allows it only here), so the saved config says what ran.
        object.__setattr__(self, "task", task)
        object.__setattr__(self, "options", options)


# Keys that moved, and where to: a config or override that still uses one is told the new spelling.
MOVED_KEYS = {
    "data.magnification": "data.options.magnification",
    "data.view": "data.options.view",
    "data.drop_missing": "data.options.drop_missing",
}


def resolve_dataset(dataset: str, task: str, options: Any) -> tuple[str, dict[str, Any]]:
    """(task, options) of a data section, checked against the dataset's registered spec: "" -> the default
    task; options typed and complete (defaults filled in). Raises naming data.dataset, data.task or
    data.options.<key> and the valid values."""
    # Here, not at the top: semimed.data imports this module (and pandas); configs that are never built
    # do not pay for it.
    from semimed.data import dataset_spec

    spec = dataset_spec(dataset)
    task = task or spec.default_task
    if task not in spec.tasks:
        raise SemimedError(
            f"unknown data.task {task!r} for dataset {spec.name!r}; valid: {', '.join(spec.tasks)} "
            f'(or "" for {spec.default_task})'
        )
    return task, check_options(spec.options, options, "data.options", f"dataset {spec.name!r}")


def check_options(cls: type, values: Any, where: str, owner: str) -> dict[str, Any]:
    """`values` checked against the options dataclass `cls` like a config section (unknown keys, types,
    choices), returned as a complete dict."""
    if not isinstance(values, dict):
        raise SemimedError(f"{where}: expected a mapping, got {type(values).__name__}")
    valid = [item.name for item in dataclasses.fields(cls)]
    for key in values:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SemimedError(
                f"unknown option {where}.{key} for {owner}{hint}; valid: {', '.join(valid) or 'none'}"
            )
    built = _build(cls, values, where)
    _check_choices(built, where)
    return dataclasses.asdict(built)


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "small_cnn"
    pretrained: bool = False
    pretrained_checkpoint: str = ""
    drop_rate: float = 0.0

    RANGES: ClassVar[dict[str, str]] = {"drop_rate": "[0, 1)"}

    def __post_init__(self) -> None:
        _check_ranges(self, "model")


@dataclass(frozen=True)
class MethodConfig:
    name: str = "supervised"
    # Method-specific keyword arguments (threshold, lambda_u, ...), checked against the method's signature.
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 500  # the budget is in optimizer steps, not epochs (docs/study-protocol.md rule 5)
    batch_size: int = 32  # labeled images per step (global, across workers)
    unlabeled_ratio: int = 1  # mu: unlabeled images per labeled image, for SSL methods
    optimizer: str = choices("adam", "adamw", "sgd", default="adamw")
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = choices("constant", "cosine", "step", default="cosine")
    warmup_steps: int = 0
    milestones: list[float] = field(
        default_factory=lambda: [0.5, 0.75]
    )  # step schedule, as fractions of steps
    grad_clip: float = 0.0  # 0 = off
    ema: float = 0.0  # decay of an EMA of the weights that is evaluated instead of them (e.g. 0.999); 0 = off
    amp: str = choices("off", "bf16", "fp16", default="off")
    channels_last: bool = False
    eval_every: int = 100
    checkpoint_every: int = 100
    # The metric on val that picks the reported checkpoint; "" = roc_auc.
    select_metric: str = field(default="", metadata={"choices": _select_metric_names})
    loader_workers: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # The labeled view: weak (the matched-control default) or none (the MedMNIST v2 protocol).
    augment: str = choices("weak", "none", default="weak")
    # torch.compile the trained networks (after a resume's state is loaded). Pays on a GPU for large networks;
    # on CPU the compile costs more than it saves for small ones (docs/benchmarks.md).
    compile: bool = False

    RANGES: ClassVar[dict[str, str]] = {
        "steps": "[1, inf)",
        "batch_size": "[1, inf)",
        "unlabeled_ratio": "[1, inf)",
        "lr": "(0, inf)",
        "weight_decay": "[0, inf)",
        "momentum": "[0, 1)",
        "warmup_steps": "[0, inf)",
        "milestones": "(0, 1)",  # fractions of train.steps
        "grad_clip": "[0, inf)",
        "eval_every": "[1, inf)",
        "checkpoint_every": "[1, inf)",
        "loader_workers": "[0, inf)",
    }

    def __post_init__(self) -> None:
        _check_choices(self, "train")
        _check_ranges(self, "train")
        if not 0.0 <= self.ema < 1.0:
            raise SemimedError(f"train.ema={self.ema} must be in [0, 1) (0 = off)")
        if not re.fullmatch(DEVICE_PATTERN, self.device):
            raise SemimedError(f"unknown train.device {self.device!r}; valid: auto, cpu, cuda, cuda:N")


@dataclass(frozen=True)
class PretrainConfig:
    """Self-supervised pretraining of the backbone on the training split's images (never labels, never val or
    test) before this run; cached by fingerprint, so one pretraining serves every label fraction of a seed."""

    method: str = ""  # "" = none; a method that reads no labels: simclr | byol
    steps: int = 500
    batch_size: int = 64
    lr: float = 1e-3
    params: dict[str, Any] = field(default_factory=dict)  # the method's hyperparameters (temperature, ...)

    RANGES: ClassVar[dict[str, str]] = {"steps": "[1, inf)", "batch_size": "[1, inf)", "lr": "(0, inf)"}

    def __post_init__(self) -> None:
        _check_ranges(self, "pretrain")


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 1  # Ray Train workers (DDP ranks); 0 = a sweep trial trains in-process (no Train)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # fractions pack several trials on one GPU
    max_failures: int = 1  # Ray Train restarts of a failed worker group; it resumes from its last checkpoint

    RANGES: ClassVar[dict[str, str]] = {
        "num_workers": "[0, inf)",
        "cpus_per_worker": "(0, inf)",
        "gpus_per_worker": "[0, inf)",
    }

    def __post_init__(self) -> None:
        _check_ranges(self, "scaling")


@dataclass(frozen=True)
class Config:
    name: str = ""  # the run's folder under output_dir; "" = <method>-<dataset>-<time>-<hash> (a new run)
    seed: int = 0
    output_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)

    RANGES: ClassVar[dict[str, str]] = {"seed": SEED_RANGE}

    def __post_init__(self) -> None:
        _check_ranges(self, "")

    @property
    def split_seed(self) -> int:
        return self.seed if self.data.split_seed is None else self.data.split_seed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        from semimed.files import atomic_write_text

        return atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise SemimedError(f"{where or 'config'}: expected a mapping, got {type(values).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{where}.{key}" if where else key
        if key not in fields:
            if dotted in MOVED_KEYS:
                raise SemimedError(f"config key {dotted!r} is now {MOVED_KEYS[dotted]!r}")
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SemimedError(f"unknown config key {dotted!r}{hint}; valid: {', '.join(sorted(fields))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, dotted)
        else:
            kwargs[key] = _coerce(value, hint, dotted)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check (and gently convert) a scalar against its annotation, so typos fail at load, not mid-run."""
    text = str(hint)
    if value is None:
        if "None" in text:
            return None
        raise SemimedError(f"config key {where!r} must not be empty")
    if text.startswith("dict[") and not isinstance(value, dict):  # method.params=3: else it fails mid-run
        raise SemimedError(f"{where}: expected a mapping, got {type(value).__name__}")
    try:
        if hint is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise TypeError
            return value
        if hint is int or text == "int | None":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if hint is str:
            if isinstance(value, (dict, list)):
                raise TypeError
            return str(value)
        if text.startswith("list[float]"):
            if not isinstance(value, list) or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) for v in value
            ):
                raise TypeError
            return [float(v) for v in value]
        if text.startswith("list[str]"):
            # A dataset option's names (class names, label columns): a YAML list, or "A,B" from a CLI flag or an
            # override (`data.options.label_columns=A,B` parses as one string). Numbers in a list become text.
            if isinstance(value, str):
                return [part.strip() for part in value.split(",") if part.strip()]
            if not isinstance(value, list) or any(
                v is None or isinstance(v, (bool, dict, list)) for v in value
            ):
                raise TypeError
            return [str(v).strip() for v in value]
    except (TypeError, ValueError, OverflowError):
        kind = getattr(hint, "__name__", text)
        raise SemimedError(f"config key {where!r}: {value!r} is not a valid {kind}") from None
    return value


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> {dotted key: value}, down to the leaves (`method.params.threshold` included)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def is_operational(dotted: str) -> bool:
    return any(dotted == key or dotted.startswith(key + ".") for key in OPERATIONAL_KEYS)


def result_keys(values: dict[str, Any]) -> dict[str, Any]:
    """The flattened config without its operational keys: what determines a run's result. Without a
    pretraining method, the pretraining recipe's other keys determine nothing and are left out too."""
    flat = flatten(values)
    idle_pretrain = not flat.get("pretrain.method")
    return {
        k: v
        for k, v in sorted(flat.items())
        if not is_operational(k) and not (idle_pretrain and k.startswith("pretrain."))
    }


def config_from_dict(values: dict[str, Any]) -> Config:
    return _build(Config, values, "")


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=3e-4` -> ("train.lr", 3e-4); the value is parsed as YAML (numbers, bools, lists)."""
    if "=" not in text:
        raise SemimedError(f"override {text!r} must look like key=value (e.g. train.steps=200)")
    key, raw = text.split("=", 1)
    try:  # the same loader as files: a one-line alias bomb (`x=[&a [1, 1], ...]`) is refused here too
        value = load_yaml_text(raw) if raw.strip() else ""
    except (yaml.YAMLError, SemimedError) as exc:
        # PyYAML's problem ("expected ',' or ']'"), not its first line, which is often only the context.
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SemimedError(f"override {text!r}: invalid value ({problem})") from None
    if isinstance(value, str):
        # YAML 1.1 reads `1e-3` (no dot) as a string; on a command line it means a number.
        try:
            if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") and "_" not in value:
                value = float(value)
        except ValueError:
            pass
    return key.strip(), value


def apply_overrides(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a nested dict copy. `method.params.threshold` reaches into the params dict."""
    out = _deep_copy(values)
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SemimedError(f"override {dotted!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return out


def _deep_copy(values: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in values.items()}


# A run config holds about a hundred values and a large search space a few thousand. Anchors and aliases are
# allowed (a shared params block), but what they expand to is capped: PyYAML builds a 400-byte "billion laughs"
# file as a small graph of shared lists, and the first deep copy, flatten or dump of the config then walks
# 10^9 values (minutes and gigabytes) before anything is checked.
MAX_YAML_VALUES = 100_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


class ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses, before building any value, a key given twice in one mapping (PyYAML keeps
    the last silently: a second `train:` block would replace the first) and aliases that expand to more than
    MAX_YAML_VALUES values or refer to themselves. Raises SemimedError (without the file name)."""

    def get_single_data(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        _check_nodes(node)
        return self.construct_document(node)


def _check_nodes(root: yaml.Node) -> None:
    """Count the values `root` expands to (aliases once per use), memoized per node so that the count itself is
    linear in the file; check each mapping's keys for duplicates on the way."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node, where: str) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise SemimedError(f"{_shown(where)} refers to itself through an alias")
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            first_line: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:  # `<<: *defaults`: merged keys may be overridden, by design
                    total += size(value_node, where)
                    continue
                name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                dotted = f"{where}.{name}" if where else str(name)
                if isinstance(key_node, yaml.ScalarNode):
                    line, ident = key_node.start_mark.line + 1, (key_node.tag, key_node.value)
                    if ident in first_line:
                        raise SemimedError(
                            f"duplicate key {dotted!r} at line {line} (first at line {first_line[ident]})"
                        )
                    first_line[ident] = line
                total += size(key_node, where) + size(value_node, dotted)
                if total > MAX_YAML_VALUES:
                    break
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                total += size(item, f"{where}[{index}]")
                if total > MAX_YAML_VALUES:
                    break
        if total > MAX_YAML_VALUES:
            raise SemimedError(
                f"{_shown(where)} expands to more than {MAX_YAML_VALUES:,} values through YAML "
                "aliases (*name); a config needs a few hundred: write the values out"
            )
        open_nodes.discard(key)
        sizes[key] = total
        return total

    size(root, "")


def _shown(where: str) -> str:
    return f"key {where!r}" if where else "the document"


def load_yaml_text(text: str) -> Any:
    """YAML text -> Python values through ConfigLoader (duplicate keys and alias bombs refused)."""
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - ConfigLoader is a SafeLoader


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A config or search-space file as a dict; every problem is a one-line SemimedError naming the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SemimedError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")  # -sig: a byte-order mark some Windows editors write is fine
    except UnicodeDecodeError as exc:
        raise SemimedError(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); save it as UTF-8"
        ) from None
    try:
        loaded = load_yaml_text(text)
    except yaml.YAMLError as exc:
        # The problem and where it is ("found character '\t' that cannot start any token", line 2), not
        # PyYAML's first line alone, which is often just its context ("while scanning for the next token").
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise SemimedError(f"{path}: invalid YAML{where} ({problem})") from None
    except SemimedError as exc:
        raise SemimedError(f"{path}: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise SemimedError(f"{path}: expected a mapping at the top level")
    return loaded


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    values = load_yaml(path) if path else {}
    pairs = dict(parse_override(item) for item in overrides or [])
    try:
        return config_from_dict(apply_overrides(values, pairs))
    except SemimedError as exc:
        raise SemimedError(f"{path}: {exc}" if path else str(exc)) from None
