"""The one intensity path from an image file's stored values to the uint8 pixels semimed trains on.

Every image file semimed reads (datasets, the decode cache, `semimed predict`, `semimed explain`) goes through
`semimed.data.base.read_image_file`, which hands the cases below to this module. Output is always HxWxC uint8
with C = the channels the dataset asks for (1: grayscale; 3: colour, a grayscale image replicated to 3).
There is NO option: the path is fixed, so the decode cache's identity (semimed/data/cache/layout.py) needs no
setting beyond its version, which was bumped to 3 when this path replaced the 8-bit-only reader.

8-bit files (PNG, JPEG, TIFF, BMP: PIL modes L, RGB, RGBA, P, 1, ...) are NOT touched here: PIL's
`convert("L"/"RGB")` exactly as before, byte-identical pixels (the cache and the engine's reference rely on it).
A 16-bit COLOUR PNG is one of them: PIL opens it as 8-bit RGB(A) keeping each sample's high byte (v >> 8, a
linear map of the whole 0..65535 range, not a clip).

Wider grayscale PNG/TIFF (PIL modes I;16*, I, F: 16-bit, 32-bit integer, 32-bit float) -- `wide_to_uint8`:

    x          the stored values as float64 (the whole image, before any resize or crop)
    refused    if any x is NaN or infinite (one line naming the file): there is no right value for it
    lo, hi     = np.percentile(x, 0.5), np.percentile(x, 99.5)   (numpy's default linear interpolation)
    y          = rint(255 * (clip(x, lo, hi) - lo) / (hi - lo))   rint: nearest, ties to even
    hi == lo   y = 255 where x > hi, else 0 (the limit of the line above; a constant image is all 0)

The percentiles are PER IMAGE. Why a percentile clip and not min..max: a handful of outlier pixels (a burned-in
marker, a dead detector pixel, a saturated collimator edge) would otherwise squeeze the anatomy into a few grey
levels; the 0.5 % darkest and brightest pixels are clipped instead. Why not PIL's convert: it clips every value
above 255 (a 16-bit X-ray comes out almost all white) and the model then scores it confidently.

DICOM (`.dcm`/`.dicom` file names, or any file with "DICM" at byte 128) -- `read_dicom`, with pydicom (the
optional extra `semimed[dicom]`, which also brings decoders for JPEG, JPEG-LS, JPEG 2000 and RLE pixel data):

1. refused, one line each, before the pixels are decoded: more than one frame (NumberOfFrames > 1; semimed
   reads one image per file, export the frames you want as files), Rows x Columns over twice PIL's
   Image.MAX_IMAGE_PIXELS (the decompression-bomb limit every image file gets), a PhotometricInterpretation
   other than MONOCHROME1, MONOCHROME2, RGB or YBR_*, and compressed pixel data whose decoder is not
   installed (the line names the transfer syntax and the package to install);
2. colour (RGB, YBR_*; 8 bits only): pydicom decodes to RGB (YBR converted with its `convert_color_space`),
   then, as for an RGB PNG, kept for C = 3 or PIL's convert("L") for C = 1. No windowing;
3. grayscale: pydicom's pixel array (signed and BitsStored handled by pydicom), then the Modality LUT
   (`apply_modality_lut`: v = stored * RescaleSlope + RescaleIntercept, or the Modality LUT Sequence), then
   - WindowCenter c and WindowWidth w both in the header (the FIRST value where several are listed; w >= 1):
     the DICOM VOI function (PS3.3 C.11.2.1.2) to 0..255, VOILUTFunction LINEAR (the default):
         y = 0                                    if v <= c - 0.5 - (w - 1) / 2
         y = 255                                  if v >  c - 0.5 + (w - 1) / 2
         y = ((v - (c - 0.5)) / (w - 1) + 0.5) * 255   otherwise
     LINEAR_EXACT: y = clip(((v - c) / w + 0.5) * 255, 0, 255); SIGMOID: y = 255 / (1 + exp(-4 (v - c) / w));
     then y = rint(y). A VOI LUT Sequence (a table instead of a window) is not applied;
   - no window, and the file holds what an 8-bit PNG would (BitsStored <= 8, unsigned, no rescale or one of
     slope 1 and intercept 0): y = v, as an 8-bit PNG is read;
   - otherwise: the percentile clip above on v (per image);
   - MONOCHROME1 (0 = white): y = 255 - y after windowing, so that bright means dense as in MONOCHROME2.

What the decode cache stores: for a 16-bit or DICOM image, the uint8 y above, then resized and centre-cropped
like every image (semimed/data/cache/decoding.py); the wider values are not kept. The mapping depends on the
file alone, so the cache's (path, size, mtime_ns) check of each row's file covers it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from semimed.errors import SemimedError
from semimed.optional import MissingPackageError, require

LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5
DICOM_SUFFIXES = (".dcm", ".dicom")
WIDE_MODES = ("I", "F")  # and every "I;16..." mode
_INSTALL = "pip install 'semimed[dicom]'"
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_PARTIAL_422", "YBR_ICT", "YBR_RCT")
_GRAY = ("MONOCHROME1", "MONOCHROME2")


# ------------------------------------------------------------------------------------ the arithmetic (numpy)


def is_wide_mode(mode: str) -> bool:
    """A PIL mode whose samples are wider than 8 bits (16-bit, 32-bit integer, 32-bit float grayscale)."""
    return mode.startswith("I;16") or mode in WIDE_MODES


def percentile_to_uint8(values: np.ndarray) -> np.ndarray:
    """The percentile clip of the module docstring: per image, 0.5/99.5 percentiles -> 0..255, rint."""
    x = np.asarray(values, dtype=np.float64)
    lo, hi = np.percentile(x, [LOW_PERCENTILE, HIGH_PERCENTILE])
    if hi <= lo:
        return np.where(x > hi, 255, 0).astype(np.uint8)
    return np.rint(255.0 * (np.clip(x, lo, hi) - lo) / (hi - lo)).astype(np.uint8)


def window_to_uint8(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """The DICOM VOI window of the module docstring (LINEAR, LINEAR_EXACT or SIGMOID) -> 0..255, rint."""
    x = np.asarray(values, dtype=np.float64)
    if function == "LINEAR":
        low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
        # width 1: the middle branch is empty (low == high); divide by 1 there so numpy does not warn.
        inside = ((x - (center - 0.5)) / max(width - 1, 1.0) + 0.5) * 255.0
        y = np.where(x <= low, 0.0, np.where(x > high, 255.0, inside))
    elif function == "LINEAR_EXACT":
        y = ((x - center) / width + 0.5) * 255.0
    elif function == "SIGMOID":
        y = 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    else:
        raise ValueError(f"unknown VOI LUT function {function!r}")
    return np.rint(np.clip(y, 0.0, 255.0)).astype(np.uint8)


def to_channels(gray: np.ndarray, channels: int) -> np.ndarray:
    """HxW uint8 -> HxWxC uint8, the gray plane replicated C times (what PIL's convert("RGB") does for L)."""
    out = gray[:, :, None]
    return np.ascontiguousarray(np.repeat(out, 3, axis=2)) if channels == 3 else out


def wide_to_uint8(values: np.ndarray, path: Path | str, mode: str) -> np.ndarray:
    """A wide grayscale image's values (HxW) -> HxW uint8 by the percentile clip; NaN/inf refused."""
    x = np.asarray(values)
    if x.ndim != 2:
        raise SemimedError(
            f"{path}: {mode} image of shape {x.shape}; semimed reads 2-D grayscale wide images"
        )
    if x.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(x)))
        if bad:
            raise SemimedError(
                f"{path}: float image (mode {mode}) with {bad} NaN or infinite pixel(s); semimed cannot map "
                "them to a grey level: replace them in the file"
            )
    return percentile_to_uint8(x)


# ------------------------------------------------------------------------------------ DICOM (pydicom)


def is_dicom(path: Path) -> bool:
    """A DICOM file: its name ends in .dcm/.dicom, or it holds the "DICM" prefix at byte 128 (an unreadable
    file is not: PIL then reports why it cannot be read)."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _pydicom(path: Path) -> Any:
    pydicom = require("pydicom", "dicom", f"{path}: reading DICOM")
    try:
        import pydicom.pixels  # noqa: F401  (pydicom >= 3: decoders, modality LUT)
    except ModuleNotFoundError:
        raise SemimedError(
            f"{path}: reading DICOM needs pydicom >= 3.0 (installed: {pydicom.__version__}): {_INSTALL}"
        ) from None
    return pydicom


def _read(path: Path, pixels: bool) -> Any:
    if not path.is_file():
        raise SemimedError(f"{path}: image file not found")
    pydicom = _pydicom(path)
    try:
        # A .dcm file without the 128-byte preamble (older exports) is still read; any other file got here
        # because it has the "DICM" prefix.
        return pydicom.dcmread(
            path, stop_before_pixels=not pixels, force=path.suffix.lower() in DICOM_SUFFIXES
        )
    except Exception as exc:  # pydicom raises many types (InvalidDicomError, EOFError, struct.error, ...)
        raise SemimedError(f"{path}: cannot read DICOM file ({type(exc).__name__}: {exc})") from None


# Packages that decode each compressed transfer syntax, as `pip install` names them (all in semimed[dicom]).
_JPEG = "pylibjpeg pylibjpeg-libjpeg"
_J2K = "pylibjpeg pylibjpeg-openjpeg"
_DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.50": _JPEG,  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": _JPEG,  # JPEG Extended
    "1.2.840.10008.1.2.4.57": _JPEG,  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": _JPEG,  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": _JPEG,  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": _JPEG,  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": _J2K,  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": _J2K,  # JPEG 2000
    "1.2.840.10008.1.2.4.201": _J2K,  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": _J2K,  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": _J2K,  # HTJ2K
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",  # RLE Lossless (pydicom also decodes it alone)
}


def _check_header(ds: Any, path: Path) -> None:
    """The refusals of step 1 (module docstring), from the header alone."""
    missing = [key for key in ("Rows", "Columns") if key not in ds]
    if missing:
        raise SemimedError(
            f"{path}: not a DICOM image ({', '.join(missing)} missing from the header: not a DICOM file, or "
            "one without an image)"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise SemimedError(
            f"{path}: multi-frame DICOM ({frames} frames); semimed reads one image per file: export the "
            "frame(s) you want as separate files"
        )
    limit = Image.MAX_IMAGE_PIXELS
    count = int(ds.Rows) * int(ds.Columns)
    if limit is not None and count > 2 * limit:
        raise SemimedError(
            f"{path}: image too large to decode ({ds.Columns}x{ds.Rows} = {count} pixels, over twice PIL's "
            f"Image.MAX_IMAGE_PIXELS = {limit}, the limit semimed applies to every image file)"
        )
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric not in _GRAY + _COLOUR:
        raise SemimedError(
            f"{path}: DICOM PhotometricInterpretation {photometric} is not read by semimed (it reads "
            "MONOCHROME1, MONOCHROME2, RGB and YBR_*)"
        )
    if photometric in _COLOUR and int(ds.get("BitsAllocated", 8)) != 8:
        raise SemimedError(
            f"{path}: {ds.get('BitsAllocated')}-bit colour DICOM ({photometric}); semimed reads 8-bit colour"
        )
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None or not syntax.is_compressed:
        return
    import pydicom.pixels

    try:
        decoder = pydicom.pixels.get_decoder(syntax)
        available = decoder.is_available
    except NotImplementedError:  # no pydicom decoder exists for it at all (e.g. MPEG video)
        raise SemimedError(
            f"{path}: DICOM transfer syntax {syntax.name} ({syntax}) is not decodable by pydicom; convert the "
            "file to an uncompressed or JPEG/JPEG 2000/RLE transfer syntax"
        ) from None
    if not available:
        packages = _DECODER_PACKAGES.get(str(syntax))
        install = f"pip install {packages}" if packages else "; ".join(decoder.missing_dependencies)
        raise MissingPackageError(
            f"{path}: DICOM pixel data compressed as {syntax.name} ({syntax}) needs a decoder that is not "
            f"installed: {install} (or {_INSTALL})"
        )


def check_dicom(path: Path) -> str:
    """What `read_dicom` would refuse from the header alone (pixels not decoded): pydicom missing, not a DICOM
    file, multi-frame, too large, an unread photometric interpretation, a decoder not installed. Returns the
    PhotometricInterpretation (MONOCHROME1, MONOCHROME2, RGB or YBR_*)."""
    ds = _read(path, pixels=False)
    _check_header(ds, path)
    return str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()


def _present(value: Any) -> bool:
    """A header value that is there and not empty (an empty element reads as None, "" or [])."""
    if value is None or isinstance(value, str | bytes):
        return bool(value)
    return not hasattr(value, "__len__") or len(value) > 0


def _first(value: Any) -> float:
    """The first value of a possibly multi-valued DS element (WindowCenter "40\\400" -> 40.0)."""
    if isinstance(value, str | bytes) or not hasattr(value, "__len__"):
        return float(value)
    return float(value[0])


def read_dicom(path: Path, channels: int) -> np.ndarray:
    """One single-frame DICOM file -> HxWxC uint8, by the steps of the module docstring."""
    path = Path(path)
    ds = _read(path, pixels=True)
    _check_header(ds, path)
    if "PixelData" not in ds:
        raise SemimedError(f"{path}: DICOM file without pixel data (no PixelData element)")
    from pydicom.pixels import apply_modality_lut, pixel_array

    try:
        # as_rgb: YBR_* pixel data comes back as RGB (pydicom's convert_color_space).
        stored = pixel_array(ds, as_rgb=True)
    except Exception as exc:  # truncated or corrupt pixel data, a decoder's own failure
        raise SemimedError(f"{path}: cannot decode DICOM pixel data ({type(exc).__name__}: {exc})") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric in _COLOUR:
        rgb = np.asarray(stored, dtype=np.uint8)
        if channels == 3:
            return np.ascontiguousarray(rgb)
        gray = np.asarray(Image.fromarray(rgb, mode="RGB").convert("L"), dtype=np.uint8)
        return gray[:, :, None]
    if stored.ndim != 2:
        raise SemimedError(
            f"{path}: grayscale DICOM whose pixel array has shape {stored.shape}, not rows x columns"
        )
    values = apply_modality_lut(stored, ds)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise SemimedError(
            f"{path}: the Modality LUT gives NaN or infinite values; check RescaleSlope/Intercept"
        )
    gray = _voi(values, stored, ds, path)
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    return to_channels(gray, channels)


def _voi(values: np.ndarray, stored: np.ndarray, ds: Any, path: Path) -> np.ndarray:
    """Step 3 of the module docstring, before the MONOCHROME1 inversion: the window, as-is, or percentiles."""
    center_value, width_value = ds.get("WindowCenter"), ds.get("WindowWidth")
    if _present(center_value) and _present(width_value):
        try:
            center, width = _first(center_value), _first(width_value)
        except (TypeError, ValueError):
            raise SemimedError(
                f"{path}: unreadable WindowCenter/WindowWidth ({center_value!r}/{width_value!r})"
            ) from None
        function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
        if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
            raise SemimedError(
                f"{path}: unknown VOILUTFunction {function}; valid: LINEAR, LINEAR_EXACT, SIGMOID"
            )
        smallest = 1.0 if function == "LINEAR" else 0.0
        if not (math.isfinite(center) and math.isfinite(width)) or width < smallest or width == 0:
            raise SemimedError(
                f"{path}: WindowWidth {width} (WindowCenter {center}) is not a usable window "
                f"({'>= 1' if function == 'LINEAR' else '> 0'} required for {function})"
            )
        return window_to_uint8(values, center, width, function)
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    eight_bit = (
        int(ds.get("BitsStored", ds.get("BitsAllocated", 16))) <= 8
        and int(ds.get("PixelRepresentation", 0)) == 0
        and "ModalityLUTSequence" not in ds
        and (slope, intercept) == (1.0, 0.0)
    )
    if eight_bit:
        return np.asarray(stored, dtype=np.uint8)
    return percentile_to_uint8(values)
