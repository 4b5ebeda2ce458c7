"""bench/results/*.json hold no machine-specific absolute path: results compare across machines."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _strings(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


def test_results_files_hold_no_absolute_paths():
    files = sorted((ROOT / "bench" / "results").glob("*.json"))
    assert files
    bad = {f.name: s for f in files for s in _strings(json.loads(f.read_text())) if os.path.isabs(s)}
    assert bad == {}


def test_write_results_makes_paths_relative(tmp_path):
    sys.path.insert(0, str(ROOT))
    from bench.results_io import write_results
    out = write_results(tmp_path / "r.json", {"adapter": str(ROOT / "artifacts" / "x"), "n": 3,
                                              "tmp": [str(Path(tempfile.gettempdir()) / "run" / "a")],
                                              "hub": "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"})
    got = json.loads(Path(out).read_text())
    assert got == {"adapter": "artifacts/x", "n": 3, "tmp": ["$TMPDIR/run/a"],
                   "hub": "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"}


def test_bench_scripts_import_what_exists():
    """Every `from pmcvqa_sft... import name` in bench/ (worker code in strings included) names something that
    exists: bench_threads.py's worker still imported the pre-restructure modules until 2026-12-04."""
    import importlib
    import re
    sys.path.insert(0, str(ROOT))
    pattern = re.compile(r"^\s*from (pmcvqa_sft[\w.]*) import ([\w, ]+?)\s*(?:#.*)?$", re.MULTILINE)
    missing, seen = [], 0
    for f in sorted((ROOT / "bench").glob("*.py")):
        for mod_name, names in pattern.findall(f.read_text()):
            mod = importlib.import_module(mod_name)
            for name in (n.strip().split(" as ")[0] for n in names.split(",")):
                seen += 1
                if not hasattr(mod, name):
                    try:
                        importlib.import_module(f"{mod_name}.{name}")
                    except ImportError:
                        missing.append(f"{f.name}: from {mod_name} import {name}")
    assert seen > 20 and missing == []
