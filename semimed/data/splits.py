"""Splits as data: patient-disjoint train/val/test, then a nested, class-stratified labeled subset.

Everything here is a pure function of (dataset metadata, seed, fractions): randomness comes from an explicit
`np.random.Generator`, never global state, so the same seed gives a byte-identical split JSON.

Nesting: for one seed, each training image gets a fixed place in a per-class (single-label) or
rarest-finding-first (multi-label) priority order; the labeled set at fraction f is a prefix of that order
whose length grows with f. Hence labeled(1%) ⊂ labeled(5%) ⊂ … for the same seed, by construction.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from semimed.data.base import LabeledImageSet
from semimed.errors import SemimedError, SemimedWarning
from semimed.files import atomic_write_text

VAL_POLICIES = ("full", "fraction", "none")
PARTS = ("train", "val", "test", "labeled", "unlabeled")  # the lists of image paths a split holds


@dataclass(frozen=True)
class Split:
    """A saved split. Lists hold image paths relative to the dataset root (`"<split>:<index>"` for arrays)."""

    dataset: str
    task: str
    seed: int
    fraction: float
    val_policy: str
    train: list[str]
    val: list[str]
    test: list[str]
    labeled: list[str]
    unlabeled: list[str]
    classes: list[str]
    patients: dict[str, int] = field(default_factory=dict)  # split name -> number of patients
    protocol: str = ""
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    def save(self, path: str | Path) -> Path:
        """Write atomically (temporary name, then rename) so a crash never leaves half a split."""
        return atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Split:
        path = Path(path)
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SemimedError(f"{path}: cannot read split JSON ({exc})") from None
        missing = [
            k
            for k in ("dataset", "task", "seed", "fraction", "train", "val", "test", "labeled", "unlabeled")
            if k not in payload
        ]
        if missing:
            raise SemimedError(f"{path}: split JSON lacks key(s) {', '.join(missing)}")
        known = set(cls.__dataclass_fields__)
        # Keys beyond the documented nine are optional: a hand-written split JSON may leave them out.
        payload = {"val_policy": "full", "classes": [], **payload}
        split = cls(**{k: v for k, v in payload.items() if k in known})
        split.check_parts(path)
        return split

    def check_parts(self, source: str | Path) -> None:
        """Raise unless the parts are lists of distinct image paths, train/val/test are disjoint and labeled and
        unlabeled are disjoint parts of train. A hand-made split that lists test images in train would
        otherwise train on them and report a perfect test score; `source` (the file) is named in the error."""
        for name in PARTS:
            paths = getattr(self, name)
            if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
                raise SemimedError(f"{source}: split part {name!r} must be a list of image paths")
            seen: set[str] = set()
            for p in paths:
                if p in seen:
                    raise SemimedError(f"{source}: split part {name!r} lists image {p!r} twice")
                seen.add(p)
        sets = {name: set(getattr(self, name)) for name in PARTS}
        for first, second in (("train", "val"), ("train", "test"), ("val", "test"), ("labeled", "unlabeled")):
            shared = [p for p in getattr(self, second) if p in sets[first]]
            if shared:
                raise SemimedError(
                    f"{source}: split parts {first!r} and {second!r} share {len(shared)} image(s), "
                    f"e.g. {shared[0]!r}; they must be disjoint"
                )
        for name in ("labeled", "unlabeled"):
            outside = [p for p in getattr(self, name) if p not in sets["train"]]
            if outside:
                raise SemimedError(
                    f"{source}: split part {name!r} has {len(outside)} image(s) not in 'train', "
                    f"e.g. {outside[0]!r}; labeled and unlabeled images are part of train"
                )

    def check_patients(self, dataset: LabeledImageSet, source: str | Path) -> None:
        """Raise unless every image of the split is in `dataset` and no patient has images in two of
        train/val/test (a patient's images are near-duplicates: seen in training, they inflate test scores).
        For a dataset without patient ids (MedMNIST: one image, one patient) this is `check_parts`' check."""
        row_of = {path: i for i, path in enumerate(dataset.meta["path"])}
        patients = dataset.patients.astype(str).tolist()  # str, not np.str_: quoted plainly in messages
        # patient -> (the first part it is seen in, an image of it there)
        part_of: dict[str, tuple[str, str]] = {}
        for name in PARTS:
            missing = [p for p in getattr(self, name) if p not in row_of]
            if missing:
                raise SemimedError(
                    f"{source}: split part {name!r} names {len(missing)} image(s) absent from the dataset at "
                    f"{dataset.root}, e.g. {missing[0]!r}"
                )
        for name in ("train", "val", "test"):
            for p in getattr(self, name):
                patient = patients[row_of[p]]
                first, image = part_of.setdefault(patient, (name, p))
                if first != name:
                    raise SemimedError(
                        f"{source}: patient {patient!r} has images in both split parts {first!r} ({image!r}) "
                        f"and {name!r} ({p!r}); train/val/test must be patient-disjoint"
                    )

    def indices(self, dataset: LabeledImageSet) -> dict[str, np.ndarray]:
        """Row indices into `dataset` for each of train/val/test/labeled/unlabeled."""
        row_of = {path: i for i, path in enumerate(dataset.meta["path"])}
        out = {}
        for name in PARTS:
            paths = getattr(self, name)
            missing = [p for p in paths if p not in row_of]
            if missing:
                raise SemimedError(
                    f"split {name!r} names {len(missing)} image(s) absent from the dataset, e.g. {missing[0]!r}"
                )
            out[name] = np.array([row_of[p] for p in paths], dtype=np.int64)
        return out


def _patient_strata(dataset: LabeledImageSet) -> tuple[np.ndarray, np.ndarray]:
    """Unique patients and, for each, the stratum used to balance patients across splits.

    Single-label: the patient's most frequent class (a BreakHis patient has one subtype). Multi-label: one
    stratum for all (patients carry many findings; random patient assignment is unbiased).
    """
    patients, inverse = np.unique(dataset.patients.astype(str), return_inverse=True)
    if dataset.multilabel:
        return patients, np.zeros(len(patients), dtype=np.int64)
    counts = np.zeros((len(patients), dataset.num_classes), dtype=np.int64)
    np.add.at(counts, (inverse, dataset.labels), 1)
    return patients, counts.argmax(axis=1)


def split_patients(
    dataset: LabeledImageSet, rng: np.random.Generator, test_fraction: float, val_fraction: float
) -> dict[str, np.ndarray]:
    """Patient-disjoint train/val/test row indices, stratified by each patient's class.

    `test_fraction` of the patients go to test (BreakHis: 0.3, as in Spanhol et al. 2016), then
    `val_fraction` of the remaining patients to val. Within each stratum at least one patient stays in train.
    If the dataset ships an official split, it is used instead: its test set as is, and val carved from its
    train patients when it has no val.
    """
    patient_of_row = dataset.patients.astype(str)
    if dataset.official_split is not None:
        official = np.asarray(dataset.official_split).astype(str)
        rows = {name: np.flatnonzero(official == name) for name in ("train", "val", "test")}
        if len(rows["val"]) == 0 and val_fraction > 0:
            train_patients = np.unique(patient_of_row[rows["train"]])
            n_val = _round_half_up(val_fraction * len(train_patients))
            val_patients = rng.permutation(train_patients)[:n_val]
            is_val = np.isin(patient_of_row[rows["train"]], val_patients)
            rows["val"], rows["train"] = rows["train"][is_val], rows["train"][~is_val]
        return rows
    for name, value in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0 <= value < 1:
            raise SemimedError(f"data.{name}={value} must be in [0, 1)")
    patients, strata = _patient_strata(dataset)
    assignment: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for stratum in np.unique(strata):
        members = rng.permutation(patients[strata == stratum])
        n_test = min(_round_half_up(test_fraction * len(members)), len(members) - 1)
        n_val = min(_round_half_up(val_fraction * (len(members) - n_test)), len(members) - n_test - 1)
        assignment["test"] += list(members[:n_test])
        assignment["val"] += list(members[n_test : n_test + n_val])
        assignment["train"] += list(members[n_test + n_val :])
    return {name: np.flatnonzero(np.isin(patient_of_row, group)) for name, group in assignment.items()}


def labeled_priority(
    label_matrix: np.ndarray, multilabel: bool, rng: np.random.Generator
) -> list[np.ndarray]:
    """Priority orders over the rows of `label_matrix` [N, K] (0/1, NaN unknown).

    Single-label: one random order per class. Multi-label: a single order that starts with one random
    positive of each finding, rarest finding first (skipping findings already covered), then the remaining
    rows at random — so every finding with positives is labeled at any fraction, and the rest is a uniform
    (hence stratified in expectation) sample.
    """
    known = np.nan_to_num(label_matrix, nan=0.0) > 0.5
    if not multilabel:
        classes = known.argmax(axis=1)
        return [rng.permutation(np.flatnonzero(classes == k)) for k in range(label_matrix.shape[1])]
    order: list[int] = []
    chosen = np.zeros(len(label_matrix), dtype=bool)
    for finding in np.argsort(known.sum(axis=0), kind="stable"):
        if known[:, finding].any() and not (known[:, finding] & chosen).any():
            pick = int(rng.choice(np.flatnonzero(known[:, finding])))
            order.append(pick)
            chosen[pick] = True
    order += list(rng.permutation(np.flatnonzero(~chosen)))
    return [np.array(order, dtype=np.int64)]


def labeled_subset(
    label_matrix: np.ndarray,
    fraction: float,
    rng: np.random.Generator,
    classes: list[str],
    multilabel: bool,
    strict: bool = True,
) -> np.ndarray:
    """Row positions (into `label_matrix`) of the labeled subset at `fraction`; nested across fractions.

    Single-label: round(fraction × n_c) images of each class c. A class that would get 0 raises, naming the
    class and the smallest fraction that works (strict=False takes 1 instead). Multi-label: round(fraction × N)
    images, and at least one positive of every finding that has positives.
    """
    if not 0 < fraction <= 1:
        raise SemimedError(f"label fraction {fraction} must be in (0, 1]")
    orders = labeled_priority(label_matrix, multilabel, rng)
    if multilabel:
        (order,) = orders
        n_seed = int((np.nan_to_num(label_matrix, nan=0.0) > 0.5).any(axis=0).sum())
        return np.sort(order[: max(n_seed, _round_half_up(fraction * len(order)))])
    picked = []
    for cls, order in zip(classes, orders, strict=True):
        take = _round_half_up(fraction * len(order))
        if take == 0 and len(order) > 0:
            if strict:
                # round(f·n) >= 1  <=>  f >= 0.5 / n, so the smallest class sets the bound.
                # Printed rounded UP (to 4 decimals), so that the value shown is itself accepted.
                smallest = math.ceil(0.5 / min(len(o) for o in orders if len(o) > 0) * 1e4) / 1e4
                raise SemimedError(
                    f"label fraction {fraction} gives class {cls!r} 0 of its {len(order)} training images; "
                    f"the smallest fraction that labels every class is {smallest:g}"
                )
            take = 1
        picked.append(order[:take])
    return np.sort(np.concatenate(picked)).astype(np.int64)


def _round_half_up(value: float) -> int:
    # Python's round() rounds half to even (round(2.5) == 2); half-up keeps counts monotone and unsurprising.
    return int(np.floor(value + 0.5 + 1e-9))


def make_split(
    dataset: LabeledImageSet,
    fraction: float,
    seed: int,
    test_fraction: float = 0.3,
    val_fraction: float = 0.15,
    val_policy: str = "full",
) -> Split:
    """Patient-disjoint split plus the labeled subset at `fraction`, deterministic in `seed`.

    Two independent generators derived from `seed` draw the patient split and the labeled priority, so a
    different fraction never changes which patients are in test.
    """
    if not 0 < fraction <= 1:
        raise SemimedError(f"label fraction {fraction} must be in (0, 1]")
    if val_policy not in VAL_POLICIES:
        raise SemimedError(f"unknown val_policy {val_policy!r}; valid: {', '.join(VAL_POLICIES)}")
    patient_rng, label_rng, val_rng = (np.random.default_rng([seed, stream]) for stream in (0, 1, 2))
    rows = split_patients(dataset, patient_rng, test_fraction, val_fraction)
    matrix = dataset.stratify_labels()
    notes: list[str] = list(dataset.notes)
    train_known = np.nan_to_num(matrix[rows["train"]], nan=0.0) > 0.5
    absent = [c for c, present in zip(dataset.classes, train_known.any(axis=0), strict=True) if not present]
    if absent:
        message = f"no positive training image for: {', '.join(absent)}"
        if not dataset.multilabel:
            raise SemimedError(f"{dataset.name}: {message} (too few patients to split)")
        warnings.warn(message, SemimedWarning, stacklevel=2)
        notes.append(message)
    labeled = rows["train"][
        labeled_subset(matrix[rows["train"]], fraction, label_rng, dataset.classes, dataset.multilabel)
    ]
    unlabeled = np.setdiff1d(rows["train"], labeled)
    val = rows["val"]
    if val_policy == "fraction" and len(val):
        val = val[
            labeled_subset(matrix[val], fraction, val_rng, dataset.classes, dataset.multilabel, strict=False)
        ]
    elif val_policy == "none":
        val = val[:0]
    paths = dataset.meta["path"].to_numpy().astype(str)
    patients = dataset.patients.astype(str)
    return Split(
        dataset=dataset.name,
        task=dataset.task,
        seed=int(seed),
        fraction=float(fraction),
        val_policy=val_policy,
        train=paths[rows["train"]].tolist(),
        val=paths[val].tolist(),
        test=paths[rows["test"]].tolist(),
        labeled=paths[labeled].tolist(),
        unlabeled=paths[unlabeled].tolist(),
        classes=list(dataset.classes),
        patients={
            name: int(len(np.unique(patients[idx])))
            for name, idx in (("train", rows["train"]), ("val", val), ("test", rows["test"]))
        },
        protocol="official"
        if dataset.official_split is not None
        else f"patient-disjoint random, test {test_fraction:g} / val {val_fraction:g} of patients",
        warnings=notes,
    )


def summarize(split: Split, dataset: LabeledImageSet) -> list[dict[str, object]]:
    """Rows of (split, class, patients, images) — the table `semimed split` prints."""
    index = split.indices(dataset)
    matrix = np.nan_to_num(dataset.stratify_labels(), nan=0.0) > 0.5
    patients = dataset.patients.astype(str)
    rows = []
    for name in ("train", "val", "test", "labeled", "unlabeled"):
        idx = index[name]
        for k, cls in enumerate(dataset.classes):
            members = idx[matrix[idx, k]]
            rows.append(
                {
                    "split": name,
                    "class": cls,
                    "patients": len(np.unique(patients[members])),
                    "images": len(members),
                }
            )
    return rows
