"""The training options, defined once: `TrainOptions` is the schema, `train_sft_example.py`'s flags are
built from it (`add_arguments`), so a default, a help text or a choice list cannot disagree between the
CLI and the Python API.

Each field carries its argparse group, help and (where it has one) choice list in its metadata. Boolean
options are `--x/--no-x` flags (argparse's BooleanOptionalAction), whatever their default.
"""
from __future__ import annotations

import argparse
import dataclasses

from ..core.paths import DEFAULT_MODEL
from ..models.loading import QUANTIZATIONS

REPORT_TO = ("tensorboard", "none")
STAGES = ("sft", "grpo")
# LoRA SFT learns at 2e-4; GRPO at that rate swings the policy away in a few steps (docs/REASONING.md)
DEFAULT_LR = {"sft": 2e-4, "grpo": 1e-5}
LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo")
GROUP_DESCRIPTIONS: dict[str, str] = {  # an argparse group's one-line description, when it needs one
    "image models": "used when --model is an image-text-to-text model",
    "GRPO": "used with --stage grpo (TRL GRPOTrainer; docs/REASONING.md); the train batch size then counts "
            "completions (prompts per step times the generations per prompt)"}


def _opt(default, group: str, help: str, **argparse_kw):
    return dataclasses.field(default=default, metadata={"group": group, "help": help, **argparse_kw})


@dataclasses.dataclass
class TrainOptions:
    # ---- data ----
    dataset_dir: str = dataclasses.field(metadata={
        "group": "data", "help": "a folder written by preprocess_pmc_vqa_for_sft.py (train + validation splits)"})
    max_samples: int | None = _opt(None, "data", "train on the first N train rows only")
    max_eval_samples: int | None = _opt(None, "data", "evaluate on the first N validation rows only")
    shuffle_choices: bool = _opt(False, "data", "a fresh order of a row's choices each time it is drawn (the gold "
                                                "letter follows its text), so the model must bind letter to text "
                                                "instead of memorising a position")
    # ---- stage ----
    stage: str = _opt("sft", "stage", "sft: supervised fine-tuning on the answers; grpo: reinforcement learning "
                                      "on the exact answer metric (train/grpo.py)", choices=STAGES)
    init_adapter: str | None = _opt(None, "stage", "start from this run's adapter (a train_sft_example.py output "
                                                   "folder) instead of a fresh LoRA; its base model is used unless "
                                                   "--model is given")
    # ---- model ----
    model: str = _opt(DEFAULT_MODEL, "model",
                      "base model: hub id, local folder, or 'tiny' (the embedded offline model)")
    quantization: str = _opt("8bit", "model", "base weights: 8bit (LoRA on int8), 4bit (QLoRA, NF4), none (bf16/fp32)",
                             choices=QUANTIZATIONS)
    gradient_checkpointing: bool = _opt(True, "model", "recompute activations in the backward pass: much less "
                                                       "memory, ~30%% slower")
    # ---- LoRA ----
    lora_r: int = _opt(16, "LoRA", "LoRA rank")
    lora_alpha: int = _opt(32, "LoRA", "LoRA scaling alpha (scale = alpha / r)")
    lora_dropout: float = _opt(0.05, "LoRA", "dropout on the LoRA input")
    target_modules: str = _opt("all-linear", "LoRA", "comma-separated module names (e.g. q_proj,v_proj) or "
                                                     "all-linear (q,k,v,o,gate,up,down; never lm_head)")
    train_head: bool = _opt(False, "LoRA", "also train lm_head in full (PEFT modules_to_save): lets a small model "
                                           "raise the answer format's tokens; the tiny demo model needs it to "
                                           "sample parseable answers at temperature 1 (docs/REASONING.md)")
    # ---- optimisation ----
    num_epochs: float = _opt(3.0, "optimisation", "passes over the train split")
    max_steps: int = _opt(-1, "optimisation", "optimizer steps; > 0 overrides --num_epochs")
    per_device_train_batch_size: int = _opt(4, "optimisation", "rows per micro-batch per device")
    per_device_eval_batch_size: int | None = _opt(None, "optimisation",
                                                  "rows per eval batch per device (default: the train batch size)")
    gradient_accumulation_steps: int = _opt(8, "optimisation", "micro-batches per optimizer step (effective "
                                                               "batch = this x batch x devices)")
    learning_rate: float | None = _opt(None, "optimisation", "peak learning rate (cosine schedule; default: "
                                       f"{DEFAULT_LR['sft']:g} for --stage sft, {DEFAULT_LR['grpo']:g} for --stage "
                                       "grpo, about 10x full fine-tuning's 1e-6 for LoRA, TRL #2872)")
    warmup_ratio: float = _opt(0.03, "optimisation", "share of the steps spent warming up")
    warmup_steps: int | None = _opt(None, "optimisation", "warm-up steps (overrides --warmup_ratio)")
    weight_decay: float = _opt(0.0, "optimisation", "AdamW weight decay")
    max_grad_norm: float = _opt(1.0, "optimisation", "gradient clipping norm")
    seed: int = _opt(42, "optimisation", "seed of the model init, dropout and data order")
    # ---- evaluation, checkpoints, logging ----
    eval_steps: int = _opt(50, "evaluation, checkpoints, logging", "validation loss every N optimizer steps")
    save_steps: int | None = _opt(None, "evaluation, checkpoints, logging",
                                  "checkpoint every N steps (a multiple of --eval_steps; default: --eval_steps)")
    save_total_limit: int = _opt(2, "evaluation, checkpoints, logging",
                                 "checkpoints kept (the best by eval loss is always kept)")
    logging_steps: int = _opt(10, "evaluation, checkpoints, logging", "log the train loss every N steps")
    report_to: str = _opt("tensorboard", "evaluation, checkpoints, logging", "where the losses are logged",
                          choices=REPORT_TO)
    progress: bool = _opt(True, "evaluation, checkpoints, logging",
                          "progress bar (off by itself when the output is not a terminal)")
    # ---- output / resume ----
    output_dir: str = _opt("runs/sft", "output / resume", "run folder: adapter/, checkpoints, run card")
    resume_from_checkpoint: str | None = _opt(None, "output / resume",
                                              "'auto' = the newest complete checkpoint in --output_dir (fresh "
                                              "start if none), or a checkpoint path")
    overwrite: bool = _opt(False, "output / resume", "replace a previous run in --output_dir")
    # ---- image-text-to-text models (--model tiny-vision, Qwen/Qwen2.5-VL-7B-Instruct, ...): models/lora.py, data/collate.py ----
    max_pixels: int | None = _opt(512 * 28 * 28, "image models",
                                  "cap on each figure's width x height after resizing (aspect ratio kept); "
                                  "Qwen2.5-VL spends one token per 28x28 pixels, so the default allows 512 "
                                  "image tokens")
    train_vision: str = _opt("none", "image models",
                             "none: vision tower and projector frozen; merger: also train the projector (merger) "
                             "in full; lora: projector + LoRA on the vision blocks",
                             choices=("none", "merger", "lora"))
    images: str | None = _opt(None, "image models",
                              "where the figures are now (folder or zip), when they moved since preprocessing")
    # ---- GRPO (--stage grpo): train/grpo.py, defaults measured on the tiny model (docs/REASONING.md) ----
    num_generations: int = _opt(8, "GRPO", "completions sampled per prompt (the group whose rewards are compared)")
    max_completion_length: int = _opt(512, "GRPO", "tokens per sampled completion (longer ones are cut and count "
                                                   "as clipped)")
    temperature: float = _opt(1.0, "GRPO", "sampling temperature of the completions (TRL's default; lower "
                                           "values give the group less variety to learn from)")
    beta: float = _opt(0.0, "GRPO", "KL penalty to the starting policy (0 = no reference model, TRL's "
                                    "default; MedVLThinker used 0.01)")
    loss_type: str = _opt("dapo", "GRPO", "TRL's loss normalisation", choices=LOSS_TYPES)
    rewards: str = _opt("correct,format_ok", "GRPO", "comma-separated names from train/rewards.py REWARDS, each "
                                                  "optionally name:weight (e.g. correct:1,format_ok:0.1,length:0.05); default weights 1, 0.1, 0.05")
    # ---- machine ----
    threads: int | None = _opt(None, "machine", "torch CPU threads (default: 1 for the tiny model or on a CPU "
                                                "machine with <= 4 cores, else torch's; env PMCVQA_THREADS)")

    def __post_init__(self):
        if self.learning_rate is None:  # the stage's default, so the run card records the rate used
            self.learning_rate = DEFAULT_LR.get(self.stage, DEFAULT_LR["sft"])


_TYPES = {"str": str, "int": int, "float": float, "str | None": str, "int | None": int, "float | None": float}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """One flag per TrainOptions field, in argparse groups, with the field's default, help and choices."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainOptions):
        meta = dict(f.metadata)
        name = meta.pop("group")
        if name not in groups:
            groups[name] = parser.add_argument_group(name, GROUP_DESCRIPTIONS.get(name))
        group = groups[name]
        flag = f"--{f.name}"
        if f.default is dataclasses.MISSING:
            group.add_argument(flag, required=True, type=_TYPES[f.type], **meta)
        elif f.type == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, **meta)
        else:
            group.add_argument(flag, type=_TYPES[f.type], default=f.default, **meta)
    return parser


def from_namespace(ns: argparse.Namespace) -> TrainOptions:
    return TrainOptions(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainOptions)})
