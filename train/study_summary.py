"""report.md of a study folder: what was run, what it cost, what it shows, read from the study's own tables
(train/study_report.py) and records; no number is typed by hand."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from mem_analysis import studies
from train.study_file import Study


def number(value) -> str:
    """A figure for reading: whole numbers from 100 up, else three decimals; n/a when missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3f}"


def with_interval(mean, low, high, n) -> str:
    """'mean [low, high] (n runs)', the interval left out where it is undefined (one run)."""
    interval = f" [{number(low)}, {number(high)}]" if math.isfinite(low) else ""
    return f"{number(mean)}{interval} ({int(n)} run{'s' * (int(n) != 1)})"


def primary(figures: list[str], study: Study) -> list[str]:
    """The figures the summary reads out, per duplicated factor (highest first): memorized fraction, onset step,
    the premise's delta_k0 (evaluation's headline) and the held-out contrast of every other column asked for."""
    columns = [c for c in study.figures.get("columns", []) if c != "memorized_fraction"]
    wanted = []
    for name in figures:
        for prefix, suffix in [("memorized_fraction_dup_", ""), ("onset_step_dup_", ""), ("delta_k0_dup_", "")] + \
                              [(f"{c}_dup_", "_minus_heldout") for c in columns]:
            factor = name[len(prefix):len(name) - len(suffix)] if name.startswith(prefix) and name.endswith(suffix) else ""
            if factor.isdigit() and int(factor) > 1:
                wanted.append((-int(factor), prefix, name))
    return [name for *_, name in sorted(wanted)]


def cost_lines(frames: dict, study_dir: Path) -> list[str]:
    """Wall and CPU seconds of training, evaluation and the builds (from the records)."""
    runs = frames["runs"]
    builds = [json.loads(p.read_text()) for kind in ("data", "base") for p in sorted((study_dir / kind).glob("*.json"))]
    return [f"- Time, summed over the runs and over every call: training {number(runs['train_seconds'].sum())} s wall, "
            f"{number(runs['train_cpu_seconds'].sum())} s CPU; evaluation {number(runs['eval_seconds'].sum())} s wall, "
            f"{number(runs['eval_cpu_seconds'].sum())} s CPU; {len(builds)} dataset and base-model builds "
            f"{number(sum(b['seconds'] for b in builds))} s wall, {number(sum(b['cpu_seconds'] for b in builds))} s CPU."]


def shows(study: Study, frames: dict) -> list[str]:
    """The machine-written reading: each primary figure by each swept variable (or over the seeds), every
    verdict's tally per cell, every fit, and the runs that did not finish."""
    runs, cells, lines = frames["runs"], frames["cells"], []
    for figure in primary(frames["figures"], study):
        if not study.swept:
            row = cells.iloc[0]
            lines.append(f"- {figure}: {with_interval(*(row[f'{figure}_{k}'] for k in ('mean', 'low', 'high', 'n')))}.")
        for variable in study.swept:
            by = studies.marginal(runs, variable, figure)
            parts = [f"{r['value']}: {with_interval(r['mean'], r['low'], r['high'], r['n'])}" for _, r in by.iterrows()]
            lines.append(f"- {figure} by {variable} (other variables pooled): " + "; ".join(parts) + ".")
    for verdict in frames["verdicts"]:
        tallies = [f"cell {int(c['cell'])} {c[f'verdict_{verdict}']}" for _, c in cells.iterrows()]
        lines.append(f"- Verdict {verdict}: " + "; ".join(tallies) + ".")
    for _, fit in frames["fits"].iterrows():
        p = fit["p_a_zero"]
        test = "n/a (too few runs)" if not math.isfinite(p) else \
            ("rejected" if p < 0.05 else "not rejected") + f" at the 5% level (p = {p:.3f})"
        lines.append(f"- {fit['figure']} = a + b {fit['variable']}: b = {number(fit['b'])} [{number(fit['b_low'])}, "
                     f"{number(fit['b_high'])}], a = {number(fit['a'])} [{number(fit['a_low'])}, {number(fit['a_high'])}],"
                     f" r^2 = {number(fit['r2'])}, {int(fit['n'])} runs; proportionality (a = 0): {test}.")
    unfinished = runs[runs["status"] != "done"]
    if len(unfinished):
        lines.append(f"- {len(unfinished)} of {len(runs)} runs did not finish: " +
                     ", ".join(f"{r['run']} ({r['status']}{', ' + str(r['stage']) if pd.notna(r['stage']) else ''})"
                               for _, r in unfinished.iterrows()) + ".")
    return lines or ["- No run has finished yet."]


def cell_table(study: Study, frames: dict) -> list[str]:
    """Figures (rows) by cell (columns): mean [95% t-interval] (runs), and each verdict's tally."""
    cells = frames["cells"]
    lines = ["| figure | " + " | ".join(f"cell {int(c)}" for c in cells["cell"]) + " |",
             "|---|" + "---|" * len(cells)]
    for figure in frames["figures"]:
        lines.append(f"| {figure} | " + " | ".join(
            with_interval(*(c[f"{figure}_{k}"] for k in ("mean", "low", "high", "n"))) for _, c in cells.iterrows()) + " |")
    for verdict in frames["verdicts"]:
        lines.append(f"| verdict {verdict} | " + " | ".join(c[f"verdict_{verdict}"] for _, c in cells.iterrows()) + " |")
    legend = [f"- cell {int(c['cell'])}: " + (", ".join(f"{k} = {c[k]}" for k in study.grid) or "the base configuration") +
              f"; {int(c['runs'])} finished, {int(c['failed'])} failed" for _, c in cells.iterrows()]
    return lines + [""] + legend


def report_lines(study: Study, frames: dict, plots: list[str], study_dir: Path) -> list[str]:
    """report.md, line by line."""
    runs = frames["runs"]
    counts = runs["status"].value_counts()
    level = study.figures.get("onset_level", studies.ONSET_LEVEL)
    lines = [f"# Study `{study.name}`: {study.title}", "",
             f"Written by `python -m train.study {study.path} --output_dir {study_dir}` from the runs' own evaluation "
             f"tables (runs.csv, samples.csv, cells.csv, fits.csv beside this file); do not edit. Study file "
             f"fingerprint `{study.fingerprint}`.", "",
             f"- Runs: {len(runs)} = {len(frames['cells'])} cell(s) x {len(study.seeds)} seed(s) {study.seeds}; "
             f"done {counts.get('done', 0)}, failed {counts.get('failed', 0)}, pending {counts.get('pending', 0)}.",
             "- Grid: " + ("; ".join(f"{k}: {v}" for k, v in study.grid.items()) or "none (seeds only)") + ".",
             *cost_lines(frames, study_dir),
             f"- Figures at each run's last checkpoint and its evaluation's headline guidance scale. memorized_fraction_dup_F: "
             f"mean over the probe samples of factor F of the share of seeds over the threshold; onset_step_dup_F: the "
             f"step at which it first reaches {level} (interpolated between checkpoints; n/a when it never does); "
             f"_minus_heldout: minus the held-out images (factor 0). Intervals: 95% Student t across runs "
             f"(none with one run).", "", "## What it shows", "", *shows(study, frames), "",
             "## Figures per cell", "", *cell_table(study, frames)]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    lines += ["", "## Runs", "", "| run | cell | seed | status | log |", "|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['cell']} | {r['seed']} | {r['status']}"
              f"{' (' + str(r['stage']) + ')' if pd.notna(r['stage']) else ''} | {r['log']} |" for _, r in runs.iterrows()]
    lines += ["", f"TensorBoard HParams: `tensorboard --logdir {study_dir / 'tensorboard'}` (one session per run)."]
    return lines
