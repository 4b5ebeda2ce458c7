"""`--export_lm_eval`: the exported task, run through the real `lm_eval` CLI, gives the toolkit's accuracy.

lm-eval comes from requirements-test.txt (`make test` installs it); the test skips with the install line
when it is missing. Tiny model + the quick adapter of tests/test_inference.py, CPU, one thread.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# the tiny adapter that answers the sample's first test questions, shared with tests/test_inference.py
from tests.test_inference import adapter_dir, known_rows, one_thread  # noqa: F401  (pytest fixtures)

ROOT = Path(__file__).resolve().parents[1]
N_ROWS = 40  # the 16 questions the adapter learnt and 24 it did not: an accuracy that is neither 0 nor 1


@pytest.fixture(scope="module")
def exported(adapter_dir, processed_tiny, tmp_path_factory):
    from pmcvqa_sft.evaluate.lm_eval import export
    out = tmp_path_factory.mktemp("lm-eval") / "task"
    export(out, processed_tiny, "test", N_ROWS, adapter=str(adapter_dir), log=lambda *_: None)
    return out


def test_exported_text_is_the_scorers_tokens(exported, adapter_dir, processed_tiny):
    from pmcvqa_sft import prompts
    from pmcvqa_sft.evaluate.scoring import ScoreItem, build_score_rows
    from pmcvqa_sft.format.encoding import PromptEncoder, encode_text
    from pmcvqa_sft.evaluate.accuracy import load_eval_rows
    from pmcvqa_sft.models.loading import load_tokenizer
    tok = load_tokenizer(str(adapter_dir))
    docs = [json.loads(x) for x in (exported / "pmcvqa_test.jsonl").read_text().splitlines()]
    rows, _ = load_eval_rows(processed_tiny, "test", N_ROWS)
    ref = build_score_rows(PromptEncoder(tok, None), [
        ScoreItem(prompts.format_user_prompt(r["question"], r["choices"]), r["choices"]) for r in rows])
    assert len(docs) == N_ROWS
    for d, r, (prompt_ids, letters, targets, _) in zip(docs, rows, ref):
        assert encode_text(tok, d["context"]) == prompt_ids and d["context"].count(tok.bos_token) == 1
        assert [encode_text(tok, c) for c in d["choices"]] == targets and letters == d["letters"]
        assert d["letters"][d["gold"]] == r["answer_label"]
    yaml = (exported / "pmcvqa_test.yaml").read_text()
    assert 'target_delimiter: ""' in yaml and "output_type: multiple_choice" in yaml


def test_export_refuses_to_overwrite(exported, adapter_dir, processed_tiny, capsys):
    import inference_example
    from pmcvqa_sft.core.errors import run_main
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: inference_example.main(["--adapter", str(adapter_dir), "--export_lm_eval", str(exported),
                                                 "--dataset_dir", str(processed_tiny)]))
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_lm_eval_acc_equals_the_toolkit_score_accuracy(exported, adapter_dir, processed_tiny, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install -r requirements-test.txt")
    from pmcvqa_sft.evaluate.accuracy import evaluate_model, load_eval_rows
    from pmcvqa_sft.models.adapters import load_for_inference
    meta = json.loads((exported / "lm_eval_export.json").read_text())
    cmd = meta["lm_eval_command"].split()
    assert cmd[:3] == ["lm_eval", "--model", "hf"] and f"peft={adapter_dir.resolve()}" in cmd[4]
    lm_eval = str(Path(sys.executable).with_name("lm_eval"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([lm_eval, *cmd[1:], "--device", "cpu", "--output_path", str(tmp_path / "out"),
                        "--log_samples"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(Path(glob.glob(str(tmp_path / "out" / "*" / "results_*.json"))[0]).read_text())
    samples = [json.loads(x) for x in
               Path(glob.glob(str(tmp_path / "out" / "*" / "samples_pmcvqa_test_*.jsonl"))[0]).read_text().splitlines()]
    acc_lm_eval = results["results"]["pmcvqa_test"]["acc,none"]

    rows, _ = load_eval_rows(processed_tiny, "test", N_ROWS)
    loaded = load_for_inference(None, str(adapter_dir), "none", log=lambda *_: None)
    with one_thread():
        preds, metrics = evaluate_model(loaded.model, loaded.tokenizer, rows, "score", batch_size=8, progress=False)
    assert 0 < metrics["accuracy"] < 1
    assert acc_lm_eval == pytest.approx(metrics["accuracy"], abs=1e-9)
    # per question: the same choice wins, and lm-eval's log-likelihoods differ from the toolkit's by one
    # constant (the context's trailing "\n" moved into every continuation), never per choice
    assert len(samples) == N_ROWS
    for s in samples:
        p = preds[s["doc_id"]]
        ll = [float(x[0]) for x in s["filtered_resps"]]
        offsets = [a - b for a, b in zip(ll, p["logprob"].values())]
        assert max(offsets) - min(offsets) < 2e-3, (s["doc_id"], offsets)
        assert s["doc"]["letters"][ll.index(max(ll))] == p["pred"]


def test_export_scores_what_evaluate_scores_on_truncated_rows(adapter_dir, tiny_dir, tmp_path, monkeypatch):
    """On a dataset whose long questions were shortened at preprocessing, the stored (trained) prompt and
    a prompt rebuilt from the stored question text differ. Whichever the evaluation scores, the export
    must hold the same tokens: the scorer's inputs are recorded (the real scorer runs) and compared."""
    from datasets import load_from_disk

    from pmcvqa_sft.evaluate import scoring
    from pmcvqa_sft import prompts
    from pmcvqa_sft.format.encoding import PromptEncoder, encode_text
    from pmcvqa_sft.evaluate.accuracy import run_evaluation
    from pmcvqa_sft.models.adapters import load_for_inference
    from pmcvqa_sft.evaluate.lm_eval import export
    from pmcvqa_sft.models.loading import load_tokenizer
    from pmcvqa_sft.preprocess.run import run_preprocess
    data = tmp_path / "data"
    run_preprocess(data=str(ROOT / "data" / "sample"), tokenizer_name=str(tiny_dir), output_dir=str(data),
                   max_length=92, max_samples=200, progress=False)
    tok = load_tokenizer(str(adapter_dir))
    enc = PromptEncoder(tok, None)
    stored_differs = 0
    for r in load_from_disk(str(data))["test"]:
        n = next(i for i, x in enumerate(r["labels"]) if x != -100)
        stored_differs += r["input_ids"][:n] != enc.prompt_ids([prompts.format_user_prompt(r["question"],
                                                                                             r["choices"])])[0]
    assert stored_differs > 0  # the case this test is about is really present

    scored = []
    real = scoring._score_batch

    def record(model, pad_id, batch):
        scored.extend((tuple(p), tuple(map(tuple, t))) for p, _letters, t, _nb in batch)
        return real(model, pad_id, batch)

    monkeypatch.setattr(scoring, "_score_batch", record)
    loaded = load_for_inference(None, str(adapter_dir), "none", log=lambda *_: None)
    with one_thread():
        run_evaluation(loaded, data, "test", batch_size=16, method="score", log=lambda *_: None)
    out = export(tmp_path / "task", data, "test", adapter=str(adapter_dir), log=lambda *_: None)
    docs = [json.loads(x) for x in (out / "pmcvqa_test.jsonl").read_text().splitlines()]
    exported = [(tuple(encode_text(tok, d["context"])), tuple(tuple(encode_text(tok, c)) for c in d["choices"]))
                for d in docs]
    assert len(exported) == len(scored) and sorted(exported) == sorted(scored)


def test_export_without_a_model_uses_the_datasets_tokenizer(processed_tiny, tmp_path, tiny_dir, capsys):
    """No --adapter/--model: the export is for the model the dataset was preprocessed with (the tiny folder),
    not the hub default (offline: a hub error); its token ids are that tokenizer's."""
    import inference_example
    from pmcvqa_sft.core.errors import run_main
    from pmcvqa_sft.models.loading import load_tokenizer
    from pmcvqa_sft.format.encoding import encode_text
    out = tmp_path / "task"
    run_main_code = None
    try:
        run_main(lambda: inference_example.main(["--export_lm_eval", str(out), "--dataset_dir", str(processed_tiny),
                                                 "--num_samples", "3"]))
    except SystemExit as exc:
        run_main_code = exc.code
    assert run_main_code in (None, 0), capsys.readouterr().err
    meta = json.loads((out / "lm_eval_export.json").read_text())
    assert meta["base_model"] == str(tiny_dir) and meta["n"] == 3
    tok = load_tokenizer(str(tiny_dir))
    doc = json.loads((out / "pmcvqa_test.jsonl").read_text().splitlines()[0])
    assert doc["context"].count(tok.bos_token) == 1 and encode_text(tok, doc["context"])
    assert f"exporting for '{tiny_dir}'" in capsys.readouterr().out
