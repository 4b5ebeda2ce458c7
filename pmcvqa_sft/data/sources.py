"""Where the PMC-VQA CSVs come from: `--data` as a CSV file, a folder of release files, or a Hub id.

`resolve_data_files` maps `--data` to {split: [csv paths]}; `data.py` reads them. Hub downloads fetch only
the CSVs (never `load_dataset` on the whole repo: its mixed v1/v2 schemas break the loader), and offline
(HF_HUB_OFFLINE, or the one fast probe in `hub.py` fails) only the local cache is read.
"""
from __future__ import annotations

import os
from pathlib import Path
import re

from ..core import hub
from ..core.errors import InputError

# Known release files -> (version, split).
PMC_FILES: dict[str, tuple[str, str]] = {
    "train.csv": ("1", "train"), "test.csv": ("1", "test"), "test_clean.csv": ("1", "test_clean"),
    "train_2.csv": ("2", "train"), "test_2.csv": ("2", "test")}
HUB_DATASET_ID = "xmcmic/PMC-VQA"
HUB_FILES = {"1": ("train.csv", "test_clean.csv"), "2": ("train_2.csv", "test_2.csv")}

_OFFLINE_HINT = ("Offline? pass --data data/sample (the bundled sample) or --data /path/to/PMC-VQA "
                 "(a folder with train.csv, test_clean.csv or train_2.csv, test_2.csv)")


def _hub_reason(exc: BaseException) -> str:
    """One short line: the exception type, plus its root cause (e.g. a DNS failure)."""
    first = lambda e: (str(e).strip().splitlines() or [""])[0][:160]  # noqa: E731
    root, seen = exc, set()
    while (root.__cause__ or root.__context__) is not None and id(root) not in seen:
        seen.add(id(root))
        root = root.__cause__ or root.__context__
    if type(exc).__name__ == "LocalEntryNotFoundError":
        msg = "cannot reach the Hub and the file is not in the local cache"
    else:
        msg = f"{type(exc).__name__}: {first(exc)}"
    if root is not exc:
        msg += f"; cause: {type(root).__name__}: {first(root)}"
    return msg


def _folder_splits(folder: Path, version: str | None) -> dict[str, list[Path]]:
    present = {n: folder / n for n in PMC_FILES if (folder / n).is_file()}
    if not present:
        csvs = sorted(p.name for p in folder.glob("*.csv"))
        seen = f"found CSVs: {', '.join(csvs[:8])}" if csvs else "found no CSV files"
        raise InputError(
            f"folder '{folder}': no PMC-VQA CSVs; expected one of {', '.join(PMC_FILES)} "
            f"at its top level ({seen}; pass a CSV file itself with --data to read any name)")
    versions = {PMC_FILES[n][0] for n in present}
    if version is None:
        version = "1" if "1" in versions else "2"
    if version not in versions:
        raise InputError(f"folder '{folder}': no v{version} PMC-VQA CSVs (found {', '.join(present)})")
    out: dict[str, list[Path]] = {}
    if version == "1":
        if "train.csv" in present:
            out["train"] = [present["train.csv"]]
        if "test_clean.csv" in present:
            out["test"] = [present["test_clean.csv"]]
            if "test.csv" in present:
                out["test_full"] = [present["test.csv"]]
        elif "test.csv" in present:
            out["test"] = [present["test.csv"]]
    else:
        for n in ("train_2.csv", "test_2.csv"):
            if n in present:
                out[PMC_FILES[n][1]] = [present[n]]
    other = [p for n, p in present.items() if PMC_FILES[n][0] != version]
    if other:  # the two schemas are never mixed: name what was left out (the report's ignored_files)
        out[f"ignored_v{'2' if version == '1' else '1'}"] = other
    return out


def _hub_files(repo_id: str, cache_dir, version: str, local_note: str) -> dict[str, list[Path]]:
    def fail(reason: str) -> InputError:
        reason = " ".join(str(reason).split())[:400]
        return InputError(f"cannot download '{repo_id}' from the Hugging Face Hub ({reason}){local_note}. "
                          f"{_OFFLINE_HINT}")
    from huggingface_hub import hf_hub_download

    offline = hub.offline()
    local = offline or hub.unreachable_reason() is not None
    paths = []
    for fname in HUB_FILES[version]:
        try:
            # Offline: look in the local cache only, never on the network.
            p = hf_hub_download(repo_id, fname, repo_type="dataset", cache_dir=cache_dir,
                                local_files_only=local)
        except Exception as exc:  # any hub / network / cache error is the user's environment
            if offline:
                raise fail(f"HF_HUB_OFFLINE is set and {fname} is not in the local cache") from None
            if local:
                raise fail(f"{hub.unreachable_reason()}, and {fname} is not in the local cache") from None
            raise fail(f"{fname}: {_hub_reason(exc)}") from None
        paths.append(Path(p))
    return {"train": [paths[0]], "test": [paths[1]]}


def resolve_data_files(data: str, cache_dir=None, version: str | None = None) -> dict[str, list[Path]]:
    """Map `--data` to {split: [csv paths]}.

    - a CSV file -> {"train": [file]} (whatever its name);
    - a folder -> the known PMC-VQA files at its top level (not in subfolders). v1: "train" =
      train.csv; "test" = test_clean.csv (the paper's 2,000-row test set) when present, else
      test.csv; when both are present test.csv is also exposed as "test_full" (a superset of
      "test"). v2: "train" = train_2.csv, "test" = test_2.csv. `version` ("1"/"2") picks one
      schema; by default v1 when any v1 file is present, else v2 (never mixed). The other version's
      files present in the folder are listed under "ignored_v2" / "ignored_v1" (not read).
    - otherwise a Hub dataset id such as 'xmcmic/PMC-VQA': downloads only the CSVs with
      `hf_hub_download` (v1: train.csv + test_clean.csv; `version="2"`: train_2.csv + test_2.csv)
      into the Hub cache (`cache_dir`). With HF_HUB_OFFLINE set only the local cache is used.
    Errors (missing path, folder without known CSVs, hub/network failure) raise InputError.
    """
    if version is not None:
        version = str(version)
        if version not in HUB_FILES:
            raise InputError(f"unknown PMC-VQA version {version!r}: expected '1' or '2'")
    s = str(data).strip()
    if not s:
        raise InputError(f"empty --data; {_OFFLINE_HINT}")
    p = Path(os.path.expanduser(s))
    if p.is_file():
        return {"train": [p]}
    if p.is_dir():
        return _folder_splits(p, version)
    looks_local = (s.lower().endswith(".csv") or s.startswith((".", "/", "~")) or "\\" in s
                   or not re.fullmatch(r"[\w.-]+/[\w.-]+", s))
    if looks_local:
        raise InputError(f"--data '{s}': no such file or folder (and not a Hub dataset id "
                         f"like '{HUB_DATASET_ID}')")
    note = "; there is no local file or folder with that name either" if s != HUB_DATASET_ID else ""
    return _hub_files(s, cache_dir, version or "1", note)
