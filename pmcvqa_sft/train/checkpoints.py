"""Which Trainer checkpoint can be resumed from: the newest *complete* one.

A kill (or a full disk) while `Trainer` writes `checkpoint-N` leaves a partial folder, and resuming
from it dies deep inside `Trainer.train` with a traceback. Trainer writes, in order: the adapter
(`adapter_model.safetensors` + config), `optimizer.pt`, `scheduler.pt`, the RNG state(s)
(`rng_state.pth`, or `rng_state_<rank>.pth` per process), and last `trainer_state.json`. A checkpoint is
complete when all of them are present and readable: the JSON parses, the safetensors header fits the
file's size, and the torch files are whole zip archives (a truncated one loses its central directory,
which sits at the end). DeepSpeed writes its optimizer under `global_step*/`, FSDP under `optimizer_*`:
then that folder stands in for optimizer.pt / scheduler.pt.
"""
from __future__ import annotations

import json
from pathlib import Path
import re
import zipfile

from ..core.errors import InputError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _zip_ok(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as z:
            z.namelist()
        return None
    except (OSError, zipfile.BadZipFile) as exc:
        return f"{path.name} is truncated or unreadable ({type(exc).__name__})"


def _safetensors_ok(path: Path) -> str | None:
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            list(f.keys())
        return None
    except Exception as exc:  # safetensors raises its own SafetensorError for a short file
        return f"{path.name} is truncated or unreadable ({' '.join(str(exc).split())[:80]})"


def checkpoint_problem(ckpt) -> str | None:
    """None when `ckpt` is a complete Trainer checkpoint, else why not (short, for a one-line message)."""
    d = Path(ckpt)
    if not d.is_dir():
        return "no such folder" if not d.exists() else "not a folder"
    state = d / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json (Trainer writes it last: the save was cut)"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError):
        return "trainer_state.json is truncated or unreadable"
    weights = d / ADAPTER_WEIGHTS
    if not weights.is_file() and not (d / "model.safetensors").is_file():
        return f"no {ADAPTER_WEIGHTS}"
    problem = _safetensors_ok(weights if weights.is_file() else d / "model.safetensors")
    if problem:
        return problem
    sharded = any(d.glob("global_step*")) or any(d.glob("optimizer_*"))  # DeepSpeed / FSDP layouts
    needed = [] if sharded else ["optimizer.pt", "scheduler.pt"]
    for name in needed:
        if not (d / name).is_file():
            return f"no {name}"
    rng = sorted(d.glob("rng_state*.pth"))
    if not rng:
        return "no rng_state*.pth"
    for f in [d / n for n in needed] + rng:
        problem = _zip_ok(f)
        if problem:
            return problem
    return None


def list_checkpoints(out) -> list[Path]:
    """`checkpoint-<step>` folders in `out`, newest (highest step) first."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def newest_complete(out) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest complete checkpoint or None, [(newer partial checkpoint, why)] skipped on the way)."""
    skipped = []
    for ckpt in list_checkpoints(out):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt, skipped
        skipped.append((ckpt, problem))
    return None, skipped


def check_explicit(ckpt) -> str:
    """An explicitly named checkpoint must be complete: one-line error otherwise."""
    problem = checkpoint_problem(ckpt)
    if problem:
        raise InputError(f"--resume_from_checkpoint '{ckpt}' is not a complete Trainer checkpoint ({problem}); "
                         f"pass auto (the newest complete one) or another checkpoint-<step> folder")
    return str(ckpt)


def set_aside(partial: Path) -> Path:
    """Rename a partial checkpoint to `partial-<name>` so `auto` and Trainer's rotation (which globs
    `checkpoint-*` and would count a `checkpoint-6.partial` as step 6) ignore it; the next save of that
    step writes a fresh folder. Kept, not deleted: nothing is lost."""
    dest = partial.with_name(f"partial-{partial.name}")
    if dest.exists():
        import shutil
        shutil.rmtree(dest, ignore_errors=True)  # an older partial save of the same step
    partial.rename(dest)
    return dest


def newest_size(out) -> int | None:
    """Bytes of the newest complete checkpoint: about what the next save needs (None: no checkpoint)."""
    ckpt = newest_complete(out)[0]
    return sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) if ckpt else None


def drop_partial(out) -> None:
    """After a failed save (a full disk): remove the partial newest checkpoint(s), which also frees
    their space; complete ones are kept."""
    import shutil
    for ckpt in list_checkpoints(out):
        if checkpoint_problem(ckpt) is None:
            break
        shutil.rmtree(ckpt, ignore_errors=True)
