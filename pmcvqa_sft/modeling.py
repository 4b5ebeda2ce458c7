"""Loading the base model and tokenizer, quantization, and the LoRA config.

`--model` / `--tokenizer` take a hub id, a local folder, or `tiny` (the embedded offline model, built on
first use). Hub failures become one-line errors that name the offline alternatives.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from .errors import InputError

DEFAULT_MODEL = "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"
QUANTIZATIONS = ("8bit", "4bit", "none")
OFFLINE_HINT = ("Offline? pass --model tiny / --tokenizer tiny (the embedded tiny model) or a local folder "
                "with the downloaded model (hf download deepseek-ai/DeepSeek-R1-Distill-Llama-8B --local-dir DIR)")



class _DropExpectedNotices(logging.Filter):
    """Two bitsandbytes log lines that are expected and harmless, and would drown the progress bars:
    - 'MatMul8bitLt: inputs will be cast ... to float16', on every int8 matmul of a non-fp16 input
      (every step on the CPU, where we compute in fp32);
    - 'Failed to load CPU gemm_4bit_forward from kernels-community', on import: an optional fast kernel
      fetched from the hub; the built-in fallback is what runs and what the tests check."""

    def filter(self, record):
        msg = record.getMessage()
        return "inputs will be cast" not in msg and "kernels-community" not in msg


def quiet_bitsandbytes() -> None:
    """Install the filter (idempotent); done on import of this module, before bitsandbytes loads."""
    for name in ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropExpectedNotices) for f in log.filters):
            log.addFilter(_DropExpectedNotices())


quiet_bitsandbytes()


def progress_bars_wanted(asked: bool = True) -> bool:
    """Bars only when asked and stderr is a terminal: in a log file (CI, nohup, `| tee`) each redraw
    leaves a fragment. Also switches transformers' own bars ("Loading weights") off in that case."""
    import sys
    shown = bool(asked) and sys.stderr.isatty()
    if not shown:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    return shown
# PEFT and Trainer still call the pre-rename `is_gradient_checkpointing` and
# `gradient_checkpointing_enable` internally; the warning is
# theirs to fix and says nothing to our users.
warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing(_enable)?` is deprecated", category=FutureWarning)


def resolve_name(name: str) -> str:
    from . import tiny
    if name == "tiny-vision":  # the embedded image model (vision_model.py)
        from . import tiny_vision
        return str(tiny_vision.resolve(name))
    return tiny.resolve(name)


def _hub_kwargs(path: str) -> dict:
    """A hub id with no route to the hub (or offline mode) loads from the local cache only: a fast
    failure with our hint instead of minutes of retries."""
    from . import hub
    return {} if Path(path).exists() or not hub.local_only() else {"local_files_only": True}


def _hub_error(kind: str, name: str, exc: Exception) -> InputError:
    from . import hub
    reason = " ".join(str(exc).split())[:300]
    if not Path(name).exists() and not hub.offline() and hub.unreachable_reason():
        reason = f"{hub.unreachable_reason()} and not in the local cache"
    local = Path(name).exists()
    hint = "" if local else f" {OFFLINE_HINT}"
    return InputError(f"cannot load {kind} '{name}': {reason}.{hint}")


def load_tokenizer(name: str):
    """AutoTokenizer for a hub id, folder or `tiny`; the plain chat template is added when missing."""
    from transformers import AutoTokenizer

    from .encoding import ensure_chat_template
    path = resolve_name(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, **_hub_kwargs(path))
    except (OSError, ValueError) as exc:
        raise _hub_error("tokenizer", name, exc) from None
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


def load_model(name: str, quantization: str = "8bit", device_map=None, sharded: bool = False, auto_class=None,
               skip_modules: list[str] | None = None):
    """AutoModelForCausalLM for a hub id, folder or `tiny`, quantized as asked.

    `sharded=True` (FSDP / ZeRO-3): no device_map (the launcher places the shards) and 4-bit weights
    stored in the compute dtype; 8-bit weights cannot be sharded. Image models (vision_model.py) pass
    their auto class and the modules bitsandbytes must leave alone (`skip_modules`).
    """
    from transformers import AutoModelForCausalLM
    check_quantization(quantization)
    check_bitsandbytes(quantization)
    if sharded and quantization == "8bit":
        raise InputError("8-bit bases cannot be sharded by FSDP / DeepSpeed ZeRO-3: pass --quantization 4bit "
                         "(QLoRA) or none, or use configs/ddp.yaml")
    path = resolve_name(name)
    from .threads import configure_threads
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
        return (auto_class or AutoModelForCausalLM).from_pretrained(path, **kwargs, **_hub_kwargs(path))
    except (OSError, ValueError) as exc:
        raise _hub_error("model", name, exc) from None


def lora_config(r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules="all-linear"):
    """LoRA on every linear projection (q, k, v, o, gate, up, down) by default; lm_head is excluded."""
    from peft import LoraConfig
    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [m.strip() for m in target_modules.split(",") if m.strip()]
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      bias="none", task_type="CAUSAL_LM")
