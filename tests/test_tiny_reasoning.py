"""tiny-reasoning (make demo-reasoning): the merged letter+word tokens round-trip and bind the answer's letter
to the choice line; `tiny` is untouched. No pretraining here: only the tokenizer is built (a few seconds)."""
from __future__ import annotations

import random

import pytest

from pmcvqa_sft import prompts
from pmcvqa_sft.core import paths
from pmcvqa_sft.data.pmc_vqa import read_pmc_vqa_csv
from pmcvqa_sft.format.encoding import PromptEncoder
from pmcvqa_sft.models import tiny

from conftest import SAMPLE_DIR


@pytest.fixture(scope="module")
def rtok(tmp_path_factory):
    """The tiny-reasoning tokenizer, saved and loaded back the way every script loads it."""
    from pmcvqa_sft.models.loading import load_tokenizer
    out = tmp_path_factory.mktemp("rtok")
    tiny.build_reasoning_tokenizer().save_pretrained(out)
    return load_tokenizer(str(out))


def sample_rows():
    rows = []
    for split in ("train", "test"):
        rows += read_pmc_vqa_csv(SAMPLE_DIR / f"{split}.csv")[0]
    drills = tiny.drill_rows(50, random.Random(0))
    return [(r.question, r.choices, r.answer_label) for r in rows] + \
           [(d["question"], d["choices"], d["label"]) for d in drills]


def test_prompts_round_trip_and_answer_letter_token_is_in_the_choice_line(rtok):
    merged = {rtok.convert_tokens_to_ids(t): t for t in tiny.merged_tokens()}
    assert len(merged) == len(tiny.merged_tokens()) == 4 * len({t.split()[0] for t in tiny.answer_texts()})
    enc = PromptEncoder(rtok, prompts.SYSTEM_PROMPT)
    rows = sample_rows()
    users = [prompts.format_user_prompt(q, ch) for q, ch, _ in rows]
    contents = [prompts.assistant_content(lab, ch[lab], "") for _, ch, lab in rows]
    enc.verify(users[:20], contents[:20])  # the fast path equals apply_chat_template, as preprocess checks
    P, T = enc.prompt_ids(users), enc.target_ids(contents)
    for (q, ch, lab), user, p, t in zip(rows, users, P, T):
        text = enc.prompt_text(user)
        assert rtok.decode(p) == text  # exact round trip of the rendered prompt
        in_prompt = [merged[i] for i in p if i in merged]
        assert in_prompt == [f"{L}. {ch[L].split()[0]}" for L in ch]  # every choice line starts with one
        in_target = [i for i in t if i in merged]
        assert len(in_target) == 1 and merged[in_target[0]] == f"{lab}. {ch[lab].split()[0]}"
        assert in_target[0] in p  # the answer's letter token is literally in the prompt
        assert rtok.decode(t[:-1]).endswith(prompts.answer_line(lab, ch[lab]))


def test_merged_tokens_match_only_whole_words(rtok):
    word = tiny.answer_texts()[0].split()[0]
    ids = rtok(f"Answer: A. {word}x", add_special_tokens=False)["input_ids"]
    assert rtok.convert_tokens_to_ids(f"A. {word}") not in ids
    assert rtok.decode(ids) == f"Answer: A. {word}x"


def test_tiny_is_unaffected(tiny_tokenizer, monkeypatch):
    assert len(tiny_tokenizer) == tiny.PRETRAIN["vocab_size"] + 4  # BPE + the four chat tokens, no merged ones
    assert not set(tiny.merged_tokens()) & set(tiny_tokenizer.get_vocab())
    key, rkey = tiny._recipe_key(), tiny._reasoning_recipe_key()
    assert key != rkey
    monkeypatch.setattr(tiny, "REASONING_PRETRAIN", dict(tiny.REASONING_PRETRAIN, steps=1))
    monkeypatch.setattr(tiny, "merged_tokens", lambda: ["A. X"])
    assert tiny._recipe_key() == key and tiny._reasoning_recipe_key() != rkey  # its recipe alone moves


def test_alias_resolves_like_tiny(monkeypatch, tmp_path):
    assert paths.is_tiny("tiny-reasoning") and paths.TINY_REASONING_DIR != paths.TINY_DIR
    (tmp_path / "tiny_reasoning_build.json").write_text("{}")
    assert paths.is_tiny(str(tmp_path))  # a built folder counts as tiny (one thread, etc.)
    monkeypatch.setattr(tiny, "ensure_tiny_reasoning", lambda: tmp_path)
    from pmcvqa_sft.models.loading import resolve_name
    assert tiny.resolve("tiny-reasoning") == resolve_name("tiny-reasoning") == str(tmp_path)
    built = []
    monkeypatch.setattr(tiny, "build_tiny_reasoning", lambda out, overwrite=False: built.append(out) or out)
    tiny.main(["--reasoning", "--out", str(tmp_path / "new")])
    assert built == [str(tmp_path / "new")]


def test_split_pretraining_loss_equals_the_whole_batch_loss(rtok):
    """The build's cheaper loss (sentences and drills as two batches, head only where trained) is the same
    objective as one padded batch through `model(labels=...)`: same value and same gradients."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(rtok), bos_token_id=rtok.bos_token_id,
                                         eos_token_id=rtok.eos_token_id, pad_token_id=rtok.eos_token_id,
                                         **tiny.MODEL_KW))
    rng = random.Random(0)
    drills = tiny._drills(rtok)(rng)[:6]
    sentences = tiny.sentence_rows(rtok, ["The aorta carries blood.",
                                          "Prussian blue stains iron deposits in tissue sections."])
    batch = [drills[0], sentences[0], drills[1], sentences[1]] + drills[2:]
    assert any(-100 in lab for _, lab in batch) and any(-100 not in lab for _, lab in batch)

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn()
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    ids, attn, labels = tiny._pad(batch, rtok.eos_token_id)
    whole, g_whole = loss_and_grads(lambda: model(input_ids=ids, attention_mask=attn, labels=labels).loss)
    split, g_split = loss_and_grads(lambda: tiny._split_loss(model, batch, rtok.eos_token_id))
    assert split == pytest.approx(whole, rel=1e-5)
    for a, b in zip(g_whole, g_split):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
