"""The prompt functions. EDIT THIS FILE to change what the model sees and what it learns to answer.

Everything else (preprocessing, training, scoring, generation, the console chat) goes through these
functions, so a change here reaches training and inference alike. That matters: a training prompt that
differs from the inference prompt costs a lot of accuracy (26 % vs 57 % in one public report).

Rules these defaults follow, and why:
- No system prompt (`SYSTEM_PROMPT = None`). DeepSeek advises putting every instruction in the user turn
  for the R1 distills; `--system_prompt` overrides it for experiments.
- The assistant turn starts with `<think>\n`, because the model's own generation prompt ends with
  `<｜Assistant｜><think>\n`. `encoding.py` removes the part the generation prompt already holds, so the
  trained target is exactly what the model must produce after the real inference prompt.
- The answer line is `Answer: B. <choice text>`: the letter is what we score, the text after it makes
  learning easier (a tiny model cannot map letters to answers it knows without it). `answers.py`
  builds its parser from `ANSWER_TEMPLATE*` below, so editing the wording here keeps answers readable;
  the evaluation checks that the letter and the text agree.
- Reasoning: PMC-VQA ships no rationales. `--reasoning brief` writes a short rationale built from the row
  (question, caption, correct choice) inside the think block; the default leaves the block empty, which
  is how DeepSeek's models answer when no thinking is needed.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

LETTERS = "ABCD"

# None = no system message at all (DeepSeek's advice). A string becomes a system message, which the
# DeepSeek template renders right after BOS with no marker.
SYSTEM_PROMPT: str | None = None

INSTRUCTION = (
    "Answer the following multiple-choice question about a medical figure. "
    "Reply with the letter and the text of the correct choice."
)

THINK_OPEN = "<think>\n"
THINK_CLOSE = "</think>"


def format_choices(choices: Mapping[str, str]) -> str:
    """One line per present choice, `A. text`. 2- and 3-choice questions show only their choices."""
    return "\n".join(f"{letter}. {text}" for letter, text in choices.items())


def format_user_prompt(question: str, choices: Mapping[str, str] | None = None,
                       caption: str | None = None) -> str:
    """The user turn. `caption` (PMC-VQA v2) is the only text a text-only model gets about the figure."""
    parts = [INSTRUCTION] if choices else []
    if caption:
        parts.append(f"Figure caption: {caption}")
    parts.append(f"Question: {question}")
    if choices:
        parts.append("Choices:\n" + format_choices(choices))
    return "\n\n".join(parts)


# The answer line the model learns to write. `answers.py` builds its parser from these two templates,
# so an edited wording is trained AND parsed (tests/test_answers.py proves the round trip).
ANSWER_TEMPLATE = "Answer: {letter}. {text}"
ANSWER_TEMPLATE_LETTER_ONLY = "Answer: {letter}"


def answer_line(letter: str, text: str | None = None) -> str:
    """`Answer: B. Magnetic resonance imaging` (or `Answer: B` when the text is unknown)."""
    if text:
        return ANSWER_TEMPLATE.format(letter=letter, text=text)
    return ANSWER_TEMPLATE_LETTER_ONLY.format(letter=letter)


def make_reasoning(question: str, choices: Mapping[str, str], letter: str,
                   caption: str | None = None) -> str:
    """A short rationale for `--reasoning brief`. Built only from the row, so it never invents facts."""
    lines = []
    if caption:
        lines.append(f"The caption says: {caption}")
    lines.append(f"The question asks: {question}")
    lines.append(f"Of the options, {choices[letter]} is the correct one, so the answer is {letter}.")
    return "\n".join(lines)


def assistant_content(letter: str, text: str | None = None, reasoning: str = "", think: bool = True) -> str:
    """The whole assistant turn as the model writes it after `<｜Assistant｜>`: think block, then answer.

    With no reasoning this is `<think>\\n\\n</think>\\n\\nAnswer: B. text`, DeepSeek's empty think block.
    `think=False` (models whose generation prompt opens no think block, such as Qwen2.5-VL): the answer
    line alone, after the reasoning as plain text if there is one.
    """
    if not think:
        return f"{reasoning}\n\n{answer_line(letter, text)}" if reasoning else answer_line(letter, text)
    return f"{THINK_OPEN}{reasoning}\n{THINK_CLOSE}\n\n{answer_line(letter, text)}"


def create_conversation(question: str, choices: Mapping[str, str], answer_label: str | None = None,
                        caption: str | None = None, system_prompt: str | None = SYSTEM_PROMPT,
                        reasoning: bool = False, image: bool = False, think: bool = True,
                        rationale: str | None = None) -> list[dict]:
    """A PMC-VQA row -> chat messages. With `answer_label` the last message is the assistant target.

    `image=True` (image-text models): the user content is `[{"type": "image"}, {"type": "text", ...}]`,
    the figure before the text as Qwen2.5-VL's examples place it; the chat template turns the image item
    into its placeholder. `think`: see `assistant_content`. `rationale`: a sampled reasoning text
    (`--rationales`) put where `--reasoning brief` puts its template one (the think block; plain text
    before the answer line for models without think tokens).
    """
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    user = format_user_prompt(question, choices, caption)
    messages.append({"role": "user", "content": image_content(user) if image else user})
    if answer_label is not None:
        why = make_reasoning(question, choices, answer_label, caption) if reasoning else ""
        why = rationale if rationale is not None else why
        messages.append({"role": "assistant",
                         "content": assistant_content(answer_label, choices[answer_label], why, think)})
    return messages


def image_content(text: str) -> list[dict]:
    """The user content of an image question: the figure, then the text."""
    return [{"type": "image"}, {"type": "text", "text": text}]


def content_text(content) -> str:
    """The text of a message content, whether a string or a list of typed items."""
    if isinstance(content, str):
        return content
    return "".join(item.get("text", "") for item in content if item.get("type") == "text")


def candidate_contents(choices: Mapping[str, str], letter_only: bool = False, think: bool = True) -> list[str]:
    """One assistant turn per choice, in the exact training format, for log-likelihood scoring."""
    return [assistant_content(letter, None if letter_only else text, think=think)
            for letter, text in choices.items()]


def split_choices_arg(values: Sequence[str]) -> dict[str, str]:
    """`--choices "MRI" "CT"` or `--choices "A: MRI" "B: CT"` -> {"A": "MRI", "B": "CT"}.

    Choices are lettered by position; a written letter must be that position's letter (a `"B: MRI"`
    given first, or a letter given twice, is an error rather than a silently relettered choice)."""
    if len(values) < 2:
        raise ValueError(f"a multiple-choice question needs at least 2 choices, got {len(values)}")
    if len(values) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} choices, got {len(values)}")
    out = {}
    for i, raw in enumerate(values):
        text, letter = raw.strip(), LETTERS[i]
        written = re.match(r"([A-Za-z])\s*([:.)])\s*", text) if len(text) > 1 else None
        if written and written.group(1).upper() in LETTERS:
            if written.group(1).upper() != letter:
                if written.group(2) == ".":  # "C. difficile" as choice A is a name, not a letter
                    out[letter] = text
                    continue
                again = "repeats a letter" if written.group(1).upper() in out else "is out of order"
                raise ValueError(f"choice {i + 1} {raw.strip()!r} {again}: choices are lettered by position "
                                 f"({', '.join(LETTERS[:len(values)])}); give them in that order")
            text = text[written.end():].strip()
        if not text:
            raise ValueError(f"choice {letter} is empty")
        out[letter] = text
    return out
