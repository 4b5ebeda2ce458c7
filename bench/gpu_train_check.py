#!/usr/bin/env python
"""GPU check of the training step on an 8B-shaped model: peak memory and tokens/s, 8-bit / 4-bit / bf16.

    python bench/gpu_train_check.py                         # on a GPU machine: ~6-8 min, bench/results/gpu_train.json
    python bench/gpu_train_check.py --modes 8bit --steps 6  # one mode
    python bench/gpu_train_check.py --dry_run               # CPU, scaled-down config: checks the plumbing in ~30 s
    python bench/gpu_train_check.py --vision                # Qwen2.5-VL-7B shape, 8-bit LoRA, 1 figure + text
    python bench/gpu_train_check.py --vision --dry_run      # its plumbing on the CPU (scaled down)
    python bench/gpu_train_check.py --grpo [--vision]       # GRPO steps (TRL GRPOTrainer): bench/grpo_check.py

Model: a Llama built from DeepSeek-R1-Distill-Llama-8B's config.json (`--config`, default
../shared/fixtures/deepseek_r1_distill_llama_8b/config.json; the same numbers are built in when the file
is absent: 32 layers, hidden 4096, 32/8 heads, intermediate 14336, vocabulary 128,256) with RANDOM
weights: nothing is downloaded. They are initialised on the GPU in bf16, saved once as safetensors
shards to a temp folder on local disk (`--workdir`, ~16 GB), and every mode loads them through the
project's own path (`models.loading.load_model` with its BitsAndBytesConfig), as a real run would.
Each mode trains with the project's Trainer setup (`train.run.build_model`, `SFTCollator`, length grouping,
target-only logits): LoRA r 16 / alpha 32 on all linear projections, gradient checkpointing on, rows of
`--seq_len` (512) tokens whose last `--target_len` (64) tokens are trained, batch `--batch` (4).
Reported per mode: peak allocated / reserved GPU memory during training, median step time after
`--warmup` steps, tokens/s (all computed tokens, no padding here), load time. Goals (issue): 8-bit peak
<= 20 GB and >= 3,000 tokens/s on an H100.

`--vision`: the same for an image-text model shaped like Qwen/Qwen2.5-VL-7B-Instruct (its published
config: LM 28 layers, hidden 3584, 28/4 heads, intermediate 18944, vocabulary 152,064, mrope [16, 24, 24];
vision tower depth 32, hidden 1280, 16 heads, intermediate 3420, patch 14, merge 2, out 3584), random
weights, loaded through the project's image-model path (`train.run.build_model`: LM in 8-bit,
vision tower and merger left unquantized, LoRA r 16 / alpha 32 on the LM's linear layers). Each row is one
random `--image_size` (448) px figure (256 image tokens) + `--text_len` (128) text tokens whose last
`--target_len` are trained, batched by the project's `data.collate.build_batch` (Qwen's published image
processor settings); AdamW steps in a plain loop. Reported: peak memory, median step, tokens/s (text +
image tokens), figures/s.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.results_io import write_results as write_json  # paths relative to the repository
os.environ.setdefault("HF_HUB_OFFLINE", "1")
DEFAULT_CONFIG = ROOT.parent / "shared" / "fixtures" / "deepseek_r1_distill_llama_8b" / "config.json"
# DeepSeek-R1-Distill-Llama-8B (its published config.json), used when the config file isn't there (a bare GPU box)
BUILTIN_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                  rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False,
                  rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"})
DRY_RUN = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=512, bos_token_id=1, eos_token_id=2)
# Qwen/Qwen2.5-VL-7B-Instruct's published config.json (text part, vision part, special token ids)
QWEN25_VL_7B = dict(
    text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
              num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
              bos_token_id=151643, eos_token_id=151645,
              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu"),
    ids=dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653))
VL_DRY_RUN = dict(
    text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=512, bos_token_id=1, eos_token_id=2,
              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]}),
    vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[1]),
    ids=dict(image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503))
QWEN_IMAGE_PROCESSOR = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 16384, patch_size=14, merge_size=2,
                            temporal_patch_size=2)  # the Instruct release's preprocessor_config.json


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="8B-shaped LoRA training check: memory and tokens/s per quantization.")
    # ---- model ----
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="config.json of the model shape to build")
    p.add_argument("--modes", default=None,
                   help="comma-separated: 8bit, 4bit, bf16 (default: all three; with --vision: 8bit)")
    p.add_argument("--dry_run", action="store_true",
                   help="scaled-down config on the CPU (modes run as 8bit/4bit/none in fp32): tests the plumbing")
    # ---- image-text model (--vision) ----
    p.add_argument("--vision", action="store_true",
                   help="check a Qwen2.5-VL-7B-shaped image-text model instead (1 figure + text per row)")
    p.add_argument("--image_size", type=int, default=448, help="--vision: figure side in pixels (448: 256 tokens)")
    p.add_argument("--text_len", type=int, default=128, help="--vision: text tokens per row (image tokens extra)")
    p.add_argument("--train_vision", default="none", choices=("none", "merger", "lora"),
                   help="--vision: also train the merger (modules_to_save) or LoRA the vision blocks")
    # ---- run ----
    p.add_argument("--grpo", action="store_true",
                   help="GRPO steps instead of SFT steps (bench/grpo_check.py); results gpu_grpo[_vision].json")
    p.add_argument("--grpo_prompts", type=int, default=2, help="--grpo: prompts per step")
    p.add_argument("--num_generations", type=int, default=8, help="--grpo: completions per prompt")
    p.add_argument("--completion_len", type=int, default=128, help="--grpo: max completion tokens")
    p.add_argument("--beta", type=float, default=0.0, help="--grpo: KL coefficient (> 0 adds the reference pass)")
    p.add_argument("--seq_len", type=int, default=512, help="tokens per row")
    p.add_argument("--target_len", type=int, default=64, help="trained tokens at the end of each row")
    p.add_argument("--batch", type=int, default=4, help="rows per step")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per mode")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    # ---- output ----
    p.add_argument("--workdir", default=None, help="folder for the random weights (default: a temp folder)")
    p.add_argument("--out", default=None,
                   help="results JSON (default: bench/results/gpu_train.json; bench/_work/ for --dry_run)")
    a = p.parse_args(argv)
    if a.modes is None:
        a.modes = "8bit" if a.vision else "8bit,4bit,bf16"
    if a.out is None:
        name = ("gpu_grpo" if a.grpo else "gpu_train") + ("_vision" if a.vision else "")
        a.out = str(ROOT / "bench" / (f"_work/{name}_dry_run.json" if a.dry_run else f"results/{name}.json"))
    return a


def model_config(a):
    from transformers import LlamaConfig
    if a.dry_run:
        return LlamaConfig(**{**BUILTIN_8B, **DRY_RUN, "rope_scaling": None}), "dry-run (scaled down)"
    path = Path(a.config)
    if path.is_file():
        return LlamaConfig.from_pretrained(str(path.parent) if path.name == "config.json" else str(path)), str(path)
    return LlamaConfig(**BUILTIN_8B), "built-in DeepSeek-R1-Distill-Llama-8B numbers"


def vl_config(a, ids=None, vocab=None):
    from transformers import Qwen2_5_VLConfig
    shape = VL_DRY_RUN if a.dry_run else QWEN25_VL_7B
    text = dict(shape["text"], tie_word_embeddings=False, **({"vocab_size": vocab} if vocab else {}))
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=shape["vision"],
                           tie_word_embeddings=False, **(ids or shape["ids"]))
    return cfg, ("dry-run (scaled down)" if a.dry_run else "built-in Qwen/Qwen2.5-VL-7B-Instruct numbers")


def write_random_weights(config, folder: Path, device: str) -> float:
    """Random-init the model on `device` in the run's dtype and save it as safetensors shards."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    t0 = time.perf_counter()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    auto = AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM
    with torch.device(device):
        model = auto.from_config(config, dtype=dtype)
    model.save_pretrained(folder, max_shard_size="4GB")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - t0


def synthetic_dataset(a, vocab: int, rows: int):
    """Rows of `seq_len` random ids; only the last `target_len` are trained (like a prompt + answer)."""
    import random

    from datasets import Dataset
    rng = random.Random(0)
    ids = [[rng.randrange(10, vocab) for _ in range(a.seq_len)] for _ in range(rows)]
    labels = [[-100] * (a.seq_len - a.target_len) + r[-a.target_len:] for r in ids]
    return Dataset.from_dict({"input_ids": ids, "labels": labels, "length": [a.seq_len] * rows,
                              "source_row": list(range(rows))})


def gpu_memory(after_load: int) -> dict:
    """GB held by the loaded model, and the peaks allocated / reserved since the last reset."""
    import torch
    gb = 1024 ** 3
    return dict(weights_gb=round(after_load / gb, 2), peak_allocated_gb=round(torch.cuda.max_memory_allocated() / gb, 2),
                peak_reserved_gb=round(torch.cuda.max_memory_reserved() / gb, 2))


def step_timer(times: list):
    """A Trainer callback appending each optimizer step's wall time (GPU-synchronised) to `times`."""
    import torch
    from transformers import TrainerCallback
    cuda = torch.cuda.is_available()

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    return StepTimer()


def run_mode(a, mode: str, weights: Path, vocab: int, work: Path) -> dict:
    import torch

    from pmcvqa_sft.data.collate import SFTCollator
    from pmcvqa_sft.train.options import TrainOptions
    from pmcvqa_sft.train.run import _trainer_class, build_model, training_arguments
    quant = {"bf16": "none"}.get(mode, mode)
    o = TrainOptions(dataset_dir="-", model=str(weights), output_dir=str(work / f"out_{mode}"), quantization=quant,
                     max_steps=a.steps, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
                     learning_rate=2e-4, warmup_steps=0, eval_steps=10 ** 6, logging_steps=1,
                     report_to="none", progress=False, gradient_checkpointing=True)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model, params = build_model(o, tokenizer=None, log=lambda *_: None)
    load_s = time.perf_counter() - t0
    after_load = torch.cuda.memory_allocated() if cuda else 0
    times: list[float] = []
    ds = synthetic_dataset(a, vocab, rows=a.batch * a.steps)
    trainer = _trainer_class()(model=model, args=training_arguments(o, has_eval=False), train_dataset=ds,
                               data_collator=SFTCollator(pad_token_id=0), callbacks=[step_timer(times)])
    trainer.train()
    timed = times[a.warmup:] or times
    losses = [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e]
    step = statistics.median(timed)
    res = dict(mode=mode, quantization=quant, load_s=round(load_s, 1), trainable_parameters=params,
               median_step_s=round(step, 3), tokens_per_s=round(a.batch * a.seq_len / step, 1),
               trained_tokens_per_s=round(a.batch * a.target_len / step, 1), steps_timed=len(timed),
               loss_first_last=[losses[0], losses[-1]] if losses else [])
    if cuda:
        res.update(gpu_memory(after_load))
    del trainer, model
    if cuda:
        torch.cuda.empty_cache()
    return res


def vl_batch(a, config, device):
    """`batch` rows of one random figure + `text_len` text tokens (last `target_len` trained), collated by
    the project's vision_collate.build_batch with Qwen's image processor settings."""
    import random

    import numpy as np
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from pmcvqa_sft.data.collate import build_batch
    rng = random.Random(0)
    ip = Qwen2VLImageProcessorPil(**QWEN_IMAGE_PROCESSOR)
    vocab, img = config.text_config.vocab_size, config.image_token_id
    rows, images = [], []
    for i in range(a.batch):
        ids = [rng.randrange(10, min(vocab, img) - 1) for _ in range(a.text_len)]
        ids[4:7] = [config.vision_start_token_id, img, config.vision_end_token_id]  # one unexpanded placeholder
        labels = [-100] * (a.text_len - a.target_len) + ids[-a.target_len:]
        rows.append((ids, labels))
        pixels = np.random.default_rng(i).integers(0, 255, (a.image_size, a.image_size, 3), dtype=np.uint8)
        images.append(Image.fromarray(pixels))
    batch = build_batch(rows, images, ip, img, pad_token_id=0, max_pixels=a.image_size * a.image_size)
    return {k: v.to(device) for k, v in batch.items()}


def run_vl_mode(a, mode: str, weights: Path, config, work: Path) -> dict:
    """One image-text training mode: the project's model build, a plain AdamW loop, timed per step."""
    import torch
    from types import SimpleNamespace

    from pmcvqa_sft.train.run import build_model as build_vision_model
    quant = {"bf16": "none"}.get(mode, mode)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    o = SimpleNamespace(model=str(weights), quantization=quant, gradient_checkpointing=True, lora_r=16, lora_alpha=32,
                        lora_dropout=0.05, target_modules="all-linear", train_vision=a.train_vision)
    t0 = time.perf_counter()
    model, params = build_vision_model(o, None, log=lambda *_: None)
    load_s = time.perf_counter() - t0
    after_load = torch.cuda.memory_allocated() if cuda else 0
    if o.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    batch = vl_batch(a, config, "cuda" if cuda else "cpu")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    times, losses = [], []
    for _ in range(a.steps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(round(loss.item(), 4))
    timed = times[a.warmup:] or times
    step = statistics.median(timed)
    int8 = [n for n, m in model.named_modules()  # bitsandbytes layers (peft wraps them in its own class)
            if type(m).__name__ == "Linear8bitLt" and type(m).__module__.startswith("bitsandbytes")]
    tokens = int(batch["attention_mask"].sum())
    image_tokens = int((batch["input_ids"] == config.image_token_id).sum())
    res = dict(mode=mode, quantization=quant, load_s=round(load_s, 1), trainable_parameters=params,
               tokens_per_row=tokens // a.batch, image_tokens_per_row=image_tokens // a.batch,
               median_step_s=round(step, 3), tokens_per_s=round(tokens / step, 1),
               figures_per_s=round(a.batch / step, 2), steps_timed=len(timed), loss_first_last=[losses[0], losses[-1]],
               int8_linear_layers=len(int8), int8_in_vision_tower=sum(".visual." in n for n in int8))
    if cuda:
        res.update(gpu_memory(after_load))
    del model, opt
    if cuda:
        torch.cuda.empty_cache()
    return res


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch
    cuda = torch.cuda.is_available()
    if not cuda and not a.dry_run:
        print("error: no CUDA GPU here; run on a GPU machine or pass --dry_run", file=sys.stderr)
        return 2
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("8bit", "4bit", "bf16")]
    if bad:
        print(f"error: unknown mode(s) {bad}: choose from 8bit, 4bit, bf16", file=sys.stderr)
        return 2
    processor = None
    if a.grpo:
        from bench.grpo_check import grpo_tokenizer, run_grpo_mode, special_ids
        processor = grpo_tokenizer(a.vision, a.image_size, QWEN_IMAGE_PROCESSOR)
        n_tok = len(getattr(processor, "tokenizer", processor))
    if a.vision:
        config, source = (vl_config(a, special_ids(processor), max(n_tok, VL_DRY_RUN["text"]["vocab_size"])
                                    if a.dry_run else None) if a.grpo else vl_config(a))
    else:
        config, source = model_config(a)
        if a.grpo and a.dry_run:
            config.vocab_size = max(config.vocab_size, n_tok)  # the tiny tokenizer's ids must fit
    work = Path(a.workdir or tempfile.mkdtemp(prefix="gpu_train_check_"))
    weights = work / (("grpo_" if a.grpo else "") + ("random_vl_7b" if a.vision else "random_8b"))
    results = {"config_source": source, "device": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)",
               "seq_len": a.seq_len, "target_len": a.target_len, "batch": a.batch, "steps": a.steps,
               "gradient_checkpointing": True, "lora": "r16 alpha32 all-linear", "modes": []}
    if a.vision:
        results.update(seq_len=None, model="Qwen2.5-VL-7B shape", image_size=a.image_size, text_len=a.text_len,
                       train_vision=a.train_vision, lora="r16 alpha32 on the LM's linear layers",
                       image_processor=QWEN_IMAGE_PROCESSOR)
    if a.grpo:
        results.update(stage="grpo", seq_len=None, target_len=None, prompts_per_step=a.grpo_prompts,
                       num_generations=a.num_generations, max_completion_length=a.completion_len, beta=a.beta,
                       tokenizer="embedded tiny model's (ids inside the model's vocabulary)")
    try:
        if not (weights / "config.json").exists():
            results["write_weights_s"] = round(write_random_weights(config, weights, "cuda" if cuda else "cpu"), 1)
            print(f"random weights written to {weights} in {results['write_weights_s']} s", flush=True)
        for mode in modes:
            try:
                res = (run_grpo_mode(a, mode, weights, processor, work) if a.grpo
                       else run_vl_mode(a, mode, weights, config, work) if a.vision
                       else run_mode(a, mode, weights, config.vocab_size, work))
            except torch.OutOfMemoryError as exc:  # report it and go on with the next mode
                res = dict(mode=mode, error=f"out of memory: {str(exc)[:200]}")
            results["modes"].append(res)
            print(json.dumps(res), flush=True)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    eight = next((r for r in results["modes"] if r.get("mode") == "8bit" and "error" not in r), None)
    if eight and cuda and not a.vision and not a.grpo:
        results["goals"] = {"8bit_peak_le_20GB": eight["peak_allocated_gb"] <= 20,
                            "8bit_tokens_per_s_ge_3000": eight["tokens_per_s"] >= 3000}
    out = write_json(a.out, results)
    print(f"{'mode':<6}{'peak GB':>9}{'tok/s':>9}{'step s':>8}")
    for r in results["modes"]:
        print(f"{r['mode']:<6}{r.get('peak_allocated_gb', float('nan')):>9.2f}{r.get('tokens_per_s', 0):>9.0f}"
              f"{r.get('median_step_s', float('nan')):>8.3f}" if "error" not in r else f"{r['mode']:<6} {r['error']}")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
