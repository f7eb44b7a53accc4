"""Benchmark: evaluating prompt sets vs the plain StableDiffusionPipeline generating the same images.

    OMP_NUM_THREADS=2 python bench/bench_prompts.py [--num_prompts 48 --num_seeds 8 --steps 30 --batch_size 64]

Builds the tiny base model and study dataset of bench_eval.py, then measures in one process, same
threads, same batch, chunk by chunk in alternation (so load changes on a shared machine hit all alike):
- plain: `StableDiffusionPipeline(prompts, generator=seeds)` with DDIM, the prompts x seeds;
- reference-free: `measure_chunk` of eval/evaluate_prompts.py without references (the recipe for a
  pretrained model: trajectory capture, decoding, M3-M5, Wen's scores, severity among the seeds);
- with references: the same prompts paired with their training images (adds M1/M2 probes at the
  run's probe grid and every M6 back end against the reference).
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

from bench import bench_eval  # build_inputs, plain_generation


def main():
    cli = bench_eval.bench_flags(__doc__.split("\n")[0], num_prompts=48)

    from eval import evaluate_prompts as ep
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from mem_analysis.data import load_study_dataset

    with tempfile.TemporaryDirectory() as tmp:
        run = bench_eval.build_inputs(Path(tmp), cli.num_prompts)
        captions = list(load_study_dataset(Path(tmp) / "data")["probe"]["text"])[:cli.num_prompts]
        (Path(tmp) / "prompts.txt").write_text("\n".join(captions) + "\n")
        common = ["--output_dir", str(Path(tmp) / "out"), "--prompts", f"bench={Path(tmp) / 'prompts.txt'}",
                  "--num_seeds", str(cli.num_seeds), "--num_inference_steps", str(cli.steps),
                  "--guidance_scale", str(cli.guidance_scale), "--batch_size", str(cli.batch_size)]
        args = ep.parse_args(["--run_dir", str(run), "--checkpoint", "1", *common])
        t0 = time.perf_counter()
        sets = ep.read_prompt_sets(args)
        source = ep.model_source(args)
        with_refs = ep.resolve_settings(args, source)
        free = replace(with_refs, references=None, severity_backend="ssim", threshold=0.75)
        components = ep.load_model(source, torch.device("cpu"), torch.float32)
        pool, refs = ep.reference_pool(with_refs, source, components, cli.batch_size, torch.device("cpu"))
        setup = time.perf_counter() - t0
        pipe = StableDiffusionPipeline.from_pretrained(source.base, unet=components.unet, safety_checker=None)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)

        per_call = max(1, cli.batch_size // cli.num_seeds)
        matched = ep.work_items(sets, refs, set())
        unmatched = [(name, p, -1) for name, p, _ in matched]
        # warm-up of every path on one prompt (first-call allocations)
        bench_eval.plain_generation(pipe, captions[:1], free.seeds, 2, cli.guidance_scale, cli.batch_size)
        ep.measure_chunk(components, None, unmatched[:1], replace(free, num_inference_steps=2), cli.batch_size)
        ep.measure_chunk(components, pool, matched[:1], replace(with_refs, num_inference_steps=2), cli.batch_size)

        seconds = dict(plain=0.0, free=0.0, refs=0.0)
        plain_images = []
        for k, lo in enumerate(range(0, len(captions), per_call)):
            sides = ("plain", "free", "refs")
            for side in sides[k % 3:] + sides[:k % 3]:  # rotate who goes first
                start = time.perf_counter()
                if side == "plain":
                    _, images = bench_eval.plain_generation(pipe, captions[lo:lo + per_call], free.seeds, cli.steps,
                                                            cli.guidance_scale, cli.batch_size)
                    plain_images.append(images)
                elif side == "free":
                    ep.measure_chunk(components, None, unmatched[lo:lo + per_call], free, cli.batch_size)
                else:
                    ep.measure_chunk(components, pool, matched[lo:lo + per_call], with_refs, cli.batch_size)
                seconds[side] += time.perf_counter() - start

    plain_images = torch.cat(plain_images)
    same = check_same_images(components, free, cli, captions[:per_call], plain_images[:per_call])
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


def check_same_images(components, settings, cli, captions, plain_images) -> float:
    """Largest pixel difference between the evaluation's sampler (decoded) and the pipeline on the same prompts."""
    from mem_analysis.sampling import sample_trajectories

    traj = sample_trajectories(components, captions, list(settings.seeds), cli.steps, cli.guidance_scale,
                               batch_size=cli.batch_size, decode=True)
    return (traj.images - plain_images).abs().max().item()


if __name__ == "__main__":
    sys.exit(main())
