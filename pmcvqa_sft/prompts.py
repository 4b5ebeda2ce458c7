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
  learning easier (a tiny model cannot map letters to answers it knows without it) and lets the
  extractor in `answers.py` recover the letter from either part.
- Reasoning: PMC-VQA ships no rationales. `--reasoning brief` writes a short rationale built from the row
  (question, caption, correct choice) inside the think block; the default leaves the block empty, which
  is how DeepSeek's models answer when no thinking is needed.
"""
from __future__ import annotations

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


def answer_line(letter: str, text: str | None = None) -> str:
    """`Answer: B. Magnetic resonance imaging` (or `Answer: B` when the text is unknown)."""
    return f"Answer: {letter}. {text}" if text else f"Answer: {letter}"


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
                        reasoning: bool = False, image: bool = False, think: bool = True) -> list[dict]:
    """A PMC-VQA row -> chat messages. With `answer_label` the last message is the assistant target.

    `image=True` (image-text models): the user content is `[{"type": "image"}, {"type": "text", ...}]`,
    the figure before the text as Qwen2.5-VL's examples place it; the chat template turns the image item
    into its placeholder. `think`: see `assistant_content`.
    """
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    user = format_user_prompt(question, choices, caption)
    messages.append({"role": "user", "content": image_content(user) if image else user})
    if answer_label is not None:
        why = make_reasoning(question, choices, answer_label, caption) if reasoning else ""
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
    """`--choices "MRI" "CT"` or `--choices "A: MRI" "B: CT"` -> {"A": "MRI", "B": "CT"}."""
    out = {}
    for i, raw in enumerate(values):
        text = raw.strip()
        letter = LETTERS[i] if i < len(LETTERS) else None
        if letter is None:
            raise ValueError(f"at most {len(LETTERS)} choices, got {len(values)}")
        for sep in (":", ".", ")"):
            if len(text) > 1 and text[0].upper() == letter and text[1] == sep:
                text = text[2:].strip()
                break
        if not text:
            raise ValueError(f"choice {letter} is empty")
        out[letter] = text
    return out
