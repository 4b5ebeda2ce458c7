"""Loading the base model, tokenizer or processor, quantized as asked; which kind of model a name is.

`--model` / `--tokenizer` take a hub id, a local folder, `tiny` or `tiny-vision` (the embedded offline
models, built on first use). Hub failures become one-line errors that name the offline alternatives.
Image-text-to-text models (Qwen2.5-VL and kin) are the image variant of every function here:
- `is_vision_model(name)`: the config names an image-text-to-text architecture (`vision_config` + an
  `AutoModelForImageTextToText` mapping); the text/image decision of each stage is made with it, once.
- `load_model` loads either kind; for an image model bitsandbytes leaves the vision tower, the projector
  and lm_head alone (`models/lora.py` finds their real names: `Layout.skip_modules`).
- `load_processor`: tokenizer + image processor + chat template of an image model.
"""
from __future__ import annotations

import os
from pathlib import Path

from . import tiny
from ..core.errors import InputError
from ..core.hub import hub_error, hub_kwargs
from ..core.notices import progress_bars_wanted, quiet_bitsandbytes, quiet_library_warnings
from ..core.paths import DEFAULT_MODEL  # noqa: F401  (re-exported: the hub default)
from ..core.threads import configure_threads
from ..format.encoding import ensure_chat_template
from .kind import is_vision_model, layout
from .processor import make_processor, read_chat_template

QUANTIZATIONS = ("8bit", "4bit", "none")

quiet_bitsandbytes()  # before bitsandbytes loads
quiet_library_warnings()


def resolve_name(name: str) -> str:
    """`tiny` / `tiny-vision` / `tiny-reasoning` -> the built folder (built on first use); anything else unchanged."""
    return tiny.resolve(name)


def load_tokenizer(name: str):
    """AutoTokenizer for a hub id, folder or `tiny`; the plain chat template is added when missing."""
    from transformers import AutoTokenizer

    path = resolve_name(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, **hub_kwargs(path))
    except (OSError, ValueError) as exc:
        raise hub_error("tokenizer", name, exc) from None
    if tok.pad_token_id is None:  # DeepSeek sets pad = EOS; do the same for tokenizers without one
        tok.pad_token = tok.eos_token
    check_tokenizer(tok, name)
    return ensure_chat_template(tok)


# Plain text every usable tokenizer must encode and decode back (spacing aside).
PROBE_TEXT = "Which organ produces bile? A. Liver (MRI, 3 mm)"
# Characters outside any small vocabulary: a tokenizer that round-trips them maps every text to tokens.
_BYTE_PROBE = "é中😀ß"
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")


def _squeeze(s: str) -> str:
    return "".join(s.split())


def check_tokenizer(tok, name) -> None:
    """One-line error for a tokenizer that cannot round-trip plain text.

    A folder with only `tokenizer_config.json` loads without error as a tokenizer of the special
    tokens alone: every question, choice and answer then encodes to no tokens at all, and a whole
    preprocessing run "succeeds" with 6-token rows."""
    ids = tok(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    back = tok.decode(ids, skip_special_tokens=True) if ids else ""
    if _squeeze(back) == _squeeze(PROBE_TEXT):
        return
    what = f"encodes {PROBE_TEXT!r} to {'no tokens' if not ids else repr(back[:60])}"
    folder = Path(resolve_name(str(name)))
    if folder.is_dir():
        have = [f for f in _VOCAB_FILES if (folder / f).is_file()]
        what += (f"; the folder has {', '.join(have)}" if have else
                 f"; the folder has no vocabulary file ({', '.join(_VOCAB_FILES[:2])}, ...), only "
                 f"{', '.join(sorted(p.name for p in folder.iterdir())[:6]) or 'nothing'}")
    raise InputError(f"tokenizer '{name}' cannot round-trip text: it {what}; pass the folder or hub id of "
                     f"the model's complete tokenizer")


def covers_all_text(tok) -> bool:
    """True when characters far outside a small vocabulary round-trip (byte-level BPE, byte fallback):
    then no non-empty text can encode to nothing, and preprocessing need not check every row."""
    ids = tok(_BYTE_PROBE, add_special_tokens=False)["input_ids"]
    return bool(ids) and _squeeze(tok.decode(ids, skip_special_tokens=True)) == _BYTE_PROBE


def check_quantization(quantization: str) -> str:
    if quantization not in QUANTIZATIONS:
        raise InputError(f"unknown quantization '{quantization}': choose one of {', '.join(QUANTIZATIONS)}")
    return quantization


def compute_dtype():
    """bf16 where the GPU supports it, fp32 elsewhere (the CPU, older GPUs)."""
    import torch
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def device_map_for_process():
    """Each process keeps the whole (quantized) model on its own device: {'': local index} under DDP."""
    import torch
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        return {"": local}
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return {"": "mps"}
    return {"": "cpu"}


def check_bitsandbytes(quantization: str) -> None:
    """Fail early, in one line, when bitsandbytes can't run the requested quantization here."""
    if quantization == "none":
        return
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a broken CUDA setup raising at import
        raise InputError(f"--quantization {quantization} needs bitsandbytes, which failed to import "
                         f"({type(exc).__name__}: {exc}); pip install 'bitsandbytes>=0.45' or pass "
                         f"--quantization none") from None


def sharded_training() -> bool:
    """True under an accelerate FSDP or DeepSpeed ZeRO-3 launch (the weights get sharded across GPUs)."""
    env = os.environ
    return (env.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
            or (env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")
                and env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"))


def quantization_config(quantization: str, quant_storage=None):
    """BitsAndBytesConfig for 8bit / 4bit (NF4, double quant, compute in bf16 or fp32); None for none.

    `quant_storage`: the dtype 4-bit weights are packed in. FSDP / ZeRO-3 need it equal to the other
    weights' dtype (bf16) to flatten quantized and plain weights together; the default uint8 otherwise.
    """
    from transformers import BitsAndBytesConfig
    check_quantization(quantization)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "4bit":
        extra = {"bnb_4bit_quant_storage": quant_storage} if quant_storage is not None else {}
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype(), **extra)
    return None


def load_model(name: str, quantization: str = "8bit", device_map=None, sharded: bool = False):
    """The base model for a hub id, folder, `tiny` or `tiny-vision`, quantized as asked.

    Text LMs load with AutoModelForCausalLM; image-text models with AutoModelForImageTextToText, their
    vision tower, projector and lm_head left unquantized (`kind.Layout.skip_modules`).
    `sharded=True` (FSDP / ZeRO-3): no device_map (the launcher places the shards) and 4-bit weights
    stored in the compute dtype; 8-bit weights cannot be sharded.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    check_quantization(quantization)
    check_bitsandbytes(quantization)
    vision = is_vision_model(name)
    auto_class = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    skip_modules = layout(name).skip_modules() if vision and quantization != "none" else None
    if sharded and quantization == "8bit":
        raise InputError("8-bit bases cannot be sharded by FSDP / DeepSpeed ZeRO-3: pass --quantization 4bit "
                         "(QLoRA) or none, or use configs/ddp.yaml")
    path = resolve_name(name)
    configure_threads(path)  # 1 torch thread for the tiny model / small CPU machines (threads.py)
    progress_bars_wanted()
    kwargs = dict(dtype=compute_dtype())
    if not sharded:
        kwargs["device_map"] = device_map or device_map_for_process()
    qc = quantization_config(quantization, quant_storage=compute_dtype() if sharded else None)
    if qc is not None:
        if skip_modules:
            qc.llm_int8_skip_modules = list(skip_modules)
        kwargs["quantization_config"] = qc
    try:
        return auto_class.from_pretrained(path, **kwargs, **hub_kwargs(path))
    except (OSError, ValueError) as exc:
        raise hub_error("model", name, exc) from None


def load_processor(name_or_path: str):
    """`tiny-vision` (built on demand), a local folder or a hub id -> tokenizer + PIL image processor.

    The processor's chat template (chat_template.jinja/.json, as the hub repos ship it) is also set on
    the tokenizer, so text rendered by either is the same; pad = EOS when the tokenizer has no pad
    token. Hub failures are one-line errors.
    """
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = resolve_name(name_or_path)
    kw = hub_kwargs(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError) as exc:
        raise hub_error("processor", name_or_path, exc) from None
    try:
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, **kw)
    except (OSError, ValueError):  # a text model: its tokenizer loads, it has no preprocessor config
        raise InputError(f"'{name_or_path}' has no image processor (no preprocessor_config.json): figures need "
                         f"an image-text model such as Qwen/Qwen2.5-VL-7B-Instruct, or tiny-vision offline") from None
    template = read_chat_template(path, **kw) or getattr(tokenizer, "chat_template", None)
    if template:
        tokenizer.chat_template = template
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return make_processor(image_processor, tokenizer, template)
