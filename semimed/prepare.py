"""`semimed prepare DATASET --root PATH --size S --out DIR`: decode every image once into the cache a run reads.

The dataset is loaded through the same `load_dataset(DataConfig)` a training run uses, so the cache written
under DIR is exactly the one a run with `data.cache_dir=DIR` (and the same dataset, root, data.options and
image_size) finds. Runs whose rows are a subset (one view, one magnification) read it too.

What it checks and reports:
- rows whose image file is missing (ChestX-ray14): the loader stops with the count and the first names, or with
  --drop-missing drops them; the count is recorded in the manifest (`missing_dropped`);
- the totals against the full release, as the dataset's spec declares them (`DatasetSpec.release` and
  `check_release`: BreakHis 7,909 images / 82 patients, ChestX-ray14 112,120 / 30,805, MedMNIST per-split
  counts of the known files), saying what is missing, per class, magnification or split;
- corrupt or zero-byte images: listed in the manifest (`bad_rows`) and skipped; a training split that includes
  one fails with a message naming it (experiment.build_run).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semimed.config import DataConfig
from semimed.data import dataset_spec, load_dataset
from semimed.data.base import LabeledImageSet
from semimed.data.cache import cache_folder, load_pixels, read_manifest, verify_cache
from semimed.errors import SemimedError


@dataclass
class PrepareResult:
    folder: Path
    manifest: dict[str, Any]
    reused: bool  # an existing complete cache was found (nothing decoded)
    lines: list[str] = field(default_factory=list)  # what the CLI prints


def check_totals(dataset: LabeledImageSet, data_cfg: DataConfig) -> dict[str, Any]:
    """Compare the dataset with the full release: {"expected", "found", "complete", "missing": [lines]}.

    The comparison is the dataset spec's `check_release`: a filtered load (one view or magnification) is compared
    with the release filtered the same way where the release's breakdown is known, and otherwise only reported.
    """
    spec = dataset_spec(data_cfg.dataset)
    if dataset.name != spec.name:
        raise SemimedError(f"check_totals: a {dataset.name} dataset with a {spec.name} data config")
    found = {"images": len(dataset), "patients": int(len(set(dataset.patients.astype(str))))}
    expected, missing = spec.check_release(dataset, spec.make_options(data_cfg.options))
    missing = list(missing)
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
    workers: int | None = None,
    rebuild: bool = False,
    download: bool = False,
    progress: bool = True,
    **options: Any,
) -> PrepareResult:
    """Build (or find, or resume) the cache of `dataset` at `size` under `out`; see the module docstring.

    `options` are the dataset's own (`data.options`: magnification=..., view=..., drop_missing=...), checked
    against its options dataclass like a config's.
    """
    if size < 8:
        raise SemimedError(f"prepare: --size {size} is too small (at least 8 pixels)")
    spec = dataset_spec(dataset)
    root = Path(root).expanduser()
    if download:
        if spec.fetch is None:
            raise SemimedError(f"prepare: --download is not available for {dataset} (download it by hand)")
        if not root.exists():
            fetched = spec.fetch(root)
            if fetched.resolve() != root.resolve():
                raise SemimedError(f"prepare: downloaded {fetched}, not {root}; pass --root {fetched}")
    data_cfg = DataConfig(
        dataset=dataset, root=str(root), task=task, options=options, image_size=size, cache_dir=str(out)
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
            "loader": {"task": data_cfg.task, **data_cfg.options},
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
