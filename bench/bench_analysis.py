"""Benchmark: sampling with trajectory capture + M1-M6 against the plain StableDiffusionPipeline.

Both generate the same P prompts x N seeds x 50 DDIM steps (g = 7.5) from the same initial
noise and in the same batches; the second also records x_t, e_c, e_0 and computes M1-M6.
Also: denoising_losses on a probe set against one training step. Times are the best of
`--repeats` alternating runs, measured side by side in this one process.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_analysis.py   # 1 thread: tiny ops, shared cores
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from bench.eval_paths import analysis, plain_pipeline, synthetic_probe_set
from bench.timing import timed
from mem_analysis import alpha_bar_from_scheduler, probe_metrics, probe_noise
from mem_analysis.presets import build_pipeline
from mem_analysis.sd import SDComponents, encode_images, encode_prompts


def parse_args(argv=None):
    """Command-line settings."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--probe_timesteps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def training_step(unet, optimizer, latents, cond, alpha_bar):
    """One plain epsilon-prediction training step (forward, backward, AdamW)."""
    unet.train()
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (len(latents),), device=latents.device)
    a = alpha_bar.to(latents.device).float()[t][:, None, None, None]
    pred = unet(a.sqrt() * latents + (1 - a).sqrt() * noise, t, encoder_hidden_states=cond).sample
    loss = F.mse_loss(pred.float(), noise)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    unet.eval()


def main(argv=None):
    args = parse_args(argv)
    pipe = build_pipeline(args.preset, seed=0).to(args.device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    components = SDComponents(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                              DDIMScheduler.from_config(pipe.scheduler.config), pipe.scheduler)
    prompts = [f"training image number {p}" for p in range(args.prompts)]
    seeds = list(range(1000, 1000 + args.seeds))
    generator = torch.Generator().manual_seed(0)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    pool = torch.rand(4 * args.prompts, 3, size, size, generator=generator)  # the "training pool"
    train_pixels = pool[:args.prompts]
    train_latents = encode_images(pipe.vae, train_pixels * 2 - 1).float().cpu()
    print(f"device {args.device}, threads {torch.get_num_threads()}, preset {args.preset}: "
          f"{args.prompts} prompts x {args.seeds} seeds x {args.steps} DDIM steps, batch {args.batch_size}")

    probe = synthetic_probe_set(components, prompts, train_pixels, train_latents, pool)
    x_T = None
    plain_times, analysis_times = [], []
    for _ in range(args.repeats):
        t_analysis, (traj, m12, m6) = timed(lambda: analysis(components, probe, seeds, args))
        x_T = traj.x_T
        t_plain, images = timed(lambda: plain_pipeline(pipe, prompts, x_T, args.steps, args.batch_size))
        plain_times.append(t_plain)
        analysis_times.append(t_analysis)
    max_diff = (images - traj.images).abs().max().item()
    plain, ours = min(plain_times), min(analysis_times)
    print(f"plain StableDiffusionPipeline:          {plain:8.3f} s (best of {args.repeats}: "
          f"{', '.join(f'{t:.3f}' for t in plain_times)})")
    print(f"trajectory capture + M1-M6 (+M7 corr):  {ours:8.3f} s (best of {args.repeats}: "
          f"{', '.join(f'{t:.3f}' for t in analysis_times)})")
    print(f"ratio analysis / plain:                 {ours / plain:8.3f}  (target <= 1.15)")
    print(f"max |image difference| vs pipeline:     {max_diff:.2e}")

    # Probe cost: denoising_losses (inside probe_metrics) on the probe set vs one training step.
    alpha_bar = alpha_bar_from_scheduler(components.noise_scheduler)
    cond = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts)
    uncond = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""])
    timesteps = torch.linspace(0, 999, args.probe_timesteps).round().long()
    noise = probe_noise(range(args.prompts), timesteps, train_latents.shape[1:], seed=0)
    unet = pipe.unet
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-6)
    batch_latents = train_latents.repeat(2, 1, 1, 1)[:8].to(args.device)
    batch_cond = cond.repeat(2, 1, 1)[:8]
    training_step(unet, optimizer, batch_latents, batch_cond, alpha_bar)  # warm-up (optimizer state)
    probe_times, step_times = [], []
    for _ in range(args.repeats):
        probe_times.append(timed(lambda: probe_metrics(unet, train_latents, cond, uncond, timesteps, noise,
                                                       alpha_bar, chunk_size=64))[0])
        step_times.append(timed(lambda: training_step(unet, optimizer, batch_latents, batch_cond, alpha_bar))[0])
    probe, step = min(probe_times), min(step_times)
    pairs = args.prompts * args.probe_timesteps
    print(f"probe_metrics, {args.prompts} samples x {args.probe_timesteps} timesteps "
          f"({2 * pairs} UNet evaluations, no grad): {probe:8.4f} s")
    print(f"one training step (batch 8, fwd+bwd+AdamW):                 {step:8.4f} s")
    print(f"ratio probe / training step:                                {probe / step:8.3f}")


if __name__ == "__main__":
    main()
