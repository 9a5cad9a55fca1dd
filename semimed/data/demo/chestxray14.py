"""The synthetic ChestX-ray14 release: Data_Entry_2017_v2020.csv, the official lists and 8-bit gray PNGs.

A lung-shaped radiograph cartoon; each of the 14 findings draws its own pattern in its own region (a large round
opacity for Mass, a small one for Nodule, a bright meniscus at a lung base for Effusion, a wide heart for
Cardiomegaly, …) at a random place, size and side, on per-patient anatomy with noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from semimed.data.chestxray14 import FINDINGS
from semimed.data.demo.common import (
    CX_IMAGE,
    CX_META,
    CX_PATIENT,
    atomic_write,
    one_ellipse,
    smooth_noise,
    to_uint8,
    write_png,
)

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


def _chest_metadata(seed: int, n_patients: int) -> list[dict]:
    """One dict per image: patient, follow-up, findings, age, gender, view, original size and spacing."""
    rng = np.random.default_rng([seed, CX_META])
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


def write_chestxray14(root: Path, seed: int, n_patients: int, size: int) -> None:
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
    atomic_write(root / "Data_Entry_2017_v2020.csv", ("\n".join(lines) + "\n").encode())

    # Official lists: patient-disjoint, about 80/20, names sorted, no trailing newline (as in the release).
    split_rng = np.random.default_rng([seed, CX_META, 1])
    order = split_rng.permutation(np.arange(1, n_patients + 1))
    test_patients = set(order[: max(1, round(0.2 * n_patients))].tolist())
    test = [name for name, row in zip(names, rows, strict=True) if row["patient"] in test_patients]
    train_val = [name for name, row in zip(names, rows, strict=True) if row["patient"] not in test_patients]
    atomic_write(root / "train_val_list.txt", "\n".join(train_val).encode())
    atomic_write(root / "test_list.txt", "\n".join(test).encode())

    # The NIH release unpacks to images_001/images/, images_002/images/, … in name order.
    half = (len(names) + 1) // 2
    ys, xs = (np.mgrid[0:size, 0:size].astype(float) + 0.5) / size
    anatomy: dict = {}
    for index, (name, row) in enumerate(zip(names, rows, strict=True)):
        folder = root / ("images_001" if index < half else "images_002") / "images"
        folder.mkdir(parents=True, exist_ok=True)
        if row["patient"] not in anatomy:
            anatomy = {
                row["patient"]: _chest_anatomy(np.random.default_rng([seed, CX_PATIENT, row["patient"]]))
            }
        rng = np.random.default_rng([seed, CX_IMAGE, row["patient"], row["followup"]])
        pixels = _chest_image(rng, xs, ys, size, anatomy[row["patient"]], row["findings"], row["view"])
        write_png(folder / name, pixels)


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
    body = one_ellipse(x, y, 0.5, 0.55, 0.47, 0.56, edge=4 * edge)
    lung_masks = [one_ellipse(x, y, cx, cy, a, b, edge=3 * edge) for cx, cy, a, b in lungs]
    lung = np.maximum(*lung_masks)

    image = 15.0 + body * (anatomy["tissue"] - 15.0)
    lung_level = anatomy["lung"] - (22.0 if emphysema else 0.0)
    ribs = 7.0 * np.sin(2 * np.pi * (y * 9.0 + 0.8 * np.abs(x - 0.5)) + anatomy["rib_phase"])
    image = image * (1 - lung) + (lung_level + ribs) * lung

    # Heart and spine: AP films magnify the heart, which is why Cardiomegaly is judged less surely on AP views.
    heart_scale = anatomy["heart"] * (1.1 if view == "AP" else 1.0)
    if "Cardiomegaly" in findings:
        heart_scale *= 1.4
    heart = one_ellipse(x, y, 0.55, 0.61, 0.12 * heart_scale, 0.1 * min(heart_scale, 1.2), edge=3 * edge)
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
        patches = np.clip(smooth_noise(rng, size, 7) - 0.2, 0, 1.5)
        which = lung if rng.random() < 0.4 else lung_masks[int(rng.integers(2))]
        add += 45.0 * patches * which
    if "Mass" in findings:  # one large, well-defined round opacity
        k, _ = side()
        mx, my = in_lung(k, 0.2, 0.8)
        r = rng.uniform(0.055, 0.085)
        add += 60.0 * one_ellipse(x, y, mx, my, r, r * rng.uniform(0.8, 1.0), rng.uniform(0, np.pi), 2 * edge)
    if "Nodule" in findings:  # one or two small, sharp round opacities
        for _ in range(int(rng.integers(1, 3))):
            k, _ = side()
            nx, ny = in_lung(k, 0.15, 0.85)
            r = rng.uniform(0.022, 0.035)
            add += 65.0 * one_ellipse(x, y, nx, ny, r, r, edge=edge)
    if "Pneumonia" in findings:  # a fuzzy, textured opacity in a lower lobe
        k, _ = side()
        px, py = in_lung(k, 0.5, 0.9)
        blob = np.exp(-((x - px) ** 2 + (y - py) ** 2) / (2 * rng.uniform(0.05, 0.08) ** 2))
        add += 45.0 * blob * (0.7 + 0.3 * smooth_noise(rng, size, 10)) * lung_masks[k]
    if "Pneumothorax" in findings:  # apical-lateral air: very dark, no rib markings, a bright pleural line
        k, (cx, cy, a, b) = side()
        inner = one_ellipse(x, y, cx + (0.04 if k else -0.04), cy + 0.05, a * 0.8, b * 0.85, edge=edge)
        air = lung_masks[k] * (1 - inner)
        image = image * (1 - air) + (lung_level - 30.0) * air
        add += 40.0 * np.clip(1.0 - np.abs(inner - 0.5) * 2.5, 0, 1) * lung_masks[k]
    if "Consolidation" in findings:  # dense, homogeneous, sharper-edged, elongated opacity in the mid zone
        k, _ = side()
        ox, oy = in_lung(k, 0.35, 0.7)
        add += 70.0 * one_ellipse(
            x, y, ox, oy, rng.uniform(0.06, 0.09), rng.uniform(0.04, 0.06), rng.uniform(0, np.pi), 1.5 * edge
        )
    if "Edema" in findings:  # bilateral perihilar haze ("bat wings")
        haze = sum(np.exp(-((x - hx) ** 2 + (y - 0.5) ** 2) / (2 * 0.09**2)) for hx in (0.38, 0.62))
        add += 45.0 * haze * lung * (0.8 + 0.2 * smooth_noise(rng, size, 14))
    if emphysema:  # (the darker, longer lungs are drawn above) plus sparse bullae
        for _ in range(int(rng.integers(1, 3))):
            k, _ = side()
            bx, by = in_lung(k, 0.05, 0.4)
            r = rng.uniform(0.03, 0.05)
            add -= 15.0 * one_ellipse(x, y, bx, by, r, r, edge=edge)
    if "Fibrosis" in findings:  # reticular net in the upper zones of both lungs
        angle = rng.uniform(0, np.pi)
        net = np.abs(np.sin(40 * (x * np.cos(angle) + y * np.sin(angle)))) * np.abs(np.sin(40 * (x - y)))
        upper = np.clip((0.5 - y) / 0.1, 0, 1)
        add += 35.0 * net * upper * lung
    if "Pleural_Thickening" in findings:  # a bright rim along the lateral border of one lung, upper half
        k, (cx, cy, a, b) = side()
        rim = lung_masks[k] * (1 - one_ellipse(x, y, cx, cy, a * 0.84, b * 0.92, edge=edge))
        lateral = np.clip((x - cx) / a * (1 if k else -1) * 3, 0, 1) * np.clip(
            (cy + 0.3 * b - y) / 0.05, 0, 1
        )
        add += 50.0 * rim * lateral
    if "Hernia" in findings:  # retrocardiac mass low in the chest with an air bubble (hiatus hernia)
        hx, hy = 0.52 + rng.normal(0, 0.02), 0.7 + rng.normal(0, 0.02)
        r = rng.uniform(0.05, 0.07)
        add += 45.0 * one_ellipse(x, y, hx, hy, r * 1.2, r, edge=2 * edge)
        add -= 70.0 * one_ellipse(x, y, hx, hy - 0.3 * r, 0.4 * r, 0.3 * r, edge=edge)
    image = image + add

    # Acquisition: AP (portable) films have lower contrast; brightness/contrast jitter; film grain and texture.
    contrast = rng.uniform(0.85, 1.15) * (0.9 if view == "AP" else 1.0)
    image = (image - 80.0) * contrast + 80.0 + rng.normal(0.0, 8.0)
    image += 6.0 * smooth_noise(rng, size, 8) + rng.normal(0.0, 4.0, image.shape)
    return to_uint8(image)
