"""What both synthetic formats share: the random streams, atomic file writing, and the drawing primitives."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

# Independent random streams (the second entropy word): metadata draws never shift pixel draws and vice versa.
BH_META, BH_PATIENT, BH_IMAGE, CX_META, CX_PATIENT, CX_IMAGE = range(6)


def atomic_write(path: Path, data: bytes) -> None:
    """Temporary hidden name, then rename: a crash leaves no half-written file under a real name."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_png(path: Path, pixels: np.ndarray) -> None:
    buffer = io.BytesIO()
    # PIL writes no timestamp chunks by default, so equal pixels give equal bytes.
    Image.fromarray(pixels).save(buffer, format="PNG")
    atomic_write(path, buffer.getvalue())


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
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


def ellipses(
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


def one_ellipse(xs, ys, cx, cy, a, b, theta=0.0, edge=0.01) -> np.ndarray:
    return ellipses(xs, ys, *(np.array([value], dtype=float) for value in (cx, cy, a, b, theta)), edge)[0]
