"""Files written whole or not at all: every writer of the project goes through `atomic_path`."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary name beside `path` to write to, renamed to `path` when the block ends without error.

    The temporary name keeps the suffix (np.savez, savefig and to_parquet choose the format by it),
    so a reader never sees a half-written file and a failed write leaves the old one in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """`text` written to `path` through a temporary name."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
