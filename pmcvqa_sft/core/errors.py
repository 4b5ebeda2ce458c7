"""User-facing errors: one line, exit code 2, never a traceback.

Every check of user input raises `InputError` with a message that names what is wrong and where
(file, row, column). Scripts wrap their `main()` with `run_main`, which prints the message on one
line to stderr and exits with code 2. Bugs (any other exception) still show their traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr with exit code 2, like every InputError."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


class InputError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def where(path=None, row: int | None = None, column: str | None = None) -> str:
    """`file 'x.csv', row 12, column 'Choice A'` — the location prefix of an InputError message.

    `row` is the 0-based data row (the header is not a row), the same number as `source_row`.
    """
    parts = []
    if path is not None:
        parts.append(f"file '{path}'")
    if row is not None:
        parts.append(f"row {row}")
    if column is not None:
        parts.append(f"column '{column}'")
    return ", ".join(parts)


def run_main(main: Callable[[], int | None]) -> None:
    """Run a script's main(); turn InputError into one line on stderr and exit code 2."""
    try:
        code = main()
    except InputError as exc:
        msg = " ".join(str(exc).split("\n"))
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
