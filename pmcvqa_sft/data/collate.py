"""Batching for SFT: dynamic right padding, labels masked by POSITION, length-grouped sampling.

Why by position: DeepSeek-R1-Distill sets pad = EOS. A collator that masks `labels == pad_id` also masks
the real EOS closing every target, and the tuned model never learns to stop. Here the stored labels
(-100 on the prompt, the ids on the target and its EOS) are copied as they are and only the positions
past each row's real length get -100.

Length grouping (`EpochLengthGroupedSampler`) puts rows of similar length in the same micro-batch so
that few computed tokens are padding. It draws its shuffle from a generator seeded with
`seed + epoch`, never from the global RNG, so every process of a DDP run makes the same permutation
(each then takes its own shard) and a resumed run replays the interrupted epoch's order exactly.

Image rows (`VisionCollator`, below) are the same contract with figures: each placeholder is expanded
to its figure's token count per batch, right padding, labels masked by position.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.data import Sampler

from ..format.encoding import IGNORE_INDEX
from ..format.media import (DEFAULT_MAX_PIXELS, expand_image_tokens, image_token_id, is_vision_processor,
                            num_image_tokens, processor_size, wants_mm_token_type_ids)

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

# ---------------------------------------------------------------------------------------------------
# Batching for image rows: figures are loaded and processed per batch, never stored as pixels.
#
# A preprocessed image dataset holds, per row, the token ids with ONE image placeholder per figure
# (`<|vision_start|><|image_pad|><|vision_end|>` for Qwen) and the figure's reference, width and height
# (`image`, `image_width`, `image_height`). How many tokens a figure becomes depends on `--max_pixels`,
# a training / inference choice, so the placeholder is expanded here, per batch:
# 1. load each row's figure (`figures.load_figure`, RGB), or a blank one of the same size (the blind
#    ablation);
# 2. run the image processor under the `max_pixels` cap (the figure is resized so that
#    width x height <= max_pixels, keeping its aspect ratio): `pixel_values`, `image_grid_thw`;
# 3. repeat each placeholder to the figure's token count (`format.media.expand_image_tokens`,
#    labels -100 there), right-pad, labels -100 on padding BY POSITION (the text collator's rule), and
#    `mm_token_type_ids` (1 on image tokens) for the models whose 3D rotary positions need it.
#
# `add_vision_length_column`: the length-grouping column counts the image tokens a row will have under
# the same cap, computed from the stored width/height without touching any pixels.
# ---------------------------------------------------------------------------------------------------

VISION_COLUMNS = ("image", "image_width", "image_height")


def process_images(image_processor, images: Sequence, max_pixels: int | None) -> dict:
    """pixel_values + image_grid_thw (Qwen) for a list of PIL images, under the pixel cap (the same
    bounds `format.media.num_image_tokens` predicts the token counts with)."""
    out = image_processor(images=list(images), return_tensors="pt", size=processor_size(image_processor, max_pixels))
    return dict(out)


def image_token_counts(image_processor, grid_thw) -> list[int]:
    merge = int(getattr(image_processor, "merge_size", 1) or 1)
    return [int(n) for n in (grid_thw.prod(-1) // (merge * merge)).tolist()]


def build_batch(rows: Sequence[tuple[Sequence[int], Sequence[int] | None]], images: Sequence, image_processor,
                image_token_id: int, pad_token_id: int, max_pixels: int | None, mm_token_type_ids: bool = True,
                left: bool = False) -> dict[str, torch.Tensor]:
    """(ids, labels or None) rows with unexpanded placeholders + their figures in order -> a padded batch.

    Right padding for training and scoring, `left=True` for generation (every prompt then ends at the
    last column). Labels are -100 on image tokens and padding; padding is masked by position.
    """
    vision = process_images(image_processor, images, max_pixels) if images else {}
    counts = image_token_counts(image_processor, vision["image_grid_thw"]) if images else []
    expanded, k = [], 0
    for i, (ids, labels) in enumerate(rows):
        if labels is not None and len(ids) != len(labels):
            raise ValueError(f"row {i}: {len(ids)} input_ids but {len(labels)} labels")
        n = sum(1 for t in ids if t == image_token_id)
        if k + n > len(counts):
            raise ValueError(f"row {i}: more image placeholders than figures ({len(counts)})")
        expanded.append(expand_image_tokens(ids, labels, counts[k:k + n], image_token_id))
        k += n
    if k != len(counts):
        raise ValueError(f"{len(counts)} figures but {k} image placeholders")
    width = max(len(ids) for ids, _ in expanded)
    n = len(expanded)
    input_ids = torch.full((n, width), int(pad_token_id), dtype=torch.long)
    labels_t = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    for i, (ids, labs) in enumerate(expanded):
        cols = slice(width - len(ids), width) if left else slice(0, len(ids))
        input_ids[i, cols] = torch.as_tensor(ids, dtype=torch.long)
        if labs is not None:
            labels_t[i, cols] = torch.as_tensor(labs, dtype=torch.long)
        attention_mask[i, cols] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, **vision}
    if any(labs is not None for _, labs in expanded):
        batch["labels"] = labels_t
    if mm_token_type_ids:
        batch["mm_token_type_ids"] = ((input_ids == image_token_id) & attention_mask.bool()).int()
    return batch


class VisionCollator:
    """Rows -> a batch for an image-text-to-text model (right-padded, figures processed per batch).

    `load_image(ref)` returns the row's figure as a PIL image; `blank(img)` (the blind ablation) replaces
    it by a uniform one of the same size. The batch holds input_ids, attention_mask, labels,
    pixel_values, image_grid_thw (when the batch has figures) and mm_token_type_ids (when asked).
    A figure used by several rows of one batch (the choices of a scored question) is loaded once.
    """

    def __init__(self, image_processor, image_token_id: int, pad_token_id: int, load_image: Callable,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, mm_token_type_ids: bool = True,
                 blank: Callable | None = None, with_row_ids: bool = False):
        if pad_token_id is None:
            raise ValueError("the tokenizer has no pad token")
        self.image_processor = image_processor
        self.image_token_id = int(image_token_id)
        self.pad_token_id = int(pad_token_id)
        self.load_image = load_image
        self.max_pixels = max_pixels
        self.mm_token_type_ids = mm_token_type_ids
        self.blank = blank
        self.with_row_ids = with_row_ids

    def figures(self, features: Sequence[dict]) -> list:
        imgs, seen = [], {}
        for f in features:
            ref = f.get("image")
            if ref:
                if ref not in seen:
                    img = self.load_image(ref)
                    seen[ref] = self.blank(img) if self.blank is not None else img
                imgs.append(seen[ref])
        return imgs

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        for i, f in enumerate(features):
            n = sum(1 for t in f["input_ids"] if t == self.image_token_id)
            if n != (1 if f.get("image") else 0):
                raise ValueError(f"row {i}: {n} image placeholders for {1 if f.get('image') else 0} figure")
        batch = build_batch([(f["input_ids"], f["labels"]) for f in features], self.figures(features),
                            self.image_processor, self.image_token_id, self.pad_token_id, self.max_pixels,
                            self.mm_token_type_ids)
        if self.with_row_ids:
            batch[ROW_ID_KEY] = torch.as_tensor([int(f["source_row"]) for f in features], dtype=torch.long)
        return batch


def add_vision_length_column(ds, image_processor, max_pixels: int | None):
    """`length` = stored tokens - placeholders + image tokens under the cap, for length grouping.

    Computed from the width/height columns (one token count per distinct size), no figure opened.
    """
    import numpy as np
    import pyarrow.compute as pc

    if LENGTH_COLUMN in ds.column_names:
        ds = ds.remove_columns([LENGTH_COLUMN])
    if getattr(ds, "_indices", None) is not None:
        ds = ds.flatten_indices()
    text = pc.list_value_length(ds.data.column("input_ids")).to_numpy().astype("int64")
    sizes = ds.select_columns(["image_width", "image_height"]).with_format("numpy")[:]
    w, h = sizes["image_width"].astype("int64"), sizes["image_height"].astype("int64")
    has = np.array([bool(x) for x in ds.data.column("image").to_pylist()]) if "image" in ds.column_names \
        else np.ones(len(text), bool)
    cache: dict[tuple[int, int], int] = {}
    extra = np.zeros(len(text), "int64")
    for i in np.flatnonzero(has):
        key = (int(w[i]), int(h[i]))
        if key not in cache:
            cache[key] = num_image_tokens(key[0], key[1], image_processor, max_pixels)
        extra[i] = cache[key] - 1  # the placeholder itself is already counted
    return ds.add_column(LENGTH_COLUMN, (text + extra).astype("int32"))


def target_logits_only(inputs: dict) -> dict:
    """Ask the model for logits only where some row of the batch has a target, not on the prompts.

    The loss ignores prompt positions (-100) anyway; skipping them saves most of the lm_head matmul and
    the (vocab x length) logits memory, large for a 128k vocabulary. `shift_labels` are the labels the
    kept logits predict, so the loss (and its normalisation by `num_items_in_batch`) is unchanged.
    """
    labels = inputs.get("labels")
    if labels is None or "logits_to_keep" in inputs:
        return inputs
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    keep = (shifted != -100).any(dim=0).nonzero().flatten()
    if keep.numel() == 0 or keep.numel() == labels.shape[1]:
        return inputs
    return {**inputs, "logits_to_keep": keep, "shift_labels": shifted[:, keep].contiguous()}


def make_collator(tokenizer_or_processor, model=None, load_image: Callable | None = None, max_pixels=None,
                  blank: Callable | None = None, with_row_ids: bool = False):
    """The collator for a model: `SFTCollator` for a tokenizer, `VisionCollator` for an image processor
    (`load_image(ref)`: the figure of a row; `blank`: the blind ablation's replacement)."""
    if not is_vision_processor(tokenizer_or_processor):
        return SFTCollator(tokenizer_or_processor.pad_token_id, with_row_ids=with_row_ids)
    proc = tokenizer_or_processor
    return VisionCollator(proc.image_processor, image_token_id(proc), proc.tokenizer.pad_token_id, load_image,
                          max_pixels=max_pixels, mm_token_type_ids=wants_mm_token_type_ids(model),
                          blank=blank, with_row_ids=with_row_ids)
