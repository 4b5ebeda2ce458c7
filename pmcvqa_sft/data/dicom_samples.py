"""Synthetic DICOM objects for the tests, the PACS benchmark and `make demo-pacs`.

Every object is built from numbers (no real patient anywhere) and carries the same made-up patient,
SYNTHETIC_PATIENT, whose values the privacy test greps for in the logs of a whole run.

    ct_slice()               CT, 512x512, known HU regions (CT_REGIONS), two stored windows
    xray_monochrome1()       CR, MONOCHROME1 (high values shown dark), one stored window
    multiframe()             multi-frame SC, frame k marked by a bright band at row band k, no window
    compress(ds, uid)        the same object in a compressed transfer syntax (RLE, JPEG-LS, JPEG 2000,
                             JPEG baseline); JPEG Lossless has no Python encoder (dcmtk's dcmcjpeg does it)
    encapsulated_pdf()       an object without pixels
    huge_multiframe_header() a header claiming 40,000 frames of 512x512 (the size guard must refuse it)
    secondary_capture(img)   a PNG/PIL figure as a DICOM secondary capture (demo uploads)
    to_bytes(ds)             the Part 10 file bytes (what STOW-RS and a .dcm file hold)
"""
from __future__ import annotations

import copy
import datetime as _dt
import io
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (ExplicitVRLittleEndian, JPEGBaseline8Bit, PYDICOM_IMPLEMENTATION_UID,
                         generate_uid)

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"
MF_GRAY_BYTE_SC = "1.2.840.10008.5.1.4.1.1.7.2"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"

# Made-up identifying values: distinctive enough that a grep of the logs cannot hit them by chance.
SYNTHETIC_PATIENT = {
    "PatientName": "Synthetic^Privacy^Probe",
    "PatientID": "SYN7731PID",
    "PatientBirthDate": "19510302",
    "PatientSex": "O",
    "AccessionNumber": "ACC55821X",
}
STUDY_DATE = "20240117"

# (row0, row1, col0, col1, HU) as fractions of the image size, drawn in this order over air (-1000).
CT_REGIONS = {
    "air": (0.0, 1.0, 0.0, 1.0, -1000),
    "soft_tissue": (0.10, 0.90, 0.10, 0.90, 40),
    "water": (0.20, 0.40, 0.20, 0.40, 0),
    "fat": (0.20, 0.40, 0.60, 0.80, -100),
    "bone": (0.60, 0.80, 0.20, 0.40, 1000),
}
CT_WINDOWS = ((40.0, 400.0), (500.0, 2000.0))  # soft tissue first (the one a viewer shows), then bone


def region_box(name: str, rows: int, cols: int) -> tuple[slice, slice]:
    """The pixel slices of a CT_REGIONS entry for an image of rows x cols."""
    r0, r1, c0, c1, _ = CT_REGIONS[name]
    return slice(int(r0 * rows), int(r1 * rows)), slice(int(c0 * cols), int(c1 * cols))


def _base(sop_class: str, modality: str, *, study_uid: str | None, series_uid: str | None,
          patient: dict | None, instance_number: int, series_number: int,
          description: str) -> Dataset:
    """Patient, study, series, equipment and SOP common modules shared by every builder."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = sop_class
    for key, value in (patient or SYNTHETIC_PATIENT).items():
        setattr(ds, key, value)
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyID = "1"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = STUDY_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.ReferringPhysicianName = ""
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.SeriesDescription = description
    ds.Manufacturer = "pmcvqa_sft synthetic"
    return ds


def _set_pixels(ds: Dataset, arr: np.ndarray, *, photometric: str, bits_stored: int) -> None:
    """Image pixel module for a (frames, rows, cols[, 3]) or (rows, cols[, 3]) unsigned array."""
    color = arr.shape[-1] == 3 and arr.ndim in (3, 4) and photometric in ("RGB", "YBR_FULL")
    frames = arr.shape[0] if arr.ndim == (4 if color else 3) else 1
    ds.Rows, ds.Columns = arr.shape[-3:-1] if color else arr.shape[-2:]
    ds.SamplesPerPixel = 3 if color else 1
    if color:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if frames > 1 or "NumberOfFrames" in ds:
        ds.NumberOfFrames = frames
    ds.PixelData = np.ascontiguousarray(arr).tobytes()


def ct_slice(*, rows: int = 512, cols: int = 512, study_uid: str | None = None,
             series_uid: str | None = None, instance_number: int = 1, patient: dict | None = None,
             windows=CT_WINDOWS) -> Dataset:
    """A CT slice whose HU values are CT_REGIONS; stored = HU + 1024 (rescale intercept -1024)."""
    ds = _base(CT_IMAGE, "CT", study_uid=study_uid, series_uid=series_uid, patient=patient,
               instance_number=instance_number, series_number=1, description="synthetic CT")
    hu = np.empty((rows, cols), np.int32)
    for name, (*_, value) in CT_REGIONS.items():
        hu[region_box(name, rows, cols)] = value
    _set_pixels(ds, (hu + 1024).astype(np.uint16), photometric="MONOCHROME2", bits_stored=12)
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    if windows:
        ds.WindowCenter = [c for c, _ in windows]
        ds.WindowWidth = [w for _, w in windows]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.FrameOfReferenceUID = generate_uid()
    ds.ImagePositionPatient = [0.0, 0.0, float(instance_number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 1.0
    return ds


XRAY_WINDOW = (2048.0, 4096.0)


def xray_monochrome1(*, rows: int = 256, cols: int = 256, study_uid: str | None = None,
                     patient: dict | None = None) -> Dataset:
    """A CR image in MONOCHROME1: left half stored 3500 (shown dark), right half 500 (shown bright)."""
    ds = _base(CR_IMAGE, "CR", study_uid=study_uid, series_uid=None, patient=patient,
               instance_number=1, series_number=2, description="synthetic CR MONOCHROME1")
    arr = np.full((rows, cols), 500, np.uint16)
    arr[:, : cols // 2] = 3500
    _set_pixels(ds, arr, photometric="MONOCHROME1", bits_stored=12)
    ds.WindowCenter, ds.WindowWidth = XRAY_WINDOW
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    return ds


def multiframe(*, frames: int = 5, rows: int = 128, cols: int = 128, study_uid: str | None = None,
               patient: dict | None = None) -> Dataset:
    """An 8-bit multi-frame SC: a dim gradient, and in frame k (1-based) rows of band k at 255."""
    ds = _base(MF_GRAY_BYTE_SC, "OT", study_uid=study_uid, series_uid=None, patient=patient,
               instance_number=1, series_number=3, description="synthetic multi-frame")
    band = rows // frames
    arr = np.tile(np.linspace(0, 120, cols).astype(np.uint8), (frames, rows, 1))
    for k in range(frames):
        arr[k, k * band:(k + 1) * band, :] = 255
    ds.NumberOfFrames = frames
    _set_pixels(ds, arr, photometric="MONOCHROME2", bits_stored=8)
    ds.ConversionType = "WSD"
    return ds


def multiframe_band(frame: int, frames: int, rows: int) -> slice:
    """The rows that are bright in 1-based `frame` of a multiframe() object."""
    band = rows // frames
    return slice((frame - 1) * band, frame * band)


def compress(ds: Dataset, transfer_syntax: str) -> Dataset:
    """A compressed copy of `ds` in `transfer_syntax` (same SOP Instance UID).

    RLE, JPEG-LS and JPEG 2000 use pydicom's encoders (pyjpegls, pylibjpeg-openjpeg). pydicom has no
    JPEG baseline encoder, so 8-bit frames are JPEG-encoded by Pillow and encapsulated here.
    """
    out = copy.deepcopy(ds)  # compress() edits elements in place; the source must stay as it was
    if transfer_syntax != JPEGBaseline8Bit:
        out.compress(transfer_syntax, generate_instance_uid=False)
        return out
    if ds.BitsAllocated != 8:
        raise ValueError("JPEG baseline holds 8-bit samples only")
    arr = ds.pixel_array
    frames = arr if int(getattr(ds, "NumberOfFrames", 1)) > 1 else arr[None]
    parts = []
    for frame in frames:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=95)
        parts.append(buf.getvalue())
    out.PixelData = encapsulate(parts)
    out["PixelData"].VR = "OB"
    if ds.SamplesPerPixel == 3:  # Pillow stores colour JPEG as YCbCr with 4:2:0 subsampling
        out.PhotometricInterpretation = "YBR_FULL_422"
    out.LossyImageCompression = "01"
    out.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return out


# The smallest valid PDF: the object needs a document, not pixels.
_PDF = (b"%PDF-1.1\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n2 0 obj<</Type/Pages/Kids[]/Count 0>>"
        b"endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n")


def encapsulated_pdf(*, study_uid: str | None = None, patient: dict | None = None) -> Dataset:
    """An Encapsulated PDF object: a real DICOM instance with no pixel data."""
    ds = _base(ENCAPSULATED_PDF, "DOC", study_uid=study_uid, series_uid=None, patient=patient,
               instance_number=1, series_number=4, description="synthetic PDF")
    ds.ConversionType = "WSD"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.DocumentTitle = "synthetic"
    ds.BurnedInAnnotation = "NO"
    ds.EncapsulatedDocument = _PDF + (b"\0" if len(_PDF) % 2 else b"")
    return ds


def huge_multiframe_header(*, frames: int = 40_000, rows: int = 512, cols: int = 512,
                           study_uid: str | None = None, patient: dict | None = None) -> Dataset:
    """A multi-frame header claiming `frames` frames; only one frame of data is really present.

    A reader must refuse it from the header (rows x cols x frames) before touching the pixel data.
    """
    ds = multiframe(frames=1, rows=rows, cols=cols, study_uid=study_uid, patient=patient)
    ds.NumberOfFrames = frames
    ds.SeriesDescription = "synthetic oversized multi-frame"
    return ds


def secondary_capture(image, *, study_uid: str | None = None, series_uid: str | None = None,
                      patient: dict | None = None, instance_number: int = 1,
                      description: str = "figure") -> Dataset:
    """A figure (PIL image or a path PIL reads) as a Secondary Capture: grayscale stays
    MONOCHROME2 8-bit, anything else becomes RGB. The pixels are kept exactly (no window)."""
    img = image if isinstance(image, Image.Image) else Image.open(Path(image))
    img.load()
    gray = img.mode in ("L", "1", "I;16", "I", "F")
    arr = np.asarray(img.convert("L" if gray else "RGB"))
    ds = _base(SC_IMAGE, "OT", study_uid=study_uid, series_uid=series_uid, patient=patient,
               instance_number=instance_number, series_number=1, description=description)
    ds.ConversionType = "WSD"
    ds.DateOfSecondaryCapture = _dt.date.today().strftime("%Y%m%d")
    _set_pixels(ds, arr, photometric="MONOCHROME2" if gray else "RGB", bits_stored=8)
    if gray:  # the identity window for 8 bits, so a viewer (and read_dicom) shows the figure as is
        ds.WindowCenter, ds.WindowWidth = 128, 256
    return ds


def to_bytes(ds: Dataset) -> bytes:
    """The Part 10 file (preamble, 'DICM', file meta) that STOW-RS and a .dcm file need."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write(ds: Dataset, path) -> Path:
    """Write `ds` as a Part 10 file at `path`."""
    path = Path(path)
    path.write_bytes(to_bytes(ds))
    return path
