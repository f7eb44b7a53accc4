"""Benchmark: sampling with trajectory capture + M1-M6 against the plain StableDiffusionPipeline.

Both generate the same P prompts x N seeds x 50 DDIM steps (g = 7.5) from the same initial
noise and in the same batches; the second also records x_t, e_c, e_0 and computes M1-M6.
Also: denoising_losses on a probe set against one training step. Times are the best of
`--repeats` alternating runs, measured side by side in this one process.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_analysis.py   # 1 thread: tiny ops, shared cores
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from bench.timing import timed
from mem_analysis import DEFAULT_THRESHOLDS, alpha_bar_from_scheduler, correlation, probe_metrics, probe_noise
from mem_analysis.measure import SEVERITY_BACKENDS, MeasureSettings, ProbeSet, measure_prompts
from mem_analysis.probes import HIGH_NOISE_TIMESTEP
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
