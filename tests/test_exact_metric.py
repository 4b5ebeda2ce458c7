"""The exact answer metric (format.answers.exact_match, evaluate.metrics): the degenerate outputs a lenient
reader or a GRPO run produced are never strict; the lenient reading is reported apart, labelled."""
import pytest

from pmcvqa_sft.format.answers import exact_match

CH = {"A": "Aorta", "B": "Portal vein", "C": "Jugular vein", "D": "Renal artery"}


def em(text, gold="C", **kw):
    return exact_match(text, CH, gold, **kw)


def test_trained_format_is_strict():
    r = em("<think>\n\n</think>\n\nAnswer: C. Jugular vein")
    assert r["strict"] and r["parsed"] and r["one_line"] and r["think_closed"]
    assert r["letter"] == "C" and r["text_letter"] == "C"


def test_text_normalised():
    assert em("<think>\n</think>\nAnswer: C. jugular  VEIN.")["strict"]


def test_reward_hack_seen_in_grpo_is_not_strict():
    # `</think>: C. Jugular vein: C. Jugular vein...`: no answer line at all
    r = em("<think>\n</think>: C. Jugular vein: C. Jugular vein: C. Jugular vein")
    assert not r["parsed"] and not r["strict"] and r["n_answer_lines"] == 0


@pytest.mark.parametrize("text", [
    "<think>\n</think>\n\nJugular vein",              # bare choice text
    "<think>\n</think>\n\nC. Jugular vein",           # no `Answer:` line
    "<think>\n</think>\n\n**C**",
    "<think>\n</think>\n\nThe answer is (C).",
    "<think>\n</think>\n\nAnswer: C",                 # letter only: the template has a text
    "<think>\n</think>\n\nAnswer: C. Something else",  # text naming no choice
    "<think>\n</think>\n\nAnswer: C. Jugular vein: C. Jugular vein",  # repeated in one line
    "<think>\nAnswer: C. Jugular vein",               # think never closed
    "<think>\nAnswer: C. Jugular vein\n</think>\n\n",  # the line only inside the reasoning
    "<think>\n</think>\n\nThe final Answer: C. Jugular vein",  # not alone on its line
])
def test_not_strict(text):
    assert not em(text)["strict"]


def test_letter_and_text_read_separately():
    r = em("<think>\n</think>\n\nAnswer: A. Jugular vein")
    assert r["parsed"] and not r["strict"] and not r["letter_ok"] and r["text_ok"]
    r = em("<think>\n</think>\n\nAnswer: C. Aorta")
    assert r["parsed"] and not r["strict"] and r["letter_ok"] and not r["text_ok"]


def test_letter_outside_choices_not_parsed():
    two = {"A": "Aorta", "B": "Portal vein"}
    r = exact_match("<think>\n</think>\nAnswer: C. Aorta", two, "A")
    assert not r["parsed"] and not r["strict"]


def test_last_line_counts_and_format_flags():
    r = em("<think>\n</think>\nAnswer: A. Aorta\nAnswer: C. Jugular vein")
    assert r["strict"] and r["n_answer_lines"] == 2 and not r["one_line"]
    r = em("<think>\n</think>\nAnswer: C. Jugular vein\nand more words")
    assert r["strict"] and r["trailing"] and not r["one_line"]


def test_prompt_opened_think():
    # the completion TRL hands a reward excludes the prompt's `<think>\n`
    assert em("\n</think>\n\nAnswer: C. Jugular vein", prompt_opened_think=True)["strict"]
    assert not em("Answer: C. Jugular vein", prompt_opened_think=True)["parsed"]   # think never closed
    assert em("Answer: C. Jugular vein")["strict"]          # a model without a think block


def test_duplicate_choice_texts_name_no_choice():
    dup = {"A": "Liver", "B": "Liver", "C": "Lung"}
    r = exact_match("Answer: A. Liver", dup, "A")
    assert not r["parsed"] and not r["strict"]


def test_edited_template(monkeypatch):
    from pmcvqa_sft import prompts
    monkeypatch.setattr(prompts, "ANSWER_TEMPLATE", "Final answer ({letter}) {text}")
    assert em("<think>\n</think>\nFinal answer (C) Jugular vein")["strict"]
    assert not em("<think>\n</think>\nAnswer: C. Jugular vein")["parsed"]


def test_repeated_think_close_is_not_one_line():
    r = em("\n</think>\n</think>\nAnswer: C. Jugular vein", prompt_opened_think=True)
    assert r["strict"] and not r["one_line"]


class _Gen:
    def __init__(self, text, finished=True, n=5):
        self.text, self.finished, self.token_ids = text, finished, list(range(n))


def _metrics(outputs, gold="C"):
    from pmcvqa_sft.evaluate.metrics import compute_metrics, generated_prediction
    preds = [generated_prediction("<think>\n" + o, CH, _Gen(o), 10) for o in outputs]
    return compute_metrics([{"answer_label": gold}] * len(outputs), preds, 1.0, "generate", max_new_tokens=96)


def test_reward_hack_scores_zero_and_the_lenient_reading_is_labelled_apart():
    """The output a GRPO run learned (`</think>: C. Jugular vein: ...`, no answer line) and a bare choice
    text: the lenient reader calls both C; the headline accuracy gives them nothing, and says so."""
    m = _metrics(["\n</think>: C. Jugular vein: C. Jugular vein: C. Jugular vein", "\n</think>\n\nJugular vein"])
    assert m["accuracy"] == 0 and m["parsed_rate"] == 0 and m["unparseable"] == 2
    assert m["accuracy_lenient"] == 1.0 and "fallback" in m["lenient_definition"]
    assert m["think_closed_rate"] == 1.0


def test_text_naming_no_choice_is_not_strict_nor_parsed():
    m = _metrics(["\n</think>\n\nAnswer: C. Something else", "\n</think>\n\nAnswer: C. Jugular vein"])
    assert m["accuracy"] == 0.5 and m["parsed_rate"] == 0.5 and m["accuracy_letter"] == 0.5


def test_letter_text_conflict_counted_and_never_right():
    m = _metrics(["\n</think>\n\nAnswer: A. Jugular vein", "\n</think>\n\nAnswer: C. Aorta"])
    assert m["accuracy"] == 0 and m["parsed_rate"] == 1 and m["letter_text_conflict"] == 2
    assert m["accuracy_letter"] == 0.5 and m["accuracy_text"] == 0.5


def test_reasoning_counts_cut_and_unclosed():
    from pmcvqa_sft.evaluate.metrics import compute_metrics, generated_prediction
    preds = [generated_prediction("<think>\nlong thought", CH, _Gen("long thought", finished=False, n=96), 10, 96),
             generated_prediction("<think>\nok\n</think>\n\nAnswer: C. Jugular vein",
                                  CH, _Gen("ok\n</think>\n\nAnswer: C. Jugular vein"), 10, 2)]
    m = compute_metrics([{"answer_label": "C"}] * 2, preds, 1.0, "generate", max_new_tokens=96)
    assert m["cut_by_budget"] == 1 and m["think_closed_rate"] == 0.5 and m["mean_reasoning_tokens"] == 49
    assert m["accuracy"] == 0.5 and m["max_new_tokens"] == 96


def test_reasoning_tokens_count_the_reasoning_text_alone(tiny_tokenizer):
    """One definition for the evaluation and the rationale report: the think block's text (all of it when
    it never closed), else the text before the answer line (all of it without one); an empty think is 0."""
    from pmcvqa_sft.format.answers import reasoning_text, reasoning_tokens
    tok = tiny_tokenizer
    count = lambda t: len(tok(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    line = "\n\nAnswer: C. Liver"
    cases = {"<think>\ntwo words\n</think>" + line: "two words",
             "<think>\n\n</think>" + line: "",  # what answer-only SFT writes
             "<think>\nlong thought cut by the budget": "long thought cut by the budget",
             "two words\n</think>" + line: "two words",  # a served turn whose <think> the template held
             "The figure shows the liver." + line: "The figure shows the liver.",  # Qwen2.5-VL: no think tokens
             "Answer: C. Liver": "",
             "It could be the liver or": "It could be the liver or"}  # no think, no answer line
    for turn, why in cases.items():
        assert reasoning_text(turn) == why, turn
        assert reasoning_tokens(tok, turn) == (count(why) if why else 0), turn
    assert count("two words") > 0
