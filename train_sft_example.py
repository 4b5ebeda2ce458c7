#!/usr/bin/env python
"""LoRA / QLoRA fine-tuning of DeepSeek-R1-Distill-Llama-8B on a preprocessed PMC-VQA folder.

Commands (see docs/TRAINING.md):
    # one GPU, 8-bit base (default), 3 epochs
    python train_sft_example.py --dataset_dir data/processed/pmc_vqa --output_dir runs/r1-8b-lora
    # an image model (8-bit LoRA on the language model, vision tower frozen); see docs/VISION.md
    python train_sft_example.py --model Qwen/Qwen2.5-VL-7B-Instruct --dataset_dir data/processed/pmc_vqa_vl \
        --output_dir runs/qwen25vl-lora --max_pixels 401408
    # offline demo on the embedded tiny model (CPU, about a minute)
    python train_sft_example.py --model tiny --dataset_dir runs/demo/processed --output_dir runs/demo/train \
        --quantization 8bit --learning_rate 1e-3 --per_device_train_batch_size 16 \
        --gradient_accumulation_steps 1 --max_steps 600 --no-gradient_checkpointing
    # continue a killed run exactly where its last checkpoint left off
    python train_sft_example.py --dataset_dir ... --output_dir runs/r1-8b-lora --resume_from_checkpoint auto
    # several GPUs (DDP); FSDP / DeepSpeed configs in configs/
    accelerate launch --config_file configs/ddp.yaml train_sft_example.py --dataset_dir ... --output_dir ...
The adapter lands in <output_dir>/adapter, next to run_card.json, loss_curve.png and tensorboard/.
"""
from __future__ import annotations

import argparse

from pmcvqa_sft.errors import OneLineParser, run_main
from pmcvqa_sft.modeling import DEFAULT_MODEL


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # ---- data ----
    p.add_argument("--dataset_dir", required=True,
                   help="a folder written by preprocess_pmc_vqa_for_sft.py (train + validation splits)")
    p.add_argument("--max_samples", type=int, default=None, help="train on the first N train rows only")
    p.add_argument("--max_eval_samples", type=int, default=None, help="evaluate on the first N validation rows only")
    # ---- model ----
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="base model: hub id, local folder, or 'tiny' (the embedded offline model)")
    p.add_argument("--quantization", default="8bit",
                   help="base weights: 8bit (LoRA on int8), 4bit (QLoRA, NF4), none (bf16/fp32)")
    p.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute activations in the backward pass: much less memory, ~30%% slower")
    # ---- LoRA ----
    p.add_argument("--lora_r", type=int, default=16, help="LoRA rank")
    p.add_argument("--lora_alpha", type=int, default=32, help="LoRA scaling alpha (scale = alpha / r)")
    p.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on the LoRA input")
    p.add_argument("--target_modules", default="all-linear",
                   help="comma-separated module names (e.g. q_proj,v_proj) or all-linear "
                        "(q,k,v,o,gate,up,down; never lm_head)")
    # ---- optimisation ----
    p.add_argument("--num_epochs", type=float, default=3.0, help="passes over the train split")
    p.add_argument("--max_steps", type=int, default=-1, help="optimizer steps; > 0 overrides --num_epochs")
    p.add_argument("--per_device_train_batch_size", type=int, default=4, help="rows per micro-batch per device")
    p.add_argument("--per_device_eval_batch_size", type=int, default=None,
                   help="rows per eval batch per device (default: the train batch size)")
    p.add_argument("--gradient_accumulation_steps", type=int, default=8,
                   help="micro-batches per optimizer step (effective batch = this x batch x devices)")
    p.add_argument("--learning_rate", type=float, default=2e-4, help="peak learning rate (cosine schedule)")
    p.add_argument("--warmup_ratio", type=float, default=0.03, help="share of the steps spent warming up")
    p.add_argument("--warmup_steps", type=int, default=None, help="warm-up steps (overrides --warmup_ratio)")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--seed", type=int, default=42, help="seed of the model init, dropout and data order")
    # ---- evaluation, checkpoints, logging ----
    p.add_argument("--eval_steps", type=int, default=50, help="validation loss every N optimizer steps")
    p.add_argument("--save_steps", type=int, default=None,
                   help="checkpoint every N steps (a multiple of --eval_steps; default: --eval_steps)")
    p.add_argument("--save_total_limit", type=int, default=2,
                   help="checkpoints kept (the best by eval loss is always kept)")
    p.add_argument("--logging_steps", type=int, default=10, help="log the train loss every N steps")
    p.add_argument("--report_to", default="tensorboard", help="tensorboard or none")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    # ---- image-text-to-text models (--model tiny-vision, Qwen/Qwen2.5-VL-7B-Instruct, ...) ----
    v = p.add_argument_group("image models", "used when --model is an image-text-to-text model")
    v.add_argument("--max_pixels", type=int, default=512 * 28 * 28,
                   help="cap on each figure's width x height after resizing (aspect ratio kept); Qwen2.5-VL "
                        "spends one token per 28x28 pixels, so the default allows 512 image tokens")
    v.add_argument("--train_vision", choices=["none", "merger", "lora"], default="none",
                   help="none: vision tower and projector frozen; merger: also train the projector (merger) "
                        "in full; lora: projector + LoRA on the vision blocks")
    v.add_argument("--images", default=None,
                   help="where the figures are now (folder or zip), when they moved since preprocessing")
    # ---- output / resume ----
    p.add_argument("--output_dir", default="runs/sft", help="run folder: adapter/, checkpoints, run card")
    p.add_argument("--resume_from_checkpoint", default=None,
                   help="'auto' = the latest checkpoint in --output_dir (fresh start if none), or a checkpoint path")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --output_dir")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pmcvqa_sft.training import TrainOptions, run_training
    opts = vars(args)
    opts["progress"] = not opts.pop("no_progress")
    run_training(TrainOptions(**opts))
    return 0


if __name__ == "__main__":
    run_main(main)
