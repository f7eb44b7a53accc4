"""The early warning, frozen, evaluated on any evaluated run: beside its baselines, with its lead time, and marked
as designed on that run or out of sample.

    python eval/warning_eval.py RUN [RUN ...] --output_dir OUT [--eval_subdir eval] [--bootstrap 1000] \
        [--monitor_seeds 2]

Each RUN is a train/finetune.py output folder evaluated by eval/evaluate_checkpoints.py (RUN/eval: per_sample.csv,
per_seed.csv, settings.json). The warning is the one training wrote (RUN/warnings.jsonl; else RUN/probes.jsonl
scored by mem_analysis.early_warning as it stands): its features, null and alarm threshold are not refitted on any
run. Writes OUT/warning_eval.json (per run: mem_analysis.warning_evaluation.evaluate_run and its headline figures)
and OUT/report.md: one line per run (designed on it or not: the warning was designed on the Twemoji demo, training
seed 0) and each run's early-warning section.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from eval import warning_section
from mem_analysis.cli import run_command
from mem_analysis.io import write_text_atomic
from mem_analysis.warning_evaluation import MONITOR_SEEDS, evaluate_run, headline_figures


class WarningEvalError(Exception):
    """Bad input: reported as one line, exit status 2."""


def parse_args(argv=None):
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="train/finetune.py output folders, each evaluated")
    p.add_argument("--output_dir", required=True, help="folder for warning_eval.json and report.md")
    p.add_argument("--eval_subdir", default="eval", help="the evaluation folder inside each run")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of every interval")
    p.add_argument("--monitor_seeds", type=int, default=MONITOR_SEEDS,
                   help="seeds of the sampling monitor (the first of per_seed.csv)")
    return p.parse_args(argv)


def check_runs(runs: list[Path], subdir: str) -> None:
    """Every run has its config, probes and an evaluation; else one line naming what is missing."""
    for folder in runs:
        needed = [folder / "probes.jsonl", folder / subdir / "per_sample.csv", folder / subdir / "settings.json"]
        missing = [str(p) for p in needed if not p.is_file()]
        if missing:
            raise WarningEvalError(f"{folder}: missing {', '.join(missing)}; train with --probe_steps > 0 and run "
                                   f"eval/evaluate_checkpoints.py --run_dir {folder}")


def run_line(name: str, result: dict) -> str:
    """One row of the overview table."""
    b = result["baselines"]
    step, v = b["decision_step"], b["verdict"]
    entry = b["steps"][str(step)]["signals"] if step is not None else {}
    warning = entry.get("warning", {})
    within = " / ".join(f"{f}x {warning_section.fmt(w['auroc'], 2)}" for f, w in warning.get("within", {}).items())
    lead = b["lead"][b["main_label"]]["by_factor"]
    top = max(lead, key=int) if lead else None
    interval = (f"[{warning_section.fmt(lead[top]['median_lead_low'], 0)}, "
                f"{warning_section.fmt(lead[top]['median_lead_high'], 0)}] ({top}x)") if top else "n/a"
    return (f"| {name} | {b['dataset']} | {b['seed']} | {'yes' if b['designed_on'] else 'no (out of sample)'} | "
            f"{step if step is not None else 'n/a'} | {warning_section.fmt_auroc(warning)} | "
            f"{warning_section.NAMES.get(v['best_baseline'], 'n/a')} | {warning_section.fmt_margin(v['margin'])} | "
            f"{v['outcome']} | {within or 'n/a'} | {interval} |")


def main(args) -> Path:
    runs = [Path(r) for r in args.runs]
    check_runs(runs, args.eval_subdir)
    if args.monitor_seeds < 1:
        raise WarningEvalError(f"--monitor_seeds {args.monitor_seeds} must be >= 1")
    results, lines = {}, []
    for folder in runs:
        result = evaluate_run(folder, folder / args.eval_subdir, args.bootstrap, args.monitor_seeds)
        if result is None:
            raise WarningEvalError(f"{folder} logged no warning (probes.jsonl without warnings); retrain with probes")
        result["figures"] = headline_figures(result)
        results[str(folder)] = result
    header = ["# The early warning, frozen, on each run", "",
              "Designed on: the Twemoji demo (configs/demo_cpu.yaml), training seed 0; every other run is out of "
              "sample. Decision step: the last probe step before the run's first onset; verdict: `beats` when the "
              "paired 95% interval of the warning's AUROC margin over the best baseline lies above 0.", "",
              "| run | dataset | training seed | designed on it | decision step | warning AUROC [95% CI] | best baseline "
              "| margin over it [paired 95% CI] | verdict | AUROC within factor | median lead [low, high] |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    header += [run_line(name, result) for name, result in results.items()]
    for name, result in results.items():
        lines += ["", f"# {name}", ""] + warning_section.warning_lines(result, None)[2:]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "warning_eval.json", json.dumps(results, indent=1))
    write_text_atomic(out / "report.md", "\n".join(header + lines) + "\n")
    print("\n".join(header))
    print(f"wrote {out}/warning_eval.json and report.md")
    return out


def cli(argv=None) -> int:
    """Entry point: bad input is one line on stderr and exit status 2."""
    return run_command(lambda given: main(parse_args(given)) and 0, "warning_eval.py", argv,
                       bad_input=(WarningEvalError,))


if __name__ == "__main__":
    sys.exit(cli())
