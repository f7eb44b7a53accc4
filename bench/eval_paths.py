"""The two evaluation paths the benches time side by side (a library of bench/, no main): the plain
StableDiffusionPipeline, and sampling with trajectory capture + M1-M6 as checkpoint evaluation runs it.
"""
from __future__ import annotations

import numpy as np
import torch

from mem_analysis import DEFAULT_THRESHOLDS, alpha_bar_from_scheduler, correlation, probe_metrics, probe_noise
from mem_analysis.measure import SEVERITY_BACKENDS, MeasureSettings, ProbeSet, measure_prompts
from mem_analysis.probes import HIGH_NOISE_TIMESTEP
from mem_analysis.sd import encode_prompts


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
