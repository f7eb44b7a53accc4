"""Collect demo runs' figures into one markdown table (not a benchmark: the record of the text-path runs,
bench/results/text_path/h200_demo_runs.md). Per run, at its last checkpoint and per duplication factor: the
memorized fraction of seeds (the run's label), the share over the similarity threshold, mean severity,
nearest-neighbour identity, k_0 of the sampler's first step and Wen's magnitude ||e_c - e_0|| (columns a run's
tables lack are left out); the D_x-severity Pearson r; and the caption separation make_base_model.py recorded for
the run's base model.

    python bench/collect_text_path_runs.py NAME=DEMO_DIR [NAME=DEMO_DIR ...] [--output table.md]

Each DEMO_DIR is a demo folder (`base/`, `run/eval/` as data_scripts/demo.sh writes them). A NAME=DEMO_DIR that
is not one is bad input: one line on stderr, exit status 2, nothing written.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from mem_analysis.cli import run_command
from mem_analysis.io import write_text_atomic

COLUMNS = dict(memorized_fraction="memorized", similarity_fraction="over the similarity threshold",
               severity="severity", sev_nn_identity="NN identity", k0_first="k_0 first step",
               wen_magnitude="Wen magnitude")


def last_checkpoint(demo_dir: Path) -> pd.DataFrame:
    """per_sample.csv rows of the last checkpoint at the evaluation's guidance scale."""
    evaluation = demo_dir / "run" / "eval"
    table = pd.read_csv(evaluation / "per_sample.csv")
    table = table[table["guidance_scale"] == json.loads((evaluation / "settings.json").read_text())["guidance_scale"]]
    return table[table["checkpoint_step"] == table["checkpoint_step"].max()]


def separation(demo_dir: Path) -> str:
    """Mean pairwise cosine of the study's caption embeddings under the base model's text encoder."""
    record = json.loads((demo_dir / "base" / "make_base_model.json").read_text())
    study = record.get("caption_separation", {}).get("study")
    if not study:
        return "n/a"
    state = "trained" if "trained" in study else "random"
    return f"{study[state]['mean_cosine']:.3f} ({state} encoder)"


def compare(runs: dict[str, Path]) -> str:
    """The markdown table of every run."""
    lines = []
    for name, demo_dir in runs.items():
        last = last_checkpoint(demo_dir)
        r = np.corrcoef(last["D_x"], last["severity"])[0, 1]
        lines.append(f"**{name}** (`{demo_dir}`, step {int(last['checkpoint_step'].max())}): D_x-severity "
                     f"Pearson r = {r:.3f}; study captions' mean pairwise cosine {separation(demo_dir)}\n")
        means = last.groupby("dup_factor")[[c for c in COLUMNS if c in last]].mean().rename(columns=COLUMNS)
        lines.append("| dup_factor | " + " | ".join(means.columns) + " |")
        lines.append("|---" * (len(means.columns) + 1) + "|")
        lines += [f"| {factor} | " + " | ".join(f"{v:.3f}" for v in row) + " |" for factor, row in means.iterrows()]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Print the table (and write it with --output)."""
    p = argparse.ArgumentParser(prog="collect_text_path_runs.py", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="NAME=DEMO_DIR")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    runs = {}
    for item in args.runs:
        name, _, folder = item.partition("=")
        if not folder or not (Path(folder) / "run" / "eval" / "per_sample.csv").is_file():
            raise ValueError(f"{item!r} is not NAME=DEMO_DIR with run/eval/per_sample.csv")
        runs[name] = Path(folder)
    table = compare(runs)
    print(table)
    if args.output:
        write_text_atomic(args.output, table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, "collect_text_path_runs.py"))
