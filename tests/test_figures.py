"""figures.py: figure sources (folder / zip / hub), checks with named skips, zip slip, RGB conversion."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from pmcvqa_sft.data import figures
from pmcvqa_sft.core.errors import InputError
from pmcvqa_sft.data.figures import FigureSkip, FigureSource


def png(size=(40, 30), mode="RGB", color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def jpeg(size=(40, 30), mode="RGB", color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "JPEG")
    return buf.getvalue()


def noisy(size=(64, 64), fmt="PNG") -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def bomb_png() -> bytes:
    """20000 x 20000 one-bit PNG: 48 KB on disk, 400 M pixels decoded."""
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, "PNG")
    return buf.getvalue()


def write_zip(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return path


# ---------------------------------------------------------------- sources and resolving
def test_folder_source_direct_and_single_top_folder(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(png())
    src = FigureSource(tmp_path / "flat")
    assert (src.kind, src.prefix, src.resolve("a.png")) == ("folder", "", "a.png")
    (tmp_path / "unpacked" / "images").mkdir(parents=True)
    (tmp_path / "unpacked" / "images" / "b.png").write_bytes(png())
    src = FigureSource(tmp_path / "unpacked")  # an unpacked images.zip: the images/ folder is found
    assert src.prefix == "images" and src.resolve("b.png") == "images/b.png"
    assert src.resolve("images/b.png") == "images/b.png"  # a Figure_path that already has the folder
    assert figures.check_figure(src.root, "images/b.png", src.kind) == (40, 30)


def test_zip_source_with_top_folder_ignores_macosx(tmp_path):
    z = write_zip(tmp_path / "images_2.zip", {"figures/PMC1_F1.jpg": jpeg(), "figures/PMC2_F2.png": png(),
                                               "__MACOSX/figures/._PMC1_F1.jpg": b"junk"})
    src = FigureSource(z)
    assert (src.kind, src.prefix) == ("zip", "figures")
    assert src.resolve("PMC1_F1.jpg") == "figures/PMC1_F1.jpg"
    assert figures.check_figure(src.root, "figures/PMC1_F1.jpg", "zip") == (40, 30)
    assert figures.load_figure(src.root, "figures/PMC2_F2.png", "zip").getpixel((0, 0)) == (200, 10, 10)
    with pytest.raises(FigureSkip) as e:
        src.resolve("PMC9_F9.jpg")
    assert e.value.reason == "missing"
    assert src.describe()["unsafe_members"] == 0


def test_bad_images_argument_is_one_line_error(tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        FigureSource(tmp_path / "nope.zip")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="expected a folder of figures or a .zip"):
        FigureSource(tmp_path / "x.csv")


@pytest.mark.parametrize("fp", ["../secret.png", "/etc/passwd", "a/../../b.png", "C:/x.png", "..\\x.png"])
def test_unsafe_figure_paths_are_refused(tmp_path, fp):
    (tmp_path / "figs").mkdir()
    src = FigureSource(tmp_path / "figs")
    with pytest.raises(FigureSkip) as e:
        src.resolve(fp)
    assert e.value.reason == "unsafe_path"
    with pytest.raises(FigureSkip) as e:
        figures.read_bytes(src.root, fp, "folder")
    assert e.value.reason == "unsafe_path"


def test_symlink_out_of_folder_is_refused(tmp_path):
    (tmp_path / "outside.png").write_bytes(png())
    (tmp_path / "figs").mkdir()
    (tmp_path / "figs" / "x.png").write_bytes(png())
    (tmp_path / "figs" / "link.png").symlink_to(tmp_path / "outside.png")
    src = FigureSource(tmp_path / "figs")
    with pytest.raises(FigureSkip) as e:
        src.resolve("link.png")
    assert e.value.reason == "unsafe_path"
    with pytest.raises(FigureSkip) as e:
        figures.read_bytes(src.root, "link.png", "folder")
    assert e.value.reason == "unsafe_path"


def test_zip_slip_members_are_counted_and_never_readable(tmp_path):
    z = write_zip(tmp_path / "evil.zip", {"../evil.png": png(), "/abs/evil.png": png(), "ok.png": png()})
    before = sorted(p.name for p in tmp_path.iterdir())
    src = FigureSource(z)
    assert src.unsafe_members == 2 and src.prefix == ""
    for fp in ("../evil.png", "/abs/evil.png"):
        with pytest.raises(FigureSkip) as e:
            src.resolve(fp)
        assert e.value.reason == "unsafe_path"
    assert src.resolve("ok.png") == "ok.png"
    figures.load_figure(src.root, "ok.png", "zip")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing extracted, nothing written
    assert not (tmp_path.parent / "evil.png").exists()


# ---------------------------------------------------------------- checks: every bad case is a named skip
def _reason(root, ref, kind="folder"):
    with pytest.raises(FigureSkip) as e:
        figures.check_figure(root, ref, kind)
    return e.value.reason


def test_each_bad_figure_is_a_named_skip(tmp_path):
    good, npng, njpg = png(), noisy(), noisy(fmt="JPEG")
    cases = {"empty.png": b"", "text.png": b"this is not an image at all",
             "trunc.png": npng[: len(npng) // 2], "trunc.jpg": njpg[: len(njpg) // 2],
             "bomb.png": bomb_png(), "good.png": good}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    assert figures.check_figure(tmp_path, "good.png", "folder") == (40, 30)
    assert _reason(tmp_path, "missing.png") == "missing"
    assert _reason(tmp_path, "empty.png") == "empty"
    assert _reason(tmp_path, "text.png") == "unreadable"
    assert _reason(tmp_path, "trunc.png") == "truncated"
    assert _reason(tmp_path, "trunc.jpg") == "truncated"
    assert _reason(tmp_path, "bomb.png") == "oversized"
    # the same inside a zip
    z = write_zip(tmp_path / "all.zip", cases)
    for name, want in (("empty.png", "empty"), ("text.png", "unreadable"), ("trunc.png", "truncated"),
                       ("bomb.png", "oversized"), ("nope.png", "missing")):
        assert _reason(z, name, "zip") == want
    assert figures.check_figure(z, "good.png", "zip") == (40, 30)


def test_pixel_and_byte_limits(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(png((100, 100)))
    monkeypatch.setattr(figures, "MAX_FIGURE_PIXELS", 100 * 100 - 1)
    assert _reason(tmp_path, "a.png") == "oversized"
    monkeypatch.setattr(figures, "MAX_FIGURE_PIXELS", 100 * 100)
    assert figures.check_figure(tmp_path, "a.png", "folder") == (100, 100)
    monkeypatch.setattr(figures, "MAX_FIGURE_BYTES", 10)  # a zip bomb member is never decompressed
    assert _reason(tmp_path, "a.png") == "oversized"
    z = write_zip(tmp_path / "a.zip", {"a.png": png((100, 100))})
    assert _reason(z, "a.png", "zip") == "oversized"


def test_corrupt_zip_member_is_unreadable(tmp_path):
    data = png()
    z = tmp_path / "c.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("c.png", data)
    raw = bytearray(z.read_bytes())
    at = raw.find(data[20:40])
    raw[at + 5] ^= 0xFF  # flip bytes inside the stored member: the CRC check fails
    z.write_bytes(bytes(raw))
    figures._zip.cache_clear()
    assert _reason(z, "c.png", "zip") == "unreadable"


# ---------------------------------------------------------------- conversion to RGB
def palette(rgb, transparent=False):
    im = Image.new("P", (8, 8), 0)
    im.putpalette(list(rgb) + [0, 0, 0])
    if transparent:
        im.info["transparency"] = 0
    return im


def test_modes_convert_to_rgb(tmp_path):
    cases = {
        "gray.png": (Image.new("L", (8, 8), 77), (77, 77, 77)),
        "pal.png": (palette((10, 200, 30)), (10, 200, 30)),
        "paltrans.png": (palette((10, 200, 30), transparent=True), (255, 255, 255)),
        "rgba.png": (Image.new("RGBA", (8, 8), (10, 20, 30, 0)), (255, 255, 255)),  # onto white
        "la.png": (Image.new("LA", (8, 8), (0, 255)), (0, 0, 0)),
        "bits.png": (Image.new("1", (8, 8), 1), (255, 255, 255)),
    }
    for name, (im, _) in cases.items():
        im.save(tmp_path / name, **({"transparency": 0} if name == "paltrans.png" else {}))
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    a16 = np.linspace(0, 1000, 64).reshape(8, 8).astype(np.uint16)
    Image.fromarray(a16).save(tmp_path / "deep.png")  # 16-bit grayscale PNG
    for name, (_, want) in cases.items():
        out = figures.load_figure(tmp_path, name, "folder")
        assert out.mode == "RGB" and out.size == (8, 8) and out.getpixel((3, 3)) == want, name
    cmyk = figures.load_figure(tmp_path, "cmyk.jpg", "folder")
    r, g, b = cmyk.getpixel((3, 3))
    assert cmyk.mode == "RGB" and r > 200 and g < 60 and b < 60  # CMYK (0,255,255,0) is red
    deep = figures.load_figure(tmp_path, "deep.png", "folder")
    px = np.asarray(deep)
    assert deep.mode == "RGB" and px.min() == 0 and px.max() == 255  # scaled, not clipped to white


def test_blank_like():
    im = Image.new("RGB", (37, 21), (1, 2, 3))
    blank = figures.blank_like(im)
    assert blank.size == im.size and blank.mode == "RGB"
    assert (np.asarray(blank) == 128).all()


# ---------------------------------------------------------------- --images hub
class FakeHub:
    """Stands in for the Hub (no network): records calls in order."""

    def __init__(self, files: dict[str, str], sizes: dict[str, int]):
        self.files, self.sizes, self.calls = files, sizes, []

    def get_paths_info(self, repo_id, paths, repo_type=None):
        from types import SimpleNamespace
        self.calls.append(("info", repo_id, tuple(paths), repo_type))
        return [SimpleNamespace(path=p, size=self.sizes[p]) for p in paths if p in self.sizes]

    def download(self, repo_id, filename, repo_type=None, cache_dir=None, local_files_only=False, **kw):
        self.calls.append(("download", repo_id, filename, repo_type))
        return self.files[filename]


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    import huggingface_hub

    from pmcvqa_sft.core import hub
    z = write_zip(tmp_path / "images_2.zip", {"figures/a.png": png()})
    fake = FakeHub({"images_2.zip": str(z)}, {"images_2.zip": 2_200_000_000})
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.download)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: fake)
    monkeypatch.setattr(hub, "local_only", lambda: False)
    return fake


def test_hub_archive_prints_size_before_download(fake_hub):
    path = figures.hub_archive("xmcmic/PMC-VQA", "2", log=lambda m: fake_hub.calls.append(("log", m)))
    assert path.name == "images_2.zip"
    kinds = [c[0] for c in fake_hub.calls]
    assert kinds == ["info", "log", "download"]  # size looked up and shown first, then the download
    assert "images_2.zip" in fake_hub.calls[1][1] and "2.2 GB" in fake_hub.calls[1][1]
    assert fake_hub.calls[0] == ("info", "xmcmic/PMC-VQA", ("images_2.zip",), "dataset")
    assert fake_hub.calls[2] == ("download", "xmcmic/PMC-VQA", "images_2.zip", "dataset")


def test_hub_archive_missing_file_is_one_line_error(fake_hub):
    with pytest.raises(InputError, match="has no images.zip"):
        figures.hub_archive("xmcmic/PMC-VQA", "1", log=lambda *_: None)
    assert not [c for c in fake_hub.calls if c[0] == "download"]


def test_extreme_aspect_ratio_is_a_named_skip_everywhere(tmp_path):
    """5000x10 would crash Qwen's resize ("aspect ratio must be smaller than 200"): refused as
    figure_aspect_ratio by the same check preprocessing, --image, the console and the server use."""
    from PIL import Image

    for size, ok in (((5000, 10), False), ((10, 2001), False), ((2000, 10), True)):
        Image.new("RGB", size).save(tmp_path / "f.png")
        if ok:
            assert figures.check_figure(tmp_path, "f.png", "folder") == size
            continue
        with pytest.raises(figures.FigureSkip) as exc:
            figures.check_figure(tmp_path, "f.png", "folder")
        assert exc.value.reason == "aspect_ratio" and "200:1" in str(exc.value)
        with pytest.raises(figures.FigureSkip):
            figures.check_image_bytes((tmp_path / "f.png").read_bytes(), "x")


def test_pixel_limit_in_the_message_is_the_documented_one(tmp_path):
    from PIL import Image

    Image.new("1", (20000, 10000)).save(tmp_path / "big.png")  # 200 M pixels: over PIL's own 2x limit too
    with pytest.raises(figures.FigureSkip) as exc:
        figures.check_figure(tmp_path, "big.png", "folder")
    assert exc.value.reason == "oversized" and f"{figures.MAX_FIGURE_PIXELS:,}" in str(exc.value)
