"""Rejection-sampled rationales, reasoning SFT from them, and endpoint evaluation (issue 15), on the tiny model.

The tiny model cannot reason: these tests prove the machinery is exact and loses nothing. The end-to-end
checks share one module-scoped pipeline (a data folder whose train rows the quick adapter knows, its
preprocessed split, a local sampling run) and the served adapter of tests/test_serving.py.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import HANG_GUARD_S, REAL_MODEL_FILES, REAL_TOKENIZER, SAMPLE_DIR
from tests.test_inference import adapter_dir, known_rows, one_thread  # noqa: F401  (pytest fixtures)
from tests.test_serving import ENV_1T, served  # noqa: F401  (pytest fixture)

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _run(args, check=True):
    r = subprocess.run([PY, *map(str, args)], cwd=ROOT, env=ENV_1T, capture_output=True, text=True,
                       timeout=HANG_GUARD_S)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


def _lines(path):
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, adapter_dir):
    """The 16 sample questions the quick adapter learnt, as train and test; preprocessed; sampled locally."""
    root = tmp_path_factory.mktemp("rationales")
    data = root / "data"
    data.mkdir()
    rows = list(csv.reader(open(SAMPLE_DIR / "test.csv", encoding="utf-8")))[:17]
    for name in ("train.csv", "test.csv"):
        with open(data / name, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(rows)
    proc = root / "proc"
    _run(["preprocess_pmc_vqa_for_sft.py", "--data", data, "--tokenizer", adapter_dir, "--val_size", "0",
          "--output_dir", proc])
    out = root / "local.jsonl"
    r = _run(["inference_example.py", "--adapter", adapter_dir, "--quantization", "none", "--sample_rationales",
              out, "--dataset_dir", proc, "--split", "train", "--samples", "3", "--max_new_tokens", "48"])
    print(r.stdout)
    return {"root": root, "data": data, "proc": proc, "local": out, "report": r.stdout}


def test_local_sampling_writes_one_line_per_question(pipeline):
    recs = _lines(pipeline["local"])
    assert len(recs) == 16 and len({r["id"] for r in recs}) == 16
    kept = [r for r in recs if r["kept"]]
    assert kept, pipeline["report"]  # the adapter answers its training rows: some are strictly right
    for r in kept:
        assert 1 <= r["attempts"] <= 3 and r["answer_line"].startswith("Answer: ") and r["reasoning"] is not None
        assert r["teacher"].startswith("local:") and r["settings"]["samples"] == 3
    for r in recs:
        if not r["kept"]:
            assert r["attempts"] == 3 and r["reasoning"] is None
    assert f"{len(kept)}/16 questions kept" in pipeline["report"]


def test_kill_9_then_rerun_loses_nothing(pipeline, adapter_dir, tmp_path):
    """A real SIGKILL mid-run; the rerun skips the ids written and completes the file, each id once."""
    out = tmp_path / "killed.jsonl"
    argv = [PY, "inference_example.py", "--adapter", str(adapter_dir), "--quantization", "none",
            "--sample_rationales", str(out), "--dataset_dir", str(pipeline["proc"]), "--split", "train",
            "--samples", "3", "--max_new_tokens", "48"]
    p = subprocess.Popen(argv, cwd=ROOT, env=ENV_1T, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline and p.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(HANG_GUARD_S)
    before = out.read_bytes()
    n_before = before.count(b"\n")
    assert 2 <= n_before < 16, "the kill came too late to test resuming"
    with open(out, "ab") as f:  # as if the kill had torn the next line
        f.write(b'{"id": "train.csv:99", "ke')
    _run(argv[1:])
    recs = _lines(out)
    assert len(recs) == 16 and len({r["id"] for r in recs}) == 16
    assert out.read_bytes().startswith(before)  # the lines written before the kill are kept as they were


def test_torn_last_line_is_cut(tmp_path):
    from pmcvqa_sft.evaluate.rationales import JsonlLog
    p = tmp_path / "x.jsonl"
    p.write_text('{"id": "a", "kept": false}\n{"id": "b", "ke')
    log = JsonlLog(p)
    assert set(log.done) == {"a"} and p.read_text() == '{"id": "a", "kept": false}\n'
    log.append({"id": "c", "kept": True})
    assert [r["id"] for r in _lines(p)] == ["a", "c"]


def test_kept_is_strict_and_reasoning_tokens_are_the_tokenizers_count(tiny_tokenizer, tmp_path):
    """Kept = the first strictly right sample by format.answers.exact_match (the right text under the wrong
    letter is not); the report's mean reasoning tokens are those of the kept reasoning alone (the think
    block, or the plain text before the answer line), counted with the tokenizer: an empty think block is 0."""
    from pmcvqa_sft.evaluate.rationales import Sample, format_rationale_report, report_path, sample_rationales
    known = "Bile is made by hepatocytes in the liver."
    plain = "The figure shows the liver."
    turns = [["<think>\nno\n</think>\n\nAnswer: A. Liver", f"<think>\n{known}\n</think>\n\nAnswer: B. Liver"],
             ["<think>\n\n</think>\n\nAnswer: B. Liver"],
             [f"{plain}\n\nAnswer: B. Liver"],  # a model without think tokens (Qwen2.5-VL)
             ["<think>\nx\n</think>\n\nAnswer: A. Kidney", "<think>\nx\n</think>\n\nAnswer: B. Kidney"]]
    rows = [{"source_file": "t.csv", "source_row": i, "index": i, "answer_label": "B",
             "choices": {"A": "Kidney", "B": "Liver"}} for i in range(len(turns))]
    out = tmp_path / "r.jsonl"
    rep = sample_rationales(rows, lambda row: (Sample(t, range(7), True) for t in turns[row["source_row"]]), out,
                            2, "fake", {}, tiny_tokenizer, "tiny")
    recs = [(r["kept"], r["attempts"], r["reasoning"], r["reasoning_tokens"]) for r in _lines(out)]
    count = lambda text: len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert count(known) > 0 and count(plain) > 0
    assert recs == [(True, 2, known, count(known)), (True, 1, "", 0), (True, 1, plain, count(plain)),
                    (False, 2, None, None)]
    assert rep["mean_reasoning_tokens"] == (count(known) + count(plain)) / 3
    assert rep["success_by_attempt"] == {"1": 2, "2": 1} and rep["mean_completion_tokens"] == 7
    assert rep["reasoning_tokens_counted_with"] == "tiny" and json.loads(report_path(out).read_text()) == rep
    text = format_rationale_report(rep)
    assert "3/4 questions kept (75.0 %)" in text and "counted with the tokenizer of tiny" in text
    assert f"): {(count(known) + count(plain)) / 3:.1f}" in text


def _target_check(tok, rationale):
    """The trained target holds the rationale in the think block; the inference prompt is a prefix."""
    from pmcvqa_sft import prompts
    from pmcvqa_sft.format.encoding import IGNORE_INDEX, encode_conversation, encode_text, render_prompt
    msgs = prompts.create_conversation("Which organ produces bile?", {"A": "Kidney", "B": "Liver"}, "B",
                                       rationale=rationale)
    ids, labels = encode_conversation(tok, msgs)
    n = labels.count(IGNORE_INDEX)
    assert ids[:n] == encode_text(tok, render_prompt(tok, msgs[:-1]))  # exactly the inference prompt
    target = tok.decode(ids[n:], skip_special_tokens=False)
    assert rationale in target and target.index(rationale) < target.index(prompts.THINK_CLOSE)
    assert prompts.answer_line("B", "Liver") in target and target.endswith(tok.eos_token)
    return tok.apply_chat_template(msgs, tokenize=False), target  # the template's own rendering of the turn


def test_rationale_target_is_token_exact_with_the_real_r1_template():
    if not (REAL_TOKENIZER.is_dir() and (REAL_MODEL_FILES / "tokenizer_config.json").exists()):
        pytest.skip(f"real R1 fixtures absent ({REAL_TOKENIZER}, {REAL_MODEL_FILES}); R1 template test skipped")
    from pmcvqa_sft.models.loading import load_tokenizer
    tok = load_tokenizer(str(REAL_TOKENIZER))
    tok.chat_template = json.loads((REAL_MODEL_FILES / "tokenizer_config.json").read_text())["chat_template"]
    why = "The figure shows the liver.\nBile is made by hepatocytes, so B."
    full, target = _target_check(tok, why)
    assert why not in full and why in target  # the R1 template drops the think block of rendered assistant turns


def test_rationale_target_on_the_tiny_model(tiny_tokenizer):
    _target_check(tiny_tokenizer, "Bile is made in the liver.")


def test_no_think_models_get_the_rationale_as_plain_text_before_the_answer():
    """Qwen2.5-VL opens no think block: the reasoning is plain text, then a blank line, then the answer line."""
    from pmcvqa_sft import prompts
    msgs = prompts.create_conversation("Q?", {"A": "x", "B": "y"}, "A", image=True, think=False, rationale="Because x.")
    assert msgs[-1]["content"] == "Because x.\n\nAnswer: A. x"


def test_preprocess_puts_rationales_in_the_targets_and_sft_runs(pipeline, adapter_dir, tmp_path):
    from datasets import load_from_disk

    from pmcvqa_sft.format.encoding import IGNORE_INDEX
    from pmcvqa_sft.models.loading import load_tokenizer
    tok = load_tokenizer(str(adapter_dir))
    kept = {r["id"]: r["reasoning"] for r in _lines(pipeline["local"]) if r["kept"]}
    for policy, n_train in (("drop", len(kept)), ("answer_only", 16)):
        out = tmp_path / policy
        _run(["preprocess_pmc_vqa_for_sft.py", "--data", pipeline["data"], "--tokenizer", adapter_dir,
              "--val_size", "0", "--output_dir", out, "--rationales", pipeline["local"], "--rationale_missing", policy])
        rep = json.loads((out / "preprocess_report.json").read_text())["rationales"]
        assert rep == {"file": str(pipeline["local"]), "policy": policy, "train_rows": 16,
                       "with_rationale": len(kept), "without": 16 - len(kept),
                       "dropped": 16 - len(kept) if policy == "drop" else 0}
        train = load_from_disk(str(out))["train"]
        assert len(train) == n_train
        with_why = 0
        for row in train:
            qid = f"{os.path.basename(row['source_file'])}:{row['source_row']}"
            n = row["labels"].count(IGNORE_INDEX)
            prompt = tok.decode(row["input_ids"][:n], skip_special_tokens=False)
            target = tok.decode(row["input_ids"][n:], skip_special_tokens=False)
            why = kept.get(qid, "")  # the prompt opened the think block; the target holds the rest of it
            assert prompt.endswith("<think>\n") and target.startswith(f"{why}\n</think>\n\nAnswer: "), (qid, target)
            with_why += qid in kept
        assert with_why == len(kept)
    model = tmp_path / "model"
    _run(["train_sft_example.py", "--model", "tiny", "--dataset_dir", tmp_path / "drop", "--output_dir", model,
          "--quantization", "none", "--max_steps", "2", "--per_device_train_batch_size", "4",
          "--no-gradient_checkpointing", "--report_to", "none", "--no-progress"])
    assert (model / "adapter" / "adapter_config.json").exists() and (model / "run_card.json").exists()


def test_endpoint_evaluation_matches_local_generate(pipeline, served, adapter_dir, tmp_path):
    """The served adapter, greedy through the OpenAI client, scores the same strict accuracy as local
    --method generate on the same rows; --compare_runs puts them side by side."""
    _srv, base_url, _port, _ = served
    local, remote = tmp_path / "local", tmp_path / "remote"
    _run(["inference_example.py", "--adapter", adapter_dir, "--quantization", "none", "--evaluate", "--method",
          "generate", "--dataset_dir", pipeline["proc"], "--output_dir", local, "--max_new_tokens", "48"])
    _run(["inference_example.py", "--evaluate", "--method", "generate", "--endpoint", base_url, "--endpoint_model",
          "tiny-run", "--dataset_dir", pipeline["proc"], "--output_dir", remote, "--max_new_tokens", "48",
          "--concurrency", "4"])
    lm = json.loads((local / "metrics.json").read_text())["tuned"]
    rm = json.loads((remote / "metrics.json").read_text())["endpoint"]
    assert rm["n"] == lm["n"] == 16 and rm["endpoint_failures"] == 0
    assert rm["correct"] == lm["correct"], (rm["correct"], lm["correct"])
    # reasoning tokens counted as the local run counts them, with the dataset's tokenizer
    lp = [r["tuned"]["reasoning_tokens"] for r in _lines(local / "predictions.jsonl")]
    assert [r["endpoint"]["reasoning_tokens"] for r in _lines(remote / "predictions.jsonl")] == lp
    assert rm["mean_reasoning_tokens"] == lm["mean_reasoning_tokens"] is not None
    assert rm["reasoning_tokens_counted_with"].startswith("the dataset (")
    print(f"strict accuracy: local generate {lm['correct']}/{lm['n']}, served endpoint {rm['correct']}/{rm['n']}")
    r = _run(["inference_example.py", "--compare_runs", local, remote])
    assert "16 questions evaluated by every folder" in r.stdout
    # a rerun resumes: every answer is read back, no request is repeated
    r = _run(["inference_example.py", "--evaluate", "--method", "generate", "--endpoint", "http://127.0.0.1:9/v1",
              "--endpoint_model", "tiny-run", "--dataset_dir", pipeline["proc"], "--output_dir", remote,
              "--max_new_tokens", "48", "--endpoint_retries", "0"])
    assert json.loads((remote / "metrics.json").read_text())["endpoint"]["correct"] == lm["correct"]


def test_endpoint_rationales_and_named_failures(pipeline, served, tmp_path):
    _srv, base_url, _port, _ = served
    out = tmp_path / "endpoint.jsonl"
    env = {**ENV_1T, "PMCVQA_ENDPOINT_KEY": "secret-key-123"}
    r = subprocess.run([PY, "inference_example.py", "--endpoint", base_url, "--endpoint_model", "tiny-run",
                        "--sample_rationales", str(out), "--dataset_dir", str(pipeline["proc"]), "--split", "train",
                        "--samples", "2", "--max_new_tokens", "48", "--num_samples", "6"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "secret-key-123" not in r.stdout + r.stderr
    recs = _lines(out)
    assert len(recs) == 6 and all(x["teacher"] == "endpoint:tiny-run" and x["failure"] is None for x in recs)
    print(r.stdout)
    dead = tmp_path / "dead.jsonl"
    r = _run(["inference_example.py", "--endpoint", "http://127.0.0.1:9/v1", "--endpoint_model", "x",
              "--sample_rationales", dead, "--dataset_dir", pipeline["proc"], "--split", "train", "--num_samples", "2",
              "--endpoint_retries", "1"])
    assert [x["failure"] for x in _lines(dead)] == ["connection", "connection"]
    assert "endpoint failures: connection: 2" in r.stdout
