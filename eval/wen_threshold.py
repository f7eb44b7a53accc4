"""Wen et al.'s training-filter threshold, calibrated on an unmitigated run's own probes.

    python eval/wen_threshold.py --run_dir RUN --output FILE [--quantile 0.95] [--dup_factor 1] [--last_steps 1]
    python eval/wen_threshold.py --run_dir RUN [--quantile 0.95]        # one T pooled over every timestep

With `--output` (what data_scripts/arena.sh uses): one threshold per probe timestep t_k,
T_k = the `--quantile` of `text_magnitude` (||e_c - e_0|| in epsilon space at the probes' fixed noise)
over the `--dup_factor` (default 1: seen once) probe samples at t_k, pooled over the run's last
`--last_steps` probe steps: the magnitude ordinary training images reach at that noise level under the
unmitigated model. FILE (JSON) holds `timesteps`, `thresholds`, `bin_edges` (each t_k stands for the
training timesteps nearest to it), the quantile, the reference rows and, as a check before any
mitigated run, the share of every duplication factor's probe values above its timestep's threshold at
each probe step of this run. `train/finetune.py --mitigation_wen_thresholds FILE` interpolates the
thresholds to every t on the x0 scale (mem_analysis.mitigations.wen_threshold_curve). Why per timestep:
`||e_c - e_0|| = sqrt(SNR_t) ||x0hat_c - x0hat_0||`, so one T pooled over t is set by the low-noise values
and filters nothing at high noise (docs/science.md, "Wen's filter"). The last line of stdout is FILE.
Without `--output`: the pooled quantile T for `--mitigation_wen_threshold`, printed as the last line.
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
from mem_analysis.mitigations import wen_threshold_table


class ThresholdError(Exception):
    """Bad input: reported as one line, exit status 2."""


def parse_args(argv=None):
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run_dir", required=True, help="output_dir of an unmitigated train/finetune.py run")
    p.add_argument("--output", default=None, help="write per-timestep thresholds to this JSON file")
    p.add_argument("--quantile", type=float, default=0.95, help="quantile of the magnitudes, in (0, 1]")
    p.add_argument("--dup_factor", type=int, default=1, help="duplication factor of the samples it is taken over")
    p.add_argument("--last_steps", type=int, default=1, help="pool the run's last N probe steps (more values)")
    return p.parse_args(argv)


def reference_rows(probes: pd.DataFrame, dup_factor: int, last_steps: int) -> tuple[list[int], pd.DataFrame]:
    """(the pooled probe steps, the dup_factor samples' probe rows at them)."""
    steps = sorted(probes["step"].unique())[-last_steps:]
    rows = probes[probes["step"].isin(steps) & (probes["dup_factor"] == dup_factor)]
    return [int(s) for s in steps], rows


def bin_edges(grid: np.ndarray, num_train_timesteps: int = 1000) -> list[float]:
    """Edges of the t-bins each grid timestep stands for: 0, the midpoints between grid timesteps, N."""
    return [0.0] + [float(m) for m in (grid[1:] + grid[:-1]) / 2] + [float(num_train_timesteps)]


def share_over(probes: pd.DataFrame, grid: np.ndarray, thresholds: np.ndarray) -> dict[str, dict[str, float]]:
    """{step: {dup_factor: share of that factor's probe values above their timestep's threshold}}."""
    limit = pd.Series(thresholds, index=grid)
    over = probes["text_magnitude"].to_numpy(float) > limit.reindex(probes["timestep"]).to_numpy(float)
    table = probes.assign(over=over).groupby(["step", "dup_factor"])["over"].mean()
    out: dict[str, dict[str, float]] = {}
    for (step, dup), value in table.items():
        out.setdefault(str(int(step)), {})[str(int(dup))] = float(value)
    return out


def write_table(args, probes: pd.DataFrame, steps: list[int], rows: pd.DataFrame) -> Path:
    """Per-timestep thresholds to args.output (atomically); prints them and the in-sample shares."""
    grid, thresholds = wen_threshold_table(rows["timestep"], rows["text_magnitude"], args.quantile)
    check = share_over(probes[probes["timestep"].isin(grid)], grid, thresholds)
    table = dict(space="epsilon", timesteps=[int(t) for t in grid], thresholds=[float(v) for v in thresholds],
                 bin_edges=bin_edges(grid), quantile=args.quantile, run_dir=str(args.run_dir),
                 reference=dict(dup_factor=args.dup_factor, steps=steps, values_per_timestep=int(len(rows) / len(grid))),
                 interpolation="T(t) = sqrt(SNR_t) interp(t; t_k, T_k / sqrt(SNR_t_k)) (x0 scale)",
                 share_over_threshold=check)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output, json.dumps(table, indent=1) + "\n")
    print(f"quantile {args.quantile:g} of ||e_c - e_0|| of the {args.dup_factor}x probe samples at step(s) "
          f"{', '.join(map(str, steps))}, per timestep:")
    print("  " + ", ".join(f"t={t} {v:.4g}" for t, v in zip(grid, thresholds)))
    last = check[max(check, key=int)]
    print(f"share of this run's probe values over their timestep's threshold at step {max(check, key=int)}: "
          + ", ".join(f"{d}x {v:.3f}" for d, v in sorted(last.items(), key=lambda kv: int(kv[0]))))
    print(output)
    return output


def main(args):
    path = Path(args.run_dir) / "probes.jsonl"
    if not path.is_file():
        raise ThresholdError(f"{path} not found; give the output_dir of a run trained with --probe_steps > 0")
    if not 0 < args.quantile <= 1:
        raise ThresholdError(f"--quantile {args.quantile} must be in (0, 1]")
    if args.last_steps < 1:
        raise ThresholdError(f"--last_steps {args.last_steps} must be >= 1")
    probes = pd.read_json(path, lines=True)
    if "text_magnitude" not in probes:
        raise ThresholdError(f"{path} has no text_magnitude column; retrain with this version of train/finetune.py")
    steps, rows = reference_rows(probes, args.dup_factor, args.last_steps)
    if rows.empty:
        raise ThresholdError(f"{path} has no probe rows of dup_factor {args.dup_factor} at step(s) {steps}; "
                             f"choose one of {sorted(probes['dup_factor'].unique())}")
    if args.output:
        return write_table(args, probes, steps, rows)
    threshold = float(np.quantile(rows["text_magnitude"].to_numpy(float), args.quantile))
    print(f"step(s) {', '.join(map(str, steps))}: {len(rows)} probe values of {args.dup_factor}x samples, "
          f"quantile {args.quantile:g} of ||e_c - e_0|| pooled over every timestep:")
    print(f"{threshold:.6g}")
    return threshold


def cli(argv=None) -> int:
    """Entry point: bad input is one line on stderr and exit status 2."""
    return run_command(lambda given: main(parse_args(given)) and 0, "wen_threshold.py", argv,
                       bad_input=(ThresholdError,))


if __name__ == "__main__":
    sys.exit(cli())
