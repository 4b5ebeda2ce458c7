"""Preprocessing for image-text models: token-exact image prompts, labels, image columns, bad figures,
zip slip, --images hub, and the bundled image sample."""
from __future__ import annotations

import csv
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pmcvqa_sft.data import figures, samples as vision_sample
from pmcvqa_sft import prompts
from pmcvqa_sft.data.store import row_choices
from pmcvqa_sft.format.encoding import IGNORE_INDEX
from pmcvqa_sft.core.errors import InputError
from pmcvqa_sft.preprocess.run import run_preprocess
from pmcvqa_sft.preprocess.media import VisionPrep
from pmcvqa_sft.format.media import expand_image_tokens, image_token_id, num_image_tokens, processor_size
from pmcvqa_sft.models.loading import load_processor

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample_vision"
ZIP = SAMPLE / "images_2.zip"


@pytest.fixture(scope="module")
def proc():
    return load_processor("tiny-vision")


def preprocess(data, images, out, proc, max_pixels=None, **kw):
    kw.setdefault("progress", False)
    return run_preprocess(data=str(data), tokenizer_name="tiny-vision", output_dir=str(out),
                          tokenizer=proc.tokenizer, vision=VisionPrep(str(images), proc, max_pixels,
                                                                      log=lambda *_: None), **kw)


@pytest.fixture(scope="module")
def processed(tmp_path_factory, proc):
    out = tmp_path_factory.mktemp("vision") / "ds"
    report = preprocess(SAMPLE, ZIP, out, proc)
    from datasets import load_from_disk
    return load_from_disk(str(out)), report


def conversation(row, system_prompt=None):
    return prompts.create_conversation(row["question"], row_choices(row), system_prompt=system_prompt,
                                       image=True, think=False)


# ---------------------------------------------------------------- what is stored
def test_columns_report_and_no_pixels(processed):
    dsd, report = processed
    assert set(dsd) == {"train", "validation", "test"}
    cols = {"input_ids", "labels", "source_file", "source_row", "question", "caption", "choices",
            "answer_label", "truncated", "image", "image_width", "image_height"}
    for ds in dsd.values():
        assert set(ds.column_names) == cols
        assert str(ds.features["image_width"].dtype) == "int32" and str(ds.features["input_ids"].feature.dtype) == "int32"
    assert report["model_kind"] == "vision"
    assert report["kept"] == report["rows_read"] == 1000 and report["skipped"] == {}
    img = report["images"]
    assert (img["kind"], img["prefix"], img["checked"], img["rows_checked"]) == ("zip", "figures", 1000, 1000)
    assert img["figures_used"] == 1000 and img["skipped"] == {} and img["root"] == str(ZIP.resolve())
    assert img["image_tokens"]["min"] == img["image_tokens"]["max"] == 16
    from pmcvqa_sft.data import collate as vision_collate
    from pmcvqa_sft.format import media as vision_processor
    assert vision_processor.DEFAULT_MAX_PIXELS == vision_collate.DEFAULT_MAX_PIXELS  # one default, two homes
    assert report["image_processor"]["max_pixels"] == vision_processor.DEFAULT_MAX_PIXELS  # training's default cap
    assert report["image_processor"]["max_pixels_arg"] is None and report["image_processor"]["image_token"] == "<|image_pad|>"
    # no pixels: the saved dataset is about the size of its tokens (a 112x112 RGB figure alone is 37 KB)
    assert report["disk_ratio_ok"] and report["disk_bytes"] < 1000 * 2000


def test_each_row_holds_one_unexpanded_placeholder_and_its_figure(processed, proc):
    dsd, _ = processed
    tid = image_token_id(proc)
    src = figures.FigureSource(ZIP)
    for row in dsd["test"].select(range(5)):
        assert row["input_ids"].count(tid) == 1
        im = figures.load_figure(src.root, row["image"], src.kind)
        assert (row["image_width"], row["image_height"]) == im.size
        assert row["image"] == f"figures/{row['image'].split('/')[-1]}"


def test_prompt_is_token_exact_with_processor_and_inference(processed, proc):
    """Stored prompt ids == tokenizer(processor.apply_chat_template(conv, add_generation_prompt=True)),
    i.e. what the model sees at inference; the processor's own expansion == expand_image_tokens."""
    dsd, _ = processed
    tok, tid = proc.tokenizer, image_token_id(proc)
    src = figures.FigureSource(ZIP)
    for split in ("train", "test"):
        for row in dsd[split].select(range(4)):
            n_prompt = row["labels"].count(IGNORE_INDEX)
            stored = row["input_ids"][:n_prompt]
            assert all(x == IGNORE_INDEX for x in row["labels"][:n_prompt])
            text = proc.apply_chat_template(conversation(row), add_generation_prompt=True, tokenize=False)
            assert stored == tok(text, add_special_tokens=False)["input_ids"]
            im = figures.load_figure(src.root, row["image"], src.kind)
            for max_pixels in (None, 28 * 28):
                kw = {} if max_pixels is None else {"images_kwargs": {"size": processor_size(proc.image_processor, max_pixels)}}
                theirs = proc(text=[text], images=[im], **kw)["input_ids"][0]
                n = num_image_tokens(row["image_width"], row["image_height"], proc.image_processor, max_pixels)
                assert theirs == expand_image_tokens(stored, None, [n], tid)[0]


def test_labels_are_exactly_answer_and_eos(processed, proc):
    dsd, _ = processed
    tok = proc.tokenizer
    for row in dsd["train"].select(range(6)):
        n_prompt = row["labels"].count(IGNORE_INDEX)
        target = row["labels"][n_prompt:]
        assert target == row["input_ids"][n_prompt:]
        letter = row["answer_label"]
        answer = prompts.answer_line(letter, row["choices"][letter])
        assert target == tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert tok.decode(target) == f"{answer}<|im_end|>"  # no think block for Qwen's template


def test_system_prompt_and_caption_variants_stay_exact(tmp_path, proc):
    out = tmp_path / "ds"
    preprocess(SAMPLE, ZIP, out, proc, max_samples=8, system_prompt="Look at the figure.", include_caption=True)
    from datasets import load_from_disk
    row = load_from_disk(str(out))["train"][0]
    n_prompt = row["labels"].count(IGNORE_INDEX)
    conv = prompts.create_conversation(row["question"], row_choices(row), caption=row["caption"],
                                       system_prompt="Look at the figure.", image=True, think=False)
    text = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nLook at the figure.<|im_end|>") and "Figure caption:" in text
    assert row["input_ids"][:n_prompt] == proc.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_image_tokens_count_against_max_length(tmp_path, proc):
    probe = preprocess(SAMPLE, ZIP, tmp_path / "p", proc, max_samples=40, max_pixels=28 * 28)
    longest = probe["token_lengths"]["total"]["max"]  # stored rows: text + one placeholder
    limit = longest + 14  # only the longest rows need one token less with 16 image tokens
    full = preprocess(SAMPLE, ZIP, tmp_path / "a", proc, max_samples=40, max_length=limit)
    capped = preprocess(SAMPLE, ZIP, tmp_path / "b", proc, max_samples=40, max_length=limit, max_pixels=28 * 28)
    # 16 image tokens (15 beyond the placeholder) push the longest rows over the limit; 1 token does not
    shortened = lambda r: sum(r["truncated"].values()) + r["skipped"].get("too_long", 0)  # noqa: E731
    assert shortened(full) > 0 and shortened(capped) == 0
    assert full["token_lengths"]["total"]["max"] + 15 <= limit  # the stored (unexpanded) rows + image tokens fit
    assert capped["images"]["image_tokens"]["max"] == 1
    assert capped["image_processor"]["max_pixels_arg"] == 784


# ---------------------------------------------------------------- bad figures: counted, named skips
def _png(size=(30, 20), mode="RGB", color=(9, 9, 9)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def _write_csv(path, figure_paths):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(vision_sample.V2_HEADER)
        for i, fp in enumerate(figure_paths):
            w.writerow([i, fp, "cap", f"What colour is square {i}?", "A:Red", "B:Blue", "C:Green", "D:Black",
                        "ABCD"[i % 4], "train"])


def _bad_cases():
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    noisy = buf.getvalue()
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, "PNG")
    return {"good1.png": _png(), "good2.png": _png(mode="L", color=50), "cmyk.jpg": None,
            "empty.png": b"", "text.png": b"not an image", "trunc.png": noisy[: len(noisy) // 2],
            "bomb.png": bomb.getvalue(), "thin.png": _png(size=(3000, 10))}


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_bad_figures_are_counted_named_skips(tmp_path, proc, kind):
    cases = _bad_cases()
    buf = io.BytesIO()
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(buf, "JPEG")
    cases["cmyk.jpg"] = buf.getvalue()
    if kind == "folder":
        images = tmp_path / "figs"
        (images / "images").mkdir(parents=True)
        for name, data in cases.items():
            (images / "images" / name).write_bytes(data)
    else:
        images = tmp_path / "images.zip"
        with zipfile.ZipFile(images, "w") as zf:
            for name, data in cases.items():
                zf.writestr(f"images/{name}", data)
    paths = ["good1.png", "good2.png", "cmyk.jpg", "good1.png", "missing.png", "", "empty.png", "text.png",
             "trunc.png", "bomb.png", "thin.png", "../escape.png", "/etc/passwd", "empty.png"]
    data = tmp_path / "data"
    data.mkdir()
    _write_csv(data / "train_2.csv", paths)
    report = preprocess(data, images, tmp_path / "out", proc, val_size=0)
    want = {"figure_missing": 2, "figure_empty": 2, "figure_unreadable": 1, "figure_truncated": 1,
            "figure_oversized": 1, "figure_aspect_ratio": 1, "figure_unsafe_path": 2}
    assert report["skipped"] == want
    assert report["kept"] == 4 and report["kept"] + sum(want.values()) == report["rows_read"] == len(paths)
    assert report["images"]["skipped"] == {k[len("figure_"):]: v for k, v in want.items()}
    # distinct figures (or Figure_path values) per reason; empty.png is used by two rows
    assert report["images"]["bad_figures"] == {"missing": 2, "empty": 1, "unreadable": 1, "truncated": 1,
                                               "oversized": 1, "aspect_ratio": 1, "unsafe_path": 2}
    assert report["images"]["checked"] == 8  # distinct resolvable figures, each decoded once
    from datasets import load_from_disk
    ds = load_from_disk(str(tmp_path / "out"))["train"]
    assert sorted(ds["image"]) == ["images/cmyk.jpg", "images/good1.png", "images/good1.png", "images/good2.png"]
    src = figures.FigureSource(images)
    for ref in set(ds["image"]):  # grayscale and CMYK figures come back as RGB
        assert figures.load_figure(src.root, ref, src.kind).mode == "RGB"


def test_zip_slip_archive_writes_nothing_outside_output(tmp_path, proc):
    images = tmp_path / "evil.zip"
    with zipfile.ZipFile(images, "w") as zf:
        zf.writestr("../../evil.png", _png())
        zf.writestr("/tmp/evil_abs.png", _png())
        zf.writestr("ok.png", _png())
    data = tmp_path / "data"
    data.mkdir()
    _write_csv(data / "train_2.csv", ["ok.png", "../../evil.png", "/tmp/evil_abs.png", "ok.png"])
    before = {p for p in tmp_path.parent.rglob("*")}
    report = preprocess(data, images, tmp_path / "out", proc, val_size=0)
    after = {p for p in tmp_path.parent.rglob("*")}
    assert {p for p in after - before if not p.is_relative_to(tmp_path / "out")} == set()
    assert not Path("/tmp/evil_abs.png").exists()
    assert report["images"]["unsafe_members"] == 2 and report["skipped"] == {"figure_unsafe_path": 2}
    assert report["kept"] == 2


def test_no_usable_training_figure_is_one_line_error(tmp_path, proc):
    data = tmp_path / "data"
    data.mkdir()
    _write_csv(data / "train_2.csv", ["a.png", "b.png"])
    (tmp_path / "figs").mkdir()
    with pytest.raises(InputError, match=r"no training row has a usable figure .*'missing': 2"):
        preprocess(data, tmp_path / "figs", tmp_path / "out", proc)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the script
def run_script(argv, capsys):
    import preprocess_pmc_vqa_for_sft as script
    with pytest.raises(SystemExit) as e:
        from pmcvqa_sft.core.errors import run_main
        run_main(lambda: script.main(argv))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_script_images_flag(tmp_path, capsys):
    code, out, err = run_script(["--data", str(SAMPLE), "--images", str(ZIP), "--tokenizer", "tiny-vision",
                                 "--output_dir", str(tmp_path / "o"), "--max_samples", "20", "--max_pixels", "3136"], capsys)
    assert code == 0, err
    summary = json.loads(out[: out.rindex("}") + 1])
    assert summary["images"]["kind"] == "zip" and summary["images"]["checked"] == 40
    report = json.loads((tmp_path / "o" / "preprocess_report.json").read_text())
    assert report["model_kind"] == "vision" and report["images"]["image_tokens"]["max"] == 4


@pytest.mark.parametrize("argv, msg", [
    (["--max_pixels", "100"], "--max_pixels needs --images"),
    (["--images", "/no/such/images.zip"], "--images '/no/such/images.zip': no such file or folder"),
    (["--images", "IMAGES", "--max_pixels", "0"], "--max_pixels 0: must be a positive"),
    (["--images", "IMAGES", "--tokenizer", "TINY_TEXT"], "has no image processor"),
])
def test_script_bad_image_args_are_one_line_errors(tmp_path, capsys, argv, msg, request):
    if "TINY_TEXT" in argv:  # the text tiny model's folder: a tokenizer, no image processor
        argv = [a.replace("TINY_TEXT", str(request.getfixturevalue("tiny_dir"))) for a in argv]
    argv = [a.replace("IMAGES", str(ZIP)) for a in argv]
    code, _, err = run_script(["--data", str(SAMPLE), "--tokenizer", "tiny-vision", "--output_dir",
                               str(tmp_path / "o"), *argv], capsys)
    assert code == 2 and msg in err and len(err.strip().splitlines()) == 1


def test_test_preprocessing_script_with_images(capsys):
    import test_preprocessing
    code = test_preprocessing.main(["--data", str(SAMPLE), "--images", str(ZIP), "--tokenizer", "tiny-vision",
                                    "--n", "3", "--show", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "FAIL" not in out
    assert "PASS  processor expansion == expand_image_tokens(stored prompt)" in out
    assert "⟦Answer: " in out and "<|image_pad|>" in out


TORCH_BLOCKER = """
import importlib.abc, importlib.util, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision'):
            raise ModuleNotFoundError('torch is not installed (blocked by the test)')
_find = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: (
    None if name.split('.')[0] in ('torch', 'torchvision') else _find(name, package))
sys.meta_path.insert(0, Block())
sys.argv = ['preprocess_pmc_vqa_for_sft.py'] + sys.argv[1:]
sys.path.insert(0, '.')  # the repo root (the cwd), as when the script is run from it
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def test_image_preprocessing_needs_no_torch(tmp_path):
    """requirements-minimal.txt (no torch) is enough to preprocess with figures for a local model folder."""
    import subprocess
    import sys

    from pmcvqa_sft.models.tiny import ensure_tiny_vision
    folder = ensure_tiny_vision()
    (tmp_path / "run.py").write_text(TORCH_BLOCKER)
    out = subprocess.run([sys.executable, str(tmp_path / "run.py"), "--data", str(SAMPLE), "--images", str(ZIP),
                          "--tokenizer", str(folder), "--output_dir", str(tmp_path / "o"), "--max_samples", "5"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "PyTorch was not found" in out.stderr  # torch really was hidden
    report = json.loads((tmp_path / "o" / "preprocess_report.json").read_text())
    assert report["model_kind"] == "vision" and report["kept"] == 10


def test_text_datasets_say_text(processed_tiny):
    report = json.loads((processed_tiny / "preprocess_report.json").read_text())
    assert report["model_kind"] == "text" and "images" not in report


# ---------------------------------------------------------------- --images hub (no network)
def test_images_hub_downloads_archive_only_when_asked(tmp_path, proc, monkeypatch):
    import huggingface_hub

    from pmcvqa_sft.core import hub
    calls = []
    files = {"train.csv": SAMPLE / "train_2.csv", "test_clean.csv": SAMPLE / "test_2.csv", "images_2.zip": ZIP}

    class Api:
        def get_paths_info(self, repo_id, paths, repo_type=None):
            from types import SimpleNamespace
            calls.append(("info", *paths))
            return [SimpleNamespace(path=p, size=files[p].stat().st_size) for p in paths]

    def download(repo_id, filename, repo_type=None, cache_dir=None, local_files_only=False, **kw):
        calls.append(("download", filename))
        return str(files[filename])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: Api())
    monkeypatch.setattr(hub, "local_only", lambda: False)
    monkeypatch.setattr(hub, "unreachable_reason", lambda: None)
    monkeypatch.setattr(hub, "offline", lambda: False)
    logs = []
    prep = VisionPrep("hub", proc, log=logs.append)
    report = run_preprocess(data="xmcmic/PMC-VQA", tokenizer_name="tiny-vision", output_dir=str(tmp_path / "o"),
                            tokenizer=proc.tokenizer, vision=prep, max_samples=10, progress=False)
    assert [c for c in calls if "zip" in c[-1]] == [("info", "images_2.zip"), ("download", "images_2.zip")]
    assert f"{ZIP.stat().st_size / 1e6:.1f} MB" in logs[0] and report["images"]["source"] == "hub" and report["kept"] == 20
    calls.clear()
    preprocess(SAMPLE, ZIP, tmp_path / "p", proc, max_samples=4)  # a local --images never asks the Hub
    assert calls == []


# ---------------------------------------------------------------- the bundled image sample
def test_bundled_sample_is_what_the_generator_writes(tmp_path):
    vision_sample.write_vision_sample(tmp_path)
    for name in ("train_2.csv", "test_2.csv"):
        assert (tmp_path / name).read_text() == (SAMPLE / name).read_text()
    with zipfile.ZipFile(tmp_path / "images_2.zip") as a, zipfile.ZipFile(ZIP) as b:
        assert a.namelist() == b.namelist()
        for name in a.namelist()[::37]:  # same pixels (PNG bytes may differ across zlib versions)
            pa = np.asarray(Image.open(io.BytesIO(a.read(name))).convert("RGB"))
            pb = np.asarray(Image.open(io.BytesIO(b.read(name))).convert("RGB"))
            assert (pa == pb).all() if name.endswith(".png") else np.abs(pa.astype(int) - pb).max() < 8
    assert sorted(p.name for p in (SAMPLE / "demo").iterdir()) == sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert sum(f.stat().st_size for f in SAMPLE.rglob("*") if f.is_file()) < 750_000


def test_bundled_sample_needs_the_figure():
    files, figs = vision_sample.build_vision_sample()
    train, test = files["train_2.csv"][1:], files["test_2.csv"][1:]
    assert len(train) == 800 and len(test) == 200
    assert not {r[1] for r in train} & {r[1] for r in test}  # test figures are unseen
    for rows in (train, test):
        letters = [r[8] for r in rows]
        assert {letters.count(x) for x in "ABCD"} == {len(rows) // 4}  # balanced: a letter prior is 25 %
        assert len({r[2] for r in rows}) == 1  # one caption for every colour
    # every colour is the gold answer equally often, and the same question text occurs with each
    gold = [figures_colour(r) for r in train]
    assert len(set(gold)) == len(vision_sample.COLOURS)
    modes = {Image.open(io.BytesIO(b)).mode for b in figs.values()}
    assert {"P", "L", "RGB", "RGBA", "CMYK"} <= modes


def figures_colour(row) -> str:
    cell = row[4 + "ABCD".index(row[8])]
    return cell.strip()[2:].strip()


def test_square_colour_is_in_the_figure():
    """The gold colour is drawn in the figure; no distractor colour is."""
    files, figs = vision_sample.build_vision_sample()
    for row in files["test_2.csv"][1:30]:
        im = figures.to_rgb(Image.open(io.BytesIO(figs[row[1]])))
        px = {tuple(p) for p in np.asarray(im).reshape(-1, 3).astype(int).tolist()}
        gold = vision_sample.COLOURS[figures_colour(row)]
        near = lambda c: any(max(abs(a - b) for a, b in zip(c, p)) < 40 for p in px)  # noqa: E731 (JPEG)
        assert near(gold)
        for letter in "ABCD":
            name = row[4 + "ABCD".index(letter)].strip()[2:].strip()
            if letter != row[8] and name not in ("White", "Black"):
                assert not near(vision_sample.COLOURS[name]), (row[1], name)
