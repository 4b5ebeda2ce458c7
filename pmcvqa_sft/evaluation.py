"""`--evaluate`: accuracy on a preprocessed split, by choice scoring (default) or by generation.

- score: `answers.score_choices`, one forward pass per batch of questions, no generation. The
  prediction is the choice with the highest summed log-probability; the byte-normalised variant
  (lm-eval's `acc_bytes`, not its per-character `acc_norm`) is reported as `accuracy_norm`.
- generate: greedy, batched, left-padded generation (`generation.generate_ids`), then
  `answers.extract_answer`; answers it can't parse count as wrong and are reported as unparseable.
  An answer states a letter and (in the trained format) the choice text after it; the two are read
  separately: `accuracy_letter` (the letter is the gold one), `accuracy_text` (the choice the text names,
  or the letter when no choice text is written, is the gold one) and the headline `accuracy`, strict: the
  letter is the gold one AND the text, when it names a choice, names that same one.
  `letter_text_conflict` counts answers whose letter and text name different choices (`Answer: D.
  Ultrasound` with Ultrasound = A); they are never right under `accuracy`.
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

import json
import math
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

from . import prompts
from .answers import ScoreItem, extract_answer, score_choices
from .encoding import IGNORE_INDEX, PromptEncoder, assistant_turn, render_prompt, template_hash, tokenizer_hash
from .dataset_io import load_processed, row_choices
from . import atomic
from .atomic import atomic_dir
from .errors import InputError
from .generation import GenerationSettings, generate_ids

NEED_COLUMNS = ("question", "choices", "answer_label")
DEFAULT_EVAL_MAX_NEW_TOKENS = 96


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    p = correct / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


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


def majority_baseline(rows: Sequence[dict]) -> dict:
    counts = Counter(r["answer_label"] for r in rows)
    letter, n = max(sorted(counts.items()), key=lambda kv: kv[1])
    return {"letter": letter, "accuracy": n / len(rows), "gold_counts": dict(sorted(counts.items()))}


def _user_text(row: dict, include_caption: bool = False) -> str:
    caption = row.get("caption") if include_caption else None
    return prompts.format_user_prompt(row["question"], row["choices"], caption or None)


def predict_score(model, tokenizer, rows, batch_size=16, letter_only=False, system_prompt=None,
                  progress=True, include_caption=False) -> list[dict]:
    items = [ScoreItem(_user_text(r, include_caption), r["choices"], r.get("prompt_ids")) for r in rows]
    scores = score_choices(model, tokenizer, items, batch_size=batch_size, letter_only=letter_only,
                           system_prompt=system_prompt, progress=progress)
    return [{"pred": s.letter, "pred_norm": s.letter_norm,
             "logprob": dict(zip(s.letters, [round(x, 4) for x in s.logprob])),
             "logprob_norm": dict(zip(s.letters, [round(x, 5) for x in s.logprob_norm]))} for s in scores]


def predict_generate(model, tokenizer, rows, batch_size=16, max_new_tokens=DEFAULT_EVAL_MAX_NEW_TOKENS,
                     system_prompt=None, progress=True, include_caption=False) -> list[dict]:
    from tqdm.auto import tqdm
    from .modeling import progress_bars_wanted  # no bar fragments in logs
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
        for i, g in zip(idx, generate_ids(model, tokenizer, [enc[i] for i in idx], settings)):
            # the prompt's last tokens tell whether it opened the think block (DeepSeek's `<think>\n`)
            raw = assistant_turn(tokenizer.decode(enc[i][-8:], skip_special_tokens=False), g.text)
            out[i] = generated_prediction(raw, rows[i]["choices"], g, len(enc[i]))
    return out  # type: ignore[return-value]


def generated_prediction(raw: str, choices, g, prompt_tokens: int) -> dict:
    """One generated answer as a prediction record: `pred` is the strict letter (letter right and its
    text, when given, names the same choice), beside the letter alone, the text alone and the conflict."""
    ext = extract_answer(raw, choices)
    return {"pred": ext.strict_letter, "pred_letter": ext.letter, "pred_text": ext.text_letter or ext.letter,
            "conflict": ext.conflict, "output": g.text, "extraction": ext.method,
            "finished": g.finished, "new_tokens": len(g.token_ids), "prompt_tokens": prompt_tokens}


def compute_metrics(rows, preds, seconds: float, method: str) -> dict:
    n = len(rows)
    golds = [r["answer_label"] for r in rows]
    correct = sum(p["pred"] == g for p, g in zip(preds, golds))
    lo, hi = wilson_interval(correct, n)
    letters = sorted(set(golds) | {p["pred"] for p in preds if p["pred"]})
    per_letter, confusion = {}, {}
    for letter in sorted(set(golds)):
        idx = [i for i, g in enumerate(golds) if g == letter]
        ok = sum(preds[i]["pred"] == letter for i in idx)
        per_letter[letter] = {"n": len(idx), "correct": ok, "accuracy": ok / len(idx)}
        row = Counter(_shown(preds[i]) for i in idx)
        confusion[letter] = {k: row.get(k, 0) for k in letters + (["conflict"] if method == "generate" else [])
                             + ["none"]}
    unparseable = sum(p["pred"] is None and not p.get("conflict") for p in preds)
    m = {"method": method, "n": n, "correct": correct, "accuracy": correct / n, "ci95": [lo, hi],
         "unparseable": unparseable, "unparseable_rate": unparseable / n, "per_letter": per_letter,
         "confusion": confusion, "pred_counts": dict(Counter(_shown(p) for p in preds)),
         "seconds": seconds, "questions_per_s": n / seconds if seconds > 0 else None}
    if method == "generate":  # the letter and the choice text, read separately (module docstring)
        conflicts = [(p, g) for p, g in zip(preds, golds) if p["conflict"]]
        m["accuracy_definition"] = "strict: letter right and, when a choice text is written, it names the same choice"
        m["accuracy_letter"] = sum(p["pred_letter"] == g for p, g in zip(preds, golds)) / n
        m["accuracy_text"] = sum(p["pred_text"] == g for p, g in zip(preds, golds)) / n
        m["letter_text_conflict"] = len(conflicts)
        m["conflict_letter_right"] = sum(p["pred_letter"] == g for p, g in conflicts)
        m["conflict_text_right"] = sum(p["pred_text"] == g for p, g in conflicts)
    if method == "score":
        m["accuracy_norm"] = sum(p["pred_norm"] == g for p, g in zip(preds, golds)) / n
    return m


def _shown(pred: dict) -> str:
    """A prediction's column in the confusion matrix / predicted-letter counts."""
    return pred["pred"] or ("conflict" if pred.get("conflict") else "none")


def check_eval_args(method: str, batch_size: int) -> None:
    if method not in ("score", "generate"):
        raise InputError(f"unknown --method '{method}': choose score or generate")
    if batch_size < 1:
        raise InputError(f"--batch_size must be at least 1, got {batch_size}")


def evaluate_model(model, tokenizer, rows, method="score", batch_size=16, letter_only=False,
                   max_new_tokens=DEFAULT_EVAL_MAX_NEW_TOKENS, system_prompt=None, progress=True,
                   include_caption=False):
    """(predictions, metrics) of one model on `rows` (prompts built as the preprocessor built them)."""
    check_eval_args(method, batch_size)
    start = time.perf_counter()
    if method == "score":
        preds = predict_score(model, tokenizer, rows, batch_size, letter_only, system_prompt, progress,
                              include_caption)
    else:
        preds = predict_generate(model, tokenizer, rows, batch_size, max_new_tokens, system_prompt, progress,
                                 include_caption)
    seconds = time.perf_counter() - start
    return preds, compute_metrics(rows, preds, seconds, method)


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


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_report(results: dict[str, dict], baseline: dict) -> str:
    """A side-by-side table of one or more models' metrics (columns = models)."""
    names = list(results)
    table: list[tuple[str, list[str]]] = []

    def row(label, fn):
        table.append((label, [fn(results[n]) for n in names]))

    row("questions", lambda m: str(m["n"]))
    strict = any("accuracy_letter" in m for m in results.values())
    row("accuracy (strict)" if strict else "accuracy", lambda m: _pct(m["accuracy"]))
    row("  95% CI (Wilson)", lambda m: f"{100 * m['ci95'][0]:.1f}-{100 * m['ci95'][1]:.1f}")
    if any("accuracy_norm" in m for m in results.values()):
        row("accuracy (length-norm.)", lambda m: _pct(m.get("accuracy_norm")))
    row("unparseable", lambda m: _pct(m["unparseable_rate"]))
    if strict:
        row("accuracy by letter only", lambda m: _pct(m.get("accuracy_letter")))
        row("accuracy by text only", lambda m: _pct(m.get("accuracy_text")))
        row("letter/text conflicts", lambda m: f"{m['letter_text_conflict']} (letter right "
            f"{m['conflict_letter_right']}, text right {m['conflict_text_right']})" if "letter_text_conflict"
            in m else "-")
    for letter in sorted(baseline["gold_counts"]):
        row(f"accuracy on gold {letter}", lambda m, L=letter: _pct(m["per_letter"].get(L, {}).get("accuracy")))
    row("predicted letters", lambda m: " ".join(f"{k}{v}" for k, v in sorted(m["pred_counts"].items())))
    row("questions/s", lambda m: f"{m['questions_per_s']:.1f}" if m["questions_per_s"] else "-")
    w = max(len(c) for _, cells in table for c in cells + names) + 3
    lines = [f"{'metric':<26}" + "".join(f"{n:>{w}}" for n in names)]
    lines += [f"{label:<26}" + "".join(f"{c:>{w}}" for c in cells) for label, cells in table]
    lines.append(f"majority-letter baseline: always '{baseline['letter']}' = {_pct(baseline['accuracy'])} "
                 f"(gold letters {baseline['gold_counts']})")
    for n in names:
        conf = results[n]["confusion"]
        cols = list(next(iter(conf.values())))
        lines.append(f"confusion ({n}; rows gold, columns predicted): " + "  ".join(
            f"{g}:[" + " ".join(f"{c}={conf[g][c]}" for c in cols) + "]" for g in conf))
    return "\n".join(lines)


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
                   overwrite=False, data=None, log=print) -> dict:
    """The whole --evaluate job on a loaded model; returns metrics.json's content.

    `data`: (rows, report) from `load_eval_rows`, when the caller checked the dataset already.
    """
    if output_dir is not None:
        check_output_dir(output_dir, overwrite)  # fail before the slow part
    if compare_base and not loaded.has_adapter:
        raise InputError("--compare_base needs --adapter (it compares the base model with the adapter)")
    rows, report = data or load_eval_rows(dataset_dir, split, num_samples)
    if method == "score" and report.get("reasoning") == "brief":
        # the model was trained to write a rationale before the answer; scoring the answer after an
        # empty think block would measure a format it never saw
        raise InputError(f"dataset '{dataset_dir}' was preprocessed with --reasoning brief: evaluate it with "
                         f"--method generate (--method score assumes an empty think block)")
    system_prompt, include_caption = dataset_prompt_settings(report, loaded.system_prompt)
    prompts_used = use_trained_prompts(rows, report, loaded.tokenizer, system_prompt, include_caption, log)
    kw = dict(method=method, batch_size=batch_size, letter_only=letter_only, system_prompt=system_prompt,
              max_new_tokens=max_new_tokens or DEFAULT_EVAL_MAX_NEW_TOKENS, include_caption=include_caption)
    runs = [("base", loaded.model.disable_adapter), ("tuned", nullcontext)] if compare_base else \
        [("tuned" if loaded.has_adapter else "model", nullcontext)]
    results, preds = {}, {}
    for name, ctx in runs:
        log(f"evaluating {name}: {len(rows)} questions of split '{split}', method {method}")
        with ctx():
            preds[name], results[name] = evaluate_model(loaded.model, loaded.tokenizer, rows, **kw)
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
               "quantization": loaded.quantization}
    if output_dir is not None:
        records = []
        for i, r in enumerate(rows):
            rec = {k: r.get(k) for k in ("index", "source_file", "source_row", "question", "choices", "truncated")}
            rec["gold"] = r["answer_label"]
            for name in results:
                rec[name] = {**preds[name][i], "correct": preds[name][i]["pred"] == r["answer_label"]}
            records.append(rec)
        write_outputs(output_dir, records, metrics, overwrite)
        log(f"wrote {output_dir}/predictions.jsonl and metrics.json")
    return metrics
