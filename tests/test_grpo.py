"""--shuffle_choices, --train_head, the GRPO rewards and `--stage grpo` (TRL GRPOTrainer) on the tiny model.

The end-to-end checks share one module-scoped fixture: a 4-step SFT run (reshuffled choices, trained head),
then a GRPO run from its adapter killed with SIGKILL right after its first checkpoint and resumed.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from conftest import HANG_GUARD_S, ROOT
from test_train import script_env

from pmcvqa_sft import prompts
from pmcvqa_sft.format.encoding import IGNORE_INDEX, encode_conversation
from pmcvqa_sft.train import rewards as R

CHOICES = {"A": "Liver", "B": "Spleen", "C": "Kidney", "D": "Heart"}


# ---- choice reshuffling ----

def _row(processed):
    from pmcvqa_sft.data.store import load_processed
    dsd, report = load_processed(processed)
    return dsd["train"][0], report


def test_shuffled_rows_keep_labels_on_exactly_the_answer_and_eos(processed_tiny, tiny_tokenizer):
    from pmcvqa_sft.data.shuffle import ShuffledChoices, row_encoder_for
    from pmcvqa_sft.data.store import row_choices
    row, report = _row(processed_tiny)
    seen = []
    wrap = ShuffledChoices(lambda feats: feats, row_encoder_for(report, tiny_tokenizer), 1024, seed=3)
    gold_text = row_choices(row)[row["answer_label"]]
    for _ in range(12):
        (f,) = wrap([row])
        n_prompt = f["labels"].count(IGNORE_INDEX)
        assert f["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert f["labels"][n_prompt:] == f["input_ids"][n_prompt:]  # the target, all of it, and nothing else
        assert f["input_ids"][-1] == tiny_tokenizer.eos_token_id
        target = tiny_tokenizer.decode(f["input_ids"][n_prompt:-1])
        prompt = tiny_tokenizer.decode(f["input_ids"][:n_prompt])
        letter = target.split("Answer: ")[1][0]
        assert target.endswith(prompts.answer_line(letter, gold_text))  # the gold letter follows its text
        assert f"{letter}. {gold_text}" in prompt
        # the same ids as the reference encoder on the conversation with this draw's order
        from pmcvqa_sft.data.shuffle import shuffle_choices
        rng = random.Random(f"3/{(row['source_file'], row['source_row'])}/0/{len(seen)}")  # epoch 0
        shown, gold = shuffle_choices(row_choices(row), row["answer_label"], rng)
        assert gold == letter
        ref = encode_conversation(tiny_tokenizer, prompts.create_conversation(row["question"], shown, gold))
        assert ref == (f["input_ids"], f["labels"])
        seen.append(tuple(shown.values()))
    assert len(set(seen)) > 3  # a fresh order per draw
    assert sorted(seen[0]) == sorted(row_choices(row).values())


def test_shuffled_orders_follow_the_epoch_and_count_a_figures_tokens(processed_tiny, tiny_tokenizer):
    """Orders are a function of (seed, row, epoch, draw in the epoch), so a resumed epoch replays them; a row
    that will carry a figure's tokens is fitted to max_length with them counted (shortened, never over)."""
    from pmcvqa_sft.data.shuffle import ShuffledChoices, row_encoder_for
    row, report = _row(processed_tiny)
    enc = row_encoder_for(report, tiny_tokenizer)
    run = ShuffledChoices(lambda feats: feats, enc, 1024, seed=3)
    orders = {}
    for epoch in range(3):
        run.set_epoch(epoch)
        orders[epoch] = run([row])[0]["input_ids"]
    resumed = ShuffledChoices(lambda feats: feats, enc, 1024, seed=3)
    resumed.set_epoch(2)  # a run resumed in epoch 2 whose first draw of this row comes now
    assert resumed([row])[0]["input_ids"] == orders[2]
    assert len({tuple(v) for v in orders.values()}) > 1
    n = len(row["input_ids"])
    plain = ShuffledChoices(lambda feats: feats, enc, n + 4, seed=3)([row])[0]
    assert len(plain["input_ids"]) <= n + 4
    extra = 8
    fitted = ShuffledChoices(lambda feats: feats, enc, n + 4, seed=3, extra_tokens=lambda r: extra)([row])[0]
    assert len(fitted["input_ids"]) + extra <= n + 4 or fitted["input_ids"] == list(row["input_ids"])
    assert len(fitted["input_ids"]) < len(plain["input_ids"])


def test_shuffle_choices_moves_the_gold_letter_with_its_text():
    from pmcvqa_sft.data.shuffle import shuffle_choices
    rng = random.Random(0)
    golds = set()
    for _ in range(40):
        new, gold = shuffle_choices(CHOICES, "C", rng)
        assert new[gold] == "Kidney" and sorted(new.values()) == sorted(CHOICES.values()) and list(new) == list("ABCD")
        golds.add(gold)
    assert golds == set("ABCD")
    two, g = shuffle_choices({"A": "x", "B": "y"}, "B", rng)
    assert list(two) == ["A", "B"] and two[g] == "y"


def test_train_head_saves_lm_head():
    from pmcvqa_sft.models.lora import lora_config
    assert lora_config("tiny", train_head=True).modules_to_save == ["lm_head"]
    assert not lora_config("tiny").modules_to_save


# ---- rewards ----

def _reward(fn, texts, gold="C", opened=True):
    comps = [[{"role": "assistant", "content": t}] for t in texts]  # TRL's conversational completions
    n = len(texts)
    return fn([None] * n, comps, choices=[dict(CHOICES)] * n, answer_label=[gold] * n, opened_think=[opened] * n)


def test_rewards_read_the_exact_answer_after_the_opened_think_block():
    good = "\n</think>\n\nAnswer: C. Kidney"
    texts = [good, "\n</think>\n\nAnswer: C. Liver", "\n</think>\n\nAnswer: B. Kidney",
             "\n</think>\n</think>\nAnswer: C. Kidney",  # the think block closed twice: a learned hack
             "</think>: C. Kidney: C. Kidney",           # no answer line (the lenient parser's hack)
             "Answer: C. Kidney",                        # the think block never closed
             "\n</think>\n\nAnswer: C. Kidney\nAnswer: C. Kidney"]
    assert _reward(R.correct, texts) == [1, 0, 0, 1, 0, 0, 1]
    assert _reward(R.format_ok, texts) == [1, 1, 1, 0, 0, 0, 0]
    # a model whose prompt opens no think block (Qwen2.5-VL): the plain answer line is the answer
    assert _reward(R.correct, ["Answer: C. Kidney"], opened=False) == [1]
    long = "The organ that filters blood. " * 10 + "\n</think>\n\nAnswer: C. Kidney"
    assert _reward(R.length, [good, long, long.replace("C. Kidney", "A. Liver")]) == [0.0, 1.0, 0.0]


def test_rewards_spec_parses_weights_and_names_unknown_ones():
    assert R.parse_rewards("correct,format_ok") == [("correct", 1.0), ("format_ok", 0.1)]
    assert R.parse_rewards("correct:2, length:0.5") == [("correct", 2.0), ("length", 0.5)]
    for bad in ("correctness", "correct:x", " , "):
        with pytest.raises(ValueError):
            R.parse_rewards(bad)
    assert set(R.REWARDS) == {f.__name__ for f in R.REWARDS.values()}  # TRL logs a reward by its function name


def _cli(*args, **env):
    return subprocess.run([sys.executable, str(ROOT / "train_sft_example.py"), *map(str, args)], cwd=ROOT,
                          env=script_env(**env), capture_output=True, text=True, timeout=HANG_GUARD_S)


def test_grpo_options_refuse_bad_values_in_one_line(processed_tiny, tiny_dir, tmp_path):
    base = ["--model", tiny_dir, "--dataset_dir", processed_tiny, "--output_dir", tmp_path / "x", "--stage", "grpo",
            "--quantization", "none", "--per_device_train_batch_size", 16]
    for extra, words in ((["--per_device_train_batch_size", 12], "multiple of --num_generations"),
                         (["--rewards", "nope"], "unknown reward 'nope'"),
                         (["--num_generations", 1], "at least 2"),
                         (["--init_adapter", tmp_path / "none"], "does not exist")):
        r = _cli(*base, *extra)
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]


# ---- end to end: SFT -> GRPO, killed after its first checkpoint, resumed ----

@pytest.fixture(scope="module")
def sft_then_grpo(processed_tiny, tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo")
    common = ["--model", tiny_dir, "--dataset_dir", processed_tiny, "--quantization", "none",
              "--no-gradient_checkpointing", "--report_to", "tensorboard", "--no-progress", "--shuffle_choices",
              "--max_eval_samples", 8, "--logging_steps", 1, "--learning_rate", 1e-3, "--warmup_steps", 0]
    sft = _cli(*common, "--output_dir", out / "sft", "--max_steps", 4, "--eval_steps", 4,
               "--per_device_train_batch_size", 8, "--gradient_accumulation_steps", 1, "--train_head",
               "--max_samples", 64)
    assert sft.returncode == 0, sft.stderr[-3000:]
    grpo = [*common, "--stage", "grpo", "--init_adapter", out / "sft", "--output_dir", out / "grpo",
            "--max_steps", 4, "--eval_steps", 2, "--per_device_train_batch_size", 8, "--num_generations", 4,
            "--gradient_accumulation_steps", 1, "--max_completion_length", 16, "--max_samples", 32]
    killed = _cli(*grpo, PMCVQA_KILL_AFTER_SAVE=2)
    resumed = _cli(*grpo, "--resume_from_checkpoint", "auto")
    return out, killed, resumed


def test_grpo_resumes_after_kill_and_writes_card_curves_and_best_checkpoint(sft_then_grpo):
    out, killed, resumed = sft_then_grpo
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    card = json.loads((out / "grpo" / "run_card.json").read_text())
    assert card["stage"] == "grpo" and card["resumed_from"].endswith("checkpoint-2") and card["global_step"] == 4
    assert [r["name"] for r in card["rewards"]] == ["correct", "format_ok"]
    assert [r["weight"] for r in card["rewards"]] == [1.0, 0.1]
    assert card["init_adapter"].endswith("adapter") and card["prompt_opened_think"] is True
    assert [e["step"] for e in card["eval_strict"]] == [2, 4]  # step 2's came back with its checkpoint
    assert all(0 <= e["strict"] <= e["parsed"] <= 100 for e in card["eval_strict"])
    assert card["best_checkpoint"].endswith(("checkpoint-2", "checkpoint-4"))
    steps = [s for s, _ in card["train_curves"]["reward"]]
    assert steps == [1, 2, 3, 4] and card["train_curves"]["completions/clipped_ratio"]
    assert (out / "grpo" / "adapter" / "adapter_model.safetensors").is_file()
    adapter_cfg = json.loads((out / "grpo" / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["modules_to_save"] and "lm_head" in adapter_cfg["modules_to_save"]  # the SFT head kept
    assert (out / "grpo" / "loss_curve.png").stat().st_size > 10_000


def test_grpo_logs_reward_length_and_clipping_to_tensorboard(sft_then_grpo):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = sft_then_grpo[0]
    tags = set()
    for f in (out / "grpo" / "tensorboard").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(f))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    for want in ("train/reward", "train/reward_std", "train/completions/mean_length",
                 "train/completions/clipped_ratio", "eval/strict"):
        assert want in tags, sorted(tags)



@pytest.mark.slow
def test_grpo_on_an_image_model_feeds_the_figures(processed_vision, tmp_path):
    """tiny Qwen2.5-VL, 8-bit + LoRA: the prompt is the image conversation + an `image` column; the
    figure's tokens are in every sampled sequence (TRL counts them in num_tokens)."""
    r = _cli("--stage", "grpo", "--model", "tiny-vision", "--dataset_dir", processed_vision, "--output_dir",
             tmp_path / "v", "--quantization", "8bit", "--max_steps", 1, "--per_device_train_batch_size", 4,
             "--num_generations", 2, "--gradient_accumulation_steps", 1, "--max_completion_length", 8,
             "--no-gradient_checkpointing", "--eval_steps", 1, "--logging_steps", 1, "--max_eval_samples", 4,
             "--learning_rate", 1e-4, "--report_to", "none", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    card = json.loads((tmp_path / "v" / "run_card.json").read_text())
    assert card["model_kind"] == "vision" and card["prompt_opened_think"] is False
    step = next(e for e in card["log_history"] if "num_tokens" in e)
    from pmcvqa_sft.data.store import load_processed
    from pmcvqa_sft.models.loading import load_processor
    from pmcvqa_sft.train.grpo import grpo_rows
    from pmcvqa_sft.train.options import TrainOptions
    proc = load_processor("tiny-vision")
    dsd, report = load_processed(processed_vision)
    rows = grpo_rows(dsd["train"], report, TrainOptions(dataset_dir="-"), False, True)
    text_only = [len(proc.tokenizer(proc.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False),
                                    add_special_tokens=False)["input_ids"]) for r in rows]
    per_sequence = step["num_tokens"] / 4 - step["completions/mean_length"]
    assert per_sequence >= max(text_only) + 10  # 112 px figure = 16 image tokens in place of the one placeholder
    assert [e["step"] for e in card["eval_strict"]] == [1]


def test_stage_table_copies_each_evaluation_block(tmp_path, capsys):
    from pmcvqa_sft.core.errors import InputError
    from pmcvqa_sft.evaluate import stages
    for name, acc in (("base", 0.0), ("sft", 0.262), ("grpo", 0.243)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"adapter": None, "split": "test", "model": {
            "n": 210, "accuracy": acc, "accuracy_letter": acc, "accuracy_text": 0.995, "parsed_rate": 0.995,
            "accuracy_definition": "strict"}}))
    assert stages.main([str(tmp_path), *(f"{n}={tmp_path / n}" for n in ("base", "sft", "grpo"))]) == 0
    got = json.loads((tmp_path / "metrics.json").read_text())
    assert [got[n]["accuracy"] for n in ("base", "sft", "grpo")] == [0.0, 0.262, 0.243]
    assert got["grpo"]["parsed_rate"] == 0.995 and got["sft"]["accuracy_text"] == 0.995
    assert "26.2%" in capsys.readouterr().out
    with pytest.raises(InputError, match="metrics.json"):
        stages.stage_block(tmp_path / "absent")


@pytest.mark.slow
def test_grpo_with_beta_logs_kl_to_the_starting_adapter(sft_then_grpo, processed_tiny, tiny_dir, tmp_path):
    """beta > 0 on an --init_adapter run: TRL keeps a frozen copy of the SFT adapter as the reference
    ("ref" adapter), and `kl` is logged (run card curves, PNG panel)."""
    out = sft_then_grpo[0]
    r = _cli("--stage", "grpo", "--init_adapter", out / "sft", "--dataset_dir", processed_tiny, "--output_dir",
             tmp_path / "kl", "--quantization", "none", "--beta", 0.04, "--max_steps", 2,
             "--per_device_train_batch_size", 8, "--num_generations", 4, "--gradient_accumulation_steps", 1,
             "--max_completion_length", 16, "--no-gradient_checkpointing", "--eval_steps", 2, "--logging_steps", 1,
             "--max_eval_samples", 4, "--learning_rate", 1e-3, "--report_to", "none", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    card = json.loads((tmp_path / "kl" / "run_card.json").read_text())
    kl = card["train_curves"]["kl"]
    # step 1: policy = reference up to LoRA dropout (the base without the SFT adapter would be far away)
    assert [s for s, _ in kl] == [1, 2] and kl[0][1] == pytest.approx(0, abs=1e-3)
    assert card["args"]["beta"] == 0.04
