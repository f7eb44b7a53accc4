"""Files and folders written whole or not at all: every writer of the project goes through these."""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
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


def read_utf8_text(path: str | Path) -> str:
    """The text of a UTF-8 file; ValueError naming the file, line and column of the first byte that is not UTF-8."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise ValueError(f"{path} line {line}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {column}); "
                         f"save the file as UTF-8") from None


def write_text_atomic(path: str | Path, text: str) -> None:
    """`text` written to `path` through a temporary name."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def replace_marked_block(path: str | Path, name: str, text: str) -> None:
    """Put `text` between the lines `<!-- NAME:start -->` and `<!-- NAME:end -->` of the file at `path`.

    The file must hold each marker exactly once (ValueError otherwise, the file untouched); it is
    rewritten atomically, so a README is never left half-published.
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    body = Path(path).read_text()
    if body.count(start) != 1 or body.count(end) != 1:
        raise ValueError(f"{path} needs one {start} and one {end} line around the published figures")
    head, rest = body.split(start)
    tail = rest.split(end)[1]
    write_text_atomic(path, f"{head}{start}\n{text}{end}{tail}")


def write_folder_atomically(write: Callable[[Path], None], output_dir: str | Path) -> None:
    """Call `write(tmp)` on a temporary sibling folder, then rename it to `output_dir`.

    A folder named `output_dir` is therefore always complete; an old one is replaced only
    after the new one is fully written, and nothing is left behind if `write` fails.
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}"
    old = output_dir.parent / f".{output_dir.name}.old-{os.getpid()}"
    try:
        tmp.mkdir()
        write(tmp)
        if output_dir.exists():
            output_dir.rename(old)
        tmp.rename(output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
