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
