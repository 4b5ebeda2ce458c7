"""Rationales and endpoint evaluation on image rows (issue 15), on the tiny Qwen2.5-VL run and server that
tests/test_serving_vision.py uses (conftest's session fixtures `vision_run` and `served_vision`: one
training, one server for both files).

The 40-step adapter is weak (accuracy is not the point): these tests prove that the figure reaches the
endpoint (its greedy answers equal local `--method generate`'s on the same rows), and that rationale
sampling on image rows, through the endpoint and locally, writes one line per question, judged by the
exact metric, and resumes without asking again.
"""
from __future__ import annotations

import json

from tests.test_rationales import _lines, _run

ROWS = 6  # test rows compared; few, so the added time stays small


def _kept_turn_is_strict(rec, row):
    """A kept record's turn (reasoning, then the answer line: Qwen2.5-VL opens no think block) is strictly
    right by format.answers.exact_match, the reader of the evaluation and of the GRPO rewards."""
    from pmcvqa_sft import prompts
    from pmcvqa_sft.format.answers import exact_match
    gold = row["answer_label"]
    turn = prompts.assistant_content(gold, row["choices"][gold], rec["reasoning"], think=False)
    return turn.endswith(rec["answer_line"]) and exact_match(turn, row["choices"], gold)["strict"]


def _rows_by_id(vision_run):
    from pmcvqa_sft.evaluate.accuracy import load_vision_rows
    from pmcvqa_sft.format.encoding import question_id
    rows, _ = load_vision_rows(vision_run / "data", "test", 8)
    return {question_id(r): r for r in rows}


def _check_records(recs, rows, k, teacher):
    assert len({r["id"] for r in recs}) == len(recs)
    for r in recs:
        assert r["teacher"] == teacher and r["failure"] is None and r["settings"]["samples"] == k
        if r["kept"]:
            assert 1 <= r["attempts"] <= k and _kept_turn_is_strict(r, rows[r["id"]]), r
            assert r["reasoning_tokens"] is not None
        else:
            assert r["attempts"] == k and r["reasoning"] is None and r["reasoning_tokens"] is None


def test_image_questions_carry_the_figure_as_an_image_url_part(vision_run):
    from pmcvqa_sft.data.figures import figure_loader
    from pmcvqa_sft.data.store import read_report
    from pmcvqa_sft.evaluate.endpoint import row_messages
    row = next(iter(_rows_by_id(vision_run).values()))
    img = figure_loader(read_report(vision_run / "data"))(row["image"])
    parts = row_messages(row, False, image=img)[-1]["content"]
    urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
    assert len(urls) == 1 and urls[0].startswith("data:image/png;base64,")
    assert [p["type"] for p in parts].count("text") == 1


def test_endpoint_evaluation_of_image_rows_equals_local_generate(served_vision, vision_run, tmp_path):
    """Greedy through --serve and the OpenAI client, the figures sent as data URLs: the same answers, the
    same strict accuracy as local --method generate on the same image rows."""
    local, remote = tmp_path / "local", tmp_path / "remote"
    common = ["--evaluate", "--method", "generate", "--dataset_dir", vision_run / "data", "--num_samples", ROWS,
              "--max_new_tokens", "32"]
    _run(["inference_example.py", "--adapter", vision_run, "--quantization", "none", "--no-blind", *common,
          "--output_dir", local])
    _run(["inference_example.py", "--endpoint", served_vision, "--endpoint_model", vision_run.name, *common,
          "--output_dir", remote, "--concurrency", "2"])
    lm = json.loads((local / "metrics.json").read_text())["tuned"]
    rm = json.loads((remote / "metrics.json").read_text())["endpoint"]
    assert rm["n"] == lm["n"] == ROWS and rm["endpoint_failures"] == 0
    lp = [r["tuned"] for r in _lines(local / "predictions.jsonl")]
    rp = [r["endpoint"] for r in _lines(remote / "predictions.jsonl")]
    assert [p["output"].strip() for p in rp] == [p["output"].strip() for p in lp]
    assert [p["pred"] for p in rp] == [p["pred"] for p in lp] and rm["correct"] == lm["correct"]
    assert [p["reasoning_tokens"] for p in rp] == [p["reasoning_tokens"] for p in lp]
    assert rm["mean_reasoning_tokens"] == lm["mean_reasoning_tokens"] is not None
    print(f"image rows, strict accuracy: local generate {lm['correct']}/{lm['n']}, endpoint {rm['correct']}/{rm['n']}; "
          f"parsed {lm['parsed_rate']:.2f} / {rm['parsed_rate']:.2f}")


def test_endpoint_rationales_on_image_rows(served_vision, vision_run, tmp_path):
    out = tmp_path / "endpoint.jsonl"
    r = _run(["inference_example.py", "--endpoint", served_vision, "--endpoint_model", vision_run.name,
              "--sample_rationales", out, "--dataset_dir", vision_run / "data", "--split", "test",
              "--samples", "2", "--num_samples", "4", "--max_new_tokens", "32", "--temperature", "1.0"])
    print(r.stdout)
    recs = _lines(out)
    assert len(recs) == 4
    _check_records(recs, _rows_by_id(vision_run), 2, f"endpoint:{vision_run.name}")
    rep = json.loads(out.with_name("endpoint.report.json").read_text())
    assert rep["questions"] == 4 and rep["kept"] == sum(x["kept"] for x in recs) and rep["failures"] == {}
    assert rep["reasoning_tokens_counted_with"] == "the dataset (tiny-vision)"
    assert f"{rep['kept']}/4 questions kept" in r.stdout and "counted with the tokenizer of the dataset" in r.stdout


def test_local_rationales_on_image_rows_resume(vision_run, tmp_path):
    """K samples of each image question in one batch, with its figure; a rerun over more questions skips the
    ids already written (a redone question would be a second line with its id)."""
    out = tmp_path / "local.jsonl"
    argv = ["inference_example.py", "--adapter", vision_run, "--quantization", "none", "--sample_rationales", out,
            "--dataset_dir", vision_run / "data", "--split", "test", "--samples", "3", "--max_new_tokens", "32",
            "--temperature", "1.0", "--num_samples"]
    _run([*argv, "3"])
    before = out.read_bytes()
    assert before.count(b"\n") == 3
    r = _run([*argv, "5"])
    print(r.stdout)
    recs = _lines(out)
    assert len(recs) == 5 and out.read_bytes().startswith(before)
    _check_records(recs, _rows_by_id(vision_run), 3, f"local:{vision_run}")
    rep = json.loads(out.with_name("local.report.json").read_text())
    assert rep["questions"] == 5 and rep["kept"] == sum(x["kept"] for x in recs)
