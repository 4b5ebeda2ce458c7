"""Reading the model's answer: letter extraction from generated text, and choice scoring.

Two ways to get a multiple-choice prediction:
- `extract_answer(text, choices)`: parse free text the model generated. The think block is ignored
  (a letter inside the reasoning is not an answer); the answer part is matched against, in order,
  `\\boxed{B}`, the trained answer line (its pattern is built from `prompts.ANSWER_TEMPLATE*`, so an
  edited wording is still parsed) or `Answer: B` / `the answer is (B)`, `**B**`, `(B)`, a leading
  `B.` / `B)` / lone `B`, `option B`, and finally the text of exactly one choice. Anything else is
  unparseable (letter None). The letter and the choice text written after it are returned separately
  (`letter`, `text_letter`); when they disagree the extraction is a `conflict`.
- `score_choices(model, tokenizer, items)`: no generation. Each choice's whole answer turn in the
  exact training format (`prompts.candidate_contents`, target tokens built like
  `encoding.encode_conversation`: content minus the prompt's `<think>\\n`, + EOS) is scored by the sum of
  its token log-probabilities after the chat prompt, as lm-eval does; the byte-length-normalised
  score is recorded too. Many questions are scored at once: their shared prompt + answer start runs once
  per question, then the choices' differing suffixes run together from a copied KV cache.
"""
from __future__ import annotations

import functools
import re
import string
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from . import prompts
from .encoding import IGNORE_INDEX, PromptEncoder

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
# scoring
# ---------------------------------------------------------------------------------------------------


@dataclass
class ChoiceScores:
    letters: list[str]
    logprob: list[float]                    # sum of the continuation's token log-probs
    logprob_norm: list[float]               # the same / continuation length in bytes (lm-eval acc_bytes)
    n_tokens: list[int] = field(default_factory=list)

    @property
    def letter(self) -> str:
        return self.letters[max(range(len(self.letters)), key=lambda i: self.logprob[i])]

    @property
    def letter_norm(self) -> str:
        return self.letters[max(range(len(self.letters)), key=lambda i: self.logprob_norm[i])]


@dataclass
class ScoreItem:
    """One question to score: the user turn text and its choices. `prompt_ids`: the exact prompt tokens
    to score after (a preprocessed row's trained prompt); None = render `user_text` with the template."""
    user_text: str
    choices: dict[str, str]
    prompt_ids: list[int] | None = None


def build_score_rows(encoder: PromptEncoder, items: Sequence[ScoreItem], letter_only: bool = False):
    """Per question: its prompt ids and, per choice, the target ids (training format) and byte length."""
    to_render = [it.user_text for it in items if it.prompt_ids is None]
    rendered = iter(encoder.prompt_ids(to_render) if to_render else [])
    prompt_ids = [list(it.prompt_ids) if it.prompt_ids is not None else next(rendered) for it in items]
    out = []
    for it, p in zip(items, prompt_ids):
        contents = prompts.candidate_contents(it.choices, letter_only=letter_only)
        targets = encoder.target_ids(contents)
        nbytes = [max(1, len(c.encode("utf-8"))) for c in contents]
        out.append((p, list(it.choices), targets, nbytes))
    return out


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(map(len, seqs)) - 1  # every candidate keeps at least one token of its own
    k = 0
    while k < n and all(s[k] == seqs[0][k] for s in seqs):
        k += 1
    return k


def _score_batch(model, pad_id: int, batch) -> list[ChoiceScores]:
    """Score every candidate of `batch` (several questions) in two forward passes.

    The candidates of a question share the prompt and the start of the target (`\n</think>\n\nAnswer: `),
    so that shared prefix is run once per question (pass 1, left-padded, its KV cache kept); the cache is
    then copied to one row per candidate and only the differing suffixes run (pass 2, right-padded).
    Each candidate's score is the sum of the log-probs of all its target tokens, shared ones included,
    exactly as one unpadded forward of `prompt + target` would give (tested against that reference).
    """
    import torch

    device = next(model.parameters()).device
    prefixes, lcps = [], []
    for prompt, _letters, targets, _ in batch:
        k = _common_prefix(targets)
        lcps.append(k)
        prefixes.append(prompt + targets[0][:k])
    P = max(map(len, prefixes))
    ids1 = torch.full((len(batch), P), pad_id, dtype=torch.long)
    mask1 = torch.zeros((len(batch), P), dtype=torch.long)
    for i, pre in enumerate(prefixes):
        ids1[i, P - len(pre):] = torch.tensor(pre)
        mask1[i, P - len(pre):] = 1
    pos1 = (mask1.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens keep positions 0, 1, ...
    keep1 = max(lcps) + 1  # logits of the shared target tokens + the one predicting each suffix's start
    # pass 2 rows: one per candidate, right-padded suffixes
    owner, suffixes = [], []
    for qi, (_prompt, _letters, targets, _) in enumerate(batch):
        for t in targets:
            owner.append(qi)
            suffixes.append(t[lcps[qi]:])
    S = max(map(len, suffixes))
    ids2 = torch.full((len(suffixes), S), pad_id, dtype=torch.long)
    mask2 = torch.zeros((len(suffixes), S), dtype=torch.long)
    for r, suf in enumerate(suffixes):
        ids2[r, :len(suf)] = torch.tensor(suf)
        mask2[r, :len(suf)] = 1
    own = torch.tensor(owner)
    lens1 = mask1.sum(-1)
    pos2 = lens1[own, None] + torch.arange(S)[None, :]
    with torch.no_grad():
        out1 = model(input_ids=ids1.to(device), attention_mask=mask1.to(device), position_ids=pos1.to(device),
                     use_cache=True, logits_to_keep=keep1)
        lp1 = torch.log_softmax(out1.logits.float(), dim=-1).cpu()       # [Q, keep1, V]
        cache = getattr(out1, "cache", None) or out1.past_key_values  # transformers 5 renamed it
        cache.reorder_cache(own.to(device))                              # one cache row per candidate
        out2 = model(input_ids=ids2.to(device), cache=cache, position_ids=pos2.to(device),
                     attention_mask=torch.cat([mask1[own], mask2], dim=1).to(device), use_cache=False)
        lp2 = torch.log_softmax(out2.logits.float(), dim=-1).cpu()       # [rows, S, V]
    results, r = [], 0
    for qi, (_prompt, letters, targets, nbytes) in enumerate(batch):
        k = lcps[qi]
        shared_tok = torch.tensor(targets[0][:k], dtype=torch.long)
        shared = lp1[qi, keep1 - 1 - k + torch.arange(k), shared_tok].sum().item() if k else 0.0
        sums, norms, ntok = [], [], []
        for t, nb in zip(targets, nbytes):
            suf = suffixes[r]
            s = shared + lp1[qi, keep1 - 1, suf[0]].item()
            if len(suf) > 1:
                s += lp2[r, torch.arange(len(suf) - 1), torch.tensor(suf[1:])].sum().item()
            sums.append(s), norms.append(s / nb), ntok.append(len(t))
            r += 1
        results.append(ChoiceScores(letters, sums, norms, ntok))
    return results


def score_choices(model, tokenizer, items: Sequence[ScoreItem], batch_size: int = 16,
                  letter_only: bool = False, system_prompt: str | None = None,
                  progress: bool = True) -> list[ChoiceScores]:
    """Log-likelihood of every choice of every item, `batch_size` questions per forward pass."""
    from tqdm.auto import tqdm
    from .modeling import progress_bars_wanted  # no bar fragments in logs

    encoder = PromptEncoder(tokenizer, system_prompt)
    rows = build_score_rows(encoder, items, letter_only)
    # Similar lengths in a batch waste less padding and keep the kept-logits range short.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + max(map(len, rows[i][2])))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[ChoiceScores | None] = [None] * len(rows)
    bar = tqdm(range(0, len(order), batch_size), desc="scoring",
                 disable=not progress_bars_wanted(progress), leave=False)
    for start in bar:
        idx = order[start:start + batch_size]
        for i, res in zip(idx, _score_batch(model, pad_id, [rows[i] for i in idx])):
            out[i] = res
    return out  # type: ignore[return-value]


def reference_score(model, tokenizer, user_text: str, choices: Mapping[str, str],
                    letter_only: bool = False, system_prompt: str | None = None) -> list[float]:
    """Slow per-choice reference (encoding.encode_conversation, one unpadded forward each), for tests."""
    import torch

    from .encoding import encode_conversation
    msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": "user", "content": user_text}]
    out = []
    for content in prompts.candidate_contents(choices, letter_only=letter_only):
        ids, labels = encode_conversation(tokenizer, msgs + [{"role": "assistant", "content": content}])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        out.append(sum(lp[i - 1, ids[i]].item() for i in range(1, len(ids)) if labels[i] != IGNORE_INDEX))
    return out
