"""Training: batching and masks, LoRA learning on 8-bit and 4-bit bases, exact resume, bad input.

All on the CPU with the embedded tiny model and the bundled sample preprocessed by `processed_tiny`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_sft_example.py"


def small_opts(dataset_dir, out, **kw):
    from pmcvqa_sft.train.options import TrainOptions
    base = dict(dataset_dir=str(dataset_dir), model=kw.pop("model"), output_dir=str(out), quantization="8bit",
                max_steps=12, per_device_train_batch_size=8, gradient_accumulation_steps=1,
                learning_rate=2e-3, warmup_steps=0, eval_steps=6, logging_steps=1, max_samples=96,
                max_eval_samples=16, gradient_checkpointing=False, report_to="none", progress=False)
    base.update(kw)
    return TrainOptions(**base)


def script_env(**extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def test_collator_masks_padding_by_position_and_trains_eos(processed_tiny, tiny_tokenizer):
    from datasets import load_from_disk

    from pmcvqa_sft.data.collate import SFTCollator
    tok = tiny_tokenizer
    assert tok.pad_token_id == tok.eos_token_id  # the trap this guards against
    ds = load_from_disk(str(processed_tiny))["train"]
    rows = sorted((ds[i] for i in range(40)), key=lambda r: len(r["input_ids"]))
    feats = [rows[0], rows[-1], rows[len(rows) // 2]]  # different lengths -> real padding
    batch = SFTCollator(tok.pad_token_id)(feats)
    width = batch["input_ids"].shape[1]
    assert width == max(len(f["input_ids"]) for f in feats)
    for i, f in enumerate(feats):
        n = len(f["input_ids"])
        assert n < width or i == 1
        # exactly the stored target tokens are trained, nothing of the prompt or padding
        assert batch["labels"][i, :n].tolist() == f["labels"]
        assert (batch["labels"][i, n:] == -100).all() and (batch["attention_mask"][i, n:] == 0).all()
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()
        assert batch["attention_mask"][i, :n].all()
        # the EOS closing the target is trained, although pad id == EOS id
        assert batch["labels"][i, n - 1].item() == tok.eos_token_id == batch["input_ids"][i, n - 1].item()
        trained = [t for t, lab in zip(f["input_ids"], f["labels"]) if lab != -100]
        assert batch["labels"][i][batch["labels"][i] != -100].tolist() == trained
        assert tok.decode(trained[:-1]).strip().endswith(f"Answer: {f['answer_label']}. "
                                                          f"{f['choices'][f['answer_label']]}")
    # what the model is given: logits kept only where a target is predicted, with the labels they predict
    from pmcvqa_sft.data.collate import target_logits_only
    given = target_logits_only(batch)
    keep, shift = given["logits_to_keep"], given["shift_labels"]
    assert keep.numel() < width  # the prompt-only positions are skipped
    for i, f in enumerate(feats):
        n = len(f["input_ids"])
        want = [lab for lab in f["labels"][1:] if lab != -100]  # every target token and the EOS, once
        assert shift[i][shift[i] != -100].tolist() == want and want[-1] == tok.eos_token_id
        assert keep[(shift[i] != -100).nonzero().flatten()[-1]].item() == n - 2  # EOS predicted from n-2


def test_length_grouping_keeps_padding_small_and_is_seeded():
    from pmcvqa_sft.data.collate import EpochLengthGroupedSampler, real_token_share
    g = torch.Generator().manual_seed(0)
    # PMC-VQA-like lengths with the real tokenizer: ~90-400 tokens, long right tail
    lengths = torch.empty(4000).log_normal_(5.0, 0.35, generator=g).clamp(60, 1024).long().tolist()
    s = EpochLengthGroupedSampler(lengths, group_size=4 * 8, seed=42)
    order = list(s)
    assert sorted(order) == list(range(len(lengths)))
    assert real_token_share(lengths, 4, order) >= 0.95
    assert real_token_share(lengths, 4, torch.randperm(len(lengths), generator=g).tolist()) < 0.8  # ungrouped
    assert list(s) == order  # same epoch, same order (resume / every DDP rank)
    # seeded: a new sampler with the same seed gives the same order whatever the global RNG did since
    torch.manual_seed(12345), torch.rand(100)
    assert list(EpochLengthGroupedSampler(lengths, group_size=4 * 8, seed=42)) == order
    assert list(EpochLengthGroupedSampler(lengths, group_size=4 * 8, seed=43)) != order  # another seed
    s.set_epoch(1)
    assert list(s) != order
    # a small data set (480 rows, batch 8 x 2) groups as well: the megabatch doesn't shrink with the data
    # (transformers' default shrinks it to a quarter of the data: 0.88 here)
    small = torch.empty(480).log_normal_(5.0, 0.45, generator=torch.Generator().manual_seed(0))
    small = small.clamp(60, 1024).long().tolist()
    assert real_token_share(small, 8, list(EpochLengthGroupedSampler(small, group_size=16, seed=42))) >= 0.96


def _snapshot(model):
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return frozen, lora


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_lora_learns_on_quantized_base(quant, processed_tiny, tiny_dir, tmp_path, one_thread):
    import bitsandbytes as bnb

    from pmcvqa_sft.train.run import setup_run
    run = setup_run(small_opts(processed_tiny, tmp_path / "run", model=str(tiny_dir), quantization=quant),
                    log=lambda *_: None)
    model = run.trainer.model
    qcls = bnb.nn.Linear8bitLt if quant == "8bit" else bnb.nn.Linear4bit
    assert any(isinstance(m, qcls) for m in model.modules()), "base is not really quantized"
    frozen0, lora0 = _snapshot(model)
    assert lora0 and all("lora_" in n for n in lora0)
    assert any("layers.0.self_attn.q_proj" in n for n in frozen0), "no frozen base weight to check"
    run.trainer.train()
    frozen1, lora1 = _snapshot(model)
    assert all(torch.equal(frozen0[n], frozen1[n]) for n in frozen0), "a frozen base weight changed"
    changed = [n for n in lora0 if not torch.equal(lora0[n], lora1[n])]
    assert len(changed) == len(lora0), f"{len(lora0) - len(changed)} LoRA tensors did not change"
    losses = [e["loss"] for e in run.trainer.state.log_history if "loss" in e]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert run.trainer.real_tokens / run.trainer.computed_tokens > 0.9


def test_reshuffled_training_evaluates_on_the_stored_orders(processed_tiny, tiny_dir, tmp_path, one_thread):
    """--shuffle_choices reshuffles training rows only: two evaluations of one model give the same eval
    loss, the loss of the rows as stored (the yardstick that picks the best checkpoint)."""
    from pmcvqa_sft.train.run import setup_run
    run = setup_run(small_opts(processed_tiny, tmp_path / "s", model=str(tiny_dir), shuffle_choices=True,
                               max_eval_samples=8), log=lambda *_: None)
    first, second = (run.trainer.evaluate()["eval_loss"] for _ in range(2))
    plain = setup_run(small_opts(processed_tiny, tmp_path / "p", model=str(tiny_dir), max_eval_samples=8),
                      log=lambda *_: None).trainer.evaluate()["eval_loss"]
    assert first == second == pytest.approx(plain, abs=1e-6), (first, second, plain)


def test_end_to_end_outputs_and_exact_resume(processed_tiny, tiny_dir, tmp_path, one_thread):
    """Uninterrupted run vs. SIGKILL after checkpoint 6 + `--resume_from_checkpoint auto`: same losses, with
    the choices reshuffled per draw (the resumed epoch must give its remaining rows the same orders)."""
    from peft import AutoPeftModelForCausalLM

    from pmcvqa_sft.train.run import run_training
    # 4 steps per epoch, so the kill lands mid epoch 2 and the resumed part crosses into epoch 3
    common = dict(max_samples=32, max_steps=10, eval_steps=3, save_total_limit=3, quantization="8bit",
                  lora_dropout=0.1, learning_rate=1e-3, shuffle_choices=True)
    card = run_training(small_opts(processed_tiny, tmp_path / "full", model=str(tiny_dir), report_to="tensorboard",
                                   **common), log=lambda *_: None)
    out = tmp_path / "full"
    # outputs: adapter (+ tokenizer) loadable by PEFT, run card, loss curve, tensorboard
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_dir)
    model = AutoPeftModelForCausalLM.from_pretrained(str(out / "adapter"))
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())
    assert (out / "adapter" / "tokenizer.json").is_file() and (out / "adapter" / "chat_template.jinja").is_file()
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert any((out / "tensorboard").rglob("events.out.tfevents*"))
    on_disk = json.loads((out / "run_card.json").read_text())
    assert on_disk["trainable_parameters"]["trainable"] > 0 and on_disk["eval_loss"] and on_disk["train_loss"]
    assert on_disk["best_checkpoint"] and 0.9 < on_disk["real_token_share"] <= 1
    assert on_disk["preprocess_report"]["template_hash"] == on_disk["template_hash"]

    args = [sys.executable, str(SCRIPT), "--model", str(tiny_dir), "--dataset_dir", str(processed_tiny),
            "--output_dir", str(tmp_path / "killed"), "--quantization", "8bit", "--max_steps", "10",
            "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3",
            "--warmup_steps", "0", "--eval_steps", "3", "--save_total_limit", "3", "--logging_steps", "1",
            "--max_samples", "32", "--max_eval_samples", "16", "--lora_dropout", "0.1", "--shuffle_choices",
            "--no-gradient_checkpointing", "--report_to", "none", "--no-progress"]
    killed = subprocess.run(args, env=script_env(PMCVQA_KILL_AFTER_SAVE=6), capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "run_card.json").exists()
    again = subprocess.run(args, env=script_env(), capture_output=True, text=True)
    assert again.returncode == 2 and "--resume_from_checkpoint auto" in again.stderr  # refuses to clobber
    reseeded = subprocess.run(args + ["--resume_from_checkpoint", "auto", "--seed", "7"], env=script_env(),
                              capture_output=True, text=True)  # another seed = another data order
    assert reseeded.returncode == 2 and "different data order" in reseeded.stderr, reseeded.stderr[-2000:]
    assert "Traceback" not in reseeded.stderr
    resumed = subprocess.run(args + ["--resume_from_checkpoint", "auto"], env=script_env(),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    card2 = json.loads((tmp_path / "killed" / "run_card.json").read_text())
    assert card2["resumed_from"].endswith("checkpoint-6")
    full = {e["step"]: e["loss"] for e in card["train_loss"]}
    res = {e["step"]: e["loss"] for e in card2["train_loss"]}
    after = [s for s in full if s > 6]
    assert after == [7, 8, 9, 10] and all(s in res for s in after)
    diff = max(abs(full[s] - res[s]) for s in after)
    print(f"resume: max |loss diff| over steps 7-10 = {diff:.2e}")
    assert diff < 1e-5, (diff, full, res)
