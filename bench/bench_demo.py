"""Where the CPU-seconds of `make demo` go: a per-stage, per-part profile, run short and scaled.

    python bench/bench_demo.py [--config configs/demo_cpu.yaml] [--vae_steps 20] [--train_steps 20]
                               [--eval_samples 8] [--workdir DIR] [--stages dataset,base_model,train,evaluate]
    python bench/bench_demo.py --workdir DIR --stages launch     # 1 vs 2 training processes
    python bench/bench_demo.py --stages setup   # make setup vs pip compiling bytecode itself (new venvs)
    python bench/bench_demo.py --workdir DIR --stages optimizer   # AdamW step: default vs foreach vs fused
    python bench/bench_demo.py --stages auroc   # bootstrap AUROC intervals: vectorised vs scikit-learn per resample

Every figure is CPU-seconds (user + system over all threads), not wall time, so it holds on a shared
machine. Each stage runs the demo's own command for that stage (make_base_model.py, build_duplicated_dataset.py,
train/finetune.py, eval/evaluate_checkpoints.py) on a short version, in a fresh process under cProfile with a
CPU-time clock; its parts are read from the profile by function name (the cumulative seconds of the functions
listed in PARTS, chosen so that none runs inside another), the rest of the process is booked as "other".
Figures are then scaled to the config:
- base model: VAE steps x vae_steps / --vae_steps;
- train: per-step parts x max_train_steps / --train_steps, one probe pass x the probes the config runs,
  one checkpoint write x the checkpoints it writes (the short run probes and checkpoints once each);
- evaluate: one checkpoint on --eval_samples probe samples, x samples / --eval_samples x the models
  evaluated (base + checkpoints); loading and the report once.
Process start-up (interpreter + imports of each stage's script) is measured in a child process. The profiler's
own bookkeeping adds to every part; compare parts of one run, not against a run without the profiler. The
input pipeline with and without finetune.py's input cache: bench/bench_train.py.
"""
from __future__ import annotations

import argparse
import ast
import functools
import os
import pstats
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# Runs a script as `python SCRIPT ARGS` would, under cProfile with a CPU-time clock, and saves the profile. The
# script's module is imported first, unprofiled, so its imports are start-up (measured apart), not its parts.
PROFILED = ("import cProfile, importlib, runpy, sys, time\n"
            "out, module, sys.argv = sys.argv[1], sys.argv[2], sys.argv[3:]\n"
            "if module:\n    importlib.import_module(module)\n"
            "profiler, code = cProfile.Profile(time.process_time), 0\n"
            "try:\n    profiler.runcall(runpy.run_path, sys.argv[0], run_name='__main__')\n"
            "except SystemExit as stop:\n    code = stop.code or 0\n"
            "profiler.dump_stats(out)\nsys.exit(code)")


def profiled(script: str, argv: list, profile: Path) -> pstats.Stats:
    """Run `python SCRIPT ARGV` from the repository root under cProfile (CPU-time clock), its imports done
    first outside the profile when it is a module of the repository's packages; its stats."""
    path = ROOT / script
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts) if path.is_relative_to(ROOT) else ""
    subprocess.run([sys.executable, "-c", PROFILED, str(profile), module, str(path), *map(str, argv)], check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return pstats.Stats(str(profile))


@functools.lru_cache(maxsize=None)
def definition_lines(path: str) -> dict[str, int]:
    """Qualified name -> first line (the first decorator's, as a code object counts it) of every function."""
    lines = {}

    def visit(node, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if not isinstance(child, ast.ClassDef):
                    lines[prefix + child.name] = min([child.lineno] + [d.lineno for d in child.decorator_list])
                visit(child, f"{prefix}{child.name}.")

    visit(ast.parse(Path(path).read_text()), "")
    return lines


def part_seconds(stats: pstats.Stats, parts: dict[str, list[tuple[str, str]]]) -> dict[str, float]:
    """Per part, the cumulative seconds of its functions, each named by (a fragment of its file's path,
    qualified name); the process's remaining seconds as "other". Parts must not run inside one another."""
    cumulative = {}
    for (filename, line, name), (_, _, _, total, _) in stats.stats.items():
        cumulative[(filename, line, name)] = total
    seconds = {}
    for part, functions in parts.items():
        found = 0.0
        for fragment, qualname in functions:
            for (filename, line, name), total in cumulative.items():
                if fragment in filename and filename.endswith(".py") and name == qualname.split(".")[-1] \
                        and definition_lines(filename).get(qualname) == line:
                    found += total
        seconds[part] = found
    seconds["other"] = stats.total_tt - sum(seconds.values())
    return seconds


def header(config: Path, name: str) -> list[str]:
    """The flags of a `# NAME:` header line of a demo config (as demo.sh reads them)."""
    match = re.search(rf"^# {name}: *(.*)$", config.read_text(), re.MULTILINE)
    return shlex.split(match.group(1)) if match else []


def startup_seconds(module: str) -> float:
    """CPU-seconds of a fresh interpreter importing `module` (a stage's start-up cost)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def flag(flags: list[str], name: str, default=None):
    """The value after `--name` in a flag list."""
    return flags[flags.index(name) + 1] if name in flags else default


def profile_dataset(config: Path, work: Path) -> dict:
    """The dataset stage, run in full (it is short)."""
    stats = profiled("data_scripts/build_duplicated_dataset.py",
                     ["--output_dir", work / "data", "--overwrite", *header(config, "dataset")], work / "dataset.prof")
    return {"dataset": {"build dataset": stats.total_tt}}


# The parts of each stage: label -> the functions whose cumulative seconds it holds, each (path fragment,
# qualified name). Chosen so that no part runs inside another.
BASE_MODEL_PARTS = {"VAE training": [("make_base_model.py", "train_vae")],
                    "image pool loading": [("make_base_model.py", "load_pool")],
                    "VAE quality + scaling": [("make_base_model.py", "vae_quality"),
                                              ("make_base_model.py", "latent_scaling_factor")],
                    "text encoder training": [("make_base_model.py", "train_text_encoder")],
                    "UNet pre-training": [("make_base_model.py", "pretrain_unet")]}
TRAIN_PARTS = {"data loading": [("train/", "TrainExamples.__getitem__")],
               "input cache build (once)": [("train/", "prepare_train_inputs")],
               "VAE latents (per step)": [("train/", "ImageLatents.__call__")],
               "text encoding (per step)": [("train/", "CaptionEmbeddings.__call__")],
               "UNet forward + loss": [("train/", "diffusion_loss")],
               "backward": [("accelerate/", "Accelerator.backward")],
               "optimizer": [("accelerate/", "AcceleratedOptimizer.step")],
               "probe inputs (once)": [("train/", "build_probe_inputs")],
               "probes": [("train/", "run_probes")],
               "checkpoint writes": [("train/", "save_checkpoint")],
               "final model write": [("train/", "save_final_model")],
               "model loading": [("mem_analysis/", "load_components")]}
PER_STEP = ("data loading", "VAE latents (per step)", "text encoding (per step)", "UNet forward + loss", "backward",
            "optimizer", "other")
EVALUATE_PARTS = {"probes (M1/M2)": [("mem_analysis/", "probe_rows")],
                  "sampling (DDIM + CFG)": [("mem_analysis/", "sample_trajectories")],
                  "decoding": [("mem_analysis/", "decode_latents")],
                  "severity (M6)": [("mem_analysis/", "severity_scores")],
                  "metrics (M3-M5)": [("mem_analysis/", "prompt_measurements")],
                  "checkpoint loading": [("mem_analysis/", "load_checkpoint_unet")],
                  "table + TensorBoard writes": [("eval/", "store_checkpoint")],
                  "probe set (once)": [("eval/", "read_probe_set")],
                  "report + figures": [("eval/markdown.py", "write_report")],
                  "model loading": [("mem_analysis/", "load_components")]}


def profile_base_model(config: Path, work: Path, vae_steps: int) -> dict:
    """make_base_model.py with --vae_steps short; VAE training scaled to the config's steps."""
    flags = header(config, "base_model")
    wanted = int(flag(flags, "--vae_steps", 300))
    flags = [f for i, f in enumerate(flags) if f != "--vae_steps" and (i == 0 or flags[i - 1] != "--vae_steps")]
    stats = profiled("data_scripts/make_base_model.py",
                     ["--output_dir", work / "base", "--overwrite", "--preset", "tiny", *flags, "--vae_steps",
                      vae_steps, "--exclude_dataset", work / "data"], work / "base_model.prof")
    seconds = part_seconds(stats, BASE_MODEL_PARTS)
    seconds["VAE training"] *= wanted / vae_steps
    seconds["build + save pipeline"] = seconds.pop("other")
    return {"base_model": seconds}


def training_counts(config: Path, work: Path) -> dict:
    """max_train_steps (`auto` resolved on the dataset in `work`), probe passes and checkpoint writes of the run."""
    import yaml

    from train.finetune_config import AUTO_EPOCHS, auto_train_steps

    values = yaml.safe_load(config.read_text())
    probe_steps, ckpt_steps = int(values.get("probe_steps") or 0), int(values.get("checkpointing_steps") or 0)
    steps = values["max_train_steps"]
    if steps == "auto":
        from datasets import load_from_disk

        rows = len(load_from_disk(str(work / "data"))["train"])
        steps = auto_train_steps(rows, int(values["train_batch_size"]), ckpt_steps,
                                 float(values.get("auto_train_passes", AUTO_EPOCHS)))
    steps = int(steps)
    return dict(steps=steps, probes=(steps // probe_steps + 1) if probe_steps else 0,
                checkpoints=steps // ckpt_steps if ckpt_steps else 0)


def profile_train(config: Path, work: Path, train_steps: int) -> dict:
    """train/finetune.py for --train_steps steps (one probe pass after step 0 and one checkpoint), scaled."""
    counts = training_counts(config, work)
    shutil.rmtree(work / "run", ignore_errors=True)  # a folder holds one run (a --workdir may hold the last one's)
    stats = profiled("train/finetune.py",
                     ["--config", config, "--pretrained_model_name_or_path", work / "base", "--train_data_dir",
                      work / "data", "--output_dir", work / "run", "--max_train_steps", train_steps, "--probe_steps",
                      train_steps, "--checkpointing_steps", train_steps], work / "train.prof")
    scaled = part_seconds(stats, TRAIN_PARTS)
    for part in PER_STEP:
        scaled[part] *= counts["steps"] / train_steps
    scaled["probes"] = scaled["probes"] / 2 * counts["probes"]  # the short run probed at 0 and at the end
    scaled["checkpoint writes"] *= counts["checkpoints"]
    scaled["loop, logging, other"] = scaled.pop("other")
    scaled["start-up (imports)"] = startup_seconds("train.finetune")
    return {"train": scaled}


def print_alternation(title: str, seconds: dict[str, list[float]], digits: int = 1) -> None:
    """Figures of candidates run in alternation, each with its best over the first candidate's best."""
    print(f"\n{title}")
    first = min(next(iter(seconds.values())))
    for name, values in seconds.items():
        print(f"  {name:<30} {' '.join(f'{v:6.{digits}f}' for v in values)}   best / first's best "
              f"{min(values) / first:.3f}")


def compare_launches(config: Path, work: Path, steps: int, repeats: int = 2) -> None:
    """Wall seconds of `steps` training steps as one process with 2 threads vs 2 DDP processes with 1 each,
    in alternation (the demo's training stage launches the first)."""
    launches = {"1 process x 2 threads": (["--cpu", "--num_processes", "1"], {"OMP_NUM_THREADS": "2"}),
                "2 DDP processes x 1 thread": (["--config_file", "configs/accelerate/multi_gpu.yaml",
                                                "--num_processes", "2"],
                                               {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"})}
    seconds = {name: [] for name in launches}
    for _ in range(repeats):
        for name, (flags, env) in launches.items():
            command = [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_machines", "1",
                       "--mixed_precision", "no", "--dynamo_backend", "no", "train/finetune.py",
                       "--config", str(config), "--pretrained_model_name_or_path", str(work / "base"),
                       "--train_data_dir", str(work / "data"), "--output_dir", str(work / "launch_run"),
                       "--max_train_steps", str(steps), "--probe_steps", "0", "--checkpointing_steps", "0"]
            shutil.rmtree(work / "launch_run", ignore_errors=True)  # each repeat trains a new run
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, env={**os.environ, **env})
            seconds[name].append(time.perf_counter() - start)
    print_alternation(f"training launch, {steps} steps (start-up included), wall seconds of {repeats} runs in "
                      "alternation:", seconds)


def compare_setups(work: Path, repeats: int = 2) -> None:
    """Wall seconds of `make setup` (pip --no-compile, then compileall on every core) vs pip compiling the
    bytecode itself (the recipe before), each into a new venv, in alternation (pip's download cache is shared)."""
    pip = ["-q", "--disable-pip-version-check"]

    def pip_compiles(venv: Path) -> None:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin/pip"), "install", *pip, "-r", "requirements.txt"], check=True,
                       env={**os.environ, "DS_BUILD_OPS": "0"})
        subprocess.run([str(venv / "bin/pip"), "install", *pip, "--no-deps", "--no-build-isolation", "-e", "."],
                       check=True)

    def make_setup(venv: Path) -> None:
        subprocess.run(["make", "--no-print-directory", "-s", "setup", f"VENV={venv}", f"PYTHON={sys.executable}"],
                       check=True, stdout=subprocess.DEVNULL)

    setups = {"pip compiles (one core)": pip_compiles, "make setup (compileall -j 0)": make_setup}
    seconds = {name: [] for name in setups}
    for repeat in range(repeats):
        for name, build in setups.items():
            venv = work / f"setup_venv_{repeat}"
            start = time.perf_counter()
            build(venv)
            seconds[name].append(time.perf_counter() - start)
            shutil.rmtree(venv)
    print_alternation(f"setup of a new venv, wall seconds of {repeats} runs in alternation:", seconds)


def compare_optimizers(config: Path, work: Path, steps: int = 200, repeats: int = 2) -> None:
    """Milliseconds per AdamW step on the demo's UNet: PyTorch's default on a CPU (a loop over tensors),
    foreach, and fused (what finetune.py builds), in alternation."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(work / "base", subfolder="unet")
    for parameter in unet.parameters():
        parameter.grad = torch.randn_like(parameter) * 1e-3
    options = {"default (loop over tensors)": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    seconds = {name: [] for name in options}
    for _ in range(repeats):
        for name, flags in options.items():
            optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=0.0, **flags)
            optimizer.step()
            start = time.perf_counter()
            for _ in range(steps):
                optimizer.step()
            seconds[name].append((time.perf_counter() - start) / steps * 1e3)
    print_alternation(f"AdamW step on the demo UNet ({sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M "
                      f"parameters), wall ms per step, {repeats} runs of {steps} in alternation:", seconds, digits=2)


def compare_auroc_bootstrap(n_samples: int = 36, n_boot: int = 1000, calls: int = 9, repeats: int = 2) -> None:
    """Seconds of the report's bootstrap AUROC intervals (stats.auroc_with_ci, `calls` probe steps of
    `n_samples` samples) vectorised over resamples, vs one scikit-learn roc_auc_score per resample (before)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from mem_analysis.stats import auroc_with_ci

    rng = np.random.default_rng(0)
    labels = np.arange(n_samples) < n_samples // 6
    scores = [rng.normal(size=n_samples) + labels for _ in range(calls)]

    def per_resample(score):
        pick = np.random.default_rng(0).integers(0, n_samples, (n_boot, n_samples))
        return [roc_auc_score(labels[p], score[p]) for p in pick if labels[p].any() and not labels[p].all()]

    seconds = {"scikit-learn per resample": [], "vectorised (auroc_rows)": []}
    for _ in range(repeats):
        start = time.perf_counter()
        before = [np.quantile(per_resample(score), [0.025, 0.975]) for score in scores]
        seconds["scikit-learn per resample"].append(time.perf_counter() - start)
        start = time.perf_counter()
        after = [auroc_with_ci(score, labels, n_boot) for score in scores]
        seconds["vectorised (auroc_rows)"].append(time.perf_counter() - start)
    same = all(np.allclose(b, [a["ci_low"], a["ci_high"]]) for b, a in zip(before, after))
    print_alternation(f"bootstrap AUROC intervals, {calls} x {n_samples} samples x {n_boot} resamples, wall "
                      f"seconds of {repeats} runs in alternation (same intervals: {same}):", seconds, digits=2)


def profile_evaluate(config: Path, work: Path, train_steps: int, samples: int) -> dict:
    """evaluate_checkpoints.py on one checkpoint and --eval_samples probe samples, scaled to the demo's."""
    from datasets import load_from_disk

    counts = training_counts(config, work)
    total_samples = len(load_from_disk(str(work / "data"))["probe"])
    models = 1 + counts["checkpoints"]
    shutil.rmtree(work / "run" / "eval", ignore_errors=True)  # evaluated afresh, not skipped as done
    stats = profiled("eval/evaluate_checkpoints.py",
                     ["--run_dir", work / "run", "--checkpoints", train_steps, "--max_samples", samples,
                      *header(config, "evaluate")], work / "evaluate.prof")
    scaled = part_seconds(stats, EVALUATE_PARTS)
    for part in ("probes (M1/M2)", "sampling (DDIM + CFG)", "decoding", "severity (M6)", "metrics (M3-M5)",
                 "table + TensorBoard writes"):
        scaled[part] *= models * total_samples / samples
    scaled["checkpoint loading"] *= models
    scaled["start-up (imports)"] = startup_seconds("eval.evaluate_checkpoints")
    return {"evaluate": scaled}


def print_table(stages: dict) -> None:
    """Per-stage, per-part CPU-seconds, largest first, with stage totals and the grand total."""
    grand = sum(sum(parts.values()) for parts in stages.values())
    print("\nCPU-seconds by stage and part (scaled to the config; share of the whole demo):")
    for stage, parts in stages.items():
        total = sum(parts.values())
        print(f"{stage:<12} {total:8.1f}  {100 * total / grand:5.1f} %")
        for part, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
            print(f"  {part:<30} {seconds:8.1f}  {100 * seconds / grand:5.1f} %")
    print(f"{'total':<12} {grand:8.1f}  (setup not included)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo_cpu.yaml")
    p.add_argument("--vae_steps", type=int, default=20, help="VAE steps run (scaled to the config's)")
    p.add_argument("--train_steps", type=int, default=20, help="training steps run (scaled to the config's)")
    p.add_argument("--eval_samples", type=int, default=8, help="probe samples evaluated (scaled to all)")
    p.add_argument("--workdir", default=None, help="keep the short run here (default: a temporary folder)")
    p.add_argument("--stages", default="dataset,base_model,train,evaluate",
                   help="stages to profile (and `launch`: "
                        "training wall time as 1 process x 2 threads vs 2 DDP processes x 1 thread; `setup`: "
                        "make setup's wall time vs pip compiling the bytecode, into new venvs; `optimizer`: AdamW step "
                        "time, default vs foreach vs fused; `auroc`: the report's bootstrap AUROC intervals); "
                        "later ones reuse --workdir's dataset, base model and run")
    p.add_argument("--launch_steps", type=int, default=120, help="training steps of each `launch` run")
    args = p.parse_args(argv)
    wanted = args.stages.split(",")
    config = Path(args.config)
    print(f"torch threads {torch.get_num_threads()}; figures are CPU-seconds (process_time), not wall time")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        profiles = {"dataset": lambda: profile_dataset(config, work),
                    "base_model": lambda: profile_base_model(config, work, args.vae_steps),
                    "train": lambda: profile_train(config, work, args.train_steps),
                    "evaluate": lambda: profile_evaluate(config, work, args.train_steps, args.eval_samples)}
        stages = {}
        for name in wanted:
            if name == "launch":
                compare_launches(config, work, args.launch_steps)
            elif name == "setup":
                compare_setups(work)
            elif name == "optimizer":
                compare_optimizers(config, work)
            elif name == "auroc":
                compare_auroc_bootstrap()
            else:
                stages.update(profiles[name]())
    if stages:
        print_table(stages)
    return 0


if __name__ == "__main__":
    sys.exit(main())
