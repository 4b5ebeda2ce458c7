"""Which kind of model a name is (text LM or image-text-to-text), and where an image model's parts are.

- `is_vision_model(name)`: the config names an image-text-to-text architecture (`vision_config` +
  an `AutoModelForImageTextToText` mapping). `tiny-vision` is the embedded offline one. Each stage makes
  its text-or-image decision once, with this.
- `layout(name)`: the module layout (vision tower, projector, language model), read from the architecture
  itself, built on the meta device (no weights, instant even for 7B), so the names used for quantization
  and LoRA are the model's real ones: Qwen2.5-VL has `model.visual` (with `model.visual.merger`) and
  `model.language_model`; LLaVA-style models `model.vision_tower` + `model.multi_modal_projector`.
"""
from __future__ import annotations

from functools import lru_cache
import re

from ..core.errors import InputError
from ..core.hub import hub_error, hub_kwargs
from ..core.paths import TINY_VISION_ALIAS
from .tiny import resolve

TOWER_NAMES = ("visual", "vision_tower", "vision_model", "vision_encoder")
PROJECTOR_NAMES = ("merger", "multi_modal_projector", "connector", "mm_projector")


def model_config(name: str):
    """The model's config (a hub id, folder, `tiny` or `tiny-vision`); hub failures in one line."""
    from transformers import AutoConfig

    path = resolve(name)
    try:
        return AutoConfig.from_pretrained(path, **hub_kwargs(path))
    except (OSError, ValueError) as exc:
        raise hub_error("model config", name, exc) from None


def is_vision_config(cfg) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    return getattr(cfg, "vision_config", None) is not None and \
        getattr(cfg, "model_type", None) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def is_vision_model(name: str | None) -> bool:
    """True for `tiny-vision` and any image-text-to-text model (hub id or folder); False for text LMs.

    A name whose config cannot be read (offline, typo) counts as text: the text path then reports the
    load error in its own words."""
    if not name:
        return False
    if name == TINY_VISION_ALIAS:
        return True
    try:
        return is_vision_config(model_config(name))
    except InputError:
        return False


class Layout:
    """Full module names of the vision tower, projector and language model, and the linear leaves."""

    def __init__(self, names_and_types: list[tuple[str, str]]):
        names = [n for n, _ in names_and_types]
        self.tower = _first(names, TOWER_NAMES)
        self.projector = _first(names, PROJECTOR_NAMES)
        self.language_model = _first(names, ("language_model",))
        if self.tower is None or self.language_model is None:
            raise InputError("cannot find the vision tower and the language model in this architecture "
                             f"(looked for {TOWER_NAMES} and language_model)")
        self.linears = [n for n, t in names_and_types if t == "Linear"]

    def linear_leaves(self, under: str, exclude: str | None = None) -> list[str]:
        """Names of linear layers under `under` relative to it, layer indices replaced by `\\d+`."""
        out = set()
        for n in self.linears:
            if n.startswith(under + ".") and not (exclude and n.startswith(exclude + ".")):
                out.add(re.sub(r"\.\d+\.", r".\\d+.", n[len(under) + 1:]))
        return sorted(out)

    def skip_modules(self) -> list[str]:
        """What bitsandbytes must leave unquantized: the whole tower (projector included) and lm_head."""
        skip = [self.tower]
        if self.projector and not self.projector.startswith(self.tower + "."):
            skip.append(self.projector)
        return skip + ["lm_head"]


def _first(names: list[str], leaves: tuple[str, ...]) -> str | None:
    hits = [n for n in names if n.rsplit(".", 1)[-1] in leaves]
    return min(hits, key=len) if hits else None


@lru_cache(maxsize=8)
def _layout_for(path: str) -> Layout:
    from accelerate import init_empty_weights
    import torch
    from transformers import AutoModelForImageTextToText
    cfg = model_config(path)
    with init_empty_weights():
        meta = AutoModelForImageTextToText.from_config(cfg)
    return Layout([(n, type(m).__name__ if isinstance(m, torch.nn.Linear) else "") for n, m in meta.named_modules()])


def layout(name: str) -> Layout:
    return _layout_for(resolve(name))
