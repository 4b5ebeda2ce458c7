"""Every command in README.md and docs/ names a script, a flag and a make target that exist."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = ["preprocess_pmc_vqa_for_sft.py", "train_sft_example.py", "inference_example.py",
           "verify_installation.py", "test_preprocessing.py"]
FLAG = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*)")


def _command_lines(text: str):
    """Shell lines of fenced code blocks plus inline `python …`/`make …` spans, continuations joined."""
    blocks = re.findall(r"```(?:bash|sh|shell|console)?\n(.*?)```", text, re.S)
    lines = []
    for block in blocks:
        lines += block.replace("\\\n", " ").splitlines()
    lines += re.findall(r"`((?:python|accelerate launch|make)\s[^`]+)`", text)
    return [ln.split(" #")[0].strip().lstrip("$ ") for ln in lines if ln.strip()]


@lru_cache(maxsize=None)
def _script_flags(script: str) -> frozenset[str]:
    out = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, f"{script} --help failed: {out.stderr[-500:]}"
    return frozenset(FLAG.findall(out.stdout)) | {"--help"}


def _make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


def _uses():
    for doc in DOCS:
        for line in _command_lines(doc.read_text()):
            try:
                words = shlex.split(line)
            except ValueError:
                words = line.split()
            for i, w in enumerate(words):
                if w in SCRIPTS or w.endswith(tuple("/" + s for s in SCRIPTS)):
                    script = Path(w).name
                    flags = []
                    for arg in words[i + 1:]:
                        if arg in ("&&", "|", ";", "||"):
                            break
                        flags += FLAG.findall(arg.split("=")[0]) if arg.startswith("--") else []
                    yield doc.relative_to(ROOT), script, flags
                    break
                if w == "make" and i + 1 < len(words) and not words[i + 1].startswith("-"):
                    yield doc.relative_to(ROOT), "Makefile", [words[i + 1].split("=")[0]]
                    break


def test_docs_exist():
    names = {p.name for p in DOCS}
    for need in ["README.md", "INSTALLATION.md", "QUICKSTART.md", "PREPROCESSING.md", "TRAINING.md",
                 "INFERENCE_AND_EVALUATION.md", "BENCHMARKS.md", "TROUBLESHOOTING.md"]:
        assert need in names, f"docs/{need} missing"
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme


def test_every_documented_command_names_real_flags():
    uses = list(_uses())
    assert len(uses) >= 10, "expected the docs to show commands"
    targets = _make_targets()
    problems = []
    for doc, script, flags in uses:
        if script == "Makefile":
            if flags[0] not in targets and "=" not in flags[0]:
                problems.append(f"{doc}: make {flags[0]} (no such target)")
            continue
        if not (ROOT / script).exists():
            problems.append(f"{doc}: {script} does not exist")
            continue
        known = _script_flags(script)
        problems += [f"{doc}: {script} {f} (no such flag)" for f in flags if f not in known]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_help(script):
    """argparse prints a help line for each option; an option with no help text shows nothing after it."""
    out = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300).stdout
    assert "usage:" in out
    opts = re.findall(r"^  (-[^\n]*)\n(?P<next>[^\n]*)", out, re.M)
    for line, nxt in opts:
        first = line.strip()
        has_inline = len(re.split(r"\s{2,}", first)) > 1
        assert has_inline or nxt.startswith(" " * 10), f"{script}: option without help: {first}"
