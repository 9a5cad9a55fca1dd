"""Synthetic demo data written IN THE REAL ON-DISK FORMATS, so the real loaders (not special demo code) read it.

    <out>/breakhis/BreaKHis_v1/histology_slides/breast/<benign|malignant>/SOB/<subtype>/SOB_<B|M>_<T>_<yy>-<id>/<mag>X/
        SOB_<B|M>_<T>-<yy>-<id>-<mag>-<seq>.png                         RGB, image_size x image_size
    <out>/chestxray14/Data_Entry_2017_v2020.csv, train_val_list.txt, test_list.txt,
        images_001/images/<patient:08d>_<followup:03d>.png, images_002/images/…  8-bit grayscale

The pictures are cartoons, but they carry a learnable, class-dependent signal under nuisance variation, so that
accuracy-versus-label-count curves have a shape (not flat at chance, not 100% from ten images):

- BreakHis: dark-purple "nuclei" on a pink stroma. Malignant tissue has more and larger nuclei (Poisson count and
  lognormal radius, both shifted), so the dark-pixel fraction is about twice the benign one on average, with
  overlap; subtypes differ a little in nucleus shape (elongation), clustering, colour and extras (mucin pools,
  gland lumens). Nuisance: a per-patient stain colour and nucleus density (images of one patient look alike,
  which is why splits must be patient-disjoint), magnification-dependent scale, lymphocytes, background texture,
  brightness/contrast jitter and pixel noise; every blob sits at a random position.
- ChestX-ray14: a lung-shaped radiograph cartoon; each of the 14 findings draws its own pattern in its own
  region (a large round opacity for Mass, a small one for Nodule, a bright meniscus at a lung base for Effusion,
  a wide heart for Cardiomegaly, …) at a random place, size and side, on per-patient anatomy with noise.

Determinism: every random draw comes from `np.random.default_rng` seeded from (seed, stream, indices), so the
same seed gives byte-identical files, and one image's pixels do not depend on how many others were written.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from semimed.data.breakhis import MAGNIFICATIONS, TUMOR_TYPES
from semimed.data.chestxray14 import FINDINGS
from semimed.errors import SemimedError

# Bump when the generator's output changes, so an old completed marker no longer counts as up to date.
DEMO_FORMAT_VERSION = 1
_COMPLETE = ".demo_complete"
_IN_PROGRESS = ".demo_in_progress"

# Independent random streams (the second entropy word): metadata draws never shift pixel draws and vice versa.
_BH_META, _BH_PATIENT, _BH_IMAGE, _CX_META, _CX_PATIENT, _CX_IMAGE = range(6)

# The demo writes the findings the loader reads, in its documented order.
CHEST_FINDINGS: list[str] = FINDINGS
# Per-image prevalence among all images, roughly the NIH release's (Infiltration 17.7%, … Hernia 0.2%); Hernia is
# raised a little and every finding is topped up to _MIN_POSITIVES so that each class can be evaluated.
_CHEST_PREVALENCE = np.array(
    [0.10, 0.03, 0.12, 0.18, 0.055, 0.06, 0.015, 0.05, 0.045, 0.025, 0.025, 0.02, 0.035, 0.006]
)
_NO_FINDING_RATE = 0.5
_MIN_POSITIVES = 3
# The NIH header names two columns with one bracketed name each, so rows have 11 fields under 9 names.
CHEST_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)

# Nucleus appearance per tumour type at 100X on a 64-pixel image: mean count, mean radius (px), elongation
# (major/minor axis), clustering (share of nuclei placed around a few centres), hue tweak added to the stain.
# Malignant: about 1.6x the count and 1.3x the radius of benign, i.e. about 2.5x the nuclear area on average.
_SUBTYPE_STYLE: dict[str, dict[str, float]] = {
    "A": {"count": 8.0, "radius": 2.1, "elong": 1.4, "cluster": 0.6, "hue": 0.00},
    "F": {"count": 6.5, "radius": 2.0, "elong": 2.0, "cluster": 0.2, "hue": 0.04},
    "PT": {"count": 9.0, "radius": 2.2, "elong": 1.7, "cluster": 0.3, "hue": -0.03},
    "TA": {"count": 8.0, "radius": 2.1, "elong": 1.1, "cluster": 0.8, "hue": 0.02},
    "DC": {"count": 13.0, "radius": 2.8, "elong": 1.2, "cluster": 0.5, "hue": 0.00},
    "LC": {"count": 15.0, "radius": 2.5, "elong": 1.0, "cluster": 0.0, "hue": -0.04},
    "MC": {"count": 10.0, "radius": 2.9, "elong": 1.1, "cluster": 0.7, "hue": 0.05},
    "PC": {"count": 12.0, "radius": 2.8, "elong": 1.5, "cluster": 0.4, "hue": -0.02},
}
_STROMA_RGB = np.array([235.0, 172.0, 205.0])
_NUCLEUS_RGB = np.array([88.0, 45.0, 128.0])
_MUCIN_RGB = np.array([200.0, 205.0, 235.0])


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
    _atomic_write(in_progress, _marker_text(params))

    _write_breakhis(roots["breakhis"], seed, breakhis_patients, images_per_patient_per_mag, image_size)
    _write_chestxray14(roots["chestxray14"], seed, chest_patients, image_size)

    _atomic_write(complete, _marker_text(params))
    in_progress.unlink(missing_ok=True)
    return roots


# --------------------------------------------------------------------------------------------------- file helpers


def _marker_text(params: dict) -> bytes:
    return (json.dumps(params, indent=1, sort_keys=True) + "\n").encode()


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _atomic_write(path: Path, data: bytes) -> None:
    """Temporary hidden name, then rename: a crash leaves no half-written file under a real name."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_png(path: Path, pixels: np.ndarray) -> None:
    buffer = io.BytesIO()
    # PIL writes no timestamp chunks by default, so equal pixels give equal bytes.
    Image.fromarray(pixels).save(buffer, format="PNG")
    _atomic_write(path, buffer.getvalue())


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ drawing helpers


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish low-frequency noise [size, size]: a cells x cells grid, bilinearly upsampled."""
    grid = rng.standard_normal((cells, cells))
    # Interpolation matrix M [size, cells]: out = M @ grid @ M.T is separable bilinear upsampling.
    position = np.linspace(0.0, cells - 1.0, size)
    low = np.minimum(np.floor(position).astype(int), cells - 2)
    frac = position - low
    matrix = np.zeros((size, cells))
    matrix[np.arange(size), low] = 1.0 - frac
    matrix[np.arange(size), low + 1] = frac
    return matrix @ grid @ matrix.T


def _ellipses(
    xs: np.ndarray,
    ys: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    theta: np.ndarray,
    edge: float,
) -> np.ndarray:
    """Soft masks [K, H, W] of K rotated ellipses; `edge` is the blur width in the units of xs/ys."""
    dx = xs[None] - cx[:, None, None]
    dy = ys[None] - cy[:, None, None]
    cos, sin = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    u = (dx * cos + dy * sin) / a[:, None, None]
    v = (-dx * sin + dy * cos) / b[:, None, None]
    distance = np.sqrt(u * u + v * v)  # 1 on the rim
    # Scale the rim blur by the semi-minor axis so small and large ellipses get the same edge width.
    return np.clip((1.0 - distance) * b[:, None, None] / edge + 0.5, 0.0, 1.0)


def _one_ellipse(xs, ys, cx, cy, a, b, theta=0.0, edge=0.01) -> np.ndarray:
    return _ellipses(xs, ys, *(np.array([value], dtype=float) for value in (cx, cy, a, b, theta)), edge)[0]


# ------------------------------------------------------------------------------------------------------- BreakHis


def _breakhis_patients(seed: int, count: int) -> list[tuple[str, str]]:
    """(tumor type, patient number like '14-22549AB') per patient; every subtype gets count // 8 or more."""
    rng = np.random.default_rng([seed, _BH_META])
    codes = list(TUMOR_TYPES)
    numbers = rng.choice(np.arange(1000, 40000), size=count, replace=False)
    years = rng.choice(["13", "14", "15"], size=count, p=[0.1, 0.8, 0.1])
    suffixes = ["", "", "", "", "", "", "AB", "CD", "EF", "E", "F", "G"]
    patients = []
    for index in range(count):
        suffix = suffixes[rng.integers(len(suffixes))]
        patients.append([codes[index % len(codes)], str(years[index]), str(numbers[index]), suffix])
    if count > len(codes):
        # As in the real release (14-22549AB / 14-22549CD): two patients share a number and differ by suffix,
        # which only the patient folder name keeps apart.
        patients[len(codes)][1:] = [patients[0][1], patients[0][2], "CD"]
        patients[0][3] = "AB"
    return [(code, f"{year}-{number}{suffix}") for code, year, number, suffix in patients]


def _write_breakhis(root: Path, seed: int, n_patients: int, per_mag: int, size: int) -> None:
    breast = root / "BreaKHis_v1" / "histology_slides" / "breast"
    ys, xs = np.mgrid[0:size, 0:size].astype(float) + 0.5
    for p_index, (code, patient) in enumerate(_breakhis_patients(seed, n_patients)):
        tumor_class, subtype = TUMOR_TYPES[code]
        letter = "B" if tumor_class == "benign" else "M"
        folder = breast / tumor_class / "SOB" / subtype / f"SOB_{letter}_{code}_{patient}"
        style = _SUBTYPE_STYLE[code]
        stain_rng = np.random.default_rng([seed, _BH_PATIENT, p_index])
        stain = {
            "stroma": _STROMA_RGB * np.exp(stain_rng.normal(0.0, 0.08, 3)),
            "nucleus": _NUCLEUS_RGB
            * np.exp(stain_rng.normal(0.0, 0.12, 3) + style["hue"] * np.array([1, -1, 0])),
            "density": float(np.exp(stain_rng.normal(0.0, 0.25))),
            "scale": float(np.exp(stain_rng.normal(0.0, 0.08))),
        }
        for mag in MAGNIFICATIONS:
            mag_dir = folder / f"{mag}X"
            mag_dir.mkdir(parents=True, exist_ok=True)
            for seq in range(1, per_mag + 1):
                rng = np.random.default_rng([seed, _BH_IMAGE, p_index, mag, seq])
                pixels = _histology_image(rng, xs, ys, size, code, style, stain, mag)
                _write_png(mag_dir / f"SOB_{letter}_{code}-{patient}-{mag}-{seq:03d}.png", pixels)


def _histology_image(rng, xs, ys, size, code, style, stain, mag) -> np.ndarray:
    """One RGB tile [size, size, 3] uint8."""
    area_scale = (size / 64.0) ** 2
    # Higher magnification: fewer, larger nuclei; the nuclear area fraction stays about the same, so the class
    # signal survives at every magnification but its look changes (40X: 0.76x radius, 400X: 1.5x).
    zoom = (mag / 100.0) ** 0.3 * stain["scale"] * size / 64.0
    image = np.broadcast_to(stain["stroma"], (size, size, 3)).copy()
    image *= 1.0 + 0.07 * _smooth_noise(rng, size, 6)[..., None]
    image += 6.0 * _smooth_noise(rng, size, 12)[..., None] * np.array([1.0, 1.5, 0.8])

    # Pale areas (gland lumens, fat; mucin pools in mucinous carcinoma): bright, so they do not add dark pixels.
    n_pale = rng.poisson(3.0 if code == "MC" else 1.2)
    if n_pale:
        masks = _ellipses(
            xs,
            ys,
            rng.uniform(0, size, n_pale),
            rng.uniform(0, size, n_pale),
            rng.uniform(0.06, 0.16, n_pale) * size,
            rng.uniform(0.04, 0.1, n_pale) * size,
            rng.uniform(0, np.pi, n_pale),
            1.5,
        ).max(axis=0)[..., None]
        pale = _MUCIN_RGB if code == "MC" else np.array([245.0, 235.0, 240.0])
        image = image * (1 - 0.8 * masks) + pale * 0.8 * masks

    # Nuclei: the class signal. Count and radius come from the subtype, scaled per patient and per image.
    density = stain["density"] * float(np.exp(rng.normal(0.0, 0.2)))
    count = rng.poisson(style["count"] * density * area_scale * ((mag / 100.0) ** -0.6))
    lymphocytes = rng.poisson(4.0 * area_scale)  # small, round, dark, in both classes: noise for the signal
    cx, cy = rng.uniform(0, size, count), rng.uniform(0, size, count)
    clustered = rng.random(count) < style["cluster"]
    if clustered.any():
        centres = rng.uniform(0.15 * size, 0.85 * size, (rng.integers(1, 4), 2))
        which = rng.integers(len(centres), size=int(clustered.sum()))
        cx[clustered] = centres[which, 0] + rng.normal(0, 0.12 * size, len(which))
        cy[clustered] = centres[which, 1] + rng.normal(0, 0.12 * size, len(which))
    radius = style["radius"] * zoom * np.exp(rng.normal(0.0, 0.25, count))
    elong = np.sqrt(style["elong"] * np.exp(rng.normal(0.0, 0.15, count)))
    lymph_r = rng.uniform(0.8, 1.2, lymphocytes) * size / 64.0
    cx = np.concatenate([cx, rng.uniform(0, size, lymphocytes)])
    cy = np.concatenate([cy, rng.uniform(0, size, lymphocytes)])
    a = np.concatenate([radius * elong, lymph_r])
    b = np.concatenate([radius / elong, lymph_r])
    if len(a):
        masks = _ellipses(xs, ys, cx, cy, a, b, rng.uniform(0, np.pi, len(a)), 1.0)
        shade = rng.uniform(0.8, 1.15, len(a))[:, None, None]
        coverage = 1.0 - np.prod(1.0 - 0.92 * masks, axis=0)
        weight = masks.sum(axis=0)
        tone = np.where(weight > 0, (masks * shade).sum(axis=0) / np.maximum(weight, 1e-9), 1.0)
        nucleus = stain["nucleus"] * tone[..., None]
        image = image * (1 - coverage[..., None]) + nucleus * coverage[..., None]

    # Acquisition jitter: brightness and contrast per image, then sensor noise.
    mean = image.mean()
    image = (image - mean) * rng.uniform(0.85, 1.15) + mean * rng.uniform(0.95, 1.05)
    image += rng.normal(0.0, 4.0, image.shape)
    return _to_uint8(image)


# -------------------------------------------------------------------------------------------------- ChestX-ray14


def _chest_metadata(seed: int, n_patients: int) -> list[dict]:
    """One dict per image: patient, follow-up, findings, age, gender, view, original size and spacing."""
    rng = np.random.default_rng([seed, _CX_META])
    # Given "not No Finding", each finding is drawn with prevalence / (1 - No Finding rate).
    conditional = np.minimum(_CHEST_PREVALENCE / (1.0 - _NO_FINDING_RATE), 0.9)

    def draw() -> set[str]:
        if rng.random() < _NO_FINDING_RATE:
            return set()
        chosen = {name for name, q in zip(CHEST_FINDINGS, conditional, strict=True) if rng.random() < q}
        return chosen or {CHEST_FINDINGS[rng.choice(len(CHEST_FINDINGS), p=conditional / conditional.sum())]}

    rows = []
    for patient in range(1, n_patients + 1):
        n_images = min(int(rng.geometric(0.3)), 15)  # mean 3.3, about 30% of patients with a single image
        age = int(np.clip(rng.normal(47, 17), 2, 92))
        gender = "M" if rng.random() < 0.56 else "F"
        findings: set[str] = set()
        for followup in range(n_images):
            # Follow-ups usually show what the previous image showed: findings are correlated within a patient.
            findings = set(findings) if followup and rng.random() < 0.6 else draw()
            age += int(rng.random() < 0.3)
            view = "PA" if rng.random() < 0.6 else "AP"
            rows.append(
                {
                    "patient": patient,
                    "followup": followup,
                    "findings": findings,
                    "age": age,
                    "gender": gender,
                    "view": view,
                    "width": int(rng.integers(2000, 3057)),
                    "height": int(rng.integers(2000, 3057)),
                    "spacing": float(rng.choice([0.143, 0.139, 0.168, 0.171])),
                }
            )
    # Rare findings (Hernia: 0.2% in the release) might not appear at all in a few hundred images; top each up to
    # _MIN_POSITIVES so every finding has an AUC.
    for name in CHEST_FINDINGS:
        lacking = [row for row in rows if name not in row["findings"]]
        missing = _MIN_POSITIVES - (len(rows) - len(lacking))
        if missing > 0:
            for pick in rng.choice(len(lacking), size=missing, replace=False):
                lacking[pick]["findings"] = lacking[pick]["findings"] | {name}
    return rows


def _write_chestxray14(root: Path, seed: int, n_patients: int, size: int) -> None:
    rows = _chest_metadata(seed, n_patients)
    names = [f"{row['patient']:08d}_{row['followup']:03d}.png" for row in rows]

    lines = [CHEST_HEADER]
    for name, row in zip(names, rows, strict=True):
        labels = "|".join(f for f in CHEST_FINDINGS if f in row["findings"]) or "No Finding"
        lines.append(
            f"{name},{labels},{row['followup']},{row['patient']},{row['age']},{row['gender']},{row['view']},"
            f"{row['width']},{row['height']},{row['spacing']!r},{row['spacing']!r}"
        )
    root.mkdir(parents=True, exist_ok=True)
    _atomic_write(root / "Data_Entry_2017_v2020.csv", ("\n".join(lines) + "\n").encode())

    # Official lists: patient-disjoint, about 80/20, names sorted, no trailing newline (as in the release).
    split_rng = np.random.default_rng([seed, _CX_META, 1])
    order = split_rng.permutation(np.arange(1, n_patients + 1))
    test_patients = set(order[: max(1, round(0.2 * n_patients))].tolist())
    test = [name for name, row in zip(names, rows, strict=True) if row["patient"] in test_patients]
    train_val = [name for name, row in zip(names, rows, strict=True) if row["patient"] not in test_patients]
    _atomic_write(root / "train_val_list.txt", "\n".join(train_val).encode())
    _atomic_write(root / "test_list.txt", "\n".join(test).encode())

    # The NIH release unpacks to images_001/images/, images_002/images/, … in name order.
    half = (len(names) + 1) // 2
    ys, xs = (np.mgrid[0:size, 0:size].astype(float) + 0.5) / size
    anatomy: dict = {}
    for index, (name, row) in enumerate(zip(names, rows, strict=True)):
        folder = root / ("images_001" if index < half else "images_002") / "images"
        folder.mkdir(parents=True, exist_ok=True)
        if row["patient"] not in anatomy:
            anatomy = {
                row["patient"]: _chest_anatomy(np.random.default_rng([seed, _CX_PATIENT, row["patient"]]))
            }
        rng = np.random.default_rng([seed, _CX_IMAGE, row["patient"], row["followup"]])
        pixels = _chest_image(rng, xs, ys, size, anatomy[row["patient"]], row["findings"], row["view"])
        _write_png(folder / name, pixels)


def _chest_anatomy(rng: np.random.Generator) -> dict:
    """Per-patient body shape, so one patient's follow-ups look alike."""
    return {
        "shift": rng.normal(0.0, 0.02, 2),
        "scale": float(np.exp(rng.normal(0.0, 0.05))),
        "lung": float(rng.normal(55.0, 6.0)),
        "tissue": float(rng.normal(110.0, 8.0)),
        "heart": float(np.exp(rng.normal(0.0, 0.06))),
        "rib_phase": float(rng.uniform(0, 2 * np.pi)),
    }


def _chest_image(rng, xs, ys, size, anatomy, findings, view) -> np.ndarray:
    """One grayscale radiograph [size, size] uint8 in normalised coordinates (x right, y down, both 0..1)."""
    shift = anatomy["shift"] + rng.normal(0.0, 0.012, 2)
    s = anatomy["scale"] * float(np.exp(rng.normal(0.0, 0.02)))
    x = (xs - 0.5 - shift[0]) / s + 0.5
    y = (ys - 0.5 - shift[1]) / s + 0.5
    edge = 1.2 / size

    emphysema = "Emphysema" in findings
    lung_h = 0.28 * (1.1 if emphysema else 1.0)  # hyperinflated lungs reach lower
    lungs = [
        (0.31, 0.45, 0.14, lung_h),
        (0.69, 0.45, 0.13, lung_h),
    ]  # (cx, cy, a, b): image left = patient right
    body = _one_ellipse(x, y, 0.5, 0.55, 0.47, 0.56, edge=4 * edge)
    lung_masks = [_one_ellipse(x, y, cx, cy, a, b, edge=3 * edge) for cx, cy, a, b in lungs]
    lung = np.maximum(*lung_masks)

    image = 15.0 + body * (anatomy["tissue"] - 15.0)
    lung_level = anatomy["lung"] - (22.0 if emphysema else 0.0)
    ribs = 7.0 * np.sin(2 * np.pi * (y * 9.0 + 0.8 * np.abs(x - 0.5)) + anatomy["rib_phase"])
    image = image * (1 - lung) + (lung_level + ribs) * lung

    # Heart and spine: AP films magnify the heart, which is why Cardiomegaly is judged less surely on AP views.
    heart_scale = anatomy["heart"] * (1.1 if view == "AP" else 1.0)
    if "Cardiomegaly" in findings:
        heart_scale *= 1.4
    heart = _one_ellipse(x, y, 0.55, 0.61, 0.12 * heart_scale, 0.1 * min(heart_scale, 1.2), edge=3 * edge)
    image = np.maximum(image, heart * (anatomy["tissue"] + 20.0))
    spine = np.clip(1.2 - np.abs(x - 0.5) / 0.05, 0.0, 1.0) * body
    image = np.maximum(image, spine * (anatomy["tissue"] + 15.0))

    def side() -> tuple[int, tuple[float, float, float, float]]:
        k = int(rng.integers(2))
        return k, lungs[k]

    def in_lung(k: int, cy_lo: float, cy_hi: float) -> tuple[float, float]:
        """A random point in lung k between the given heights (fractions of the lung's height)."""
        cx, cy, a, b = lungs[k]
        t = rng.uniform(cy_lo, cy_hi)
        return cx + rng.uniform(-0.55, 0.55) * a, cy - b + 2 * b * t

    add = np.zeros_like(image)
    if "Atelectasis" in findings:  # a thin horizontal-ish band (plate atelectasis) in a lower zone
        k, (cx, cy, a, b) = side()
        level = cy + rng.uniform(0.2, 0.45) * b
        tilt = rng.uniform(-0.25, 0.25)
        band = np.clip(1.0 - np.abs(y - level - tilt * (x - cx)) / rng.uniform(0.012, 0.02), 0, 1)
        add += 50.0 * band * lung_masks[k]
    if "Effusion" in findings:  # fluid at a lung base: bright below a meniscus that rises laterally
        k, (cx, cy, a, b) = side()
        lateral = np.clip((x - cx) * (1 if k else -1), 0, None)
        level = cy + rng.uniform(0.25, 0.55) * b - 0.8 * lateral
        add += 55.0 * np.clip((y - level) / (3 * edge) + 0.5, 0, 1) * lung_masks[k]
    if "Infiltration" in findings:  # patchy, ill-defined opacities in one or both lungs
        patches = np.clip(_smooth_noise(rng, size, 7) - 0.2, 0, 1.5)
        which = lung if rng.random() < 0.4 else lung_masks[int(rng.integers(2))]
        add += 45.0 * patches * which
    if "Mass" in findings:  # one large, well-defined round opacity
        k, _ = side()
        mx, my = in_lung(k, 0.2, 0.8)
        r = rng.uniform(0.055, 0.085)
        add += 60.0 * _one_ellipse(
            x, y, mx, my, r, r * rng.uniform(0.8, 1.0), rng.uniform(0, np.pi), 2 * edge
        )
    if "Nodule" in findings:  # one or two small, sharp round opacities
        for _ in range(int(rng.integers(1, 3))):
            k, _ = side()
            nx, ny = in_lung(k, 0.15, 0.85)
            r = rng.uniform(0.022, 0.035)
            add += 65.0 * _one_ellipse(x, y, nx, ny, r, r, edge=edge)
    if "Pneumonia" in findings:  # a fuzzy, textured opacity in a lower lobe
        k, _ = side()
        px, py = in_lung(k, 0.5, 0.9)
        blob = np.exp(-((x - px) ** 2 + (y - py) ** 2) / (2 * rng.uniform(0.05, 0.08) ** 2))
        add += 45.0 * blob * (0.7 + 0.3 * _smooth_noise(rng, size, 10)) * lung_masks[k]
    if "Pneumothorax" in findings:  # apical-lateral air: very dark, no rib markings, a bright pleural line
        k, (cx, cy, a, b) = side()
        inner = _one_ellipse(x, y, cx + (0.04 if k else -0.04), cy + 0.05, a * 0.8, b * 0.85, edge=edge)
        air = lung_masks[k] * (1 - inner)
        image = image * (1 - air) + (lung_level - 30.0) * air
        add += 40.0 * np.clip(1.0 - np.abs(inner - 0.5) * 2.5, 0, 1) * lung_masks[k]
    if "Consolidation" in findings:  # dense, homogeneous, sharper-edged, elongated opacity in the mid zone
        k, _ = side()
        ox, oy = in_lung(k, 0.35, 0.7)
        add += 70.0 * _one_ellipse(
            x, y, ox, oy, rng.uniform(0.06, 0.09), rng.uniform(0.04, 0.06), rng.uniform(0, np.pi), 1.5 * edge
        )
    if "Edema" in findings:  # bilateral perihilar haze ("bat wings")
        haze = sum(np.exp(-((x - hx) ** 2 + (y - 0.5) ** 2) / (2 * 0.09**2)) for hx in (0.38, 0.62))
        add += 45.0 * haze * lung * (0.8 + 0.2 * _smooth_noise(rng, size, 14))
    if emphysema:  # (the darker, longer lungs are drawn above) plus sparse bullae
        for _ in range(int(rng.integers(1, 3))):
            k, _ = side()
            bx, by = in_lung(k, 0.05, 0.4)
            r = rng.uniform(0.03, 0.05)
            add -= 15.0 * _one_ellipse(x, y, bx, by, r, r, edge=edge)
    if "Fibrosis" in findings:  # reticular net in the upper zones of both lungs
        angle = rng.uniform(0, np.pi)
        net = np.abs(np.sin(40 * (x * np.cos(angle) + y * np.sin(angle)))) * np.abs(np.sin(40 * (x - y)))
        upper = np.clip((0.5 - y) / 0.1, 0, 1)
        add += 35.0 * net * upper * lung
    if "Pleural_Thickening" in findings:  # a bright rim along the lateral border of one lung, upper half
        k, (cx, cy, a, b) = side()
        rim = lung_masks[k] * (1 - _one_ellipse(x, y, cx, cy, a * 0.84, b * 0.92, edge=edge))
        lateral = np.clip((x - cx) / a * (1 if k else -1) * 3, 0, 1) * np.clip(
            (cy + 0.3 * b - y) / 0.05, 0, 1
        )
        add += 50.0 * rim * lateral
    if "Hernia" in findings:  # retrocardiac mass low in the chest with an air bubble (hiatus hernia)
        hx, hy = 0.52 + rng.normal(0, 0.02), 0.7 + rng.normal(0, 0.02)
        r = rng.uniform(0.05, 0.07)
        add += 45.0 * _one_ellipse(x, y, hx, hy, r * 1.2, r, edge=2 * edge)
        add -= 70.0 * _one_ellipse(x, y, hx, hy - 0.3 * r, 0.4 * r, 0.3 * r, edge=edge)
    image = image + add

    # Acquisition: AP (portable) films have lower contrast; brightness/contrast jitter; film grain and texture.
    contrast = rng.uniform(0.85, 1.15) * (0.9 if view == "AP" else 1.0)
    image = (image - 80.0) * contrast + 80.0 + rng.normal(0.0, 8.0)
    image += 6.0 * _smooth_noise(rng, size, 8) + rng.normal(0.0, 4.0, image.shape)
    return _to_uint8(image)
