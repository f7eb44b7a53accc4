"""Benchmark: evaluating one checkpoint vs the plain StableDiffusionPipeline generating the same images.

    OMP_NUM_THREADS=2 python bench/bench_eval.py [--num_prompts 64 --num_seeds 8 --steps 30 --batch_size 64]

Builds a tiny base model and a study dataset (probe split of `--num_prompts` images), a run
folder with one full-UNet checkpoint, then measures in one process, same threads, same batch:
- eval: what eval/evaluate_checkpoints.py measures on that checkpoint, by the library functions it calls
  (bench.eval_paths.evaluate_checkpoint_samples: M1/M2 probes, DDIM sampling with trajectory capture,
  decoding, M3-M6 metrics), split into those parts;
- plain: `StableDiffusionPipeline(prompts, generator=seeds)` with a DDIM scheduler, the same
  prompts x seeds, steps, guidance scale and images per call.
The two alternate chunk by chunk (one UNet batch of images each) so that load changes on a
shared machine hit both alike. Prints the figures, the ratio (target <= 1.2) and the largest pixel difference between the two
sets of images (they are the same images). The once-per-run setup is printed apart.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from bench.eval_paths import (bench_flags, build_eval_inputs, eval_settings, evaluate_checkpoint_samples,
                              plain_generation)
from mem_analysis import run


def main():
    cli = bench_flags(__doc__.split("\n")[0], num_prompts=64)

    from dataclasses import replace

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from mem_analysis.measure import load_probe_set
    from mem_analysis.sd import load_components

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = build_eval_inputs(Path(tmp), cli.num_prompts)
        config = run.read_run(run_dir)
        models = run.find_checkpoints(run_dir, None)
        settings = eval_settings(config, cli)
        t0 = time.perf_counter()
        components = load_components(config["pretrained_model_name_or_path"])
        probe = load_probe_set(config["train_data_dir"], components, torch.device("cpu"), cli.batch_size,
                               cli.num_prompts, mu=run.read_probe_mu(run_dir))
        setup = time.perf_counter() - t0
        index = torch.arange(len(probe.sample_ids)).numpy()

        pipe = StableDiffusionPipeline.from_pretrained(config["pretrained_model_name_or_path"], safety_checker=None)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        # warm-up of both paths on one small batch (first-call allocations)
        plain_generation(pipe, probe.captions[:1], settings.seeds[:2], 2, cli.guidance_scale, cli.batch_size)
        warm = replace(settings, num_inference_steps=2, seeds=settings.seeds[:2])
        evaluate_checkpoint_samples(components.unet, components, probe, index[:1], warm, cli.guidance_scale,
                                    cli.batch_size, {})

        # Interleaved per chunk of prompts (one UNet batch of images), alternating which goes first,
        # so that a change in machine load during the run hits both sides alike.
        unet = run.load_checkpoint_unet(models[1][1], components.unet, "raw").eval()
        per_call = max(1, cli.batch_size // cli.num_seeds)
        plain_s, eval_s, timings, plain_images, eval_images = 0.0, 0.0, {}, [], []
        for k, lo in enumerate(range(0, len(index), per_call)):
            chunk = index[lo:lo + per_call]
            for side in ((0, 1) if k % 2 == 0 else (1, 0)):
                start = time.perf_counter()
                if side == 0:
                    plain_images.append(plain_generation(pipe, [probe.captions[i] for i in chunk], settings.seeds,
                                                         cli.steps, cli.guidance_scale, cli.batch_size)[1])
                    plain_s += time.perf_counter() - start
                else:
                    eval_images.append(evaluate_checkpoint_samples(unet, components, probe, chunk, settings,
                                                                   cli.guidance_scale, cli.batch_size, timings))
                    eval_s += time.perf_counter() - start
        start = time.perf_counter()
        run.load_checkpoint_unet(models[1][1], components.unet, "raw")
        timings["load"] = time.perf_counter() - start
        eval_s += timings["load"]
        plain_images = torch.cat(plain_images)

    # the evaluation stores its images as uint8 (evaluate_checkpoints), the pipeline's are floats
    images = (torch.cat(eval_images) * 255).round() / 255
    diff = (images - plain_images[:, 0]).abs().max().item()
    n = len(plain_images) * cli.num_seeds
    print(f"tiny model, {len(plain_images)} probe prompts x {cli.num_seeds} seeds = {n} images, {cli.steps} DDIM steps, "
          f"g = {cli.guidance_scale:g}, {cli.batch_size} images per UNet call, {torch.get_num_threads()} threads")
    print(f"once per run (components, probe split, training pool, mu, text embeddings): {setup:.2f} s")
    print(f"plain StableDiffusionPipeline: {plain_s:.2f} s ({plain_s / n * 1000:.1f} ms/image)")
    print(f"evaluate one checkpoint:       {eval_s:.2f} s ({eval_s / n * 1000:.1f} ms/image)")
    for name, seconds in timings.items():
        print(f"  {name:9s} {seconds:7.2f} s  {100 * seconds / eval_s:5.1f} %")
    print(f"ratio eval / plain: {eval_s / plain_s:.3f} (target <= 1.2)")
    print(f"same images: max |eval seed-0 image - pipeline image| = {diff:.2e} (uint8 rounding: <= 2e-3)")


if __name__ == "__main__":
    main()
