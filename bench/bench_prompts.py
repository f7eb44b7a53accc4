"""Benchmark: evaluating prompt sets vs the plain StableDiffusionPipeline generating the same images.

    OMP_NUM_THREADS=2 python bench/bench_prompts.py [--num_prompts 48 --num_seeds 8 --steps 30 --batch_size 64]

Builds the tiny base model and study dataset of bench_eval.py (bench.eval_paths), then measures in one process, same
threads, same batch, chunk by chunk in alternation (so load changes on a shared machine hit all alike), by the
library calls eval/evaluate_prompts.py makes for a chunk of prompts:
- plain: `StableDiffusionPipeline(prompts, generator=seeds)` with DDIM, the prompts x seeds;
- reference-free: `mem_analysis.measure.measure_prompts(..., reference_free=True)` and the seeds' similarity to
  each other (`mem_analysis.severity.self_similarity`, SSIM): the recipe for a pretrained model (trajectory
  capture, decoding, M3-M5, Wen's scores, severity among the seeds);
- with references: the same prompts paired with their training images (`measure_prompts` against them and
  `probe_rows`, the M1/M2 probes at the run's probe grid, and every M6 back end against the reference).
Prints seconds, ms/image, the ratios (target <= 1.15 for the reference-free evaluation) and the largest
pixel difference between the pipeline's images and the evaluation's seed-0 images (the same images).
"""
from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.eval_paths import bench_flags, build_eval_inputs, eval_settings, plain_generation


def measure_chunk(components, probe, index, settings, guidance_scale: float, batch_size: int, references: bool):
    """One chunk of prompts as evaluate_prompts measures it: with references (probes + measure_prompts against
    the paired images) or reference-free (measure_prompts alone + the seeds' SSIM to each other); seed-0 images."""
    from mem_analysis.measure import measure_prompts, probe_rows
    from mem_analysis.severity import self_similarity

    measured = measure_prompts(components, probe, index, guidance_scale, settings, batch_size,
                               reference_free=not references)
    if references:
        probe_rows(components.unet, components, probe, index, settings, batch_size)
    else:
        self_similarity(measured.traj.images, "ssim", settings.threshold, probe.mean_image)
    return measured.traj.images[:, 0]


def main():
    cli = bench_flags(__doc__.split("\n")[0], num_prompts=48)

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from mem_analysis import run
    from mem_analysis.measure import load_probe_set
    from mem_analysis.sd import load_components

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = build_eval_inputs(Path(tmp), cli.num_prompts)
        config = run.read_run(run_dir)
        with_refs = eval_settings(config, cli)
        free = replace(with_refs, severity_backend="ssim", threshold=0.75)
        t0 = time.perf_counter()
        components = load_components(config["pretrained_model_name_or_path"])
        components = replace(components, unet=run.load_checkpoint_unet(run.checkpoint_dir(run_dir, 1),
                                                                        components.unet).eval())
        probe = load_probe_set(config["train_data_dir"], components, torch.device("cpu"), cli.batch_size,
                               cli.num_prompts, mu=run.read_probe_mu(run_dir))
        setup = time.perf_counter() - t0
        pipe = StableDiffusionPipeline.from_pretrained(config["pretrained_model_name_or_path"], unet=components.unet,
                                                       safety_checker=None)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        captions, index = probe.captions, torch.arange(len(probe.captions)).numpy()
        per_call = max(1, cli.batch_size // cli.num_seeds)
        # warm-up of every path on one prompt (first-call allocations)
        plain_generation(pipe, captions[:1], free.seeds, 2, cli.guidance_scale, cli.batch_size)
        for settings, references in ((free, False), (with_refs, True)):
            measure_chunk(components, probe, index[:1], replace(settings, num_inference_steps=2), cli.guidance_scale,
                          cli.batch_size, references)

        seconds, images = dict(plain=0.0, free=0.0, refs=0.0), dict(plain=[], free=[])
        for k, lo in enumerate(range(0, len(captions), per_call)):
            sides = ("plain", "free", "refs")
            for side in sides[k % 3:] + sides[:k % 3]:  # rotate who goes first
                start = time.perf_counter()
                if side == "plain":
                    images["plain"].append(plain_generation(pipe, captions[lo:lo + per_call], free.seeds, cli.steps,
                                                            cli.guidance_scale, cli.batch_size)[1][:, 0])
                else:
                    settings = free if side == "free" else with_refs
                    out = measure_chunk(components, probe, index[lo:lo + per_call], settings, cli.guidance_scale,
                                        cli.batch_size, side == "refs")
                    if side == "free":
                        images["free"].append(out)
                seconds[side] += time.perf_counter() - start

    same = (torch.cat(images["free"]) - torch.cat(images["plain"])).abs().max().item()
    n = len(captions) * cli.num_seeds
    print(f"tiny model, {len(captions)} prompts x {cli.num_seeds} seeds = {n} images, {cli.steps} DDIM steps, "
          f"g = {cli.guidance_scale:g}, {cli.batch_size} images per UNet call, {torch.get_num_threads()} threads")
    print(f"once per run (model, checkpoint, references and their latents): {setup:.2f} s")
    for side, name in (("plain", "plain StableDiffusionPipeline"), ("free", "evaluate prompts, reference-free"),
                       ("refs", "evaluate prompts, with references")):
        print(f"{name:36s} {seconds[side]:7.2f} s ({seconds[side] / n * 1000:.1f} ms/image)")
    print(f"ratio reference-free / plain: {seconds['free'] / seconds['plain']:.3f} (target <= 1.15)")
    print(f"ratio with references / plain: {seconds['refs'] / seconds['plain']:.3f} (adds M1/M2 probes: "
          f"{len(with_refs.probe_timesteps)} timesteps x {len(with_refs.probe_guidance_scales)} scales)")
    print(f"same images: max |evaluation seed images - pipeline images| = {same:.2e}")


if __name__ == "__main__":
    sys.exit(main())
