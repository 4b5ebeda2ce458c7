"""GRPO (`--stage grpo`): reinforcement learning on the exact answer metric with TRL's `GRPOTrainer`.

Same options, output folder and guarantees as the SFT stage (run.py): adapter/, run_card.json,
loss_curve.png (now with reward, reward std, completion length, clipped ratio and KL), tensorboard/,
resumable checkpoints (`--resume_from_checkpoint auto`, after kill -9 too). It starts from a fresh LoRA on
the base, or from an earlier run's adapter (`--init_adapter RUN`, usually an SFT run). Text and image
models alike: each prompt is the exact inference prompt as chat messages (prompts.create_conversation,
no answer; the chat template adds the one BOS and the generation prompt, `<think>\\n` for DeepSeek-R1),
plus an `image` column for image models. Rewards: train/rewards.py. The best checkpoint is chosen by
greedy strict accuracy (format.answers.exact_match) on the validation split, at every --eval_steps.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
import random
import time

from ..core.atomic import disk_full_is_input_error, write_json
from ..core.errors import InputError
from ..core.notices import progress_bars_wanted
from ..core.threads import configure_threads
from ..data.figures import figure_loader
from ..data.shuffle import shuffle_choices
from ..data.store import ADAPTER_DIR, RUN_CARD, check_model_kind, load_processed, row_choices
from ..format.answers import exact_match
from ..format.encoding import opens_think, template_hash
from ..models.kind import is_vision_model
from ..models.loading import check_bitsandbytes, compute_dtype, load_processor, load_tokenizer, resolve_name
from .. import prompts
from . import rewards as R
from .checkpoints import drop_partial, newest_size
from .options import TrainOptions
from .plots import plot_loss_curve
from .run import (LOSS_PNG, _cpu_only, _device_name, build_model, check_dataset_matches, kill_hook,
                  library_versions, prepare_output, resolve_init, save_adapter, validate_options)

VAL_ROWS = 200  # validation rows scored greedily at each evaluation when --max_eval_samples is not given
LOGGED = ("reward", "reward_std", "completions/mean_length", "completions/clipped_ratio", "kl")


def validate_grpo(o: TrainOptions) -> list[tuple[str, float]]:
    if o.num_generations < 2:
        raise InputError(f"--num_generations must be at least 2 (GRPO compares completions; got {o.num_generations})")
    if o.per_device_train_batch_size % o.num_generations:
        raise InputError(f"--per_device_train_batch_size ({o.per_device_train_batch_size}) counts completions in "
                         f"--stage grpo and must be a multiple of --num_generations ({o.num_generations})")
    if o.max_completion_length < 8 or not o.temperature > 0 or o.beta < 0:
        raise InputError("--max_completion_length must be >= 8, --temperature > 0 and --beta >= 0")
    try:
        return R.parse_rewards(o.rewards)
    except ValueError as exc:
        raise InputError(f"--rewards: {exc}") from None


def grpo_rows(ds, report: dict, o: TrainOptions, opened: bool, vision: bool, draws: int = 1, seed: int = 0):
    """The GRPO dataset: per row the inference prompt (chat messages), `choices`, `answer_label`,
    `opened_think`, and for image models the figure reference `image` (loaded lazily); with
    --shuffle_choices each row appears `draws` times, each with a fresh choice order."""
    from datasets import Dataset
    rng = random.Random(seed)
    sys_prompt, caption = report.get("system_prompt"), bool(report.get("include_caption"))
    recs = []
    for _ in range(draws):
        for row in ds:
            choices, gold = row_choices(row), row["answer_label"]
            if o.shuffle_choices:
                choices, gold = shuffle_choices(choices, gold, rng)
            msgs = prompts.create_conversation(row["question"], choices, None, caption=(row.get("caption") or None)
                                               if caption else None, system_prompt=sys_prompt, image=vision)
            rec = {"prompt": msgs, "choices": {k: choices.get(k, "") for k in prompts.LETTERS},
                   "answer_label": gold, "opened_think": opened}
            if vision:
                rec["image"] = row["image"]
            recs.append(rec)
    if o.shuffle_choices:
        rng.shuffle(recs)
    return Dataset.from_list(recs)


def with_figures(ds, load_image):
    """Image rows: the `image` reference becomes the PIL figure when a row is read (not stored twice)."""
    def load(batch):
        return {**batch, "image": [load_image(ref) for ref in batch["image"]]}
    return ds.with_transform(load)


def greedy_scores(model, processing_class, rows, max_new_tokens: int, batch_size: int = 16) -> dict:
    """Greedy answers to `rows` (GRPO dataset rows) read with exact_match: strict / letter / text / parsed %."""
    import torch
    vision = hasattr(processing_class, "image_processor")
    tok = processing_class.tokenizer if vision else processing_class
    side, tok.padding_side = tok.padding_side, "left"
    n = {"strict": 0, "letter_ok": 0, "text_ok": 0, "parsed": 0}
    try:
        for i in range(0, len(rows), batch_size):
            chunk = [rows[j] for j in range(i, min(i + batch_size, len(rows)))]
            texts = [processing_class.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
                     for r in chunk]
            if vision:
                enc = processing_class(text=texts, images=[r["image"] for r in chunk], return_tensors="pt",
                                       padding=True)
            else:
                enc = tok(texts, add_special_tokens=False, return_tensors="pt", padding=True)
            enc = enc.to(model.device)
            with torch.no_grad():
                out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, use_cache=True,
                                     pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
            for r, ids in zip(chunk, out[:, enc["input_ids"].shape[1]:].tolist()):
                if tok.eos_token_id in ids:
                    ids = ids[:ids.index(tok.eos_token_id)]
                m = exact_match(tok.decode(ids), {k: v for k, v in r["choices"].items() if v}, r["answer_label"],
                                prompt_opened_think=r["opened_think"])
                for k in n:
                    n[k] += bool(m[k])
    finally:
        tok.padding_side = side
    return {k: round(100 * v / max(1, len(rows)), 2) for k, v in n.items()}


def _trainer_class():
    from trl import GRPOTrainer

    class ExactGRPOTrainer(GRPOTrainer):
        """GRPOTrainer whose evaluation is greedy strict accuracy on the validation rows (`eval_strict`),
        which picks the best checkpoint."""

        val_rows = None
        eval_max_new_tokens = 512

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            was_training = self.model.training
            self.model.eval()
            scores = greedy_scores(self.model, self.processing_class, self.val_rows, self.eval_max_new_tokens)
            metrics = {f"{metric_key_prefix}_{k}": v for k, v in scores.items()}
            self.log(dict(metrics))  # logged in eval mode: TRL adds no training means to it
            if was_training:
                self.model.train()
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return ExactGRPOTrainer


def grpo_config(o: TrainOptions, weights: list[float], has_eval: bool):
    import torch
    from trl import GRPOConfig
    if o.report_to == "tensorboard":
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(o.output_dir) / "tensorboard")
    bf16 = compute_dtype() == torch.bfloat16 and not _cpu_only()
    return GRPOConfig(
        output_dir=o.output_dir, max_steps=o.max_steps, num_train_epochs=o.num_epochs,
        per_device_train_batch_size=o.per_device_train_batch_size,
        gradient_accumulation_steps=o.gradient_accumulation_steps, learning_rate=o.learning_rate,
        lr_scheduler_type="constant_with_warmup", warmup_steps=o.warmup_steps or 0, weight_decay=o.weight_decay,
        max_grad_norm=o.max_grad_norm, num_generations=o.num_generations,
        max_completion_length=o.max_completion_length, temperature=o.temperature, top_p=1.0, beta=o.beta,
        loss_type=o.loss_type, reward_weights=weights, bf16=bf16, gradient_checkpointing=o.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if o.gradient_checkpointing else None,
        use_cpu=_cpu_only(), logging_steps=o.logging_steps, save_strategy="steps",
        save_steps=o.save_steps or o.eval_steps, save_total_limit=o.save_total_limit,
        eval_strategy="steps" if has_eval else "no", eval_steps=o.eval_steps, load_best_model_at_end=has_eval,
        metric_for_best_model="strict" if has_eval else None, greater_is_better=True if has_eval else None,
        seed=o.seed, data_seed=o.seed, report_to=[o.report_to] if o.report_to != "none" else "none",
        disable_tqdm=not progress_bars_wanted(o.progress), log_completions=False, dataloader_num_workers=0)


def run_grpo(o: TrainOptions, log=print) -> dict:
    """GRPO training; returns the run card (also `<output_dir>/run_card.json`)."""
    validate_options(o)
    pairs = validate_grpo(o)
    o = resolve_init(o)
    configure_threads(o.model, o.threads)
    dsd, report = load_processed(o.dataset_dir, need_columns=("question", "choices", "answer_label"))
    check_bitsandbytes(o.quantization)
    vision = is_vision_model(o.model)
    check_model_kind(report, vision, o.dataset_dir, o.model)
    processor = load_processor(o.model) if vision else None
    tokenizer = processor.tokenizer if vision else load_tokenizer(o.model)
    check_dataset_matches(report, tokenizer, o.dataset_dir, o.model)
    state, resume = prepare_output(o, log)  # rank 0 writes the run folder (run.py)
    out = Path(o.output_dir)

    train = dsd["train"] if o.max_samples is None else dsd["train"].select(range(min(o.max_samples, len(dsd["train"]))))
    if len(train) == 0:
        raise InputError(f"dataset '{o.dataset_dir}' has no train rows")
    prompts_per_step = o.per_device_train_batch_size * o.gradient_accumulation_steps // o.num_generations
    draws = max(1, -(-o.max_steps * prompts_per_step // len(train))) if o.shuffle_choices and o.max_steps > 0 else 1
    opened = opens_think(tokenizer)
    train_ds = grpo_rows(train, report, o, opened, vision, draws, o.seed)
    val = dsd.get("validation")
    val_ds = None
    if val is not None and len(val):
        val_ds = grpo_rows(val.select(range(min(o.max_eval_samples or VAL_ROWS, len(val)))), report, o, opened, vision)
    if vision:
        load_image = figure_loader(report, o.images, o.dataset_dir)
        train_ds, val_ds = with_figures(train_ds, load_image), val_ds and with_figures(val_ds, load_image)
    log(f"GRPO prompts: {len(train_ds)} ({len(train)} train rows x {draws} draw(s)); validation rows scored "
        f"greedily: {len(val_ds) if val_ds is not None else 0}; rewards: "
        + ", ".join(f"{n} x {w}" for n, w in pairs))

    from transformers import set_seed
    set_seed(o.seed)
    model, params = build_model(o, tokenizer, log=log)
    args = grpo_config(o, [w for _, w in pairs], has_eval=val_ds is not None)
    callbacks = kill_hook()
    trainer = _trainer_class()(model=model, reward_funcs=[R.REWARDS[n] for n, _ in pairs], args=args,
                               train_dataset=train_ds, eval_dataset=val_ds, processing_class=processor or tokenizer,
                               callbacks=callbacks)
    trainer.val_rows, trainer.eval_max_new_tokens = val_ds, o.max_completion_length
    if resume:
        log(f"resuming from {resume}")
    t0 = time.perf_counter()
    with disk_full_is_input_error(out, needed=lambda: newest_size(out),
                                  cleanup=lambda: drop_partial(out) if state.is_main_process else None,
                                  hint="; free some space and rerun with --resume_from_checkpoint auto"):
        result = trainer.train(resume_from_checkpoint=resume)
    wall = time.perf_counter() - t0
    history = trainer.state.log_history
    card = {
        "stage": "grpo", "args": dataclasses.asdict(o), "model_path": resolve_name(o.model),
        "init_adapter": o.init_adapter, "resumed_from": resume, "model_kind": "vision" if vision else "text",
        "versions": {**library_versions(), "trl": _version("trl")}, "device": _device_name(),
        "dtype": "bf16" if args.bf16 else "fp32", "preprocess_report": report,
        "template_hash": template_hash(tokenizer), "trainable_parameters": params,
        "rewards": [{"name": n, "weight": w, "doc": (R.REWARDS[n].__doc__ or "").strip()} for n, w in pairs],
        "prompt_opened_think": opened, "prompts_per_step": prompts_per_step, "global_step": trainer.state.global_step,
        "best_checkpoint": trainer.state.best_model_checkpoint, "best_eval_strict": trainer.state.best_metric,
        "eval_strict": [{"step": e["step"], **{k[5:]: e[k] for k in e if k.startswith("eval_")}}
                        for e in history if "eval_strict" in e],
        "train_curves": {k: [(e["step"], e[k]) for e in history if k in e] for k in LOGGED},
        "log_history": history, "runtime_s": round(wall, 3), "train_metrics": result.metrics,
    }
    if state.is_main_process:
        with disk_full_is_input_error(out, hint="; the checkpoints are kept: free some space and rerun with "
                                                "--resume_from_checkpoint auto"):
            save_adapter(trainer.model, processor or tokenizer, out, resolve_name(o.model))
            plot_loss_curve(history, out / LOSS_PNG, title=f"GRPO of {o.model}")
            write_json(out / RUN_CARD, card, default=str)
        log(f"adapter: {out / ADAPTER_DIR}; run card: {out / RUN_CARD}; curves: {out / LOSS_PNG}")
    state.wait_for_everyone()
    return card


def _version(name: str):
    import importlib.metadata as md
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
