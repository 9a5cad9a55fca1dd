"""The documented intensity path (semimed/data/intensity.py) on a real chest X-ray: 16-bit PNG/TIFF by the
per-image percentile clip, DICOM by Modality LUT + window (or percentiles), MONOCHROME1 inverted, 8-bit files
untouched; the decode cache stores exactly those pixels. Expected values are computed here by hand from the
formulas of the module docstring (float64, then np.rint: nearest, ties to even)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from semimed.data.base import LabeledImageSet, read_image_file
from semimed.data.cache import load_pixels
from semimed.errors import SemimedError


def check_image_file(path: Path) -> None:
    # Imported here so that every other test of this file runs (and fails on its own) against older code.
    from semimed.data.base import check_image_file as check

    check(path)


# ------------------------------------------------------------------------------------ hand computations


def hand_percentile(values: np.ndarray) -> np.ndarray:
    """0.5 / 99.5 percentiles of this image -> 0..255 linearly, clipped outside, rint."""
    x = values.astype(np.float64)
    lo, hi = np.percentile(x, 0.5), np.percentile(x, 99.5)
    return np.rint((np.clip(x, lo, hi) - lo) / (hi - lo) * 255).astype(np.uint8)


def hand_window(values: np.ndarray, c: float, w: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1, VOI LUT function LINEAR, output range 0..255, rint."""
    x = values.astype(np.float64)
    out = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255
    out[x <= c - 0.5 - (w - 1) / 2] = 0
    out[x > c - 0.5 + (w - 1) / 2] = 255
    return np.rint(out).astype(np.uint8)


def mode_of(path: Path, convert: str = "") -> Any:
    """The file's PIL mode, or (convert given) the image converted to that mode; the file closed after."""
    with Image.open(path) as image:
        return image.convert(convert) if convert else image.mode


@pytest.fixture(scope="module")
def xray(sample_data: Path) -> np.ndarray:
    """A real ChestX-ray14 radiograph (8-bit, 1024x1024), every 8th pixel: 128x128 uint8."""
    files = sorted((sample_data / "chestxray14" / "images").glob("*.png"))
    if not files:
        pytest.skip(f"no ChestX-ray14 PNG under {sample_data / 'chestxray14' / 'images'}")
    pixels = np.asarray(mode_of(files[0], "L"))[::8, ::8]
    assert pixels.shape == (128, 128) and pixels.std() > 20  # a real image, not a flat one
    return np.ascontiguousarray(pixels)


def xray16(xray: np.ndarray) -> np.ndarray:
    """The radiograph as a 16-bit detector would give it: v = 40 * p + 1000, plus 6 outlier pixels (a burned-in
    marker at 65535, dead pixels at 0) that a min..max stretch would let squeeze the anatomy."""
    values = xray.astype(np.uint16) * 40 + 1000
    values[0, :3] = 65535
    values[-1, -3:] = 0
    return values


def save_png16(values: np.ndarray, path: Path) -> Path:
    Image.fromarray(values.astype(np.uint16)).save(path)
    assert mode_of(path) == "I;16"
    return path


# ------------------------------------------------------------------------------------ 16-bit and wider files


@pytest.mark.parametrize("channels", [1, 3])
def test_a_16_bit_png_is_the_per_image_percentile_clip(
    xray: np.ndarray, tmp_path: Path, channels: int
) -> None:
    values = xray16(xray)
    path = save_png16(values, tmp_path / "x16.png")
    expected = hand_percentile(values)
    got = read_image_file(path, channels)
    assert got.dtype == np.uint8 and got.shape == (128, 128, channels)
    for k in range(channels):
        np.testing.assert_array_equal(got[:, :, k], expected)
    # The outliers are clipped, not used as the range: the anatomy keeps its contrast (a min..max stretch over
    # 0..65535 would squeeze its values, 1000..11200, into ~40 grey levels).
    assert got[0, 0, 0] == 255 and got[-1, -1, 0] == 0
    assert len(np.unique(got)) > 200
    check_image_file(path)  # the header check no longer refuses it


def test_32_bit_integer_and_float_tiffs_take_the_same_path_and_nan_is_refused(
    xray: np.ndarray, tmp_path: Path
) -> None:
    values = xray16(xray).astype(np.int32) - 5000  # signed values
    Image.fromarray(values).save(tmp_path / "int.tif")
    assert mode_of(tmp_path / "int.tif") == "I"
    np.testing.assert_array_equal(read_image_file(tmp_path / "int.tif", 1)[:, :, 0], hand_percentile(values))
    floats = values.astype(np.float32) / 7.0
    Image.fromarray(floats).save(tmp_path / "float.tif")
    np.testing.assert_array_equal(
        read_image_file(tmp_path / "float.tif", 1)[:, :, 0], hand_percentile(floats)
    )
    floats[5, 5:8] = np.nan
    Image.fromarray(floats).save(tmp_path / "nan.tif")
    with pytest.raises(
        SemimedError, match=rf"^{tmp_path / 'nan.tif'}: float image \(mode F\) with 3 NaN or infinite pixel"
    ):
        read_image_file(tmp_path / "nan.tif", 1)


def test_a_constant_16_bit_image_is_all_zero(tmp_path: Path) -> None:
    path = save_png16(np.full((16, 16), 30000, np.uint16), tmp_path / "flat.png")
    np.testing.assert_array_equal(read_image_file(path, 3), np.zeros((16, 16, 3), np.uint8))


def test_8_bit_files_are_exactly_what_pil_gives(sample_data: Path, tmp_path: Path) -> None:
    gray = sorted((sample_data / "chestxray14" / "images").glob("*.png"))[0]
    colour = sorted((sample_data / "breakhis").rglob("*.png"))[0]
    for path in (gray, colour):
        with Image.open(path) as image:
            assert image.mode in ("L", "RGB")
            for channels, mode in ((1, "L"), (3, "RGB")):
                want = np.asarray(image.convert(mode))
                got = read_image_file(path, channels)
                assert got.tobytes() == (want[:, :, None] if want.ndim == 2 else want).tobytes()


# ------------------------------------------------------------------------------------ DICOM


@pytest.fixture(scope="module")
def pydicom():
    return pytest.importorskip("pydicom", minversion="3.0", reason="semimed[dicom] is not installed")


def write_dicom(path: Path, pixels: np.ndarray, photometric: str, bits: int, **header) -> Path:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.set_pixel_data(pixels, photometric, bits)
    compress = header.pop("compress", None)
    for key, value in header.items():
        setattr(ds, key, value)
    if compress is not None:
        ds.compress(compress)
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).PhotometricInterpretation == photometric
    return path


def stored12(xray: np.ndarray) -> np.ndarray:
    """12-bit stored values from the radiograph: s = 16 * p + 5 (0..4085)."""
    return xray.astype(np.uint16) * 16 + 5


RESCALE = {"RescaleSlope": 0.5, "RescaleIntercept": -100}  # v = 0.5 * s - 100, in -97.5..1942.5


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_a_dicom_with_a_window_is_rescaled_then_windowed(
    pydicom, xray: np.ndarray, tmp_path: Path, photometric: str
) -> None:
    stored = stored12(xray)
    # Two windows listed: the first one (c=900, w=1201) is used; it cuts into both ends of the image.
    path = write_dicom(
        tmp_path / "w.dcm", stored, photometric, 12, WindowCenter=[900, 40], WindowWidth=[1201, 80], **RESCALE
    )
    expected = hand_window(stored * 0.5 - 100, 900, 1201)
    assert (expected == 0).any() and (expected == 255).any()
    if photometric == "MONOCHROME1":
        expected = 255 - expected  # stored 0 = white: inverted after windowing, so bright = dense
    got = read_image_file(path, 1)
    assert got.shape == (128, 128, 1)
    np.testing.assert_array_equal(got[:, :, 0], expected)
    np.testing.assert_array_equal(read_image_file(path, 3), np.repeat(got, 3, axis=2))


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_a_dicom_without_a_window_is_rescaled_then_percentile_clipped(
    pydicom, xray: np.ndarray, tmp_path: Path, photometric: str
) -> None:
    stored = stored12(xray)
    stored[0, :4] = 4095  # outliers: clipped by the percentiles
    path = write_dicom(tmp_path / "p.dcm", stored, photometric, 12, **RESCALE)
    expected = hand_percentile(stored * 0.5 - 100)
    if photometric == "MONOCHROME1":
        expected = 255 - expected
    np.testing.assert_array_equal(read_image_file(path, 1)[:, :, 0], expected)


def test_an_8_bit_dicom_without_window_reads_like_the_8_bit_png(
    pydicom, xray: np.ndarray, tmp_path: Path
) -> None:
    path = write_dicom(tmp_path / "8.dcm", xray, "MONOCHROME2", 8)
    np.testing.assert_array_equal(read_image_file(path, 1)[:, :, 0], xray)


def test_a_signed_ct_like_dicom(pydicom, xray: np.ndarray, tmp_path: Path) -> None:
    stored = xray.astype(np.int16) * 12 - 1024  # signed, as CT stores Hounsfield-like values
    path = write_dicom(
        tmp_path / "ct.dcm",
        stored,
        "MONOCHROME2",
        16,
        RescaleSlope=1,
        RescaleIntercept=-24,
        WindowCenter=40,
        WindowWidth=400,
    )
    np.testing.assert_array_equal(read_image_file(path, 1)[:, :, 0], hand_window(stored - 24.0, 40, 400))


def test_colour_dicoms_are_rgb(pydicom, sample_data: Path, tmp_path: Path) -> None:
    from pydicom.pixels import convert_color_space

    source = sorted((sample_data / "breakhis").rglob("*.png"))[0]
    rgb = np.ascontiguousarray(np.asarray(mode_of(source, "RGB"))[::4, ::4])
    path = write_dicom(tmp_path / "rgb.dcm", rgb, "RGB", 8)
    np.testing.assert_array_equal(read_image_file(path, 3), rgb)
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    np.testing.assert_array_equal(read_image_file(path, 1)[:, :, 0], gray)  # as an RGB PNG is read
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    path = write_dicom(tmp_path / "ybr.dcm", ybr, "YBR_FULL", 8)
    back = convert_color_space(ybr, "YBR_FULL", "RGB")
    np.testing.assert_array_equal(read_image_file(path, 3), back)
    assert np.abs(back.astype(int) - rgb).max() <= 2  # the YBR round trip's own rounding


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEG2000Lossless"])
def test_a_compressed_dicom_reads_the_same_pixels(
    pydicom, xray: np.ndarray, tmp_path: Path, syntax: str
) -> None:
    import pydicom.pixels
    import pydicom.uid

    uid = getattr(pydicom.uid, syntax)
    if not pydicom.pixels.get_encoder(uid).is_available:
        pytest.skip(f"no {uid.name} encoder installed to write the test file (pylibjpeg-openjpeg)")
    stored = stored12(xray)
    plain = write_dicom(tmp_path / "plain.dcm", stored, "MONOCHROME2", 12, **RESCALE)
    packed = write_dicom(tmp_path / "packed.dcm", stored, "MONOCHROME2", 12, compress=uid, **RESCALE)
    assert pydicom.dcmread(packed).file_meta.TransferSyntaxUID == uid
    np.testing.assert_array_equal(read_image_file(packed, 1), read_image_file(plain, 1))
    np.testing.assert_array_equal(read_image_file(packed, 1)[:, :, 0], hand_percentile(stored * 0.5 - 100))


def test_file_channels_from_the_header(pydicom, xray: np.ndarray, tmp_path: Path) -> None:
    from semimed.data.base import file_channels

    rgb = np.repeat(xray[:, :, None], 3, axis=2)
    files = {
        save_png16(xray16(xray), tmp_path / "a.png"): 1,
        write_dicom(tmp_path / "b.dcm", xray, "MONOCHROME1", 8): 1,
        write_dicom(tmp_path / "c.dcm", rgb, "RGB", 8): 3,
    }
    Image.fromarray(rgb).save(tmp_path / "d.png")
    files[tmp_path / "d.png"] = 3
    assert {path: file_channels(path) for path in files} == files


def test_a_dicom_is_found_by_its_preamble_without_the_extension(
    pydicom, xray: np.ndarray, tmp_path: Path
) -> None:
    path = write_dicom(tmp_path / "IM0001", xray, "MONOCHROME2", 8)
    np.testing.assert_array_equal(read_image_file(path, 1)[:, :, 0], xray)


def test_dicoms_semimed_cannot_read_are_one_line(
    pydicom, xray: np.ndarray, tmp_path: Path, monkeypatch
) -> None:
    import pydicom.pixels
    from pydicom.uid import JPEG2000Lossless

    frames = write_dicom(tmp_path / "cine.dcm", np.stack([xray] * 3), "MONOCHROME2", 8)
    for read in (lambda p: read_image_file(p, 1), check_image_file):
        with pytest.raises(
            SemimedError, match=rf"^{frames}: multi-frame DICOM \(3 frames\); semimed reads one"
        ):
            read(frames)
    if not pydicom.pixels.get_encoder(JPEG2000Lossless).is_available:
        pytest.skip("no JPEG 2000 encoder installed to write the test file")
    packed = write_dicom(tmp_path / "j2k.dcm", stored12(xray), "MONOCHROME2", 12, compress=JPEG2000Lossless)
    decoder = pydicom.pixels.get_decoder(JPEG2000Lossless)
    monkeypatch.setattr(decoder, "_available", {})  # as if neither pillow's nor pylibjpeg's plugin were there
    message = (
        rf"^{packed}: DICOM pixel data compressed as JPEG 2000 Image Compression \(Lossless Only\) "
        r"\(1\.2\.840\.10008\.1\.2\.4\.90\) needs a decoder that is not installed: pip install pylibjpeg "
        r"pylibjpeg-openjpeg \(or pip install 'semimed\[dicom\]'\)$"
    )
    for read in (lambda p: read_image_file(p, 1), check_image_file):
        with pytest.raises(SemimedError, match=message):
            read(packed)


def test_a_dcm_file_that_is_not_dicom_is_one_line(pydicom, sample_data: Path, tmp_path: Path) -> None:
    png = sorted((sample_data / "chestxray14" / "images").glob("*.png"))[0]
    path = tmp_path / "renamed.dcm"
    path.write_bytes(png.read_bytes())
    message = rf"^{path}: not a DICOM image \(Rows, Columns missing from the header"
    for read in (lambda p: read_image_file(p, 1), check_image_file):
        with pytest.raises(SemimedError, match=message):
            read(path)


def test_reading_a_dicom_without_pydicom_names_the_extra(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "x.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM")
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom -> ImportError
    message = rf"^{path}: reading DICOM needs the optional package pydicom: pip install 'semimed\[dicom\]'$"
    for read in (lambda p: read_image_file(p, 1), check_image_file):
        with pytest.raises(SemimedError, match=message):
            read(path)


# ------------------------------------------------------------------------------------ the decode cache


def test_the_cache_stores_the_mapped_pixels(pydicom, xray: np.ndarray, tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    stored = stored12(xray)
    Image.fromarray(xray).save(root / "a8.png")
    save_png16(xray16(xray), root / "b16.png")
    write_dicom(root / "c.dcm", stored, "MONOCHROME1", 12, WindowCenter=900, WindowWidth=1201, **RESCALE)
    write_dicom(root / "d.dcm", stored, "MONOCHROME2", 12, **RESCALE)
    names = ["a8.png", "b16.png", "c.dcm", "d.dcm"]
    meta = pd.DataFrame({"patient_id": ["p0", "p1", "p2", "p3"], "path": names})
    meta.attrs["channels"] = 1
    dataset = LabeledImageSet(
        "mixed", "t", root, ["x", "y"], False, np.array([0, 1, 0, 1], dtype=np.int64), meta
    )
    expected = np.stack(
        [
            xray,
            hand_percentile(xray16(xray)),
            255 - hand_window(stored * 0.5 - 100, 900, 1201),
            hand_percentile(stored * 0.5 - 100),
        ]
    )[:, None]
    # 128 px: the images' own size, so the cache's resize is the identity and its bytes are the mapping's.
    decoded = load_pixels(dataset, 128, tmp_path / "cache", workers=1)
    assert decoded.bad_rows == {} and decoded.manifest["version"] == 3
    np.testing.assert_array_equal(np.asarray(decoded.pixels), expected)
    again = load_pixels(dataset, 128, tmp_path / "cache", workers=1)  # served from disk
    assert again.path == decoded.path
    assert np.load(again.path / "pixels.npy").tobytes() == expected.tobytes()
