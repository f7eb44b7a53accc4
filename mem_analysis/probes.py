"""Probes shared by training and checkpoint evaluation: fixed noise and the M1 + M2 rows.

The noise of (sample_id, timestep) depends only on (seed, sample_id, timestep), so a
sample's probe values are comparable across checkpoints, processes and batchings.
"""
from __future__ import annotations

import numpy as np
import torch

from mem_analysis.losses import checked_inputs, denoising_losses, guided, overestimation, predict_noise
from mem_analysis.schedule import clean_estimate

# Timesteps t >= this form the high-noise window where the CFG excess shows (docs/science.md M1).
HIGH_NOISE_TIMESTEP = 700


def guidance_key(g: float) -> str:
    """Column suffix of a guidance scale: `f"{g:g}"` (1.5 -> '1.5', 3.0 -> '3')."""
    return f"{float(g):g}"


def probe_noise(sample_ids, timesteps, latent_shape, seed: int, draw: int = 0) -> torch.Tensor:
    """Standard normal noise (S, T, *latent_shape), float32 on CPU.

    Entry (i, j) is drawn by a torch.Generator seeded from
    `numpy.random.SeedSequence([seed, sample_ids[i], timesteps[j]])` (draw 0, the training
    probes' noise) or `SeedSequence([seed, sample_ids[i], timesteps[j], draw])` (draw >= 1), so
    it is independent of the order, batching or sharding of the request.
    """
    sample_ids = [int(s) for s in torch.as_tensor(sample_ids).reshape(-1).tolist()]
    timesteps = [int(t) for t in torch.as_tensor(timesteps).reshape(-1).tolist()]
    if min(sample_ids + timesteps + [int(seed), int(draw)], default=0) < 0:
        raise ValueError("seed, draw, sample_ids and timesteps must be non-negative integers")
    extra = [int(draw)] if draw else []
    latent_shape = tuple(int(d) for d in latent_shape)
    noise = torch.empty((len(sample_ids), len(timesteps)) + latent_shape)
    generator = torch.Generator()
    for i, sample_id in enumerate(sample_ids):
        for j, t in enumerate(timesteps):
            state = np.random.SeedSequence([int(seed), sample_id, t] + extra).generate_state(1, np.uint64)[0]
            generator.manual_seed(int(state))
            noise[i, j] = torch.randn(latent_shape, generator=generator)
    return noise


def probe_metrics(unet, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, timesteps,
                  noise: torch.Tensor, alpha_bar: torch.Tensor, guidance_scales=(1.5, 3.0, 7.5),
                  mu: torch.Tensor | None = None, prediction_type: str = "epsilon",
                  chunk_size: int = 32) -> dict[str, torch.Tensor]:
    """M1 + M2 per (sample, timestep), float32 (S, T) tensors on CPU, from one batched UNet pass.

    Keys: `loss_cond`, `loss_uncond`, `loss_cfg_<g>` (epsilon space, `L = mean (eps - e)^2`);
    `loss_cond_x0`, `loss_uncond_x0`, `loss_cfg_<g>_x0` (x0 space, `mean (x - x0hat(e))^2 = L / SNR_t`);
    `k_cond`, `k_uncond`, `k_cfg_<g>` (`k = <x0hat(e) - mu, x - mu> / ||x - mu||^2`, uncentred when
    `mu` is None) and `k_cond_uncentred`, `k_uncond_uncentred`, `k_cfg_<g>_uncentred`
    (`<x0hat(e), x> / ||x||^2`, the paper's `x0hat = k x`), with `<g>` = `f"{g:g}"`; `text_magnitude`
    (`||e_c - e_0||_2` over the latent, epsilon space: the per-example score that Wen et al.'s training
    filter thresholds, here at the probe's fixed noise). Arguments as in `denoising_losses`.
    """
    result = denoising_losses(unet, latents, cond, uncond, timesteps, noise, alpha_bar,
                              guidance_scales, prediction_type, chunk_size)
    latent_ndim = latents.ndim - 1
    mu = None if mu is None else mu.to(result.x.device)

    def k(g: float, centre=mu) -> torch.Tensor:
        return overestimation(result.x0hat(g), result.x, centre, latent_ndim)

    rows = {"loss_cond": result.loss_cond, "loss_uncond": result.loss_uncond}
    rows.update({f"loss_cfg_{guidance_key(g)}": loss for g, loss in result.loss_cfg.items()})
    rows.update({"loss_cond_x0": result.loss_x0(1.0), "loss_uncond_x0": result.loss_x0(0.0)})
    rows.update({f"loss_cfg_{guidance_key(g)}_x0": result.loss_x0(g) for g in result.loss_cfg})
    rows.update({"k_cond": k(1.0), "k_uncond": k(0.0)})
    rows.update({f"k_cfg_{guidance_key(g)}": k(g) for g in result.loss_cfg})
    rows.update({"k_cond_uncentred": k(1.0, None), "k_uncond_uncentred": k(0.0, None)})
    rows.update({f"k_cfg_{guidance_key(g)}_uncentred": k(g, None) for g in result.loss_cfg})
    rows["text_magnitude"] = (result.e_c.float() - result.e_0.float()).flatten(2).norm(dim=2)
    return {name: value.float().cpu() for name, value in rows.items()}


@torch.no_grad()
def gaussian_probe_metrics(unet, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, timesteps,
                           noise: torch.Tensor, alpha_bar: torch.Tensor, guidance_scales=(),
                           mu: torch.Tensor | None = None, prediction_type: str = "epsilon",
                           chunk_size: int = 32) -> dict[str, torch.Tensor]:
    """M2 on Gaussian probes: k of the clean estimate when the input at timestep t is pure noise, holding none of x.

    The input is `x_t = eps` itself (not `sqrt(abar_t) x + sqrt(1 - abar_t) eps`), so
    `x0hat(e_b) = (eps - sqrt(1 - abar_t) e_b) / sqrt(abar_t)` and `k_b = <x0hat(e_b) - mu, x - mu> / ||x - mu||^2`
    for b = 0 (`k_uncond`), c (`k_cond`) and each g (`k_cfg_<g>`, `e_g = e_0 + g (e_c - e_0)`), (S, T) float32 on
    CPU; `x` = `latents`. The sampler's first step is this probe at its first timestep. An estimate that carries
    no x has k = 0 in expectation over eps (the optimal linear-Gaussian denoiser: `-sqrt(abar_t) <G mu, x - mu> /
    ||x - mu||^2`, about 0; mem_analysis.gaussian_reference), where forward-noised probes give the shrinkage
    toward mu instead. Arguments as `probe_metrics`, `noise` being the input.
    """
    timesteps, abar, x, noise, cond, uncond = checked_inputs(unet, latents, cond, uncond, timesteps, noise, alpha_bar,
                                                             chunk_size)
    e_c, e_0 = predict_noise(unet, noise, cond, uncond, timesteps, abar, prediction_type, chunk_size)
    S, T = noise.shape[:2]
    mu = None if mu is None else mu.to(noise.device)

    def k(g: float) -> torch.Tensor:
        return overestimation(clean_estimate(noise, guided(e_c, e_0, g), abar.expand(S, T)), x, mu, x.ndim - 1)

    rows = {"k_uncond": k(0.0), "k_cond": k(1.0), **{f"k_cfg_{guidance_key(g)}": k(float(g)) for g in guidance_scales}}
    return {name: value.float().cpu() for name, value in rows.items()}


def probe_metrics_over_draws(unet, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, timesteps,
                             sample_ids, seed: int, alpha_bar: torch.Tensor, draws: int = 1, metrics=None, **kwargs
                             ) -> dict[str, torch.Tensor]:
    """`probe_metrics` (or `metrics`, e.g. `gaussian_probe_metrics`) averaged over `draws` noise draws per
    (sample, timestep): `mean_d metric(eps_d)`.

    Draw d is `probe_noise(sample_ids, timesteps, latents.shape[1:], seed, draw=d)`, so draw 0 is the
    training probes' noise and `draws=1` gives exactly the training probes' values. `kwargs` go to
    `probe_metrics` (guidance_scales, mu, prediction_type, chunk_size).
    """
    metrics = metrics or probe_metrics
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    total = {}
    for d in range(draws):
        noise = probe_noise(sample_ids, timesteps, latents.shape[1:], seed, draw=d)
        rows = metrics(unet, latents, cond, uncond, timesteps, noise, alpha_bar, **kwargs)
        total = {k: total.get(k, 0) + v for k, v in rows.items()}
    return {k: v / draws for k, v in total.items()}


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
