"""Never lose data: outputs are written to a temporary sibling and renamed into place.

A kill at any moment leaves either the old output or the new one, never half of one. Renames stay on
one file system because the temporary path sits beside the final one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def replace_dir(tmp: Path, out: Path) -> None:
    """Move folder `tmp` to `out`; an existing `out` is moved aside first and deleted only afterwards."""
    tmp, out = Path(tmp), Path(out)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextmanager
def atomic_dir(out, tag: str = "tmp"):
    """`with atomic_dir(out) as tmp:` write into `tmp`; on success it becomes `out` (replacing it)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}-{os.getpid()}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; outputs are ordinary folders
    try:
        yield tmp
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path, obj, **dump_kw) -> Path:
    """JSON to `path` through a temporary sibling file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, **dump_kw))
    os.replace(tmp, path)
    return path


def check_output_dir(output_dir, overwrite: bool, marker: str, what: str, flag: str = "--output_dir") -> Path:
    """Refuse an existing output without --overwrite; with it, replace only a folder this tool wrote
    (one holding `marker`), never an unrelated one such as a training run or a home folder."""
    from .errors import InputError
    out = Path(output_dir).expanduser()
    if out.exists():
        if not overwrite:
            raise InputError(f"output folder '{out}' exists; pass --overwrite to replace it")
        if not out.is_dir():
            raise InputError(f"output '{out}' is a file, not a folder; refusing to replace it")
        if any(out.iterdir()) and not (out / marker).exists():
            raise InputError(f"output folder '{out}' is not {what} (no {marker}); refusing to replace it, "
                             f"choose another {flag}")
    if out.parent.exists() and not out.parent.is_dir():
        raise InputError(f"{flag} '{out}': '{out.parent}' is a file, not a folder")
    return out
