"""What the toolkit prints besides its own lines: progress bars only on a terminal, and library notices
that are expected and harmless kept out of the way."""
from __future__ import annotations

import logging
import sys
import warnings


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
    """Install the filter (idempotent); done on import of models/loading.py, before bitsandbytes loads."""
    for name in ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropExpectedNotices) for f in log.filters):
            log.addFilter(_DropExpectedNotices())


def quiet_library_warnings() -> None:
    """PEFT and Trainer still call the pre-rename `is_gradient_checkpointing` and
    `gradient_checkpointing_enable` internally; the warning is theirs to fix and says nothing to our users."""
    warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing(_enable)?` is deprecated",
                            category=FutureWarning)


def progress_bars_wanted(asked: bool = True) -> bool:
    """Bars only when asked and stderr is a terminal: in a log file (CI, nohup, `| tee`) each redraw
    leaves a fragment. Also switches transformers' own bars ("Loading weights") off in that case."""
    shown = bool(asked) and sys.stderr.isatty()
    if not shown:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    return shown
