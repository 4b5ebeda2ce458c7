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
    # GRPO on the exact answer metric from an SFT run (docs/REASONING.md)
    python train_sft_example.py --stage grpo --init_adapter runs/r1-8b-lora --dataset_dir ... \
        --output_dir runs/r1-8b-grpo --learning_rate 1e-5
    # continue a killed run exactly where its last checkpoint left off
    python train_sft_example.py --dataset_dir ... --output_dir runs/r1-8b-lora --resume_from_checkpoint auto
    # several GPUs (DDP); FSDP / DeepSpeed configs in configs/
    accelerate launch --config_file configs/ddp.yaml train_sft_example.py --dataset_dir ... --output_dir ...
The adapter lands in <output_dir>/adapter, next to run_card.json, loss_curve.png and tensorboard/.
"""
from __future__ import annotations

import argparse

from pmcvqa_sft.core.errors import OneLineParser, run_main
from pmcvqa_sft.train.options import add_arguments, from_namespace


def parse_args(argv=None) -> argparse.Namespace:
    """Flags, defaults, help and choices all come from `TrainOptions` (pmcvqa_sft/train/options.py)."""
    p = OneLineParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    opts = from_namespace(args)
    if opts.stage == "grpo":  # reinforcement learning on the exact answer metric (TRL GRPOTrainer)
        from pmcvqa_sft.train.grpo import run_grpo
        run_grpo(opts)
    else:
        from pmcvqa_sft.train.run import run_training
        run_training(opts)
    return 0


if __name__ == "__main__":
    run_main(main)
