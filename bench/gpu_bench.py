"""The GPU check's measurements, on the sd15-shape architecture at 512 px, in one process (bench/gpu_check.sh).

    python bench/gpu_bench.py [--budget_s 345]                         # on the GPU
    python bench/gpu_bench.py --device cpu --preset tiny --smoke       # the same code paths on CPU, tiny sizes
    python bench/gpu_bench.py --table_of bench/results/CARD-DATE.json  # the headline table of a results file

Runs the sections of bench/gpu_sections.py in order of importance (measurement helpers: bench/gpu_measure.py,
finetune.py runs: bench/finetune_runs.py); one whose estimated cost no longer fits in --budget_s is skipped,
and one that fails is recorded with its error while the others go on. The JSON is rewritten after every
section (bench/results/<card>-<date>.json, or --results_dir, and $OUT/ when set), so a run cut short keeps
what it measured. All figures are measured here, side by side in one run:
- bare loop (VAE encode, text encode, UNet fwd+bwd under bf16 autocast, clipping, AdamW) at the largest batch
  that fits with headroom (probed), full and LoRA: images/s and peak GiB;
- finetune.py on the same model, data and batch (fresh processes): with its input cache (each unique image's
  posterior and each caption's embedding encoded once; build seconds, size, peak memory) and without it, and
  LoRA; steady images/s after a warm-up, peak GiB, ratio to the bare loop, MFU;
- UNet fwd+bwd FLOPs per image (torch.utils.flop_counter, attention through the math backend) -> model FLOPs
  utilization against the card's datasheet bf16 peak and against a measured 8192^3 bf16 matmul;
- evaluation: trajectory capture + M1-M6 vs the plain StableDiffusionPipeline;
- numerics: probe_metrics in bf16 (autocast; bf16 weights) against float32, with stated tolerances;
- on / off, each against its own baseline: fused AdamW, channels-last, SDPA (and its flash / efficient / math
  kernels) vs the classic attention processor, bf16 autocast vs float32 (TF32 off, default, allowed),
  torch.compile; probe cost; on request (--only): finetune.py --torch_compile, DeepSpeed ZeRO-2.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bench.gpu_sections import CORE, SECTIONS, SIZES, Context, Skip
from bench.gpu_table import table
from bench.timing import free_memory
from mem_analysis.cli import run_command
from mem_analysis.io import write_text_atomic
from mem_analysis.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]


def with_needs(names) -> set[str]:
    """The named sections and, recursively, those they need (ValueError on an unknown name)."""
    by_name, chosen, todo = {section.name: section for section in SECTIONS}, set(), list(names)
    while todo:
        name = todo.pop()
        if name not in by_name:
            raise ValueError(f"unknown section {name!r}; choose from {', '.join(by_name)}")
        if name not in chosen:
            chosen.add(name)
            todo.extend(by_name[name].needs)
    return chosen


def result_name(env: dict) -> str:
    """<card>-<UTC date>, lower case, letters, digits and '-' only."""
    card = re.sub(r"[^a-z0-9]+", "-", env.get("card", "unknown").lower()).strip("-")
    return f"{card}-{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}"


def write_results(ctx: Context) -> list[Path]:
    """The results JSON, written atomically to every destination."""
    name = result_name(ctx.result("env")) + ".json"
    destinations = [Path(p) for p in ctx.args.json] if ctx.args.json else [Path(ctx.args.results_dir) / name]
    if os.environ.get("OUT") and not ctx.args.json and Path(os.environ["OUT"]) != Path(ctx.args.results_dir):
        destinations.append(Path(os.environ["OUT"]) / name)
    text = json.dumps(ctx.results, indent=1, default=str)
    for path in destinations:
        write_text_atomic(path, text)
    return destinations


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line settings."""
    parser = argparse.ArgumentParser(prog="gpu_bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="sd15-shape", choices=sorted(PRESETS))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU check of every code path)")
    parser.add_argument("--budget_s", type=float, default=345.0, help="skip sections that would end after this")
    parser.add_argument("--only", default=None, help="comma list of sections to run (env, setup and dataset always "
                                                     "run; also the only way to run finetune_compile and zero2)")
    parser.add_argument("--json", action="append", default=None, help="write the results here (repeatable)")
    parser.add_argument("--results_dir", default=str(ROOT / "bench" / "results"),
                        help="folder of <card>-<date>.json when --json is not given (also $OUT/ when set)")
    parser.add_argument("--work_dir", default=None, help="scratch folder (default: a temporary one, removed)")
    parser.add_argument("--extra", default=None, help="JSON file whose object is stored under 'extra' (e.g. pytest)")
    parser.add_argument("--table_of", default=None, help="only print the table of this results JSON")
    return parser.parse_args(argv)


def wanted_sections(args) -> list:
    """The sections this run tries, in running order: all but the on-request ones, or --only and their needs."""
    if args.only is None:
        return [section for section in SECTIONS if not section.on_request]
    chosen = with_needs([*CORE, *args.only.split(",")])
    return [section for section in SECTIONS if section.name in chosen]


def run_section(section, ctx: Context, started: float) -> None:
    """Run one section (or record why not: a needed section that failed, the budget), then rewrite the JSON."""
    results, args = ctx.results, ctx.args
    name, elapsed = section.name, time.perf_counter() - started
    missing = [need for need in section.needs if results["status"].get(need) != "ok"]
    if missing:
        results["status"][name] = f"skipped: needs {', '.join(missing)}"
        return
    if name not in CORE and elapsed + section.seconds > args.budget_s and not args.smoke:
        results["status"][name] = (f"skipped: {elapsed:.0f} s + estimated {section.seconds} s > budget "
                                   f"{args.budget_s:.0f} s")
        return
    print(f"[gpu_bench] {name} (at {elapsed:.0f} s)", flush=True)
    section_start = time.perf_counter()
    try:
        results["sections"][name] = section.run(ctx)
        results["status"][name] = "ok"
    except Skip as reason:
        results["status"][name] = f"skipped: {reason}"
    except (Exception, SystemExit) as error:  # noqa: BLE001 - record and go on with the other sections
        traceback.print_exc()
        results["status"][name] = f"failed: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"
        results["sections"][name] = dict(error=traceback.format_exc(limit=4)[-3000:])
    finally:
        results["seconds"][name] = round(time.perf_counter() - section_start, 2)
        results["total_s"] = round(time.perf_counter() - started, 2)
        free_memory()
        write_results(ctx)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table_of:
        print(table(json.loads(Path(args.table_of).read_text())))
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA GPU; use --device cpu --smoke")
    sections = wanted_sections(args)
    torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default; sections that measure TF32 set it themselves
    threads = torch.get_num_threads()
    if args.smoke:  # code paths, not speed: one thread avoids OpenMP spin-waits on a shared CPU
        torch.set_num_threads(1)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    results = dict(started_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   command=" ".join(sys.argv), sizes="smoke" if args.smoke else "gpu", budget_s=args.budget_s,
                   status={}, seconds={}, sections={})
    if args.extra and Path(args.extra).is_file():
        results["extra"] = json.loads(Path(args.extra).read_text())
    ctx = Context(args, SIZES["smoke" if args.smoke else "gpu"], device, work, results)
    started = time.perf_counter()
    try:
        for section in sections:
            run_section(section, ctx, started)
    finally:
        torch.set_num_threads(threads)
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    paths = write_results(ctx)
    print("\n" + table(results))
    print(f"\n[gpu_bench] {results['total_s']:.0f} s; results in {', '.join(str(p) for p in paths)}")
    return 0 if all(v == "ok" or v.startswith("skipped") for v in results["status"].values()) else 1


def cli(argv=None) -> int:
    """main() with bad input (an unknown section, no CUDA) as one line and exit status 2."""
    return run_command(main, "gpu_bench.py", argv)


if __name__ == "__main__":
    sys.exit(cli())
