"""Adapters: finding and checking a training run's adapter, loading a model for inference (base, base +
LoRA adapter, or merged; text or image), and `merge_and_save`.

- `--adapter DIR` is a training output folder: `adapter_config.json` is looked for in DIR, then in
  DIR/adapter. Its base model is the adapter config's `base_model_name_or_path` unless `--model`
  overrides it. The tokenizer and chat template come from the training output (adapter folder, then
  the folder above it): the exact ones used in training.
- Checks before loading weights, each a one-line InputError: the adapter's tokenizer must fit the
  base's vocabulary, the adapter's LoRA shapes must fit the base's hidden size and layer count, and a
  `--model` override must use the same chat template as the adapter's tokenizer.
- Quantization default: 8-bit on CUDA (an 8B model then fits a 16 GB card), none elsewhere: on the CPU
  bitsandbytes' 8-bit matmul works but is slower than fp32, and the tiny model doesn't need it.
- `merge_and_save` reloads the base UNQUANTIZED (in its stored dtype) for the merge: adding LoRA deltas
  to 8-bit weights would round them again (PEFT refuses or degrades), so the merged model is exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import json
import os
from pathlib import Path
from typing import Mapping

from . import loading as modeling
from .. import prompts
from ..core.atomic import atomic_dir, check_output_dir
from ..core.errors import InputError
from ..core.hub import hub_error, hub_kwargs
from ..core.threads import configure_threads
from ..data.store import ADAPTER_DIR, RUN_CARD
from ..format.encoding import template_hash
from .kind import is_vision_model

ADAPTER_CONFIG = "adapter_config.json"
TRAIN_OUTPUT_DIR = "model"   # make demo / make demo-vision train into RUN/model; `--adapter RUN` finds it there


def default_quantization() -> str:
    import torch
    return "8bit" if torch.cuda.is_available() else "none"


def find_adapter_dir(path) -> Path:
    """DIR, DIR/adapter, DIR/model or DIR/model/adapter (the run folder make demo prints), whichever holds
    adapter_config.json first; one-line error otherwise."""
    d = Path(path)
    if not d.exists():
        raise InputError(f"adapter folder '{path}' does not exist")
    if not d.is_dir():
        raise InputError(f"adapter '{path}' is a file; pass the training output folder")
    for cand in (d, d / ADAPTER_DIR, d / TRAIN_OUTPUT_DIR, d / TRAIN_OUTPUT_DIR / ADAPTER_DIR):
        if (cand / ADAPTER_CONFIG).is_file():
            return cand
    raise InputError(f"'{path}' holds no {ADAPTER_CONFIG} (looked in it, its adapter/, model/ and model/adapter/ "
                     f"subfolders); pass the output folder of train_sft_example.py")


def _is_local_path(name: str) -> bool:
    """A folder path rather than a hub id ('org/name'): absolute, ./ ../ ~, or more than one '/'."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
            or (os.sep != "/" and os.sep in name))


def _has_tokenizer(d: Path) -> bool:
    return (d / "tokenizer_config.json").is_file() or (d / "tokenizer.json").is_file()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise InputError(f"file '{path}' is not valid JSON ({exc})") from None


def training_files(adapter_dir: Path) -> tuple[Path | None, dict]:
    """(folder holding the training tokenizer, run card) near an adapter folder."""
    folders = [adapter_dir] + ([adapter_dir.parent] if adapter_dir.name == ADAPTER_DIR else [])
    tok_dir = next((f for f in folders if _has_tokenizer(f)), None)
    card = next((_read_json(f / RUN_CARD) for f in folders if (f / RUN_CARD).is_file()), {})
    return tok_dir, card


def _lora_shapes(adapter_dir: Path) -> tuple[int | None, int]:
    """(input width of the q_proj LoRA A matrices = base hidden size, number of layers touched)."""
    import re

    from safetensors import safe_open
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise InputError(f"adapter folder '{adapter_dir}' lacks adapter_model.safetensors")
    hidden, layers = None, set()
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            m = re.search(r"layers\.(\d+)\.", key)
            if m:
                layers.add(int(m.group(1)))
            if hidden is None and re.search(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.lora_A\b", key):
                hidden = f.get_slice(key).get_shape()[1]
    return hidden, (max(layers) + 1 if layers else 0)


def check_adapter_fits(adapter_dir: Path, base: str, tokenizer) -> None:
    """One-line errors when the adapter (or its tokenizer) was trained for another base model."""
    from transformers import AutoConfig
    path = modeling.resolve_name(base)
    try:  # offline or no route to the hub: the local cache only, not 27 s of retries (hub.py)
        cfg = AutoConfig.from_pretrained(path, **hub_kwargs(path))
    except (OSError, ValueError) as exc:
        raise hub_error("model", base, exc) from None
    cfg = cfg.get_text_config()  # image-text models: the language model's sizes
    vocab = getattr(cfg, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise InputError(f"adapter '{adapter_dir}' does not match base model '{base}': its tokenizer has "
                         f"{len(tokenizer)} tokens, the model's vocabulary {vocab}")
    hidden, n_layers = _lora_shapes(adapter_dir)
    base_hidden = getattr(cfg, "hidden_size", None)
    if hidden is not None and base_hidden is not None and hidden != base_hidden:
        raise InputError(f"adapter '{adapter_dir}' does not match base model '{base}': LoRA input width "
                         f"{hidden}, model hidden size {base_hidden}")
    base_layers = getattr(cfg, "num_hidden_layers", None)
    if base_layers is not None and n_layers > base_layers:
        raise InputError(f"adapter '{adapter_dir}' does not match base model '{base}': it adapts "
                         f"{n_layers} layers, the model has {base_layers}")


@dataclass
class Loaded:
    model: object
    tokenizer: object
    base: str                       # the base model name/folder
    adapter_dir: Path | None
    quantization: str
    system_prompt: str | None = None
    card: dict = field(default_factory=dict)
    processor: object = None        # image-text models: tokenizer + image processor

    @property
    def has_adapter(self) -> bool:
        return self.adapter_dir is not None


def base_and_tokenizer(model: str | None, adapter: str | None):
    """(base name, tokenizer, adapter dir, run card) without loading weights; runs every check."""
    if adapter is None:
        name = model or modeling.DEFAULT_MODEL
        return name, modeling.load_tokenizer(name), None, {}
    adir = find_adapter_dir(adapter)
    acfg = _read_json(adir / ADAPTER_CONFIG)
    base = model or acfg.get("base_model_name_or_path")
    if not base:
        raise InputError(f"'{adir / ADAPTER_CONFIG}' names no base model; pass --model")
    if model is None and _is_local_path(base) and not Path(base).expanduser().exists():
        raise InputError(f"adapter '{adapter}' was trained on the local folder '{base}' (base_model_name_or_path "
                         f"in {adir / ADAPTER_CONFIG}), which does not exist here; pass --model with that base "
                         f"model's folder or hub id")
    tok_dir, card = training_files(adir)
    tokenizer = modeling.load_tokenizer(str(tok_dir) if tok_dir else base)
    if model is not None and tok_dir is not None:
        try:
            model_tok = modeling.load_tokenizer(model)
        except InputError:
            model_tok = None  # a weights-only folder: nothing to compare
        if model_tok is not None and template_hash(model_tok) != template_hash(tokenizer):
            raise InputError(f"adapter '{adapter}' was trained with another chat template than --model "
                             f"'{model}' has (template hash {template_hash(tokenizer)[:12]} vs "
                             f"{template_hash(model_tok)[:12]}); pass the adapter's own base model")
    check_adapter_fits(adir, base, tokenizer)
    return base, tokenizer, adir, card


def card_system_prompt(card: Mapping) -> str | None:
    pre = card.get("preprocess_report") or {}
    for d in (card, card.get("args") or {}, pre, pre.get("args") or {} if isinstance(pre, Mapping) else {}):
        if isinstance(d, Mapping) and d.get("system_prompt"):
            return d["system_prompt"]
    return prompts.SYSTEM_PROMPT


def load_for_inference(model: str | None = None, adapter: str | None = None, quantization: str | None = None,
                       device_map=None, log=print) -> Loaded:
    """Base (`model`), base + adapter, or a merged folder (`model`), ready for generation and scoring."""
    quantization = modeling.check_quantization(quantization or default_quantization())
    base, tokenizer, adir, card = base_and_tokenizer(model, adapter)
    log(f"loading {base} ({'no quantization' if quantization == 'none' else quantization})"
        + (f" + adapter {adir}" if adir else ""))
    processor = None
    if is_vision_model(base):  # an image model: its processor (the training run's, as trained)
        processor = modeling.load_processor(str(training_files(adir)[0] or base) if adir else base)
        tokenizer = processor.tokenizer
    net = modeling.load_model(base, quantization=quantization, device_map=device_map)
    if adir is not None:
        from peft import PeftModel
        try:
            net = PeftModel.from_pretrained(net, str(adir))
        except (RuntimeError, ValueError, KeyError) as exc:  # shape mismatches surface here
            raise InputError(f"adapter '{adir}' does not fit base model '{base}': "
                             f"{' '.join(str(exc).split())[:200]}") from None
    net.eval()
    return Loaded(net, tokenizer, base, adir, quantization, card_system_prompt(card), card, processor)


# ---------------------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------------------


def merge_and_save(adapter: str, out_dir, model: str | None = None, overwrite: bool = False, log=print) -> Path:
    """Base + adapter merged into one standalone folder (weights + tokenizer) AutoModelForCausalLM loads."""
    from peft import PeftModel
    import torch
    from transformers import AutoModelForCausalLM

    out = check_output_dir(out_dir, overwrite, "merge_card.json", "a merged model", "--merge_and_save")
    base, tokenizer, adir, card = base_and_tokenizer(model, adapter)
    log(f"merging: reloading base '{base}' UNQUANTIZED in its stored dtype (merging into 8-bit/4-bit "
        f"weights would round the LoRA update away)")
    from transformers import AutoModelForImageTextToText

    configure_threads(modeling.resolve_name(base))
    auto = AutoModelForCausalLM
    if is_vision_model(base):  # an image model: its own auto class; the processor (image settings) goes along
        tokenizer, auto = modeling.load_processor(str(training_files(adir)[0] or base)), AutoModelForImageTextToText
    net = auto.from_pretrained(modeling.resolve_name(base), dtype="auto", device_map={"": "cpu"})
    try:
        net = PeftModel.from_pretrained(net, str(adir))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise InputError(f"adapter '{adir}' does not fit base model '{base}': "
                         f"{' '.join(str(exc).split())[:200]}") from None
    with torch.no_grad():
        merged = net.merge_and_unload()
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "merge_card.json").write_text(json.dumps(
            {"base_model": base, "adapter": str(adir), "dtype": str(next(merged.parameters()).dtype),
             "template_hash": template_hash(tokenizer), "training_run_card": card}, indent=2))
    log(f"merged model written to {out} (load it with --model {out})")
    return out
