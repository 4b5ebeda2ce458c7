"""Reading the model's answer: letter extraction from generated text, and choice scoring.

Two ways to get a multiple-choice prediction:
- `extract_answer(text, choices)`: parse free text the model generated. The think block is ignored
  (a letter inside the reasoning is not an answer); the answer part is matched against, in order,
  `\\boxed{B}`, the trained answer line (its pattern is built from `prompts.ANSWER_TEMPLATE*`, so an
  edited wording is still parsed) or `Answer: B` / `the answer is (B)`, `**B**`, `(B)`, a leading
  `B.` / `B)` / lone `B`, `option B`, and finally the text of exactly one choice. Anything else is
  unparseable (letter None). The letter and the choice text written after it are returned separately
  (`letter`, `text_letter`); when they disagree the extraction is a `conflict`.
- `exact_match(text, choices, gold)`: the exact reading behind the headline accuracy and the GRPO
  rewards (below): only an answer line in the trained format, after a closed think block, counts.
- choice scoring (no generation, no parsing) is evaluate/scoring.py's `score_choices`.
"""
from __future__ import annotations

from dataclasses import dataclass
import functools
import re
import string
from typing import Mapping

from .. import prompts

LETTER_SET = prompts.LETTERS

# ---------------------------------------------------------------------------------------------------
# extraction
# ---------------------------------------------------------------------------------------------------


@dataclass
class Extraction:
    letter: str | None          # the letter the answer states (from the choice text when it states no
                                # letter); None = unparseable
    method: str                 # which rule matched ("none" when unparseable)
    answer_text: str            # the text after the think block
    reasoning: str              # the text inside the think block
    text_letter: str | None = None  # the choice whose whole text is written after the letter, if any
    stated_text: str = ""       # what is written after the letter (`Answer: B. <this>`)

    @property
    def conflict(self) -> bool:
        """`Answer: D. Ultrasound` where Ultrasound is choice A: the letter and the text disagree."""
        return bool(self.letter and self.text_letter and self.text_letter != self.letter)

    @property
    def strict_letter(self) -> str | None:
        """The letter, unless the text names another choice (then no answer: it is self-contradictory)."""
        return None if self.conflict else self.letter


def split_reasoning(text: str) -> tuple[str, str, bool]:
    """(reasoning, answer part, think_closed). An unclosed `<think>` means the answer never came."""
    open_tag, close_tag = prompts.THINK_OPEN.strip(), prompts.THINK_CLOSE
    if close_tag in text:
        before, _, after = text.rpartition(close_tag)
        reasoning = before.split(open_tag, 1)[1] if open_tag in before else before
        return reasoning.strip(), after.strip(), True
    if open_tag in text:
        return text.split(open_tag, 1)[1].strip(), "", False
    return "", text.strip(), True


def reasoning_text(text: str) -> str:
    """The reasoning of a generated assistant turn (`text`: the whole turn, the prompt's `<think>\\n`
    included), the one definition behind every reasoning-token count (the evaluation's
    `mean_reasoning_tokens`, the rationale report's): the think block's text, all of it when the block never
    closed; for a turn without think tokens (Qwen2.5-VL) the text before its last answer line, all of it
    when it has none. Stripped of the blank lines around it, so an empty think block is ""."""
    if prompts.THINK_OPEN.strip() in text or prompts.THINK_CLOSE in text:
        return split_reasoning(text)[0]
    starts = [m.start() for t in (prompts.ANSWER_TEMPLATE, prompts.ANSWER_TEMPLATE_LETTER_ONLY)
              for m in _template_pattern(t).finditer(text)]
    return (text[:max(starts)] if starts else text).strip()


def reasoning_tokens(tokenizer, text: str) -> int:
    """Tokens of `reasoning_text(text)` alone, counted with `tokenizer` (no special tokens added)."""
    why = reasoning_text(text)
    return len(tokenizer(why, add_special_tokens=False)["input_ids"]) if why else 0


_LC = f"[{re.escape(LETTER_SET)}]"  # the choice letters (prompts.LETTERS), as a regex class
_L = f"((?-i:{_LC}))"  # upper case even under IGNORECASE: "the answer is a tumor" is not choice A
_END = r"(?![A-Za-z0-9])"  # the letter stands alone: "B" but not "Both" or "B12"
_BOXED = re.compile(r"\\boxed\s*\{\s*(?:\\text\s*\{\s*)?\(?" + _L + _END)
_ANSWER_LINE = re.compile(
    r"answer\s*(?:is|:|=|-)?\s*(?:[:\-]\s*)?(?:\*\*|__)?\s*(?:option|choice)?\s*[\(\[\{]?\s*(?:\*\*)?"
    # a lower-case letter only when nothing follows it ("answer: c"), never "answer is a tumor"
    + r"(?:" + _L + _END + r"|((?-i:" + _LC.lower() + r"))(?=\s*(?:[\.\):,]|$)))", re.IGNORECASE | re.MULTILINE)
# Looser forms, tried only when the answer states no boxed letter or answer line.
_RULES: list[tuple[str, re.Pattern]] = [
    ("bold", re.compile(r"\*\*\s*\(?" + _L + r"\)?\s*[\.\):]?\s*" + _END)),
    ("paren", re.compile(r"[\(\[]\s*" + _L + r"\s*[\)\]]")),
    ("letter_start", re.compile(r"^\s*(?:[\"'`*_]\s*)*" + _L + r"\s*(?:[\.\):,]|$|\s+-\s)", re.MULTILINE)),
    ("option", re.compile(r"(?:option|choice)\s+" + _L + _END, re.IGNORECASE)),
]

# Any letter used as a choice marker ("B)", "(B)", "C.") - a loose match with a second one is ambiguous.
_MARKER = re.compile(r"(?<![A-Za-z0-9])(?:\((" + _LC + r")\)|(" + _LC + r")[\.\):](?=\s|$))")


@functools.lru_cache(maxsize=8)
def _template_pattern(template: str) -> re.Pattern:
    """An answer-line template of prompts.py (`Answer: {letter}. {text}`) as a regex: its words literal
    (case-insensitive, any spacing), `{letter}` an upper-case choice letter, `{text}` the rest of the line."""
    parts = []
    for literal, name, _spec, _conv in string.Formatter().parse(template):
        parts += [r"\s*" if piece.isspace() else re.escape(piece) for piece in re.split(r"(\s+)", literal) if piece]
        if name == "letter":
            parts.append(r"(?P<letter>(?-i:" + _LC + r"))" + _END)
        elif name == "text":
            parts.append(r"(?P<text>[^\n]*[^\s*])")
        elif name is not None:
            raise ValueError(f"answer template {template!r}: unknown field {{{name}}} (use {{letter}}, {{text}})")
    return re.compile("".join(parts), re.IGNORECASE)


def _norm(s: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", s.lower()).split())


def _letters_of(pattern: re.Pattern, text: str) -> list[str]:
    return [next(g for g in m.groups() if g).upper() for m in pattern.finditer(text)]


def _final_answer(answer: str, valid) -> tuple[str, str, str | None] | None:
    """(rule, letter, text written after it or None) of the answer's stated final answer: a `\\boxed{B}`,
    else its last answer line, in the trained format (prompts.ANSWER_TEMPLATE*) or a common wording
    (`Answer: B`, `the answer is (B)`): a restated final answer wins."""
    boxed = [x for x in _letters_of(_BOXED, answer) if x in valid]
    if boxed:
        return "boxed", boxed[-1], None
    hits = []  # (position, has text, letter, text)
    for m in _template_pattern(prompts.ANSWER_TEMPLATE).finditer(answer):
        hits.append((m.start(), 1, m["letter"], m.groupdict().get("text")))
    for m in _template_pattern(prompts.ANSWER_TEMPLATE_LETTER_ONLY).finditer(answer):
        hits.append((m.start(), 0, m["letter"], None))
    for m in _ANSWER_LINE.finditer(answer):
        hits.append((m.start(), 0, next(g for g in m.groups() if g).upper(), None))
    hits = [h for h in hits if h[2] in valid]
    if not hits:
        return None
    _pos, _has, letter, text = max(hits, key=lambda h: h[:2])
    return "answer_line", letter, text


def _text_after_letter(answer: str, letter: str) -> str:
    """`Answer: B. Magnetic resonance imaging` / `B) Magnetic ...` -> `Magnetic resonance imaging`
    (first line only; the trained template first, then the common `<letter>.`/`)`/`:` forms)."""
    texts = [m["text"] for m in _template_pattern(prompts.ANSWER_TEMPLATE).finditer(answer)
             if m["letter"] == letter and m.groupdict().get("text")]
    if texts:
        return texts[-1].strip()
    m = re.search(rf"(?:answer\s*(?:is)?\s*:?\s*|^\W*)\(?{letter}\)?\s*[\.\):]\s*([^\n]+)", answer,
                  re.IGNORECASE | re.MULTILINE)
    return m.group(1).strip(" *_") if m else ""


def _exact_choice(text: str, choices: Mapping[str, str]) -> str | None:
    """The one choice whose whole text equals `text` (normalised), else None."""
    t = _norm(text)
    hits = [k for k, v in choices.items() if v and _norm(v) == t]
    return hits[0] if len(hits) == 1 else None


def _by_choice_text(answer: str, choices: Mapping[str, str]) -> str | None:
    """The one choice whose text the answer is (or contains); None when zero or several match."""
    a = _norm(answer)
    if not a:
        return None
    texts = {k: _norm(v) for k, v in choices.items() if v}
    exact = [k for k, t in texts.items() if t and t == a]
    if len(exact) == 1:
        return exact[0]
    hits = [k for k, t in texts.items() if t and re.search(rf"(?:^| ){re.escape(t)}(?: |$)", a)]
    # a choice text that is part of another ("Lung" in "Lung cancer") must not count twice
    hits = [k for k in hits if not any(k != j and texts[k] in texts[j] for j in hits)]
    return hits[0] if len(hits) == 1 else None


def extract_answer(text: str, choices: Mapping[str, str] | None = None) -> Extraction:
    """The letter the model chose in `text` (a whole assistant turn, think block included or not).

    `letter` is the letter the answer states; `text_letter` the choice whose whole text is written
    after it. When the two disagree (`Answer: D. Ultrasound`, Ultrasound being A) `conflict` is true:
    the evaluation counts such an answer right only by its letter AND its text, never by one alone.
    """
    reasoning, answer, closed = split_reasoning(text)
    if not closed or not answer:
        return Extraction(None, "none", answer, reasoning)
    valid = set(choices) if choices else set(LETTER_SET)

    def found(letter: str, method: str, stated: str | None = None) -> Extraction:
        stated = _text_after_letter(answer, letter) if stated is None else stated.strip()
        named = _exact_choice(stated, choices) if choices and stated else None
        return Extraction(letter, method, answer, reasoning, named, stated)

    final = _final_answer(answer, valid)
    if final:
        return found(final[1], final[0], final[2])
    for name, pattern in _RULES:
        letters = [x for x in _letters_of(pattern, answer) if x in valid]
        if not letters:
            continue
        markers = {x for x in _letters_of(_MARKER, answer) if x in valid}
        if len(set(letters) | markers) == 1:
            return found(letters[0], name)
        break  # conflicting loose matches ("A) ... or B)"): fall through to the choice text
    if choices:
        letter = _by_choice_text(answer, choices)
        if letter:
            return Extraction(letter, "choice_text", answer, reasoning, letter, answer)
    return Extraction(None, "none", answer, reasoning)


def answer_text_after_letter(answer: str, letter: str, choices: Mapping[str, str] | None) -> str:
    """The choice text for `letter` (from `choices`, else what follows `Answer: B.` in the answer)."""
    if choices and letter in choices:
        return choices[letter]
    return _text_after_letter(answer, letter)


# ---------------------------------------------------------------------------------------------------
# The exact answer metric, shared by evaluation (`accuracy`, the headline) and the GRPO rewards.
#
# `exact_match(completion, choices, gold_letter)` reads ONE thing: an answer line written exactly in the
# prompts.ANSWER_TEMPLATE format (`Answer: B. Magnetic resonance imaging`), alone on its line, after a
# closed think block. Nothing else counts: a bare choice text, `**B**`, `(B)`, a line whose text names no
# choice, an answer inside the think block, or an unclosed think block are all "not parsed". Why so
# strict: a lenient reader can be met by a degenerate answer (a GRPO run learned to write
# `</think>: C. Jugular vein: C. ...` with no answer line, which the lenient reader scored as C).
#     strict     the last answer line has the gold letter AND its text is the gold choice's (normalised)
#     letter_ok  the last answer line's letter is the gold letter;  text_ok  its text is the gold text
#     parsed     an answer line exists whose letter is a choice and whose text names exactly one choice
#     think_closed  the think block was closed (True when the text opens none: Qwen-style models)
#     one_line   exactly one answer line, nothing after it, one `</think>`: the format reward's test
# `completion` is the whole assistant turn: for prompts ending `<think>\\n` prepend it (`assistant_turn`)
# or pass prompt_opened_think=True. The lenient `extract_answer` above stays, reported apart as a fallback.
# ---------------------------------------------------------------------------------------------------



def norm_text(s: str) -> str:
    """Case, punctuation and spacing removed: `' Magnetic  resonance-imaging.'` -> `magnetic resonance imaging`."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", s.lower()).split())


def answer_line_pattern(template: str | None = None) -> re.Pattern:
    """See _pattern; `template` None = prompts.ANSWER_TEMPLATE as it is now (an edit counts)."""
    return _pattern(template or prompts.ANSWER_TEMPLATE)


@functools.lru_cache(maxsize=8)
def _pattern(template: str) -> re.Pattern:
    """prompts.ANSWER_TEMPLATE as a whole-line regex: its words literal (spaces may be 1+ spaces/tabs),
    `{letter}` one upper-case choice letter, `{text}` the rest of the line. Anchored at both line ends."""
    parts = []
    for literal, name, _spec, _conv in string.Formatter().parse(template):
        for piece in re.split(r"(\s+)", literal):
            if piece:
                parts.append(r"[ \t]+" if piece.isspace() else re.escape(piece))
        if name == "letter":
            parts.append(r"(?P<letter>" + _LC + r")")
        elif name == "text":
            parts.append(r"(?P<text>[^\n]*?)")
        elif name is not None:
            raise ValueError(f"answer template {template!r}: unknown field {{{name}}} (use {{letter}}, {{text}})")
    return re.compile(r"^[ \t]*" + "".join(parts) + r"[ \t]*$", re.MULTILINE)


def split_think(text: str, prompt_opened_think: bool = False) -> tuple[str, str, bool]:
    """(reasoning, answer part, think_closed). `<think>` opened (in the text or by the prompt) and never
    closed: no answer part. No think block at all (models without one): the whole text is the answer."""
    open_tag, close_tag = prompts.THINK_OPEN.strip(), prompts.THINK_CLOSE
    if close_tag in text:
        before, _, after = text.partition(close_tag)  # the FIRST close: a 2nd </think> is not a re-think
        reasoning = before.split(open_tag, 1)[1] if open_tag in before else before
        return reasoning.strip(), after, True
    if prompt_opened_think or open_tag in text:
        return (text.split(open_tag, 1)[1] if open_tag in text else text).strip(), "", False
    return "", text, True


def exact_match(completion: str, choices: Mapping[str, str], gold_letter: str | None = None,
                prompt_opened_think: bool = False) -> dict:
    """The exact reading of one answer (see the module docstring); `gold_letter` None: format only."""
    reasoning, answer, closed = split_think(completion, prompt_opened_think)
    lines = list(answer_line_pattern().finditer(answer)) if closed else []
    by_text = {}
    for k, v in choices.items():
        by_text.setdefault(norm_text(v), []).append(k)
    out = {"think_closed": closed, "n_answer_lines": len(lines), "letter": None, "text_letter": None,
           "parsed": False, "strict": False, "letter_ok": False, "text_ok": False, "one_line": False,
           "trailing": False, "reasoning_chars": len(reasoning),
           "think_tags": completion.count(prompts.THINK_CLOSE)}
    if not lines:
        return out
    last = lines[-1]
    letter, text = last["letter"], last["text"]
    named = by_text.get(norm_text(text), [])
    text_letter = named[0] if len(named) == 1 else None  # two identical choice texts name no one choice
    trailing = bool(answer[last.end():].strip())
    out.update(letter=letter if letter in choices else None, text_letter=text_letter, trailing=trailing,
               parsed=letter in choices and text_letter is not None)
    # the format reward's test: one answer line, nothing after it, and the think block closed only once
    # (a GRPO run learned `</think>\n</think>\nAnswer: ...`)
    out["one_line"] = out["parsed"] and len(lines) == 1 and not trailing and out["think_tags"] == 1
    if gold_letter is not None:
        out["letter_ok"] = letter == gold_letter
        out["text_ok"] = text_letter == gold_letter
        out["strict"] = out["letter_ok"] and out["text_ok"]
    return out
