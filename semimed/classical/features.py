"""Hand-crafted image features (scikit-image) for the classical baselines, one extractor per family.

An extractor maps one cached image [C, S, S] uint8 to a float32 vector whose length does not depend on S, so a
feature set means the same thing at 28 px (MedMNIST) and at 224 px (BreakHis):

    glcm    grey-level co-occurrence texture (Haralick): contrast, dissimilarity, homogeneity, energy,
            correlation, ASM at distances 1, 2, 4 px, each averaged over the angles 0, 45, 90, 135 degrees
            (histology and ultrasound have no preferred orientation), on the grey image quantized to 32 levels
            (256 levels would leave most co-occurrence cells empty): 6 x 3 = 18 values
    lbp     uniform local binary patterns (Ojala et al. 2002) at (P, R) = (8, 1) and (16, 2): normalized
            histograms of P + 2 bins each (P + 1 uniform codes plus one for all non-uniform ones): 10 + 18 = 28
    hog     histogram of oriented gradients, 9 orientations on a 4 x 4 grid of cells (S/4 px each), blocks of
            2 x 2 cells, L2-Hys: 3 x 3 blocks x 4 cells x 9 = 324
    color   intensity histograms, 16 bins per channel (R, G, B for H&E; the one grey channel for X-ray and
            ultrasound), normalized to sum 1 per channel: 16 x C

The texture extractors read the grey image: the channel itself, or for RGB the integer luma
(299 R + 587 G + 114 B + 500) // 1000 (ITU-R BT.601, exact in integers so tests can compute it by hand).

A feature set names the extractors whose vectors are concatenated (`FEATURE_SETS`). Each extractor carries a
version: changing what it computes means bumping it, and the feature cache (semimed/classical/cache.py) then
computes it again. `extract_rows` spreads rows over processes with joblib.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from semimed.data.cache.layout import RowSubset

GLCM_LEVELS = 32
GLCM_DISTANCES = (1, 2, 4)
GLCM_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
GLCM_PROPERTIES = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")
LBP_SCALES = ((8, 1), (16, 2))
HOG_CELLS = 4  # cells per image side
COLOR_BINS = 16
# Fewest rows per joblib task: below this, sending the task costs more than computing it.
MIN_CHUNK = 16


def grey(image: np.ndarray) -> np.ndarray:
    """[C, S, S] uint8 -> [S, S] uint8: the channel itself, or for RGB the integer BT.601 luma."""
    if image.shape[0] == 1:
        return np.ascontiguousarray(image[0])
    r, g, b = (image[k].astype(np.uint32) for k in range(3))
    return ((299 * r + 587 * g + 114 * b + 500) // 1000).astype(np.uint8)


def glcm_features(
    levels_image: np.ndarray,
    levels: int,
    distances: tuple[int, ...] = GLCM_DISTANCES,
    angles: tuple[float, ...] = GLCM_ANGLES,
) -> np.ndarray:
    """GLCM properties of an integer image with values in [0, levels): [len(GLCM_PROPERTIES) x
    len(distances)], property-major, each the mean over `angles` of the symmetric, normalized matrix."""
    from skimage.feature import graycomatrix, graycoprops

    matrix = graycomatrix(
        levels_image, list(distances), list(angles), levels=levels, symmetric=True, normed=True
    )
    # graycoprops: [distances, angles] per property; a constant image has correlation 1 by skimage's convention.
    values = [graycoprops(matrix, prop).mean(axis=1) for prop in GLCM_PROPERTIES]
    return np.nan_to_num(np.concatenate(values)).astype(np.float32)


def lbp_histogram(image: np.ndarray, points: int, radius: float) -> np.ndarray:
    """Normalized histogram [points + 2] of skimage's rotation-invariant uniform LBP codes: code k <= points is
    a uniform pattern with k neighbours >= the centre, points + 1 collects the non-uniform ones. Neighbours
    outside the image read as 0."""
    from skimage.feature import local_binary_pattern

    codes = local_binary_pattern(image, points, radius, method="uniform").astype(np.int64)
    counts = np.bincount(codes.ravel(), minlength=points + 2)
    return (counts / codes.size).astype(np.float32)


def color_histogram(image: np.ndarray, bins: int = COLOR_BINS) -> np.ndarray:
    """[C, S, S] uint8 -> [C x bins]: per channel, the share of pixels in each of `bins` equal-width bins of
    0..255 (bin = value // (256 / bins))."""
    width = 256 // bins
    out = [np.bincount(channel.ravel() // width, minlength=bins) / channel.size for channel in image]
    return np.concatenate(out).astype(np.float32)


def _glcm(image: np.ndarray) -> np.ndarray:
    return glcm_features(grey(image) // (256 // GLCM_LEVELS), GLCM_LEVELS)


def _lbp(image: np.ndarray) -> np.ndarray:
    g = grey(image)
    return np.concatenate([lbp_histogram(g, p, r) for p, r in LBP_SCALES])


def _hog(image: np.ndarray) -> np.ndarray:
    from skimage.feature import hog

    g = grey(image)
    cell = max(1, g.shape[0] // HOG_CELLS)
    return hog(
        g,
        orientations=9,
        pixels_per_cell=(cell, cell),
        cells_per_block=(2, 2),
        block_norm="L2-Hys",
        feature_vector=True,
    ).astype(np.float32)


@dataclass(frozen=True)
class Extractor:
    name: str
    fn: Callable[[np.ndarray], np.ndarray]  # [C, S, S] uint8 -> float32 [D]
    version: int  # bump when what `fn` computes changes: cached features of older versions are not used
    description: str


EXTRACTORS: dict[str, Extractor] = {
    e.name: e
    for e in (
        Extractor("glcm", _glcm, 1, "GLCM texture: 6 properties x distances 1, 2, 4 (angle mean), 32 levels"),
        Extractor("lbp", _lbp, 1, "uniform LBP histograms at (8, 1) and (16, 2)"),
        Extractor("hog", _hog, 1, "HOG, 9 orientations, 4 x 4 cells, 2 x 2 blocks"),
        Extractor("color", color_histogram, 1, "16-bin intensity histogram per channel"),
    )
}

FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "glcm": ("glcm",),
    "lbp": ("lbp",),
    "hog": ("hog",),
    "color": ("color",),
    "glcm_lbp": ("glcm", "lbp"),
    "glcm_lbp_color": ("glcm", "lbp", "color"),
    "all": ("glcm", "lbp", "hog", "color"),
}


def extract_chunk(pixels, rows: np.ndarray, name: str) -> np.ndarray:
    """One extractor over `pixels[rows]` -> float32 [len(rows), D] (what one joblib task runs)."""
    fn = EXTRACTORS[name].fn  # looked up at call time: tests count calls by replacing the entry
    return np.stack([fn(np.asarray(pixels[int(row)])) for row in rows]).astype(np.float32)


def extract_rows(pixels, rows: np.ndarray, name: str, workers: int = 1) -> np.ndarray:
    """Extractor `name` over `pixels[rows]` -> float32 [len(rows), D]; `pixels` is [N, C, S, S] uint8 (an array,
    a cache memmap or a row-mapped view of one). With workers > 1 the rows are split into about 4 chunks per
    worker over joblib's loky processes. The pixel array is not copied into each task: joblib sends a
    memmap as its file name, and dumps an in-memory array once per call to a shared temporary memmap."""
    rows = np.asarray(rows, dtype=np.int64)
    if isinstance(pixels, RowSubset):
        pixels, rows = pixels.base, pixels.rows[rows]
    if not len(rows):
        return np.zeros((0, 0), np.float32)
    chunks = np.array_split(rows, max(1, min(workers * 4, len(rows) // MIN_CHUNK)))
    if workers <= 1 or len(chunks) == 1:
        return extract_chunk(pixels, rows, name)
    from joblib import Parallel, delayed

    parts = Parallel(n_jobs=workers, backend="loky", max_nbytes="1M", mmap_mode="r")(
        delayed(extract_chunk)(pixels, chunk, name) for chunk in chunks
    )
    return np.concatenate(parts)
