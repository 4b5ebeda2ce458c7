"""Where things are: the repository root, the bundled samples, the built tiny models, and the model aliases.

The aliases `tiny`, `tiny-vision` and `tiny-reasoning` name the embedded offline models (models/tiny.py
builds them on first use); they are defined here, at the bottom of the package, so that low layers
(threads) can recognise them without importing the builders.
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository (or install) root
ARTIFACTS = ROOT / "artifacts"
SAMPLE_DIR = ROOT / "data" / "sample"
SAMPLE_VISION_DIR = ROOT / "data" / "sample_vision"

DEFAULT_MODEL = "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"
TINY_ALIAS = "tiny"
TINY_DIR = ARTIFACTS / "tiny-r1-llama"
TINY_VISION_ALIAS = "tiny-vision"
TINY_VISION_DIR = ARTIFACTS / "tiny-vision"
TINY_REASONING_ALIAS = "tiny-reasoning"  # the text model with merged letter+word tokens (make demo-reasoning)
TINY_REASONING_DIR = ARTIFACTS / "tiny-r1-llama-reasoning"
# the build record each tiny folder holds
TINY_STAMPS = ("tiny_build.json", "tiny_vision_build.json", "tiny_reasoning_build.json")


def is_tiny(model_name) -> bool:
    """True for the tiny aliases and for a folder built by models/tiny.py (any of its models)."""
    if model_name is None:
        return False
    name = str(model_name)
    if name in (TINY_ALIAS, TINY_VISION_ALIAS, TINY_REASONING_ALIAS):
        return True
    try:
        return any(os.path.isfile(os.path.join(name, s)) for s in TINY_STAMPS)
    except OSError:
        return False
