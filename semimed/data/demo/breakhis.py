"""The synthetic BreakHis tree: RGB tiles under BreaKHis_v1/histology_slides/breast/…, named as in the release.

Dark-purple "nuclei" on a pink stroma. Malignant tissue has more and larger nuclei (Poisson count and lognormal
radius, both shifted), so the dark-pixel fraction is about twice the benign one on average, with overlap;
subtypes differ a little in nucleus shape (elongation), clustering, colour and extras (mucin pools, gland
lumens). Nuisance: a per-patient stain colour and nucleus density (images of one patient look alike, which is
why splits must be patient-disjoint), magnification-dependent scale, lymphocytes, background texture,
brightness/contrast jitter and pixel noise; every blob sits at a random position.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from semimed.data.breakhis import MAGNIFICATIONS, TUMOR_TYPES
from semimed.data.demo.common import (
    BH_IMAGE,
    BH_META,
    BH_PATIENT,
    ellipses,
    smooth_noise,
    to_uint8,
    write_png,
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


def _breakhis_patients(seed: int, count: int) -> list[tuple[str, str]]:
    """(tumor type, patient number like '14-22549AB') per patient; every subtype gets count // 8 or more."""
    rng = np.random.default_rng([seed, BH_META])
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


def write_breakhis(root: Path, seed: int, n_patients: int, per_mag: int, size: int) -> None:
    breast = root / "BreaKHis_v1" / "histology_slides" / "breast"
    ys, xs = np.mgrid[0:size, 0:size].astype(float) + 0.5
    for p_index, (code, patient) in enumerate(_breakhis_patients(seed, n_patients)):
        tumor_class, subtype = TUMOR_TYPES[code]
        letter = "B" if tumor_class == "benign" else "M"
        folder = breast / tumor_class / "SOB" / subtype / f"SOB_{letter}_{code}_{patient}"
        style = _SUBTYPE_STYLE[code]
        stain_rng = np.random.default_rng([seed, BH_PATIENT, p_index])
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
                rng = np.random.default_rng([seed, BH_IMAGE, p_index, mag, seq])
                pixels = _histology_image(rng, xs, ys, size, code, style, stain, mag)
                write_png(mag_dir / f"SOB_{letter}_{code}-{patient}-{mag}-{seq:03d}.png", pixels)


def _histology_image(rng, xs, ys, size, code, style, stain, mag) -> np.ndarray:
    """One RGB tile [size, size, 3] uint8."""
    area_scale = (size / 64.0) ** 2
    # Higher magnification: fewer, larger nuclei; the nuclear area fraction stays about the same, so the class
    # signal survives at every magnification but its look changes (40X: 0.76x radius, 400X: 1.5x).
    zoom = (mag / 100.0) ** 0.3 * stain["scale"] * size / 64.0
    image = np.broadcast_to(stain["stroma"], (size, size, 3)).copy()
    image *= 1.0 + 0.07 * smooth_noise(rng, size, 6)[..., None]
    image += 6.0 * smooth_noise(rng, size, 12)[..., None] * np.array([1.0, 1.5, 0.8])

    # Pale areas (gland lumens, fat; mucin pools in mucinous carcinoma): bright, so they do not add dark pixels.
    n_pale = rng.poisson(3.0 if code == "MC" else 1.2)
    if n_pale:
        masks = ellipses(
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
        masks = ellipses(xs, ys, cx, cy, a, b, rng.uniform(0, np.pi, len(a)), 1.0)
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
    return to_uint8(image)
