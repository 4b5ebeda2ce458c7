"""No noise in logs: a preprocessing run and a tiny-model training setup print none of the notices that
say nothing to the user (the tokenizer's "longer than the maximum" warning on rows that are then
shortened correctly, Trainer's PAD/BOS/EOS alignment notice, progress-bar fragments when stderr is not a
terminal, as under pytest's capture)."""
from __future__ import annotations

import csv

from conftest import SAMPLE_DIR
from test_train import small_opts

NOISE = ("longer than the specified maximum", "PAD/BOS/EOS", "Loading weights", "\r", "it/s]")


def _assert_quiet(text: str):
    for n in NOISE:
        assert n not in text, f"{n!r} in the log:\n{text[-2000:]}"


def test_preprocess_logs_no_notices(tmp_path, tiny_dir, capfd):
    from pmcvqa_sft.preprocess.run import run_preprocess
    rows = list(csv.reader(open(SAMPLE_DIR / "train.csv", newline="", encoding="utf-8")))
    header, first = rows[0], rows[1]
    long_row = list(first)
    long_row[header.index("Question")] = "Which finding is shown here " * 400 + "?"  # > the tiny model's 1024
    path = tmp_path / "train.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, long_row, *rows[1:]])
    report = run_preprocess(data=str(path), tokenizer_name=str(tiny_dir), output_dir=str(tmp_path / "out"))
    assert report["truncated"].get("question") == 1  # the long row was shortened, as the notice would warn
    out, err = capfd.readouterr()
    _assert_quiet(out + err)


def test_tiny_training_setup_logs_no_notices(processed_tiny, tiny_dir, tmp_path, capfd, one_thread):
    from pmcvqa_sft.train.run import setup_run
    capfd.readouterr()
    run = setup_run(small_opts(processed_tiny, tmp_path / "run", model=str(tiny_dir), max_steps=1),
                    log=lambda *_: None)
    run.trainer.train()
    out, err = capfd.readouterr()
    _assert_quiet(out + err)


def test_evaluation_logs_no_progress_fragments(processed_tiny, tiny_dir, capfd, one_thread):
    """Scoring and generating (as --evaluate runs them) leave no bar fragments in a non-terminal log."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pmcvqa_sft.evaluate.accuracy import evaluate_model, load_eval_rows
    rows, _ = load_eval_rows(processed_tiny, "test", num_samples=20)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    capfd.readouterr()
    for method in ("score", "generate"):  # batch 4: several batches, so a bar would redraw
        preds, metrics = evaluate_model(model, tok, rows, method=method, batch_size=4, max_new_tokens=4)
        assert metrics["n"] == len(rows) == len(preds)
    out, err = capfd.readouterr()
    _assert_quiet(out + err)
