"""What every command shares: how bad input ends it, and how a list is given as a flag or YAML value.

Exit status of every command (README "Exit status"): 0 done; 2 bad input (a flag, config file,
dataset or run folder that cannot be used: the status argparse gives an unknown flag), reported as
one line `PROG: error: ...` on stderr, with nothing written or nothing already written lost;
1 a failure while running (a NaN loss), also one line.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

BAD_INPUT = 2
FAILED = 1


class BadInput(ValueError):
    """Input a command cannot use (a flag, file, dataset or run folder): one line on stderr, exit status 2."""


def output_folder(path, flag: str = "--output_dir") -> Path:
    """`path` as a folder to write into (it may not exist yet); BadInput when it is an existing file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BadInput(f"{flag} {path} is a file; choose a folder path")
    return path


def run_command(main: Callable[[list[str] | None], int | None], prog: str, argv: list[str] | None = None,
                bad_input: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError),
                failures: tuple[type[BaseException], ...] = ()) -> int:
    """`main(argv)`'s status, or one line on stderr and BAD_INPUT / FAILED for the given exception types."""
    try:
        return main(argv) or 0
    except failures + bad_input as error:
        report_error(prog, str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
        return FAILED if isinstance(error, failures) else BAD_INPUT


def report_error(prog: str, message: str) -> None:
    """`PROG: error: message` on stderr, once per machine: under a launcher (accelerate launch, torchrun) only the
    first process of each node prints it, so N processes that all refuse the same input give one line."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"{prog}: error: {message}", file=sys.stderr)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors (an unknown or malformed flag) are the project's one line and exit status 2,
    without the usage block (`--help` shows it)."""

    def error(self, message: str):
        report_error(self.prog, f"{message} (see --help)")
        sys.exit(BAD_INPUT)


def parse_list(value, cast=float) -> list:
    """'1,3,7.5', a YAML list, or repeated flag values (each may hold commas) -> list of `cast` values; None -> []."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    return [cast(part.strip() if isinstance(part, str) else part) for item in items
            for part in (str(item).split(",") if isinstance(item, str) else [item])
            if not (isinstance(part, str) and not part.strip())]
