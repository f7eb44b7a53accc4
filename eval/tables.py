"""The evaluation scripts' output tables: CSV with a parquet copy, rows appended one checkpoint (or batch of
prompts) at a time, compressed arrays, and the settings a table was made with, checked before appending.
Every file is written atomically (mem_analysis.io), so a killed evaluation leaves complete tables."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from mem_analysis.cli import BadInput
from mem_analysis.io import atomic_path

EvalError = BadInput  # the evaluation scripts' bad input (one line, exit 2), a run folder's included


def write_table(frame: pd.DataFrame, path: Path) -> None:
    """CSV + parquet copy, each written atomically."""
    for target, writer in ((path, frame.to_csv), (path.with_suffix(".parquet"), frame.to_parquet)):
        with atomic_path(target) as tmp:
            writer(tmp, index=False)


def append_rows(path: Path, rows: list[dict], step: int) -> None:
    """Append one checkpoint's rows to a table (replacing any earlier rows of that step)."""
    new = pd.DataFrame(rows)
    if path.is_file():
        old = pd.read_csv(path)
        new = pd.concat([old[old["checkpoint_step"] != step], new], ignore_index=True)
    write_table(new.sort_values(["checkpoint_step", "guidance_scale", "sample_id"], kind="stable"), path)


def stored_identities(path: Path) -> dict[int, str | None]:
    """checkpoint_step -> the checkpoint_id (mem_analysis.run.checkpoint_identity) of the weights its rows in a
    per_sample table measured; None where the table records none (written before tables recorded them)."""
    if not path.is_file():
        return {}
    table = pd.read_csv(path, usecols=lambda c: c in ("checkpoint_step", "checkpoint_id"), dtype={"checkpoint_id": str})
    ids = table["checkpoint_id"] if "checkpoint_id" in table else [None] * len(table)
    return {int(step): None if pd.isna(ident) else str(ident) for step, ident in zip(table["checkpoint_step"], ids)}


def drop_steps(out_dir: Path, steps) -> None:
    """Remove the rows of `steps` from per_seed and per_sample (per_sample last: it marks a step done) and
    their curves and images arrays."""
    for name in ("per_seed.csv", "per_sample.csv"):
        if (out_dir / name).is_file():
            table = pd.read_csv(out_dir / name)
            write_table(table[~table["checkpoint_step"].isin(list(steps))], out_dir / name)
    for step in steps:
        for kind in ("curves", "images"):
            (out_dir / kind / f"step-{step}.npz").unlink(missing_ok=True)


def save_arrays(path: Path, **arrays) -> None:
    """np.savez_compressed, atomically."""
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, **arrays)


def check_same_settings(out_dir: Path, settings) -> None:
    """Refuse to append to tables in `out_dir` whose settings.json differs from `settings` (as_dict)."""
    saved = out_dir / "settings.json"
    if saved.is_file():
        previous, current = json.loads(saved.read_text()), settings.as_dict()
        previous.setdefault("guidance_schedule", "constant")  # tables written before schedules existed
        changed = sorted(k for k in current if previous.get(k) != current[k])
        if changed:
            raise EvalError(f"{out_dir} holds results made with other settings ({', '.join(changed)}); "
                            "use another --output_dir or the same settings")


def last_checkpoint_rows(table: pd.DataFrame, guidance_scale: float) -> tuple[int, pd.DataFrame]:
    """(last step, rows of the last evaluated checkpoint at `guidance_scale`) of a per_sample table."""
    rows = table[table["guidance_scale"] == guidance_scale]
    last = int(rows["checkpoint_step"].max())
    return last, rows[rows["checkpoint_step"] == last]


def fmt(value, digits: int = 3) -> str:
    """A number as the report prints it (the test reads the same format)."""
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def fmt_corr(c: dict) -> str:
    """'r = 0.870 [0.710, 0.950]' (95% bootstrap interval)."""
    return "r = n/a (undefined: constant values or fewer than 3 samples)" if c["r"] is None else \
        f"r = {fmt(c['r'])} [{fmt(c['ci_low'])}, {fmt(c['ci_high'])}]"


def fmt_diff(d: dict | None) -> str:
    """'+0.120 [0.050, 0.190]': a difference memorized minus not, with its 95% bootstrap interval."""
    if not d or d.get("diff") is None:
        return "n/a"
    return f"{d['diff']:+.3f} [{fmt(d['ci_low'])}, {fmt(d['ci_high'])}]"
