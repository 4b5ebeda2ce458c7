"""The numbers of an evaluation: accuracy with its 95 % interval, the majority-letter baseline, per-letter
accuracy, the confusion matrix, generated answers read as letter and text, and the side-by-side table.

Generated answers are read EXACTLY (`format.answers.exact_match`): only an answer line in the trained
format (`Answer: B. Magnetic resonance imaging`, prompts.ANSWER_TEMPLATE) after a closed think block
counts. The headline `accuracy` is strict: that line's letter is the gold one AND its text is the gold
choice's text. Beside it: `accuracy_letter` (the line's letter is gold), `accuracy_text` (the line's text
names the gold choice), `parsed_rate` (an answer line whose letter is a choice and whose text names one
choice), `letter_text_conflict` (parsed lines whose letter and text name different choices, `Answer: D.
Ultrasound` with Ultrasound = A: never right). A bare choice text, a missing line or a text that names no
choice is not parsed. The lenient reader (`extract_answer`: `**B**`, `(B)`, a lone choice text, ...) is
reported apart as `accuracy_lenient`, labelled as a fallback, never as the accuracy.
Reasoning: `think_closed_rate`, `cut_by_budget` (generation stopped by max_new_tokens before EOS),
`mean_reasoning_tokens` (format.answers.reasoning_text: the think block's text, or the text before the
answer line for templates without think tokens; the rationale report counts the same way) and the budget
itself (`max_new_tokens`).
"""
from __future__ import annotations

from collections import Counter
import math
from typing import Sequence

from ..format.answers import exact_match, extract_answer


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


def generated_prediction(raw: str, choices, g, prompt_tokens: int, reasoning_tokens: int | None = None) -> dict:
    """One generated answer (`raw`: the whole assistant turn, the prompt's `<think>\\n` included) as a
    prediction record: `pred` is the strict letter (an exact answer line whose letter and text name the
    same choice), beside the line's letter, its text's choice, and the lenient fallback reading."""
    ex = exact_match(raw, choices)
    lenient = extract_answer(raw, choices)
    parsed = ex["parsed"]
    return {"pred": ex["letter"] if parsed and ex["letter"] == ex["text_letter"] else None,
            "pred_letter": ex["letter"] if parsed else None, "pred_text": ex["text_letter"] if parsed else None,
            "parsed": parsed, "conflict": parsed and ex["letter"] != ex["text_letter"],
            "pred_lenient": lenient.strict_letter, "extraction": lenient.method,
            "think_closed": ex["think_closed"], "one_line": ex["one_line"], "output": g.text,
            "finished": g.finished, "new_tokens": len(g.token_ids), "prompt_tokens": prompt_tokens,
            "reasoning_tokens": reasoning_tokens}


def compute_metrics(rows, preds, seconds: float, method: str, max_new_tokens: int | None = None) -> dict:
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
    if method == "generate":  # no exact answer line
        unparseable = sum(not p.get("parsed", p["pred"] is not None or p.get("conflict")) for p in preds)
    m = {"method": method, "n": n, "correct": correct, "accuracy": correct / n, "ci95": [lo, hi],
         "unparseable": unparseable, "unparseable_rate": unparseable / n, "per_letter": per_letter,
         "confusion": confusion, "pred_counts": dict(Counter(_shown(p) for p in preds)),
         "seconds": seconds, "questions_per_s": n / seconds if seconds > 0 else None}
    if method == "generate":  # the letter and the choice text, read separately (module docstring)
        conflicts = [(p, g) for p, g in zip(preds, golds) if p["conflict"]]
        m["accuracy_definition"] = ("strict: an exact answer line (prompts.ANSWER_TEMPLATE) after a closed think "
                                    "block, its letter the gold one and its text the gold choice's text")
        m["accuracy_letter"] = sum(p["pred_letter"] == g for p, g in zip(preds, golds)) / n
        m["accuracy_text"] = sum(p["pred_text"] == g for p, g in zip(preds, golds)) / n
        m["parsed_rate"] = 1 - unparseable / n
        if all("pred_lenient" in p for p in preds):
            m["accuracy_lenient"] = sum(p["pred_lenient"] == g for p, g in zip(preds, golds)) / n
            m["lenient_definition"] = ("fallback only, not the accuracy: any readable letter (bare choice text, "
                                       "**B**, (B), ...) whose text, if any, names the same choice")
        if all("think_closed" in p for p in preds):
            m["think_closed_rate"] = sum(bool(p["think_closed"]) for p in preds) / n
        if all("finished" in p for p in preds):
            m["cut_by_budget"] = sum(not p["finished"] for p in preds)
            m["cut_by_budget_rate"] = m["cut_by_budget"] / n
        reasoning = [p["reasoning_tokens"] for p in preds if p.get("reasoning_tokens") is not None]
        m["mean_reasoning_tokens"] = sum(reasoning) / len(reasoning) if reasoning else None
        m["max_new_tokens"] = max_new_tokens
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
        row("parsed (exact answer line)", lambda m: _pct(m.get("parsed_rate")))
        row("accuracy by letter only", lambda m: _pct(m.get("accuracy_letter")))
        row("accuracy by text only", lambda m: _pct(m.get("accuracy_text")))
        row("lenient reading (fallback)", lambda m: _pct(m.get("accuracy_lenient")))
        row("think block closed", lambda m: _pct(m.get("think_closed_rate")))
        row("cut by the token budget", lambda m: "-" if m.get("cut_by_budget") is None else
            f"{m['cut_by_budget']} of {m['n']}" + (f" (budget {m['max_new_tokens']})" if m.get("max_new_tokens") else ""))
        row("mean reasoning tokens", lambda m: "-" if m.get("mean_reasoning_tokens") is None
            else f"{m['mean_reasoning_tokens']:.1f}")
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
