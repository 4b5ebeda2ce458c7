"""Where the figures come from (`--images`) and how one is read: checked once, loaded as RGB.

`--images` is a folder of figures, a zip archive (PMC-VQA's `images.zip` / `images_2.zip`, read in place:
nothing is ever extracted), or `hub` (the release's archive fetched from the Hub on request, its size
printed first). A single top-level folder inside the folder or zip (`images/` in images.zip) is found
by itself, so `Figure_path` (a bare file name such as `PMC1064097_F1.jpg`) resolves either way.

A figure *ref* is the path relative to the folder, or the zip member name (prefix included); the dataset
stores it in its `image` column and the collator reads it back with `load_figure(root, ref, kind)`.

Safety: a `Figure_path` or zip member that is absolute or holds `..` is refused (never read); a folder
figure whose real path leaves the folder (a symlink) too. Bad figures are named skips, never tracebacks:
    missing      no such file / member
    empty        0 bytes, or a 0-pixel image
    unreadable   not an image PIL can identify, or corrupt data
    truncated    the image data ends early
    oversized    more than MAX_FIGURE_PIXELS pixels (decompression bomb) or a member over MAX_FIGURE_BYTES
    aspect_ratio longer side over MAX_ASPECT_RATIO times the shorter (5000x10): the Qwen2-VL image processor
                 cannot resize it (it raises), so such a figure is refused everywhere, not padded: a 200:1
                 strip holds nothing a 28-pixel patch grid can show
    unsafe_path  absolute path, `..`, or a link out of the folder
"""
from __future__ import annotations

from functools import lru_cache
import io
import os
from pathlib import Path
import posixpath
import re
import warnings
import zipfile

from ..core.errors import InputError

MAX_FIGURE_PIXELS = 89_478_485   # PIL's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS)
MAX_FIGURE_BYTES = 256 << 20     # a figure file/member larger than this is not read (zip bomb guard)
MAX_ASPECT_RATIO = 200           # Qwen2-VL's smart_resize refuses max(w, h) / min(w, h) above this
HUB_ARCHIVES = {"1": "images.zip", "2": "images_2.zip"}
SKIP_REASONS = ("missing", "empty", "unreadable", "truncated", "oversized", "aspect_ratio", "unsafe_path",
                "dicom")  # dicom: a DICOM member that cannot be shown (no pixels, syntax, size, corrupt)


class FigureSkip(Exception):
    """A figure that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def unsafe(name: str) -> bool:
    """Absolute paths, drive letters and `..` components are refused (zip slip / path traversal)."""
    n = name.replace("\\", "/")
    return (not n or n.startswith("/") or (len(n) > 1 and n[1] == ":")
            or ".." in n.split("/"))


class FigureSource:
    """`--images PATH` opened once: a folder or a zip; `resolve(Figure_path)` -> ref."""

    def __init__(self, path):
        p = Path(os.path.expanduser(str(path)))
        if not p.exists():
            raise InputError(f"--images '{path}': no such file or folder")
        self.root = p.resolve()
        self.unsafe_members = 0
        if p.is_dir():
            self.kind = "folder"
            entries = [e for e in os.listdir(self.root) if not e.startswith(".")]
            only = entries[0] if len(entries) == 1 and (self.root / entries[0]).is_dir() else ""
            self.prefix = only
            self._names = None
        elif zipfile.is_zipfile(p):
            self.kind = "zip"
            try:
                with zipfile.ZipFile(p) as zf:
                    infos = zf.infolist()
            except (zipfile.BadZipFile, OSError) as exc:
                raise InputError(f"--images '{path}': cannot read the zip archive ({exc})") from None
            names = set()
            for info in infos:
                if info.is_dir():
                    continue
                if unsafe(info.filename):  # never readable, counted in the report
                    self.unsafe_members += 1
                else:
                    names.add(info.filename)
            self._names = names
            # macOS archivers add a __MACOSX/ tree of resource forks beside the real top folder
            real = [n for n in names if not n.startswith(("__MACOSX/", "."))]
            tops = {n.split("/", 1)[0] for n in real}
            self.prefix = tops.pop() if len(tops) == 1 and all("/" in n for n in real) else ""
        else:
            raise InputError(f"--images '{path}': expected a folder of figures or a .zip archive "
                             f"(such as PMC-VQA's images.zip / images_2.zip)")

    def resolve(self, figure_path: str) -> str:
        """Figure_path -> ref (relative path / member name); FigureSkip('missing'/'unsafe_path')."""
        fp = (figure_path or "").strip().replace("\\", "/")
        if not fp:
            raise FigureSkip("missing", "empty Figure_path")
        if unsafe(fp):
            raise FigureSkip("unsafe_path", fp)
        candidates = [posixpath.join(self.prefix, fp), fp] if self.prefix else [fp]
        for ref in candidates:
            if self._names is not None:
                if ref in self._names:
                    return ref
            elif (self.root / ref).is_file() or (self.root / ref).is_symlink():
                if not (self.root / ref).resolve().is_relative_to(self.root):
                    raise FigureSkip("unsafe_path", f"{fp} links outside {self.root}")
                return ref
        raise FigureSkip("missing", fp)

    def describe(self) -> dict:
        return {"kind": self.kind, "root": str(self.root), "prefix": self.prefix,
                "unsafe_members": self.unsafe_members}


@lru_cache(maxsize=8)
def _zip(root: str, pid: int) -> zipfile.ZipFile:
    # One handle per archive and process: reading the central directory of images.zip (149k members)
    # costs far more than one figure. Keyed by pid because a handle shared across a fork (DataLoader
    # workers) shares its file offset, and concurrent reads would mix bytes.
    return zipfile.ZipFile(root)


def read_bytes(root, ref: str, kind: str) -> bytes:
    """The raw bytes of one figure; FigureSkip for missing, unsafe or oversized ones."""
    if unsafe(ref):
        raise FigureSkip("unsafe_path", ref)
    try:
        if kind == "zip":
            zf = _zip(str(root), os.getpid())
            try:
                info = zf.getinfo(ref)
            except KeyError:
                raise FigureSkip("missing", ref) from None
            if info.file_size > MAX_FIGURE_BYTES:
                raise FigureSkip("oversized", f"{ref}: {info.file_size} bytes uncompressed")
            return zf.read(info)
        path = Path(root) / ref
        if not path.resolve().is_relative_to(Path(root).resolve()):
            raise FigureSkip("unsafe_path", f"{ref} links outside {root}")
        size = path.stat().st_size
        if size > MAX_FIGURE_BYTES:
            raise FigureSkip("oversized", f"{ref}: {size} bytes")
        return path.read_bytes()
    except FileNotFoundError:
        raise FigureSkip("missing", ref) from None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:  # bad CRC, unreadable file
        raise FigureSkip("unreadable", f"{ref}: {exc}") from None


def _decode(data: bytes, ref: str, fast: bool = False, frame=None, window=None, log=None):
    """bytes -> decoded PIL image (original size), classifying every failure as a FigureSkip. DICOM
    (Part 10 marker or a .dcm/.dicom name) is shown as a viewer shows it (data/dicom.py)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise FigureSkip("empty", f"{ref}: 0 bytes")
    if bytes(data[128:132]) == b"DICM" or str(ref).lower().endswith((".dcm", ".dicom")):
        from .dicom import describe, read_dicom
        try:
            im, info = read_dicom(bytes(data), frame=frame, window=window, name=f"DICOM '{ref}'")
        except InputError as exc:
            raise FigureSkip("dicom", str(exc)) from None
        if log is not None:
            log(describe(info))
        return im, im.size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own limit below
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:  # PIL's own limit (twice ours): report ours
            m = re.search(r"\((\d+) pixels\)", str(exc))
            got = f"{int(m.group(1)):,} pixels, " if m else ""
            raise FigureSkip("oversized", f"{ref}: {got}over {MAX_FIGURE_PIXELS:,}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            why = "not an image format PIL knows" if isinstance(exc, UnidentifiedImageError) else exc
            raise FigureSkip("unreadable", f"{ref}: {why}") from None
        w, h = im.size
        if w <= 0 or h <= 0:
            raise FigureSkip("empty", f"{ref}: {w}x{h} pixels")
        if w * h > MAX_FIGURE_PIXELS:
            raise FigureSkip("oversized", f"{ref}: {w}x{h} pixels (over {MAX_FIGURE_PIXELS:,})")
        if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
            raise FigureSkip("aspect_ratio", f"{ref}: {w}x{h} pixels, {max(w, h) / min(w, h):.0f}:1 (image models "
                                             f"take at most {MAX_ASPECT_RATIO}:1)")
        if fast and im.format == "JPEG":
            # Decode at 1/8 scale: the whole entropy-coded stream is still read (so truncation is
            # caught) but the inverse DCT work shrinks ~8x. Only for the check, never for training.
            im.draft(im.mode, (max(1, w // 8), max(1, h // 8)))
        try:
            im.load()
        except Image.DecompressionBombError as exc:
            raise FigureSkip("oversized", f"{ref}: {exc}") from None
        except OSError as exc:
            if "truncat" in str(exc).lower():
                raise FigureSkip("truncated", f"{ref}: {exc}") from None
            raise FigureSkip("unreadable", f"{ref}: {exc}") from None
        except (SyntaxError, ValueError, EOFError, MemoryError) as exc:
            raise FigureSkip("unreadable", f"{ref}: {exc}") from None
    return im, (w, h)


def check_figure(root, ref: str, kind: str) -> tuple[int, int]:
    """Open and decode a figure once; (width, height) of the original, or FigureSkip(reason)."""
    _, size = _decode(read_bytes(root, ref, kind), ref, fast=True)
    return size


def check_image_bytes(data: bytes, ref: str) -> tuple[int, int]:
    """The checks of `check_figure` on a figure already in memory (a served request's data URL)."""
    if len(data) > MAX_FIGURE_BYTES:
        raise FigureSkip("oversized", f"{ref}: {len(data)} bytes")
    _, size = _decode(data, ref, fast=True)
    return size


def to_rgb(im):
    """Any PIL mode -> RGB, as transformers' convert_to_rgb would (alpha composited onto white), plus
    16-bit/float grayscale scaled to 0-255 (PIL's own convert would clip it to white)."""
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        import numpy as np
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.round().astype("uint8"), "L").convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def load_figure(root, ref: str, kind: str, frame=None, window=None, log=None):
    """The figure as an RGB PIL image at its original size (FigureSkip if it went bad since the check).
    DICOM: `frame` (1-based, default the middle one) and `window` (center, width) as in data/dicom.py."""
    im, _ = _decode(read_bytes(root, ref, kind), ref, frame=frame, window=window, log=log)
    return to_rgb(im)


def blank_like(img):
    """The blind ablation's figure: same size, uniform mid-gray (no information, same token count)."""
    from PIL import Image
    return Image.new("RGB", img.size, (128, 128, 128))


def hub_archive(repo_id: str, version: str, cache_dir=None, log=print) -> Path:
    """Download the release's figure archive (v1 images.zip 18.9 GB, v2 images_2.zip 2.2 GB) into the
    Hub cache, printing its size first; only called for `--images hub`."""
    from huggingface_hub import HfApi, hf_hub_download

    from ..core import hub
    name = HUB_ARCHIVES[version]
    if hub.local_only():
        why = "HF_HUB_OFFLINE is set" if hub.offline() else hub.unreachable_reason()
        log(f"--images hub: {why}; looking for {name} in the local Hub cache only")
    else:
        try:
            info = next(iter(HfApi().get_paths_info(repo_id, [name], repo_type="dataset")), None)
        except Exception as exc:  # network / auth: reported as one line
            raise InputError(f"--images hub: cannot query '{repo_id}' on the Hub ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:200]})") from None
        if info is None:
            raise InputError(f"--images hub: '{repo_id}' has no {name}")
        size = getattr(info, "size", None)
        shown = "size unknown" if not size else (f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB")
        log(f"--images hub: downloading {name} from {repo_id} ({shown}) into the Hub cache "
            f"(resumed if interrupted; later runs read the cached copy)")
    try:
        return Path(hf_hub_download(repo_id, name, repo_type="dataset", cache_dir=cache_dir,
                                    local_files_only=hub.local_only()))
    except Exception as exc:
        raise InputError(f"--images hub: cannot get {name} from '{repo_id}' ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]}); download it yourself and pass "
                         f"--images /path/to/{name}") from None


def open_image(path, frame=None, window=None, log=None):
    """A figure given on the command line / in the console, as RGB (named one-line errors). A DICOM
    file is windowed as a viewer shows it (`frame`, `window`); `log` gets which frame/window was used."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"image '{path}' is a folder; pass one figure file (PNG, JPEG, ...)")
    if not p.is_file():
        raise InputError(f"image '{path}' does not exist")
    try:
        return load_figure(str(p.parent), p.name, "folder", frame=frame, window=window, log=log)
    except FigureSkip as exc:
        raise InputError(f"image '{path}' cannot be used: {exc}") from None


def figure_loader(report: dict, images: str | None = None, dataset_dir=None):
    """ref -> PIL image, from preprocess_report.json's `images` (or `images`, a moved copy of them)."""
    info = report.get("images") or {}
    if not info and not images:
        raise InputError(f"dataset '{dataset_dir}' records no figure source (preprocess_report.json has no "
                         f"'images'); rerun preprocess_pmc_vqa_for_sft.py with --images")
    root = images or info.get("root")
    kind = info.get("kind") or ("zip" if str(root).endswith(".zip") else "folder")
    if images:
        kind = "zip" if Path(images).suffix == ".zip" else "folder"
    if not root or not Path(root).exists():
        raise InputError(f"the figures of dataset '{dataset_dir}' are not at '{root}' any more; pass "
                         f"--images PATH (the folder or zip they moved to)")

    def load(ref):
        try:
            return load_figure(root, ref, kind)
        except FigureSkip as exc:  # it passed preprocessing's check, so it changed since
            raise InputError(f"figure '{ref}' of dataset '{dataset_dir}' ({root}) can no longer be read: "
                             f"{exc}; rerun preprocess_pmc_vqa_for_sft.py --images to re-check the figures") from None
    return load
