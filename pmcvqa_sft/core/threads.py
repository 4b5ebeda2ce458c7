"""How many CPU threads torch uses: chosen in one place, for every script, the tests and the benches.

Why not torch's default (one per core): on a small machine that is also running other work, two
OpenMP threads that spin-wait for each other stall whenever the scheduler parks one of them. Measured
on a 2-core machine shared with other jobs (bench/bench_threads.py, docs/BENCHMARKS.md): a tiny-model
training step was 10-15x slower with 2 threads than with 1, and 1 thread was never slower. The models
this toolkit runs on the CPU are the embedded tiny model (hidden size 128: too small to split over
threads usefully) and, rarely, an 8B model on a many-core server.

Applied by `models.loading.load_model` (every script and test that loads a model), training's setup, the tiny
model's builder, the merge and the quick test adapter; tests/conftest.py applies it to the test process.
Rule (`choose_threads`):
- an explicit value wins: `--threads N` on the scripts (remembered for the rest of the process), else
  the environment variable PMCVQA_THREADS;
- otherwise 1 thread for the embedded tiny model, and 1 thread on a CPU-only machine with few cores
  (<= SMALL_MACHINE_CORES), where a busy neighbour makes more threads slower, not faster;
- otherwise torch's own default (a GPU run, or a CPU server with many cores and a big model).
"""
from __future__ import annotations

import os

from .errors import InputError
from .paths import is_tiny

ENV = "PMCVQA_THREADS"
SMALL_MACHINE_CORES = 4


_explicit: int | None = None  # a --threads given earlier in this process wins over later automatic choices


def choose_threads(model_name=None, threads: int | None = None) -> int | None:
    """The intra-op thread count to use, or None to keep torch's default (see the module docstring)."""
    if threads is None:
        threads = _explicit
    if threads is None and os.environ.get(ENV, "").strip():
        raw = os.environ[ENV].strip()
        try:
            threads = int(raw)
        except ValueError:
            raise InputError(f"{ENV}={raw!r}: expected a whole number of threads (>= 1)") from None
    if threads is not None:
        if threads < 1:
            raise InputError(f"--threads / {ENV} must be at least 1 (got {threads})")
        return threads
    if is_tiny(model_name):
        return 1
    import torch
    if not torch.cuda.is_available() and (os.cpu_count() or 1) <= SMALL_MACHINE_CORES:
        return 1
    return None


def configure_threads(model_name=None, threads: int | None = None) -> int:
    """Apply `choose_threads`; returns the thread count torch now uses."""
    import torch
    global _explicit
    n = choose_threads(model_name, threads)
    if threads is not None:
        _explicit = n
    if n is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch.get_num_threads()
