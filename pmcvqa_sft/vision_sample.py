"""Generator of the bundled image sample under data/sample_vision/ (synthetic figures, PMC-VQA v2 format).

    python -m pmcvqa_sft.vision_sample --out data/sample_vision [--overwrite]

The task can only be solved by looking: every row asks for the colour (one of 6) of the one square
drawn on a noisy 112x112 figure. Caption and question wording are the same whatever the colour, the
4 choices are shuffled (gold letters balanced), so a text-only model is at chance (25 %).

Files (deterministic, about 0.67 MB in all):
    train_2.csv    v2 header (index,Figure_path,Caption,Question,Choice A-D,Answer,split), 800 rows on
                   800 figures (one of 3 question wordings each)
    test_2.csv     200 rows on 200 figures never used in train_2.csv
    images_2.zip   the 1,000 figures under a top-level `figures/` folder, like the release's archive is
                   read (`--images data/sample_vision/images_2.zip`, read in place, never extracted)
    demo/          4 test figures as loose files, for `--image PATH` questions

Figures are small on purpose: the noise is 14x14-pixel blocks (one per vision patch) of 5 gray levels,
saved as palette PNGs.
A few figures use other modes so the RGB conversion is exercised on every run: grayscale (`L`, only
for white/black squares), RGB, RGBA (translucent background) and CMYK JPEG.
"""
from __future__ import annotations

import io
import random
import zipfile
from pathlib import Path

from .prompts import LETTERS
from .sample_data import V2_HEADER, sample_cli, write_csv

SEED = 20261129
SIZE = 112
BLOCK = 14  # noise blocks the size of a vision patch: small PNGs, the square the only colour
GRAYS = (96, 112, 128, 144, 160)
# name -> RGB. Distinct hues (plus white/black, the only ones a grayscale figure can show).
COLOURS: dict[str, tuple[int, int, int]] = {
    "Red": (220, 30, 30), "Green": (30, 170, 40), "Blue": (40, 60, 220), "Yellow": (235, 220, 40),
    "White": (255, 255, 255), "Black": (0, 0, 0)}
QUESTIONS = ["What colour is the square in the figure?", "Which colour does the square have?",
             "The square shown in this image is which colour?"]
CAPTION = "One coloured square on a noisy gray background."
PREFIX_STYLES = ("{L}:{t}", " {L}: {t} ", "{L}: {t}", "{L}:{t} ")  # the release's uneven own prefixes
N_TRAIN_FIGURES, ROWS_PER_TRAIN_FIGURE, N_TEST_FIGURES = 800, 1, 200
SIDE = (30, 46)  # square side in pixels: always covers at least one whole 14-px patch
ARCHIVE, TOP = "images_2.zip", "figures"
ZIP_TIME = (2026, 11, 29, 0, 0, 0)  # fixed member dates: the archive is byte-for-byte reproducible
N_DEMO = 4


def all_text() -> list[str]:
    """Every string the sample's CSVs hold as text (for the tiny vision tokenizer)."""
    return QUESTIONS + [CAPTION] + list(COLOURS)


def _mode(i: int, colour: str) -> str:
    """Which image mode figure i is saved in (most are palette PNGs)."""
    if colour in ("White", "Black") and (i // len(COLOURS)) % 3 == 0:
        return "L"
    if i % 50 == 19:
        return "CMYK"
    return {7: "RGB", 13: "RGBA"}.get(i % 20, "P")


def draw_figure(rng: random.Random, colour: str, mode: str):
    """A 112x112 figure: 8x8 blocks of gray noise and one square of `colour` (side 30-46 px).

    Drawn as a palette image (indices 0-4 the grays, 5 the square's colour), then converted."""
    from PIL import Image, ImageDraw

    n = SIZE // BLOCK
    small = Image.new("P", (n, n))
    small.putdata([rng.randrange(len(GRAYS)) for _ in range(n * n)])
    im = small.resize((SIZE, SIZE), Image.NEAREST)
    im.putpalette([v for g in GRAYS for v in (g, g, g)] + list(COLOURS[colour]))
    side = rng.randint(*SIDE)
    x, y = rng.randint(4, SIZE - side - 4), rng.randint(4, SIZE - side - 4)
    box = [x, y, x + side - 1, y + side - 1]
    ImageDraw.Draw(im).rectangle(box, fill=len(GRAYS))
    if mode == "P":
        return im
    if mode == "RGBA":
        im = im.convert("RGB")
        alpha = Image.new("L", im.size, 200)  # translucent background, opaque square
        ImageDraw.Draw(alpha).rectangle(box, fill=255)
        im.putalpha(alpha)
        return im
    return im.convert("RGB").convert(mode)  # RGB, L (white/black squares only), CMYK


def _encode(im) -> tuple[str, bytes]:
    buf = io.BytesIO()
    if im.mode == "CMYK":
        im.save(buf, "JPEG", quality=85)
        return ".jpg", buf.getvalue()
    im.save(buf, "PNG", optimize=True)
    return ".png", buf.getvalue()


def _cells(rng: random.Random, choices: list[str]) -> list[str]:
    return [rng.choice(PREFIX_STYLES).format(L=L, t=t) for L, t in zip(LETTERS, choices)] + [""] * (4 - len(choices))


def build_sample(seed: int = SEED):
    """-> ({csv name: rows incl. header}, {figure file name: bytes}); deterministic for a seed."""
    rng = random.Random(seed)
    names = list(COLOURS)
    figures: dict[str, bytes] = {}
    plan = {"train": [], "test": []}
    k = 0
    for split, n_fig, per in (("train", N_TRAIN_FIGURES, ROWS_PER_TRAIN_FIGURE), ("test", N_TEST_FIGURES, 1)):
        for i in range(n_fig):
            colour = names[(i + (split == "test")) % len(names)]  # every colour equally often
            ext, data = _encode(draw_figure(rng, colour, _mode(i, colour)))
            fname = f"SYN{'TR' if split == 'train' else 'TE'}{i:04d}_F1{ext}"
            figures[fname] = data
            wordings = rng.sample(QUESTIONS, per)
            for j in range(per):
                gold = k % 4
                k += 1
                others = rng.sample([c for c in names if c != colour], 3)
                choices = others[:gold] + [colour] + others[gold:]
                plan[split].append([fname, CAPTION, wordings[j], *_cells(rng, choices), LETTERS[gold], split])
    files = {}
    for split, rows in plan.items():
        rng.shuffle(rows)
        files[f"{split}_2.csv"] = [V2_HEADER] + [[str(i)] + r for i, r in enumerate(rows)]
    return files, figures


def zip_bytes(figures: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:  # PNG/JPEG are already compressed
        for name in sorted(figures):
            zf.writestr(zipfile.ZipInfo(f"{TOP}/{name}", ZIP_TIME), figures[name])
    return buf.getvalue()


def demo_figures(files, figures) -> dict[str, bytes]:
    """The first N_DEMO test figures (one per colour among the first rows) as loose files."""
    out = {}
    for row in files["test_2.csv"][1:]:
        if row[1] not in out and len(out) < N_DEMO:
            out[row[1]] = figures[row[1]]
    return out


def write_sample(out_dir, overwrite: bool = False, seed: int = SEED) -> list[Path]:
    from .errors import InputError

    out = Path(out_dir)
    files, figures = build_sample(seed)
    targets = [out / n for n in files] + [out / ARCHIVE]
    existing = [p.name for p in targets if p.exists()]
    if existing and not overwrite:
        raise InputError(f"folder '{out}': {', '.join(existing)} already exist(s); pass --overwrite "
                         f"to replace them")
    (out / "demo").mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        write_csv(out / name, rows)
    (out / ARCHIVE).write_bytes(zip_bytes(figures))
    written = targets
    for name, data in demo_figures(files, figures).items():
        (out / "demo" / name).write_bytes(data)
        written.append(out / "demo" / name)
    return written


def main(argv=None) -> int:
    return sample_cli(argv, "python -m pmcvqa_sft.vision_sample",
                      "Write the bundled synthetic image sample (v2 train_2.csv/test_2.csv + images_2.zip). "
                      "Deterministic; not PMC-VQA content.", "data/sample_vision", write_sample, SEED)


if __name__ == "__main__":
    from .errors import run_main

    run_main(main)
