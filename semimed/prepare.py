"""`semimed prepare DATASET --root PATH --size S --out DIR`: decode every image once into the cache a run reads.

The dataset is loaded through the same `load_dataset(DataConfig)` a training run uses, so the cache written
under DIR is exactly the one a run with `data.cache_dir=DIR` (and the same dataset, root, view/magnification,
drop_missing and image_size) finds. Runs whose rows are a subset (one view, one magnification) read it too.

What it checks and reports:
- rows whose image file is missing (ChestX-ray14): the loader stops with the count and the first names, or with
  --drop-missing drops them; the count is recorded in the manifest (`missing_dropped`);
- the totals against the full release (BreakHis 7,909 images / 82 patients, ChestX-ray14 112,120 / 30,805,
  MedMNIST per-split counts for the known files), saying what is missing, per class or split;
- corrupt or zero-byte images: listed in the manifest (`bad_rows`) and skipped; a training split that includes
  one fails with a message naming it (experiment.build_run).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semimed.config import DataConfig
from semimed.data import load_dataset
from semimed.data.base import LabeledImageSet
from semimed.data.cache import cache_folder, load_pixels, read_manifest, verify_cache
from semimed.errors import SemimedError

# BreakHis release (Spanhol et al. 2016, Table 1): images per subtype and magnification, patients per subtype.
BREAKHIS_IMAGES = {
    "adenosis": (114, 113, 111, 106),
    "fibroadenoma": (253, 260, 264, 237),
    "phyllodes_tumor": (109, 121, 108, 115),
    "tubular_adenoma": (149, 150, 140, 130),
    "ductal_carcinoma": (864, 903, 896, 788),
    "lobular_carcinoma": (156, 170, 163, 137),
    "mucinous_carcinoma": (205, 222, 196, 169),
    "papillary_carcinoma": (145, 142, 135, 138),
}  # (40X, 100X, 200X, 400X)
BREAKHIS_PATIENTS = {
    "adenosis": 4,
    "fibroadenoma": 10,
    "phyllodes_tumor": 3,
    "tubular_adenoma": 7,
    "ductal_carcinoma": 38,
    "lobular_carcinoma": 5,
    "mucinous_carcinoma": 9,
    "papillary_carcinoma": 6,
}
BREAKHIS_TOTAL_IMAGES, BREAKHIS_TOTAL_PATIENTS = 7_909, 82
_MAGNIFICATIONS = (40, 100, 200, 400)


@dataclass
class PrepareResult:
    folder: Path
    manifest: dict[str, Any]
    reused: bool  # an existing complete cache was found (nothing decoded)
    lines: list[str] = field(default_factory=list)  # what the CLI prints


def check_totals(dataset: LabeledImageSet, data_cfg: DataConfig) -> dict[str, Any]:
    """Compare the dataset with the full release: {"expected", "found", "complete", "missing": [lines]}.

    A filtered load (one view or magnification) is compared with the release filtered the same way where the
    release's breakdown is known, and otherwise only reported.
    """
    found = {"images": len(dataset), "patients": int(len(set(dataset.patients.astype(str))))}
    missing: list[str] = []
    expected: dict[str, int] | None = None
    if dataset.name == "breakhis":
        magnification = str(data_cfg.magnification).strip().lower().removesuffix("x")
        columns = list(range(4)) if magnification == "all" else [_MAGNIFICATIONS.index(int(magnification))]
        expected = {
            "images": int(sum(sum(v[c] for c in columns) for v in BREAKHIS_IMAGES.values())),
            "patients": BREAKHIS_TOTAL_PATIENTS,
        }
        meta = dataset.meta
        for subtype, counts in BREAKHIS_IMAGES.items():
            have = meta[meta["subtype"] == subtype]
            want_images = sum(counts[c] for c in columns)
            have_patients = have["patient_id"].nunique()
            if len(have) < want_images or have_patients < BREAKHIS_PATIENTS[subtype]:
                missing.append(
                    f"{subtype}: {len(have)} of {want_images} images, {have_patients} of "
                    f"{BREAKHIS_PATIENTS[subtype]} patients"
                )
        if magnification == "all":
            for c, mag in enumerate(_MAGNIFICATIONS):
                want = sum(v[c] for v in BREAKHIS_IMAGES.values())
                have = int((meta["magnification"] == mag).sum())
                if have < want:
                    missing.append(f"{mag}X: {have} of {want} images")
    elif dataset.name == "chestxray14":
        from semimed.data.chestxray14 import TOTAL_IMAGES, TOTAL_PATIENTS

        dropped = int(dataset.meta.attrs.get("missing_dropped", 0))
        if str(data_cfg.view).lower() == "all":
            expected = {"images": TOTAL_IMAGES, "patients": TOTAL_PATIENTS}
        if dropped:
            missing.append(
                f"{dropped} rows of {dataset.meta.attrs.get('metadata', 'the metadata')} have no image "
                "under root (dropped: --drop-missing)"
            )
    elif dataset.name == "medmnist":
        from semimed.data.medmnist import KNOWN_COUNTS, SPLITS

        known = KNOWN_COUNTS.get(dataset.task)
        if known is not None:
            expected = {"images": int(sum(known)), "patients": int(sum(known))}
            for split, want in zip(SPLITS, known, strict=True):
                have = int((dataset.official_split == split).sum())
                if have != want:
                    missing.append(f"{split}: {have} images, the release has {want}")
    complete = (
        expected is not None
        and not missing
        and found["images"] >= expected["images"]
        and found["patients"] >= expected["patients"]
    )
    if expected is not None and not complete and not missing:
        missing.append(
            f"{found['images']} of {expected['images']} images, {found['patients']} of "
            f"{expected['patients']} patients"
        )
    return {"expected": expected, "found": found, "complete": bool(complete), "missing": missing}


def prepare(
    dataset: str,
    root: str | Path,
    size: int,
    out: str | Path,
    *,
    task: str = "",
    view: str = "all",
    magnification: str = "all",
    drop_missing: bool = False,
    workers: int | None = None,
    rebuild: bool = False,
    download: bool = False,
    progress: bool = True,
) -> PrepareResult:
    """Build (or find, or resume) the cache of `dataset` at `size` under `out`; see the module docstring."""
    if size < 8:
        raise SemimedError(f"prepare: --size {size} is too small (at least 8 pixels)")
    root = Path(root).expanduser()
    if dataset == "medmnist" and download and not root.exists():
        from semimed.data.medmnist import download_medmnist, medmnist_flag, medmnist_size

        fetched = download_medmnist(medmnist_flag(root), root.parent, medmnist_size(root))
        if fetched.resolve() != root.resolve():
            raise SemimedError(f"prepare: downloaded {fetched}, not {root}; pass --root {fetched}")
    data_cfg = DataConfig(
        dataset=dataset,
        root=str(root),
        task=task or DataConfig.task,
        magnification=str(magnification),
        view=view,
        image_size=size,
        cache_dir=str(out),
        drop_missing=drop_missing,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_dataset(data_cfg)
    # Loader warnings are printed below with the result (most are also dataset notes: printed once).
    loader_warnings = [str(w.message) for w in caught if str(w.message) not in data.notes]
    totals = check_totals(data, data_cfg)
    folder = cache_folder(data, size, out)
    existing = None if rebuild else read_manifest(folder)
    decoded = load_pixels(
        data,
        size,
        out,
        workers,
        wait_for_lock=False,
        progress=progress,
        rebuild=rebuild,
        extra_manifest={
            "prepared_by": "semimed prepare",
            "totals": totals,
            "loader": {"view": view, "magnification": str(magnification), "drop_missing": drop_missing},
        },
    )
    reused = existing is not None and decoded.path == folder
    manifest = decoded.manifest
    lines = [
        f"{data.name}/{data.task}: {len(data)} images, {totals['found']['patients']} patients, "
        f"{size}px, {data.channels} channel(s)"
    ]
    if totals["expected"] is not None:
        state = "complete" if totals["complete"] else "INCOMPLETE"
        lines.append(
            f"release totals: {totals['expected']['images']} images / {totals['expected']['patients']} "
            f"patients -> {state}"
        )
    for item in totals["missing"]:
        lines.append(f"missing: {item}")
    if decoded.path != folder:
        lines.append(f"a cache of a superset of these rows already exists: {decoded.path} (runs read it)")
    elif reused:
        problems = verify_cache(folder)
        lines.append(
            "cache already complete" + ("" if not problems else f"; PROBLEMS: {'; '.join(problems)}")
        )
    else:
        resumed = manifest.get("resumed_rows", 0)
        lines.append(
            f"decoded {len(data) - resumed} image(s) in {manifest.get('decode_seconds', 0):.1f} s with "
            f"{manifest.get('workers')} worker(s)" + (f" (resumed: {resumed} done before)" if resumed else "")
        )
    bad = sorted(decoded.bad_rows.items())
    if bad:
        lines.append(
            f"{len(bad)} image(s) could not be decoded and are listed in the manifest (bad_rows); "
            f"a split that includes one will refuse to train. First: {bad[0][1]}"
        )
    lines += [f"warning: {message}" for message in loader_warnings]
    lines += [f"note: {note}" for note in data.notes]
    lines.append(f"cache: {decoded.path}")
    lines.append(f"use it with: data.cache_dir={Path(out).expanduser().resolve()} data.image_size={size}")
    return PrepareResult(folder=Path(decoded.path or folder), manifest=manifest, reused=reused, lines=lines)
