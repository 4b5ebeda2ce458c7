"""Writing a benchmark's results JSON with machine-independent paths.

Absolute paths of the machine that ran a benchmark (its checkout, the temp folder) would make two
results files differ where nothing measured differs: paths inside the repository are written relative to
it (`artifacts/quick-adapters/...`), paths in the temp folder as `$TMPDIR/...`.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def portable(value, root: Path = ROOT):
    """`value` with every absolute path string made relative to `root` (or to the temp folder)."""
    if isinstance(value, dict):
        return {k: portable(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, root) for v in value]
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str) and os.path.isabs(value):
        for base, shown in ((root.resolve(), None), (Path(tempfile.gettempdir()).resolve(), "$TMPDIR")):
            try:
                rel = Path(value).resolve().relative_to(base)
            except ValueError:
                continue
            return str(rel) if shown is None else f"{shown}/{rel}"
    return value


def write_results(path, obj) -> Path:
    """`obj` as JSON at `path` (atomically), paths made portable."""
    import sys
    sys.path.insert(0, str(ROOT))
    from pmcvqa_sft.core.atomic import write_json
    return write_json(path, portable(obj), default=str)
