"""Inference and evaluation on the tiny model with a LoRA adapter trained to answer directly (CPU).

The adapter comes from `pmcvqa_sft.quick_adapter.train_quick_adapter` (plain PEFT loop, cached under artifacts/,
so it is trained once per machine). It is trained on the first 16 questions of the sample's test file
until it answers them: the tiny model trained on the whole sample learns which choice TEXT is right but
not which LETTER holds it (letters are too hard for it: docs/INFERENCE_AND_EVALUATION.md), so its greedy letter would not
reflect its choice scores; a model that knows the answers must make both methods agree.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]
STEPS, N_TRAIN, LR = 400, 16, 3e-3  # answers all 16 (score and generation 100 %); 120 did on an older tiny build


# One torch thread: on a shared 2-core machine two threads stall each other on every small op
# (measured: this file 150 s with 2 threads, 13 s with 1). Restored after this module.
ENV_1T = {**os.environ, "OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def one_thread():
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="module")
def _one_thread_module():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def known_rows():
    from pmcvqa_sft.train.quick_adapter import sample_rows
    return sample_rows("test")[:N_TRAIN]


@pytest.fixture(scope="session")
def adapter_dir(tiny_dir, known_rows) -> Path:
    from pmcvqa_sft.train.quick_adapter import train_quick_adapter
    with one_thread():
        return train_quick_adapter(tiny_dir, STEPS, rows=known_rows, lr=LR)


@pytest.fixture(scope="session")
def loaded(adapter_dir):
    from pmcvqa_sft.models.adapters import load_for_inference
    return load_for_inference(None, str(adapter_dir), "none", log=lambda *_: None)


@pytest.fixture(scope="session")
def eval_rows(processed_tiny):
    from pmcvqa_sft.evaluate.accuracy import load_eval_rows
    rows, _ = load_eval_rows(processed_tiny, "test")
    return rows


def _cli(argv, capsys):
    """inference_example.main in-process under run_main: (exit code, stdout, stderr)."""
    import inference_example
    from pmcvqa_sft.core.errors import run_main
    capsys.readouterr()  # drop what earlier steps printed
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: inference_example.main(argv))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_score_and_generate_agree(loaded, known_rows):
    from pmcvqa_sft.evaluate.accuracy import evaluate_model
    m, t = loaded.model, loaded.tokenizer
    ps, ms = evaluate_model(m, t, known_rows, "score", batch_size=8, progress=False)
    pg, mg = evaluate_model(m, t, known_rows, "generate", batch_size=8, max_new_tokens=48, progress=False)
    agree = sum(a["pred"] == b["pred"] for a, b in zip(ps, pg)) / len(known_rows)
    assert agree >= 0.99, (agree, ms["accuracy"], mg["accuracy"])
    assert ms["accuracy"] > 0.9 and mg["unparseable_rate"] == 0  # the adapter answers directly
    assert ms["ci95"][0] < ms["accuracy"] <= ms["ci95"][1]


def test_batched_greedy_generation_equals_unbatched(loaded, eval_rows):
    from pmcvqa_sft.format.encoding import render_prompt
    from pmcvqa_sft.infer.generation import GenerationSettings, generate_batch
    from pmcvqa_sft.infer.answer import build_messages
    t = loaded.tokenizer
    prompts = [render_prompt(t, build_messages(r["question"], r["choices"])) for r in eval_rows[:6]]
    prompts.append(render_prompt(t, build_messages("What does a Prussian blue stain show?", None)))
    lengths = {len(t(p, add_special_tokens=False)["input_ids"]) for p in prompts}
    assert len(lengths) > 1  # really padded
    s = GenerationSettings(do_sample=False, max_new_tokens=24)
    batched = generate_batch(loaded.model, t, prompts, s)
    for p, b in zip(prompts, batched):
        assert generate_batch(loaded.model, t, [p], s)[0].token_ids == b.token_ids


def test_answer_question_api(loaded, adapter_dir, known_rows):
    from pmcvqa_sft.infer.answer import answer_question
    row = known_rows[0]
    q, ch, gold = row["question"], list(row["choices"].values()), row["answer_label"]
    a = answer_question(q, ch, loaded.model, loaded.tokenizer, greedy=True, max_new_tokens=48)
    assert a.letter == gold and a.answer == row["choices"][gold]
    assert a.raw.startswith("<think>") and "</think>" in a.raw and a.reasoning == ""
    b = answer_question(q, row["choices"], adapter=str(adapter_dir), greedy=True, quantization="none",
                        max_new_tokens=48)  # loads by folder name
    assert b.to_dict()["letter"] == gold
    o = answer_question("Which organ produces bile?", None, loaded.model, loaded.tokenizer, greedy=True,
                        max_new_tokens=48)
    assert o.letter is None and o.raw


def test_adapter_in_subfolder_and_tokenizer_from_output(adapter_dir, tmp_path):
    from pmcvqa_sft.format.encoding import template_hash
    from pmcvqa_sft.models.adapters import base_and_tokenizer
    out = tmp_path / "run"
    (out / "adapter").mkdir(parents=True)
    for f in adapter_dir.iterdir():
        shutil.copy(f, (out / "adapter" if f.name.startswith("adapter_") else out) / f.name)
    base, tok, adir, card = base_and_tokenizer(None, str(out))
    assert adir == out / "adapter" and card["steps"] == STEPS
    assert template_hash(tok) == card["template_hash"]


def test_scripted_console_session(adapter_dir):
    script = ("Which organ produces bile?\nWhich organ secretes insulin?\n/reset\n/think off\n"
              "/temp 0\nWhich stain detects iron deposits?\n")
    r = subprocess.run([sys.executable, "inference_example.py", "--adapter", str(adapter_dir), "--interactive",
                        "--greedy", "--max_new_tokens", "40", "--quantization", "none"],
                       input=script, capture_output=True, text=True, cwd=ROOT, timeout=HANG_GUARD_S, env=ENV_1T)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert out.count("assistant>") == 3 and "(conversation cleared)" in out and "(reasoning hidden)" in out
    assert "bye" in out and "Traceback" not in r.stderr
    first, last = out.split("(reasoning hidden)")
    assert "assistant> <think>" in first                   # the reasoning block is shown by default
    assert "<think>" not in last and "</think>" not in last  # hidden after /think off


def test_compare_base_both_columns(adapter_dir, processed_tiny, tmp_path, capsys):
    out = tmp_path / "eval"
    code, stdout, err = _cli(["--adapter", str(adapter_dir), "--quantization", "none", "--evaluate",
                              "--dataset_dir", str(processed_tiny), "--num_samples", "48", "--compare_base",
                              "--batch_size", "24", "--output_dir", str(out)], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["base"]["accuracy"] <= 1 and 0 <= metrics["tuned"]["accuracy"] <= 1
    assert metrics["majority_baseline"]["accuracy"] >= 0.25
    assert "base" in stdout and "tuned" in stdout and "majority-letter baseline" in stdout
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 48 and {"base", "tuned", "gold"} <= set(preds[0])
    code, _, err = _cli(["--adapter", str(adapter_dir), "--quantization", "none", "--evaluate",
                         "--dataset_dir", str(processed_tiny), "--output_dir", str(out)], capsys)
    assert code == 2 and "--overwrite" in err  # never overwrites silently


def test_merged_model_matches_base_plus_adapter(loaded, adapter_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from pmcvqa_sft.models.adapters import merge_and_save
    out = merge_and_save(str(adapter_dir), tmp_path / "merged", log=lambda *_: None)
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = loaded.tokenizer("<｜User｜>Which organ produces bile?<｜Assistant｜><think>\n",
                           return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = loaded.model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert torch.allclose(ref, got, atol=1e-4), (ref - got).abs().max()
    assert (out / "tokenizer_config.json").exists()


# ---- bad input: exit 2, one line on stderr, no traceback ----------------------------------------------

def _model_variant(tiny_dir, dst, **overrides):
    """A copy of the tiny model folder with another architecture size or another chat template."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    if "chat_template" in overrides:
        tok.chat_template = overrides.pop("chat_template")
    cfg = AutoConfig.from_pretrained(str(tiny_dir))
    for k, v in overrides.items():
        setattr(cfg, k, v)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


@pytest.fixture(scope="session")
def bad_datasets(tmp_path_factory):
    from datasets import Dataset, DatasetDict
    root = tmp_path_factory.mktemp("bad")
    report = json.dumps({"args": {}, "splits": {}})
    no_cols = root / "no_cols"
    DatasetDict({"test": Dataset.from_dict({"foo": [1]})}).save_to_disk(str(no_cols))
    (no_cols / "preprocess_report.json").write_text(report)
    empty = root / "empty"
    DatasetDict({"test": Dataset.from_dict({"question": [], "choices": [], "answer_label": []})}).save_to_disk(
        str(empty), num_shards={"test": 1})  # 0 shards would not load back (datasets bug)
    (empty / "preprocess_report.json").write_text(report)
    return no_cols, empty


def test_bad_inputs_one_line_errors(adapter_dir, tiny_dir, bad_datasets, tmp_path, capsys):
    from pmcvqa_sft.format.encoding import PLAIN_CHAT_TEMPLATE
    no_cols, empty = bad_datasets
    a = ["--adapter", str(adapter_dir), "--quantization", "none"]
    cases = [
        (["--adapter", str(tmp_path / "missing"), "--demo"], "does not exist"),
        (["--adapter", str(tmp_path), "--demo"], "adapter_config.json"),
        (["--model", str(_model_variant(tiny_dir, tmp_path / "h64", hidden_size=64, intermediate_size=128)),
          *a, "--demo"], "hidden size"),
        (["--model", str(_model_variant(tiny_dir, tmp_path / "v100", vocab_size=100)), *a, "--demo"],
         "vocabulary"),
        (["--model", str(_model_variant(tiny_dir, tmp_path / "tmpl", chat_template=PLAIN_CHAT_TEMPLATE)),
          *a, "--demo"], "chat template"),
        ([*a, "--evaluate", "--dataset_dir", str(no_cols)], "lacks columns"),
        ([*a, "--evaluate", "--dataset_dir", str(empty)], "is empty"),
        ([*a, "--evaluate", "--dataset_dir", str(empty), "--split", "train"], "no split"),
        ([*a, "--question", "Which?", "--choices", "A", "B", "C", "D", "E"], "at most 4"),
        ([*a, "--question", "Which?", "--choices", "MRI", ""], "empty"),
        ([*a, "--choices", "MRI"], "needs --question"),
        ([*a, "--merge_and_save", str(adapter_dir)], "--overwrite"),
    ]
    for argv, needle in cases:
        code, _, err = _cli(argv, capsys)
        assert code == 2, (argv, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, (argv, err)
        assert "Traceback" not in err


def test_bad_input_through_the_real_cli():
    r = subprocess.run([sys.executable, "inference_example.py", "--model", "tiny", "--question", "Which?",
                        "--choices", "MRI", " "], capture_output=True, text=True, cwd=ROOT, timeout=HANG_GUARD_S,
                       env=ENV_1T)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


def test_overwrite_never_replaces_a_foreign_folder(tmp_path):
    """--evaluate/--merge_and_save --overwrite replace only their own earlier output (not a training run)."""
    from pmcvqa_sft.evaluate import accuracy as evaluation
    from pmcvqa_sft.core.errors import InputError
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "run_card.json").write_text("{}")
    with pytest.raises(InputError, match="not an evaluation output"):
        evaluation.write_outputs(run, [], {"accuracy": 0.5}, overwrite=True)
    assert (run / "run_card.json").exists()
    out = evaluation.write_outputs(tmp_path / "eval", [], {"accuracy": 0.5})
    evaluation.write_outputs(out, [], {"accuracy": 0.6}, overwrite=True)  # its own output: replaced
    assert '"accuracy": 0.6' in (out / "metrics.json").read_text()


def test_score_refuses_a_reasoning_dataset(processed_tiny):
    """--reasoning brief datasets train a rationale first: --method score would score another format."""
    from types import SimpleNamespace

    from pmcvqa_sft.evaluate import accuracy as evaluation
    from pmcvqa_sft.core.errors import InputError
    rows, report = evaluation.load_eval_rows(processed_tiny, "test", 2)
    loaded = SimpleNamespace(has_adapter=False, tokenizer=None, system_prompt=None, processor=None)
    with pytest.raises(InputError, match="--method generate"):
        evaluation.run_evaluation(loaded, processed_tiny, method="score", data=(rows, {**report, "reasoning": "brief"}))


def test_bad_flags_fail_before_any_model_load(tmp_path, capsys):
    """Each bad value is a one-line error (exit 2) even with a --model that does not exist: it is
    checked before anything is loaded (a later check would report the missing model instead)."""
    m = ["--model", str(tmp_path / "no-such-model")]
    q = [*m, "--question", "Which?"]
    cases = [
        ([*q, "--temperature", "-0.5"], "--temperature must be >= 0"),
        ([*q, "--temperature", "nan"], "--temperature must be >= 0"),
        ([*q, "--top_p", "0"], "--top_p must be in (0, 1]"),
        ([*q, "--top_p", "1.5"], "--top_p must be in (0, 1]"),
        ([*m, "--evaluate", "--dataset_dir", str(tmp_path), "--batch_size", "0"], "--batch_size must be at least 1"),
        ([*m, "--evaluate", "--dataset_dir", str(tmp_path), "--compare_base"], "--compare_base needs --adapter"),
        ([*q, "--choices", "MRI"], "at least 2 choices"),
        ([*q, "--choices", "B: MRI", "C: CT"], "out of order"),
        ([*q, "--choices", "A: MRI", "A: CT"], "repeats a letter"),
    ]
    for argv, needle in cases:
        code, _, err = _cli(argv, capsys)
        assert code == 2, (argv, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, (argv, err)


def test_choices_lettered_by_position():
    from pmcvqa_sft.prompts import split_choices_arg
    assert split_choices_arg(["A: MRI", "B) CT"]) == {"A": "MRI", "B": "CT"}
    # a species name is not a letter: "C. difficile" as the first choice stays its text
    assert split_choices_arg(["C. difficile", "E. coli"]) == {"A": "C. difficile", "B": "E. coli"}


def test_truncated_rows_are_evaluated_with_the_trained_prompt(loaded, known_rows, tmp_path, capsys):
    """A question preprocessing cut to fit --max_length is scored and answered after exactly the prompt
    it was trained with (the stored input_ids), not the full question re-rendered; the cut rows are
    counted in the metrics."""
    import csv

    import torch

    from pmcvqa_sft.evaluate import accuracy as evaluation
    from pmcvqa_sft.data.store import load_processed
    from pmcvqa_sft.preprocess.run import run_preprocess

    def write(path, long_rows):
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D",
                        "Answer_label"])
            for i, r in enumerate(known_rows[:8]):
                q = r["question"] + (" Look at the figure carefully." * 30 if i in long_rows else "")
                cells = [f"{k}:{v}" for k, v in r["choices"].items()]
                w.writerow([f"f{i}.jpg", q, r["choices"][r["answer_label"]], *cells, r["answer_label"]])
        return path

    tok = loaded.tokenizer
    short = run_preprocess(data=str(write(tmp_path / "short.csv", ())), tokenizer_name="tiny", tokenizer=tok,
                           output_dir=str(tmp_path / "short"), val_size=0, progress=False)
    max_length = short["token_lengths"]["total"]["max"] + 10
    out = tmp_path / "cut"
    rep = run_preprocess(data=str(write(tmp_path / "cut.csv", (1, 4, 6))), tokenizer_name="tiny", tokenizer=tok,
                         output_dir=str(out), val_size=0, max_length=max_length, progress=False)
    assert rep["truncated"] == {"question": 3} and rep["kept"] == 8
    ds = load_processed(out)[0]["train"]
    assert [r["truncated"] for r in ds].count("question") == 3

    metrics = evaluation.run_evaluation(loaded, out, split="train", method="score", output_dir=tmp_path / "e1",
                                        log=lambda *_: None)
    assert metrics["truncated_rows"] == 3 and metrics["prompts"] == "trained (stored input_ids)"
    preds = [json.loads(x) for x in (tmp_path / "e1" / "predictions.jsonl").read_text().splitlines()]
    for row, rec in zip(ds, preds):  # the gold choice's score = the stored row's own target log-prob
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            lp = torch.log_softmax(loaded.model(input_ids=ids).logits[0].float(), -1)
        ref = sum(lp[i - 1, row["input_ids"][i]].item() for i in range(1, len(row["labels"]))
                  if row["labels"][i] != -100)
        assert rec["tuned"]["logprob"][rec["gold"]] == pytest.approx(ref, abs=2e-3), (rec["truncated"], ref)

    metrics = evaluation.run_evaluation(loaded, out, split="train", method="generate", max_new_tokens=24,
                                        output_dir=tmp_path / "e2", log=lambda *_: None)
    preds = [json.loads(x) for x in (tmp_path / "e2" / "predictions.jsonl").read_text().splitlines()]
    for row, rec in zip(ds, preds):
        assert rec["tuned"]["prompt_tokens"] == row["labels"].count(-100) < max_length
    assert metrics["truncated_rows"] == 3


# ---------------------------------------------------------------------------------------------------
# issue 17: figures checked before the model loads, the letter/text note, the context clip, --adapter RUN
# ---------------------------------------------------------------------------------------------------


def test_image_errors_come_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from pmcvqa_sft.models import adapters
    monkeypatch.setattr(adapters, "load_for_inference", lambda *a, **k: pytest.fail("the model was loaded"))
    Image.new("RGB", (5000, 10)).save(tmp_path / "wide.png")
    for image, words in ((tmp_path / "wide.png", "aspect_ratio"), (tmp_path, "is a folder"),
                         (tmp_path / "none.png", "does not exist")):
        code, _, err = _cli(["--model", "tiny-vision", "--question", "Q?", "--image", str(image)], capsys)
        assert code == 2 and words in err and err.count("\n") == 1, err


def test_cli_flags_an_answer_whose_letter_and_text_disagree(adapter_dir, capsys, monkeypatch):
    """`Answer: D. Liver` with Liver = C: printed as written, with a note that it is self-contradictory."""
    from pmcvqa_sft import prompts
    from pmcvqa_sft.infer import answer
    from pmcvqa_sft.infer.generation import Generated
    line = prompts.ANSWER_TEMPLATE.format(letter="D", text="Liver")
    monkeypatch.setattr(answer, "generate_batch", lambda *a, **k: [Generated(f"ok{prompts.THINK_CLOSE}\n\n{line}",
                                                                            [1, 2, 3], True)])
    argv = ["--adapter", str(adapter_dir), "--question", "Which organ produces bile?", "--greedy",
            "--choices", "Kidney", "Spleen", "Liver", "Heart"]
    code, out, _ = _cli(argv, capsys)
    assert code == 0 and "answer: D. Liver" in out
    assert "note: the model wrote letter D (Heart) but choice C's text ('Liver')" in out
    monkeypatch.setattr(answer, "generate_batch", lambda *a, **k: [Generated(
        f"ok{prompts.THINK_CLOSE}\n\n{line.replace('D', 'C')}", [1, 2, 3], False)])
    code, out, _ = _cli(argv, capsys)
    assert code == 0 and "answer: C. Liver" in out and "note:" not in out and "cut before the end" in out


def test_cli_answer_is_clipped_to_the_context(loaded):
    from pmcvqa_sft.format.encoding import render_prompt
    from pmcvqa_sft.infer.generation import GenerationSettings, context_length, generate_batch
    ctx = context_length(loaded.model)
    prompt = render_prompt(loaded.tokenizer, [{"role": "user", "content": "Which organ produces bile? " * 150}])
    n = len(loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert ctx // 2 < n < ctx
    gen = generate_batch(loaded.model, loaded.tokenizer, [prompt], GenerationSettings(False, max_new_tokens=10**6))[0]
    assert n + len(gen.token_ids) <= ctx and (gen.finished or n + len(gen.token_ids) == ctx)


def test_adapter_run_folder_is_accepted(adapter_dir, tmp_path):
    from pmcvqa_sft.core.errors import InputError
    from pmcvqa_sft.models.adapters import find_adapter_dir
    run = tmp_path / "demo-2026"
    shutil.copytree(adapter_dir, run / "model")
    assert find_adapter_dir(run) == find_adapter_dir(run / "model")  # `--adapter RUN`, as make demo prints it
    with pytest.raises(InputError, match="is a file"):
        find_adapter_dir(run / "model" / "adapter_config.json")


def test_compare_runs_refuses_one_folder_twice(tmp_path):
    from pmcvqa_sft.core.errors import InputError
    from pmcvqa_sft.evaluate.compare import compare_runs
    (tmp_path / "e").mkdir()
    with pytest.raises(InputError, match="same folder twice"):
        compare_runs([str(tmp_path / "e"), str(tmp_path / "e" / ".." / "e")])
