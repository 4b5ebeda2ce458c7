"""DICOM figures: one frame, shown the way a viewer shows it, as the RGB image the model gets.

    read_dicom(src, frame=None, window=None) -> (PIL RGB image, info)

The pixel pipeline is highdicom's `Image.get_frame` (modality LUT -> VOI window -> presentation LUT,
which also inverts MONOCHROME1), so the rules of PS3.3 C.11 are not re-implemented here:
- window: `window=(center, width)` (`--window C,W`) if given, else the first stored window (or VOI
  LUT), else a 0.5-99.5 percentile window of the frame's modality values (said in `info`);
- frame: 1-based `frame`, default the middle one (said in `info`, so the CLI can print it);
- colour (RGB, YBR_*, PALETTE COLOR) is shown as stored: windows apply to grayscale only;
- compressed transfer syntaxes are decoded by pydicom's plugins (pylibjpeg + pylibjpeg-libjpeg for
  JPEG baseline/extended/lossless, pylibjpeg-openjpeg for JPEG 2000, pyjpegls for JPEG-LS).

Refusals are one-line `InputError`s naming the file and the SOP Instance UID, never a patient value:
no pixel data (an SR, a PDF), an unsupported transfer syntax (named, with the package that would
decode it), a corrupt or truncated file, and an object larger than MAX_DICOM_PIXELS judged from its
header alone (frames x rows x columns x samples), before any pixel data is decoded.
"""
from __future__ import annotations

import contextlib
import io
import os
import struct
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image
from pydicom import config as _pydicom_config
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from pmcvqa_sft.core.errors import InputError

# 2**29 samples: 2,048 frames of 512x512 (1 GiB at 16 bits) is the most one object may claim.
MAX_DICOM_PIXELS = 1 << 29
DICOM_SUFFIXES = (".dcm", ".dicom")
PERCENTILES = (0.5, 99.5)
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")

# What decodes each compressed syntax (pydicom's plugins); named when it is missing.
_JPEG = "pylibjpeg + pylibjpeg-libjpeg"
_J2K = "pylibjpeg + pylibjpeg-openjpeg"
_DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.50": _JPEG, "1.2.840.10008.1.2.4.51": _JPEG,   # JPEG baseline, extended
    "1.2.840.10008.1.2.4.57": _JPEG, "1.2.840.10008.1.2.4.70": _JPEG,   # JPEG lossless (14, 14 SV1)
    "1.2.840.10008.1.2.4.80": "pyjpegls", "1.2.840.10008.1.2.4.81": "pyjpegls",   # JPEG-LS
    "1.2.840.10008.1.2.4.90": _J2K, "1.2.840.10008.1.2.4.91": _J2K,     # JPEG 2000
    "1.2.840.10008.1.2.4.201": _J2K, "1.2.840.10008.1.2.4.202": _J2K, "1.2.840.10008.1.2.4.203": _J2K,
    "1.2.840.10008.1.2.5": "pydicom itself (RLE)",
}
_VIDEO_HINT = ("a video syntax: pydicom decodes no video; extract frames with ffmpeg or PyAV, or have "
               "the PACS transcode the object")


def is_dicom(src) -> bool:
    """True for a DICOM Part 10 file (path) or its bytes: 'DICM' after the 128-byte preamble."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src[128:132]) == b"DICM"
    try:
        with open(src, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def has_dicom_suffix(name) -> bool:
    """`.dcm` / `.dicom` names are read as DICOM even without the Part 10 marker."""
    return str(name).lower().endswith(DICOM_SUFFIXES)


def parse_window(text: str) -> tuple[float, float]:
    """`--window CENTER,WIDTH` -> (center, width); width must be at least 1 (PS3.3 C.11.2.1.2)."""
    try:
        center, width = (float(p) for p in str(text).split(","))
    except ValueError:
        raise InputError(f"--window '{text}': expected CENTER,WIDTH, e.g. 40,400") from None
    if not (np.isfinite(center) and np.isfinite(width)) or width < 1:
        raise InputError(f"--window '{text}': the width must be a number of at least 1")
    return center, width


@contextlib.contextmanager
def quiet_pydicom():
    """Read and copy without value validation: pydicom's "invalid value" warnings quote the value (a
    birth date, a name) into the logs, and values are converted lazily, on first access, so this
    must cover every use of a read dataset. Pixels are unaffected. Process-wide while active
    (pydicom has no per-call switch)."""
    settings = _pydicom_config.settings
    before = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = _pydicom_config.IGNORE
    try:
        yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = before


def check_size(frames: int, rows: int, cols: int, samples: int = 1, *, what: str,
               max_pixels: int = MAX_DICOM_PIXELS) -> None:
    """Refuse an object whose header claims more than `max_pixels` samples (before reading pixels)."""
    total = int(frames) * int(rows) * int(cols) * int(samples)
    if total > max_pixels:
        raise InputError(f"{what}: {frames} frame(s) of {rows}x{cols} ({total:,} samples) is over the "
                         f"{max_pixels:,}-sample limit for one DICOM object; refused before decoding")


def _read(src, what: str, stop_before_pixels: bool) -> pydicom.Dataset:
    try:
        with quiet_pydicom():
            fh = io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray, memoryview)) else src
            return pydicom.dcmread(fh, stop_before_pixels=stop_before_pixels)
    except pydicom.errors.InvalidDicomError:
        raise InputError(f"{what}: not a DICOM file (no 'DICM' marker, no file meta)") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError, struct.error) as exc:
        # The exception text may quote element values; only its type is shown.
        raise InputError(f"{what}: corrupt or truncated DICOM file ({type(exc).__name__})") from None


def _uid_label(ds, what: str) -> str:
    uid = str(ds.get("SOPInstanceUID", "") or "")
    return f"{what} (SOP Instance UID {uid})" if uid and uid not in what else what


def _sop_class_name(ds) -> str:
    uid = ds.get("SOPClassUID", "")
    return UID(str(uid)).name if uid else "unknown SOP class"


def _check_transfer_syntax(ds, what: str) -> str:
    meta = getattr(ds, "file_meta", None)
    ts = UID(str(meta.get("TransferSyntaxUID", "1.2.840.10008.1.2.1")) if meta else "1.2.840.10008.1.2.1")
    if not ts.is_transfer_syntax:
        raise InputError(f"{what}: unknown transfer syntax UID {ts}")
    if not ts.is_compressed:
        return ts.name
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        hint = _VIDEO_HINT if "MPEG" in ts.name or "HEVC" in ts.name else "no pydicom decoder exists"
        raise InputError(f"{what}: transfer syntax {ts.name} ({ts}) is not supported: {hint}") from None
    if not decoder.is_available:
        pkg = _DECODER_PACKAGES.get(str(ts), "a pydicom pixel-data plugin")
        raise InputError(f"{what}: transfer syntax {ts.name} ({ts}) needs a decoder that is not "
                         f"installed: pip install {pkg.replace(' + ', ' ')}")
    return ts.name


def _stored_window(ds) -> tuple[float, float] | str | None:
    """The first stored window (center, width), 'VOI LUT' for a stored LUT, or None."""
    holders = [ds]
    for seq in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for item in ds.get(seq, [])[:1]:
            holders.extend(item.get("FrameVOILUTSequence", [])[:1])
    for item in holders:
        if "WindowCenter" in item and "WindowWidth" in item:
            c, w = item.WindowCenter, item.WindowWidth
            first = (lambda v: float(v[0]) if isinstance(v, pydicom.multival.MultiValue) else float(v))
            return first(c), first(w)
        if "VOILUTSequence" in item:
            return "VOI LUT"
    return None


def _pick_frame(n_frames: int, frame: int | None, what: str) -> tuple[int, str]:
    if frame is None:
        middle = (n_frames + 1) // 2
        return middle, ("default: the middle frame; choose another with --frame N" if n_frames > 1
                        else "single frame")
    if not 1 <= frame <= n_frames:
        raise InputError(f"{what}: --frame {frame} is out of range: the object has {n_frames} frame(s), "
                         f"numbered 1..{n_frames}")
    return frame, "--frame"


def _to_uint8(frame: np.ndarray) -> np.ndarray:
    return np.clip(np.round(frame * 255.0), 0, 255).astype(np.uint8)


def dataset_to_image(ds: pydicom.Dataset, *, frame: int | None = None,
                     window: tuple[float, float] | None = None, what: str = "DICOM object",
                     max_pixels: int = MAX_DICOM_PIXELS) -> tuple[Image.Image, dict]:
    """One frame of a decoded-or-not dataset as the RGB image a viewer shows, plus `info`."""
    what = _uid_label(ds, what)
    if "SOPClassUID" not in ds:  # every DICOM object has one; a file cut short in its header has none
        raise InputError(f"{what}: corrupt or truncated DICOM file (no SOP Class UID)")
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise InputError(f"{what}: no pixel data ({_sop_class_name(ds)}): not an image")
    ts_name = _check_transfer_syntax(ds, what)
    try:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        rows, cols, samples = int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1))
    except (AttributeError, TypeError, ValueError):
        raise InputError(f"{what}: corrupt image header (Rows, Columns or NumberOfFrames)") from None
    if n_frames < 1 or rows < 1 or cols < 1:
        raise InputError(f"{what}: empty image ({n_frames} frame(s) of {rows}x{cols})")
    check_size(n_frames, rows, cols, samples, what=what, max_pixels=max_pixels)
    index, frame_note = _pick_frame(n_frames, frame, what)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    info = {
        "modality": str(ds.get("Modality", "")), "sop_class": _sop_class_name(ds),
        "study_instance_uid": str(ds.get("StudyInstanceUID", "")),
        "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
        "transfer_syntax": ts_name, "photometric": photometric, "rows": rows, "columns": cols,
        "frames": n_frames, "frame": index, "frame_source": frame_note,
        "window": None, "window_source": None,
    }
    try:
        with quiet_pydicom():
            image = hd.Image.from_dataset(ds, copy=False)
            if photometric in _COLOR:
                arr = image.get_frame(index, apply_voi_transform=False, apply_icc_profile=False,
                                      apply_palette_color_lut=photometric == "PALETTE COLOR" or None)
                bits = int(ds.get("BitsStored", 8)) if photometric != "PALETTE COLOR" else 16
                if arr.max(initial=0) > 255:  # >8-bit colour: scale to 8 bits
                    arr = arr / (2 ** bits - 1) * 255.0
                rgb = np.clip(np.round(arr), 0, 255).astype(np.uint8)
                info["window_source"] = "none (colour image)"
                return Image.fromarray(rgb, "RGB"), info
            stored = _stored_window(ds)
            if window is not None:
                selector, info["window"], info["window_source"] = (
                    hd.VOILUTTransformation(window_center=window[0], window_width=window[1]),
                    list(window), "--window")
            elif stored is not None:
                selector, info["window_source"] = 0, "stored"
                info["window"] = list(stored) if isinstance(stored, tuple) else stored
            else:
                # No stored window: a percentile window over this frame's modality values (HU for CT),
                # chosen so that the low percentile maps to black and the high one to white.
                values = image.get_frame(index, apply_voi_transform=False, apply_presentation_lut=False)
                lo, hi = (float(v) for v in np.percentile(values, PERCENTILES))
                hi = max(hi, lo + 1.0)
                center, width = (lo + hi + 1.0) / 2.0, hi - lo + 1.0
                selector = hd.VOILUTTransformation(window_center=center, window_width=width)
                info["window"], info["window_source"] = [round(center, 3), round(width, 3)], \
                    f"percentile {PERCENTILES[0]}-{PERCENTILES[1]}, none stored"
            gray = image.get_frame(index, apply_voi_transform=True, voi_transform_selector=selector,
                                   voi_output_range=(0.0, 1.0))
    except InputError:
        raise
    except Exception as exc:  # decoder errors describe lengths and markers, not patient values
        detail = (str(exc).splitlines() or [type(exc).__name__])[0].split(" - ")[0][:160]
        raise InputError(f"{what}: cannot decode the pixel data ({ts_name}): {detail}") from None
    return Image.fromarray(_to_uint8(gray), "L").convert("RGB"), info


def read_dicom(src, *, frame: int | None = None, window: tuple[float, float] | None = None,
               name: str | None = None, max_pixels: int = MAX_DICOM_PIXELS) -> tuple[Image.Image, dict]:
    """A DICOM file (path) or its bytes -> (RGB image as a viewer shows it, info).

    The header is read first without the pixel data, so an oversized object is refused before its
    pixels are read; `name` labels bytes in messages (e.g. "instance from the PACS").
    """
    data = src if isinstance(src, (bytes, bytearray, memoryview)) else None
    what = name or ("DICOM bytes" if data is not None else f"file '{src}'")
    if data is None:
        path = Path(os.path.expanduser(str(src)))
        if not path.is_file():
            raise InputError(f"{what}: no such file")
        if path.stat().st_size == 0:
            raise InputError(f"{what}: empty file")
        src = path
    header = _read(data if data is not None else src, what, stop_before_pixels=True)
    if any(k in header for k in ("NumberOfFrames", "Rows")):
        try:
            check_size(int(header.get("NumberOfFrames", 1) or 1), int(header.get("Rows", 0) or 0),
                       int(header.get("Columns", 0) or 0), int(header.get("SamplesPerPixel", 1) or 1),
                       what=_uid_label(header, what), max_pixels=max_pixels)
        except (TypeError, ValueError):
            raise InputError(f"{_uid_label(header, what)}: corrupt image header") from None
    ds = _read(data if data is not None else src, what, stop_before_pixels=False)
    return dataset_to_image(ds, frame=frame, window=window, what=what, max_pixels=max_pixels)


def describe(info: dict) -> str:
    """One line for the CLI: which frame and which window the model saw (no patient values)."""
    parts = [f"DICOM {info['modality'] or info['sop_class']} {info['columns']}x{info['rows']}"]
    if info["frames"] > 1:
        parts.append(f"frame {info['frame']} of {info['frames']} ({info['frame_source']})")
    w = info["window"]
    if isinstance(w, list):
        parts.append(f"window center {w[0]:g} width {w[1]:g} ({info['window_source']})")
    elif info["window_source"]:
        parts.append(f"window: {w or info['window_source']}")
    return ", ".join(parts)
