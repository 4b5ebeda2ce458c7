"""GRPO rewards. ADD YOURS HERE: write a function and put it in `REWARDS`; `--rewards name:weight,...` picks
them (train/grpo.py), and the run card names each with its weight.

TRL calls every reward as `f(prompts, completions, completion_ids, **columns) -> list[float | None]`, one
value per completion; `columns` are the GRPO dataset's other columns, here `choices` (letter -> text; an
absent choice of a 2- or 3-choice row arrives as None) and `answer_label` (the gold letter after any
reshuffle). A completion arrives as `[{"role": "assistant", "content": text}]` because the prompts are
chat messages (so the chat template adds the one BOS), and it EXCLUDES the `<think>\\n` that the
generation prompt already opened: every reading here passes `prompt_opened_think`, and no reward may ask
the completion to start with `<think>` (it never does: such a reward is always 0, open-r1 #560).

All rewards read the answer with `format.answers.exact_match`, the metric the evaluation reports as
`accuracy` (strict): an exact `Answer: X. text` line after a closed think block, letter and text gold.
"""
from __future__ import annotations

from typing import Callable

from ..format.answers import exact_match

LENGTH_TARGET = 256  # reasoning characters at which the length reward is full


def completion_text(completion) -> str:
    """The text of a completion, whether a plain string or TRL's [{"role": "assistant", ...}] list."""
    return completion if isinstance(completion, str) else "".join(m.get("content") or "" for m in completion)


def readings(completions, choices, answer_label, opened: bool = True) -> list[dict]:
    """`exact_match` of each completion against its row's choices and gold letter."""
    return [exact_match(completion_text(c), {k: v for k, v in ch.items() if v}, gold, prompt_opened_think=opened)
            for c, ch, gold in zip(completions, choices, answer_label)]


def correct(prompts, completions, choices, answer_label, opened_think=None, **_):
    """1 for the strict answer (exact line, gold letter AND gold text), else 0: the headline metric."""
    return [float(r["strict"]) for r in readings(completions, choices, answer_label, _opened(opened_think))]


def format_ok(prompts, completions, choices, answer_label, opened_think=None, **_):
    """1 when the think block is closed exactly once and one answer line naming a choice ends the answer."""
    return [float(r["think_closed"] and r["one_line"])
            for r in readings(completions, choices, answer_label, _opened(opened_think))]


def length(prompts, completions, choices, answer_label, opened_think=None, **_):
    """Optional shaping toward reasoning: min(1, reasoning characters / LENGTH_TARGET), only for a correct,
    well-formed answer (so it never pays for rambling into a wrong one)."""
    return [min(1.0, r["reasoning_chars"] / LENGTH_TARGET) if r["strict"] and r["one_line"] else 0.0
            for r in readings(completions, choices, answer_label, _opened(opened_think))]


def _opened(flags) -> bool:
    """Whether the prompts opened the think block (a dataset column; absent: True, DeepSeek's template)."""
    return True if not flags else bool(flags[0])


REWARDS: dict[str, Callable] = {"correct": correct, "format_ok": format_ok, "length": length}  # key = function name (TRL logs it)
DEFAULT_WEIGHTS = {"correct": 1.0, "format_ok": 0.1, "length": 0.05}


def parse_rewards(spec: str) -> list[tuple[str, float]]:
    """`correct,format:0.1` -> [("correct", 1.0), ("format", 0.1)]; ValueError names an unknown reward."""
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, _, w = part.partition(":")
        if name not in REWARDS:
            raise ValueError(f"unknown reward '{name}' (known: {', '.join(REWARDS)}; add one in train/rewards.py)")
        try:
            out.append((name, float(w) if w else DEFAULT_WEIGHTS.get(name, 1.0)))
        except ValueError:
            raise ValueError(f"reward '{part}': the weight after ':' must be a number") from None
    if not out:
        raise ValueError("--rewards names no reward")
    return out
