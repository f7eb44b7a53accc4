"""Benchmark: evaluating one checkpoint vs the plain StableDiffusionPipeline generating the same images.

    OMP_NUM_THREADS=2 python bench/bench_eval.py [--num_prompts 64 --num_seeds 8 --steps 30 --batch_size 64]

Builds a tiny base model and a study dataset (probe split of `--num_prompts` images), a run
folder with one full-UNet checkpoint, then measures in one process, same threads, same batch:
- eval: `evaluate_samples` of eval/evaluate_checkpoints.py on that checkpoint (M1/M2 probes,
  DDIM sampling with trajectory capture, decoding, M3-M6 metrics), split into those parts;
- plain: `StableDiffusionPipeline(prompts, generator=seeds)` with a DDIM scheduler, the same
  prompts x seeds, steps, guidance scale and images per call.
The two alternate chunk by chunk (one UNet batch of images each) so that load changes on a
shared machine hit both alike. Prints the figures, the ratio (target <= 1.2) and the largest pixel difference between the two
sets of images (they are the same images). The once-per-run setup is printed apart.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from mem_analysis import run


def build_inputs(work: Path, num_prompts: int) -> Path:
    """Tiny base model, dataset with `num_prompts` probe images, and a run with checkpoint-1."""
    from diffusers import UNet2DConditionModel

    from data_scripts import build_duplicated_dataset, make_base_model

    make_base_model.main(["--output_dir", str(work / "model"), "--preset", "tiny", "--seed", "0",
                          "--max_images", "64", "--vae_steps", "5", "--train_batch_size", "16"])
    per_factor = max(1, num_prompts // 6)  # probe: 3 duplicated groups + twice as many never-duplicated images
    build_duplicated_dataset.main(["--output_dir", str(work / "data"), "--source", "twemoji", "--max_images", "400",
                                   "--dup_factors", "1,4,16,64", "--samples_per_factor", str(per_factor),
                                   "--resolution", "32", "--seed", "0"])
    run_dir, checkpoint = work / "run", run.checkpoint_dir(work / "run", 1)
    checkpoint.mkdir(parents=True)
    # the training defaults (mem_analysis.run.RUN_DEFAULTS) for everything else
    run.write_config(run_dir, dict(pretrained_model_name_or_path=str(work / "model"), train_data_dir=str(work / "data")))
    UNet2DConditionModel.from_pretrained(work / "model", subfolder="unet").save_pretrained(checkpoint / "unet")
    run.write_training_state(checkpoint, 1)
    return run_dir


def plain_generation(pipe, captions, seeds, steps, g, batch_size) -> tuple[float, torch.Tensor]:
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


def bench_flags(description: str, num_prompts: int) -> argparse.Namespace:
    """The flags of the evaluation benches: prompts, seeds, DDIM steps, guidance scale, images per UNet call."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--num_prompts", type=int, default=num_prompts)
    parser.add_argument("--num_seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--batch_size", type=int, default=64)
    return parser.parse_args()


def main():
    cli = bench_flags(__doc__.split("\n")[0], num_prompts=64)

    from dataclasses import replace

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from eval import evaluate_checkpoints as ev

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = build_inputs(Path(tmp), cli.num_prompts)
        args = ev.parse_args(["--run_dir", str(run_dir), "--num_seeds", str(cli.num_seeds), "--num_inference_steps",
                              str(cli.steps), "--guidance_scale", str(cli.guidance_scale), "--batch_size",
                              str(cli.batch_size), "--max_samples", str(cli.num_prompts)])
        config = ev.read_run(args)
        models = ev.find_checkpoints(run_dir, None)
        settings = ev.resolve_settings(args, config)
        t0 = time.perf_counter()
        components = ev.load_components(config["pretrained_model_name_or_path"])
        probe = ev.read_probe_set(config, args, components, torch.device("cpu"))
        setup = time.perf_counter() - t0
        index = torch.arange(len(probe.sample_ids)).numpy()

        pipe = StableDiffusionPipeline.from_pretrained(config["pretrained_model_name_or_path"], safety_checker=None)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        # warm-up of both paths on one small batch (first-call allocations)
        plain_generation(pipe, probe.captions[:1], settings.seeds[:2], 2, cli.guidance_scale, cli.batch_size)
        warm = replace(settings, num_inference_steps=2, seeds=settings.seeds[:2])
        ev.evaluate_samples(components.unet, components, probe, index[:1], warm, cli.batch_size, show_progress=False)

        # Interleaved per chunk of prompts (one UNet batch of images), alternating which goes first,
        # so that a change in machine load during the run hits both sides alike.
        unet = run.load_checkpoint_unet(models[1][1], components.unet, settings.weights).eval()
        per_call = max(1, cli.batch_size // cli.num_seeds)
        plain_s, eval_s, timings, plain_images, parts = 0.0, 0.0, {}, [], []
        for k, lo in enumerate(range(0, len(index), per_call)):
            chunk = index[lo:lo + per_call]
            for side in ((0, 1) if k % 2 == 0 else (1, 0)):
                if side == 0:
                    seconds, images = plain_generation(pipe, [probe.captions[i] for i in chunk], settings.seeds,
                                                       cli.steps, cli.guidance_scale, cli.batch_size)
                    plain_s += seconds
                    plain_images.append(images)
                else:
                    start = time.perf_counter()
                    parts.append(ev.evaluate_samples(unet, components, probe, chunk, settings, cli.batch_size,
                                                     show_progress=False, timings=timings))
                    eval_s += time.perf_counter() - start
        start = time.perf_counter()
        run.load_checkpoint_unet(models[1][1], components.unet, settings.weights)
        timings["load"] = time.perf_counter() - start
        eval_s += timings["load"]
        plain_images = torch.cat(plain_images)

    images = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for _, im in ev.CheckpointResult.merge(parts).images])
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
