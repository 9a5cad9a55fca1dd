"""`write_demo`: the synthetic BreakHis tree and ChestX-ray14 release under one folder, idempotently.

A marker file (`.demo_complete`, `.demo_in_progress`) records the parameters of the run that wrote the folder, so
a repeated call does nothing and a call with other parameters replaces only the folders this function wrote.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from semimed.data.breakhis import TUMOR_TYPES
from semimed.data.demo.breakhis import write_breakhis
from semimed.data.demo.chestxray14 import write_chestxray14
from semimed.data.demo.common import atomic_write
from semimed.errors import SemimedError

# Bump when the generator's output changes, so an old completed marker no longer counts as up to date.
DEMO_FORMAT_VERSION = 1
_COMPLETE = ".demo_complete"
_IN_PROGRESS = ".demo_in_progress"


def write_demo(
    out_dir: str | Path,
    seed: int = 0,
    *,
    breakhis_patients: int = 32,
    images_per_patient_per_mag: int = 6,
    chest_patients: int = 120,
    image_size: int = 64,
) -> dict[str, Path]:
    """Write the synthetic BreakHis tree and ChestX-ray14 release under `out_dir`; return their roots.

    Returns {"breakhis": <out>/breakhis, "chestxray14": <out>/chestxray14}. Idempotent: a completed run with the
    same parameters is detected from `<out>/.demo_complete` and nothing is rewritten. A run with other parameters
    (or an interrupted one) replaces the two dataset folders it owns; folders it did not write are never touched.
    """
    if breakhis_patients < len(TUMOR_TYPES):
        raise SemimedError(
            f"write_demo: breakhis_patients={breakhis_patients} < 8, the 8 subtypes need one each"
        )
    if images_per_patient_per_mag < 1:
        raise SemimedError(
            f"write_demo: images_per_patient_per_mag={images_per_patient_per_mag} must be >= 1"
        )
    if chest_patients < 10:
        raise SemimedError(
            f"write_demo: chest_patients={chest_patients} < 10, too few for a train/test split"
        )
    if image_size < 16:
        raise SemimedError(f"write_demo: image_size={image_size} < 16, too small to draw the class patterns")
    if seed < 0:
        raise SemimedError(f"write_demo: seed={seed} must be >= 0")

    out = Path(out_dir)
    params = {
        "format": DEMO_FORMAT_VERSION,
        "seed": int(seed),
        "breakhis_patients": int(breakhis_patients),
        "images_per_patient_per_mag": int(images_per_patient_per_mag),
        "chest_patients": int(chest_patients),
        "image_size": int(image_size),
    }
    roots = {"breakhis": out / "breakhis", "chestxray14": out / "chestxray14"}
    complete, in_progress = out / _COMPLETE, out / _IN_PROGRESS
    if _read_marker(complete) == params:
        return roots

    # Only folders this function wrote (a marker says so) are deleted: stale images from a run with more
    # patients would otherwise be indexed by the loaders alongside the new ones.
    owned = complete.exists() or in_progress.exists()
    for folder in roots.values():
        if folder.exists():
            if not owned:
                raise SemimedError(
                    f"{folder}: exists and was not written by write_demo; choose an empty folder"
                )
            shutil.rmtree(folder)
    out.mkdir(parents=True, exist_ok=True)
    complete.unlink(missing_ok=True)
    atomic_write(in_progress, _marker_text(params))

    write_breakhis(roots["breakhis"], seed, breakhis_patients, images_per_patient_per_mag, image_size)
    write_chestxray14(roots["chestxray14"], seed, chest_patients, image_size)

    atomic_write(complete, _marker_text(params))
    in_progress.unlink(missing_ok=True)
    return roots


def _marker_text(params: dict) -> bytes:
    return (json.dumps(params, indent=1, sort_keys=True) + "\n").encode()


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
