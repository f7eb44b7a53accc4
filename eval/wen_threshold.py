"""Wen et al.'s training-filter threshold T, calibrated on an unmitigated run's own probes.

    python eval/wen_threshold.py --run_dir RUN [--quantile 0.95] [--dup_factor 1]

T = the `--quantile` of `text_magnitude` (||e_c - e_0|| at the probes' fixed noise, pooled over the
probe timesteps, which cover t as training draws it) over the `--dup_factor` (default 1: seen once)
probe samples at the run's last probe step: the magnitude that ordinary training images reach under the
unmitigated model, so that `--mitigation_wen_threshold T` filters what rises above it. Prints T as the
last line of stdout (data_scripts/arena.sh reads it).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from mem_analysis.cli import run_command


class ThresholdError(Exception):
    """Bad input: reported as one line, exit status 2."""


def parse_args(argv=None):
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run_dir", required=True, help="output_dir of an unmitigated train/finetune.py run")
    p.add_argument("--quantile", type=float, default=0.95, help="quantile of the magnitudes, in (0, 1]")
    p.add_argument("--dup_factor", type=int, default=1, help="duplication factor of the samples it is taken over")
    return p.parse_args(argv)


def last_step_magnitudes(probes: pd.DataFrame, dup_factor: int) -> tuple[int, np.ndarray]:
    """(last probe step, text_magnitude of the dup_factor samples there over every probe timestep)."""
    step = int(probes["step"].max())
    rows = probes[(probes["step"] == step) & (probes["dup_factor"] == dup_factor)]
    return step, rows["text_magnitude"].to_numpy(float)


def main(args) -> float:
    path = Path(args.run_dir) / "probes.jsonl"
    if not path.is_file():
        raise ThresholdError(f"{path} not found; give the output_dir of a run trained with --probe_steps > 0")
    if not 0 < args.quantile <= 1:
        raise ThresholdError(f"--quantile {args.quantile} must be in (0, 1]")
    probes = pd.read_json(path, lines=True)
    if "text_magnitude" not in probes:
        raise ThresholdError(f"{path} has no text_magnitude column; retrain with this version of train/finetune.py")
    step, magnitudes = last_step_magnitudes(probes, args.dup_factor)
    if magnitudes.size == 0:
        raise ThresholdError(f"{path} has no probe rows of dup_factor {args.dup_factor} at step {step}; "
                             f"choose one of {sorted(probes['dup_factor'].unique())}")
    threshold = float(np.quantile(magnitudes, args.quantile))
    print(f"step {step}: {magnitudes.size} probe values of {args.dup_factor}x samples, "
          f"quantile {args.quantile:g} of ||e_c - e_0||:")
    print(f"{threshold:.6g}")
    return threshold


def cli(argv=None) -> int:
    """Entry point: bad input is one line on stderr and exit status 2."""
    return run_command(lambda given: main(parse_args(given)) and 0, "wen_threshold.py", argv,
                       bad_input=(ThresholdError,))


if __name__ == "__main__":
    sys.exit(cli())
