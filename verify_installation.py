"""Check that this machine can run the toolkit, and say how to fix what it can't.

    python verify_installation.py                 # everything in requirements.txt, device, bitsandbytes, disk, hub
    python verify_installation.py --smoke         # + a ~30 s end-to-end run on the embedded tiny model
    python verify_installation.py --minimal       # preprocessing only (requirements-minimal.txt; no torch)
    python verify_installation.py --json report.json   # also write the results as JSON (`-`: stdout only)

Rows: ✓ pass, ! warning, ✗ failure; each ! and ✗ row prints its fix. Exit code 0 when nothing failed.
Warnings do not fail the check: a machine with no GPU, an offline hub or a small disk runs the tiny demo
(`--model tiny`) fine, and the warning says what the 8B run needs instead. Exit code 1 when a check
failed, 2 on bad arguments. The hub token is never printed (only "set" / "not set").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from pmcvqa_sft.core.errors import InputError, OneLineParser, run_main


def parse_args(argv=None):
    from pmcvqa_sft.verify import environment as env
    p = OneLineParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    # ---- what to check ----
    p.add_argument("--requirements", default=None,
                   help=f"requirements file to compare installed versions with (default: {env.REQUIREMENTS.name}, "
                        f"or {env.REQUIREMENTS_MINIMAL.name} with --minimal)")
    p.add_argument("--minimal", action="store_true",
                   help="preprocessing-only install: check requirements-minimal.txt and skip torch, "
                        "bitsandbytes and the smoke test")
    p.add_argument("--smoke", action="store_true",
                   help="also run a ~30 s end-to-end test on the tiny model (8-bit + LoRA, 10 steps, one "
                        "generation; builds the tiny model on first use)")
    # ---- where the real run will write ----
    p.add_argument("--cache_dir", default=None,
                   help="where the hub downloads go (default: the Hugging Face cache, HF_HUB_CACHE / HF_HOME)")
    p.add_argument("--output_dir", default="runs",
                   help="where checkpoints and processed datasets will go (default: %(default)s)")
    # ---- output ----
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write the results as JSON to PATH (`-`: print only the JSON, to stdout)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    return p.parse_args(argv)


def write_json(path: str, payload: dict, overwrite: bool) -> None:
    target = Path(path)
    if target.exists() and not overwrite:
        raise InputError(f"'{target}' exists: pass --overwrite to replace it, or choose another --json path")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, ensure_ascii=False)
    os.replace(tmp, target)  # atomic: a reader never sees half a report


def main(argv=None) -> int:
    args = parse_args(argv)
    from pmcvqa_sft.verify import checks, environment as env
    if args.minimal and args.smoke:
        raise InputError("--smoke needs the full install (torch, bitsandbytes): drop --minimal")
    if args.json and args.json != "-" and Path(args.json).exists() and not args.overwrite:
        raise InputError(f"'{args.json}' exists: pass --overwrite to replace it, or choose another --json path")
    requirements = args.requirements or (env.REQUIREMENTS_MINIMAL if args.minimal else env.REQUIREMENTS)
    if args.cache_dir is None:
        from huggingface_hub import constants
        args.cache_dir = constants.HF_HUB_CACHE
    quiet = args.json == "-"
    progress = (lambda msg: None) if quiet else (lambda msg: print(f"... {msg}", file=sys.stderr, flush=True))
    rows = env.run_checks(requirements, args.cache_dir, args.output_dir, minimal=args.minimal,
                          smoke=args.smoke, progress=progress)
    payload = checks.to_json(rows, requirements=str(requirements), minimal=args.minimal, smoke=args.smoke)
    if quiet:
        print(json.dumps(payload, indent=2, ensure_ascii=False))
    else:
        print(f"Installation check ({Path(requirements).name}{', smoke test' if args.smoke else ''}):")
        print(checks.format_table(rows))
        if args.json:
            write_json(args.json, payload, args.overwrite)
            print(f"results written to {args.json}")
    return 0 if payload["ok"] else 1


if __name__ == "__main__":
    run_main(main)
