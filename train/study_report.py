"""A study folder's tables, TensorBoard HParams board, plots and report.md, from its runs' evaluation tables
(the figures: mem_analysis.studies).

    runs.csv     one row per run: cell, seed, the cell's grid values, status, the stage that failed, its log (relative to the study folder), the
                 dataset's size, seconds spent, then every figure and `verdict_NAME`
    samples.csv  one row per (finished run, probe sample) at the last checkpoint: dup_factor, severity,
                 memorized_fraction, onset_step, with the run's cell, seed and grid values
    cells.csv    one row per cell: each figure's mean over its finished runs with a 95% Student t-interval across
                 runs (`_mean`, `_low`, `_high`, `_n`), and per verdict 'holds in H of N'
    fits.csv     figure = a + b x for every onset figure against every numeric swept variable with >= 3 values
    tensorboard/ one HParams session per run (the grid's values, seed and status as hparams, the figures as metrics)
    plots/       memorized fraction and onset step against each swept variable and against the duplication factor
    report.md    all of it in one page; every number is read from the tables above
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mem_analysis import studies  # noqa: E402
from mem_analysis.io import atomic_path, write_folder_atomically, write_text_atomic  # noqa: E402
from train.study_file import Study  # noqa: E402
from train.study_runs import run_state  # noqa: E402
from train.study_summary import report_lines  # noqa: E402

CONFIDENCE = 0.95
SECONDS = ("train_seconds", "train_cpu_seconds", "eval_seconds", "eval_cpu_seconds")


def dataset_size(manifest_path: Path) -> dict:
    """Distinct trained images, train rows and the share of rows that are copies of duplicated images."""
    if not manifest_path.is_file():
        return {}
    counts = json.loads(manifest_path.read_text())["counts"]
    rows = sum(c["rows"] for c in counts.values())
    duplicated = sum(c["rows"] for f, c in counts.items() if int(f) > 1)
    return dict(dataset_images=sum(c["images"] for f, c in counts.items() if int(f) > 0), dataset_rows=rows,
                dataset_dup_share=duplicated / rows if rows else math.nan)


def relative(path: Path, study_dir: Path) -> str:
    """A path inside the study folder relative to it (the folder can move), any other as it is."""
    return str(path.relative_to(study_dir)) if path.is_relative_to(study_dir) else str(path)


def read_run(study: Study, run, study_dir: Path) -> tuple[dict, dict, dict, pd.DataFrame | None]:
    """One run's row of runs.csv (what it is, its status and cost), its figures, its verdicts, and its rows of
    samples.csv (the last three empty or None unless the run is done)."""
    record_path = study_dir / "records" / f"{run.name}.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    run_dir = study_dir / "runs" / run.name
    done = run_state(run_dir, run.eval_args) == "done"
    status = "done" if done else ("failed" if record.get("status") == "failed" else "pending")
    row = dict(run=run.name, cell=run.cell, seed=run.seed, **run.hparams, status=status,
               stage=None if done else record.get("stage"),
               log=relative(Path(record.get("log", study_dir / "logs" / f"{run.name}.log")), study_dir),
               **(dataset_size(run.dataset.folder(study_dir) / "manifest.json") if run.dataset else {}),
               **{key: record.get(key, 0.0) for key in SECONDS})
    if not done:
        return row, {}, {}, None
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    per_sample = pd.read_csv(run_dir / "eval" / "per_sample.csv")
    g, threshold = float(summary["settings"]["guidance_scale"]), float(summary["settings"]["threshold"])
    figures = studies.run_figures(per_sample, g, study.figures.get("columns", ("memorized_fraction",)),
                                  study.figures.get("onset_level", studies.ONSET_LEVEL))
    headline_figures, verdicts = studies.headline(summary)
    row["last_step"] = int(per_sample["checkpoint_step"].max())
    samples = studies.sample_rows(per_sample, g, threshold)
    for column, value in reversed(list(dict(run=run.name, cell=run.cell, seed=run.seed, **run.hparams).items())):
        samples.insert(0, column, [value] * len(samples))
    return row, {**figures, **headline_figures}, verdicts, samples


def numeric(values) -> bool:
    """True when every value is a number (not a bool): plotted and fitted on a numeric axis."""
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def tables(study: Study, study_dir: Path) -> dict:
    """runs, samples, cells and fits (module docstring), and the names of the figures and verdicts found."""
    read = [read_run(study, run, study_dir) for run in study.runs]
    figures = list(dict.fromkeys(name for _, found, _, _ in read for name in found))
    verdicts = list(dict.fromkeys(name for _, _, found, _ in read for name in found))
    runs = pd.DataFrame([{**row, **{f: found.get(f, math.nan) for f in figures},
                          **{f"verdict_{v}": said.get(v) for v in verdicts}} for row, found, said, _ in read])
    cells = studies.aggregate_cells(runs, list(study.grid), figures, verdicts, CONFIDENCE)
    onsets = [f for f in figures if f.startswith("onset_step_dup_")]
    fits = [studies.fit_lines(runs, v, onsets, CONFIDENCE) for v in study.swept
            if numeric(study.levels[v]) and len(study.levels[v]) >= 3]
    found = [samples for *_, samples in read if samples is not None and len(samples)]
    return dict(runs=runs, samples=pd.concat(found, ignore_index=True) if found else pd.DataFrame(),
                cells=cells, fits=pd.concat(fits, ignore_index=True) if fits else pd.DataFrame(),
                figures=figures, verdicts=verdicts)


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    """A table written atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def hparam_value(value):
    """A value TensorBoard's HParams accepts (bool, int, float, str)."""
    value = value.item() if isinstance(value, np.generic) else value
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value)


def write_board(folder: Path, study: Study, runs: pd.DataFrame, figures: list[str]) -> None:
    """One HParams session per run under `folder`: grid values, seed and status as hparams, figures as metrics."""
    from torch.utils.tensorboard import SummaryWriter

    keys = [*study.grid, "seed", "status"]
    domains = {k: sorted({hparam_value(v) for v in study.levels[k]}, key=str) for k in study.grid}
    with SummaryWriter(str(folder)) as writer:
        for _, run in runs.iterrows():
            hparams = {k: hparam_value(run[k]) for k in keys}
            metrics = {f"study/{f}": float(run[f]) if f in run and pd.notna(run[f]) else math.nan for f in figures}
            writer.add_hparams(hparams, metrics, hparam_domain_discrete=domains, run_name=run["run"])


def factor_of(figure: str, prefix: str) -> int | None:
    """F of `PREFIXdup_F` (None for other names, e.g. the _minus_heldout contrasts)."""
    rest = figure[len(prefix):] if figure.startswith(prefix) else ""
    return int(rest) if rest.isdigit() else None


PANELS = (("memorized_fraction_dup_", "memorized fraction"), ("onset_step_dup_", "onset step"))


def draw_lines(ax, x, cells: pd.DataFrame, prefix: str, label: str) -> None:
    """Per duplication factor, the cell means against x with their t-intervals as error bars."""
    for figure in sorted((f for f in cells.columns if f.endswith("_mean")), key=lambda f: factor_of(f[:-5], prefix) or 0):
        factor = factor_of(figure[:-5], prefix)
        if factor is None:
            continue
        mean, low, high = (cells[f"{figure[:-5]}_{k}"].to_numpy(float) for k in ("mean", "low", "high"))
        errors = np.nan_to_num(np.vstack([mean - low, high - mean]), nan=0.0)
        ax.errorbar(x, mean, yerr=errors, marker="o", ms=3, capsize=3, label=f"dup {factor}")
    ax.set_ylabel(label)


def plot_against(variable: str, study: Study, cells: pd.DataFrame, path: Path) -> None:
    """Memorized fraction and onset step against one swept variable, one panel column per combination of the
    other swept variables, one line per duplication factor, 95% t-intervals across seeds."""
    others = [v for v in study.swept if v != variable]
    groups = list(cells.groupby(others, sort=True)) if others else [((), cells)]
    values = study.levels[variable]
    fig, axes = plt.subplots(2, len(groups), figsize=(4 * len(groups), 6), squeeze=False)
    for col, (key, group) in enumerate(groups):
        group = group.set_index(variable).loc[[v for v in values if v in set(group[variable])]].reset_index()
        x = group[variable].to_numpy(float) if numeric(values) else np.arange(len(group))
        for row, (prefix, label) in enumerate(PANELS):
            ax = axes[row, col]
            draw_lines(ax, x, group, prefix, label)
            if not numeric(values):
                ax.set_xticks(x, [str(v) for v in group[variable]])
            ax.set_xlabel(variable)
        key = key if isinstance(key, tuple) else (key,)
        axes[0, col].set_title("\n".join(f"{o} = {k}" for o, k in zip(others, key)) or study.name, fontsize=9)
    axes[0, 0].legend(fontsize=8)
    save(fig, path)


def plot_by_factor(cells: pd.DataFrame, study: Study, path: Path) -> None:
    """Memorized fraction and onset step against the duplication factor, one line per cell."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for _, cell in cells.iterrows():
        label = ", ".join(f"{k} = {cell[k]}" for k in study.swept) or f"{int(cell['runs'])} runs"
        for ax, (prefix, name) in zip(axes, PANELS):
            points = sorted((factor_of(f[:-5], prefix), f[:-5]) for f in cells.columns
                            if f.endswith("_mean") and factor_of(f[:-5], prefix) is not None)
            x = np.array([p[0] for p in points], float)
            mean, low, high = (np.array([cell[f"{p[1]}_{k}"] for p in points], float) for k in ("mean", "low", "high"))
            ax.errorbar(x, mean, yerr=np.nan_to_num(np.vstack([mean - low, high - mean])), marker="o", ms=3,
                        capsize=3, label=label)
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xlabel("duplication factor")
            ax.set_ylabel(name)
    axes[0].legend(fontsize=7)
    save(fig, path)


def plot_fits(runs: pd.DataFrame, fits: pd.DataFrame, path: Path) -> None:
    """Each run's onset step against the fitted variable, with the fitted line per duplication factor."""
    fig, ax = plt.subplots(figsize=(6, 4))
    done = runs[runs["status"] == "done"]
    for _, fit in fits.iterrows():
        x = done[fit["variable"]].to_numpy(float)
        points = ax.plot(x, done[fit["figure"]].to_numpy(float), "o", ms=4)
        grid = np.linspace(0, np.nanmax(x), 50)
        ax.plot(grid, fit["a"] + fit["b"] * grid, "-", color=points[0].get_color(),
                label=f"{fit['figure']}: {fit['a']:.0f} + {fit['b']:.3g} x")
    ax.set_xlabel(fits["variable"].iloc[0])
    ax.set_ylabel("onset step")
    ax.legend(fontsize=7)
    save(fig, path)


def save(fig, path: Path) -> None:
    """A PNG written atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plots(study: Study, frames: dict, study_dir: Path) -> list[str]:
    """Every plot of the study (paths relative to the study folder)."""
    cells, names = frames["cells"], []
    if cells["runs"].sum() == 0:
        return names
    for variable in study.swept:
        names.append(f"plots/{variable}.png")
        plot_against(variable, study, cells, study_dir / names[-1])
    names.append("plots/by_dup_factor.png")
    plot_by_factor(cells, study, study_dir / names[-1])
    for variable, fits in (frames["fits"].groupby("variable") if len(frames["fits"]) else []):
        names.append(f"plots/onset_fit_{variable}.png")
        plot_fits(frames["runs"], fits, study_dir / names[-1])
    return names


def write_outputs(study: Study, study_dir: Path) -> dict:
    """Tables, TensorBoard, plots and report.md of the study folder; the tables."""
    frames = tables(study, study_dir)
    for name in ("runs", "samples", "cells", "fits"):
        write_csv(frames[name], study_dir / f"{name}.csv")
    write_folder_atomically(lambda tmp: write_board(tmp, study, frames["runs"], frames["figures"]),
                            study_dir / "tensorboard")
    names = plots(study, frames, study_dir)
    write_text_atomic(study_dir / "report.md", "\n".join(report_lines(study, frames, names, study_dir)) + "\n")
    return frames
