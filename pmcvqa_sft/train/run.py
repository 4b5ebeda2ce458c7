"""LoRA/QLoRA supervised fine-tuning with transformers `Trainer` + PEFT + bitsandbytes + accelerate.

`run_training(TrainOptions(...))` does the whole job; `train_sft_example.py` is a thin CLI over it.
Output folder (`output_dir`):
    adapter/            the final adapter (best checkpoint by eval loss when a validation split exists):
                        adapter_config.json + adapter_model.safetensors, with the tokenizer and chat
                        template used in training; loads with PeftModel / AutoPeftModelForCausalLM
    run_card.json       arguments, versions, preprocess report, trainable parameters, loss history,
                        runtime, tokens/s, real-token share
    loss_curve.png      train and eval loss
    tensorboard/        TensorBoard event files
    checkpoint-<step>/  Trainer checkpoints (adapter, optimizer, scheduler, RNG, sampler position)
    train_args.json     written at start: marks the folder as a training run
Exact resume: `resume_from_checkpoint="auto"` continues from the newest complete checkpoint (a partial one,
left by a kill during a save, is skipped: checkpoints.py) with the same data
order (see data/collate.py's EpochLengthGroupedSampler) and RNG state.
Test hooks (environment): PMCVQA_KILL_AFTER_SAVE=<step> SIGKILLs the process right after that
checkpoint is saved; PMCVQA_DEBUG_SEEN_ROWS=<dir> writes the source rows each rank trained on.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
from pathlib import Path
import shutil
import signal
import time

from ..core.atomic import disk_full_is_input_error, make_temp_dir, replace_dir, write_json
from ..core.errors import InputError
from ..core.notices import progress_bars_wanted
from ..core.threads import configure_threads
from ..data.collate import (LENGTH_COLUMN, ROW_ID_KEY, VISION_COLUMNS, EpochLengthGroupedSampler, add_length_column,
                            add_vision_length_column, lengths_of, make_collator, target_logits_only)
from ..data.figures import figure_loader
from ..data.shuffle import SHUFFLE_COLUMNS, ShuffledChoices, row_encoder_for
from ..data.store import ADAPTER_DIR, RUN_CARD, check_model_kind, load_processed
from ..format.encoding import template_hash, tokenizer_hash
from ..format.media import check_max_pixels
from ..models.kind import is_vision_model
from ..models.loading import (check_bitsandbytes, check_quantization, compute_dtype, device_map_for_process, load_model,
                              load_processor, load_tokenizer, resolve_name, sharded_training)
from ..models.adapters import base_and_tokenizer
from ..core.paths import DEFAULT_MODEL
from ..models.lora import lora_config
from .checkpoints import check_explicit, drop_partial, newest_complete, newest_size, set_aside
from .options import TrainOptions  # noqa: F401  (the options' schema; re-exported)
from .plots import plot_loss_curve

LOSS_PNG = "loss_curve.png"
MARKER = "train_args.json"
KILL_ENV = "PMCVQA_KILL_AFTER_SAVE"
SEEN_ENV = "PMCVQA_DEBUG_SEEN_ROWS"


# ---- checks of the user's input ----

def validate_options(o: TrainOptions) -> None:
    check_quantization(o.quantization)
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "lora_r", "eval_steps",
                 "logging_steps", "save_total_limit"):
        if getattr(o, name) < 1:
            raise InputError(f"--{name} must be at least 1 (got {getattr(o, name)})")
    for name in ("save_steps", "max_samples", "max_eval_samples"):
        if getattr(o, name) is not None and getattr(o, name) < 1:
            raise InputError(f"--{name} must be at least 1 (got {getattr(o, name)})")
    if not o.learning_rate > 0:
        raise InputError(f"--learning_rate must be > 0 (got {o.learning_rate})")
    if not 0 <= o.lora_dropout < 1:
        raise InputError(f"--lora_dropout must be in [0, 1) (got {o.lora_dropout})")
    if o.max_steps <= 0 and o.num_epochs <= 0:
        raise InputError("give --num_epochs > 0 or --max_steps > 0")
    if o.save_steps is not None and o.save_steps % o.eval_steps:
        raise InputError(f"--save_steps ({o.save_steps}) must be a multiple of --eval_steps ({o.eval_steps}) "
                         f"to keep the best checkpoint by eval loss")
    if not 0 <= o.warmup_ratio < 1:
        raise InputError(f"--warmup_ratio must be in [0, 1) (got {o.warmup_ratio})")


def resolve_init(o: TrainOptions) -> TrainOptions:
    """--init_adapter RUN: its base model becomes --model unless --model was given (checked to fit)."""
    if not o.init_adapter:
        return o
    base, _tok, adir, _card = base_and_tokenizer(None if o.model == DEFAULT_MODEL else o.model, o.init_adapter)
    return dataclasses.replace(o, model=base, init_adapter=str(adir))


def _is_run_folder(d: Path) -> bool:
    return any((d / n).exists() for n in (MARKER, RUN_CARD, ADAPTER_DIR)) or any(d.glob("checkpoint-*"))


def resolve_resume(o: TrainOptions, log=print) -> str | None:
    """The checkpoint to resume from (None: fresh start); refuses to train over another run.

    `auto` takes the newest *complete* checkpoint (checkpoints.py) and names each newer partial one it
    skips (a kill or a full disk during a save); an explicitly named partial checkpoint is an error.
    """
    out = Path(o.output_dir)
    if o.resume_from_checkpoint not in (None, "", "auto"):
        return check_explicit(o.resume_from_checkpoint)
    if out.exists() and not out.is_dir():
        raise InputError(f"--output_dir '{out}' is a file, not a folder")
    busy = out.is_dir() and any(out.iterdir())
    if o.resume_from_checkpoint == "auto" and not (busy and not _is_run_folder(out)):
        ckpt, skipped = newest_complete(out)
        for partial, why in skipped:
            log(f"note: skipping partial checkpoint {partial} ({why}); it is set aside as partial-{partial.name}"
                + (f"; resuming from {ckpt.name}" if ckpt else "; no complete checkpoint: starting afresh"))
        return str(ckpt) if ckpt else None
    if busy and not _is_run_folder(out):
        raise InputError(f"output folder '{out}' holds files that are not a training run; choose another "
                         f"--output_dir (they are never deleted, even with --overwrite)")
    if busy and not o.overwrite:
        raise InputError(f"output folder '{out}' already holds a training run; pass --resume_from_checkpoint "
                         f"auto to continue it, --overwrite to replace it, or another --output_dir")
    return None


# The options that fix which rows a step sees: a resume with any of them changed would skip the old
# number of batches of a different order.
DATA_ORDER_KEYS = ("dataset_dir", "max_samples", "seed", "per_device_train_batch_size",
                   "gradient_accumulation_steps", "max_pixels", "train_vision", "shuffle_choices", "stage",
                   "num_generations")


def check_resume_options(o: TrainOptions, resume: str | None) -> None:
    """Refuse to resume with options that change the data order (compared with the run's train_args.json)."""
    saved_path = Path(o.output_dir) / MARKER
    if resume is None or not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text())
    now = dataclasses.asdict(o)
    diff = [f"--{k} {saved.get(k)!r} -> {now[k]!r}" for k in DATA_ORDER_KEYS
            if k in saved and str(saved[k]) != str(now[k])]
    if diff:
        raise InputError(f"cannot resume {resume} with a different data order ({'; '.join(diff)}); rerun with "
                         f"the original values or start a new --output_dir")


def check_dataset_matches(report: dict, tokenizer, dataset_dir, model_name) -> None:
    """Refuse a dataset tokenized with another tokenizer or chat template than the model's.

    Compares what the report holds: reports written before `tokenizer_hash` existed are checked on the
    other fields only.
    """
    want = {"tokenizer_hash": tokenizer_hash, "vocab_size": len, "template_hash": template_hash,
            "eos_token_id": lambda t: t.eos_token_id}
    bad = []
    for key, get in want.items():
        if key in report and report[key] != (mine := get(tokenizer)):
            bad.append(f"{key} {report[key]} vs {mine}")
    if bad:
        raise InputError(f"dataset '{dataset_dir}' was built with another tokenizer or chat template than "
                         f"model '{model_name}' (dataset vs model: {'; '.join(bad)}); rerun "
                         f"preprocess_pmc_vqa_for_sft.py --tokenizer {model_name}")


# ---- data ----

def prepare_datasets(dsd, o: TrainOptions, image_processor=None, report=None, log=print):
    """(train, eval or None) with a precomputed length column; provenance columns kept for the debug hook.

    Image datasets (`image_processor` given) keep their figure columns, and the length column counts the
    image tokens each row will have under `--max_pixels`."""
    if image_processor is not None:
        check_max_pixels(o.max_pixels, report, log)
    if "train" not in dsd or len(dsd["train"]) == 0:
        raise InputError(f"dataset '{o.dataset_dir}' has no train rows (splits: {dict(dsd.num_rows)})")
    keep = {"input_ids", "labels", LENGTH_COLUMN, "source_row", *(VISION_COLUMNS if image_processor else ()),
            *(SHUFFLE_COLUMNS if o.shuffle_choices else ())}

    def trim(ds, n):
        if image_processor is None:
            ds = add_length_column(ds)
        else:
            missing = [c for c in VISION_COLUMNS if c not in ds.column_names]
            if missing:
                raise InputError(f"dataset '{o.dataset_dir}' lacks the figure columns {missing}; rerun "
                                 f"preprocess_pmc_vqa_for_sft.py with --images")
        if n is not None:
            ds = ds.select(range(min(n, len(ds))))
        if image_processor is not None:
            ds = add_vision_length_column(ds, image_processor, o.max_pixels)
        return ds.remove_columns([c for c in ds.column_names if c not in keep])

    train = trim(dsd["train"], o.max_samples)
    ev = dsd.get("validation")
    ev = trim(ev, o.max_eval_samples) if ev is not None and len(ev) else None
    return train, ev


# ---- model ----

def build_model(o: TrainOptions, tokenizer, log=print):
    """The base model (quantized as asked, on this process's device) wrapped with LoRA; text or image
    (image models: the vision tower frozen unless `--train_vision` says otherwise, models/lora.py)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    sharded = sharded_training()
    model = load_model(o.model, o.quantization, device_map=device_map_for_process(), sharded=sharded)
    model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
    # The pad id only fills padding, which the collator masks by position. Setting it where the model's
    # configs leave it unset (the tiny model, R1's generation_config) saves Trainer's notice that it
    # "aligned the PAD/BOS/EOS tokens", printed on every run otherwise.
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None and tokenizer is not None and getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = tokenizer.pad_token_id
    gc_kwargs = {"use_reentrant": False}
    # Sharded QLoRA skips the fp32 upcast: FSDP / ZeRO-3 need every weight in the one storage dtype.
    if o.quantization != "none" and not sharded:
        # fp32 norms/head for stability and input grads for checkpointing through frozen int8/nf4 layers
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=o.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    try:
        if getattr(o, "init_adapter", None):  # continue an earlier run's adapter (its r, targets, saved modules)
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, o.init_adapter, is_trainable=True)
        else:
            model = get_peft_model(model, lora_config(o.model, o.lora_r, o.lora_alpha, o.lora_dropout,
                                                      o.target_modules, o.train_vision, getattr(o, "train_head", False)))
    except ValueError as exc:
        raise InputError(f"--target_modules '{o.target_modules}': {' '.join(str(exc).split())[:200]}") from None
    trainable, total = model.get_nb_trainable_parameters()
    vision = f"; vision: {o.train_vision}" if is_vision_model(o.model) else ""
    log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%){vision}")
    return model, {"trainable": trainable, "total": total, "percent": 100 * trainable / total}


# ---- Trainer ----

def _trainer_class():
    from transformers import Trainer

    class SFTLoRATrainer(Trainer):
        """Trainer + seeded length grouping + a count of real vs computed tokens in training batches."""

        real_tokens = 0
        computed_tokens = 0
        seen_rows: list[int] | None = None

        def _get_train_sampler(self, train_dataset=None):
            ds = train_dataset if train_dataset is not None else self.train_dataset
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return EpochLengthGroupedSampler(lengths_of(ds),
                                             self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                             seed)

        def _prepare_inputs(self, inputs):
            rows = inputs.pop(ROW_ID_KEY, None)
            if self.model.training:
                mask = inputs["attention_mask"]
                self.real_tokens += int(mask.sum())
                self.computed_tokens += mask.numel()
                if rows is not None and self.seen_rows is not None:
                    self.seen_rows.extend(rows.tolist())
            return target_logits_only(super()._prepare_inputs(inputs))

        def get_eval_dataloader(self, eval_dataset=None):
            # validation rows keep their stored choice order (`ShuffledChoices.eval_collator`): the eval
            # loss that picks the best checkpoint must measure every checkpoint on the same sequences
            train_collator = self.data_collator
            self.data_collator = getattr(train_collator, "eval_collator", train_collator)
            try:
                return super().get_eval_dataloader(eval_dataset)
            finally:
                self.data_collator = train_collator

    return SFTLoRATrainer


def _callbacks():
    from transformers import TrainerCallback

    class KillAfterSave(TrainerCallback):
        """Test hook: simulate a crash (SIGKILL, no cleanup) right after checkpoint `step` is written."""

        def __init__(self, step: int):
            self.step = step

        def on_save(self, args, state, control, **kw):
            if state.global_step == self.step:
                os.kill(os.getpid(), signal.SIGKILL)

    class EpochToCollator(TrainerCallback):
        """Tells a `ShuffledChoices` collator the epoch, so a resumed run draws the same choice orders."""

        def __init__(self, collator):
            self.collator = collator

        def on_epoch_begin(self, args, state, control, **kw):
            self.collator.set_epoch(int(state.epoch + 1e-6))  # a resumed state holds e.g. 1.5: epoch 1

    return KillAfterSave, EpochToCollator


def kill_hook() -> list:
    """[KillAfterSave(step)] when the tests ask (env KILL_ENV = step) for a kill -9 after that step's save."""
    kill_after_save, _ = _callbacks()
    return [kill_after_save(int(os.environ[KILL_ENV]))] if os.environ.get(KILL_ENV) else []


def training_arguments(o: TrainOptions, has_eval: bool):
    import torch
    from transformers import TrainingArguments

    save_steps = o.save_steps or o.eval_steps
    if o.report_to == "tensorboard":
        # transformers 5 takes the TensorBoard folder from the environment only
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(o.output_dir) / "tensorboard")
    warmup = o.warmup_steps if o.warmup_steps is not None else o.warmup_ratio
    # later 5.x releases renamed gradient_checkpointing* to activation_checkpointing* (old names warn)
    ckpt = ("activation_checkpointing" if "activation_checkpointing" in
            inspect.signature(TrainingArguments.__init__).parameters else "gradient_checkpointing")
    return TrainingArguments(
        output_dir=o.output_dir, num_train_epochs=o.num_epochs, max_steps=o.max_steps,
        per_device_train_batch_size=o.per_device_train_batch_size,
        per_device_eval_batch_size=o.per_device_eval_batch_size or o.per_device_train_batch_size,
        gradient_accumulation_steps=o.gradient_accumulation_steps, learning_rate=o.learning_rate,
        lr_scheduler_type="cosine", warmup_steps=warmup, weight_decay=o.weight_decay,
        max_grad_norm=o.max_grad_norm, optim="adamw_torch",
        logging_steps=o.logging_steps, eval_strategy="steps" if has_eval else "no", eval_steps=o.eval_steps,
        save_strategy="steps", save_steps=save_steps, save_total_limit=o.save_total_limit,
        load_best_model_at_end=has_eval, metric_for_best_model="eval_loss" if has_eval else None,
        greater_is_better=False if has_eval else None, prediction_loss_only=True,
        seed=o.seed, data_seed=o.seed, bf16=compute_dtype() == torch.bfloat16,
        **{ckpt: o.gradient_checkpointing,
           f"{ckpt}_kwargs": {"use_reentrant": False} if o.gradient_checkpointing else None},
        remove_unused_columns=False, train_sampling_strategy="group_by_length",
        length_column_name=LENGTH_COLUMN, ddp_find_unused_parameters=False,
        report_to=[o.report_to] if o.report_to and o.report_to != "none" else "none",
        use_cpu=_cpu_only(), disable_tqdm=not progress_bars_wanted(o.progress), dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available())


# ---- outputs ----

def save_adapter(model, tokenizer, out: Path, base_name: str) -> Path:
    """adapter weights + config + tokenizer into `out/adapter`, via a temp folder and renames."""
    final = out / ADAPTER_DIR
    tmp = make_temp_dir(f".{ADAPTER_DIR}.", out)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        cfg_path = tmp / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = base_name  # the id/folder actually trained on, for AutoPeft*
        cfg_path.write_text(json.dumps(cfg, indent=2))
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def library_versions() -> dict:
    import importlib.metadata as md
    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "tokenizers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _cpu_only() -> bool:
    import torch
    mps = getattr(torch.backends, "mps", None)
    return not torch.cuda.is_available() and not (mps and mps.is_available())


def _device_name() -> str:
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


@dataclasses.dataclass
class RunSetup:
    trainer: object
    tokenizer: object
    report: dict
    resume: str | None
    state: object
    params: dict
    seen_dir: str | None
    processor: object = None  # image models: tokenizer + image processor, saved with the adapter


def prepare_output(o: TrainOptions, log=print):
    """(accelerate state, checkpoint to resume or None): the resume checks on every rank, then rank 0
    sets partial checkpoints aside, clears the folder for --overwrite and writes train_args.json."""
    from accelerate import PartialState
    # sets up the process group under `accelerate launch` / torchrun; without an accelerator accelerate
    # only forms a multi-process (gloo) group when told it runs on the CPU
    state = PartialState(cpu=_cpu_only())
    resume = resolve_resume(o, log=log if state.is_main_process else (lambda *_: None))
    check_resume_options(o, resume)  # every rank checks before rank 0 touches the folder
    state.wait_for_everyone()
    out = Path(o.output_dir)
    if state.is_main_process:
        if o.resume_from_checkpoint == "auto":
            for partial, _ in newest_complete(out)[1]:
                set_aside(partial)
        if o.overwrite and resume is None and out.is_dir() and o.resume_from_checkpoint is None:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / MARKER, dataclasses.asdict(o), default=str)
    state.wait_for_everyone()
    return state, resume


def setup_run(o: TrainOptions, log=print) -> RunSetup:
    """Checks, output folder, data, model and the Trainer, ready for `trainer.train()`."""
    validate_options(o)
    o = resolve_init(o)
    configure_threads(o.model, o.threads)  # 1 thread for the tiny model / small CPU machines (threads.py)
    dsd, report = load_processed(o.dataset_dir)
    check_bitsandbytes(o.quantization)
    vision = is_vision_model(o.model)  # the one text-or-image decision of this stage
    check_model_kind(report, vision, o.dataset_dir, o.model)
    processor = load_processor(o.model) if vision else None
    tokenizer = processor.tokenizer if vision else load_tokenizer(o.model)
    tokenizer.padding_side = "right"  # training pads on the right; generation (elsewhere) on the left
    check_dataset_matches(report, tokenizer, o.dataset_dir, o.model)
    state, resume = prepare_output(o, log)

    train_ds, eval_ds = prepare_datasets(dsd, o, processor.image_processor if vision else None, report, log)
    log(f"train rows: {len(train_ds)}; validation rows: {len(eval_ds) if eval_ds is not None else 0}"
        + ("" if eval_ds is not None else " (no validation split: no eval, last checkpoint kept)"))
    args = training_arguments(o, has_eval=eval_ds is not None)
    from transformers import set_seed
    set_seed(o.seed)  # the LoRA A matrices are random: same seed, same init, whatever ran before
    model, params = build_model(o, tokenizer, log=log)

    seen_dir = os.environ.get(SEEN_ENV)
    collator = make_collator(processor or tokenizer, model, figure_loader(report, o.images, o.dataset_dir)
                             if vision else None, o.max_pixels, with_row_ids=bool(seen_dir))
    callbacks = kill_hook()
    if o.shuffle_choices:
        # a row's tokens beyond its ids (a figure's expansion under --max_pixels; 0 for text), as the
        # length column prepare_datasets computed them
        collator = ShuffledChoices(collator, row_encoder_for(report, tokenizer, processor),
                                   report.get("args", {}).get("max_length", 1024), seed=o.seed,
                                   extra_tokens=lambda row: row[LENGTH_COLUMN] - len(row["input_ids"]))
        _, epoch_to_collator = _callbacks()
        callbacks.append(epoch_to_collator(collator))
    trainer = _trainer_class()(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                               data_collator=collator, processing_class=processor or tokenizer, callbacks=callbacks)
    trainer.seen_rows = [] if seen_dir else None
    return RunSetup(trainer, tokenizer, report, resume, state, params, seen_dir, processor)


def run_training(o: TrainOptions, log=print) -> dict:
    """Train; returns the run card (also written to `<output_dir>/run_card.json` by the main process)."""
    if o.stage != "sft":  # --stage grpo is train/grpo.py's run_grpo (train_sft_example.py picks it)
        raise InputError(f"run_training runs --stage sft; for --stage {o.stage} call train.grpo.run_grpo")
    run = setup_run(o, log=log)
    trainer, state, out = run.trainer, run.state, Path(o.output_dir)
    if run.resume:
        log(f"resuming from {run.resume}")
    t0 = time.perf_counter()
    with disk_full_is_input_error(out, needed=lambda: newest_size(out),
                                  cleanup=lambda: drop_partial(out) if state.is_main_process else None,
                                  hint="; free some space and rerun with --resume_from_checkpoint auto"):
        result = trainer.train(resume_from_checkpoint=run.resume)
    wall = time.perf_counter() - t0
    share = trainer.real_tokens / trainer.computed_tokens if trainer.computed_tokens else None
    log(f"real-token share of computed training tokens: {share:.2%}" if share is not None else
        "no training step ran in this process (already finished)")
    if run.seen_dir:
        Path(run.seen_dir).mkdir(parents=True, exist_ok=True)
        (Path(run.seen_dir) / f"seen_rank{state.process_index}.json").write_text(json.dumps(trainer.seen_rows))

    history = trainer.state.log_history
    card = {
        "args": dataclasses.asdict(o), "model_path": resolve_name(o.model), "resumed_from": run.resume,
        "model_kind": "vision" if run.processor is not None else "text",
        "versions": library_versions(), "device": _device_name(), "world_size": state.num_processes,
        "dtype": "bf16" if trainer.args.bf16 else "fp32", "preprocess_report": run.report,
        "template_hash": template_hash(run.tokenizer), "trainable_parameters": run.params,
        "global_step": trainer.state.global_step,
        "best_checkpoint": trainer.state.best_model_checkpoint, "best_eval_loss": trainer.state.best_metric,
        "train_loss": [{"step": s, "loss": v} for s, v in _series(history, "loss")],
        "eval_loss": [{"step": s, "loss": v} for s, v in _series(history, "eval_loss")],
        "log_history": history, "runtime_s": round(wall, 3), "train_metrics": result.metrics,
        # token counts: this process's training batches (after a resume, the resumed part only);
        # tokens/s = all ranks' real tokens over the wall time of train() (eval and saving included)
        "real_tokens": trainer.real_tokens, "computed_tokens": trainer.computed_tokens,
        "real_token_share": share,
        "real_tokens_per_s": trainer.real_tokens * state.num_processes / wall if wall else None,
    }
    if state.is_main_process:
        with disk_full_is_input_error(out, hint="; the checkpoints are kept: free some space and rerun with "
                                                "--resume_from_checkpoint auto"):
            save_adapter(trainer.model, run.processor or run.tokenizer, out, resolve_name(o.model))
            plot_loss_curve(history, out / LOSS_PNG, title=f"LoRA SFT of {o.model}")
            write_json(out / RUN_CARD, card, default=str)
        log(f"adapter: {out / ADAPTER_DIR}; run card: {out / RUN_CARD}; loss curve: {out / LOSS_PNG}")
    state.wait_for_everyone()
    return card


def _series(history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(e["step"]), float(e[key])) for e in history if key in e and "step" in e]
