"""train/finetune.py as the benches run it: a fresh process with real flags, its figures read back from the run
folder it wrote (a library of bench/, no main).

Throughput is finetune.py's own per-step log `train/samples_per_second` (`--logging_steps 1`: time between
optimizer steps, probes and checkpoints excluded) and `train/cpu_seconds_per_step` (the process's CPU time, which
holds on a shared machine); peak GPU memory its `train/peak_memory_gib` (CUDA only);
the input cache's build seconds and size the metadata of RUN/cache/ (mem_analysis.run).
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from mem_analysis import run

ROOT = Path(__file__).resolve().parents[1]
# Runs one command and prints its peak resident set (the largest of its descendants, KiB on Linux) and the
# CPU-seconds (user + system, all threads) of it and its descendants.
MEASURED = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
            "use = resource.getrusage(resource.RUSAGE_CHILDREN); print('PEAK_RSS_KIB', use.ru_maxrss); "
            "print('CPU_SECONDS', use.ru_utime + use.ru_stime); sys.exit(code)")


def scalars(run_dir: Path, tag: str, logging_dir: str = "logs") -> list[float]:
    """A run's training scalar `tag` in step order ([] when it never logged it)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(run_dir) / logging_dir / "finetune"))
    events.Reload()
    if tag not in events.Tags().get("scalars", []):
        return []
    return [s.value for s in sorted(events.Scalars(tag), key=lambda s: s.step)]


def summarize(rates: list[float], samples_per_step: int, warmup: int) -> dict:
    """Median and overall images/s after `warmup` steps; seconds of the first step."""
    steady = rates[warmup:] or rates
    return dict(steps=len(rates), warmup_steps=len(rates) - len(steady),
                images_per_s=statistics.median(steady),
                images_per_s_overall=len(steady) / sum(1 / r for r in steady),
                step_s_median=samples_per_step / statistics.median(steady),
                first_step_s=samples_per_step / rates[0])


def flag_value(flags: list[str], name: str, default=None):
    """The value after `--name` in a flag list (the last one given)."""
    found = [flags[i + 1] for i, flag in enumerate(flags[:-1]) if flag == f"--{name}"]
    return found[-1] if found else default


def launch(flags: list[str], log: Path, launcher=None, env=None, timeout: float | None = None) -> dict:
    """Run train/finetune.py FLAGS (after `launcher`, default this Python) under the MEASURED wrapper, from the
    repository root, output to `log`; wall seconds, CPU-seconds and peak resident GiB. RuntimeError with the
    log's last lines when it fails."""
    command = [*(launcher or [sys.executable]), str(ROOT / "train" / "finetune.py"), *map(str, flags)]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                   **(env or {})}
    started = time.perf_counter()
    with open(log, "w") as handle:
        status = subprocess.run([sys.executable, "-c", MEASURED, *command], stdout=handle, stderr=subprocess.STDOUT,
                                env=environment, cwd=ROOT, timeout=timeout).returncode
    wall = time.perf_counter() - started
    lines = Path(log).read_text().splitlines()
    if status != 0:
        raise RuntimeError(f"finetune.py exit {status}; last lines of {log}:\n" + "\n".join(lines[-15:]))
    value = {key: next((float(line.split()[1]) for line in lines if line.startswith(key)), 0.0)
             for key in ("PEAK_RSS_KIB", "CPU_SECONDS")}
    return dict(process_wall_s=wall, process_cpu_s=value["CPU_SECONDS"], peak_rss_gib=value["PEAK_RSS_KIB"] / 2**20)


def cache_builds(run_dir: Path) -> dict:
    """The input cache files of a run: per file its build seconds, MiB, peak memory and processes (as written)."""
    out = {}
    for name in (run.LATENT_CACHE_FILE, run.CAPTION_CACHE_FILE):
        metadata = run.cache_metadata(run_dir, name)
        if metadata:
            out[Path(name).stem] = {key: float(value) for key, value in metadata.items() if key != "fingerprint"}
    return out


def finetune_record(flags: list[str], log: Path, warmup: int, launcher=None, env=None,
                    timeout: float | None = None) -> dict:
    """One finetune.py run (logging every step): steady images/s and step seconds after `warmup` steps, first-step
    seconds, peak GPU memory (CUDA) and resident memory, and the input cache's builds."""
    if flag_value(flags, "logging_steps") is None:
        flags = [*flags, "--logging_steps", "1"]  # one throughput scalar per step
    record = launch(flags, log, launcher, env, timeout)
    output_dir = Path(flag_value(flags, "output_dir"))
    batch = int(flag_value(flags, "train_batch_size"))
    processes = int(flag_value(launcher or [], "num_processes", 1))
    rates = scalars(output_dir, "train/samples_per_second")
    if not rates:
        raise RuntimeError(f"{output_dir} logged no train/samples_per_second (no optimizer step?)")
    record.update(batch=batch, **summarize(rates, batch * processes, warmup), rates=rates,
                  cpu_seconds_per_step=scalars(output_dir, "train/cpu_seconds_per_step"),
                  cache=cache_builds(output_dir))
    peaks = scalars(output_dir, "train/peak_memory_gib")
    if peaks:
        record["peak_allocated_gib"] = max(peaks)
    return record
