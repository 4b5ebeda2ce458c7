"""Choice scoring: each choice's whole answer turn in the exact training format, scored by log-likelihood.

No generation, no parsing lottery. Each choice's answer turn (`prompts.candidate_contents`, target tokens
built like `encoding.encode_conversation`: content minus the prompt's `<think>\\n`, + EOS) is scored by
the sum of its token log-probabilities after the chat prompt, as lm-eval does; the byte-length-normalised
score is recorded too (lm-eval's `acc_bytes`).
- text models (`score_choices`): many questions at once; their shared prompt + answer start runs once
  per question, then the choices' differing suffixes run together from a copied KV cache.
- image models (`predict_score(..., collator=...)`): prompt + figure + each candidate in one right-padded
  forward pass (`sequence_logprobs`); the gold candidate must equal the row's stored target, so a dataset
  trained on another answer format is refused in one line rather than scored on a format it never saw.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .. import prompts
from ..core.errors import InputError
from ..core.notices import progress_bars_wanted
from ..data.collate import target_logits_only
from ..format.encoding import IGNORE_INDEX, PromptEncoder, encode_conversation, opens_think


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

    msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": "user", "content": user_text}]
    out = []
    for content in prompts.candidate_contents(choices, letter_only=letter_only):
        ids, labels = encode_conversation(tokenizer, msgs + [{"role": "assistant", "content": content}])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        out.append(sum(lp[i - 1, ids[i]].item() for i in range(1, len(ids)) if labels[i] != IGNORE_INDEX))
    return out


def candidate_targets(tokenizer, choices, letter_only=False) -> tuple[list[str], list[list[int]]]:
    """Each choice's answer turn in the training format: (texts, target ids + EOS)."""
    contents = prompts.candidate_contents(choices, letter_only=letter_only, think=opens_think(tokenizer))
    return contents, PromptEncoder(tokenizer).target_ids(contents)


def sequence_logprobs(model, collator, items) -> list[float]:
    """Sum of the log-probs of each item's target tokens after its prompt and figure, in one forward pass.

    `items`: (prompt ids, target ids, figure ref). Right-padded (`collator`), logits kept only where a
    target token is predicted (`collate.target_logits_only`)."""
    device = next(model.parameters()).device
    feats = [{"input_ids": p + t, "labels": [-100] * len(p) + t, "image": ref} for p, t, ref in items]
    inputs = target_logits_only(collator(feats))
    shift = inputs.pop("shift_labels", None)
    labels = inputs.pop("labels")
    if shift is None:  # every position predicts a target token: all logits are kept
        shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    with torch.no_grad():
        logits = model(**{k: v.to(device) for k, v in inputs.items()}, use_cache=False).logits
    lp = torch.log_softmax(logits.float(), dim=-1).cpu()
    mask = shift != -100
    return (lp.gather(-1, shift.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask).sum(-1).tolist()


def score_image_choices(model, collator, tokenizer, rows, batch_size=16, letter_only=False,
                        progress=True) -> list[ChoiceScores]:
    """`score_choices` for image rows (stored prompt ids + figure ref), via `sequence_logprobs`."""
    targets, nbytes = [], []
    for r in rows:
        contents, t = candidate_targets(tokenizer, r["choices"], letter_only)
        nbytes.append([max(1, len(c.encode("utf-8"))) for c in contents])
        gold = t[list(r["choices"]).index(r["answer_label"])]
        if not letter_only and gold != r["target_ids"]:
            raise InputError(f"row {r['index']} ({r.get('source_file')} row {r.get('source_row')}): the stored "
                             f"target is not the training answer format prompts.candidate_contents builds "
                             f"(a --reasoning dataset?); evaluate it with --method generate")
        targets.append(t)
    out = []
    for start in tqdm(range(0, len(rows), batch_size), desc="scoring",
                      disable=not progress_bars_wanted(progress), leave=False):
        idx = list(range(start, min(start + batch_size, len(rows))))
        sums = sequence_logprobs(model, collator, [(rows[i]["prompt_ids"], t, rows[i]["image"])
                                                   for i in idx for t in targets[i]])
        k = 0
        for i in idx:
            letters = list(rows[i]["choices"])
            s = sums[k:k + len(letters)]
            k += len(letters)
            out.append(ChoiceScores(letters, s, [a / b for a, b in zip(s, nbytes[i])],
                                    [len(t) for t in targets[i]]))
    return out


def _user_text(row: dict, include_caption: bool = False) -> str:
    caption = row.get("caption") if include_caption else None
    return prompts.format_user_prompt(row["question"], row["choices"], caption or None)


def predict_score(model, tokenizer, rows, batch_size=16, letter_only=False, system_prompt=None,
                  progress=True, include_caption=False, collator=None) -> list[dict]:
    """Prediction records of choice scoring; `collator`: an image model's (rows carry their figure)."""
    if collator is not None:
        scores = score_image_choices(model, collator, tokenizer, rows, batch_size, letter_only, progress)
    else:
        items = [ScoreItem(_user_text(r, include_caption), r["choices"], r.get("prompt_ids")) for r in rows]
        scores = score_choices(model, tokenizer, items, batch_size=batch_size, letter_only=letter_only,
                               system_prompt=system_prompt, progress=progress)
    return [{"pred": s.letter, "pred_norm": s.letter_norm,
             "logprob": dict(zip(s.letters, [round(x, 4) for x in s.logprob])),
             "logprob_norm": dict(zip(s.letters, [round(x, 5) for x in s.logprob_norm]))} for s in scores]
