"""Image placeholders in token sequences: the arithmetic of the image path, with no pixels touched.

The text path has no placeholders: every function here is then a no-op (no figure, no count, no ids).
The dataset stores one `<|image_pad|>` per figure (unexpanded): how many tokens a figure becomes depends
on `--max_pixels`, a training/inference choice. `num_image_tokens` predicts the count from the figure's
size (the image processor's own smart_resize arithmetic) and `expand_image_tokens` repeats the
placeholder; the processor's own expansion of the same text equals it (tests/test_tiny_vision.py).
"""
from __future__ import annotations

from typing import Sequence

from ..core.errors import InputError

# The training default of --max_pixels (train_sft_example.py; train/options.py uses it): 512 image tokens per figure for Qwen2/2.5-VL. Here so that preprocessing, which
# counts image tokens with it, needs no torch.
DEFAULT_MAX_PIXELS = 512 * 28 * 28
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"


def image_token_id(processor) -> int:
    """The id of the image placeholder (`<|image_pad|>`)."""
    return int(processor.image_token_id)


def image_settings(image_processor, max_pixels: int | None = None) -> dict:
    """The pixel bounds a figure is resized into: the processor's own, max_pixels capped if given.

    min_pixels is lowered to max_pixels when the cap is smaller (smart_resize needs min <= max).
    """
    size = image_processor.size
    lo, hi = int(size["shortest_edge"]), int(size["longest_edge"])
    if max_pixels is not None:
        hi = int(max_pixels)
        lo = min(lo, hi)
    return {"min_pixels": lo, "max_pixels": hi, "patch_size": int(image_processor.patch_size),
            "merge_size": int(image_processor.merge_size),
            "temporal_patch_size": int(image_processor.temporal_patch_size)}


def processor_size(image_processor, max_pixels: int | None = None) -> dict:
    """`size=` for an image processor call that resizes exactly as `num_image_tokens` predicts."""
    s = image_settings(image_processor, max_pixels)
    return {"shortest_edge": s["min_pixels"], "longest_edge": s["max_pixels"]}


def num_image_tokens(width: int, height: int, image_processor, max_pixels: int | None = None) -> int:
    """How many `<|image_pad|>` a width x height figure becomes (smart_resize, patches, merge).

    Raises ValueError for an aspect ratio the processor refuses (over 200:1).
    """
    s = image_settings(image_processor, max_pixels)
    patches = image_processor.get_number_of_image_patches(int(height), int(width), s)
    return patches // (s["merge_size"] ** 2)


def expand_image_tokens(ids: Sequence[int], labels: Sequence[int] | None, counts: Sequence[int],
                        token_id: int) -> tuple[list[int], list[int] | None]:
    """Repeat the i-th `token_id` placeholder counts[i] times; labels get -100 there (never trained).

    `labels` may be None (inference). The number of placeholders must equal len(counts).
    """
    found = sum(1 for t in ids if t == token_id)
    if found != len(counts):
        raise ValueError(f"{found} image placeholder(s) in the ids but {len(counts)} figure(s)")
    out_ids: list[int] = []
    out_labels: list[int] | None = None if labels is None else []
    k = 0
    for i, t in enumerate(ids):
        n = 1
        if t == token_id:
            n, k = int(counts[k]), k + 1
        out_ids.extend([t] * n)
        if out_labels is not None:
            out_labels.extend([-100] * n if t == token_id else [labels[i]])
    return out_ids, out_labels


def mm_token_type_ids(ids: Sequence[int], processor) -> list[int]:
    """1 at image placeholders, 2 at video ones, 0 elsewhere: what the processor returns for the model."""
    img, vid = int(processor.image_token_id), int(processor.video_token_id)
    return [1 if t == img else 2 if t == vid else 0 for t in ids]


def is_vision_processor(obj) -> bool:
    """An image-text processor (tokenizer + image processor), as opposed to a plain tokenizer."""
    return obj is not None and hasattr(obj, "image_processor") and hasattr(obj, "tokenizer")


def wants_mm_token_type_ids(model) -> bool:
    """Qwen2/2.5/3-VL compute their 3D rotary positions from `mm_token_type_ids` (1 on image tokens);
    without it they silently fall back to 1D positions."""
    import inspect
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "mm_token_type_ids" in inspect.signature(base.forward).parameters


def card_max_pixels(card) -> int | None:
    """The `--max_pixels` an adapter was trained with (None: no run card, the processor's own)."""
    return ((card or {}).get("args") or {}).get("max_pixels")


def check_max_pixels(max_pixels, report: dict | None = None, log=print) -> None:
    """--max_pixels is at least one merged patch; a note when it exceeds the cap preprocessing counted
    image tokens with (rows may then run past its --max_length)."""
    if max_pixels is not None and max_pixels < 28 * 28:
        raise InputError(f"--max_pixels must be at least {28 * 28} (one 28 x 28 patch), got {max_pixels}")
    pre = ((report or {}).get("image_processor") or {}).get("max_pixels")
    if max_pixels is not None and pre and max_pixels > pre:
        log(f"note: --max_pixels {max_pixels} is above the {pre} preprocessing counted image tokens with; "
            f"large figures may make rows longer than its --max_length")
