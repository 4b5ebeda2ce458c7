"""The processor of an image-text model: a tokenizer + a PIL image processor + the chat template.

Why a subclass: transformers' `Qwen2_5_VLProcessor` requires a video processor, which needs torchvision
(not a dependency here); `AutoProcessor` therefore fails without it. The subclass keeps the Qwen2.5-VL
processor's text expansion (`<|image_pad|>` repeated to the figure's token count, `mm_token_type_ids`)
with the PIL image processor and the tokenizer only. Loading by name (`tiny-vision`, folder, hub id) is
models/loading.py's `load_processor`.
"""
from __future__ import annotations

from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

from ..format.media import IMAGE_TOKEN, VIDEO_TOKEN


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


def read_chat_template(path: str, **hub_kwargs) -> str | None:
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
