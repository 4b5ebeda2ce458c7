"""`--evaluate` for image models: choice scoring and generation with the figures, and the blind ablation.

The prompt of every question is the STORED one (input_ids where labels == -100, as trained), with its
image placeholder expanded at run time under the run's `max_pixels` (`vision_collate.build_batch`).
- score: each choice's answer turn in the training format (`prompts.candidate_contents`, tokenized as
  preprocessing tokenized the target, + EOS) is appended to the prompt; the prediction is the choice
  with the highest sum of token log-probs (the text path's rule, answers.py). The gold choice's tokens
  must equal the row's stored target: a dataset whose targets differ (another answer format, a
  rationale) is refused in one line rather than scored on a format it was not trained on.
- generate: greedy, left-padded, batched generation from the same prompts with pixel_values,
  image_grid_thw and mm_token_type_ids, then `answers.extract_answer`.
- blind: the same model on the same prompts with every figure replaced by a uniform gray one of the
  same size (`figures.blank_like`): how much of the accuracy comes from looking at the figure.
metrics.json holds `base` (with --compare_base), `tuned` (or `model` without an adapter) and `blind`,
each with the text path's metrics (accuracy, 95 % interval, per letter, confusion, ...).
"""
from __future__ import annotations

import time
from contextlib import nullcontext

from . import prompts
from .errors import InputError

NEED = ("input_ids", "labels", "question", "choices", "answer_label", "image", "image_width", "image_height")


def load_vision_rows(dataset_dir, split="test", num_samples=None):
    """(rows with prompt ids, stored target ids and figure ref; preprocess report)."""
    from .evaluation import load_eval_rows
    return load_eval_rows(dataset_dir, split, num_samples, extra_columns=NEED,
                          missing_hint=": not an image dataset (preprocess with --images and an image "
                                       "model's --tokenizer)")


def candidate_targets(tokenizer, choices, letter_only=False) -> tuple[list[str], list[list[int]]]:
    """Each choice's answer turn in the training format: (texts, target ids + EOS)."""
    from .encoding import PromptEncoder
    from .vision_infer import opens_think
    contents = prompts.candidate_contents(choices, letter_only=letter_only, think=opens_think(tokenizer))
    return contents, PromptEncoder(tokenizer).target_ids(contents)


def sequence_logprobs(model, collator, items) -> list[float]:
    """Sum of the log-probs of each item's target tokens after its prompt and figure, in one forward pass.

    `items`: (prompt ids, target ids, figure ref). Right-padded (`collator`), logits kept only where a
    target token is predicted (training.target_logits_only)."""
    import torch

    from .training import target_logits_only
    device = next(model.parameters()).device
    feats = [{"input_ids": p + t, "labels": [-100] * len(p) + t, "image": ref} for p, t, ref in items]
    inputs = target_logits_only(collator(feats))
    shift = inputs.pop("shift_labels", None)
    labels = inputs.pop("labels")
    if shift is None:  # every position predicts a target token: all logits are kept
        shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    with torch.no_grad():
        logits = model(**{k: v.to(device) for k, v in inputs.items()}, use_cache=False).logits
    lp = torch.log_softmax(logits.float(), dim=-1).cpu()
    mask = shift != -100
    return (lp.gather(-1, shift.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(-1).tolist()


def predict_score(model, collator, tokenizer, rows, batch_size=16, letter_only=False, progress=True):
    from tqdm.auto import tqdm
    from .modeling import progress_bars_wanted  # no bar fragments in logs
    targets, nbytes = [], []
    for r in rows:
        contents, t = candidate_targets(tokenizer, r["choices"], letter_only)
        nbytes.append([max(1, len(c.encode("utf-8"))) for c in contents])
        gold = t[list(r["choices"]).index(r["answer_label"])]
        if not letter_only and gold != r["target_ids"]:
            raise InputError(f"row {r['index']} ({r.get('source_file')} row {r.get('source_row')}): the stored "
                             f"target is not the training answer format prompts.candidate_contents builds "
                             f"(a --reasoning dataset?); evaluate it with --method generate")
        targets.append(t)
    out = [None] * len(rows)
    for start in tqdm(range(0, len(rows), batch_size), desc="scoring",
                      disable=not progress_bars_wanted(progress), leave=False):
        idx = list(range(start, min(start + batch_size, len(rows))))
        sums = sequence_logprobs(model, collator, [(rows[i]["prompt_ids"], t, rows[i]["image"])
                                                   for i in idx for t in targets[i]])
        k = 0
        for i in idx:
            letters = list(rows[i]["choices"])
            s = sums[k:k + len(letters)]
            norm = [a / b for a, b in zip(s, nbytes[i])]
            k += len(letters)
            out[i] = {"pred": letters[max(range(len(s)), key=s.__getitem__)],
                      "pred_norm": letters[max(range(len(norm)), key=norm.__getitem__)],
                      "logprob": {L: round(x, 4) for L, x in zip(letters, s)},
                      "logprob_norm": {L: round(x, 5) for L, x in zip(letters, norm)}}
    return out


def predict_generate(model, collator, tokenizer, rows, batch_size=16, max_new_tokens=96, progress=True):
    from tqdm.auto import tqdm
    from .modeling import progress_bars_wanted  # no bar fragments in logs

    from .encoding import assistant_turn
    from .evaluation import generated_prediction
    from .generation import GenerationSettings, generate_batch
    from .vision_collate import build_batch
    settings = GenerationSettings(do_sample=False, max_new_tokens=max_new_tokens)
    out = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["prompt_ids"]))
    for start in tqdm(range(0, len(order), batch_size), desc="generating",
                      disable=not progress_bars_wanted(progress), leave=False):
        idx = order[start:start + batch_size]
        feats = [{"image": rows[i]["image"]} for i in idx]
        inputs = build_batch([(rows[i]["prompt_ids"], None) for i in idx], collator.figures(feats),
                             collator.image_processor, collator.image_token_id, collator.pad_token_id,
                             collator.max_pixels, collator.mm_token_type_ids, left=True)
        for i, g in zip(idx, generate_batch(model, tokenizer, [], settings, inputs=inputs)):
            raw = assistant_turn(tokenizer.decode(rows[i]["prompt_ids"]), g.text)
            out[i] = generated_prediction(raw, rows[i]["choices"], g, len(rows[i]["prompt_ids"]))
    return out


def evaluate_vision_model(model, collator, tokenizer, rows, method="score", batch_size=16, letter_only=False,
                          max_new_tokens=96, progress=True):
    """(predictions, metrics) of one model on `rows`, figures as the collator gives them."""
    from .evaluation import check_eval_args, compute_metrics
    check_eval_args(method, batch_size)
    start = time.perf_counter()
    if method == "score":
        preds = predict_score(model, collator, tokenizer, rows, batch_size, letter_only, progress)
    else:
        preds = predict_generate(model, collator, tokenizer, rows, batch_size, max_new_tokens, progress)
    return preds, compute_metrics(rows, preds, time.perf_counter() - start, method)


def run_vision_evaluation(loaded, dataset_dir, split="test", num_samples=None, batch_size=16, method="score",
                          letter_only=False, max_new_tokens=None, output_dir=None, compare_base=False,
                          overwrite=False, blind=True, images=None, max_pixels=None, log=print) -> dict:
    """The whole --evaluate job for an image model; returns metrics.json's content."""
    from .evaluation import (DEFAULT_EVAL_MAX_NEW_TOKENS, check_output_dir, format_report, majority_baseline,
                             write_outputs)
    from .vision_infer import card_max_pixels
    from .vision_train import check_max_pixels, check_model_kind, make_collator
    if output_dir is not None:
        check_output_dir(output_dir, overwrite)
    if compare_base and not loaded.has_adapter:
        raise InputError("--compare_base needs --adapter (it compares the base model with the adapter)")
    rows, report = load_vision_rows(dataset_dir, split, num_samples)
    check_model_kind(report, True, dataset_dir, loaded.base)
    check_max_pixels(max_pixels)
    max_pixels = max_pixels or card_max_pixels(loaded.card)
    proc, tok = loaded.processor, loaded.processor.tokenizer
    real = make_collator(proc, loaded.model, report, max_pixels, images, dataset_dir)
    gray = make_collator(proc, loaded.model, report, max_pixels, images, dataset_dir, blank=True)
    name = "tuned" if loaded.has_adapter else "model"
    runs = ([("base", loaded.model.disable_adapter, real)] if compare_base else []) + [(name, nullcontext, real)]
    if blind:
        runs.append(("blind", nullcontext, gray))
    kw = dict(method=method, batch_size=batch_size, letter_only=letter_only,
              max_new_tokens=max_new_tokens or DEFAULT_EVAL_MAX_NEW_TOKENS)
    results, preds = {}, {}
    for key, ctx, collator in runs:
        log(f"evaluating {key}: {len(rows)} questions of split '{split}', method {method}"
            + (" (every figure replaced by a blank one)" if collator is gray else ""))
        with ctx():
            preds[key], results[key] = evaluate_vision_model(loaded.model, collator, tok, rows, **kw)
    baseline = majority_baseline(rows)
    print(format_report(results, baseline))
    metrics = {**results, "majority_baseline": baseline, "split": split, "dataset_dir": str(dataset_dir),
               "method": method, "letter_only": letter_only, "base_model": loaded.base,
               "adapter": str(loaded.adapter_dir) if loaded.adapter_dir else None,
               "quantization": loaded.quantization, "model_kind": "vision", "max_pixels": max_pixels,
               "blind_means": "the same model with every figure replaced by a uniform gray one of its size"}
    if output_dir is not None:
        records = []
        for r in rows:
            rec = {k: r.get(k) for k in ("index", "source_file", "source_row", "question", "choices", "image")}
            rec["gold"] = r["answer_label"]
            for key in results:
                rec[key] = {**preds[key][r["index"]], "correct": preds[key][r["index"]]["pred"] == r["answer_label"]}
            records.append(rec)
        write_outputs(output_dir, records, metrics, overwrite)
        log(f"wrote {output_dir}/predictions.jsonl and metrics.json")
    return metrics
