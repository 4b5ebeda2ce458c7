"""prompts.py and encoding.py: the prompt format, token-exact encoding, the fast path, the mask visualiser."""
from __future__ import annotations

import copy

import pytest

from pmcvqa_sft.format import encoding
from pmcvqa_sft import prompts

CHOICES4 = {"A": "Magnetic resonance imaging", "B": "Computed tomography", "C": "Ultrasound", "D": "X-ray"}
CHOICES3 = {"A": "Red", "B": "Blue", "C": "Green"}
CHOICES2 = {"A": "Benign", "B": "Malignant"}
CAPTION = "Axial T2-weighted image of the brain showing a hyperintense lesion."
QUESTION = "Which imaging modality was used to acquire this figure?"

# Real DeepSeek-R1-Distill-Llama-8B ids (its tokenizer_config.json; docs/PREPROCESSING.md).
BOS, EOS, ASSISTANT, THINK, NEWLINE = 128000, 128001, 128012, 128013, 198


def conv(choices=CHOICES4, label="B", caption=None, system_prompt=None, reasoning=False):
    return prompts.create_conversation(QUESTION, choices, label, caption=caption,
                                       system_prompt=system_prompt, reasoning=reasoning)


# ---------------------------------------------------------------- prompts.py
def test_user_prompt_lists_only_present_choices_and_caption():
    text = prompts.format_user_prompt(QUESTION, CHOICES2, caption=CAPTION)
    assert "A. Benign\nB. Malignant" in text and "C." not in text
    assert f"Figure caption: {CAPTION}" in text and f"Question: {QUESTION}" in text
    assert text.index("Figure caption") < text.index("Question") < text.index("Choices")


def test_conversation_roles_and_target():
    msgs = conv(system_prompt="Be brief.")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert msgs[-1]["content"] == "<think>\n\n</think>\n\nAnswer: B. Computed tomography"
    assert [m["role"] for m in conv()] == ["user", "assistant"]  # default: no system prompt
    assert [m["role"] for m in prompts.create_conversation(QUESTION, CHOICES4)] == ["user"]


def test_reasoning_brief_is_built_from_the_row():
    target = conv(caption=CAPTION, reasoning=True)[-1]["content"]
    assert target.startswith("<think>\nThe caption says: " + CAPTION)
    assert "Computed tomography is the correct one, so the answer is B." in target
    assert target.endswith("</think>\n\nAnswer: B. Computed tomography")


def test_split_choices_arg():
    assert prompts.split_choices_arg(["A: MRI", "b) CT", "Ultrasound"]) == {"A": "MRI", "B": "CT", "C": "Ultrasound"}
    assert prompts.split_choices_arg(["A: MRI", "B. CT"]) == {"A": "MRI", "B": "CT"}
    with pytest.raises(ValueError):
        prompts.split_choices_arg(["a", "b", "c", "d", "e"])
    assert prompts.candidate_contents(CHOICES2, letter_only=True)[1].endswith("Answer: B")


# ---------------------------------------------------------------- token-exact encoding (real tokenizer)
def test_real_tokenizer_encoding_is_token_exact(real_tokenizer):
    tok = real_tokenizer
    ids, labels = encoding.encode_conversation(tok, conv())
    n_prompt = labels.count(encoding.IGNORE_INDEX)
    assert ids[0] == BOS and ids.count(BOS) == 1                     # exactly one BOS
    assert ids[n_prompt - 3:n_prompt] == [ASSISTANT, THINK, NEWLINE]  # prompt ends <｜Assistant｜><think>\n
    assert ids[-1] == EOS and labels[-1] == EOS                      # EOS trained
    assert labels[:n_prompt] == [encoding.IGNORE_INDEX] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    # The prompt is exactly the tokenizer's own generation prompt, tokenized without added specials.
    ref = tok.apply_chat_template(conv()[:-1], add_generation_prompt=True, tokenize=False)
    assert ids[:n_prompt] == tok(ref, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[n_prompt:-1]) == "\n</think>\n\nAnswer: B. Computed tomography"


def test_rendering_whole_conversation_would_lose_reasoning(real_tokenizer):
    """The trap encoding.py avoids: the template drops everything up to </think> from assistant turns."""
    full = real_tokenizer.apply_chat_template(conv(reasoning=True), tokenize=False)
    assert "The question asks" not in full
    ids, labels = encoding.encode_conversation(real_tokenizer, conv(reasoning=True))
    assert "The question asks" in real_tokenizer.decode([t for t in labels if t != encoding.IGNORE_INDEX])


@pytest.mark.parametrize("system_prompt", [None, "You are a careful radiologist."])
@pytest.mark.parametrize("reasoning", [False, True])
@pytest.mark.parametrize("caption", [None, CAPTION])
@pytest.mark.parametrize("tok_name", ["tiny_tokenizer", "real_tokenizer"])
def test_fast_path_equals_reference(request, tok_name, system_prompt, reasoning, caption):
    tok = request.getfixturevalue(tok_name)
    msgs = [conv(c, lab, caption, system_prompt, reasoning)
            for c, lab in ((CHOICES4, "D"), (CHOICES3, "C"), (CHOICES2, "A"))]
    enc = encoding.PromptEncoder(tok, system_prompt)
    users, contents = [m[-2]["content"] for m in msgs], [m[-1]["content"] for m in msgs]
    enc.verify(users, contents)
    for m, p, t in zip(msgs, enc.prompt_ids(users), enc.target_ids(contents)):
        ids, labels = encoding.encode_conversation(tok, m)
        assert p + t == ids and [encoding.IGNORE_INDEX] * len(p) + t == labels


def test_verify_catches_a_wrong_fast_path(tiny_tokenizer):
    enc = encoding.PromptEncoder(tiny_tokenizer)
    enc.head = enc.head + " "  # a template change the fast path missed
    m = conv()
    with pytest.raises(AssertionError, match="differs"):
        enc.verify([m[-2]["content"]], [m[-1]["content"]])


def test_tiny_tokenizer_has_the_real_format(tiny_tokenizer):
    ids, labels = encoding.encode_conversation(tiny_tokenizer, conv())
    n = labels.count(encoding.IGNORE_INDEX)
    assert ids[0] == tiny_tokenizer.bos_token_id and ids.count(tiny_tokenizer.bos_token_id) == 1
    assert tiny_tokenizer.decode(ids[:n]).endswith("<｜Assistant｜><think>\n")
    assert ids[-1] == labels[-1] == tiny_tokenizer.eos_token_id


# ---------------------------------------------------------------- template-less tokenizers
def test_plain_template_for_tokenizers_without_one(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    encoding.ensure_chat_template(tok)
    assert tok.chat_template == encoding.PLAIN_CHAT_TEMPLATE
    prompt = encoding.render_prompt(tok, conv(system_prompt="Be brief."))
    assert prompt.startswith(tok.bos_token + "Be brief.\n\n### Question:\n")
    assert prompt.endswith("\n\n### Response:\n")
    ids, labels = encoding.encode_conversation(tok, conv())
    n = labels.count(encoding.IGNORE_INDEX)
    # Nothing of the think block is in this prompt, so the whole assistant turn is trained.
    assert tok.decode(ids[n:-1]) == "<think>\n\n</think>\n\nAnswer: B. Computed tomography"
    enc = encoding.PromptEncoder(tok)
    m = conv()
    enc.verify([m[-2]["content"]], [m[-1]["content"]])
    assert encoding.template_hash(tok) != encoding.template_hash(tiny_tokenizer)


def test_strip_prompt_overlap():
    assert encoding.strip_prompt_overlap("<｜Assistant｜><think>\n", "<think>\n\n</think>") == "\n</think>"
    assert encoding.strip_prompt_overlap("### Response:\n", "<think>\nx") == "<think>\nx"


# ---------------------------------------------------------------- mask visualiser
def test_visualize_mask_marks_exactly_the_target(tiny_tokenizer):
    tok = tiny_tokenizer
    ids, labels = encoding.encode_conversation(tok, conv())
    n = labels.count(encoding.IGNORE_INDEX)
    shown = encoding.visualize_mask(tok, ids, labels)
    assert shown == tok.decode(ids[:n], skip_special_tokens=False) + "⟦" + \
        tok.decode(ids[n:], skip_special_tokens=False) + "⟧"
    assert shown.count("⟦") == 1 and shown.endswith("Answer: B. Computed tomography<｜end▁of▁sentence｜>⟧")
    colored = encoding.visualize_mask(tok, ids, labels, color=True)
    assert "⟦" not in colored and colored.endswith("<｜end▁of▁sentence｜>\x1b[0m")
    assert colored.count("\x1b[1;32m") == 1
