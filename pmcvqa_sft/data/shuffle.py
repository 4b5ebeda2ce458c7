"""Choice reshuffling: a fresh order of a row's choices each time the row is drawn (`--shuffle_choices`).

The preprocessed ids hold the choices in the release's order, so a model can learn "the answer to this
question is C" instead of binding the letter to the text it belongs to. `ShuffledChoices` wraps the
training collator: before padding, each row's choices are permuted (the gold letter follows its text),
and the row's prompt + target are re-encoded with the toolkit's own encoder (format/encoding.py's
RowEncoder / ImageRowEncoder, with the dataset's system prompt, reasoning and caption settings from its
preprocess report), so the labels still cover exactly the assistant answer + EOS.

The permutation of a row is seeded by (seed, row, epoch, how often the row was drawn in this epoch): a
rerun gives the same orders, and so does a resume after kill -9 (the trainer tells the collator the epoch,
replays the epoch's rows and skips the batches already trained, so every remaining row gets the order the
uninterrupted run gave it). Validation batches keep the stored order (`eval_collator`, used by the
trainer's eval loader), so every checkpoint's eval loss is measured on the same sequences. Image rows are
fitted to `max_length` counting the figure's tokens, as preprocessing counted them.
"""
from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Callable, Mapping, Sequence

from ..format.encoding import IGNORE_INDEX, ImageRowEncoder, RowEncoder
from .store import row_choices

SHUFFLE_COLUMNS = ("question", "caption", "choices", "answer_label", "source_file", "source_row")


def shuffle_choices(choices: Mapping[str, str], gold: str, rng: random.Random) -> tuple[dict[str, str], str]:
    """A random order of the present choices, relettered A, B, ... in order; the new gold letter."""
    letters = list(choices)
    texts = [choices[k] for k in letters]
    order = list(range(len(texts)))
    rng.shuffle(order)
    new = {letters[i]: texts[j] for i, j in enumerate(order)}
    return new, letters[order.index(letters.index(gold))]


def row_encoder_for(report: Mapping, tokenizer, processor=None) -> RowEncoder:
    """The encoder the dataset was built with (its preprocess report's prompt settings)."""
    args = (tokenizer, report.get("system_prompt"), report.get("reasoning", "none") == "brief",
            bool(report.get("include_caption")))
    return ImageRowEncoder(*args, processor) if processor is not None else RowEncoder(*args)


class ShuffledChoices:
    """Collator wrapper: re-encodes each row with freshly shuffled choices, then calls `inner`."""

    def __init__(self, inner: Callable, encoder: RowEncoder, max_length: int, seed: int = 0,
                 extra_tokens: Callable[[Mapping], int] | None = None):
        self.inner, self.enc, self.max_length, self.seed = inner, encoder, int(max_length), seed
        self.extra_tokens = extra_tokens  # row -> tokens it will have beyond its ids (a figure's expansion)
        self.epoch = 0
        self.draws: dict[tuple, int] = {}

    @property
    def eval_collator(self) -> Callable:
        """The collator for validation batches: stored orders, so each evaluation sees the same rows."""
        return self.inner

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer at each epoch start (also the resumed one): draws count within an epoch."""
        if int(epoch) != self.epoch:
            self.epoch, self.draws = int(epoch), {}

    def encode(self, row: Mapping, rng: random.Random) -> tuple[list[int], list[int]]:
        choices, gold = shuffle_choices(row_choices(row), row["answer_label"], rng)
        rec = SimpleNamespace(question=row["question"], caption=row.get("caption") or None, choices=choices,
                              answer_label=gold)
        (prompt,), (target,) = self.enc.encode([self.enc.messages(rec)])
        limit = self.max_length - (self.extra_tokens(row) if self.extra_tokens is not None else 0)
        fitted = self.enc.fit(rec, prompt, target, limit)
        if fitted is None:  # cannot happen for a row that fitted in the stored order; keep the stored one
            return list(row["input_ids"]), list(row["labels"])
        prompt_ids, target_ids, _ = fitted
        return prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids

    def __call__(self, features: Sequence[dict]):
        out = []
        for f in features:
            key = (f.get("source_file"), int(f["source_row"]))
            n = self.draws[key] = self.draws.get(key, -1) + 1
            ids, labels = self.encode(f, random.Random(f"{self.seed}/{key}/{self.epoch}/{n}"))
            out.append({**f, "input_ids": ids, "labels": labels})
        return self.inner(out)
