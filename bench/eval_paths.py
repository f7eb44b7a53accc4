"""The evaluation paths the benches time side by side (a library of bench/, no main): the plain
StableDiffusionPipeline, and sampling with trajectory capture + M1-M6 by the library functions checkpoint
evaluation calls; and the inputs of the evaluation benches (a tiny run with one checkpoint).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mem_analysis import DEFAULT_THRESHOLDS, alpha_bar_from_scheduler, correlation, probe_metrics, probe_noise, run
from mem_analysis.measure import (SEVERITY_BACKENDS, MeasureSettings, ProbeSet, Stopwatch, measure_prompts,
                                  probe_rows, probe_settings, prompts_per_call)
from mem_analysis.probes import HIGH_NOISE_TIMESTEP
from mem_analysis.sd import encode_prompts

ROOT = Path(__file__).resolve().parents[1]


def plain_pipeline(pipe, prompts, x_T, steps, batch_size):
    """The reference: StableDiffusionPipeline on the same (prompt, noise) items in the same batches."""
    P, N = x_T.shape[:2]
    items = [(p, n) for p in range(P) for n in range(N)]
    images = []
    for lo in range(0, len(items), batch_size):
        chunk = items[lo:lo + batch_size]
        latents = torch.stack([x_T[p, n] for p, n in chunk]).to(pipe.device)
        images.append(pipe([prompts[p] for p, _ in chunk], num_inference_steps=steps, guidance_scale=7.5,
                           latents=latents, output_type="pt").images.float().cpu())
    return torch.cat(images).reshape(P, N, *images[0].shape[1:])


def synthetic_probe_set(components, prompts, train_pixels, train_latents, pool) -> ProbeSet:
    """The prompts as a ProbeSet in which prompt p is paired with pool image p (pixels in [0, 1])."""
    embeds = encode_prompts(components.tokenizer, components.text_encoder, list(prompts) + [""]).float().cpu()
    count = len(prompts)
    return ProbeSet(sample_ids=np.arange(count), dup_factors=np.ones(count, dtype=int), captions=list(prompts),
                    cond=embeds[:-1], uncond=embeds[-1:], latents=train_latents, pixels=train_pixels,
                    pool_pixels=pool, pool_ids=np.arange(len(pool)), pool_index=np.arange(count),
                    mu=train_latents.mean(0), mean_image=pool.mean(0),
                    alpha_bar=alpha_bar_from_scheduler(components.noise_scheduler))


def analysis(components, probe: ProbeSet, seeds, args):
    """Trajectory capture + M1-M6 (+ one M7 correlation) by the functions checkpoint evaluation calls
    (probe_metrics, mem_analysis.measure.measure_prompts) at g = 7.5."""
    timesteps = torch.linspace(0, 999, args.probe_timesteps).round().long()
    noise = probe_noise(probe.sample_ids, timesteps, probe.latents.shape[1:], seed=0)
    m12 = probe_metrics(components.unet, probe.latents, probe.cond, probe.uncond, timesteps, noise, probe.alpha_bar,
                        mu=probe.mu)
    settings = MeasureSettings(seeds=tuple(seeds), num_inference_steps=args.steps, backends=SEVERITY_BACKENDS,
                               severity_backend="pixel_cosine", threshold=DEFAULT_THRESHOLDS["pixel_cosine"],
                               high_noise_timestep=HIGH_NOISE_TIMESTEP, early_steps=None)
    measured = measure_prompts(components, probe, np.arange(len(probe.captions)), 7.5, settings, args.batch_size)
    d_x = torch.tensor([values["D_x"] for values in measured.values])
    correlation(d_x, measured.scores["pixel_cosine"].severity, n_bootstrap=1000)
    return measured.traj, m12, measured.scores


def bench_flags(description: str, num_prompts: int, argv=None):
    """The flags of the evaluation benches: prompts, seeds, DDIM steps, guidance scale, images per UNet call."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--num_prompts", type=int, default=num_prompts)
    parser.add_argument("--num_seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--batch_size", type=int, default=64)
    return parser.parse_args(argv)


def build_eval_inputs(work, num_prompts: int):
    """A tiny base model (make_base_model.py), a study dataset with `num_prompts` probe images
    (build_duplicated_dataset.py), each by its own command, and a run folder whose checkpoint-1 holds the
    base UNet; returns the run folder."""
    from diffusers import UNet2DConditionModel

    work = Path(work)
    per_factor = max(1, num_prompts // 6)  # probe: 3 duplicated groups + twice as many never-duplicated images
    for script, flags in (("make_base_model.py", ["--output_dir", work / "model", "--preset", "tiny", "--seed", 0,
                                                  "--max_images", 64, "--vae_steps", 5, "--train_batch_size", 16]),
                          ("build_duplicated_dataset.py", ["--output_dir", work / "data", "--source", "twemoji",
                                                           "--max_images", 400, "--dup_factors", "1,4,16,64",
                                                           "--samples_per_factor", per_factor, "--resolution", 32,
                                                           "--seed", 0])):
        subprocess.run([sys.executable, str(ROOT / "data_scripts" / script), *map(str, flags)], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
    run_dir, checkpoint = work / "run", run.checkpoint_dir(work / "run", 1)
    checkpoint.mkdir(parents=True)
    # the training defaults (mem_analysis.run.RUN_DEFAULTS) for everything else
    run.write_config(run_dir, dict(pretrained_model_name_or_path=str(work / "model"),
                                   train_data_dir=str(work / "data")))
    UNet2DConditionModel.from_pretrained(work / "model", subfolder="unet").save_pretrained(checkpoint / "unet")
    run.write_training_state(checkpoint, 1)
    return run_dir


def plain_generation(pipe, captions, seeds, steps, g, batch_size):
    """Seconds and images (P, N, 3, H, W) of the plain pipeline, `batch_size` images per call."""
    items = [(c, s) for c in captions for s in seeds]
    images = []
    start = time.perf_counter()
    for lo in range(0, len(items), batch_size):
        chunk = items[lo:lo + batch_size]
        out = pipe([c for c, _ in chunk], generator=[torch.Generator().manual_seed(s) for _, s in chunk],
                   num_inference_steps=steps, guidance_scale=g, output_type="pt")
        images.append(out.images.float())
    seconds = time.perf_counter() - start
    return seconds, torch.cat(images).reshape(len(captions), len(seeds), *images[0].shape[1:])


def evaluate_checkpoint_samples(unet, components, probe: ProbeSet, index, settings: MeasureSettings,
                                guidance_scale: float, batch_size: int, timings: dict) -> list:
    """What eval/evaluate_checkpoints.py measures for one model's probe samples `index`, by the library calls it
    makes: probe_rows (M1/M2), then measure_prompts (sampling, decoding, M3-M6) per chunk of prompts_per_call
    prompts; seconds added to `timings` per phase; returns the seed-0 images (P, 3, H, W)."""
    clock = Stopwatch(timings)
    components = replace(components, unet=unet)
    clock("start")
    probe_rows(unet, components, probe, index, settings, batch_size)
    clock("probes")
    chunk, images = prompts_per_call(settings, batch_size, probe.latents[0].numel()), []
    for lo in range(0, len(index), chunk):
        measured = measure_prompts(components, probe, index[lo:lo + chunk], guidance_scale, settings, batch_size,
                                   clock=clock)
        images.append(measured.traj.images[:, 0])
        clock("metrics")
    return torch.cat(images)


def eval_settings(config: dict, cli):
    """The MeasureSettings eval/evaluate_checkpoints.py resolves from its defaults and the run's config.yaml."""
    seed = int(config["seed"])
    return MeasureSettings(seeds=tuple(seed + j for j in range(cli.num_seeds)), num_inference_steps=cli.steps,
                           backends=SEVERITY_BACKENDS, severity_backend="pixel_cosine",
                           threshold=DEFAULT_THRESHOLDS["pixel_cosine"],
                           high_noise_timestep=int(config["high_noise_timestep"]), early_steps=None,
                           **probe_settings(config, None, [cli.guidance_scale], 4))
