"""Image-text-to-text models (Qwen2.5-VL and kin): loading, quantization that spares the vision tower,
and the LoRA config for the language model (optionally the projector / vision blocks too).

- `is_vision_model(name)`: the config names an image-text-to-text architecture (`vision_config` +
  an `AutoModelForImageTextToText` mapping). `tiny-vision` is the embedded offline one.
- The module layout (vision tower, projector, language model) is read from the architecture itself,
  built on the meta device (no weights, instant even for 7B), so the names used below are the
  model's real ones: Qwen2.5-VL has `model.visual` (with `model.visual.merger`) and
  `model.language_model`; LLaVA-style models `model.vision_tower` + `model.multi_modal_projector`.
- 8-bit / 4-bit: `BitsAndBytesConfig(llm_int8_skip_modules=[tower, projector, "lm_head"])`. The match is
  anchored at the start of the module name, so the bare `visual` would match nothing and the vision
  tower would be quantized (then the merger cannot train); `model.visual` works (tested: no bitsandbytes
  layer under the tower after loading).
- LoRA targets: by default every linear layer of the language model only (q/k/v/o/gate/up/down), given
  to PEFT as one anchored regex. The vision blocks use the same leaf names (`mlp.gate_proj`, ...), so
  PEFT's `all-linear` would adapt them too. `train_vision`: `none` (tower and projector frozen),
  `merger` (the projector trained in full, `modules_to_save`), `lora` (projector in full + LoRA on the
  vision blocks' linear layers).
"""
from __future__ import annotations

import re
from functools import lru_cache

from .errors import InputError

TRAIN_VISION = ("none", "merger", "lora")
TOWER_NAMES = ("visual", "vision_tower", "vision_model", "vision_encoder")
PROJECTOR_NAMES = ("merger", "multi_modal_projector", "connector", "mm_projector")
VISION_ALIAS = "tiny-vision"


def resolve_name(name: str) -> str:
    from . import tiny_vision
    return str(tiny_vision.resolve(name))


def _config(name: str):
    from transformers import AutoConfig

    from .modeling import _hub_error, _hub_kwargs
    path = resolve_name(name)
    try:
        return AutoConfig.from_pretrained(path, **_hub_kwargs(path))
    except (OSError, ValueError) as exc:
        raise _hub_error("model config", name, exc) from None


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
    if name == VISION_ALIAS:
        return True
    try:
        return is_vision_config(_config(name))
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
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText
    cfg = _config(path)
    with init_empty_weights():
        meta = AutoModelForImageTextToText.from_config(cfg)
    return Layout([(n, type(m).__name__ if isinstance(m, torch.nn.Linear) else "") for n, m in meta.named_modules()])


def layout(name: str) -> Layout:
    return _layout_for(resolve_name(name))


def load_vision_model(name: str, quantization: str = "8bit", device_map=None, sharded: bool = False):
    """AutoModelForImageTextToText for a hub id, folder or `tiny-vision`: the LM quantized as asked, the
    vision tower, projector and lm_head left unquantized."""
    from transformers import AutoModelForImageTextToText

    from .modeling import check_quantization, load_model
    check_quantization(quantization)
    skip = layout(name).skip_modules() if quantization != "none" else None
    return load_model(name, quantization, device_map, sharded, auto_class=AutoModelForImageTextToText,
                      skip_modules=skip)


def lora_targets(lay: Layout, target_modules: str = "all-linear", train_vision: str = "none") -> str:
    """One regex PEFT full-matches against module names: the LM's linear layers (all, or the leaf
    names listed in `target_modules`, e.g. q_proj,v_proj), plus the vision blocks' with `lora`."""
    if train_vision not in TRAIN_VISION:
        raise InputError(f"unknown --train_vision '{train_vision}': choose one of {', '.join(TRAIN_VISION)}")
    leaves = lay.linear_leaves(lay.language_model)
    if target_modules and target_modules != "all-linear":
        want = [m.strip() for m in target_modules.split(",") if m.strip()]
        leaves = [f for f in leaves if f.rsplit(".", 1)[-1] in want]
        if not leaves:
            raise InputError(f"--target_modules '{target_modules}' names no linear layer of the language model "
                             f"(it has {sorted({f.rsplit('.', 1)[-1] for f in lay.linear_leaves(lay.language_model)})})")
    parts = [f"{re.escape(lay.language_model)}\\.({'|'.join(_esc(f) for f in leaves)})"]
    if train_vision == "lora":
        vleaves = lay.linear_leaves(lay.tower, exclude=lay.projector)
        if vleaves:
            parts.append(f"{re.escape(lay.tower)}\\.({'|'.join(_esc(f) for f in vleaves)})")
    return "^(" + "|".join(parts) + ")$"


def _esc(leaf: str) -> str:
    return re.escape(leaf).replace(re.escape(r"\d+"), r"\d+")


def lora_config(name: str, r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules="all-linear",
                train_vision: str = "none"):
    from peft import LoraConfig
    lay = layout(name)
    save = [lay.projector.rsplit(".", 1)[-1]] if train_vision in ("merger", "lora") and lay.projector else None
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=lora_targets(lay, target_modules, train_vision),
                      modules_to_save=save, bias="none", task_type="CAUSAL_LM")


def build_vision_model(o, tokenizer=None, log=print):
    """training.build_model for an image-text-to-text base: quantized LM, LoRA, tower frozen by default."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from .modeling import device_map_for_process, sharded_training
    sharded = sharded_training()
    model = load_vision_model(o.model, o.quantization, device_map=device_map_for_process(), sharded=sharded)
    model.config.use_cache = False
    if o.quantization != "none" and not sharded:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=o.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = lora_config(o.model, o.lora_r, o.lora_alpha, o.lora_dropout, o.target_modules,
                      getattr(o, "train_vision", "none"))
    model = get_peft_model(model, cfg)
    trainable, total = model.get_nb_trainable_parameters()
    log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%); "
        f"vision: {getattr(o, 'train_vision', 'none')}")
    return model, {"trainable": trainable, "total": total, "percent": 100 * trainable / total}


def wants_mm_token_type_ids(model) -> bool:
    """Qwen2/2.5/3-VL compute their 3D rotary positions from `mm_token_type_ids` (1 on image tokens);
    without it they silently fall back to 1D positions."""
    import inspect
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "mm_token_type_ids" in inspect.signature(base.forward).parameters
