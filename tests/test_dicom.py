"""DICOM -> the RGB image a viewer shows (no PACS needed): windows, MONOCHROME1, frames, colour,
compressed syntaxes, and the one-line refusals."""
from __future__ import annotations

import io
import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import (JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, JPEGLosslessSV1,
                         RLELossless)

from pmcvqa_sft.data import dicom, pacs
from pmcvqa_sft.data import dicom_samples as synth
from pmcvqa_sft.core.errors import InputError


def gray(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img)
    assert img.mode == "RGB" and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    return arr[..., 0].astype(int)


def mean(arr, name, rows=512, cols=512):
    return arr[synth.region_box(name, rows, cols)].mean()


def expected(hu, center, width):
    """PS3.3 C.11.2.1.2.1 linear window, as 8 bits."""
    lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    y = 0.0 if hu <= lo else 1.0 if hu > hi else (hu - (center - 0.5)) / (width - 1) + 0.5
    return round(y * 255)


def test_is_dicom(tmp_path):
    data = synth.to_bytes(synth.ct_slice(rows=8, cols=8))
    path = synth.write(synth.ct_slice(rows=8, cols=8), tmp_path / "x.bin")
    png = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(png)
    assert dicom.is_dicom(data) and dicom.is_dicom(path)
    assert not dicom.is_dicom(png) and not dicom.is_dicom(b"x" * 200) and not dicom.is_dicom(tmp_path / "no")
    assert dicom.has_dicom_suffix("a/B.DCM") and not dicom.has_dicom_suffix("b.png")


def test_ct_stored_window_first_of_two_with_modality_lut(tmp_path):
    path = synth.write(synth.ct_slice(), tmp_path / "ct.dcm")
    img, info = dicom.read_dicom(path)
    arr = gray(img)
    c, w = synth.CT_WINDOWS[0]
    for name in ("water", "fat", "bone"):  # HU = stored - 1024: the rescale applied
        assert mean(arr, name) == expected(synth.CT_REGIONS[name][-1], c, w), name
    assert arr[256, 256] == expected(synth.CT_REGIONS["soft_tissue"][-1], c, w)  # outside the boxes
    assert arr[0, 0] == 0 and info["window"] == [c, w] and info["window_source"] == "stored"
    assert info["modality"] == "CT" and info["frames"] == 1 and "window center 40 width 400" in dicom.describe(info)


def test_ct_window_override():
    img, info = dicom.read_dicom(synth.to_bytes(synth.ct_slice()), window=dicom.parse_window("0,2000"))
    arr = gray(img)
    assert mean(arr, "water") == expected(0, 0, 2000) and mean(arr, "bone") == expected(1000, 0, 2000)
    assert info["window_source"] == "--window"


@pytest.mark.parametrize("text", ["40", "a,b", "40,0", "40,nan", "1,2,3"])
def test_bad_window(text):
    with pytest.raises(InputError, match="--window"):
        dicom.parse_window(text)


def test_percentile_window_when_none_stored():
    img, info = dicom.read_dicom(synth.to_bytes(synth.ct_slice(windows=None)))
    arr = gray(img)
    assert info["window_source"].startswith("percentile")
    # HU -1000..1000 spread over the full range: air black, bone white, water between
    assert mean(arr, "bone") == 255 and arr[0, 0] == 0 and 100 < mean(arr, "water") < 180


def test_monochrome1_is_inverted():
    img, info = dicom.read_dicom(synth.to_bytes(synth.xray_monochrome1()))
    arr = gray(img)
    assert info["photometric"] == "MONOCHROME1"
    assert arr[0, 0] < 60 and arr[0, -1] > 200  # stored 3500 (left) is dark, 500 (right) bright
    img2, _ = dicom.read_dicom(synth.to_bytes(synth.xray_monochrome1()), window=(2048, 4096))
    assert gray(img2)[0, 0] < 60  # inverted with an override window too


def test_multiframe_middle_default_and_frame_choice():
    data = synth.to_bytes(synth.multiframe(frames=5))
    img, info = dicom.read_dicom(data)
    bright = [gray(img)[synth.multiframe_band(k, 5, 128)].mean() for k in range(1, 6)]
    assert bright.index(max(bright)) == 2 and info["frame"] == 3
    assert "frame 3 of 5" in dicom.describe(info) and "middle" in dicom.describe(info)
    img, info = dicom.read_dicom(data, frame=5)
    assert gray(img)[synth.multiframe_band(5, 5, 128)].mean() == 255 and info["frame_source"] == "--frame"
    with pytest.raises(InputError, match=r"--frame 6 is out of range: the object has 5 frame\(s\)"):
        dicom.read_dicom(data, frame=6)


def test_secondary_capture_round_trip_exact(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    png = tmp_path / "fig.png"
    Image.fromarray(rgb).save(png)
    img, info = dicom.read_dicom(synth.to_bytes(synth.secondary_capture(png)))
    assert (np.asarray(img) == rgb).all() and info["window_source"].startswith("none")
    img, _ = dicom.read_dicom(synth.to_bytes(synth.secondary_capture(Image.fromarray(rgb[..., 1]))))
    assert (gray(img) == rgb[..., 1]).all()


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
@pytest.mark.parametrize("build", [synth.ct_slice, synth.xray_monochrome1, synth.multiframe])
def test_lossless_syntaxes_decode_to_the_same_image(syntax, build):
    ds = build()
    want, _ = dicom.read_dicom(synth.to_bytes(ds))
    got, info = dicom.read_dicom(synth.to_bytes(synth.compress(ds, syntax)))
    assert info["transfer_syntax"] == syntax.name and (np.asarray(got) == np.asarray(want)).all()


def test_jpeg_baseline_gray_and_colour():
    ds = synth.multiframe()
    want, _ = dicom.read_dicom(synth.to_bytes(ds))
    got, info = dicom.read_dicom(synth.to_bytes(synth.compress(ds, JPEGBaseline8Bit)))
    assert info["transfer_syntax"] == JPEGBaseline8Bit.name
    assert np.abs(np.asarray(got).astype(int) - np.asarray(want)).max() <= 4  # lossy, but close
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[..., 0], rgb[8:24, :, 1] = 200, 220
    got, _ = dicom.read_dicom(synth.to_bytes(synth.compress(synth.secondary_capture(Image.fromarray(rgb)),
                                                            JPEGBaseline8Bit)))
    assert np.abs(np.asarray(got).astype(int) - rgb).mean() < 4  # YBR_FULL_422 converted to RGB


def test_jpeg_lossless_made_by_dcmtk(tmp_path):
    if not shutil.which("dcmcjpeg"):
        pytest.skip("dcmcjpeg (dcmtk, installed with orthanc-dicomweb) is needed to encode JPEG Lossless")
    src = synth.write(synth.ct_slice(), tmp_path / "ct.dcm")
    subprocess.run(["dcmcjpeg", "+e1", str(src), str(tmp_path / "jl.dcm")], check=True)
    got, info = dicom.read_dicom(tmp_path / "jl.dcm")
    want, _ = dicom.read_dicom(src)
    assert info["transfer_syntax"] == JPEGLosslessSV1.name and (np.asarray(got) == np.asarray(want)).all()


def test_missing_decoder_names_the_package(tmp_path):
    """pylibjpeg hidden from a fresh interpreter: JPEG Lossless then has no decoder."""
    jl = tmp_path / "jl.dcm"
    if not shutil.which("dcmcjpeg"):
        pytest.skip("dcmcjpeg (dcmtk) is needed to encode JPEG Lossless")
    subprocess.run(["dcmcjpeg", "+e1", str(synth.write(synth.ct_slice(rows=16, cols=16), tmp_path / "c.dcm")),
                    str(jl)], check=True)
    code = ("import sys; sys.modules['pylibjpeg'] = None\n"
            "from pmcvqa_sft.data import dicom\n"
            "from pmcvqa_sft.core.errors import InputError\n"
            f"try:\n    dicom.read_dicom({str(jl)!r})\nexcept InputError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": ":".join(sys.path)}).stdout
    assert "JPEG Lossless" in out and "pip install pylibjpeg pylibjpeg-libjpeg" in out, out


def test_video_syntax_is_refused_by_name():
    ds = synth.ct_slice(rows=16, cols=16)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.102"
    ds.PixelData = encapsulate([b"\0" * 64])
    ds["PixelData"].VR = "OB"
    with pytest.raises(InputError, match=r"MPEG-4 AVC/H.264.*\(1.2.840.10008.1.2.4.102\) is not supported.*PyAV"):
        dicom.read_dicom(synth.to_bytes(ds))


@pytest.mark.parametrize("build,match", [
    (synth.encapsulated_pdf, r"no pixel data \(Encapsulated PDF Storage\)"),
    (synth.huge_multiframe_header, r"40000 frame\(s\) of 512x512 .* refused before decoding"),
])
def test_refusals_name_the_uid_only(tmp_path, build, match):
    ds = build()
    path = synth.write(ds, tmp_path / "x.dcm")
    with pytest.raises(InputError, match=match) as err:
        dicom.read_dicom(path)
    msg = str(err.value)
    assert ds.SOPInstanceUID in msg and "\n" not in msg
    assert not any(v in msg for v in synth.SYNTHETIC_PATIENT.values() if len(v) > 1)


def test_corrupt_truncated_and_not_dicom(tmp_path):
    data = synth.to_bytes(synth.ct_slice())
    cases = {"half": (data[: len(data) // 2], "pixel data"), "head": (data[:300], "truncated"),
             "text": (b"not a dicom file" * 20, "not a DICOM file"), "empty": (b"", "empty file")}
    for name, (blob, needle) in cases.items():
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(blob)
        with pytest.raises(InputError, match=needle) as err:
            dicom.read_dicom(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InputError, match="no such file"):
        dicom.read_dicom(tmp_path / "missing.dcm")


def test_real_world_patient_values_are_neither_quoted_nor_fatal(caplog, recwarn):
    """An invalid birth date and a name without '^' (both common in real archives): highdicom would
    raise a ValueError quoting the date and log the name at WARNING while building the SR."""
    ds = synth.ct_slice(rows=16, cols=16)
    ds["PatientBirthDate"].value = "1951-03-02"   # invalid DA
    ds.PatientName = "Zyxwvutsrq"                 # valid PN, but no '^'
    del ds.AccessionNumber                        # type 2, absent
    data = synth.to_bytes(ds)
    caplog.set_level("DEBUG")
    caplog.clear()     # the assignment above warned (writing validation); only what follows counts
    recwarn.clear()
    dicom.read_dicom(data)
    source = pydicom.dcmread(io.BytesIO(data))
    sr = pacs.build_answer_sr(source, question="q", choices=["A: x"], answer="A: x", model="m")
    assert sr.PatientBirthDate == "1951-03-02" and sr.PatientName == "Zyxwvutsrq"  # kept as stored
    assert source.PatientBirthDate == "1951-03-02"                                # source untouched
    logged = caplog.text + " ".join(str(w.message) for w in recwarn)
    assert "1951-03-02" not in logged and "Zyxwvutsrq" not in logged


def test_dicom_members_as_figures_and_open_image(tmp_path):
    """--images folders/zips with .dcm members: shown windowed, or skipped with the reason `dicom`;
    open_image (--image, console /image) takes the frame and window and says which it used."""
    import zipfile

    from pmcvqa_sft.data.figures import FigureSkip, check_figure, load_figure, open_image
    synth.write(synth.multiframe(), tmp_path / "mf.dcm")
    synth.write(synth.encapsulated_pdf(), tmp_path / "report.dcm")
    with zipfile.ZipFile(tmp_path / "figs.zip", "w") as zf:
        zf.write(tmp_path / "mf.dcm", "mf.dcm")
        zf.write(tmp_path / "report.dcm", "report.dcm")
    for root, kind in ((str(tmp_path), "folder"), (str(tmp_path / "figs.zip"), "zip")):
        assert check_figure(root, "mf.dcm", kind) == (128, 128)
        with pytest.raises(FigureSkip) as skip:
            check_figure(root, "report.dcm", kind)
        assert skip.value.reason == "dicom" and "no pixel data" in str(skip.value)
    said = []
    middle = open_image(tmp_path / "mf.dcm", log=said.append)
    first = load_figure(str(tmp_path), "mf.dcm", "folder", frame=1, window=(50, 10))
    assert middle.mode == "RGB" and "frame 3 of 5" in said[0]
    assert np.asarray(first).tolist() != np.asarray(middle).tolist()
    with pytest.raises(InputError, match="no pixel data"):
        open_image(tmp_path / "report.dcm")
