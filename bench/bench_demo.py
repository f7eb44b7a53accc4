"""Where the CPU-seconds of `make demo` go: a per-stage, per-part profile, run short and scaled.

    python bench/bench_demo.py [--config configs/demo_cpu.yaml] [--vae_steps 20] [--train_steps 20]
                               [--eval_samples 8] [--workdir DIR] [--stages dataset,base_model,train,evaluate]
    python bench/bench_demo.py --workdir DIR --stages inputs,launch   # caches; 1 vs 2 training processes
    python bench/bench_demo.py --stages setup   # make setup vs pip compiling bytecode itself (new venvs)
    python bench/bench_demo.py --workdir DIR --stages optimizer   # AdamW step: default vs foreach vs fused
    python bench/bench_demo.py --stages auroc   # bootstrap AUROC intervals: vectorised vs scikit-learn per resample

Every figure is CPU-seconds of this process (time.process_time: user + system over all threads),
not wall time, so it holds on a shared machine. Each stage runs the real code of the demo
(make_base_model, build_duplicated_dataset, train/finetune.py's main, eval/evaluate_checkpoints.py's
main, in this process) on a short version, with its parts wrapped by timers that count exclusive time
(a part inside another is not counted twice). Figures are then scaled to the config:
- base model: VAE steps x vae_steps / --vae_steps;
- train: per-step parts x max_train_steps / --train_steps, one probe pass x the probes the config runs,
  one checkpoint write x the checkpoints it writes (the short run probes and checkpoints once each);
- evaluate: one checkpoint on --eval_samples probe samples, x samples / --eval_samples x the models
  evaluated (base + checkpoints); loading and the report once.
Process start-up (interpreter + imports of each stage's script) is measured in a child process.
"""
from __future__ import annotations

import argparse
import contextlib
import os
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

from bench.bench_train import reset_accelerate


class PartTimer:
    """Exclusive CPU-seconds per named part: wrap(owner, attr, part) times every call of owner.attr."""

    def __init__(self):
        self.seconds, self.calls, self.stack, self.undo = {}, {}, [], []

    def wrap(self, owner, attr: str, part: str) -> None:
        """Replace owner.attr by a timed version (restored by restore())."""
        original = getattr(owner, attr)
        timer = self

        def timed(*args, **kwargs):
            timer.stack.append(0.0)
            start = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.process_time() - start
                children = timer.stack.pop()
                timer.seconds[part] = timer.seconds.get(part, 0.0) + elapsed - children
                timer.calls[part] = timer.calls.get(part, 0) + 1
                if timer.stack:
                    timer.stack[-1] += elapsed

        setattr(owner, attr, timed)
        self.undo.append((owner, attr, original))

    def restore(self) -> None:
        """Put every wrapped attribute back."""
        for owner, attr, original in reversed(self.undo):
            setattr(owner, attr, original)
        self.undo.clear()

    @contextlib.contextmanager
    def total(self, part_of_rest: str):
        """Time a block; what no wrapped part took is booked as `part_of_rest`."""
        start, before = time.process_time(), sum(self.seconds.values())
        try:
            yield
        finally:
            rest = time.process_time() - start - (sum(self.seconds.values()) - before)
            self.seconds[part_of_rest] = self.seconds.get(part_of_rest, 0.0) + rest
            self.restore()


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
    from data_scripts import build_duplicated_dataset

    timer = PartTimer()
    with timer.total("build dataset"):
        build_duplicated_dataset.main(["--output_dir", str(work / "data"), "--overwrite", *header(config, "dataset")])
    return {"dataset": timer.seconds}


def profile_base_model(config: Path, work: Path, vae_steps: int) -> dict:
    """make_base_model with --vae_steps short; VAE training scaled to the config's steps."""
    from data_scripts import make_base_model

    flags = header(config, "base_model")
    wanted = int(flag(flags, "--vae_steps", 300))
    flags = [f for i, f in enumerate(flags) if f != "--vae_steps" and (i == 0 or flags[i - 1] != "--vae_steps")]
    timer = PartTimer()
    timer.wrap(make_base_model, "train_vae", "VAE training")
    timer.wrap(make_base_model, "load_pool", "image pool loading")
    timer.wrap(make_base_model, "vae_quality", "VAE quality + scaling")
    timer.wrap(make_base_model, "latent_scaling_factor", "VAE quality + scaling")
    timer.wrap(make_base_model, "pretrain_unet", "UNet pre-training")
    with timer.total("build + save pipeline"):
        make_base_model.main(["--output_dir", str(work / "base"), "--overwrite", "--preset", "tiny", *flags,
                              "--vae_steps", str(vae_steps), "--exclude_dataset", str(work / "data")])
    timer.seconds["VAE training"] *= wanted / vae_steps
    return {"base_model": timer.seconds}


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
    """train/finetune.py's main for --train_steps steps (one probe pass after step 0 and one checkpoint), scaled."""
    import accelerate.optimizer
    from accelerate import Accelerator
    from transformers import CLIPTextModel

    from train import finetune, finetune_data

    counts = training_counts(config, work)
    timer = PartTimer()
    per_step = {"data loading": (finetune_data.TrainExamples, "__getitem__"),
                "VAE encode (train batch)": (finetune_data.ImageLatents, "__call__"),
                "UNet forward + loss": (finetune, "diffusion_loss"),
                "backward": (Accelerator, "backward"),
                "optimizer": (accelerate.optimizer.AcceleratedOptimizer, "step"),
                "text encoding": (CLIPTextModel, "forward")}
    for part, (owner, attr) in per_step.items():
        timer.wrap(owner, attr, part)
    if hasattr(finetune_data, "CaptionEmbeddings"):  # the cached lookup, when this version has it
        timer.wrap(finetune_data.CaptionEmbeddings, "__call__", "text encoding")
    timer.wrap(finetune, "build_probe_inputs", "probe inputs (once)")
    timer.wrap(finetune, "run_probes", "probes")
    timer.wrap(finetune, "save_checkpoint", "checkpoint writes")
    timer.wrap(finetune, "save_final_model", "final model write")
    timer.wrap(finetune, "load_components", "model loading")
    reset_accelerate()
    shutil.rmtree(work / "run", ignore_errors=True)  # a folder holds one run (a --workdir may hold the last one's)
    with timer.total("loop, logging, other"):
        finetune.main(["--config", str(config), "--pretrained_model_name_or_path", str(work / "base"),
                       "--train_data_dir", str(work / "data"), "--output_dir", str(work / "run"),
                       "--max_train_steps", str(train_steps), "--probe_steps", str(train_steps),
                       "--checkpointing_steps", str(train_steps)])
    scaled = dict(timer.seconds)
    for part in [*per_step, "loop, logging, other"]:
        scaled[part] = scaled.get(part, 0.0) * counts["steps"] / train_steps
    scaled["probes"] = scaled.get("probes", 0.0) / 2 * counts["probes"]  # the short run probed at 0 and at the end
    scaled["checkpoint writes"] = scaled.get("checkpoint writes", 0.0) * counts["checkpoints"]
    scaled["start-up (imports)"] = startup_seconds("train.finetune")
    return {"train": scaled}


def input_seconds(config: Path, work: Path, cached: bool, steps: int) -> dict:
    """CPU-seconds of finetune's input pipeline alone (data loading, caption embeddings, VAE latents) over
    `steps` batches."""
    from mem_analysis.sd import load_components
    from train.finetune_config import resolve_config
    from train.finetune_data import CaptionEmbeddings, EpochSampler, ImageLatents, TrainExamples, load_splits

    flags = ["--cache_caption_embeddings", "--cache_train_pixels", "--cache_train_latents"] if cached else \
        ["--no-cache_caption_embeddings", "--no-cache_train_pixels", "--no-cache_train_latents"]
    args = resolve_config(["--config", str(config), "--pretrained_model_name_or_path", str(work / "base"),
                           "--train_data_dir", str(work / "data"), *flags])
    train_split, _ = load_splits(args)
    parts = load_components(args.pretrained_model_name_or_path)
    data = TrainExamples(train_split, parts.tokenizer, args.resolution or 32, args)
    sampler = EpochSampler(len(data), args.seed)
    loader = torch.utils.data.DataLoader(data, batch_size=args.train_batch_size, sampler=sampler, drop_last=False)
    embeddings = CaptionEmbeddings(parts.text_encoder, args.cache_caption_embeddings)
    latents = ImageLatents(parts.vae, args.cache_train_latents)
    generator = torch.Generator().manual_seed(0)
    seconds = {"data loading": 0.0, "text encoding": 0.0, "VAE latents": 0.0}
    done, epoch = 0, 0
    while done < steps:
        sampler.set_epoch(epoch)
        batches = iter(loader)
        while done < steps:
            start = time.process_time()
            batch = next(batches, None)
            seconds["data loading"] += time.process_time() - start
            if batch is None:
                break
            start = time.process_time()
            embeddings(batch["input_ids"])
            seconds["text encoding"] += time.process_time() - start
            start = time.process_time()
            latents(batch["pixel_values"], batch["row"], generator)
            seconds["VAE latents"] += time.process_time() - start
            done += 1
        epoch += 1
    return seconds


def compare_inputs(config: Path, work: Path, uncached_steps: int) -> None:
    """Input pipeline of the whole run with the caches on, beside --uncached_steps without them (scaled)."""
    steps = training_counts(config, work)["steps"]
    cached = input_seconds(config, work, True, steps)
    uncached = {k: v * steps / uncached_steps for k, v in input_seconds(config, work, False, uncached_steps).items()}
    print(f"\ninput pipeline over the run's {steps} steps, CPU-seconds (same process, one after the other):")
    for part in cached:
        print(f"  {part:<14} per batch {uncached[part]:7.1f}   cached {cached[part]:7.1f}   "
              f"ratio {cached[part] / max(uncached[part], 1e-9):.3f}")


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
    """Seconds of the report's bootstrap AUROC intervals (early_warning.auroc_with_ci, `calls` probe steps of
    `n_samples` samples) vectorised over resamples, vs one scikit-learn roc_auc_score per resample (before)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from mem_analysis.early_warning import auroc_with_ci

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
    """evaluate_checkpoints' main on one checkpoint and --eval_samples probe samples, scaled to the demo's."""
    from datasets import load_from_disk

    from eval import evaluate_checkpoints, report
    from mem_analysis import measure

    counts = training_counts(config, work)
    total_samples = len(load_from_disk(str(work / "data"))["probe"])
    models = 1 + counts["checkpoints"]
    timer = PartTimer()
    scaled_parts = {"probes (M1/M2)": (evaluate_checkpoints, "probe_rows"),
                    "sampling (DDIM + CFG)": (measure, "sample_trajectories"),
                    "decoding": (measure, "decode_latents"),
                    "severity (M6)": (measure, "severity_scores"),
                    "metrics (M3-M5)": (measure, "prompt_measurements"),
                    "checkpoint loading": (evaluate_checkpoints.run, "load_checkpoint_unet"),
                    "table + TensorBoard writes": (evaluate_checkpoints, "store_checkpoint")}
    for part, (owner, attr) in scaled_parts.items():
        timer.wrap(owner, attr, part)
    timer.wrap(evaluate_checkpoints, "read_probe_set", "probe set (once)")
    timer.wrap(report, "write_report", "report + figures")
    timer.wrap(evaluate_checkpoints, "load_components", "model loading")
    reset_accelerate()
    with timer.total("other"):
        evaluate_checkpoints.main(evaluate_checkpoints.parse_args(
            ["--run_dir", str(work / "run"), "--checkpoints", str(train_steps), "--max_samples", str(samples),
             *header(config, "evaluate")]))
    scaled = dict(timer.seconds)
    for part in scaled_parts:
        factor = models * (total_samples / samples if part not in ("checkpoint loading",) else 1)
        scaled[part] = scaled.get(part, 0.0) * factor
    scaled["start-up (imports)"] = startup_seconds("eval.evaluate_checkpoints")
    return {"evaluate": scaled}


def print_table(stages: dict) -> None:
    """Per-stage, per-part CPU-seconds, largest first, with stage totals and the grand total."""
    grand = sum(sum(parts.values()) for parts in stages.values())
    print(f"\nCPU-seconds by stage and part (scaled to the config; share of the whole demo):")
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
                   help="stages to profile (and `inputs`: the input pipeline with and without caches; `launch`: "
                        "training wall time as 1 process x 2 threads vs 2 DDP processes x 1 thread; `setup`: "
                        "make setup's wall time vs pip compiling the bytecode, into new venvs; `optimizer`: AdamW step "
                        "time, default vs foreach vs fused; `auroc`: the report's bootstrap AUROC intervals); "
                        "later ones reuse --workdir's dataset, base model and run")
    p.add_argument("--launch_steps", type=int, default=120, help="training steps of each `launch` run")
    p.add_argument("--uncached_steps", type=int, default=150, help="steps of the uncached input pipeline (scaled)")
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
            if name == "inputs":
                compare_inputs(config, work, args.uncached_steps)
            elif name == "launch":
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
