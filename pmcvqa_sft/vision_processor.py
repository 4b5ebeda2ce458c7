"""The processor of an image-text model, and placeholder arithmetic, with no pixels touched.

    load_processor("tiny-vision" | local folder | "Qwen/Qwen2.5-VL-7B-Instruct")

Why a subclass: transformers' `Qwen2_5_VLProcessor` requires a video processor, which needs torchvision
(not a dependency here); `AutoProcessor` therefore fails without it. The subclass keeps the Qwen2.5-VL
processor's text expansion (`<|image_pad|>` repeated to the figure's token count, `mm_token_type_ids`)
with the PIL image processor and the tokenizer only.

The dataset stores one `<|image_pad|>` per figure (unexpanded): how many tokens a figure becomes depends
on `--max_pixels`, a training/inference choice. `num_image_tokens` predicts the count from the figure's
size (the image processor's own smart_resize arithmetic) and `expand_image_tokens` repeats the
placeholder; the processor's own expansion of the same text equals it (tests/test_tiny_vision.py).
"""
from __future__ import annotations

from typing import Sequence

from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

# The training default of --max_pixels (train_sft_example.py; vision_collate.DEFAULT_MAX_PIXELS is the same,
# a test keeps them equal): 512 image tokens per figure for Qwen2/2.5-VL. Here so that preprocessing, which
# counts image tokens with it, needs no torch.
DEFAULT_MAX_PIXELS = 512 * 28 * 28
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"


class ImageTextProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor with an image processor and a tokenizer only (no video, no torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
        self.video_token = getattr(tokenizer, "video_token", None) or VIDEO_TOKEN
        self.image_token_id = (getattr(tokenizer, "image_token_id", None)
                               or tokenizer.convert_tokens_to_ids(self.image_token))
        self.video_token_id = (getattr(tokenizer, "video_token_id", None)
                               or tokenizer.convert_tokens_to_ids(self.video_token))
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def make_processor(image_processor, tokenizer, chat_template: str | None = None) -> ImageTextProcessor:
    """Processor from parts; the chat template defaults to the tokenizer's."""
    return ImageTextProcessor(image_processor, tokenizer,
                              chat_template=chat_template or getattr(tokenizer, "chat_template", None))


def _read_chat_template(path: str, **hub_kwargs) -> str | None:
    """The processor-level chat template of a local folder or hub repo, if it ships one."""
    import json
    import os

    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        try:
            found = path + os.sep + name if os.path.isdir(path) else cached_file(
                path, name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        except OSError:
            found = None
        if found and os.path.isfile(found):
            text = open(found, encoding="utf-8").read()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


def load_processor(name_or_path: str) -> "ImageTextProcessor":
    """`tiny-vision` (built on demand), a local folder or a hub id -> tokenizer + PIL image processor.

    The processor's chat template (chat_template.jinja/.json, as the hub repos ship it) is also set on
    the tokenizer, so text rendered by either is the same. Hub failures are one-line errors.
    """
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from .modeling import _hub_error, _hub_kwargs
    from .tiny_vision import resolve

    path = resolve(name_or_path)
    kw = _hub_kwargs(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError) as exc:
        raise _hub_error("processor", name_or_path, exc) from None
    try:
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, **kw)
    except (OSError, ValueError):  # a text model: its tokenizer loads, it has no preprocessor config
        from .errors import InputError
        raise InputError(f"'{name_or_path}' has no image processor (no preprocessor_config.json): figures need "
                         f"an image-text model such as Qwen/Qwen2.5-VL-7B-Instruct, or tiny-vision offline") from None
    template = _read_chat_template(path, **kw) or getattr(tokenizer, "chat_template", None)
    if template:
        tokenizer.chat_template = template
    return make_processor(image_processor, tokenizer, template)


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
