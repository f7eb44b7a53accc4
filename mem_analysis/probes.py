"""Probes shared by training and checkpoint evaluation: fixed noise and the M1 + M2 rows.

The noise of (sample_id, timestep) depends only on (seed, sample_id, timestep), so a
sample's probe values are comparable across checkpoints, processes and batchings.
"""
from __future__ import annotations

import numpy as np
import torch

from mem_analysis.losses import denoising_losses, overestimation

# Timesteps t >= this form the high-noise window where the CFG excess shows (docs/science.md M1).
HIGH_NOISE_TIMESTEP = 700


def guidance_key(g: float) -> str:
    """Column suffix of a guidance scale: `f"{g:g}"` (1.5 -> '1.5', 3.0 -> '3')."""
    return f"{float(g):g}"


def probe_noise(sample_ids, timesteps, latent_shape, seed: int) -> torch.Tensor:
    """Standard normal noise (S, T, *latent_shape), float32 on CPU.

    Entry (i, j) is drawn by a torch.Generator seeded from
    `numpy.random.SeedSequence([seed, sample_ids[i], timesteps[j]])`, so it is independent
    of the order, batching or sharding of the request.
    """
    sample_ids = [int(s) for s in torch.as_tensor(sample_ids).reshape(-1).tolist()]
    timesteps = [int(t) for t in torch.as_tensor(timesteps).reshape(-1).tolist()]
    if min(sample_ids + timesteps + [int(seed)], default=0) < 0:
        raise ValueError("seed, sample_ids and timesteps must be non-negative integers")
    latent_shape = tuple(int(d) for d in latent_shape)
    noise = torch.empty((len(sample_ids), len(timesteps)) + latent_shape)
    generator = torch.Generator()
    for i, sample_id in enumerate(sample_ids):
        for j, t in enumerate(timesteps):
            state = np.random.SeedSequence([int(seed), sample_id, t]).generate_state(1, np.uint64)[0]
            generator.manual_seed(int(state))
            noise[i, j] = torch.randn(latent_shape, generator=generator)
    return noise


def probe_metrics(unet, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, timesteps,
                  noise: torch.Tensor, alpha_bar: torch.Tensor, guidance_scales=(1.5, 3.0, 7.5),
                  mu: torch.Tensor | None = None, prediction_type: str = "epsilon",
                  chunk_size: int = 32) -> dict[str, torch.Tensor]:
    """M1 + M2 per (sample, timestep), float32 (S, T) tensors on CPU, from one batched UNet pass.

    Keys: `loss_cond`, `loss_uncond`, `loss_cfg_<g>` (`L = mean (eps - e)^2`) and `k_cond`,
    `k_uncond`, `k_cfg_<g>` (`k = <x0hat(e) - mu, x - mu> / ||x - mu||^2`, uncentred when
    `mu` is None), with `<g>` = `f"{g:g}"`. Arguments as in `denoising_losses`.
    """
    result = denoising_losses(unet, latents, cond, uncond, timesteps, noise, alpha_bar,
                              guidance_scales, prediction_type, chunk_size)
    latent_ndim = latents.ndim - 1
    mu = None if mu is None else mu.to(result.x.device)

    def k(g: float) -> torch.Tensor:
        return overestimation(result.x0hat(g), result.x, mu, latent_ndim)

    rows = {"loss_cond": result.loss_cond, "loss_uncond": result.loss_uncond}
    rows.update({f"loss_cfg_{guidance_key(g)}": loss for g, loss in result.loss_cfg.items()})
    rows.update({"k_cond": k(1.0), "k_uncond": k(0.0)})
    rows.update({f"k_cfg_{guidance_key(g)}": k(g) for g in result.loss_cfg})
    return {name: value.float().cpu() for name, value in rows.items()}


def summarize_probe_metrics(metrics: dict[str, torch.Tensor], timesteps, high_noise_timestep: int = HIGH_NOISE_TIMESTEP
                            ) -> dict[str, torch.Tensor]:
    """Per-sample means over the timestep grid (`<key>_mean`) and over `t >= high_noise_timestep` (`<key>_high`).

    docs/science.md M1: the CFG excess shows at high noise, so the high-noise window is always
    reported beside the full grid. `<key>_high` is NaN when no grid timestep reaches the window.
    """
    timesteps = torch.as_tensor(timesteps).reshape(-1)
    high = timesteps >= high_noise_timestep
    out = {}
    for name, value in metrics.items():
        if value.ndim != 2 or value.shape[1] != timesteps.numel():
            raise ValueError(f"{name} has shape {tuple(value.shape)}; expected (samples, {timesteps.numel()})")
        out[f"{name}_mean"] = value.mean(1)
        out[f"{name}_high"] = value[:, high].mean(1) if high.any() else torch.full_like(value[:, 0], float("nan"))
    return out
