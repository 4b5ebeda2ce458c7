"""Is the Hugging Face Hub usable right now? Answered in a few seconds, never after minutes of retries.

huggingface_hub retries a failed request five times (about 23 s) and logs each retry, so without a
network a plain download prints a screenful before failing. We check offline mode first, then open one
TCP connection to the endpoint; when that fails, callers use the local cache only and, failing that,
give a one-line error that names the offline alternatives.
"""
from __future__ import annotations

from functools import lru_cache
import os
import socket
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline_vars() -> list[str]:
    """The offline switches set in the environment now (huggingface_hub reads its own at import only)."""
    return [v for v in OFFLINE_VARS if os.environ.get(v, "").strip().upper() in {"1", "ON", "YES", "TRUE"}]


def offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, also when set after huggingface_hub was imported."""
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE) or bool(offline_vars())


@lru_cache(maxsize=1)
def unreachable_reason() -> str | None:
    """None when the hub endpoint accepts a TCP connection, else a short reason (cached per process)."""
    from huggingface_hub import constants
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=PROBE_TIMEOUT_S).close()
        return None
    except OSError as exc:
        return f"{url.hostname}:{port} unreachable ({type(exc).__name__}: {exc})"


def local_only() -> bool:
    """True when downloads must come from the local cache: offline mode, or no route to the hub."""
    return offline() or unreachable_reason() is not None


OFFLINE_HINT = ("Offline? pass --model tiny / --tokenizer tiny (the embedded tiny model) or a local folder "
                "with the downloaded model (hf download deepseek-ai/DeepSeek-R1-Distill-Llama-8B --local-dir DIR)")


def hub_kwargs(path: str) -> dict:
    """A hub id with no route to the hub (or offline mode) loads from the local cache only: a fast
    failure with our hint instead of minutes of retries."""
    from pathlib import Path
    return {} if Path(path).exists() or not local_only() else {"local_files_only": True}


def hub_error(kind: str, name: str, exc: Exception):
    """The one-line InputError for a model, tokenizer or config that could not be loaded."""
    from pathlib import Path

    from .errors import InputError
    reason = " ".join(str(exc).split())[:300]
    if not Path(name).exists() and not offline() and unreachable_reason():
        reason = f"{unreachable_reason()} and not in the local cache"
    hint = "" if Path(name).exists() else f" {OFFLINE_HINT}"
    return InputError(f"cannot load {kind} '{name}': {reason}.{hint}")
