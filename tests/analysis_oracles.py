"""Analytic oracle denoisers for the mem_analysis tests (docs/science.md, "Checks every implementation must pass")."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from mem_analysis.schedule import expand_like


def embeddings(num_samples: int, length: int = 4, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic cond (S, L, D) whose entries equal `s + 1` and an all-zero uncond (1, L, D)."""
    cond = torch.arange(1, num_samples + 1, dtype=torch.float32)[:, None, None].expand(num_samples, length, dim)
    return cond.clone(), torch.zeros(1, length, dim)


def oracle_eps(x_t, x0, abar):
    """The noise that makes `x_t = sqrt(abar) x0 + sqrt(1 - abar) eps` hold exactly."""
    abar = expand_like(abar, x_t)
    return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()


class OracleUNet(torch.nn.Module):
    """A UNet stand-in whose clean estimate is `mu + k (x_s - mu)` for caption s and `mu` unconditionally.

    The sample is read from the embedding (`cond[s] = s + 1`, uncond = 0), so k_c = k and
    k_0 = 0 (centred on mu); `prediction_type="v_prediction"` returns `v` instead of eps.
    """

    def __init__(self, x, alpha_bar, k=1.0, mu=None, prediction_type="epsilon"):
        super().__init__()
        self.x, self.alpha_bar, self.k = x, alpha_bar, k
        self.mu = torch.zeros_like(x[0]) if mu is None else mu
        self.prediction_type = prediction_type
        self.weight = torch.nn.Parameter(torch.zeros(()))  # gives the module a device and dtype
        self.config = SimpleNamespace(in_channels=x.shape[1], sample_size=x.shape[-1])

    def forward(self, sample, timestep, encoder_hidden_states):
        index = encoder_hidden_states[:, 0, 0].round().long() - 1
        x0 = torch.where((index >= 0)[:, None, None, None],
                         self.mu + self.k * (self.x[index.clamp(min=0)] - self.mu), self.mu)
        abar = self.alpha_bar[torch.as_tensor(timestep).expand(len(sample))].float()
        eps = oracle_eps(sample.float(), x0, abar)
        if self.prediction_type == "v_prediction":
            a = expand_like(abar, sample)
            return SimpleNamespace(sample=a.sqrt() * eps - (1 - a).sqrt() * x0)
        return SimpleNamespace(sample=eps)


def gaussian_posterior_mean(x_t, abar, mu, cov):
    """`E[x | x_t]` for `x ~ N(mu, cov)`, `x_t = sqrt(a) x + sqrt(1 - a) eps`, by a linear solve per distinct a:
    `mu + sqrt(a) cov (a cov + (1 - a) I)^{-1} (x_t - sqrt(a) mu)` (flattened latents; `abar` per item)."""
    flat = x_t.double().reshape(len(x_t), -1)
    a = torch.as_tensor(abar, dtype=torch.float64).reshape(-1).expand(len(flat))
    out = torch.empty_like(flat)
    eye = torch.eye(len(mu), dtype=torch.float64)
    for value in torch.unique(a):
        rows = a == value
        gain = value.sqrt() * cov @ torch.linalg.inv(value * cov + (1 - value) * eye)
        out[rows] = mu + (flat[rows] - value.sqrt() * mu) @ gain.T
    return out.reshape(x_t.shape).float()


class GaussianOracleUNet(torch.nn.Module):
    """A UNet stand-in that memorizes nothing unconditionally: its unconditional clean estimate is the optimal
    denoiser of the data model `N(mu, cov)` (flattened), its conditional one the exact training latent `x_s`
    of caption s (`cond[s] = s + 1`, as OracleUNet)."""

    def __init__(self, x, alpha_bar, mu, cov):
        super().__init__()
        self.x, self.alpha_bar, self.mu, self.cov = x, alpha_bar, mu, cov
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.config = SimpleNamespace(in_channels=x.shape[1], sample_size=x.shape[-1])

    def forward(self, sample, timestep, encoder_hidden_states):
        index = encoder_hidden_states[:, 0, 0].round().long() - 1
        abar = self.alpha_bar[torch.as_tensor(timestep).expand(len(sample))].float()
        unconditional = gaussian_posterior_mean(sample, abar, self.mu, self.cov)
        x0 = torch.where((index >= 0)[:, None, None, None], self.x[index.clamp(min=0)], unconditional)
        return SimpleNamespace(sample=oracle_eps(sample.float(), x0, abar))
