"""`--evaluate`: accuracy on a preprocessed split, by choice scoring (default) or by generation.

Text and image models alike (an image model's rows carry their figure; `blind` adds the same model with
every figure replaced by a uniform gray one of its size: how much of the accuracy comes from looking).
- score: `scoring.score_choices`, one forward pass per batch of questions, no generation. The
  prediction is the choice with the highest summed log-probability; the byte-normalised variant
  (lm-eval's `acc_bytes`, not its per-character `acc_norm`) is reported as `accuracy_norm`.
- generate: greedy, batched, left-padded generation (`generation.generate_ids`), then
  `answers.extract_answer`; answers it can't parse count as wrong and are reported as unparseable
  (strict, letter and text accuracy: evaluate/metrics.py).
Prompts: each row is scored / answered after exactly the prompt it was trained with, the prompt part
of its stored `input_ids` (labels -100): a question preprocessing cut to fit `--max_length` is
evaluated cut, never re-rendered in full (which the model never saw and which may not fit). Only a
dataset made with another tokenizer or chat template than the model's is re-rendered from its text.
`truncated_rows` counts the rows whose prompt preprocessing had shortened.
Report: accuracy with its 95 % Wilson interval, the split's majority-letter baseline, per-letter accuracy,
the confusion matrix, the unparseable rate, questions/s. `--compare_base` runs the same questions with
the adapter disabled too. Outputs `predictions.jsonl` and `metrics.json`, written atomically.
"""
from __future__ import annotations

from contextlib import nullcontext
import copy
import json
from pathlib import Path
import time
from typing import Sequence

from .. import prompts
from ..core import atomic
from ..core.atomic import atomic_dir
from ..core.errors import InputError
from ..core.notices import progress_bars_wanted
from ..data.collate import build_batch, make_collator
from ..data.figures import blank_like, figure_loader
from ..data.store import check_model_kind, load_processed, row_choices
from ..format.answers import reasoning_tokens
from ..format.encoding import IGNORE_INDEX, PromptEncoder, assistant_turn, render_prompt, template_hash, tokenizer_hash
from ..format.media import card_max_pixels, check_max_pixels
from ..infer.generation import GenerationSettings, generate_ids
from .metrics import compute_metrics, format_report, generated_prediction, majority_baseline
from .scoring import _user_text, predict_score

NEED_COLUMNS = ("question", "choices", "answer_label")
IMAGE_COLUMNS = ("input_ids", "labels", "image", "image_width", "image_height")  # image rows need them too
DEFAULT_EVAL_MAX_NEW_TOKENS = 96


def load_eval_rows(dataset_dir, split: str = "test", num_samples: int | None = None,
                   extra_columns: Sequence[str] = (), missing_hint: str = ""):
    """(rows as dicts, preprocess report) of one split; one-line errors for a bad dataset or split.

    Each row carries the trained prompt (`prompt_ids`: the -100 part of the stored ids) and the stored
    target (`target_ids`) when the dataset has token columns. `extra_columns` must be present (image
    datasets: the figure reference and size); `missing_hint` says what to do when they are not."""
    dsd, report = load_processed(dataset_dir, need_columns=NEED_COLUMNS)
    if split not in dsd:
        raise InputError(f"dataset '{dataset_dir}' has no split '{split}' (it has {', '.join(dsd)})")
    ds = dsd[split]
    missing = [c for c in extra_columns if c not in ds.column_names]
    if missing:
        raise InputError(f"dataset '{dataset_dir}' split '{split}' lacks {missing}{missing_hint}")
    if len(ds) == 0:
        raise InputError(f"split '{split}' of dataset '{dataset_dir}' is empty")
    if num_samples is not None:
        if num_samples < 1:
            raise InputError(f"--num_samples must be at least 1, got {num_samples}")
        ds = ds.select(range(min(num_samples, len(ds))))
    keep = [c for c in dict.fromkeys(("question", "choices", "answer_label", "caption", "source_file",
                                      "source_row", "truncated", "input_ids", "labels", *extra_columns))
            if c in ds.column_names]
    rows = []
    for i, r in enumerate(ds.select_columns(keep)):
        ids, labels = r.pop("input_ids", None), r.pop("labels", None)
        if ids is not None and labels is not None:  # the trained prompt: the -100 part before the target
            n = next((k for k, x in enumerate(labels) if x != IGNORE_INDEX), len(labels))
            r["prompt_ids"], r["target_ids"] = ids[:n], ids[n:]
        choices = row_choices(r)
        if r["answer_label"] not in choices:
            raise InputError(f"dataset '{dataset_dir}' split '{split}' row {i}: answer_label "
                             f"'{r['answer_label']}' is not one of its choices {list(choices)}")
        rows.append({**r, "choices": choices, "index": i})
    return rows, report


def predict_generate(model, tokenizer, rows, batch_size=16, max_new_tokens=DEFAULT_EVAL_MAX_NEW_TOKENS,
                     system_prompt=None, progress=True, include_caption=False, collator=None) -> list[dict]:
    """Greedy, batched, left-padded generation from each row's prompt, then the answer read from it.

    `collator` (image models): the rows' figures are processed and each prompt's placeholder expanded
    (`collate.build_batch`, left padding); text rows use their stored prompt ids (or render them)."""
    from tqdm.auto import tqdm
    sys_msg = [{"role": "system", "content": system_prompt}] if system_prompt else []
    enc = [r["prompt_ids"] if r.get("prompt_ids") is not None else tokenizer(
        render_prompt(tokenizer, sys_msg + [{"role": "user", "content": _user_text(r, include_caption)}]),
        add_special_tokens=False)["input_ids"] for r in rows]
    settings = GenerationSettings(do_sample=False, max_new_tokens=max_new_tokens)
    order = sorted(range(len(rows)), key=lambda i: len(enc[i]))  # less left padding per batch
    out: list[dict | None] = [None] * len(rows)
    for start in tqdm(range(0, len(order), batch_size), desc="generating",
                      disable=not progress_bars_wanted(progress), leave=False):
        idx = order[start:start + batch_size]
        turns = generate_turns(model, tokenizer, [enc[i] for i in idx], settings, collator,
                               [rows[i].get("image") for i in idx])
        for i, (raw, g) in zip(idx, turns):
            out[i] = generated_prediction(raw, rows[i]["choices"], g, len(enc[i]), reasoning_tokens(tokenizer, raw))
    return out  # type: ignore[return-value]


def generate_turns(model, tokenizer, enc, settings: GenerationSettings, collator=None, figures=()) -> list:
    """[(whole assistant turn, Generated)] for prompt ids generated in one left-padded batch. Image models
    (`collator`): each prompt with its figure ref from `figures` (a figure repeated in the batch is read
    once). Used by `--evaluate --method generate` and by local rationale sampling (K copies of a prompt)."""
    inputs = None if collator is None else build_batch(
        [(e, None) for e in enc], collator.figures([{"image": f} for f in figures]), collator.image_processor,
        collator.image_token_id, collator.pad_token_id, collator.max_pixels, collator.mm_token_type_ids, left=True)
    # the prompt's last tokens tell whether it opened the think block (DeepSeek's `<think>\n`)
    return [(assistant_turn(tokenizer.decode(e[-8:], skip_special_tokens=False), g.text), g)
            for e, g in zip(enc, generate_ids(model, tokenizer, enc, settings, inputs=inputs))]


def figure_collator(loaded, report: dict, dataset_dir, images=None, max_pixels=None):
    """An image model's collator for an image dataset's rows: figures read from the dataset's source (or
    `images`, where they moved to), under `max_pixels` (default: the run's). One-line errors for a text
    dataset or a bad --max_pixels."""
    check_model_kind(report, True, dataset_dir, loaded.base)
    check_max_pixels(max_pixels)
    return make_collator(loaded.processor, loaded.model, figure_loader(report, images, dataset_dir),
                         max_pixels or card_max_pixels(loaded.card))


def load_vision_rows(dataset_dir, split="test", num_samples=None):
    """`load_eval_rows` of an image dataset: rows with prompt ids, stored target ids and figure ref."""
    return load_eval_rows(dataset_dir, split, num_samples, extra_columns=IMAGE_COLUMNS,
                          missing_hint=": not an image dataset (preprocess with --images and an image "
                                       "model's --tokenizer)")


def check_eval_args(method: str, batch_size: int) -> None:
    if method not in ("score", "generate"):
        raise InputError(f"unknown --method '{method}': choose score or generate")
    if batch_size < 1:
        raise InputError(f"--batch_size must be at least 1, got {batch_size}")


def evaluate_model(model, tokenizer, rows, method="score", batch_size=16, letter_only=False,
                   max_new_tokens=DEFAULT_EVAL_MAX_NEW_TOKENS, system_prompt=None, progress=True,
                   include_caption=False, collator=None):
    """(predictions, metrics) of one model on `rows` (prompts built as the preprocessor built them);
    `collator`: an image model's, which gives each row its figure (or a blank one: the blind run)."""
    check_eval_args(method, batch_size)
    start = time.perf_counter()
    if method == "score":
        preds = predict_score(model, tokenizer, rows, batch_size, letter_only, system_prompt, progress,
                              include_caption, collator=collator)
    else:
        preds = predict_generate(model, tokenizer, rows, batch_size, max_new_tokens, system_prompt, progress,
                                 include_caption, collator=collator)
    seconds = time.perf_counter() - start
    return preds, compute_metrics(rows, preds, seconds, method,
                                  max_new_tokens=max_new_tokens if method == "generate" else None)


def check_output_dir(output_dir, overwrite: bool) -> Path:
    # --overwrite replaces an earlier evaluation only: never, say, the training run beside it
    return atomic.check_output_dir(output_dir, overwrite, "metrics.json", "an evaluation output")


def write_outputs(output_dir, records: Sequence[dict], metrics: dict, overwrite: bool = False) -> Path:
    """predictions.jsonl + metrics.json into `output_dir`, via a temp folder renamed into place."""
    out = check_output_dir(output_dir, overwrite)
    with atomic_dir(out) as tmp:
        with open(tmp / "predictions.jsonl", "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    return out


def dataset_prompt_settings(report: dict, fallback_system_prompt=None) -> tuple[str | None, bool]:
    """(system prompt, include caption) the preprocessor used, so the evaluation prompt is the training one.

    The report's args: system_prompt None = prompts.SYSTEM_PROMPT, "" = none; include_caption bool.
    """
    args = report.get("args") or {}
    if "system_prompt" in report:  # the value the preprocessor resolved and used (None = none)
        system_prompt = report["system_prompt"] or None
    else:
        sp = args.get("system_prompt", None)
        system_prompt = (fallback_system_prompt if sp is None else (sp or None))
    return system_prompt, bool(args.get("include_caption", False))


def use_trained_prompts(rows, report: dict, tokenizer, system_prompt, include_caption, log=print) -> str:
    """Keep the rows' stored (trained) prompt ids when the dataset was made with this tokenizer and chat
    template; otherwise drop them, so the prompts are re-rendered. Returns which prompts are used."""
    same = (report.get("tokenizer_hash") == tokenizer_hash(tokenizer)
            and report.get("template_hash") == template_hash(tokenizer))
    if not same or not rows or rows[0].get("prompt_ids") is None:
        for r in rows:
            r.pop("prompt_ids", None)
        log("note: the dataset was preprocessed with another tokenizer or chat template than this model's; "
            "evaluation re-renders the prompts from the stored text with this model's template")
        return "re-rendered"
    # Rows not cut by preprocessing must hold exactly what prompts.py renders now; if not, prompts.py
    # was edited after preprocessing: say so (the trained prompts are still the ones evaluated).
    whole = [r for r in rows if not r.get("truncated")]
    fresh = PromptEncoder(tokenizer, system_prompt).prompt_ids(
        [_user_text(r, include_caption) for r in whole]) if whole else []
    changed = sum(f != r["prompt_ids"] for f, r in zip(fresh, whole))
    if changed:
        log(f"note: {changed} of {len(whole)} stored prompts differ from what prompts.py renders now (edited "
            f"since preprocessing?); the stored, trained prompts are evaluated")
    return "trained (stored input_ids)"


def run_evaluation(loaded, dataset_dir, split="test", num_samples=None, batch_size=16, method="score",
                   letter_only=False, max_new_tokens=None, output_dir=None, compare_base=False,
                   overwrite=False, data=None, blind=True, images=None, max_pixels=None, log=print) -> dict:
    """The whole --evaluate job on a loaded model, text or image; returns metrics.json's content.

    `data`: (rows, report) from `load_eval_rows`, when the caller checked the dataset already. Image
    models (`loaded.processor`) read each row's figure (`images`: where they moved to) under
    `max_pixels` (default: the run's), and `blind` adds the same model with every figure blanked.
    """
    if output_dir is not None:
        check_output_dir(output_dir, overwrite)  # fail before the slow part
    if compare_base and not loaded.has_adapter:
        raise InputError("--compare_base needs --adapter (it compares the base model with the adapter)")
    vision = loaded.processor is not None
    rows, report = data or (load_vision_rows(dataset_dir, split, num_samples) if vision
                            else load_eval_rows(dataset_dir, split, num_samples))
    extra: dict = {}
    name = "tuned" if loaded.has_adapter else "model"
    if vision:
        real = figure_collator(loaded, report, dataset_dir, images, max_pixels)
        runs = ([("base", loaded.model.disable_adapter, real)] if compare_base else []) + [(name, nullcontext, real)]
        if blind:
            blank = copy.copy(real)
            blank.blank = blank_like
            runs.append(("blind", nullcontext, blank))
        kw = dict(system_prompt=None, include_caption=False)
        extra = {"model_kind": "vision", "max_pixels": real.max_pixels,
                 "blind_means": "the same model with every figure replaced by a uniform gray one of its size"}
        prompts_used = "trained (stored input_ids)"
    else:
        if method == "score" and report.get("reasoning") == "brief":
            # the model was trained to write a rationale before the answer; scoring the answer after an
            # empty think block would measure a format it never saw
            raise InputError(f"dataset '{dataset_dir}' was preprocessed with --reasoning brief: evaluate it with "
                             f"--method generate (--method score assumes an empty think block)")
        system_prompt, include_caption = dataset_prompt_settings(report, loaded.system_prompt)
        prompts_used = use_trained_prompts(rows, report, loaded.tokenizer, system_prompt, include_caption, log)
        kw = dict(system_prompt=system_prompt, include_caption=include_caption)
        runs = ([("base", loaded.model.disable_adapter, None), ("tuned", nullcontext, None)] if compare_base
                else [(name, nullcontext, None)])
    kw.update(method=method, batch_size=batch_size, letter_only=letter_only,
              max_new_tokens=max_new_tokens or DEFAULT_EVAL_MAX_NEW_TOKENS)
    results, preds = {}, {}
    for key, ctx, collator in runs:
        log(f"evaluating {key}: {len(rows)} questions of split '{split}', method {method}"
            + (" (every figure replaced by a blank one)" if key == "blind" else ""))
        with ctx():
            preds[key], results[key] = evaluate_model(loaded.model, loaded.tokenizer, rows, collator=collator, **kw)
    baseline = majority_baseline(rows)
    print(format_report(results, baseline))
    truncated = sum(bool(r.get("truncated")) for r in rows) if rows and "truncated" in rows[0] else None
    if truncated:
        log(f"{truncated} of {len(rows)} questions were shortened by preprocessing to fit --max_length; "
            f"they are evaluated as trained (shortened)")
    metrics = {**results, "majority_baseline": baseline, "split": split, "dataset_dir": str(dataset_dir),
               "prompts": prompts_used, "truncated_rows": truncated,
               "method": method, "letter_only": letter_only, "base_model": loaded.base,
               "adapter": str(loaded.adapter_dir) if loaded.adapter_dir else None,
               "quantization": loaded.quantization, **extra}
    if output_dir is not None:
        records = []
        for i, r in enumerate(rows):
            rec = {k: r.get(k) for k in ("index", "source_file", "source_row", "question", "choices",
                                         "image" if vision else "truncated")}
            rec["gold"] = r["answer_label"]
            for key in results:
                rec[key] = {**preds[key][i], "correct": preds[key][i]["pred"] == r["answer_label"]}
            records.append(rec)
        write_outputs(output_dir, records, metrics, overwrite)
        log(f"wrote {output_dir}/predictions.jsonl and metrics.json")
    return metrics
