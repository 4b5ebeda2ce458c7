"""The image path after training, through the real scripts (a reduced `make demo-vision`): the gap
tuned vs base and vs blind, score = generate agreement, the blind ablation, `--image` / `answer_question`
with the stored prompt token for token, the demo, the console's `/image`, and the side-by-side table."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # one reduced demo-vision pipeline shared by the module (a few minutes)
ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample_vision"
# Reduced from the Makefile's 600 steps to the 300 docs/VISION.md measured (base 25.0 %, tuned 83.0 %,
# blind 17.5 % on the 200 test figures) to keep the module short; it asserts a +0.10 gap, a margin for
# library and platform drift (the demo itself shows +0.30).
STEPS, N_TEST, GAP = 300, 200, 0.10


def _run(args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, f"{args[0]} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    assert "Traceback" not in out.stderr
    return out


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """make demo-vision at a reduced size: preprocess -> 8-bit LoRA (+ merger) -> evaluate with --compare_base."""
    tmp = tmp_path_factory.mktemp("demo_vision")
    data, model, evald = tmp / "data", tmp / "model", tmp / "eval"
    _run(["preprocess_pmc_vqa_for_sft.py", "--data", str(SAMPLE), "--images", str(SAMPLE / "images_2.zip"),
          "--tokenizer", "tiny-vision", "--output_dir", str(data)])
    _run(["train_sft_example.py", "--model", "tiny-vision", "--dataset_dir", str(data), "--output_dir", str(model),
          "--quantization", "8bit", "--train_vision", "merger", "--max_steps", str(STEPS), "--learning_rate", "2e-3",
          "--warmup_steps", "20", "--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "1",
          "--no-gradient_checkpointing", "--eval_steps", "100", "--logging_steps", "20", "--report_to", "none",
          "--no-progress"])
    out = _run(["inference_example.py", "--adapter", str(model), "--quantization", "8bit", "--evaluate",
                "--compare_base", "--dataset_dir", str(data), "--split", "test", "--num_samples", str(N_TEST),
                "--output_dir", str(evald)])
    return {"tmp": tmp, "data": data, "model": model, "eval": evald, "stdout": out.stdout}


@pytest.fixture(scope="module")
def loaded(pipeline):
    from pmcvqa_sft.models.adapters import load_for_inference
    return load_for_inference(None, str(pipeline["model"]), "8bit", log=lambda *_: None)


def test_demo_vision_tuned_beats_base_and_blind(pipeline):
    metrics = json.loads((pipeline["eval"] / "metrics.json").read_text())
    base, tuned, blind = (metrics[k]["accuracy"] for k in ("base", "tuned", "blind"))
    assert all(0.0 <= x <= 1.0 for x in (base, tuned, blind))
    assert metrics["tuned"]["n"] == metrics["blind"]["n"] == N_TEST
    assert tuned >= base + GAP, pipeline["stdout"][-1500:]
    assert tuned >= blind + GAP, pipeline["stdout"][-1500:]
    card = json.loads((pipeline["model"] / "run_card.json").read_text())
    assert card["model_kind"] == "vision" and card["args"]["train_vision"] == "merger"
    assert card["real_token_share"] >= 0.95
    assert card["train_loss"][-1]["loss"] < card["train_loss"][0]["loss"]


def test_blind_ablation_blanks_every_figure(pipeline, loaded):
    from pmcvqa_sft.data.store import read_report
    from pmcvqa_sft.evaluate.accuracy import load_vision_rows
    from pmcvqa_sft.data.collate import make_collator
    from pmcvqa_sft.data.figures import blank_like, figure_loader
    rows, report = load_vision_rows(pipeline["data"], "test", 4)
    feats = [{"input_ids": r["prompt_ids"], "labels": [-100] * len(r["prompt_ids"]), "image": r["image"]}
             for r in rows]
    real = make_collator(loaded.processor, loaded.model, figure_loader(read_report(pipeline["data"])), None)(feats)
    gray = make_collator(loaded.processor, loaded.model, figure_loader(report), None, blank=blank_like)(feats)
    assert real["input_ids"].equal(gray["input_ids"])  # same prompt, same number of image tokens
    assert real["image_grid_thw"].equal(gray["image_grid_thw"])
    px = gray["pixel_values"].view(-1, 3, 2 * 14 * 14)  # channel-major patches: one value per channel
    assert (px == px[:1, :, :1]).all() and not real["pixel_values"].equal(gray["pixel_values"])
    recs = [json.loads(x) for x in (pipeline["eval"] / "predictions.jsonl").read_text().splitlines()]
    assert len(recs) == N_TEST and all({"base", "tuned", "blind"} <= set(r) for r in recs)


def test_score_equals_generation_logprobs(pipeline, loaded):
    """Scoring (right-padded, one forward) and generation (left-padded, KV cache, 3D rotary deltas) see
    the same inputs: the log-prob scoring gives a generated answer equals the one generation gave it."""
    import torch

    from pmcvqa_sft.infer.generation import GenerationSettings, _generation_config
    from pmcvqa_sft.data.collate import build_batch
    from pmcvqa_sft.evaluate.accuracy import load_vision_rows
    from pmcvqa_sft.evaluate.scoring import sequence_logprobs
    from pmcvqa_sft.data.collate import make_collator
    from pmcvqa_sft.data.figures import figure_loader
    rows, report = load_vision_rows(pipeline["data"], "test", 4)
    coll = make_collator(loaded.processor, loaded.model, figure_loader(report), loaded.card["args"]["max_pixels"])
    inputs = build_batch([(r["prompt_ids"], None) for r in rows], coll.figures(rows), coll.image_processor,
                         coll.image_token_id, coll.pad_token_id, coll.max_pixels, coll.mm_token_type_ids, left=True)
    tok = loaded.processor.tokenizer
    gc = _generation_config(loaded.model, tok, GenerationSettings(do_sample=False, max_new_tokens=24))
    with torch.no_grad():
        out = loaded.model.generate(**inputs, generation_config=gc, output_logits=True, return_dict_in_generate=True)
    new = out.sequences[:, inputs["input_ids"].shape[1]:]
    steps = torch.stack(out.logits, 1).float().log_softmax(-1)
    for i, r in enumerate(rows):
        ids = new[i].tolist()
        n = ids.index(tok.eos_token_id) + 1 if tok.eos_token_id in ids else len(ids)
        generated = steps[i, torch.arange(n), new[i, :n]].sum().item()
        scored = sequence_logprobs(loaded.model, coll, [(r["prompt_ids"], ids[:n], r["image"])])[0]
        assert abs(generated - scored) < 1e-2 + 2e-3 * abs(scored), (i, generated, scored, tok.decode(ids[:n]))


def test_generate_method_on_image_rows(pipeline, tmp_path):
    gen = tmp_path / "gen"
    _run(["inference_example.py", "--adapter", str(pipeline["model"]), "--quantization", "8bit", "--evaluate",
          "--method", "generate", "--no-blind", "--dataset_dir", str(pipeline["data"]), "--num_samples", "24",
          "--max_new_tokens", "24", "--output_dir", str(gen)])
    generated = [json.loads(x) for x in (gen / "predictions.jsonl").read_text().splitlines()]
    assert len(generated) == 24 and all(g["tuned"]["output"].startswith("Answer: ") for g in generated)
    assert sum(g["tuned"]["finished"] for g in generated) >= 20  # the tuned model stops (EOS trained)
    metrics = json.loads((gen / "metrics.json").read_text())
    assert "blind" not in metrics and metrics["tuned"]["method"] == "generate"
    assert metrics["tuned"]["unparseable"] <= 2


def test_inference_prompt_equals_training_prompt(pipeline, loaded):
    from pmcvqa_sft.format.encoding import render_prompt
    from pmcvqa_sft.evaluate.accuracy import load_vision_rows
    from pmcvqa_sft.infer.answer import build_messages
    rows, _ = load_vision_rows(pipeline["data"], "test", 5)
    tok = loaded.processor.tokenizer
    for r in rows:
        text = render_prompt(tok, build_messages(r["question"], r["choices"], None, loaded.system_prompt, image=True))
        assert tok(text, add_special_tokens=False)["input_ids"] == r["prompt_ids"]


def test_image_question_cli_and_answer_question(pipeline, loaded):
    from pmcvqa_sft.infer.answer import answer_question
    from pmcvqa_sft.infer.console import demo_questions
    q, choices, gold, path = demo_questions()[0]
    out = _run(["inference_example.py", "--adapter", str(pipeline["model"]), "--quantization", "8bit", "--greedy",
                "--image", str(path), "--question", q, "--choices", *choices.values(), "--json",
                "--max_new_tokens", "12"])
    ans = json.loads(out.stdout[out.stdout.index("{"):])
    assert ans["letter"] in choices and ans["raw"].startswith("Answer: ")
    direct = answer_question(q, choices, loaded.model, loaded.processor, image=path, greedy=True, max_new_tokens=12)
    assert direct.raw == ans["raw"]
    with pytest.raises(Exception, match="does not exist"):
        answer_question(q, choices, loaded.model, loaded.processor, image=str(path) + ".missing", greedy=True)


def test_demo_questions_with_bundled_figures(loaded):
    from pmcvqa_sft.infer.generation import GenerationSettings
    from pmcvqa_sft.infer.console import run_demo as run_vision_demo
    buf = io.StringIO()
    run_vision_demo(loaded.model, loaded.processor, GenerationSettings(do_sample=False, max_new_tokens=12),
                    out=buf)
    text = buf.getvalue()
    assert "demo: 4 questions" in text and text.count("answer: ") == 4 and "of 4 demo answers as expected" in text


def test_console_image_command(loaded, monkeypatch, tiny_dir):
    from pmcvqa_sft.infer.console import run_console
    from pmcvqa_sft.infer.generation import GenerationSettings
    from pmcvqa_sft.infer.console import demo_questions
    q, choices, gold, path = demo_questions()[0]
    question = q + " " + " ".join(f"{k}. {v}" for k, v in choices.items())
    script = f"/image {path}.missing\n/image {path}\n{question}\nand again, without a new figure?\n/exit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    buf = io.StringIO()
    assert run_console(loaded.model, loaded.processor, GenerationSettings(do_sample=False, max_new_tokens=12),
                       out=buf) == 0
    text = buf.getvalue()
    assert "does not exist" in text and f"(figure {path} attached to your next question)" in text
    assert text.count("assistant> ") == 2 and "Traceback" not in text
    # a text model says it takes no images, in one line, and carries on
    from pmcvqa_sft.models.loading import load_model, load_tokenizer
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {path}\n/exit\n"))
    buf = io.StringIO()
    run_console(load_model(str(tiny_dir), "none"), load_tokenizer(str(tiny_dir)),
                GenerationSettings(do_sample=False, max_new_tokens=4), out=buf)
    assert "this model takes no images" in buf.getvalue()


def test_side_by_side_table_of_evaluation_folders(pipeline, tmp_path, tiny_dir):
    """A text-only model on the same CSV rows (no figure) beside the image base / tuned / blind."""
    from pmcvqa_sft.evaluate.compare import compare_runs
    from pmcvqa_sft.core.errors import InputError
    text_data, text_eval = tmp_path / "text_data", tmp_path / "text_eval"
    _run(["preprocess_pmc_vqa_for_sft.py", "--data", str(SAMPLE), "--tokenizer", str(tiny_dir),
          "--output_dir", str(text_data)])
    _run(["inference_example.py", "--model", str(tiny_dir), "--evaluate", "--dataset_dir", str(text_data),
          "--num_samples", "60", "--output_dir", str(text_eval)])
    table = compare_runs([text_eval, pipeline["eval"]])
    head, header = table.splitlines()[:2]
    assert head.startswith("60 questions evaluated by every folder (of text_eval 60, eval 200)")
    assert header.split()[1:] == ["text_eval:model", "eval:base", "eval:tuned", "eval:blind"]
    # recomputed on the 60 shared rows: the image run's tuned accuracy there, from its own predictions
    recs = [json.loads(x) for x in (pipeline["eval"] / "predictions.jsonl").read_text().splitlines()][:60]
    acc = sum(r["tuned"]["correct"] for r in recs) / 60
    assert f"{100 * acc:.1f}%" in next(x for x in table.splitlines() if x.startswith("accuracy "))
    out = _run(["inference_example.py", "--compare_runs", str(text_eval), str(pipeline["eval"])])
    assert out.stdout.strip() == table.strip()
    with pytest.raises(InputError, match="not an evaluation folder"):
        compare_runs([tmp_path])
