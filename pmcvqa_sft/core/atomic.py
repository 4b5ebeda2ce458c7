"""Never lose data: outputs are written to a temporary sibling and renamed into place.

A kill at any moment leaves either the old output or the new one, never half of one. Renames stay on
one file system because the temporary path sits beside the final one.
"""
from __future__ import annotations

from contextlib import contextmanager
import errno
import json
import os
from pathlib import Path
import shutil
import tempfile


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def make_temp_dir(prefix: str, parent) -> Path:
    """A temp folder beside the output, with the mode an ordinary `mkdir` would give it (0755 under the
    usual umask 022): `tempfile.mkdtemp` makes it private (0700), and renamed into place it would stay so."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


def ordinary_modes(root: Path) -> None:
    """Folders 0777 and files 0666 minus the umask (0755 / 0644 usually) under `root`: some writers make
    private files (safetensors: 0600), and an output is for whoever may read the folder it lands in."""
    mask = _umask()
    for p in [root, *root.rglob("*")]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def replace_dir(tmp: Path, out: Path) -> None:
    """Move folder `tmp` to `out`; an existing `out` is moved aside first and deleted only afterwards.
    The moved tree gets ordinary permissions first (`ordinary_modes`)."""
    tmp, out = Path(tmp), Path(out)
    ordinary_modes(tmp)
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
    tmp = make_temp_dir(f".{out.name}.{tag}-{os.getpid()}-", out.parent)
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


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


NO_SPACE_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
NEARLY_FULL = 1 << 20  # bytes


def disk_full_error(exc: BaseException, folder, needed=None, hint: str = ""):
    """For 'no space left on device' (or an exceeded quota): a one-line InputError naming `folder`, the
    free space and, when known, about how much was needed (bytes, or a function giving them); None for
    any other error.

    Not every writer says ENOSPC: safetensors raises SafetensorError('... No space left on device (os
    error 28)'), torch.save a RuntimeError ('unexpected pos ...'). So an error counts as a full disk when
    it says so, or when the folder's device is (nearly) full right after it.
    """
    from .errors import InputError
    if not isinstance(exc, Exception) or isinstance(exc, InputError):
        return None
    where = Path(folder)
    probe = next((p for p in (where, *where.parents) if p.exists()), Path("."))
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return None
    said = getattr(exc, "errno", None) in NO_SPACE or any(t in str(exc) for t in NO_SPACE_TEXT)
    if not (said or free < NEARLY_FULL):
        return None
    needed = needed() if callable(needed) else needed
    need = f", about {_mb(needed)} needed" if needed else ""
    return InputError(f"no space left on the device of '{folder}' ({_mb(free)} free{need}); the partial "
                      f"output was removed and nothing earlier was changed{hint}")


@contextmanager
def disk_full_is_input_error(folder, needed=None, cleanup=None, hint: str = ""):
    """`disk_full_error` for the block. `cleanup()` runs first (e.g. removing a partial checkpoint, which
    also gives the space back). Callers write into temp folders that their own `finally` removes, so
    earlier outputs stay as they were."""
    try:
        yield
    except Exception as exc:
        err = disk_full_error(exc, folder, needed, hint)
        if err is None:
            raise
        if cleanup is not None:
            cleanup()
        raise err from None
