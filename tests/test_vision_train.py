"""Image-text training on the embedded tiny Qwen2.5-VL: quantization that spares the vision tower, LoRA
targets, the lazy collator (labels, --max_pixels, no pixels on disk), training, the adapter, resume."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from pmcvqa_sft.models import lora as vision_model
from pmcvqa_sft.models.loading import load_model
from pmcvqa_sft.core.errors import InputError




def opts(dataset_dir, out, **kw):
    from pmcvqa_sft.train.options import TrainOptions
    base = dict(dataset_dir=str(dataset_dir), model="tiny-vision", output_dir=str(out), quantization="8bit",
                max_steps=12, per_device_train_batch_size=8, gradient_accumulation_steps=1, learning_rate=2e-3,
                warmup_steps=2, logging_steps=1, eval_steps=6, max_samples=96, max_eval_samples=8,
                gradient_checkpointing=False, report_to="none", progress=False, lora_dropout=0.0)
    base.update(kw)
    return TrainOptions(**base)


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
def test_quantization_spares_the_vision_tower(quant):
    import bitsandbytes as bnb
    model = load_model("tiny-vision", quant)
    qcls = bnb.nn.Linear8bitLt if quant == "8bit" else bnb.nn.Linear4bit
    quantized = [n for n, m in model.named_modules() if isinstance(m, qcls)]
    assert quantized and all(n.startswith("model.language_model.") for n in quantized), quantized
    assert len(quantized) == 2 * 7  # q/k/v/o/gate/up/down of both LM layers
    tower = [m for n, m in model.named_modules() if n.startswith("model.visual")]
    assert tower and not any(isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)) for m in tower)


def test_lora_targets_language_model_only_by_default():
    from peft import get_peft_model
    for train_vision, extra in (("none", set()), ("merger", {"merger"}), ("lora", {"merger", "visual.blocks"})):
        model = load_model("tiny-vision", "none")
        peft = get_peft_model(model, vision_model.lora_config("tiny-vision", train_vision=train_vision))
        trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
        lm = [n for n in trainable if ".language_model." in n]
        assert lm and all("lora_" in n for n in lm)
        assert {n.split(".language_model.layers.")[1].split(".lora_")[0].split(".", 1)[1] for n in lm} == {
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
        vision = [n for n in trainable if ".visual." in n]
        got = ({"merger"} if any(".merger." in n for n in vision) else set()) | \
              ({"visual.blocks"} if any(".visual.blocks." in n and "lora_" in n for n in vision) else set())
        assert got == extra, (train_vision, vision[:5])
        assert not any("lm_head" in n or "embed_tokens" in n for n in trainable)
    with pytest.raises(InputError, match="names no linear layer"):
        vision_model.lora_config("tiny-vision", target_modules="qkv")  # a vision-only name


def _collator(processed_vision, loads, max_pixels=112 * 112, big=False):
    from pmcvqa_sft.data.store import read_report
    from pmcvqa_sft.models.loading import load_processor
    from pmcvqa_sft.data.collate import make_collator
    from pmcvqa_sft.data.figures import figure_loader
    proc = load_processor("tiny-vision")
    coll = make_collator(proc, load_model("tiny-vision", "none"),
                         figure_loader(read_report(processed_vision), dataset_dir=processed_vision), max_pixels)
    real = coll.load_image

    def counting(ref):
        loads.append(ref)
        img = real(ref)
        return img.resize((448, 448)) if big else img
    coll.load_image = counting
    return proc, coll


def test_collator_trains_exactly_the_answer_and_loads_figures_lazily(processed_vision):
    from datasets import load_from_disk
    ds = load_from_disk(str(processed_vision))["train"]
    # nothing pixel-like on disk: token ids, figure references and sizes only
    assert {"image", "image_width", "image_height"} <= set(ds.column_names)
    assert not any("pixel" in c for c in ds.column_names)
    loads = []
    proc, coll = _collator(processed_vision, loads)
    rows = [ds[i] for i in range(4)]
    assert loads == []
    batch = coll(rows)
    assert loads == [r["image"] for r in rows]  # one load per figure, at batch time
    tok, pad_id = proc.tokenizer, proc.image_token_id
    for i, r in enumerate(rows):
        trained = batch["labels"][i][batch["labels"][i] != -100].tolist()
        assert trained == [t for t, lab in zip(r["input_ids"], r["labels"]) if lab != -100]
        letter, text = r["answer_label"], r["choices"][r["answer_label"]]
        assert tok.decode(trained) == f"Answer: {letter}. {text}<|im_end|>"
        ids, mask = batch["input_ids"][i], batch["attention_mask"][i]
        assert int((ids == pad_id).sum()) == 16 and int(batch["mm_token_type_ids"][i].sum()) == 16
        assert mask.sum() == len(r["input_ids"]) + 15 and mask[: int(mask.sum())].all()  # right padding
        assert (batch["labels"][i][ids == pad_id] == -100).all()
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]] * 4  # 112 px: 8x8 patches of 14 -> 16 tokens
    assert batch["pixel_values"].shape[0] == 4 * 64


def test_max_pixels_caps_large_figures(processed_vision):
    from datasets import load_from_disk

    from pmcvqa_sft.data.collate import add_vision_length_column
    ds = load_from_disk(str(processed_vision))["train"].select(range(2))
    for cap, grid, tokens in ((112 * 112, 8, 16), (224 * 224, 16, 64)):
        loads = []
        proc, coll = _collator(processed_vision, loads, max_pixels=cap, big=True)  # 448 x 448 figures
        batch = coll([ds[0], ds[1]])
        assert batch["image_grid_thw"].tolist() == [[1, grid, grid]] * 2
        assert int((batch["input_ids"][0] == proc.image_token_id).sum()) == tokens
        assert batch["image_grid_thw"][0].prod() * 14 * 14 <= cap
        big = ds.map(lambda r: {"image_width": 448, "image_height": 448})
        lengths = add_vision_length_column(big, proc.image_processor, cap)["length"]
        assert lengths == [len(r["input_ids"]) - 1 + tokens for r in ds]


def _snapshot(model):
    return ({n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad},
            {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


def test_train_8bit_lora_tower_frozen_adapter_loads(processed_vision, tmp_path, one_thread):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from pmcvqa_sft.train.run import run_training, setup_run
    run = setup_run(opts(processed_vision, tmp_path / "probe"), log=lambda *_: None)
    frozen0, train0 = _snapshot(run.trainer.model)
    assert any(".visual." in n for n in frozen0) and not any(".visual." in n for n in train0)
    run.trainer.train()
    frozen1, train1 = _snapshot(run.trainer.model)
    assert all(torch.equal(frozen0[n], frozen1[n]) for n in frozen0), "a frozen weight changed"
    assert all(not torch.equal(train0[n], train1[n]) for n in train0), "a LoRA tensor did not change"
    losses = [e["loss"] for e in run.trainer.state.log_history if "loss" in e]
    assert sum(losses[-3:]) / 3 < 0.92 * sum(losses[:3]) / 3, losses  # 12 steps: 5.9 -> 5.2 measured
    assert run.trainer.real_tokens / run.trainer.computed_tokens >= 0.95

    # reshuffled choices on image rows: re-encoded with the processor, fitted counting the figure's tokens
    card = run_training(opts(processed_vision, tmp_path / "run", max_steps=4, eval_steps=2, shuffle_choices=True),
                        log=lambda *_: None)
    out = tmp_path / "run"
    assert card["args"]["shuffle_choices"] and card["global_step"] == 4
    assert card["model_kind"] == "vision" and card["args"]["max_pixels"] == 512 * 28 * 28
    assert card["args"]["train_vision"] == "none" and card["real_token_share"] >= 0.95
    adapter = out / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja",
            "processor_config.json"} <= {p.name for p in adapter.iterdir()}
    base_dir = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_dir), str(adapter))
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())


def test_model_kind_mismatch_is_one_line(processed_vision, processed_tiny, tiny_dir, tmp_path):
    from pmcvqa_sft.train.run import setup_run
    with pytest.raises(InputError, match="preprocessed for a text model"):
        setup_run(opts(processed_tiny, tmp_path / "a"), log=lambda *_: None)
    with pytest.raises(InputError, match="preprocessed for an image model"):
        setup_run(opts(processed_vision, tmp_path / "b", model=str(tiny_dir)), log=lambda *_: None)


def test_resume_continues_exactly_and_refuses_another_max_pixels(processed_vision, tmp_path, one_thread):
    from pmcvqa_sft.train.run import run_training
    common = dict(max_samples=32, eval_steps=2, save_total_limit=4, lora_dropout=0.1)
    full = run_training(opts(processed_vision, tmp_path / "full", max_steps=6, **common), log=lambda *_: None)
    run_training(opts(processed_vision, tmp_path / "cut", max_steps=6, **common), log=lambda *_: None)
    import shutil
    for step in (6,):  # leave checkpoint-4 as the latest: a run that died after saving it
        shutil.rmtree(tmp_path / "cut" / f"checkpoint-{step}")
    (tmp_path / "cut" / "run_card.json").unlink()
    with pytest.raises(InputError, match="different data order"):
        run_training(opts(processed_vision, tmp_path / "cut", max_steps=6, max_pixels=56 * 56,
                          resume_from_checkpoint="auto", **common), log=lambda *_: None)
    resumed = run_training(opts(processed_vision, tmp_path / "cut", max_steps=6, resume_from_checkpoint="auto",
                                **common), log=lambda *_: None)
    assert resumed["resumed_from"].endswith("checkpoint-4")
    a = {e["step"]: e["loss"] for e in full["train_loss"]}
    b = {e["step"]: e["loss"] for e in resumed["train_loss"]}
    assert max(abs(a[s] - b[s]) for s in (5, 6)) < 1e-5, (a, b)
