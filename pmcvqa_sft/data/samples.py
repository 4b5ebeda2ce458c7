"""Generator of the bundled PMC-VQA-format sample under data/sample/ (synthetic, not PMC-VQA content).

    python -m pmcvqa_sft.data.samples --out data/sample [--overwrite]
    python -m pmcvqa_sft.data.samples --vision --out data/sample_vision [--overwrite]   (the image sample, below)

Written for this project: simple textbook medical facts, each `(category, answer, predicate)` such
that f"{answer} {predicate}." is a true sentence and f"Which {category} {predicate}?" a question.
Distractors come from the same category. Deterministic (seeded `random.Random`).

Files (same schemas and cell quirks as the real release: own letter prefixes with uneven spacing,
a few no-break spaces inside choices):
    train.csv    v1, every fact x 4 training phrasings x 3 fresh shuffles
    test.csv     v1, per fact: 2 unseen shuffles of training phrasings + 1 unseen phrasing
    train_2.csv  v2 (with captions), 64 rows, split=train
    test_2.csv   v2, 32 rows, split=test
Gold letters are balanced (round-robin positions, rows then shuffled).
Also used by the tiny offline model: `pretraining_sentences()` (facts stated as plain sentences)
and `all_text()` (every string in the sample, for the tiny tokenizer).
"""
from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path
import random
import zipfile

from ..core.errors import InputError
from ..prompts import LETTERS  # the one definition of the choice letters

SEED = 20261127
V1_HEADER = ["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D",
             "Answer_label"]
V2_HEADER = ["index", "Figure_path", "Caption", "Question", "Choice A", "Choice B", "Choice C",
             "Choice D", "Answer", "split"]

# (category, answer, predicate): within a category every predicate is true of its answer only.
FACTS: list[tuple[str, str, str]] = [
    ("imaging modality", "Magnetic resonance imaging", "uses a strong magnetic field"),
    ("imaging modality", "Computed tomography", "uses a rotating X-ray beam to make slices"),
    ("imaging modality", "Ultrasound", "uses high-frequency sound waves"),
    ("imaging modality", "Positron emission tomography", "detects a radioactive glucose tracer"),
    ("imaging modality", "Mammography", "images the breast with low-dose X-rays"),
    ("imaging modality", "Fluoroscopy", "shows moving X-ray images in real time"),
    ("imaging modality", "Plain radiography", "makes a single flat X-ray image"),
    ("imaging modality", "Bone scintigraphy", "uses a gamma camera to show bone uptake"),
    ("organ", "Liver", "produces bile"),
    ("organ", "Heart", "pumps blood through the body"),
    ("organ", "Lung", "exchanges oxygen and carbon dioxide"),
    ("organ", "Kidney", "filters blood to make urine"),
    ("organ", "Pancreas", "secretes insulin"),
    ("organ", "Stomach", "secretes gastric acid"),
    ("organ", "Spleen", "removes old red blood cells"),
    ("organ", "Thyroid", "produces thyroxine"),
    ("stain", "Hematoxylin and eosin", "is the routine stain for tissue sections"),
    ("stain", "Gram stain", "sorts bacteria into two groups by their cell wall"),
    ("stain", "Ziehl-Neelsen stain", "detects acid-fast bacilli"),
    ("stain", "Periodic acid-Schiff", "highlights glycogen in pink"),
    ("stain", "Congo red", "shows amyloid deposits"),
    ("stain", "Prussian blue", "detects iron deposits"),
    ("stain", "Masson trichrome", "shows collagen fibers in blue"),
    ("stain", "Silver stain", "shows reticulin fibers in black"),
    ("cell type", "Neutrophil", "is the most common white blood cell"),
    ("cell type", "Erythrocyte", "carries oxygen with hemoglobin"),
    ("cell type", "Osteoclast", "breaks down bone tissue"),
    ("cell type", "Osteoblast", "builds new bone"),
    ("cell type", "Plasma cell", "secretes antibodies"),
    ("cell type", "Hepatocyte", "is the main cell of the liver"),
    ("cell type", "Macrophage", "develops from a monocyte"),
    ("cell type", "Eosinophil", "fights parasites"),
    ("bone", "Femur", "is the longest bone in the body"),
    ("bone", "Tibia", "is the main bone of the shin"),
    ("bone", "Humerus", "is the bone of the upper arm"),
    ("bone", "Radius", "lies on the thumb side of the forearm"),
    ("bone", "Scapula", "is the shoulder blade"),
    ("bone", "Clavicle", "is the collar bone"),
    ("bone", "Patella", "is the kneecap"),
    ("bone", "Mandible", "is the lower jaw bone"),
    ("blood vessel", "Aorta", "is the largest artery in the body"),
    ("blood vessel", "Pulmonary artery", "carries blood from the heart to the lungs"),
    ("blood vessel", "Carotid artery", "supplies blood to the head and neck"),
    ("blood vessel", "Coronary artery", "supplies blood to the heart muscle"),
    ("blood vessel", "Femoral artery", "supplies blood to the thigh"),
    ("blood vessel", "Portal vein", "carries blood from the gut to the liver"),
    ("blood vessel", "Jugular vein", "drains blood from the head"),
    ("blood vessel", "Renal artery", "supplies blood to the kidney"),
    ("finding", "Pneumothorax", "is air in the pleural space"),
    ("finding", "Pleural effusion", "is fluid in the pleural space"),
    ("finding", "Cardiomegaly", "is an enlarged heart"),
    ("finding", "Hydronephrosis", "is a swollen kidney from blocked urine flow"),
    ("finding", "Fracture", "is a break in a bone"),
    ("finding", "Cirrhosis", "is scarring of the liver"),
    ("finding", "Atelectasis", "is a collapsed part of the lung"),
    ("finding", "Aneurysm", "is a bulge in an artery wall"),
    ("directional term", "Anterior", "means toward the front"),
    ("directional term", "Posterior", "means toward the back"),
    ("directional term", "Superior", "means toward the head"),
    ("directional term", "Inferior", "means toward the feet"),
    ("directional term", "Medial", "means toward the midline"),
    ("directional term", "Lateral", "means away from the midline"),
    ("directional term", "Proximal", "means closer to the trunk"),
    ("directional term", "Distal", "means farther from the trunk"),
    ("tumor", "Glioblastoma", "is a fast-growing brain tumor"),
    ("tumor", "Meningioma", "arises from the lining of the brain"),
    ("tumor", "Osteosarcoma", "is a malignant bone tumor of youth"),
    ("tumor", "Lipoma", "is a benign tumor of fat"),
    ("tumor", "Melanoma", "arises from pigment cells of the skin"),
    ("tumor", "Hepatocellular carcinoma", "is a primary cancer of liver cells"),
]

TRAIN_PHRASINGS = (
    "Which {category} {predicate}?",
    "What {category} {predicate}?",
    "In this figure, which {category} {predicate}?",
    "Identify the {category} that {predicate}.",
)
TEST_ONLY_PHRASING = "According to the image, which {category} {predicate}?"

# The answer keeps its exact surface form (capital, leading space) in three of the four wordings, as in
# the choices and the target `Answer: B. Magnetic resonance imaging`. A byte-level BPE gives
# " Magnetic", "Magnetic" and " magnetic" different ids, and a tiny model does not transfer a fact
# across them: with lower-cased answers the demo's tuned accuracy stalled near 39 %; with these, 99 %.
# The predicate -> answer direction ("... is X") is the one the questions ask for.
SENTENCE_WORDINGS = (
    "{answer} {predicate}.",
    "The {category} that {predicate} is {answer}.",
    "In medicine, {answer} {predicate}.",
    "A {category} that {predicate}: {answer}.",
)

CAPTION_VIEWS = (
    "Axial MRI of the brain", "Coronal CT of the abdomen", "Frontal chest radiograph",
    "Sagittal MRI of the knee", "Ultrasound image of the kidney", "Photomicrograph of a tissue section",
    "Axial CT of the chest", "Lateral radiograph of the forearm",
)
# Prefix spellings seen in the real files (own letter, uneven spacing).
PREFIX_STYLES = ("{L}:{t}", " {L}:{t} ", " {L}: {t} ", "{L}: {t}", "{L}:  {t}", " {L}:{t}")

CATEGORIES: dict[str, list[str]] = {}
for _c, _a, _p in FACTS:
    CATEGORIES.setdefault(_c, []).append(_a)


def fact_sentence(fact, wording: str = SENTENCE_WORDINGS[0]) -> str:
    category, answer, predicate = fact
    return wording.format(category=category, answer=answer, predicate=predicate)


def pretraining_sentences() -> list[str]:
    """Each fact stated as plain sentences in several wordings (not question/answer format)."""
    return [fact_sentence(f, w) for w in SENTENCE_WORDINGS for f in FACTS]


def _question(fact, phrasing: str) -> str:
    category, _, predicate = fact
    return phrasing.format(category=category, predicate=predicate)


def _choices(rng: random.Random, fact, gold_pos: int) -> list[str]:
    category, answer, _ = fact
    distractors = rng.sample([a for a in CATEGORIES[category] if a != answer], 3)
    return distractors[:gold_pos] + [answer] + distractors[gold_pos:]


def _figure(rng: random.Random) -> str:
    return f"PMC{rng.randint(1000000, 9999999)}_F{rng.randint(1, 6)}.jpg"


def _cells(rng: random.Random, choices: list[str], nbsp: bool) -> list[str]:
    cells = []
    for L, t in zip(LETTERS, choices):
        if nbsp and " " in t:
            t = t.replace(" ", "\u00a0", 1)
            nbsp = False
        cells.append(rng.choice(PREFIX_STYLES).format(L=L, t=t))
    return cells


def _plan_v1(rng: random.Random):
    """Return (train_items, test_items); each item = (fact, question, choices, gold_pos)."""
    train, seen = [], set()
    k = 0
    for fact in FACTS:
        for phrasing in TRAIN_PHRASINGS:
            for _ in range(3):
                gold = k % 4
                k += 1
                q = _question(fact, phrasing)
                ch = _choices(rng, fact, gold)
                train.append((fact, q, ch, gold))
                seen.add((q, tuple(ch)))
    test, k = [], 0
    for fact in FACTS:
        phrasings = rng.sample(TRAIN_PHRASINGS, 2) + [TEST_ONLY_PHRASING]
        for phrasing in phrasings:
            gold = k % 4
            k += 1
            q = _question(fact, phrasing)
            while True:
                ch = _choices(rng, fact, gold)
                if (q, tuple(ch)) not in seen:
                    break
            seen.add((q, tuple(ch)))
            test.append((fact, q, ch, gold))
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def _v1_rows(rng: random.Random, items, n_nbsp: int):
    rows = [V1_HEADER]
    eligible = [i for i, it in enumerate(items) if any(" " in t for t in it[2])]
    nbsp_rows = set(rng.sample(eligible, n_nbsp))
    for i, (fact, q, ch, gold) in enumerate(items):
        rows.append([_figure(rng), q, fact[1], *_cells(rng, ch, i in nbsp_rows), LETTERS[gold]])
    return rows


def _v2_rows(rng: random.Random, n: int, split: str, offset: int):
    rows = [V2_HEADER]
    facts = [FACTS[(offset + 3 * i) % len(FACTS)] for i in range(n)]  # 3 is prime to 70
    n_nbsp = 0
    for i, fact in enumerate(facts):
        gold = i % 4
        phrasing = TRAIN_PHRASINGS[i % len(TRAIN_PHRASINGS)] if split == "train" else TEST_ONLY_PHRASING
        caption = f"{rng.choice(CAPTION_VIEWS)}. {fact_sentence(fact)}"
        choices = _choices(rng, fact, gold)
        nbsp = n_nbsp < 2 and i % 5 == 2 and any(" " in t for t in choices)
        n_nbsp += nbsp
        rows.append([str(i), _figure(rng), caption, _question(fact, phrasing),
                     *_cells(rng, choices, nbsp), LETTERS[gold], split])
    body = rows[1:]
    order = list(range(len(body)))
    rng.shuffle(order)
    return [rows[0]] + [[str(j)] + body[o][1:] for j, o in enumerate(order)]


def build_sample(seed: int = SEED) -> dict[str, list[list[str]]]:
    """{file name: rows including the header}; deterministic for a given seed."""
    rng = random.Random(seed)
    train, test = _plan_v1(rng)
    return {
        "train.csv": _v1_rows(rng, train, n_nbsp=6),
        "test.csv": _v1_rows(rng, test, n_nbsp=3),
        "train_2.csv": _v2_rows(rng, 64, "train", offset=0),
        "test_2.csv": _v2_rows(rng, 32, "test", offset=2),
    }


_TEXT_COLUMNS = {"Question", "Caption", "Answer", "Choice A", "Choice B", "Choice C", "Choice D"}


def all_text() -> list[str]:
    """Every question, choice, caption and answer text in the sample CSVs (cleaned of prefixes and
    odd spaces), plus the pretraining sentences: the training text of the tiny tokenizer.
    Figure paths, indices and split names are left out (the model never sees them as text)."""
    out = list(pretraining_sentences())
    seen = set(out)
    for rows in build_sample().values():
        keep = [i for i, h in enumerate(rows[0]) if h in _TEXT_COLUMNS]
        for row in rows[1:]:
            for cell in (row[i] for i in keep):
                cell = " ".join(cell.replace("\u00a0", " ").split())
                if cell[1:2] == ":" and cell[:1] in LETTERS:
                    cell = cell[2:].strip()
                if cell and cell not in seen:
                    seen.add(cell)
                    out.append(cell)
    return out


def write_sample(out_dir, overwrite: bool = False, seed: int = SEED) -> list[Path]:

    out = Path(out_dir)
    files = build_sample(seed)
    existing = [n for n in files if (out / n).exists()]
    if existing and not overwrite:
        raise InputError(f"folder '{out}': {', '.join(existing)} already exist(s); pass --overwrite "
                         f"to replace them")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, rows in files.items():
        written.append(write_csv(out / name, rows))
    return written


def write_csv(path: Path, rows) -> Path:
    """Rows (header first) as a CSV the way the release writes it: minimal quoting, \\n line ends."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f, quoting=csv.QUOTE_MINIMAL, lineterminator="\n").writerows(rows)
    return path


# ---------------------------------------------------------------------------------------------------
# Generator of the bundled image sample under data/sample_vision/ (synthetic figures, PMC-VQA v2 format).
#
#     python -m pmcvqa_sft.data.samples --vision --out data/sample_vision [--overwrite]
#
# The task can only be solved by looking: every row asks for the colour (one of 6) of the one square
# drawn on a noisy 112x112 figure. Caption and question wording are the same whatever the colour, the
# 4 choices are shuffled (gold letters balanced), so a text-only model is at chance (25 %).
#
# Files (deterministic, about 0.67 MB in all):
#     train_2.csv    v2 header (index,Figure_path,Caption,Question,Choice A-D,Answer,split), 800 rows on
#                    800 figures (one of 3 question wordings each)
#     test_2.csv     200 rows on 200 figures never used in train_2.csv
#     images_2.zip   the 1,000 figures under a top-level `figures/` folder, like the release's archive is
#                    read (`--images data/sample_vision/images_2.zip`, read in place, never extracted)
#     demo/          4 test figures as loose files, for `--image PATH` questions
#
# Figures are small on purpose: the noise is 14x14-pixel blocks (one per vision patch) of 5 gray levels,
# saved as palette PNGs.
# A few figures use other modes so the RGB conversion is exercised on every run: grayscale (`L`, only
# for white/black squares), RGB, RGBA (translucent background) and CMYK JPEG.
# ---------------------------------------------------------------------------------------------------

VISION_SEED = 20261129
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
VISION_PREFIX_STYLES = ("{L}:{t}", " {L}: {t} ", "{L}: {t}", "{L}:{t} ")  # the release's uneven own prefixes
N_TRAIN_FIGURES, ROWS_PER_TRAIN_FIGURE, N_TEST_FIGURES = 800, 1, 200
SIDE = (30, 46)  # square side in pixels: always covers at least one whole 14-px patch
ARCHIVE, TOP = "images_2.zip", "figures"
ZIP_TIME = (2026, 11, 29, 0, 0, 0)  # fixed member dates: the archive is byte-for-byte reproducible
N_DEMO = 4


def vision_all_text() -> list[str]:
    """Every string the image sample's CSVs hold as text (for the tiny vision tokenizer)."""
    return QUESTIONS + [CAPTION] + list(COLOURS)


def _figure_mode(i: int, colour: str) -> str:
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


def _encode_figure(im) -> tuple[str, bytes]:
    buf = io.BytesIO()
    if im.mode == "CMYK":
        im.save(buf, "JPEG", quality=85)
        return ".jpg", buf.getvalue()
    im.save(buf, "PNG", optimize=True)
    return ".png", buf.getvalue()


def _vision_cells(rng: random.Random, choices: list[str]) -> list[str]:
    return [rng.choice(VISION_PREFIX_STYLES).format(L=L, t=t) for L, t in zip(LETTERS, choices)] + [""] * (4 - len(choices))


def build_vision_sample(seed: int = VISION_SEED):
    """-> ({csv name: rows incl. header}, {figure file name: bytes}); deterministic for a seed."""
    rng = random.Random(seed)
    names = list(COLOURS)
    figures: dict[str, bytes] = {}
    plan = {"train": [], "test": []}
    k = 0
    for split, n_fig, per in (("train", N_TRAIN_FIGURES, ROWS_PER_TRAIN_FIGURE), ("test", N_TEST_FIGURES, 1)):
        for i in range(n_fig):
            colour = names[(i + (split == "test")) % len(names)]  # every colour equally often
            ext, data = _encode_figure(draw_figure(rng, colour, _figure_mode(i, colour)))
            fname = f"SYN{'TR' if split == 'train' else 'TE'}{i:04d}_F1{ext}"
            figures[fname] = data
            wordings = rng.sample(QUESTIONS, per)
            for j in range(per):
                gold = k % 4
                k += 1
                others = rng.sample([c for c in names if c != colour], 3)
                choices = others[:gold] + [colour] + others[gold:]
                plan[split].append([fname, CAPTION, wordings[j], *_vision_cells(rng, choices), LETTERS[gold], split])
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


def write_vision_sample(out_dir, overwrite: bool = False, seed: int = VISION_SEED) -> list[Path]:
    out = Path(out_dir)
    files, figures = build_vision_sample(seed)
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
    """The command line of the two bundled-sample generators (text; image with --vision)."""
    ap = argparse.ArgumentParser(prog="python -m pmcvqa_sft.data.samples",
                                 description="Write the bundled synthetic PMC-VQA-format sample (v1 train.csv/"
                                             "test.csv, v2 train_2.csv/test_2.csv) or, with --vision, the image "
                                             "sample (v2 CSVs + images_2.zip). Deterministic; not PMC-VQA content.")
    ap.add_argument("--vision", action="store_true", help="write the image sample (default out: data/sample_vision)")
    ap.add_argument("--out", default=None, help="output folder (default: data/sample, or data/sample_vision)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing files in --out")
    ap.add_argument("--seed", type=int, default=None, help=f"random seed (default: {SEED}, image: {VISION_SEED})")
    args = ap.parse_args(argv)
    write, seed, out = ((write_vision_sample, VISION_SEED, "data/sample_vision") if args.vision
                        else (write_sample, SEED, "data/sample"))
    for p in write(args.out or out, overwrite=args.overwrite, seed=seed if args.seed is None else args.seed):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    from ..core.errors import run_main

    run_main(main)
