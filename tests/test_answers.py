"""answers.py: the letter extractor on a table of output styles, and choice scoring vs a reference."""
from __future__ import annotations

import pytest

from pmcvqa_sft.evaluate.scoring import ScoreItem, reference_score, score_choices
from pmcvqa_sft.format.answers import extract_answer, split_reasoning

CH = {"A": "Computed tomography", "B": "Magnetic resonance imaging", "C": "Ultrasound", "D": "Lung"}
CH_SUB = {"A": "Lung", "B": "Lung cancer", "C": "Liver", "D": "Kidney"}

# (generated assistant turn, choices, expected letter or None for unparseable)
CASES = [
    ("<think>\n\n</think>\n\nAnswer: B. Magnetic resonance imaging", CH, "B"),
    ("\n</think>\n\nAnswer: B. Magnetic resonance imaging", CH, "B"),   # continuation after the prompt
    ("Answer: C", CH, "C"),
    ("answer: c", CH, "C"),
    ("The answer is B.", CH, "B"),
    ("The correct answer is (D).", CH, "D"),
    ("Final answer: **A**", CH, "A"),
    ("**Answer:** B", CH, "B"),
    ("**B**", CH, "B"),
    ("**B. Magnetic resonance imaging**", CH, "B"),
    ("(B)", CH, "B"),
    ("[C]", CH, "C"),
    ("\\boxed{B}", CH, "B"),
    ("So the result is $\\boxed{\\text{C}}$.", CH, "C"),
    ("B.", CH, "B"),
    ("B", CH, "B"),
    ("B) Magnetic resonance imaging", CH, "B"),
    ("D: Lung", CH, "D"),
    ("Option A is correct.", CH, "A"),
    ("I choose choice C.", CH, "C"),
    ("Magnetic resonance imaging", CH, "B"),
    ("magnetic resonance imaging.", CH, "B"),
    ("It is most likely Ultrasound given the image.", CH, "C"),
    ("Lung cancer", CH_SUB, "B"),                     # a choice text inside another must not tie
    ("Lung", CH_SUB, "A"),
    ("<think>\nMaybe A or C... The figure shows B?\n</think>\n\nAnswer: D. Lung", CH, "D"),  # think ignored
    ("<think>\nI think the answer is A\n</think>\n\nI am not sure.", CH, None),  # letter only in the think block
    ("<think>\nThe answer is B because", CH, None),   # reasoning never closed (truncated)
    ("", CH, None),
    ("I don't know.", CH, None),
    ("A) Computed tomography or B) Magnetic resonance imaging", CH, None),  # two answers
    ("Answer: E", CH, None),                           # not a choice
    ("Both are plausible.", CH, None),                 # 'B' inside a word is not a letter
    ("Answer: A. Computed tomography\nWait, the answer is C.", CH, "C"),  # the restated answer wins
    ("Answer: B", {"A": "yes", "B": "no"}, "B"),       # 2-choice question
    ("Answer: C", {"A": "yes", "B": "no"}, None),      # letter outside this question's choices
    ("The answer: **(B)**", CH, "B"),
    ("\n</think>\n\n  b. magnetic resonance imaging", CH, "B"),
]


def test_extractor_table_is_big_enough():
    assert len(CASES) >= 30
    assert sum(1 for *_, want in CASES if want is None) >= 6


@pytest.mark.parametrize("text,choices,want", CASES, ids=[repr(c[0])[:40] for c in CASES])
def test_extractor(text, choices, want):
    got = extract_answer(text, choices)
    assert got.letter == want, (text, got)
    assert (got.method == "none") == (want is None)


def test_split_reasoning_parts():
    r, a, closed = split_reasoning("<think>\nstep 1\n</think>\n\nAnswer: A")
    assert (r, a, closed) == ("step 1", "Answer: A", True)
    assert split_reasoning("<think>\nunfinished")[2] is False


def test_batched_scores_equal_unpadded_reference(tiny_dir, tiny_tokenizer):
    """Right-padded batched scoring == one unpadded forward per choice via encoding.encode_conversation."""
    import torch
    from transformers import AutoModelForCausalLM

    from pmcvqa_sft import prompts
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads stall each other on a busy 2-core machine (see test_inference)
    items = [ScoreItem(prompts.format_user_prompt("Which organ produces bile?", CH_SUB), CH_SUB),
             ScoreItem(prompts.format_user_prompt("Which imaging modality uses sound?", CH), CH),
             ScoreItem(prompts.format_user_prompt("Pick one", {"A": "yes", "B": "no"}), {"A": "yes", "B": "no"})]
    for letter_only in (False, True):
        got = score_choices(model, tiny_tokenizer, items, batch_size=3, letter_only=letter_only, progress=False)
        for it, res in zip(items, got):
            ref = reference_score(model, tiny_tokenizer, it.user_text, it.choices, letter_only=letter_only)
            assert res.letters == list(it.choices)
            assert res.logprob == pytest.approx(ref, abs=1e-3)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("text, letter, text_letter", [
    ("<think>\n\n</think>\n\nAnswer: C. Magnetic resonance imaging", "C", "B"),   # conflict
    ("</think>\n\nAnswer: D. Ultrasound", "D", "A"),                               # the demo's case
    ("</think>\n\nAnswer: B. Magnetic resonance imaging", "B", "B"),
    ("</think>\n\nAnswer: A. something not offered", "A", None),
    ("</think>\n\nThe answer is (D). X-ray", "D", "D"),
    ("</think>\n\nC) Magnetic resonance imaging", "C", "B"),                       # loose form, conflict
    ("</think>\n\nAnswer: B", "B", None),
])
def test_letter_and_text_are_both_read(text, letter, text_letter):
    """The stated letter is the answer; the choice its text names is kept beside it, and a row whose two
    disagree is a conflict with no strict answer (never scored by the text alone)."""
    choices = {"A": "Ultrasound", "B": "Magnetic resonance imaging", "C": "CT", "D": "X-ray"}
    got = extract_answer(text, choices)
    assert (got.letter, got.text_letter) == (letter, text_letter)
    conflict = text_letter is not None and text_letter != letter
    assert got.conflict == conflict and got.strict_letter == (None if conflict else letter)


@pytest.mark.parametrize("full, short", [
    ("Final answer: ({letter}) {text}", "Final answer: ({letter})"),
    ("Verdict => {letter} / {text}", "Verdict => {letter}"),   # a wording no generic rule knows
])
def test_edited_answer_format_still_parses(monkeypatch, full, short):
    """prompts.py is the one source of the answer format: an edited template is trained (answer_line)
    and parsed (answers.py builds its pattern from it)."""
    from pmcvqa_sft import prompts
    monkeypatch.setattr(prompts, "ANSWER_TEMPLATE", full)
    monkeypatch.setattr(prompts, "ANSWER_TEMPLATE_LETTER_ONLY", short)
    assert prompts.answer_line("B", CH["B"]) == full.format(letter="B", text=CH["B"])
    for letter in CH:
        got = extract_answer(prompts.assistant_content(letter, CH[letter]), CH)
        assert (got.letter, got.text_letter, got.method) == (letter, letter, "answer_line"), got
        only = extract_answer(prompts.assistant_content(letter), CH)
        assert (only.letter, only.method) == (letter, "answer_line"), only
    wrong = extract_answer(prompts.assistant_content("C", CH["B"]), CH)   # letter and text disagree
    assert wrong.conflict and (wrong.letter, wrong.text_letter) == ("C", "B")


def test_article_a_is_not_choice_a():
    choices = {"A": "Malignant tumor", "B": "Benign tumor", "C": "Cyst", "D": "Abscess"}
    got = extract_answer("</think>\n\nThe answer is a benign tumor (B).", choices)
    assert got.letter == "B"
