"""The package's shape: imports go one way (the import-linter contract in .importlinter), no import circles
(imports inside functions count), no module over 600 lines. Each check is also shown to fail on a
temporary copy of the package with one bad import added."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "pmcvqa_sft"
LINT = Path(sys.executable).parent / "lint-imports"
MAX_LINES = 600


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--config", str(root / ".importlinter"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)


def circles(root: Path) -> list[list[str]]:
    """Import circles between the package's modules, from grimp's graph (function-level imports included)."""
    code = r"""
import json, sys, grimp
g = grimp.build_graph("pmcvqa_sft", cache_dir=None)
mods = sorted(g.modules)
edges = {m: sorted(g.find_modules_directly_imported_by(m)) for m in mods}
found, state, stack = [], {}, []
def visit(m):
    state[m] = 1; stack.append(m)
    for n in edges[m]:
        if state.get(n) == 1:
            found.append(stack[stack.index(n):] + [n])
        elif n not in state:
            visit(n)
    stack.pop(); state[m] = 2
for m in mods:
    if m not in state:
        visit(m)
print(json.dumps(found))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    import json
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def bad_copy(tmp_path_factory):
    """A copy of the package + contract to break."""
    root = tmp_path_factory.mktemp("arch")
    shutil.copytree(PKG, root / "pmcvqa_sft", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", root / ".importlinter")
    return root


def test_the_contract_holds():
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_no_import_circles():
    assert circles(ROOT) == []


def test_no_module_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_contract_fails_on_an_upward_import_inside_a_function(bad_copy):
    target = bad_copy / "pmcvqa_sft" / "core" / "errors.py"
    original = target.read_text()
    target.write_text(original + "\n\ndef _upward():\n    from ..evaluate import accuracy  # core must not see evaluate\n"
                      "    return accuracy\n")
    try:
        out = lint(bad_copy)
        assert out.returncode != 0
        assert "BROKEN" in out.stdout and "pmcvqa_sft.core.errors -> pmcvqa_sft.evaluate.accuracy" in out.stdout
    finally:
        target.write_text(original)


def test_contract_fails_when_two_stages_import_each_other(bad_copy):
    target = bad_copy / "pmcvqa_sft" / "train" / "plots.py"
    original = target.read_text()
    target.write_text(original + "\n\ndef _sideways():\n    from ..infer import generation\n    return generation\n")
    try:
        out = lint(bad_copy)
        assert out.returncode != 0 and "pmcvqa_sft.train.plots -> pmcvqa_sft.infer.generation" in out.stdout
    finally:
        target.write_text(original)


def test_circle_check_finds_a_circle_made_inside_a_function(bad_copy):
    a, b = bad_copy / "pmcvqa_sft" / "core" / "atomic.py", bad_copy / "pmcvqa_sft" / "core" / "errors.py"
    orig_a, orig_b = a.read_text(), b.read_text()
    b.write_text(orig_b + "\n\ndef _back():\n    from . import atomic\n    return atomic\n")
    try:
        found = circles(bad_copy)
        assert any(set(c) == {"pmcvqa_sft.core.atomic", "pmcvqa_sft.core.errors"} for c in found), found
    finally:
        a.write_text(orig_a), b.write_text(orig_b)
