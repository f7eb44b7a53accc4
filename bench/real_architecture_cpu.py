"""The real SD v1.5 architecture (`sd15-shape`: 860 M-parameter UNet, CLIP-L-shaped text encoder, SD VAE;
random weights) end to end on CPU at 64 px, for LoRA and for full fine-tuning.

    python bench/real_architecture_cpu.py [--modes lora,full] [--threads 1] [--json OUT.json] [--work_dir DIR] [--keep]

Every stage runs the command a user runs, in its own process:
1. `make_base_model.py --preset sd15-shape` and a 64 px Twemoji study dataset (`build_duplicated_dataset.py`);
2. per mode, `accelerate launch train/finetune.py` (one process, float32 AdamW): a probe pass at step 0,
   two optimizer steps, a probe pass and checkpoint-2, a third step (the uninterrupted run);
3. a second run folder holding only that checkpoint-2 (hard links), continued with
   `--resume_from_checkpoint latest` to step 3, compared with the uninterrupted run (`resume_check`): bit for
   bit at one thread, where every kernel is deterministic; at more threads, where CPU kernels may sum in another
   order from run to run, against the spread of a second identical uninterrupted run (a twin), and so stated;
4. `eval/evaluate_checkpoints.py --checkpoints 2` on the resumed run (2 seeds, 4 DDIM steps).
It prints the seconds of each optimizer step (finetune.py's own `train/samples_per_second`, probes and
checkpoints left out) and the peak resident memory of each process (getrusage of a wrapper around it),
and exits 1 if the resume check fails. Full fine-tuning needs about 16 GiB of memory: run it alone.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
RESOLUTION, BATCH, STEPS = 64, 1, 3
# Runs one command and prints its peak resident set (the largest of its descendants, KiB on Linux).
MEASURE = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
           "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")
WEIGHTS = {"lora": "pytorch_lora_weights.safetensors", "full": "unet/diffusion_pytorch_model.safetensors"}


def run(command: list, log: Path, threads: int) -> dict:
    """Run `command` (from the repository root) under the peak-memory wrapper; wall seconds and peak GiB."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run([sys.executable, "-c", MEASURE, *map(str, command)], cwd=ROOT, env=env,
                              stdout=handle, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    lines = log.read_text().splitlines()
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(map(str, command))}\n" + "\n".join(lines[-30:]))
    peak_kib = int(next(line.split()[1] for line in lines if line.startswith("PEAK_RSS_KIB")))
    return {"seconds": round(seconds, 1), "peak_gib": round(peak_kib / 2**20, 2)}


def step_seconds(run_dir: Path) -> dict[int, float]:
    """Seconds of each logged optimizer step: batch / finetune.py's train/samples_per_second (logging_steps 1)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "logs" / "finetune"))
    events.Reload()
    return {s.step: round(BATCH / s.value, 2) for s in events.Scalars("train/samples_per_second")}


def finetune_command(model: Path, data: Path, output_dir: Path, mode: str, *extra) -> list:
    """accelerate launch line of a short sd15-shape run at 64 px, one process, float32."""
    lora = ["--use_lora", "--rank", "4"] if mode == "lora" else []
    return [ACCELERATE, "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "train/finetune.py", "--pretrained_model_name_or_path", model,
            "--train_data_dir", data, "--output_dir", output_dir, "--resolution", RESOLUTION,
            "--train_batch_size", BATCH, "--max_train_steps", STEPS, "--checkpointing_steps", 2,
            "--probe_steps", 2, "--probe_timesteps", 250, 750, "--probe_batch_size", 4, "--logging_steps", 1,
            "--validation_steps", 0, "--learning_rate", 1e-5, *lora, *extra]


# A resumed run passes the spread check when it differs from the uninterrupted run by at most this many times
# what two identical uninterrupted runs differ by. A wrong resume (another batch, random draw or optimizer state)
# moves the weights by the size of an optimizer step's update, which `step_update` reports beside it.
SPREAD_FACTOR = 10.0


def difference(a: dict, b: dict) -> tuple[float, int]:
    """(largest absolute difference, number of values that differ) between two dicts of tensors with the same keys."""
    if a.keys() != b.keys():
        raise ValueError(f"the weights hold different tensors: {sorted(a.keys() ^ b.keys())[:3]}")
    diffs = [(a[k].double() - b[k].double()).abs() for k in a]
    return max((float(d.max()) for d in diffs if d.numel()), default=0.0), int(sum(int((d > 0).sum()) for d in diffs))


def resume_check(uninterrupted: dict, resumed: dict, twin: dict | None = None) -> dict:
    """Whether resumed weights equal the uninterrupted run's, in the sense the run allows.

    Without `twin` (a deterministic run: one thread) they must be equal bit for bit. With `twin`, a second
    uninterrupted run made exactly like the first, the check is against the spread of the kernels: the resumed
    run passes when max|resumed - uninterrupted| <= SPREAD_FACTOR * max|twin - uninterrupted| (bit for bit
    again when the twins are equal). Returns the figures and `passed`.
    """
    max_abs, differing = difference(uninterrupted, resumed)
    result = {"check": "bitwise" if twin is None else "spread of two identical uninterrupted runs",
              "max_abs_resumed": max_abs, "values_differing_resumed": differing,
              "values": int(sum(t.numel() for t in uninterrupted.values()))}
    if twin is None:
        return {**result, "passed": differing == 0}
    spread, spread_differing = difference(uninterrupted, twin)
    return {**result, "max_abs_twin": spread, "values_differing_twin": spread_differing,
            "passed": max_abs <= SPREAD_FACTOR * spread if spread > 0 else differing == 0}


def bench_mode(mode: str, model: Path, data: Path, work: Path, threads: int) -> dict:
    """Uninterrupted run, resumed run and evaluation of one mode; figures and the resume check."""
    straight, resumed = work / f"{mode}-uninterrupted", work / f"{mode}-resumed"
    for folder in (straight, resumed):
        shutil.rmtree(folder, ignore_errors=True)
    result = {"train": run(finetune_command(model, data, straight, mode), work / f"{mode}-train.log", threads)}
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2", copy_function=os.link)
    result["resume"] = run(finetune_command(model, data, resumed, mode, "--resume_from_checkpoint", "latest"),
                           work / f"{mode}-resume.log", threads)
    result["step_seconds"] = {**step_seconds(straight), **{f"{k} (resumed)": v
                                                          for k, v in step_seconds(resumed).items()}}
    twin = None
    if threads > 1:  # kernels that split sums over threads may round differently from run to run
        twin_dir = work / f"{mode}-twin"
        shutil.rmtree(twin_dir, ignore_errors=True)
        result["twin"] = run(finetune_command(model, data, twin_dir, mode), work / f"{mode}-twin.log", threads)
        twin = load_file(str(twin_dir / WEIGHTS[mode]))
    uninterrupted = load_file(str(straight / WEIGHTS[mode]))
    result["resume_check"] = resume_check(uninterrupted, load_file(str(resumed / WEIGHTS[mode])), twin)
    result["resume_check"]["step_update"] = difference(uninterrupted, load_file(str(straight / "checkpoint-2" /
                                                                                   WEIGHTS[mode])))[0]
    result["evaluate"] = run([sys.executable, "eval/evaluate_checkpoints.py", "--run_dir", resumed, "--checkpoints",
                              2, "--num_seeds", 2, "--num_inference_steps", 4, "--bootstrap", 20],
                             work / f"{mode}-eval.log", threads)
    rows = (resumed / "eval" / "per_sample.csv").read_text().splitlines()
    result["evaluated_rows"] = len(rows) - 1
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default="lora,full", help="comma list of lora, full")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads of every process")
    parser.add_argument("--work_dir", default=None, help="default: a new temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (models, runs, logs)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="real_arch_"))
    work.mkdir(parents=True, exist_ok=True)
    model, data = work / "sd15-shape", work / "data"
    # The load average says how much other work shared the cores (the figures are wall-clock).
    results = {"resolution": RESOLUTION, "batch": BATCH, "threads": args.threads, "cpus": os.cpu_count(),
               "torch": torch.__version__, "load_average_at_start": [round(x, 1) for x in os.getloadavg()]}
    try:
        if not (model / "model_index.json").is_file():  # a --work_dir of an earlier run keeps its model and data
            results["build_model"] = run([sys.executable, "data_scripts/make_base_model.py", "--output_dir", model,
                                          "--preset", "sd15-shape", "--seed", 0], work / "model.log", args.threads)
            results["build_data"] = run([sys.executable, "data_scripts/build_duplicated_dataset.py", "--source",
                                         "twemoji", "--output_dir", data, "--max_images", 8, "--dup_factors", "1,2",
                                         "--samples_per_factor", 1, "--probe_unduplicated", 1, "--resolution",
                                         RESOLUTION, "--seed", 0], work / "data.log", args.threads)
        for mode in args.modes.split(","):
            results[mode] = bench_mode(mode, model, data, work, args.threads)
            results[mode]["load_average_after"] = [round(x, 1) for x in os.getloadavg()]
            print(f"{mode}: {json.dumps(results[mode])}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nsd15-shape at {RESOLUTION} px, batch {BATCH}, {args.threads} thread(s), float32 AdamW")
    for mode in args.modes.split(","):
        r = results[mode]
        steps = ", ".join(f"{k}: {v}" for k, v in r["step_seconds"].items())
        print(f"  {mode:4s}: s/step {steps}; peak RSS train {r['train']['peak_gib']} GiB, resume "
              f"{r['resume']['peak_gib']} GiB, evaluate {r['evaluate']['peak_gib']} GiB")
        print(f"        resume check ({describe(r['resume_check'])}): {'passed' if r['resume_check']['passed'] else 'FAILED'}")
    return 0 if all(results[m]["resume_check"]["passed"] for m in args.modes.split(",")) else 1


def describe(check: dict) -> str:
    """One line of a resume_check result, with the size of one optimizer step's update for scale."""
    text = (f"{check['check']}: resumed vs uninterrupted max |diff| {check['max_abs_resumed']:.2g} "
            f"({check['values_differing_resumed']:,} of {check['values']:,} values differ)")
    if "max_abs_twin" in check:
        text += (f"; two uninterrupted runs {check['max_abs_twin']:.2g} ({check['values_differing_twin']:,} values),"
                 f" allowed {SPREAD_FACTOR:g}x that")
    return text + f"; one step's update {check['step_update']:.2g}"


if __name__ == "__main__":
    sys.exit(main())
