"""`--compare_runs DIR DIR ...`: several evaluation folders side by side, on the questions they share.

Each DIR is an `--evaluate --output_dir` folder (metrics.json + predictions.jsonl). Every model in it
(`base`, `tuned`, `model`, `blind`) becomes a column named `<folder>:<model>`, e.g. the text-only R1
tuned run beside the image base, image tuned and blind runs. Questions are matched by their source
(CSV file name + data row), so a text dataset and an image dataset preprocessed from the same CSV line
up; only the rows every folder evaluated are counted, and the table says how many that is of each.
A question whose gold letter differs between folders means they are not the same data: one-line error.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import InputError


def _read_folder(d: Path) -> tuple[dict, list[dict]]:
    m, p = d / "metrics.json", d / "predictions.jsonl"
    if not m.is_file() or not p.is_file():
        raise InputError(f"'{d}' is not an evaluation folder (needs metrics.json and predictions.jsonl from "
                         f"inference_example.py --evaluate --output_dir)")
    try:
        metrics = json.loads(m.read_text())
        records = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except ValueError as exc:
        raise InputError(f"'{d}': unreadable metrics.json or predictions.jsonl ({exc})") from None
    return metrics, records


def _key(rec: dict) -> tuple:
    return (rec.get("source_file"), rec.get("source_row"), rec.get("question"))


def _labels(dirs: list[Path]) -> list[str]:
    """Folder names, with their parent's name added where two would read the same."""
    names = [d.name or str(d) for d in dirs]
    return [f"{d.parent.name}/{d.name}" if names.count(n) > 1 else n for d, n in zip(dirs, names)]


def compare_runs(folders) -> str:
    from .metrics import compute_metrics, format_report, majority_baseline
    dirs = [Path(f) for f in folders]
    if len(dirs) < 1:
        raise InputError("--compare_runs needs at least one evaluation folder")
    seen: dict = {}
    for d in dirs:  # the same folder twice would silently merge its columns
        other = seen.setdefault(d.resolve(), d)
        if other is not d:
            raise InputError(f"--compare_runs got the same folder twice ('{other}' and '{d}'); pass each run once")
    loaded = [_read_folder(d) for d in dirs]
    keyed = [{_key(r): r for r in recs} for _, recs in loaded]
    common = set(keyed[0])
    for k in keyed[1:]:
        common &= set(k)
    if not common:
        raise InputError("the evaluation folders share no question (matched by source file, row and question)")
    order = sorted(common, key=lambda k: (str(k[0]), k[1] if isinstance(k[1], int) else -1, str(k[2])))
    for d, k in zip(dirs, keyed):
        bad = next((q for q in order if k[q]["gold"] != keyed[0][q]["gold"]), None)
        if bad is not None:
            raise InputError(f"'{d}' and '{dirs[0]}' disagree on the gold letter of {bad[0]} row {bad[1]}: "
                             f"not the same test data")
    rows = [{"answer_label": keyed[0][q]["gold"]} for q in order]
    results = {}
    for label, d, (metrics, _), k in zip(_labels(dirs), dirs, loaded, keyed):
        models = [m for m, v in metrics.items() if isinstance(v, dict) and "accuracy" in v and "n" in v]
        for m in models:
            preds = [{"pred": None, "pred_norm": None, **(k[q].get(m) or {})} for q in order]
            results[f"{label}:{m}"] = compute_metrics(rows, preds, 0.0, metrics[m].get("method", "score"),
                                                      max_new_tokens=metrics[m].get("max_new_tokens"))
    head = (f"{len(order)} questions evaluated by every folder (of "
            + ", ".join(f"{lab} {len(k)}" for lab, k in zip(_labels(dirs), keyed)) + ")")
    return head + "\n" + format_report(results, majority_baseline(rows))
