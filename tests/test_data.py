"""Tests for pmcvqa_sft.data (reading PMC-VQA CSVs) and pmcvqa_sft.sample_data (bundled sample).

No network: the hub test runs with HF_HUB_OFFLINE=1 and sockets disabled.
Test CSVs are written as raw text/bytes so every quirk is exact.
"""
from __future__ import annotations

import csv
import socket
from collections import Counter
from pathlib import Path

import pytest

from pmcvqa_sft.data import samples as sample_data
from pmcvqa_sft.data.pmc_vqa import V1_COLUMNS, V2_COLUMNS, MCQRecord, ReadStats, clean_cell, clean_choice, read_pmc_vqa_csv
from pmcvqa_sft.data.sources import PMC_FILES, resolve_data_files
from pmcvqa_sft.core.errors import InputError

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
V1_HEADER = ",".join(V1_COLUMNS)
V2_HEADER = ",".join(V2_COLUMNS)


def write(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    p = tmp_path / name
    p.write_bytes(text.encode("utf-8"))
    return p


def v1(tmp_path: Path, *rows: str, name: str = "t.csv") -> Path:
    return write(tmp_path, V1_HEADER + "\n" + "\n".join(rows) + "\n", name)


def read_one(path: Path) -> MCQRecord:
    recs, stats = read_pmc_vqa_csv(path)
    assert stats.kept == 1 and len(recs) == 1, stats.to_dict()
    return recs[0]


# ---------------------------------------------------------------- choice prefixes
def test_prefix_spacing_variants(tmp_path):
    p = v1(tmp_path, "f.jpg,Which?,Red, A:Magnetic resonance imaging , B: Red ,C :  Blue,D:Ultrasound,B")
    r = read_one(p)
    assert r.choices == {"A": "Magnetic resonance imaging", "B": "Red", "C": "Blue", "D": "Ultrasound"}
    assert r.answer_label == "B"
    assert r.source_file == "t.csv" and r.source_row == 0 and r.caption is None
    assert r.figure_path == "f.jpg"


def test_only_own_prefix_stripped_once(tmp_path):
    p = v1(tmp_path, "f.jpg,Which?,B:cell lymphoma,A:B:cell lymphoma,A:x,C:  A: y,D:z,A")
    r = read_one(p)
    assert r.choices == {"A": "B:cell lymphoma", "B": "A:x", "C": "A: y", "D": "z"}
    assert r.answer_label == "A"
    assert clean_choice("A:B:cell lymphoma", "A") == "B:cell lymphoma"
    assert clean_choice(" B:Magnetic resonance imaging ", "B") == "Magnetic resonance imaging"
    assert clean_choice(" B: Red ", "B") == "Red"
    assert clean_choice("D:Ultrasound", "D") == "Ultrasound"
    assert clean_choice("A:x", "B") == "A:x"
    assert clean_choice("Bone", "B") == "Bone"  # starts with the letter, but no prefix


# ---------------------------------------------------------------- cell cleaning
def test_odd_spaces_cleaned(tmp_path):
    p = v1(tmp_path, "f.jpg,Which\u00a0organ\u2009is\u200bit?,Liver,"
                     "A:Magnetic\u00a0resonance\u200aimaging,B:\u202fLiver\ufeff,C:Heart\u2009,D:Lung,B")
    r = read_one(p)
    assert r.question == "Which organ is it?"
    assert r.choices == {"A": "Magnetic resonance imaging", "B": "Liver", "C": "Heart", "D": "Lung"}
    assert clean_cell("a\u00a0 \u200a b\t\tc ") == "a b c"


def test_stray_quotes_removed(tmp_path):
    # A leading space makes the quote part of the cell (not CSV quoting): pandas keeps it.
    p = v1(tmp_path, "f.jpg,Which?, \"Red\",A: \"Red\" , 'B:Blue',C:'Green',D:\"a\" or \"b\",A")
    r = read_one(p)
    assert r.choices == {"A": "Red", "B": "Blue", "C": "Green", "D": '"a" or "b"'}
    assert r.answer_label == "A"
    assert clean_cell("'Red'") == "Red" and clean_cell('"Red"') == "Red"


def test_newline_in_quoted_field_counts_rows_by_parser(tmp_path):
    p = v1(tmp_path,
           'f0.jpg,"What is\nshown\r\n  here?",Red,A:Red,B:Blue,C:Green,D:Black,A',
           'f1.jpg,Second?,Blue,A:Red,"B:Blue\nsky",C:Green,D:Black,B',
           "f2.jpg,Third?,Green,A:Red,B:Blue,C:Green,D:Black,C")
    recs, stats = read_pmc_vqa_csv(p)
    assert stats.rows_read == 3 and stats.kept == 3
    assert [r.source_row for r in recs] == [0, 1, 2]
    assert recs[0].question == "What is shown here?"
    assert recs[1].choices["B"] == "Blue sky"
    assert recs[2].figure_path == "f2.jpg" and recs[2].answer_label == "C"


def test_commas_and_quotes_inside_choices(tmp_path):
    p = v1(tmp_path, 'f.jpg,"Which, exactly?","Red, ""bright"" blue",'
                     '"A:Red, ""bright"" blue",B:Blue,"C: x, y, z",D:Black,A')
    r = read_one(p)
    assert r.question == "Which, exactly?"
    assert r.choices["A"] == 'Red, "bright" blue'
    assert r.choices["C"] == "x, y, z"
    assert r.answer_label == "A"


def test_none_and_na_stay_strings(tmp_path):
    p = v1(tmp_path,
           "f.jpg,Which?,None,A:None,B:NA,C:null,D:nan,A",
           "f.jpg,Which?,NA,A:None,B:NA,C:N/A,D:,\"\"\"\"",  # label '"' -> resolved from 'NA'
           )
    recs, stats = read_pmc_vqa_csv(p)
    assert stats.kept == 2
    assert recs[0].choices == {"A": "None", "B": "NA", "C": "null", "D": "nan"}
    assert recs[0].answer_label == "A"
    assert recs[1].answer_label == "B" and recs[1].choices["C"] == "N/A"
    assert stats.resolved_from_text == 1 and stats.label_text_mismatch == 0


# ---------------------------------------------------------------- gold letter
def test_quote_label_resolved_or_skipped(tmp_path):
    p = v1(tmp_path,
           'f.jpg,Which?,Blue,A:Red,B:Blue,C:Green,D:Black,""""',   # label is a lone quote char
           "f.jpg,Which?,B: Blue ,A:Red,B:Blue,C:Green,D:Black,",    # empty label, prefixed text
           "f.jpg,Which?,Purple,A:Red,B:Blue,C:Green,D:Black,\"\"\"\"",  # no choice matches
           "f.jpg,Which?,Red,A:Red,B:Red,C:Green,D:Black,E",           # two choices match
           "f.jpg,Which?,Green,A:Red,B:Blue,C:,D:Black,C",             # label -> empty choice
           "f.jpg,Which?,,A:Red,B:Blue,C:Green,D:Black,",              # nothing to go on
           )
    recs, stats = read_pmc_vqa_csv(p)
    assert [(r.source_row, r.answer_label) for r in recs] == [(0, "B"), (1, "B")]
    assert stats.resolved_from_text == 2
    assert stats.skipped == Counter({"invalid_label": 4})
    assert stats.rows_read == 6 and stats.kept == 2


def test_label_text_mismatch_label_wins(tmp_path):
    p = v1(tmp_path,
           "f.jpg,Which?,Blue,A:Red,B:Blue,C:Green,D:Black,C",        # mismatch: label wins
           "f.jpg,Which?,  green ,A:Red,B:Blue,C:Green,D:Black,C",    # case/space: a match
           "f.jpg,Which?,C:Green,A:Red,B:Blue,C:Green,D:Black,C",     # prefixed answer: a match
           "f.jpg,Which?,,A:Red,B:Blue,C:Green,D:Black, c ")          # no text: label alone
    recs, stats = read_pmc_vqa_csv(p)
    assert [r.answer_label for r in recs] == ["C", "C", "C", "C"]
    assert stats.label_text_mismatch == 1 and stats.resolved_from_text == 0


def test_two_and_three_choices_kept_one_skipped(tmp_path):
    p = v1(tmp_path,
           "f.jpg,Two?,Yes,A:Yes,B:No,,,A",
           "f.jpg,Three?,Maybe,A:Yes,B:No,C:Maybe,,C",
           "f.jpg,Gap?,Z,A:X,B:Y,C:  ,D:Z,D",
           "f.jpg,One?,Yes,A:Yes,,,,A",
           "f.jpg,   ,Yes,A:Yes,B:No,,,A")
    recs, stats = read_pmc_vqa_csv(p)
    assert [len(r.choices) for r in recs] == [2, 3, 3]
    assert recs[2].choices == {"A": "X", "B": "Y", "D": "Z"} and recs[2].answer_label == "D"
    assert stats.skipped == Counter({"fewer_than_2_choices": 1, "empty_question": 1})
    assert stats.kept + sum(stats.skipped.values()) == stats.rows_read == 5


def test_v2_parsing_with_caption(tmp_path):
    p = write(tmp_path, V2_HEADER + "\n"
              '0,PMC1_F1.jpg,"Axial MRI of the brain showing a mass, left side.",Which lobe?,'
              "A:Frontal, B: Parietal ,C:Occipital,D:Temporal,B,train\n"
              "1,PMC2_F1.jpg,,Which bone?,A:Femur,B:Tibia,C:Radius,D:Ulna, \"C\" ,train\n"
              "2,PMC3_F1.jpg,cap,Which?,A:x,B:y,C:z,D:w,D:,test\n"
              "3,PMC4_F1.jpg,cap,Which?,A:x,B:y,C:z,D:w,E,test\n"
              "4,PMC5_F1.jpg,cap,Which?,A:x,B:y,C:,D:w,C,test\n", "test_2.csv")
    recs, stats = read_pmc_vqa_csv(p)
    assert [r.answer_label for r in recs] == ["B", "C", "D"]
    assert recs[0].caption == "Axial MRI of the brain showing a mass, left side."
    assert recs[0].choices["B"] == "Parietal"
    assert recs[1].caption == ""
    assert recs[0].source_file == "test_2.csv" and recs[2].source_row == 2
    assert stats.skipped == Counter({"invalid_label": 2})


def test_header_with_bom_spaces_and_extra_columns(tmp_path):
    header = "\ufeff Figure_path , Question,Answer,Choice A,Choice B,Choice C,Choice D,Answer_label,extra"
    p = write(tmp_path, header + "\nf.jpg,Which?,Red,A:Red,B:Blue,C:Green,D:Black,A,zzz\n")
    r = read_one(p)
    assert r.figure_path == "f.jpg" and r.answer_label == "A"


def test_stats_merge_and_accumulate(tmp_path):
    a = v1(tmp_path, "f.jpg,Q?,Red,A:Red,B:Blue,,,A", name="a.csv")
    b = v1(tmp_path, "f.jpg,Q?,Red,A:Red,,,,A", "f.jpg,Q?,Blue,A:Red,B:Blue,,,A", name="b.csv")
    total = ReadStats()
    _, s1 = read_pmc_vqa_csv(a, total)
    recs, s2 = read_pmc_vqa_csv(b, total)
    assert s1 is total and s2 is total and len(recs) == 1
    assert total.to_dict() == {"rows_read": 3, "kept": 2, "skipped": {"fewer_than_2_choices": 1},
                               "label_text_mismatch": 1, "resolved_from_text": 0, "duplicate_distractors": 0}
    m = ReadStats(rows_read=1, kept=1).merge(ReadStats(rows_read=2, skipped=Counter(x=2)))
    assert m.rows_read == 3 and m.skipped["x"] == 2


# ---------------------------------------------------------------- bad input -> InputError
def raises(path, *needles):
    with pytest.raises(InputError) as ei:
        read_pmc_vqa_csv(path)
    msg = str(ei.value)
    assert "\n" not in msg
    assert Path(path).name in msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_missing_file(tmp_path):
    raises(tmp_path / "nope.csv", "no such file")


def test_directory(tmp_path):
    d = tmp_path / "folder.csv"
    d.mkdir()
    raises(d, "directory")


def test_empty_and_header_only(tmp_path):
    raises(write(tmp_path, "", "empty.csv"), "empty")
    raises(write(tmp_path, "\n\n  \n", "blank.csv"), "empty")
    raises(write(tmp_path, V1_HEADER + "\n", "header.csv"), "no data rows")


def test_png_bytes(tmp_path):
    p = tmp_path / "image.csv"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00" + bytes(range(256)))
    raises(p, "not a CSV")


def test_plain_text_file(tmp_path):
    msg = raises(write(tmp_path, "hello world\nthis is not a table\n", "notes.txt"),
                 "not a PMC-VQA CSV", "hello world")
    assert "Answer_label" in msg and "Caption" in msg


def test_missing_columns_lists_expected_and_found(tmp_path):
    header = "Figure_path,Question,Answer,Choice A,Choice B,Choice C,Choice D"
    msg = raises(write(tmp_path, header + "\nf,q,a,A:a,B:b,C:c,D:d\n"),
                 "missing column(s) 'Answer_label'", "found 7 column(s)", "'Choice D'")
    assert V1_HEADER in msg and V2_HEADER in msg


def test_non_utf8_names_row(tmp_path):
    body = (V1_HEADER + "\n"
            + 'f0.jpg,"Multi\nline?",Red,A:Red,B:Blue,C:Green,D:Black,A\n'
            + "f1.jpg,Fine?,Red,A:Red,B:Blue,C:Green,D:Black,A\n").encode()
    bad = b"f2.jpg,Bad \xe9 byte?,Red,A:Red,B:Blue,C:Green,D:Black,A\n"
    p = tmp_path / "latin1.csv"
    p.write_bytes(body + bad)
    raises(p, "not UTF-8", "row 2", f"byte offset {len(body) + 11}", "line 5")


def test_ragged_rows(tmp_path):
    p = v1(tmp_path, "f.jpg,Q?,Red,A:Red,B:Blue,C:Green,D:Black,A",
           'f.jpg,"Multi\nline",Red,A:Red,B:Blue,C:Green,D:Black,A',
           "f.jpg,Q?,Red,A:Red,B:Blue,C:Green,D:Black,A,extra", name="ragged.csv")
    raises(p, "row 2", "9 fields", "header has 8")
    # every row too long: pandas would silently turn the first column into an index
    p = v1(tmp_path, "x,f.jpg,Q?,Red,A:Red,B:Blue,C:Green,D:Black,A", name="allragged.csv")
    raises(p, "row 0", "9 fields")
    # an unclosed quote swallows the rest of the file
    p = v1(tmp_path, "f.jpg,Q?,Red,A:Red,B:Blue,C:Green,D:Black,A",
           'f.jpg,"Unclosed?,Red,A:Red,B:Blue,C:Green,D:Black,A', name="eof.csv")
    raises(p, "cannot parse", "data row 1")


# ---------------------------------------------------------------- resolve_data_files
def test_resolve_file(tmp_path):
    p = v1(tmp_path, "f.jpg,Q?,Red,A:Red,B:Blue,,,A", name="mine.csv")
    assert resolve_data_files(str(p)) == {"train": [p]}


def test_resolve_folder_v1_v2(tmp_path):
    for n in ("train.csv", "test.csv", "test_clean.csv", "train_2.csv", "test_2.csv", "other.csv"):
        (tmp_path / n).write_text("x\n")
    got = resolve_data_files(str(tmp_path))
    assert got == {"train": [tmp_path / "train.csv"], "test": [tmp_path / "test_clean.csv"],
                   "test_full": [tmp_path / "test.csv"],
                   "ignored_v2": [tmp_path / "train_2.csv", tmp_path / "test_2.csv"]}  # named, not read
    got2 = resolve_data_files(str(tmp_path), version="2")
    assert got2 == {"train": [tmp_path / "train_2.csv"], "test": [tmp_path / "test_2.csv"],
                    "ignored_v1": [tmp_path / "train.csv", tmp_path / "test.csv", tmp_path / "test_clean.csv"]}
    (tmp_path / "test_clean.csv").unlink()
    assert resolve_data_files(str(tmp_path))["test"] == [tmp_path / "test.csv"]
    assert set(PMC_FILES) == {"train.csv", "test.csv", "test_clean.csv", "train_2.csv", "test_2.csv"}


def test_resolve_folder_v2_only(tmp_path):
    (tmp_path / "train_2.csv").write_text("x\n")
    assert resolve_data_files(str(tmp_path)) == {"train": [tmp_path / "train_2.csv"]}


def test_resolve_folder_without_csvs(tmp_path):
    (tmp_path / "notes.csv").write_text("x\n")
    with pytest.raises(InputError) as ei:
        resolve_data_files(str(tmp_path))
    msg = str(ei.value)
    assert str(tmp_path) in msg and "train.csv" in msg and "test_2.csv" in msg and "notes.csv" in msg


def test_resolve_missing_local_path(tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        resolve_data_files(str(tmp_path / "missing.csv"))


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("test tried to use the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    # the tests below fake the hub's answers, so its reachability probe must say "reachable"
    # (the unreachable path has its own test)
    from pmcvqa_sft.core import hub
    monkeypatch.setattr(hub, "unreachable_reason", lambda: None)


@pytest.mark.parametrize("version", [None, "2"])
def test_resolve_hub_offline(tmp_path, monkeypatch, no_network, version):
    # huggingface_hub reads HF_HUB_OFFLINE at import; setting only the env var must be enough.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(InputError) as ei:
        resolve_data_files("xmcmic/PMC-VQA", cache_dir=tmp_path / "cache", version=version)
    msg = str(ei.value)
    assert "\n" not in msg
    assert "cannot download 'xmcmic/PMC-VQA' from the Hugging Face Hub" in msg
    assert "HF_HUB_OFFLINE" in msg
    assert "--data data/sample" in msg and "--data /path/to/PMC-VQA" in msg


def test_resolve_hub_network_error_is_one_line(tmp_path, monkeypatch, no_network):
    import huggingface_hub

    def fake_download(repo_id, filename, **kw):
        try:
            raise OSError("[Errno -2] Name or service not known")
        except OSError as exc:
            raise RuntimeError("An error happened while trying to locate the file\non the Hub.") from exc
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(InputError) as ei:
        resolve_data_files("xmcmic/PMC-VQA", cache_dir=tmp_path)
    msg = str(ei.value)
    assert "\n" not in msg and "train.csv" in msg and "Name or service not known" in msg
    assert "--data data/sample" in msg


def test_resolve_hub_downloads_only_csvs(tmp_path, monkeypatch, no_network):
    import huggingface_hub

    calls = []
    def fake_download(repo_id, filename, repo_type=None, cache_dir=None, local_files_only=False):
        calls.append((repo_id, filename, repo_type))
        return str(tmp_path / filename)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert resolve_data_files("xmcmic/PMC-VQA") == {"train": [tmp_path / "train.csv"],
                                                    "test": [tmp_path / "test_clean.csv"]}
    assert resolve_data_files("xmcmic/PMC-VQA", version="2")["test"] == [tmp_path / "test_2.csv"]
    assert {c[2] for c in calls} == {"dataset"}
    assert [c[1] for c in calls] == ["train.csv", "test_clean.csv", "train_2.csv", "test_2.csv"]


def test_utf16_file(tmp_path):
    p = tmp_path / "excel.csv"
    p.write_bytes((V1_HEADER + "\n").encode("utf-16"))
    raises(p, "UTF-16")


def test_resolve_hub_unknown_id_offline(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError) as ei:
        resolve_data_files("data/sampel", cache_dir=tmp_path)
    assert "no local file or folder" in str(ei.value)


# ---------------------------------------------------------------- the bundled sample
SIZES = {"train.csv": 840, "test.csv": 210, "train_2.csv": 64, "test_2.csv": 32}


def test_sample_files_parse_clean_and_balanced():
    for name, n in SIZES.items():
        recs, stats = read_pmc_vqa_csv(SAMPLE / name)
        assert stats.to_dict() == {"rows_read": n, "kept": n, "skipped": {},
                                   "label_text_mismatch": 0, "resolved_from_text": 0,
                                   "duplicate_distractors": 0}, name
        assert all(len(r.choices) == 4 for r in recs)
        counts = Counter(r.answer_label for r in recs)
        assert set(counts) == set("ABCD")
        assert max(counts.values()) - min(counts.values()) <= 1, (name, counts)
        assert all(r.figure_path.startswith("PMC") and r.figure_path.endswith(".jpg") for r in recs)
        if name.endswith("_2.csv"):
            assert all(r.caption for r in recs)
            assert [r.source_row for r in recs] == list(range(n))


def test_sample_has_real_file_quirks():
    raw = (SAMPLE / "train.csv").read_text(encoding="utf-8")
    assert "\u00a0" in raw
    cells = [c for row in csv.reader(raw.splitlines()[1:]) for c in row[3:7]]
    assert any(c.startswith(" ") for c in cells) and any(c[1:3] == ": " for c in cells)
    assert any(c[:2] in {"A:", "B:", "C:", "D:"} for c in cells)
    assert (SAMPLE / "README.md").is_file()


def test_sample_test_rows_unseen_in_train():
    train, _ = read_pmc_vqa_csv(SAMPLE / "train.csv")
    test, _ = read_pmc_vqa_csv(SAMPLE / "test.csv")
    key = lambda r: (r.question, tuple(r.choices.values()))  # noqa: E731
    seen = {key(r) for r in train}
    assert not any(key(r) in seen for r in test)
    assert len({key(r) for r in test}) == len(test)
    unseen = sample_data.TEST_ONLY_PHRASING.split("{")[0]
    assert any(r.question.startswith(unseen) for r in test)
    assert not any(r.question.startswith(unseen) for r in train)


def test_sample_committed_matches_generator(tmp_path):
    sample_data.write_sample(tmp_path)
    for name in SIZES:
        assert (tmp_path / name).read_bytes() == (SAMPLE / name).read_bytes(), name


def test_sample_generator_cli_refuses_overwrite(tmp_path):
    assert sample_data.main(["--out", str(tmp_path)]) == 0
    with pytest.raises(InputError, match="--overwrite"):
        sample_data.main(["--out", str(tmp_path)])
    assert sample_data.main(["--out", str(tmp_path), "--overwrite"]) == 0


def test_sample_facts_and_texts():
    facts = sample_data.FACTS
    assert 60 <= len(facts) <= 80
    assert all(len(v) >= 6 for v in sample_data.CATEGORIES.values())
    for cat, answers in sample_data.CATEGORIES.items():
        preds = [p for c, _, p in facts if c == cat]
        assert len(set(preds)) == len(preds) and len(set(answers)) == len(answers)
    assert all(1 <= len(a.split()) <= 4 for _, a, _ in facts)
    sents = sample_data.pretraining_sentences()
    assert "Magnetic resonance imaging uses a strong magnetic field." in sents
    assert not any(s.endswith("?") for s in sents) and len(sents) >= 2 * len(facts)
    text = sample_data.all_text()
    assert set(sents) <= set(text)
    recs, _ = read_pmc_vqa_csv(SAMPLE / "test_2.csv")
    blob = set(text)
    for r in recs:
        assert r.question in blob and r.caption in blob
        assert set(r.choices.values()) <= blob


def test_unreachable_hub_fails_fast_with_the_offline_hint(tmp_path, monkeypatch):
    """No HF_HUB_OFFLINE, no route to the hub: one quick error instead of ~23 s of retries."""
    from pmcvqa_sft.core import hub
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "unreachable_reason", lambda: "huggingface.co:443 unreachable (test)")
    import huggingface_hub
    calls, real = [], huggingface_hub.hf_hub_download

    def spy(*a, **k):
        calls.append(k.get("local_files_only"))
        return real(*a, **k)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", spy)
    with pytest.raises(InputError, match="data/sample") as err:
        resolve_data_files("xmcmic/PMC-VQA", cache_dir=tmp_path / "cache")
    # fast because the download looked in the local cache only: no network request, no retries
    assert calls and all(calls) and "unreachable" in str(err.value)


# ---------------------------------------------------------------- duplicate choices
def test_duplicate_choices_skipped_or_counted(tmp_path):
    p = v1(tmp_path,
           "f.jpg,Which?,MRI,A:MRI,B:MRI,C:CT,D:X-ray,A",      # gold text twice: B is as right as A -> skip
           "f.jpg,Which?,CT,A:CT,B:CT,C:CT,D:CT,C",            # all four the same -> skip
           "f.jpg,Which?,MRI,A:MRI,B:CT,C: ct ,D:X-ray,A",     # two wrong choices alike: kept, counted
           "f.jpg,Which?,MRI,A:MRI,B:CT,C:PET,D:X-ray,A")      # clean
    recs, stats = read_pmc_vqa_csv(p)
    assert [r.source_row for r in recs] == [2, 3]
    assert stats.skipped == Counter({"duplicate_choices": 2})
    assert stats.duplicate_distractors == 1 and stats.to_dict()["duplicate_distractors"] == 1
    assert stats.rows_read == stats.kept + sum(stats.skipped.values())
