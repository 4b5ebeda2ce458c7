"""Batching for SFT: dynamic right padding, labels masked by POSITION, length-grouped sampling.

Why by position: DeepSeek-R1-Distill sets pad = EOS. A collator that masks `labels == pad_id` also masks
the real EOS closing every target, and the tuned model never learns to stop. Here the stored labels
(-100 on the prompt, the ids on the target and its EOS) are copied as they are and only the positions
past each row's real length get -100.

Length grouping (`EpochLengthGroupedSampler`) puts rows of similar length in the same micro-batch so
that few computed tokens are padding. It draws its shuffle from a generator seeded with
`seed + epoch`, never from the global RNG, so every process of a DDP run makes the same permutation
(each then takes its own shard) and a resumed run replays the interrupted epoch's order exactly.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Sampler

from .encoding import IGNORE_INDEX

LENGTH_COLUMN = "length"
ROW_ID_KEY = "row_ids"  # debug only: source rows of a batch, popped before the model sees the batch


class SFTCollator:
    """Pads `input_ids`/`labels` rows on the right into a batch for a causal LM.

    Returns `input_ids` (padded with `pad_token_id`), `attention_mask` (1 on real tokens) and `labels`
    (the stored labels; -100 on padding positions). With `with_row_ids=True` the batch also carries
    `row_ids` (the rows' `source_row`), for the distributed-data test; the trainer removes it.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, with_row_ids: bool = False):
        if pad_token_id is None:
            raise ValueError("the tokenizer has no pad token")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.with_row_ids = with_row_ids

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        width = max(lengths)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        n = len(features)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        for i, (f, length) in enumerate(zip(features, lengths)):
            if len(f["labels"]) != length:
                raise ValueError(f"row {i}: {length} input_ids but {len(f['labels'])} labels")
            input_ids[i, :length] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[i, :length] = torch.as_tensor(f["labels"], dtype=torch.long)
            attention_mask[i, :length] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.with_row_ids:
            batch[ROW_ID_KEY] = torch.as_tensor([int(f["source_row"]) for f in features], dtype=torch.long)
        return batch


def add_length_column(ds):
    """Precompute `length` (tokens per row) so the sampler doesn't scan every row at startup.

    Computed from the Arrow column in memory: nothing is written into the dataset folder (a `map` would
    leave cache files there, and DDP ranks would race on them).
    """
    import pyarrow.compute as pc
    if LENGTH_COLUMN in ds.column_names:
        return ds
    if getattr(ds, "_indices", None) is not None:
        ds = ds.flatten_indices()
    lengths = pc.list_value_length(ds.data.column("input_ids")).to_numpy()
    return ds.add_column(LENGTH_COLUMN, lengths.astype("int32"))


def lengths_of(ds) -> list[int]:
    """The `length` column as a plain list (one Arrow read, not a Python loop over rows)."""
    return ds.select_columns([LENGTH_COLUMN]).with_format("numpy")[:][LENGTH_COLUMN].tolist()


MEGABATCH_MULT = 50  # rows sorted together = 50 x group_size (transformers' cap), whatever the data size


class EpochLengthGroupedSampler(Sampler):
    """transformers' length grouping, but the shuffle depends only on (seed, epoch).

    Trainer's own `LengthGroupedSampler` for training draws from the global torch RNG, whose state when
    the dataloader is iterated differs between a fresh run and a resumed one; here `set_epoch` (called
    by Trainer/accelerate each epoch) picks the generator seed, so order is a pure function of the epoch.
    The megabatch (the rows sorted by length together) is always 50 groups: transformers shrinks it to a
    quarter of the data below 200 groups, which on 480 PMC-VQA-like rows (batch 8 x 2) left 11 % of the
    computed tokens as padding instead of 3 %; from 3,200 rows on both are the same.
    """

    def __init__(self, lengths: Sequence[int], group_size: int, seed: int):
        self.lengths = list(lengths)
        self.group_size = group_size
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.group_size, MEGABATCH_MULT, generator=g))


def real_token_share(lengths: Sequence[int], batch_size: int, order: Sequence[int] | None = None) -> float:
    """Share of computed tokens that are real when `order` is cut into batches of `batch_size`."""
    order = list(order if order is not None else range(len(lengths)))
    real = computed = 0
    for i in range(0, len(order), batch_size):
        chunk = [lengths[j] for j in order[i:i + batch_size]]
        real += sum(chunk)
        computed += max(chunk) * len(chunk)
    return real / computed if computed else 1.0
