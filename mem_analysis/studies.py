"""A study of many runs (train/study.py): each run's figures read from its evaluation tables, and their aggregate
over the runs of a grid cell (several training seeds).

Per run, at the evaluation's last checkpoint and headline guidance scale (per_sample.csv of eval/evaluate_checkpoints.py):
- `memorized_fraction_dup_F` (and `COLUMN_dup_F` for any other per_sample column asked for): the mean over the
  probe samples of duplication factor F;
- `onset_step_dup_F`: the training step at which the memorized fraction of factor F first reaches `onset_level`
  (`crossing_step`, interpolated between the evaluated checkpoints; NaN when it never does);
- `COLUMN_dup_F_minus_heldout`: the factor's mean minus that of the held-out probe images (dup_factor 0, which
  training never sees), when the dataset has them;
- the evaluation's own `summary["headline"]` figures and verdicts, when it writes them (a name there wins).
Per cell, every figure's mean over runs with Student's t-interval (runs are few: stats.mean_t_interval) and for
each verdict how many runs it holds in.
"""
from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pandas as pd

from mem_analysis import stats

ONSET_LEVEL = 0.25  # memorized fraction at which a duplication factor's onset is read
HOLDS = "holds"


def crossing_step(steps, values, level: float) -> float:
    """The first step at which `values` reaches `level`: for the first checkpoint k with `v_k >= level`,
    `s_{k-1} + (level - v_{k-1}) / (v_k - v_{k-1}) (s_k - s_{k-1})` (linear between the checkpoints around the
    crossing), `s_0` when already `v_0 >= level`; NaN when it never does. `steps` strictly increasing."""
    steps, values = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if steps.shape != values.shape or np.any(np.diff(steps) <= 0):
        raise ValueError("steps must be strictly increasing and as many as the values")
    reached = np.flatnonzero(values >= level)
    if reached.size == 0:
        return math.nan
    k = int(reached[0])
    if k == 0:
        return float(steps[0])
    v0, v1 = values[k - 1], values[k]
    return float(steps[k - 1] + (level - v0) / (v1 - v0) * (steps[k] - steps[k - 1]))


def at_guidance(per_sample: pd.DataFrame, guidance_scale: float) -> pd.DataFrame:
    """The rows of per_sample.csv at one guidance scale (ValueError when it has none)."""
    rows = per_sample[np.isclose(per_sample["guidance_scale"].astype(float), guidance_scale)]
    if rows.empty:
        raise ValueError(f"per_sample.csv has no rows at guidance scale {guidance_scale:g}")
    return rows


def factor_means(per_sample: pd.DataFrame, column: str, guidance_scale: float) -> pd.DataFrame:
    """Mean of `column` over the probe samples of each duplication factor: rows checkpoint steps, columns factors."""
    rows = at_guidance(per_sample, guidance_scale)
    return rows.groupby(["checkpoint_step", "dup_factor"])[column].mean().unstack("dup_factor").sort_index()


def run_figures(per_sample: pd.DataFrame, guidance_scale: float, columns=("memorized_fraction",),
                onset_level: float = ONSET_LEVEL) -> dict[str, float]:
    """One run's figures per duplication factor (module docstring), from its per_sample.csv."""
    figures = {}
    for column in dict.fromkeys(("memorized_fraction", *columns)):
        if column not in per_sample:
            continue
        means = factor_means(per_sample, column, guidance_scale)
        last = means.iloc[-1]
        for factor, value in last.items():
            figures[f"{column}_dup_{int(factor)}"] = float(value)
            if 0 in last.index and factor != 0:
                figures[f"{column}_dup_{int(factor)}_minus_heldout"] = float(value - last[0])
        if column == "memorized_fraction":
            for factor in means.columns:
                figures[f"onset_step_dup_{int(factor)}"] = crossing_step(means.index, means[factor], onset_level)
    return figures


def headline(summary: dict) -> tuple[dict[str, float], dict[str, str]]:
    """The figures and verdicts of summary.json's `headline` ({"step", "figures", "verdicts"}); empty without it."""
    block = summary.get("headline") or {}
    figures = {name: float("nan") if value is None else float(value)
               for name, value in (block.get("figures") or {}).items()}
    return figures, {name: str(value) for name, value in (block.get("verdicts") or {}).items()}


def sample_rows(per_sample: pd.DataFrame, guidance_scale: float, threshold: float) -> pd.DataFrame:
    """Per probe sample at the last checkpoint: dup_factor, severity, memorized_fraction, and its onset step
    (the first checkpoint whose severity exceeds `threshold`, stats.onset_step; NaN if none)."""
    rows = at_guidance(per_sample, guidance_scale).sort_values("checkpoint_step")
    last_step = rows["checkpoint_step"].max()
    out = []
    for sample_id, sample in rows.groupby("sample_id"):
        onset = stats.onset_step(sample["checkpoint_step"].to_numpy(), sample["severity"].to_numpy(float),
                                 threshold)[0]
        last = sample[sample["checkpoint_step"] == last_step]
        if last.empty:
            continue
        out.append(dict(sample_id=int(sample_id), dup_factor=int(last["dup_factor"].iloc[0]),
                        checkpoint_step=int(last_step), severity=float(last["severity"].iloc[0]),
                        memorized_fraction=float(last["memorized_fraction"].iloc[0]), onset_step=float(onset)))
    return pd.DataFrame(out)


def verdict_tally(values) -> tuple[int, int, str]:
    """(runs where it holds, runs that gave the verdict, 'holds in H of N' followed by the other verdicts' counts,
    e.g. 'holds in 1 of 3 (does not hold 2)'); a verdict holds when it reads exactly 'holds' (case and surrounding
    spaces aside); missing values (None, NaN, '') are not counted."""
    given = [str(v).strip().lower() for v in values if isinstance(v, str) and v.strip()]
    held = sum(v == HOLDS for v in given)
    others = Counter(v for v in given if v != HOLDS)
    rest = f" ({', '.join(f'{v} {n}' for v, n in sorted(others.items()))})" if others else ""
    return held, len(given), f"holds in {held} of {len(given)}{rest}"


def aggregate_cells(runs: pd.DataFrame, hparams: list[str], figures: list[str], verdicts: list[str],
                    confidence: float = 0.95) -> pd.DataFrame:
    """One row per cell of `runs` (columns `cell`, `status`, the hparams, figures and `verdict_NAME`): the
    hparams, `runs` (finished) and `failed`, each figure's `_mean`, `_low`, `_high`, `_n` over the finished
    runs (stats.mean_t_interval), and per verdict `verdict_NAME` ('holds in H of N'), `_holds` and `_n`."""
    out = []
    for cell, rows in runs.groupby("cell", sort=True):
        done = rows[rows["status"] == "done"]
        row = dict(cell=cell, **{h: rows[h].iloc[0] for h in hparams}, runs=int(len(done)),
                   failed=int((rows["status"] == "failed").sum()))
        for name in figures:
            values = done[name].to_numpy(float) if name in done else np.array([])
            mean, low, high, n = stats.mean_t_interval(values, confidence)
            row.update({f"{name}_mean": mean, f"{name}_low": low, f"{name}_high": high, f"{name}_n": n})
        for name in verdicts:
            column = f"verdict_{name}"
            held, given, text = verdict_tally(done[column].tolist() if column in done else [])
            row.update({column: text, f"{column}_holds": held, f"{column}_n": given})
        out.append(row)
    return pd.DataFrame(out)


def marginal(runs: pd.DataFrame, variable: str, figure: str, confidence: float = 0.95) -> pd.DataFrame:
    """Per value of `variable`, the figure over every finished run with that value (the other variables pooled):
    columns value, mean, low, high, n (stats.mean_t_interval across those runs)."""
    done = runs[runs["status"] == "done"]
    out = []
    for value, rows in done.groupby(variable, sort=True):
        mean, low, high, n = stats.mean_t_interval(rows[figure].to_numpy(float) if figure in rows else [], confidence)
        out.append(dict(value=value, mean=mean, low=low, high=high, n=n))
    return pd.DataFrame(out, columns=["value", "mean", "low", "high", "n"])


def fit_lines(runs: pd.DataFrame, variable: str, figures: list[str], confidence: float = 0.95) -> pd.DataFrame:
    """For each figure, `figure = a + b variable` over the finished runs (stats.linear_fit: every run one point),
    with the intervals and p of H0 a = 0 (proportionality); figures with fewer than two distinct x are skipped."""
    done = runs[runs["status"] == "done"]
    out = []
    for figure in figures:
        if figure not in done:
            continue
        x, y = done[variable].to_numpy(float), done[figure].to_numpy(float)
        keep = np.isfinite(x) & np.isfinite(y)
        if np.unique(x[keep]).size < 2:
            continue
        fit = stats.linear_fit(x[keep], y[keep], confidence)
        out.append(dict(variable=variable, figure=figure, **fit._asdict()))
    return pd.DataFrame(out)
