"""The numbers of an evaluation: accuracy with its 95 % interval, the majority-letter baseline, per-letter
accuracy, the confusion matrix, generated answers read as letter and text, and the side-by-side table.

Generated answers state a letter and (in the trained format) the choice text after it; the two are read
separately: `accuracy_letter` (the letter is the gold one), `accuracy_text` (the choice the text names, or
the letter when no choice text is written, is the gold one) and the headline `accuracy`, strict: the
letter is the gold one AND the text, when it names a choice, names that same one.
`letter_text_conflict` counts answers whose letter and text name different choices (`Answer: D.
Ultrasound` with Ultrasound = A); they are never right under `accuracy`.
"""
from __future__ import annotations

from collections import Counter
import math
from typing import Sequence

from ..format.answers import extract_answer


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    p = correct / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def majority_baseline(rows: Sequence[dict]) -> dict:
    counts = Counter(r["answer_label"] for r in rows)
    letter, n = max(sorted(counts.items()), key=lambda kv: kv[1])
    return {"letter": letter, "accuracy": n / len(rows), "gold_counts": dict(sorted(counts.items()))}


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
