"""The rows of an installation check: `Check` (✓ pass / ! warn / ✗ fail, with its fix), the guard that
turns a crashing check into a ✗ row, and the table / JSON they are shown as. Used by `environment.py`
(the checks) and `smoke.py` (the end-to-end run), which therefore need not import each other.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

PASS, WARN, FAIL = "pass", "warn", "fail"
SYMBOLS = {PASS: "✓", WARN: "!", FAIL: "✗"}
INSTALL_FIX = "pip install -r requirements.txt"


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


def guarded(name: str, fn, fix: str = "") -> list[Check]:
    """Run one check; a crash inside it becomes a ✗ row, never a traceback."""
    try:
        return fn()
    except Exception as exc:  # a check must report, not crash the whole run
        return [Check(name, FAIL, f"{type(exc).__name__}: {' '.join(str(exc).split())[:240]}", fix)]


def summarize(rows: list[Check]) -> dict:
    counts = {s: sum(r.status == s for r in rows) for s in (PASS, WARN, FAIL)}
    return {"ok": counts[FAIL] == 0, "passed": counts[PASS], "warnings": counts[WARN], "failed": counts[FAIL]}


def format_table(rows: list[Check]) -> str:
    width = max(len(r.name) for r in rows)
    lines = []
    for r in rows:
        lines.append(f"  {SYMBOLS[r.status]} {r.name:<{width}}  {r.detail}")
        if r.fix:
            lines.append(f"    {'':<{width}}  fix: {r.fix}")
    s = summarize(rows)
    verdict = ("ready" + (" (warnings: fine for the tiny demo, see the ! lines for the 8B run)" if s["warnings"]
                          else "") if s["ok"] else "not ready: fix the ✗ lines above")
    plural = "" if s["warnings"] == 1 else "s"
    lines.append(f"\n{s['passed']} passed, {s['warnings']} warning{plural}, {s['failed']} failed: {verdict}")
    return "\n".join(lines)


def to_json(rows: list[Check], **extra) -> dict:
    return {**summarize(rows), **extra, "checks": [asdict(r) for r in rows]}
