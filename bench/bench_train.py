"""finetune.py with its input cache, against the bare diffusers loop and against finetune.py without the cache,
side by side in one run on CPU; the cache's build time and memory; the probes' and early warning's share.

    python bench/bench_train.py                                   # the demo configuration (configs/demo_cpu.yaml)
    python bench/bench_train.py --preset sd15-shape --config configs/finetune_tiny.yaml --resolution 64 --lora \
        --dataset "--source twemoji --max_images 24 --dup_factors 1,4 --samples_per_factor 2 --seed 0" \
        --batch 1 --steps 6 --warmup 2 --rounds 1 --no-probe_costs   # the real SD v1.5 architecture, short

Every figure comes from this one run, the three loops alternating round by round so that a change of machine
load hits all alike, each on --threads threads (finetune.py reads OMP_NUM_THREADS as the user's count):
- bare: the loop of diffusers' train_text_to_image.py on the same model, rows and batch, in this process: each
  step decodes and preprocesses its rows, encodes them with the VAE and the text encoder, then UNet forward and
  backward, gradient clipping and AdamW (PyTorch's default implementation, as the example builds it);
- finetune.py cached: `python train/finetune.py --config CONFIG ...` with probes, checkpoints and validation
  off: each unique image's VAE posterior and each caption's embedding encoded once before the first step
  (train/finetune_cache.py), sampled each step;
- finetune.py uncached: the same with --no-cache_latents --no-cache_caption_embeddings (encodes every batch).
Step seconds are medians after --warmup steps (finetune.py's own `train/samples_per_second`); the goal is
cached / bare <= 0.5. CPU-seconds per step beside them (the bare loop's process time per step, finetune.py's own
`train/cpu_seconds_per_step`) hold on a machine shared with other jobs, where wall time does not; at --threads 1
they are the work itself (more threads add OpenMP spin-waits). Also: the cache's build seconds, size and the
process's peak memory (RUN/cache/'s metadata), peak resident memory of each finetune.py process, one probe pass
(mem_analysis.probes.probe_metrics on the probe split as finetune.py builds it) as a share of training at the
config's --probe_steps, and the early warning's scoring of that pass (mem_analysis.early_warning.score_step). The
figures go to stdout and to --json (default bench/results/train_cache-<preset>-<UTC date>.json).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.finetune_runs import ROOT, finetune_record
from mem_analysis.cli import run_command
from mem_analysis.io import write_text_atomic

UNCACHED = ["--no-cache_latents", "--no-cache_caption_embeddings"]


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line settings."""
    parser = argparse.ArgumentParser(prog="bench_train.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo_cpu.yaml"),
                        help="finetune.py config; its `# dataset:` line builds the data unless --dataset is given")
    parser.add_argument("--dataset", default=None, help="build_duplicated_dataset.py flags, in quotes (default: the "
                                                        "config's `# dataset:` line)")
    parser.add_argument("--preset", default="tiny", help="mem_analysis.presets model (random weights)")
    parser.add_argument("--resolution", type=int, default=None, help="image size (default: the dataset line's)")
    parser.add_argument("--max_images", type=int, default=None, help="fewer source images than the dataset line")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the config's)")
    parser.add_argument("--lora", action="store_true", help="LoRA r=4 in every loop instead of the full UNet")
    parser.add_argument("--steps", type=int, default=30, help="steps per loop and round")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of each median")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the three loops")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of every loop")
    parser.add_argument("--probe_costs", action=argparse.BooleanOptionalAction, default=True,
                        help="also time one probe pass and the early warning on the probe split")
    parser.add_argument("--work_dir", default=None, help="keep model, data and runs here (default: temporary)")
    parser.add_argument("--json", default=None, help="results file (default bench/results/train_cache-...json)")
    args = parser.parse_args(argv)
    if args.warmup >= args.steps:
        raise ValueError(f"--warmup {args.warmup} leaves no timed step of --steps {args.steps}")
    return args


def config_header(config: Path, name: str) -> list[str]:
    """The flags of a config's `# NAME:` header line (as data_scripts/demo.sh reads them)."""
    match = re.search(rf"^# {name}: *(.*)$", config.read_text(), re.MULTILINE)
    return shlex.split(match.group(1)) if match else []


def replaced(flags: list[str], name: str, value) -> list[str]:
    """A flag list with `--name value` set (replaced when present, appended otherwise)."""
    if value is None:
        return flags
    if f"--{name}" in flags:
        at = flags.index(f"--{name}")
        return [*flags[:at + 1], str(value), *flags[at + 2:]]
    return [*flags, f"--{name}", str(value)]


def build_inputs(args, work: Path) -> tuple[Path, Path]:
    """The model (the preset, random weights) and the study dataset of the config's `# dataset:` line."""
    from mem_analysis.presets import build_pipeline

    model, data = work / "model", work / "data"
    if not (model / "model_index.json").is_file():
        build_pipeline(args.preset, seed=0).save_pretrained(model, safe_serialization=True)
    if not (data / "manifest.json").is_file():
        flags = shlex.split(args.dataset) if args.dataset else config_header(Path(args.config), "dataset")
        if not flags:
            raise ValueError(f"{args.config} has no `# dataset:` line; give --dataset")
        flags = replaced(replaced(flags, "resolution", args.resolution), "max_images", args.max_images)
        subprocess.run([sys.executable, str(ROOT / "data_scripts" / "build_duplicated_dataset.py"), "--output_dir",
                        str(data), *flags], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return model, data


def batch_size(args) -> int:
    """--batch, else the config's train_batch_size."""
    import yaml

    return args.batch or int(yaml.safe_load(Path(args.config).read_text()).get("train_batch_size", 8))


@torch.no_grad()
def encode_batch(parts, rows, resolution: int, generator):
    """One bare-loop batch as diffusers' example makes it: decode, resize, crop, tokenize, encode (VAE sample)."""
    from mem_analysis.data import image_to_tensor, resize_and_crop
    from mem_analysis.sd import tokenize

    pixels = torch.stack([image_to_tensor(resize_and_crop(row["image"], resolution)) for row in rows])
    latents = parts.vae.encode(pixels).latent_dist.sample(generator) * parts.vae.config.scaling_factor
    return latents, parts.text_encoder(tokenize(parts.tokenizer, [row["text"] for row in rows]))[0]


def bare_loop(model: Path, data: Path, steps: int, batch: int, lora: bool) -> tuple[list[float], list[float]]:
    """Wall seconds and CPU-seconds of each step of the bare diffusers-style loop over the train rows in order
    (see the docstring)."""
    import torch.nn.functional as F

    from mem_analysis.data import load_study_dataset
    from mem_analysis.sd import load_components

    parts = load_components(str(model))
    train = load_study_dataset(data)["train"]
    resolution = train[0]["image"].size[0]
    unet, scheduler = parts.unet.train(), parts.noise_scheduler
    if lora:
        from train.finetune_state import add_lora

        add_lora(unet, 4, torch.float32, seed=0)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    generator, times, cpu = torch.Generator().manual_seed(0), [], []
    for step in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        latents, hidden = encode_batch(parts, [train[(step * batch + i) % len(train)] for i in range(batch)],
                                       resolution, generator)
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
        loss = F.mse_loss(unet(scheduler.add_noise(latents, noise, t), t, hidden).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return times, cpu


def finetune_flags(args, model: Path, data: Path, output_dir: Path, batch: int, extra=()) -> list[str]:
    """finetune.py flags of a throughput run of the config: probes, checkpoints and validation off."""
    flags = ["--config", args.config, "--pretrained_model_name_or_path", model, "--train_data_dir", data,
             "--output_dir", output_dir, "--train_batch_size", batch, "--max_train_steps", args.steps,
             "--probe_steps", 0, "--checkpointing_steps", 0, "--validation_steps", 0, "--logging_steps", 1, *extra]
    if args.lora:
        flags += ["--use_lora", "--rank", 4]
    if args.resolution:
        flags += ["--resolution", args.resolution]
    return [str(flag) for flag in flags]


def probe_costs(model: Path, data: Path, config: Path, resolution: int) -> dict:
    """Seconds of one probe pass of finetune.py (probe_metrics over every probe sample at the config's grid and
    guidance scales, its chunk size) and of scoring it for the early warning (first call: the threshold's
    one-off simulation included)."""
    import yaml

    from mem_analysis import early_warning
    from mem_analysis.data import image_to_tensor, load_study_dataset, resize_and_crop
    from mem_analysis.probes import probe_metrics, probe_noise
    from mem_analysis.schedule import alpha_bar_from_scheduler
    from mem_analysis.sd import encode_images, encode_prompts, load_components
    from train.finetune_config import FLAGS

    settings = {name: value[0] for name, value in FLAGS.items()} | (yaml.safe_load(config.read_text()) or {})
    parts, probe = load_components(str(model)), load_study_dataset(data)["probe"]
    pixels = torch.stack([image_to_tensor(resize_and_crop(image, resolution)) for image in probe["image"]])
    latents = encode_images(parts.vae, pixels).float()
    timesteps, scales = settings["probe_timesteps"], settings["probe_guidance_scales"]
    inputs = (latents, encode_prompts(parts.tokenizer, parts.text_encoder, list(probe["text"])),
              encode_prompts(parts.tokenizer, parts.text_encoder, [""]), timesteps,
              probe_noise(probe["sample_id"], timesteps, latents.shape[1:], 0),
              alpha_bar_from_scheduler(parts.noise_scheduler), scales)
    passes = []
    for _ in range(2):
        start = time.perf_counter()
        metrics = probe_metrics(parts.unet, *inputs, mu=latents.mean(0), chunk_size=settings["probe_batch_size"])
        passes.append(time.perf_counter() - start)
    rows = [{"step": 1, "sample_id": int(sid), "dup_factor": int(dup), "timestep": int(t),
             **{name: float(value[i, j]) for name, value in metrics.items()}}
            for i, (sid, dup) in enumerate(zip(probe["sample_id"], probe["dup_factor"]))
            for j, t in enumerate(timesteps)]
    baseline, scoring = early_warning.mean_loss_cond(rows), []
    for _ in range(3):
        start = time.perf_counter()
        early_warning.score_step(rows, baseline, settings["warning_fpr"], settings["high_noise_timestep"])
        scoring.append(time.perf_counter() - start)
    return dict(probe_samples=len(probe), probe_pass_s=min(passes), probe_steps=settings["probe_steps"],
                warning_first_s=scoring[0], warning_s=min(scoring[1:]))


def measure(args, work: Path) -> dict:
    """The three loops in alternating rounds, then the probe costs; every figure of the report. CPU-seconds
    per step (robust to other jobs' load, at one thread) are the bare loop's process time per step and
    finetune.py's own `train/cpu_seconds_per_step`, medians after the warm-up as the wall figures."""
    from mem_analysis.data import load_study_dataset

    model, data = build_inputs(args, work)
    batch, env = batch_size(args), {"OMP_NUM_THREADS": str(args.threads)}
    times, cpu = {"bare": [], "cached": [], "uncached": []}, {"bare": [], "cached": [], "uncached": []}
    records = {"cached": [], "uncached": []}
    for round_index in range(args.rounds):
        bare_times, bare_cpu = bare_loop(model, data, args.steps, batch, args.lora)
        times["bare"] += bare_times[args.warmup:]
        cpu["bare"] += bare_cpu[args.warmup:]
        for name, extra in (("cached", []), ("uncached", UNCACHED)):
            flags = finetune_flags(args, model, data, work / f"{name}{round_index}", batch, extra)
            record = finetune_record(flags, work / f"{name}{round_index}.log", args.warmup, env=env)
            times[name] += [batch / rate for rate in record["rates"][args.warmup:]]
            cpu[name] += record["cpu_seconds_per_step"][args.warmup:]
            records[name].append(record)
    resolution = load_study_dataset(data)["train"][0]["image"].size[0]
    medians = {name: statistics.median(values) for name, values in times.items()}
    cpu_s = {name: statistics.median(values) for name, values in cpu.items()}
    return dict(preset=args.preset, config=str(args.config), lora=args.lora, batch=batch, resolution=resolution,
                threads=args.threads, steps=args.steps, warmup=args.warmup, rounds=args.rounds,
                load_average_at_end=[round(x, 1) for x in os.getloadavg()], step_s=medians, step_s_all=times,
                ratios=dict(cached_over_bare=medians["cached"] / medians["bare"],
                            uncached_over_bare=medians["uncached"] / medians["bare"],
                            cached_over_uncached=medians["cached"] / medians["uncached"]),
                cpu_s_per_step=cpu_s, cpu_s_per_step_all=cpu,
                cpu_ratios=dict(cached_over_bare=cpu_s["cached"] / cpu_s["bare"],
                                uncached_over_bare=cpu_s["uncached"] / cpu_s["bare"],
                                cached_over_uncached=cpu_s["cached"] / cpu_s["uncached"]),
                cache=records["cached"][0]["cache"], rows=len(load_study_dataset(data)["train"]),
                peak_rss_gib={name: max(r["peak_rss_gib"] for r in rs) for name, rs in records.items()},
                probes=probe_costs(model, data, Path(args.config), resolution) if args.probe_costs else None)


def report(results: dict) -> str:
    """The side-by-side figures and ratios as printed."""
    s, r, p = results["step_s"], results["ratios"], results["probes"]
    lines = [f"{results['preset']} model{' (LoRA r=4)' if results['lora'] else ''}, {results['rows']} train rows at "
             f"{results['resolution']} px, batch {results['batch']}, {results['threads']} threads, {results['rounds']} "
             f"rounds x {results['steps']} steps (medians, {results['warmup']} warm-up steps left out per round)",
             f"  bare diffusers loop (encodes every step)   {s['bare'] * 1e3:9.1f} ms/step",
             f"  finetune.py, input cache                  {s['cached'] * 1e3:9.1f} ms/step   / bare "
             f"{r['cached_over_bare']:.3f}   (goal <= 0.5)",
             f"  finetune.py, no cache                     {s['uncached'] * 1e3:9.1f} ms/step   / bare "
             f"{r['uncached_over_bare']:.3f}",
             f"  cached / uncached                         {r['cached_over_uncached']:9.3f}"]
    c, cr = results["cpu_s_per_step"], results["cpu_ratios"]
    lines.append(f"  CPU-seconds per step: bare {c['bare']:.3f}, cached {c['cached']:.3f} (/ bare "
                 f"{cr['cached_over_bare']:.3f}), uncached "
                 f"{c['uncached']:.3f} (/ bare {cr['uncached_over_bare']:.3f}), cached / uncached "
                 f"{cr['cached_over_uncached']:.3f}")
    for name, build in results["cache"].items():
        lines.append(f"  cache {name:16s} built in {build['build_seconds']:.2f} s, {build['mib']:.2f} MiB, process "
                     f"peak {build['peak_memory_gib']:.2f} GiB at the end of the build")
    lines.append(f"  peak resident memory of finetune.py: cached {results['peak_rss_gib']['cached']:.2f} GiB, "
                 f"uncached {results['peak_rss_gib']['uncached']:.2f} GiB")
    if p is None:
        return "\n".join(lines)
    share = p["probe_pass_s"] / (p["probe_pass_s"] + p["probe_steps"] * s["cached"]) if p["probe_steps"] else 0.0
    lines.append(f"  one probe pass ({p['probe_samples']} samples): {p['probe_pass_s'] * 1e3:.1f} ms = "
                 f"{p['probe_pass_s'] / s['cached']:.1f} cached steps; share at probe_steps={p['probe_steps']}: "
                 f"{100 * share:.2f} %")
    lines.append(f"  early warning per probe step: {p['warning_s'] * 1e3:.2f} ms (first call, threshold simulation "
                 f"included: {p['warning_first_s'] * 1e3:.1f} ms)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = measure(args, work)
    print(report(results))
    date = datetime.datetime.now(datetime.timezone.utc)
    path = Path(args.json or ROOT / "bench" / "results" / f"train_cache-{args.preset}-{date:%Y-%m-%d}.json")
    write_text_atomic(path, json.dumps(results, indent=1) + "\n")
    print(f"figures in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, "bench_train.py"))
