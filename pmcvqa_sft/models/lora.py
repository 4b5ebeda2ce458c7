"""The LoRA config of a base model, text or image, and wrapping a loaded base with it.

Text LMs: LoRA on every linear projection (q, k, v, o, gate, up, down) by default; lm_head is excluded.
Image-text models: by default every linear layer of the language model only, given to PEFT as one
anchored regex (the vision blocks use the same leaf names, `mlp.gate_proj`, ..., so PEFT's `all-linear`
would adapt them too). `train_vision`: `none` (tower and projector frozen), `merger` (the projector
trained in full, `modules_to_save`), `lora` (projector in full + LoRA on the vision blocks' linear layers).
8-bit / 4-bit image bases keep the tower, projector and lm_head unquantized (`kind.Layout.skip_modules`:
the match is anchored at the start of the module name, so the bare `visual` would match nothing and the
vision tower would be quantized, and then the merger cannot train).
"""
from __future__ import annotations

import re

from ..core.errors import InputError
from .kind import Layout, is_vision_model, layout

TRAIN_VISION = ("none", "merger", "lora")


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
                train_vision: str = "none", train_head: bool = False):
    """The LoraConfig for base model `name` (text or image; see the module docstring). `train_head`:
    lm_head trained in full too (modules_to_save)."""
    from peft import LoraConfig
    head = ["lm_head"] if train_head else []
    if not is_vision_model(name):
        if isinstance(target_modules, str) and target_modules != "all-linear":
            target_modules = [m.strip() for m in target_modules.split(",") if m.strip()]
        return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                          modules_to_save=head or None, bias="none", task_type="CAUSAL_LM")
    lay = layout(name)
    save = [lay.projector.rsplit(".", 1)[-1]] if train_vision in ("merger", "lora") and lay.projector else []
    save = save + head or None
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=lora_targets(lay, target_modules, train_vision),
                      modules_to_save=save, bias="none", task_type="CAUSAL_LM")
