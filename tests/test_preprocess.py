"""The preprocessor: on-disk contract, token exactness, masking, truncation, splits, size, bad input,
atomic output. Most tests use the embedded tiny tokenizer; fidelity tests use the real-tokenizer fixture."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pmcvqa_sft.format import encoding
from pmcvqa_sft import prompts
from pmcvqa_sft.data.store import EXAMPLES_NAME, REPORT_NAME, load_processed, row_choices
from pmcvqa_sft.core.errors import InputError
from pmcvqa_sft.core.paths import DEFAULT_MODEL
from pmcvqa_sft.format.encoding import FastPromptEncoder
from pmcvqa_sft.preprocess.run import parse_val_size, run_preprocess
from conftest import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "preprocess_pmc_vqa_for_sft.py"
SAMPLE = ROOT / "data" / "sample"
V1_HEADER = ["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"]
V2_HEADER = ["index", "Figure_path", "Caption", "Question", "Choice A", "Choice B", "Choice C", "Choice D",
             "Answer", "split"]


def write_v1(path: Path, rows) -> Path:
    """rows: (question, [choice cells], label); the Answer text is the labelled cell's text."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(V1_HEADER)
        for i, (q, cells, label) in enumerate(rows):
            cells = list(cells) + [""] * (4 - len(cells))
            ans = cells["ABCD".index(label)].split(":", 1)[-1].strip()
            w.writerow([f"PMC{i}_F1.jpg", q, ans, *cells, label])
    return path


def simple_rows(n, q="Which organ produces bile?"):
    return [(f"{q} ({i})", ["A: Liver", " B:Heart ", "C:  Lung", "D:Kidney"], "ABCD"[i % 4]) for i in range(n)]


def csv_rows(path) -> int:
    import pandas as pd
    return len(pd.read_csv(path, dtype=str, keep_default_na=False))


def run(tmp_path, data, tok, name="out", **kw):
    out = tmp_path / name
    report = run_preprocess(data=str(data), tokenizer_name="tiny", output_dir=str(out), tokenizer=tok,
                            progress=False, **kw)
    return out, report


def cli(*args, env=None):
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env=e, cwd=ROOT, timeout=HANG_GUARD_S)


def reference(tok, row, system_prompt=None, reasoning=False, include_caption=False):
    msgs = prompts.create_conversation(row["question"], row_choices(row), row["answer_label"],
                                       caption=(row["caption"] or None) if include_caption else None,
                                       system_prompt=system_prompt, reasoning=reasoning)
    return encoding.encode_conversation(tok, msgs)


# ---------------------------------------------------------------- the contract on the bundled sample
def test_sample_output_contract(processed_tiny, tiny_tokenizer):
    dsd, report = load_processed(processed_tiny)
    assert set(dsd) == {"train", "validation", "test"}
    for split, ds in dsd.items():
        assert ds.column_names == ["input_ids", "labels", "source_file", "source_row", "question", "caption",
                                   "choices", "answer_label", "truncated"]
        assert str(ds.features["input_ids"].feature.dtype) == "int32"
        assert str(ds.features["labels"].feature.dtype) == "int32"
        assert ds.data.table.schema.field("input_ids").type.value_type.bit_width == 32
        assert report["splits"][split] == len(ds)
        for row in ds.select(range(min(25, len(ds)))):
            ids, labels = row["input_ids"], row["labels"]
            assert (ids, labels) == reference(tiny_tokenizer, row)  # token-exact with apply_chat_template
            assert ids.count(tiny_tokenizer.eos_token_id) == 1 and ids[-1] == labels[-1]  # no padding
            assert row["caption"] == "" and row["answer_label"] in row_choices(row)
    # source_row is the 0-based data row of the CSV
    import pandas as pd
    test_csv = pd.read_csv(SAMPLE / "test.csv", dtype=str, keep_default_na=False)
    row = dsd["test"][7]
    assert row["source_file"] == "test.csv"
    assert " ".join(test_csv.loc[row["source_row"], "Question"].split()) == row["question"]


def test_report_fields_are_consistent(processed_tiny, tiny_tokenizer):
    report = json.loads((processed_tiny / REPORT_NAME).read_text())
    assert report["template_hash"] == encoding.template_hash(tiny_tokenizer)
    assert report["tokenizer_hash"] == encoding.tokenizer_hash(tiny_tokenizer)
    assert report["vocab_size"] == len(tiny_tokenizer) and report["eos_token_id"] == tiny_tokenizer.eos_token_id
    n_train, n_test = csv_rows(SAMPLE / "train.csv"), csv_rows(SAMPLE / "test.csv")
    assert report["rows_read"] == n_train + n_test
    assert report["kept"] == sum(report["splits"].values())
    assert report["rows_read"] == report["kept"] + sum(report["skipped"].values()) + report["unused_by_max_samples"]
    n_kept_train = report["splits"]["train"] + report["splits"]["validation"]
    assert report["splits"]["validation"] == round(0.05 * n_kept_train) and report["splits"]["test"] <= n_test
    for part in ("prompt", "target", "total"):
        s = report["token_lengths"][part]
        assert s["min"] <= s["p50"] <= s["p95"] <= s["max"] and s["min"] <= s["mean"] <= s["max"]
    assert report["verified_rows"] > 0 and report["rows_per_s"] > 0 and report["wall_s"] > 0
    for key in ("label_text_mismatch", "resolved_from_text", "args", "tokenizer"):
        assert key in report
    examples = json.loads((processed_tiny / EXAMPLES_NAME).read_text())
    assert examples and all("⟦" in e["mask"] and len(e["input_ids"]) == len(e["labels"]) for e in examples)


def test_tokenizer_hash_sees_merges_and_ids_not_runtime_state(tiny_dir, tiny_tokenizer, tmp_path):
    from pmcvqa_sft.models.loading import load_tokenizer
    base = encoding.tokenizer_hash(tiny_tokenizer)
    assert len(base) == 64 and encoding.tokenizer_hash(load_tokenizer(str(tiny_dir))) == base  # stable
    tiny_tokenizer.padding_side = "left"  # run-time state is not part of it
    try:
        assert encoding.tokenizer_hash(tiny_tokenizer) == base
    finally:
        tiny_tokenizer.padding_side = "right"
    tj = json.loads((tiny_dir / "tokenizer.json").read_text())
    for edit in ("merges", "ids"):
        d = tmp_path / edit
        shutil.copytree(tiny_dir, d)
        t = json.loads(json.dumps(tj))
        if edit == "merges":
            m = t["model"]["merges"]
            m[0], m[1] = m[1], m[0]
        else:
            v = t["model"]["vocab"]
            a, b = [k for k, i in v.items() if i in (300, 301)]
            v[a], v[b] = v[b], v[a]
        (d / "tokenizer.json").write_text(json.dumps(t, ensure_ascii=False))
        other = load_tokenizer(str(d))
        assert len(other) == len(tiny_tokenizer) and encoding.tokenizer_hash(other) != base, edit


def test_tokenizer_hash_is_stable_on_the_real_vocabulary(real_tokenizer):
    # its speed (128,256 tokens, 280k merges) is measured in bench/bench_tokenizer_hash.py, not asserted here
    h = encoding.tokenizer_hash(real_tokenizer)
    assert h == encoding.tokenizer_hash(real_tokenizer) and len(h) >= 12


def test_size_bound_and_no_padding(processed_tiny):
    dsd, report = load_processed(processed_tiny)
    tokens = sum(sum(len(x) for x in ds["input_ids"]) for ds in dsd.values())
    assert report["tokens"] == tokens
    disk = sum(f.stat().st_size for f in processed_tiny.rglob("*") if f.is_file()
               and f.name not in (REPORT_NAME, EXAMPLES_NAME))
    assert disk <= 3 * tokens * 4 and report["disk_ratio"] <= 3 and report["disk_ratio_ok"]
    lengths = {len(x) for x in dsd["train"]["input_ids"]}
    assert len(lengths) > 5  # rows keep their own lengths: nothing was padded to a common size


# ---------------------------------------------------------------- real tokenizer: token-exact
@pytest.mark.parametrize("opts", [{}, {"system_prompt": "You are a radiologist.", "reasoning": True,
                                       "include_caption": True}])
def test_real_tokenizer_rows_are_token_exact(tmp_path, real_tokenizer, opts):
    data = SAMPLE / "train_2.csv"
    out, report = run(tmp_path, data, real_tokenizer, max_samples=12, **opts)
    dsd, _ = load_processed(out)
    assert report["vocab_size"] == 128256 and report["eos_token_id"] == 128001
    for row in list(dsd["train"]) + list(dsd["validation"]):
        ids, labels = row["input_ids"], row["labels"]
        n = labels.count(-100)
        assert ids[0] == 128000 and ids.count(128000) == 1
        assert ids[n - 3:n] == [128012, 128013, 198]          # <｜Assistant｜><think>\n
        assert ids[-1] == 128001 and labels[-1] == 128001       # EOS trained
        assert labels[:n] == [-100] * n and labels[n:] == ids[n:]
        assert (ids, labels) == reference(real_tokenizer, row, opts.get("system_prompt"),
                                          opts.get("reasoning", False), opts.get("include_caption", False))
        if opts:
            assert real_tokenizer.decode(ids[:n]).count("Figure caption:") == 1 and row["caption"]


# ---------------------------------------------------------------- prompt options, 2-/3-choice questions
@pytest.mark.parametrize("system_prompt", [None, "Be brief."])
@pytest.mark.parametrize("reasoning", [False, True])
@pytest.mark.parametrize("caption", [False, True])
def test_fast_path_matches_reference(tiny_tokenizer, system_prompt, reasoning, caption):
    enc = FastPromptEncoder(tiny_tokenizer, system_prompt)
    msgs = [prompts.create_conversation("Which stain is this?", c, lab, caption="H&E section." if caption else None,
                                        system_prompt=system_prompt, reasoning=reasoning)
            for c, lab in (({"A": "Red", "B": "Blue"}, "B"), ({"A": "x", "B": "y", "C": "z"}, "C"))]
    users, contents = [m[-2]["content"] for m in msgs], [m[-1]["content"] for m in msgs]
    enc.verify(users, contents)  # the same check every job runs on its first rows
    for m, p, t in zip(msgs, enc.prompt_ids(users), enc.target_ids(contents)):
        assert (p + t, [-100] * len(p) + t) == encoding.encode_conversation(tiny_tokenizer, m)


def test_two_and_three_choice_questions(tmp_path, tiny_tokenizer):
    data = write_v1(tmp_path / "mixed.csv", [
        ("Is the lesion benign?", ["A:Benign", "B: Malignant"], "B"),
        ("Which colour is the stain?", ["A: Red", "B:Blue", " C: Green "], "C"),
        ("Which organ produces bile?", ["A: Liver", "B:Heart", "C:Lung", "D:Kidney"], "A"),
    ] * 4)
    out, report = run(tmp_path, data, tiny_tokenizer, val_size=0)
    assert set(report["splits"]) == {"train"} and report["kept"] == 12
    rows = {r["question"]: r for r in load_processed(out)[0]["train"]}
    two = rows["Is the lesion benign?"]
    assert two["choices"] == {"A": "Benign", "B": "Malignant", "C": None, "D": None}
    three = rows["Which colour is the stain?"]
    assert three["choices"]["C"] == "Green" and three["choices"]["D"] is None
    for row in (two, three):
        assert (row["input_ids"], row["labels"]) == reference(tiny_tokenizer, row)
        prompt = tiny_tokenizer.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab == -100])
        assert "D." not in prompt
    assert tiny_tokenizer.decode(three["input_ids"][-16:]).endswith("Answer: C. Green<｜end▁of▁sentence｜>")


def test_v2_caption_in_prompt_only_with_include_caption(tmp_path, tiny_tokenizer):
    on, rep_on = run(tmp_path, SAMPLE / "train_2.csv", tiny_tokenizer, "on", include_caption=True, max_samples=5)
    off, _ = run(tmp_path, SAMPLE / "train_2.csv", tiny_tokenizer, "off", max_samples=5)
    row_on, row_off = load_processed(on)[0]["train"][0], load_processed(off)[0]["train"][0]
    assert "Figure caption:" in tiny_tokenizer.decode(row_on["input_ids"]) and row_on["caption"]
    assert "Figure caption:" not in tiny_tokenizer.decode(row_off["input_ids"]) and row_off["caption"] == ""
    assert rep_on["include_caption"] is True


# ---------------------------------------------------------------- splits
def test_validation_split_is_seeded(tmp_path, tiny_tokenizer):
    data = write_v1(tmp_path / "d.csv", simple_rows(40))
    def val_rows(name, **kw):
        out, rep = run(tmp_path, data, tiny_tokenizer, name, **kw)
        return rep, sorted(load_processed(out)[0]["validation"]["source_row"])
    rep, a = val_rows("a", val_size=0.25)
    _, b = val_rows("b", val_size=0.25)
    _, c = val_rows("c", val_size=0.25, seed=7)
    assert a == b and a != c and len(a) == 10 and rep["splits"] == {"train": 30, "validation": 10}
    rep, d = val_rows("d", val_size=3)
    assert len(d) == 3 and "test" not in rep["splits"]   # a single CSV -> train/validation only
    _, rep = run(tmp_path, data, tiny_tokenizer, "e", val_size=0)
    assert rep["splits"] == {"train": 40}


def test_val_size_parsing():
    assert parse_val_size("0.05") == 0.05 and parse_val_size("500") == 500 and parse_val_size(0) == 0
    for bad in ("-1", "abc", "2.5", "inf", "nan", "-inf"):
        with pytest.raises(InputError):
            parse_val_size(bad)


@pytest.mark.parametrize("bad", ["inf", "nan"])
def test_val_size_not_finite_is_one_line_error_before_tokenizer(bad, tmp_path, capsys):
    import preprocess_pmc_vqa_for_sft as script
    from pmcvqa_sft.core.errors import run_main
    with pytest.raises(SystemExit) as exc:  # a tokenizer that does not exist: the check comes first
        run_main(lambda: script.main(["--data", str(SAMPLE), "--tokenizer", str(tmp_path / "no-tok"),
                                      "--output_dir", str(tmp_path / "out"), "--val_size", bad]))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and f"--val_size '{bad}'" in err, err


def test_max_samples_counts_unused_rows(tmp_path, tiny_tokenizer):
    out, rep = run(tmp_path, SAMPLE, tiny_tokenizer, max_samples=10)
    assert rep["splits"] == {"train": 9, "validation": 1, "test": 10}
    assert rep["unused_by_max_samples"] == csv_rows(SAMPLE / "train.csv") + csv_rows(SAMPLE / "test.csv") - 20
    assert rep["rows_read"] == rep["kept"] + sum(rep["skipped"].values()) + rep["unused_by_max_samples"]


# ---------------------------------------------------------------- truncation
def _lengths(tok, q, cells=("A: Liver", "B:Heart", "C:Lung", "D:Kidney")):
    msgs = prompts.create_conversation(q, {L: c.split(":", 1)[1].strip() for L, c in zip("ABCD", cells)}, "A")
    ids, labels = encoding.encode_conversation(tok, msgs)
    return len(ids), labels.count(-100)


def test_truncation_shortens_the_question_never_the_answer(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    long_q = "Which organ " + "of the patient shown in the figure " * 30 + "produces bile?"
    full_len, _ = _lengths(tok, long_q)
    short_len, _ = _lengths(tok, "Which organ produces bile?")
    max_length = (full_len + short_len) // 2
    data = write_v1(tmp_path / "long.csv", [(long_q, ["A: Liver", "B:Heart", "C:Lung", "D:Kidney"], "A"),
                                            ("Which organ produces bile?", ["A: Liver", "B:Heart", "C:Lung",
                                                                            "D:Kidney"], "A")])
    out, rep = run(tmp_path, data, tok, max_length=max_length, val_size=0)
    assert rep["truncated"] == {"question": 1} and rep["kept"] == 2 and "too_long" not in rep["skipped"]
    rows = load_processed(out)[0]["train"]
    for row in rows:
        ids, labels = row["input_ids"], row["labels"]
        assert len(ids) <= max_length
        assert tok.decode([t for t in labels if t != -100]) == "\n</think>\n\nAnswer: A. Liver<｜end▁of▁sentence｜>"
        prompt = tok.decode(ids[:labels.count(-100)])
        assert "A. Liver\nB. Heart\nC. Lung\nD. Kidney<｜Assistant｜><think>\n" in prompt  # choices intact
    cut = next(r for r in rows if len(r["question"]) > 100)
    assert cut["question"] == " ".join(long_q.split())  # provenance keeps the full question
    assert "Question: Which organ of the patient" in tok.decode(cut["input_ids"])
    assert "produces bile?" not in tok.decode(cut["input_ids"])  # cut from the end of the question


def test_truncation_cuts_caption_first_then_skips_too_long(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    path = tmp_path / "v2.csv"
    cap = "Axial MRI of the brain. " * 40
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(V2_HEADER)
        w.writerow([0, "a.jpg", cap, "Which finding is an enlarged heart?", "A:Cardiomegaly", "B:Atelectasis",
                    "C:Aneurysm", "D:Pneumothorax", "A", "train"])
        w.writerow([1, "b.jpg", "Short.", "Which finding is an enlarged heart? " * 60, "A:Cardiomegaly",
                    "B:Atelectasis", "C:Aneurysm", "D:Pneumothorax", "A", "train"])
        w.writerow([2, "c.jpg", "Short.", "What cell type builds new bone?", "A:Neutrophil", "B:Osteoblast",
                    "C:Osteoclast", "D:Plasma cell", "B", "train"])
    no_cap_len, _ = _lengths(tok, "Which finding is an enlarged heart?", ("A:Cardiomegaly", "B:Atelectasis",
                                                                         "C:Aneurysm", "D:Pneumothorax"))
    out, rep = run(tmp_path, path, tok, include_caption=True, max_length=no_cap_len + 20, val_size=0)
    assert rep["truncated"].get("caption") == 1
    assert rep["truncated"].get("question") == 1
    rows = {r["source_row"]: r for r in load_processed(out)[0]["train"]}
    assert "Question: Which finding is an enlarged heart?\n" in tok.decode(rows[0]["input_ids"])  # q intact
    assert rows[0]["input_ids"][-1] == tok.eos_token_id
    # Too small for even choices + answer: skipped and counted, not cut.
    out2, rep2 = run(tmp_path, path, tok, "tiny_len", max_length=no_cap_len - 15, val_size=0)
    assert rep2["skipped"].get("too_long", 0) >= 1
    assert rep2["rows_read"] == rep2["kept"] + sum(rep2["skipped"].values())
    with pytest.raises(InputError, match="no training row left .*'too_long': 3"):
        run(tmp_path, path, tok, "none_fit", max_length=20, val_size=0)


# ---------------------------------------------------------------- output folder safety
def test_existing_output_refused_then_overwritten(tmp_path, tiny_tokenizer):
    data = write_v1(tmp_path / "d.csv", simple_rows(8))
    out, _ = run(tmp_path, data, tiny_tokenizer, val_size=0)
    with pytest.raises(InputError, match="--overwrite"):
        run(tmp_path, data, tiny_tokenizer, val_size=0)
    _, rep = run(tmp_path, data, tiny_tokenizer, val_size=2, overwrite=True)
    assert load_processed(out)[1]["splits"] == {"train": 6, "validation": 2} == rep["splits"]
    unrelated = tmp_path / "mine"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a preprocessor output"):
        run(tmp_path, data, tiny_tokenizer, "mine", overwrite=True)
    assert (unrelated / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left


def test_output_parent_folders_are_created(tmp_path, tiny_tokenizer):
    out, rep = run(tmp_path, write_v1(tmp_path / "d.csv", simple_rows(4)), tiny_tokenizer, "a/b/out", val_size=0)
    assert load_processed(out)[1]["splits"] == {"train": 4}


def test_failure_mid_write_leaves_no_output(tmp_path, tiny_tokenizer, monkeypatch):
    from datasets import DatasetDict
    data = write_v1(tmp_path / "d.csv", simple_rows(8))
    real_save = DatasetDict.save_to_disk

    def save_then_die(self, path, **kw):
        real_save(self, path, **kw)  # half the job done: shards written, report not yet
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(DatasetDict, "save_to_disk", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, data, tiny_tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.csv"]  # no output, no temp folder
    monkeypatch.undo()
    # A stale temp folder of a killed process (dead pid) is removed by the next run.
    stale = tmp_path / ".out.tmp-999999999-abc"
    stale.mkdir()
    (stale / "dataset_dict.json").write_text("{}")
    out, _ = run(tmp_path, data, tiny_tokenizer)
    assert not stale.exists() and load_processed(out)[0]["train"].num_rows > 0


def test_interrupted_overwrite_is_restored(tmp_path, tiny_tokenizer):
    """Killed between the two renames of --overwrite: the old output is put back, not deleted."""
    data = write_v1(tmp_path / "d.csv", simple_rows(8))
    out, _ = run(tmp_path, data, tiny_tokenizer)
    old = tmp_path / ".out.old-999999999-xyz"
    os.replace(out, old)
    with pytest.raises(InputError, match="exists"):
        run(tmp_path, data, tiny_tokenizer)  # the restored output is there again and is protected
    assert (out / REPORT_NAME).exists() and not old.exists()


# ---------------------------------------------------------------- bad input through the CLI
def _bad_inputs(tmp_path):
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "image.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(64))
    (tmp_path / "cols.csv").write_text("Question,Answer\nWhat?,Yes\n")
    (tmp_path / "latin1.csv").write_bytes(
        (",".join(V1_HEADER) + "\nf.jpg,Caf\xe9 lesion?,Red,A:Red,B:Blue,C:Green,D:Pink,A\n").encode("latin-1"))
    return {"missing": (tmp_path / "nope.csv", "no such"), "empty": (tmp_path / "empty.csv", "empty"),
            "binary": (tmp_path / "image.csv", "not a CSV"),
            "columns": (tmp_path / "cols.csv", "missing column"),
            "not utf-8": (tmp_path / "latin1.csv", "UTF-8")}


def test_bad_inputs_one_line_exit_2(tmp_path):
    for name, (path, needle) in _bad_inputs(tmp_path).items():
        r = cli("--data", path, "--tokenizer", "tiny", "--output_dir", tmp_path / "o")
        assert r.returncode == 2, (name, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, (name, r.stderr)
        assert needle.lower() in r.stderr.lower(), (name, r.stderr)
        assert not (tmp_path / "o").exists()
    r = cli("--data", SAMPLE / "train.csv", "--tokenizer", "tiny", "--output_dir", tmp_path)  # exists
    assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_missing_columns_message_lists_expected_and_found(tmp_path):
    path = _bad_inputs(tmp_path)["columns"][0]
    r = cli("--data", path, "--tokenizer", "tiny", "--output_dir", tmp_path / "o")
    assert "Answer_label" in r.stderr and "'Question'" in r.stderr  # expected and found


def test_offline_defaults_name_the_offline_alternatives(tmp_path, tiny_tokenizer):
    r = cli("--tokenizer", "tiny", "--output_dir", tmp_path / "o")  # default --data: the Hub
    assert r.returncode == 2 and "--data data/sample" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(InputError, match="--tokenizer tiny"):    # default --tokenizer: the Hub
        run_preprocess(data=str(SAMPLE / "test.csv"), tokenizer_name=DEFAULT_MODEL, output_dir=str(tmp_path / "o"))


def test_script_end_to_end_and_user_check_script(tmp_path, tiny_dir):
    r = cli("--data", SAMPLE / "test.csv", "--tokenizer", tiny_dir, "--output_dir", tmp_path / "o",
            "--max_samples", 30, "--val_size", 5)
    assert r.returncode == 0, r.stderr
    assert load_processed(tmp_path / "o")[1]["splits"] == {"train": 25, "validation": 5}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "test_preprocessing.py"), "--tokenizer", str(tiny_dir)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAIL" not in r.stdout and r.stdout.count("PASS") >= 7 and "⟦" in r.stdout


# ---------------------------------------------------------------- the fast path is checked
def test_shared_prefix_cache_is_exact_and_falls_back(tiny_tokenizer, real_tokenizer, monkeypatch):
    from pmcvqa_sft.format import encoding as preprocess
    users = [prompts.format_user_prompt(q, c) for q, c in (
        ("Which organ produces bile?", {"A": "Liver", "B": "Heart"}),
        ("3D reconstruction: which bone?", {"A": "Femur", "B": "Tibia", "C": "Ulna"}),
        ("'Quoted' question?", {"A": "x", "B": "y"}))]
    for tok in (tiny_tokenizer, real_tokenizer):
        enc = FastPromptEncoder(tok)
        whole = preprocess.batch_ids(tok, [enc.prompt_text(u) for u in users])
        parts = enc.prompt_parts(users)
        assert [h + r for h, r in parts] == whole and enc.prefix_exact == 1 and len(parts[0][0]) > 20
    real_batch_ids = preprocess.batch_ids

    def corrupt_head(tok, texts):  # a tokenizer where cutting at the prefix would not be exact
        ids = real_batch_ids(tok, texts)
        return [i + [0] for i in ids] if len(texts) == 1 else ids
    monkeypatch.setattr(preprocess, "batch_ids", corrupt_head)
    enc = FastPromptEncoder(tiny_tokenizer)
    parts = enc.prompt_parts(users)
    assert enc.prefix_batches == 1 and enc.prefix_exact == 0   # detected, whole prompts tokenized
    assert [h + r for h, r in parts] == real_batch_ids(tiny_tokenizer, [enc.prompt_text(u) for u in users])


def test_backend_padding_state_left_by_an_earlier_call_is_cleared(tiny_tokenizer):
    from pmcvqa_sft.format.encoding import batch_ids
    backend = tiny_tokenizer.backend_tokenizer
    try:
        tiny_tokenizer("x", padding="max_length", max_length=64, truncation=True)  # leaves padding on
        ids = batch_ids(tiny_tokenizer, ["Which organ?"])
        assert ids == [tiny_tokenizer("Which organ?", add_special_tokens=False)["input_ids"]] and len(ids[0]) < 64
    finally:  # the tokenizer fixture is shared by the whole session
        backend.no_padding()
        backend.no_truncation()


def test_every_job_verifies_the_fast_path(tmp_path, tiny_tokenizer, monkeypatch):
    data = write_v1(tmp_path / "d.csv", simple_rows(6))
    monkeypatch.setattr(FastPromptEncoder, "prompt_text", lambda self, u: self.head + u + " " + self.tail)
    with pytest.raises(AssertionError, match="differs from apply_chat_template"):
        run(tmp_path, data, tiny_tokenizer)
    assert not (tmp_path / "out").exists()


def test_edited_conversation_shape_uses_the_reference_path(tmp_path, tiny_tokenizer, monkeypatch):
    """A few-shot edit of create_conversation is no longer [user, assistant]: rows still come out exact."""
    original = prompts.create_conversation
    shot = [{"role": "user", "content": "Question: 1+1?"}, {"role": "assistant", "content": "<think>\n\n</think>\n\nAnswer: A. 2"}]

    def few_shot(*a, **kw):
        return shot + original(*a, **kw)
    monkeypatch.setattr(prompts, "create_conversation", few_shot)
    out, rep = run(tmp_path, write_v1(tmp_path / "d.csv", simple_rows(6)), tiny_tokenizer, val_size=0)
    row = load_processed(out)[0]["train"][0]
    assert (row["input_ids"], row["labels"]) == reference(tiny_tokenizer, row)  # via the edited function
    assert "1+1?" in tiny_tokenizer.decode(row["input_ids"]) and rep["prefix_cache"]["batches"] == 0


def test_tokenizer_without_chat_template_gets_the_plain_format(tmp_path, tiny_tokenizer):
    import copy
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    out, rep = run(tmp_path, write_v1(tmp_path / "d.csv", simple_rows(6)), tok, val_size=0)
    assert rep["chat_template"].startswith("plain") and rep["template_hash"] == encoding.template_hash(tok)
    row = load_processed(out)[0]["train"][0]
    assert (row["input_ids"], row["labels"]) == reference(tok, row)
    n = row["labels"].count(-100)
    assert tok.decode(row["input_ids"][:n]).endswith("\n\n### Response:\n")
    assert tok.decode(row["input_ids"][n:]).startswith("<think>\n\n</think>\n\nAnswer: ")


def test_all_skipped_test_file_gives_no_test_split(tmp_path, tiny_tokenizer):
    """A test file whose every row is skipped: no (unloadable, empty) `test` split, the skips counted."""
    folder = tmp_path / "pmc"
    folder.mkdir()
    shutil.copy(ROOT / "data" / "sample" / "train.csv", folder / "train.csv")
    (folder / "test.csv").write_text(
        "Figure_path,Question,Answer,Choice A,Choice B,Choice C,Choice D,Answer_label\n"
        "f.jpg,Only one choice?,Red,A:Red,,,,A\n")
    out, report = run(tmp_path, folder, tiny_tokenizer)
    assert "test" not in report["splits"] and report["skipped"] == {"fewer_than_2_choices": 1}
    dsd, _ = load_processed(out)
    assert "test" not in dsd and len(dsd["train"]) > 0


def test_mixed_v1_v2_folder_names_the_ignored_files(tmp_path, tiny_dir, capsys):
    """data/sample holds v1 and v2 files: v1 is read, and the v2 files are named as not read."""
    import preprocess_pmc_vqa_for_sft as script
    assert script.main(["--data", str(SAMPLE), "--tokenizer", str(tiny_dir), "--output_dir",
                        str(tmp_path / "o"), "--max_samples", "8", "--val_size", "0"]) == 0
    out = capsys.readouterr().out
    assert f"note: not read (ignored_v2): {SAMPLE / 'train_2.csv'}, {SAMPLE / 'test_2.csv'}" in out, out
    report = load_processed(tmp_path / "o")[1]
    assert report["ignored_files"]["ignored_v2"] == [str(SAMPLE / "train_2.csv"), str(SAMPLE / "test_2.csv")]


# ---------------------------------------------------------------- tokenizers that lose text
def test_tokenizer_without_vocabulary_is_refused(tmp_path, capsys):
    """A folder with only tokenizer_config.json loads as a tokenizer of special tokens alone: every
    question and answer would encode to nothing (6-token rows, exit 0). Refused in one line."""
    import preprocess_pmc_vqa_for_sft as script
    from pmcvqa_sft.core.errors import run_main
    folder = tmp_path / "config_only"  # like the real model folder without tokenizer.json
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "added_tokens_decoder": {"0": {"content": "<s>", "special": True},
                                 "1": {"content": "</s>", "special": True}}}))
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: script.main(["--data", str(SAMPLE / "test.csv"), "--tokenizer", str(folder),
                                      "--output_dir", str(tmp_path / "o")]))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1, err
    assert f"tokenizer '{folder}' cannot round-trip text" in err and "no vocabulary file" in err, err
    assert not (tmp_path / "o").exists()


def _ascii_only_tokenizer():
    """A word-piece BPE with no byte fallback and no unknown token: characters outside its vocabulary
    are silently dropped (as by some real tokenizers), so a Chinese question encodes to nothing."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pmcvqa_sft.data import samples as sample_data
    from pmcvqa_sft.models.loading import PROBE_TEXT
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    text = [*sample_data.all_text(), PROBE_TEXT, "### Question: Response: Answer: <think> </think>"]
    tk.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


def test_rows_that_encode_to_nothing_are_skipped_and_named(tmp_path):
    from pmcvqa_sft.models.loading import covers_all_text
    tok = _ascii_only_tokenizer()
    assert not covers_all_text(tok)
    rows = simple_rows(4) + [("\u809d\u810f\u4ea7\u751f\u4ec0\u4e48\uff1f", ["A: Liver", "B:Heart"], "A"),
                             ("Which organ produces bile? (x)", ["A: \u809d\u810f", "B:Heart"], "A")]
    out, rep = run(tmp_path, write_v1(tmp_path / "d.csv", rows), tok, val_size=0)
    assert rep["skipped"] == {"question_encodes_to_nothing": 1, "answer_encodes_to_nothing": 1}
    assert rep["kept"] == 4 and rep["rows_read"] == rep["kept"] + sum(rep["skipped"].values())
    only_bad = write_v1(tmp_path / "bad.csv", rows[4:5])
    with pytest.raises(InputError, match="no training row left .*question_encodes_to_nothing"):
        run(tmp_path, only_bad, tok, "o2", val_size=0)
