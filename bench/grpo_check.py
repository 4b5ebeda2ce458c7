"""`gpu_train_check.py --grpo`: GRPO steps (TRL GRPOTrainer, the project's train/grpo.py setup) on the
8B-shaped text model or (with --vision) the Qwen2.5-VL-7B-shaped model, random weights.

Per mode: the model is built by `train.run.build_model` (8-bit / 4-bit / bf16 base + LoRA r 16), the trainer
by `train.grpo.grpo_config` + `_trainer_class` with the toolkit's rewards (correct + 0.1 format_ok), and
`--grpo_prompts` prompts x `--num_generations` completions of up to `--completion_len` tokens per step
(random weights never stop early, so every completion runs to the budget: the worst case). The prompts are
the real inference prompt (prompts.create_conversation); the tokenizer is the embedded tiny model's (R1's
chat template and think tokens; its ids lie inside the big vocabulary), for --vision the tiny Qwen
tokenizer with Qwen's published image processor at --image_size px, the model's special ids set to it.
Reported: peak memory, median step, completions/s, generated tokens/s, TRL's clipped ratio.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path


def grpo_tokenizer(vision: bool, image_size: int, image_processor_kw: dict):
    from pmcvqa_sft.models.loading import load_processor, load_tokenizer
    if not vision:
        return load_tokenizer("tiny")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from pmcvqa_sft.models.processor import make_processor
    tiny = load_processor("tiny-vision")
    side = image_size * image_size
    ip = Qwen2VLImageProcessorPil(**{**image_processor_kw, "min_pixels": side, "max_pixels": side})
    return make_processor(ip, tiny.tokenizer, tiny.tokenizer.chat_template)


def special_ids(processor) -> dict:
    """The image-model config's special ids, taken from the processor that will feed it."""
    tok = processor.tokenizer
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    return ids


def grpo_dataset(rows: int, vision: bool, image_size: int):
    import random

    from datasets import Dataset
    from PIL import Image

    from pmcvqa_sft import prompts
    rng = random.Random(0)
    words = ["Liver", "Spleen", "Kidney", "Heart", "Lung", "Brain", "Bone", "Skin"]
    recs = []
    for i in range(rows):
        choices = dict(zip(prompts.LETTERS, rng.sample(words, 4)))
        rec = {"prompt": prompts.create_conversation(f"Which organ is shown in figure {i}?", choices, None,
                                                     image=vision),
               "choices": choices, "answer_label": rng.choice(prompts.LETTERS), "opened_think": not vision}
        if vision:
            rec["image"] = Image.new("RGB", (image_size, image_size), (rng.randrange(256), 90, 160))
        recs.append(rec)
    return Dataset.from_list(recs)


def run_grpo_mode(a, mode: str, weights: Path, processor, work: Path) -> dict:
    import torch

    from bench.gpu_train_check import gpu_memory, step_timer
    from pmcvqa_sft.train import rewards as R
    from pmcvqa_sft.train.grpo import _trainer_class, grpo_config
    from pmcvqa_sft.train.options import TrainOptions
    from pmcvqa_sft.train.run import build_model
    quant = {"bf16": "none"}.get(mode, mode)
    completions = a.grpo_prompts * a.num_generations
    o = TrainOptions(dataset_dir="-", model=str(weights), output_dir=str(work / f"grpo_{mode}"), quantization=quant,
                     stage="grpo", max_steps=a.steps, per_device_train_batch_size=completions,
                     gradient_accumulation_steps=1, learning_rate=1e-5, warmup_steps=0, eval_steps=10 ** 6,
                     save_steps=10 ** 6, logging_steps=1, report_to="none", progress=False,
                     gradient_checkpointing=True, num_generations=a.num_generations,
                     max_completion_length=a.completion_len, beta=a.beta)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    tok = getattr(processor, "tokenizer", processor)
    t0 = time.perf_counter()
    model, params = build_model(o, tok, log=lambda *_: None)
    load_s = time.perf_counter() - t0
    after_load = torch.cuda.memory_allocated() if cuda else 0
    times: list[float] = []
    ds = grpo_dataset(a.grpo_prompts * a.steps, a.vision, a.image_size)
    trainer = _trainer_class()(model=model, reward_funcs=[R.correct, R.format_ok],
                               args=grpo_config(o, [1.0, 0.1], has_eval=False), train_dataset=ds,
                               processing_class=processor, callbacks=[step_timer(times)])
    trainer.train()
    hist = [e for e in trainer.state.log_history if "reward" in e]
    timed = times[a.warmup:] or times
    step = statistics.median(timed)
    mean_len = statistics.mean(e["completions/mean_length"] for e in hist) if hist else 0
    res = dict(mode=mode, stage="grpo", quantization=quant, load_s=round(load_s, 1), trainable_parameters=params,
               prompts_per_step=a.grpo_prompts, num_generations=a.num_generations,
               max_completion_length=a.completion_len, beta=a.beta, median_step_s=round(step, 3),
               completions_per_s=round(completions / step, 2),
               generated_tokens_per_s=round(completions * mean_len / step, 1),
               tokens_per_s=round(completions * mean_len / step, 1),  # the summary table's column: generated
               mean_completion_tokens=round(mean_len, 1),
               clipped_ratio=round(statistics.mean(e["completions/clipped_ratio"] for e in hist), 3) if hist else None,
               steps_timed=len(timed), reward_keys=sorted(k for k in (hist[0] if hist else {}) if "reward" in k))
    res.update(gpu_memory(after_load) if cuda else {})
    del trainer, model
    torch.cuda.empty_cache() if cuda else None
    return res
