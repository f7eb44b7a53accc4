"""DDIM sampling with classifier-free guidance that records its trajectories (input of M3-M6).

The loop is StableDiffusionPipeline's (same initial noise, same `cat([uncond, cond])` UNet
batch, same `e_0 + g (e_c - e_0)`, the diffusers DDIMScheduler `.step`), so for the same
latents its final images are the pipeline's images; it also records, per step, the input
latent `x_t` and the noise predictions `e_c`, `e_0` (converted to eps, float32).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from mem_analysis.losses import guided, module_device_dtype
from mem_analysis.mitigations import guidance_scales, parse_guidance_schedule
from mem_analysis.schedule import alpha_bar_from_scheduler, expand_like, prediction_type_of, to_epsilon
from mem_analysis.sd import decode_latents, encode_prompts


@dataclass
class Trajectories:
    """Recorded DDIM runs for P prompts x N seeds over K steps (float32, CPU or memory-mapped).

    `timesteps` (K,) and `alpha_bar` (K,) float64: the timestep and `abar_t` of each step;
    `x_T` (P, N, *latent): initial noise; `x_t`, `e_c`, `e_0` (P, N, K, *latent): the latent
    entering step k and the conditional / unconditional noise predictions there;
    `final` (P, N, *latent): the sampler's output latents; `images` (P, N, 3, H, W) in [0, 1] or None;
    `guidance_schedule` and `step_guidance` (K,) float64: the schedule and the scale g_k used at each step.
    `final_alpha_bar`: the `abar` DDIM gives its last output (its `final_alpha_cumprod`).
    """

    prompts: list[str]
    seeds: list[int]
    guidance_scale: float
    timesteps: torch.Tensor
    alpha_bar: torch.Tensor
    x_T: torch.Tensor
    x_t: torch.Tensor
    e_c: torch.Tensor
    e_0: torch.Tensor
    final: torch.Tensor
    images: torch.Tensor | None
    final_alpha_bar: float = 1.0
    guidance_schedule: str = "constant"
    step_guidance: torch.Tensor | None = None

    def e_guided(self) -> torch.Tensor:
        """`e_g = e_0 + g_k (e_c - e_0)` at each step's sampling scale, (P, N, K, *latent)."""
        if self.step_guidance is None:
            return guided(self.e_c, self.e_0, self.guidance_scale)
        return guided(self.e_c, self.e_0, self.step_guidance.to(self.e_c.dtype).reshape((1, 1, -1) + (1,) * (self.e_c.ndim - 3)))


def initial_noise_for_seeds(seeds, latent_shape, dtype=torch.float32, device="cpu", init_noise_sigma=1.0) -> torch.Tensor:
    """(N, *latent) noise: seed s gives what the pipeline draws with `torch.Generator().manual_seed(s)` for one image."""
    return torch.cat([
        randn_tensor((1,) + tuple(latent_shape), generator=torch.Generator().manual_seed(int(s)), device=torch.device(device), dtype=dtype)
        for s in seeds
    ]) * init_noise_sigma


def latent_shape_of(unet) -> tuple[int, int, int]:
    """(C, h, w) of the UNet's latents (from its config, as the pipeline reads it)."""
    config = getattr(unet, "module", unet).config  # DDP / DeepSpeed wrappers keep the model in .module
    size = config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (config.in_channels, h, w)


def recording(shape, spill_dir: str | Path | None, name: str) -> torch.Tensor:
    """A float32 buffer in memory, or a .npy memory map under `spill_dir` when given."""
    if spill_dir is None:
        return torch.empty(shape, dtype=torch.float32)
    Path(spill_dir).mkdir(parents=True, exist_ok=True)
    return torch.from_numpy(np.lib.format.open_memmap(Path(spill_dir) / f"{name}.npy", mode="w+",
                                                      dtype=np.float32, shape=tuple(shape)))


def broadcast_per_prompt(tensor: torch.Tensor, P: int, N: int, latent_shape, name: str) -> torch.Tensor:
    """(*latent), (N, *latent) or (P, N, *latent) -> (P, N, *latent)."""
    latent_shape = tuple(latent_shape)
    for lead in ((), (N,), (P, N)):
        if tuple(tensor.shape) == lead + latent_shape:
            return tensor.reshape((1,) * (2 - len(lead)) + tuple(tensor.shape)).expand((P, N) + latent_shape)
    raise ValueError(f"{name} must be (*latent), (seeds, *latent) or (prompts, seeds, *latent) with latent "
                     f"{latent_shape}, {N} seeds, {P} prompts; got {tuple(tensor.shape)}")


def ddim_scheduler(components, num_inference_steps: int, device="cpu") -> DDIMScheduler:
    """The DDIM scheduler sampling uses: the model's sampler config, `num_inference_steps` timesteps set."""
    scheduler = DDIMScheduler.from_config(components.sampler.config)
    scheduler.set_timesteps(num_inference_steps, device=device)
    return scheduler


@torch.no_grad()
def sample_trajectories(components, prompts, seeds, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                        batch_size: int = 16, initial_noise: torch.Tensor | None = None,
                        forward_noised_from: torch.Tensor | None = None, noise_fn=None,
                        negative_prompt: str = "", spill_dir: str | Path | None = None,
                        decode: bool = True, latent_shape: tuple[int, int, int] | None = None,
                        guidance_schedule: str = "constant") -> Trajectories:
    """Deterministic DDIM (eta = 0) with CFG for every (prompt, seed), `batch_size` images per UNet call.

    Step k: `e_g = e_0 + g_k (e_c - e_0)` (model outputs, then the scheduler's own prediction_type),
    g_k = `mitigations.guidance_scales(guidance_schedule, t_k, guidance_scale)` (g at every step for `constant`);
    `x_{t_{k+1}} = sqrt(abar_{k+1}) x0hat(e_g) + sqrt(1 - abar_{k+1}) e_g` via `DDIMScheduler.step`.
    Start: `x_T` = the pipeline's seeded noise (or `initial_noise`, (N|P,N, *latent)); with
    `forward_noised_from = x` the start is `sqrt(abar_t0) x + sqrt(1 - abar_t0) x_T` instead.
    `forward_noised_from` is (*latent) or (P, *latent).
    `noise_fn(latents, t, prompt_index, seed_index) -> (out_c, out_0)` replaces the UNet
    (outputs in the scheduler's prediction space), e.g. for oracle checks.
    `spill_dir` memory-maps the recordings to .npy files there. `latent_shape` (C, h, w) defaults to the
    UNet's sample_size (the pipeline's default resolution); give the training latents' shape when the
    model was trained at another resolution.
    """
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if not prompts or not seeds:
        raise ValueError("give at least one prompt and one seed")
    if batch_size < 1 or num_inference_steps < 1:
        raise ValueError("batch_size and num_inference_steps must be >= 1")
    unet = components.unet
    device, dtype = module_device_dtype(unet)
    scheduler = ddim_scheduler(components, num_inference_steps, device)
    timesteps = scheduler.timesteps
    alpha_bar = alpha_bar_from_scheduler(scheduler)[timesteps.cpu()]
    P, N, K = len(prompts), len(seeds), len(timesteps)
    step_guidance = guidance_scales(guidance_schedule, timesteps.cpu(), guidance_scale,
                                    scheduler.config.num_train_timesteps)
    latent_shape = tuple(latent_shape) if latent_shape is not None else latent_shape_of(unet)
    x_T, start = start_latents(seeds, P, latent_shape, initial_noise, forward_noised_from, float(alpha_bar[0]),
                               device, dtype, scheduler.init_noise_sigma)
    if noise_fn is None:
        cond = encode_prompts(components.tokenizer, components.text_encoder, prompts).to(device, dtype)
        uncond = encode_prompts(components.tokenizer, components.text_encoder, [negative_prompt]).to(device, dtype)

        def noise_fn(latents, t, prompt_index, seed_index):  # the pipeline's batched CFG call: [uncond, cond]
            model_in = scheduler.scale_model_input(torch.cat([latents.to(dtype)] * 2), t)
            hidden = torch.cat([uncond.expand(len(latents), -1, -1), cond[prompt_index]])
            out_0, out_c = unet(model_in, t, encoder_hidden_states=hidden).sample.chunk(2)
            return out_c, out_0

    record = {name: recording((P * N, K) + latent_shape, spill_dir, name) for name in ("x_t", "e_c", "e_0")}
    final = torch.empty((P * N,) + latent_shape)
    images = [] if decode else None
    was_training = unet.training
    unet.eval()
    try:
        for lo in range(0, P * N, batch_size):
            hi = min(lo + batch_size, P * N)
            latents = denoise(scheduler, noise_fn, start[lo:hi], torch.arange(lo, hi, device=device), N, alpha_bar,
                              step_guidance, {name: rec[lo:hi] for name, rec in record.items()})
            final[lo:hi] = latents.float().cpu()
            if decode:
                images.append(decode_latents(components.vae, latents).cpu())
    finally:
        unet.train(was_training)

    def per_prompt(t: torch.Tensor) -> torch.Tensor:
        return t.reshape((P, N) + tuple(t.shape[1:]))

    return Trajectories(prompts, seeds, float(guidance_scale), timesteps.cpu(), alpha_bar,
                        per_prompt(x_T.float().cpu()), per_prompt(record["x_t"]), per_prompt(record["e_c"]),
                        per_prompt(record["e_0"]), per_prompt(final), per_prompt(torch.cat(images)) if decode else None,
                        float(scheduler.final_alpha_cumprod), parse_guidance_schedule(guidance_schedule), step_guidance)


def start_latents(seeds, P: int, latent_shape, initial_noise, forward_noised_from, alpha_bar_start: float, device,
                  dtype, init_noise_sigma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_T, start), each (P * N, *latent): the seeds' noise (or `initial_noise`) and the sampler's first input,
    `x_T` itself or `sqrt(abar_t0) x + sqrt(1 - abar_t0) x_T` with `x = forward_noised_from`."""
    N = len(seeds)
    if initial_noise is None:
        x_T = initial_noise_for_seeds(seeds, latent_shape, dtype, device, init_noise_sigma)
    else:
        x_T = initial_noise.to(device, dtype)
    x_T = broadcast_per_prompt(x_T, P, N, latent_shape, "initial_noise").reshape((P * N,) + latent_shape)
    if forward_noised_from is None:
        return x_T, x_T
    x = forward_noised_from.to(device, dtype)
    if tuple(x.shape) not in (latent_shape, (P,) + latent_shape):
        raise ValueError(f"forward_noised_from must be (*latent) or (prompts, *latent) = {(P,) + latent_shape}, "
                         f"got {tuple(x.shape)}")
    x = x.reshape((-1, 1) + latent_shape).expand((P, N) + latent_shape)
    return x_T, alpha_bar_start ** 0.5 * x.reshape(x_T.shape) + (1 - alpha_bar_start) ** 0.5 * x_T


def denoise(scheduler: DDIMScheduler, noise_fn, latents: torch.Tensor, items: torch.Tensor, num_seeds: int,
            alpha_bar: torch.Tensor, step_guidance: torch.Tensor, record: dict) -> torch.Tensor:
    """DDIM from `latents` (one batch of (prompt, seed) items) over the scheduler's timesteps with CFG
    `e_g = e_0 + g_k (e_c - e_0)` (losses.guided), `noise_fn(latents, t, prompt_index, seed_index) -> (out_c, out_0)`
    giving the model's outputs in the scheduler's prediction space; writes each step's input `x_t` and its `e_c`, `e_0` (as eps,
    float32) into `record`'s buffers and returns the final latents."""
    prediction_type = prediction_type_of(scheduler)
    prompt_index, seed_index = items // num_seeds, items % num_seeds
    for k, t in enumerate(scheduler.timesteps):
        out_c, out_0 = noise_fn(latents.float(), int(t), prompt_index, seed_index)
        out_c, out_0 = out_c.to(latents.device, latents.dtype), out_0.to(latents.device, latents.dtype)
        record["x_t"][:, k] = latents.float().cpu()
        abar_k = expand_like(alpha_bar[k].item(), latents)
        record["e_c"][:, k] = to_epsilon(out_c.float(), latents.float(), abar_k, prediction_type).cpu()
        record["e_0"][:, k] = to_epsilon(out_0.float(), latents.float(), abar_k, prediction_type).cpu()
        latents = scheduler.step(guided(out_c, out_0, float(step_guidance[k])), t, latents, eta=0.0,
                                 return_dict=False)[0]
    return latents
