"""Run train/finetune.py once; write its steady-state throughput and peak memory to a JSON file.

    [accelerate launch ...] bench/gpu_finetune_run.py --result R.json [--warmup 4] -- FINETUNE FLAGS

Throughput is finetune.py's own per-step log `train/samples_per_second` (time between optimizer
steps, probes and checkpoints excluded): the median after `--warmup` steps, and the overall rate
over those steps. The first step's seconds include start-up (and compilation with --torch_compile).
Peak memory is this process's `torch.cuda.max_memory_allocated` / `max_memory_reserved` (CUDA only).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def samples_per_second(log_dir: Path) -> list[float]:
    """The run's `train/samples_per_second` scalars in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [s.value for s in sorted(events.Scalars("train/samples_per_second"), key=lambda s: s.step)]


def summarize(rates: list[float], samples_per_step: int, warmup: int) -> dict:
    """Median and overall images/s after `warmup` steps; seconds of the first step."""
    steady = rates[warmup:] or rates
    return dict(steps=len(rates), warmup_steps=len(rates) - len(steady),
                images_per_s=statistics.median(steady),
                images_per_s_overall=len(steady) / sum(1 / r for r in steady),
                step_s_median=samples_per_step / statistics.median(steady),
                first_step_s=samples_per_step / rates[0])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--result", required=True, help="JSON file to write")
    parser.add_argument("--warmup", type=int, default=4, help="first steps left out of the steady-state figures")
    args = parser.parse_args(argv[:split])
    finetune_argv = argv[split + 1:]

    from accelerate import PartialState

    from train import finetune
    from train.finetune_config import resolve_config

    config = resolve_config(finetune_argv)
    started = time.perf_counter()
    status = finetune.cli(finetune_argv)
    wall = time.perf_counter() - started
    if status != 0 or config.dry_run:
        return status
    state = PartialState()
    if not state.is_main_process:
        return 0
    samples_per_step = config.train_batch_size * config.gradient_accumulation_steps * state.num_processes
    record = dict(batch=config.train_batch_size, wall_s=wall, mixed_precision=config.mixed_precision,
                  **summarize(samples_per_second(Path(config.output_dir) / config.logging_dir / "finetune"),
                              samples_per_step, args.warmup))
    if torch.cuda.is_available():
        record.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                      peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30)
    Path(args.result).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
