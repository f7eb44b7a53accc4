"""The forward-process schedule: alpha_bar, SNR, forward noising, clean estimates, v -> eps.

Notation of docs/science.md: `x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps`,
`x0hat(e) = (x_t - sqrt(1 - abar_t) e) / sqrt(abar_t)`, `SNR_t = abar_t / (1 - abar_t)`.
Every `alpha_bar` argument broadcasts against the leading (batch) dimensions of the latents.
"""
from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def alpha_bar_from_scheduler(scheduler) -> torch.Tensor:
    """`abar_t = prod_{s<=t} (1 - beta_s)` for t = 0..num_train_timesteps-1, float64, on CPU.

    Read from the scheduler built from the model's own config (scaled_linear, linear,
    squaredcos_cap_v2, zero-SNR rescaling...): these are exactly the values its `.step` uses.
    """
    if not hasattr(scheduler, "alphas_cumprod"):
        raise TypeError(f"{type(scheduler).__name__} has no alphas_cumprod; pass a DDPM/DDIM-style scheduler")
    return scheduler.alphas_cumprod.detach().to("cpu", torch.float64).clone()


def prediction_type_of(scheduler) -> str:
    """The scheduler config's `prediction_type` ('epsilon', 'v_prediction' or 'sample')."""
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"unsupported prediction_type {kind!r}; expected one of {PREDICTION_TYPES}")
    return kind


def check_timesteps(timesteps, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Timesteps as a long tensor, after checking each lies in [0, len(alpha_bar))."""
    timesteps = torch.as_tensor(timesteps).reshape(-1)
    if timesteps.is_floating_point() and not torch.equal(timesteps, timesteps.round()):
        raise ValueError(f"timesteps must be integers, got {timesteps.tolist()}")
    timesteps = timesteps.long()
    n = alpha_bar.shape[0]
    bad = timesteps[(timesteps < 0) | (timesteps >= n)]
    if bad.numel():
        raise ValueError(f"timesteps {bad.tolist()} lie outside the schedule [0, {n - 1}]; "
                         f"use training timesteps 0..{n - 1}")
    return timesteps


def expand_like(values, like: torch.Tensor) -> torch.Tensor:
    """Per-batch values (shape = leading dims of `like`, or scalar) with trailing singleton dims added."""
    values = torch.as_tensor(values, device=like.device)
    if values.numel() == 1:
        values = values.reshape(())
    if values.ndim > like.ndim or tuple(like.shape[:values.ndim]) != tuple(values.shape):
        raise ValueError(f"alpha_bar of shape {tuple(values.shape)} does not match the leading dims "
                         f"of a tensor of shape {tuple(like.shape)}")
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def snr(alpha_bar) -> torch.Tensor:
    """`SNR_t = abar_t / (1 - abar_t)`."""
    alpha_bar = torch.as_tensor(alpha_bar)
    return alpha_bar / (1 - alpha_bar)


def forward_noise(x: torch.Tensor, noise: torch.Tensor, alpha_bar) -> torch.Tensor:
    """`x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps`."""
    a = expand_like(alpha_bar, noise).to(noise.dtype)
    return a.sqrt() * x + (1 - a).sqrt() * noise


def clean_estimate(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar) -> torch.Tensor:
    """`x0hat(e) = (x_t - sqrt(1 - abar_t) e) / sqrt(abar_t)`."""
    if x_t.shape != eps.shape:
        raise ValueError(f"x_t {tuple(x_t.shape)} and eps {tuple(eps.shape)} must have the same shape")
    a = expand_like(alpha_bar, x_t).to(torch.promote_types(x_t.dtype, torch.float32))
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def to_epsilon(prediction: torch.Tensor, x_t: torch.Tensor, alpha_bar, prediction_type: str = "epsilon") -> torch.Tensor:
    """Model output -> noise prediction `e`.

    epsilon: `e = out`; v_prediction (`v = sqrt(abar) eps - sqrt(1 - abar) x`):
    `e = sqrt(abar) v + sqrt(1 - abar) x_t`; sample: `e = (x_t - sqrt(abar) out) / sqrt(1 - abar)`.
    """
    if prediction_type == "epsilon":
        return prediction
    a = expand_like(alpha_bar, x_t).to(torch.promote_types(x_t.dtype, torch.float32))
    if prediction_type == "v_prediction":
        return a.sqrt() * prediction + (1 - a).sqrt() * x_t
    if prediction_type == "sample":
        return (x_t - a.sqrt() * prediction) / (1 - a).sqrt()
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
