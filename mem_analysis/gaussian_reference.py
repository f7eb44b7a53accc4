"""The analytic reference of the premise k_0 ~ 0: the optimal denoiser of a Gaussian fitted to the training latents.

Model the training latents (flattened to D dims) as `x ~ N(mu, Sigma)`, `Sigma = U diag(lam) U^T` (the empirical
mean and covariance, duplicates counted when `weights` are given). For `x_t = sqrt(a) x + sqrt(1 - a) eps` its
optimal (posterior-mean) denoiser is linear and memorizes nothing:

    x0hat(x_t) = mu + G_a (x_t - sqrt(a) mu),   G_a = U diag(gain) U^T,   gain_i = sqrt(a) lam_i / (a lam_i + 1 - a).

Its overestimation coefficient `k_0 = <x0hat - mu, x - mu> / ||x - mu||^2` (docs/science.md M2), in expectation
over eps, is
- on forward-noised training latents at timestep t (`a = abar_t`), the linear-Gaussian shrinkage
  `E k_0 = sqrt(a) <G_a (x - mu), x - mu> / ||x - mu||^2 = sum_i (a lam_i / (a lam_i + 1 - a)) c_i^2 / sum_i c_i^2`,
  `c = U^T (x - mu)`: between 0 and 1, large at low noise, and 0.3-0.6 at t = 750-950 for image-like spectra;
- at the sampler's first step, whose input is pure noise `x_T ~ N(0, I)` holding none of x (`a = abar_t0`),
  `E k_0 = -sqrt(a) <G_a mu, x - mu> / ||x - mu||^2`: about 0 (its numerator averages to exactly 0 over the
  training latents; `sqrt(a) G_a` is of order a), with a spread over seeds of `sd k_0 = ||G_a (x - mu)|| / ||x - mu||^2`.

The covariance is eigendecomposed exactly: through the thin SVD of the centred latents, so when there are fewer
latents than dims (rank N - 1) the zero eigenvalues are exact, not an approximation. Only when both N and D exceed
`max_rank` (SD-size latents over a large set) is a diagonal covariance used instead (kind 'diagonal': per-dim
variances, U = I), and the returned model says so.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_RANK = 4096  # beyond min(N, D) > this, a diagonal covariance (the SVD would be too large)


@dataclass
class GaussianModel:
    """`N(mu, U diag(eigenvalues) U^T)` over D flattened dims: `mu` (D,), `eigenvalues` (R,), `eigenvectors` (D, R)
    (None for kind 'diagonal', where `eigenvalues` are the D per-dim variances); `kind` 'full' or 'diagonal';
    `n` the number of latents it was fitted on."""

    mu: torch.Tensor
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None
    kind: str
    n: int

    def to_basis(self, v: torch.Tensor) -> torch.Tensor:
        """Coordinates of (..., D) vectors in the eigenbasis, (..., R) (identity for 'diagonal')."""
        return v if self.eigenvectors is None else v @ self.eigenvectors

    def apply_gain(self, v: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """`G_a v` for (..., D) vectors: `U diag(gain) U^T v` (directions outside the span of U get gain 0)."""
        gain = denoiser_gain(self.eigenvalues, alpha_bar)
        if self.eigenvectors is None:
            return gain * v
        return (self.to_basis(v) * gain) @ self.eigenvectors.T


def flat(latents: torch.Tensor) -> torch.Tensor:
    """(N, *latent) -> (N, D) float64."""
    return torch.as_tensor(latents).double().reshape(len(latents), -1)


def fit_gaussian(latents: torch.Tensor, weights=None, max_rank: int = MAX_RANK) -> GaussianModel:
    """Mean and covariance of (N, *latent) latents (`weights` per latent, e.g. copies in training; default equal):
    `mu = sum_n w_n x_n`, `Sigma = sum_n w_n (x_n - mu)(x_n - mu)^T` (w normalised to sum 1), eigendecomposed
    exactly through the SVD of `sqrt(w_n) (x_n - mu)`; diagonal when min(N, D) > `max_rank`."""
    x = flat(latents)
    w = torch.ones(len(x), dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    if w.shape != (len(x),) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {len(x)} non-negative numbers with a positive sum")
    w = w / w.sum()
    mu = (w[:, None] * x).sum(0)
    centred = w.sqrt()[:, None] * (x - mu)
    if min(centred.shape) > max_rank:
        return GaussianModel(mu, centred.pow(2).sum(0), None, "diagonal", len(x))
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    return GaussianModel(mu, singular.pow(2), vh.T, "full", len(x))


def denoiser_gain(eigenvalues: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """`gain_i = sqrt(a) lam_i / (a lam_i + 1 - a)`: the optimal denoiser's gain along each eigenvector."""
    a = float(alpha_bar)
    return a ** 0.5 * eigenvalues / (a * eigenvalues + 1 - a)


def optimal_clean_estimate(model: GaussianModel, x_t: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """`x0hat = mu + G_a (x_t - sqrt(a) mu)` for (N, *latent) inputs at `abar = a`, same shape, float64."""
    v = flat(x_t) - float(alpha_bar) ** 0.5 * model.mu
    return (model.mu + model.apply_gain(v, alpha_bar)).reshape(x_t.shape)


def expected_k0_forward(model: GaussianModel, x: torch.Tensor, alpha_bar) -> torch.Tensor:
    """Per latent and abar, `E_eps k_0` on forward-noised `x`: `a sum_i lam_i c_i^2 / (a lam_i + 1 - a) / sum_i c_i^2`
    with `c = U^T (x - mu)`; `x` (S, *latent), `alpha_bar` (T,) -> (S, T) float64."""
    centred = flat(x) - model.mu
    norm2 = centred.pow(2).sum(1)
    c2 = model.to_basis(centred).pow(2)
    a = torch.as_tensor(alpha_bar, dtype=torch.float64).reshape(-1)
    shrink = torch.stack([a_t ** 0.5 * denoiser_gain(model.eigenvalues, a_t) for a_t in a.tolist()], 1)  # (R, T)
    return (c2 @ shrink) / norm2[:, None]


def expected_k0_first_step(model: GaussianModel, x: torch.Tensor, alpha_bar_t0: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, sd) over pure-noise inputs `x_T ~ N(0, I)` of `k_0` at the first sampling step, per latent (S,):
    mean `-sqrt(a) <G_a mu, x - mu> / ||x - mu||^2`, sd `||G_a (x - mu)|| / ||x - mu||^2`."""
    centred = flat(x) - model.mu
    norm2 = centred.pow(2).sum(1)
    a = float(alpha_bar_t0)
    mean = -(a ** 0.5) * (centred @ model.apply_gain(model.mu, a)) / norm2
    sd = model.apply_gain(centred, a).norm(dim=1) / norm2
    return mean, sd


def k0_shrinkage(latents: torch.Tensor, alpha_bar, weights=None, at: torch.Tensor | None = None,
                 max_rank: int = MAX_RANK) -> torch.Tensor:
    """Analytic `k_0` per abar (T,): the optimal Gaussian denoiser fitted on `latents` (`fit_gaussian`), its
    `expected_k0_forward` averaged over the latents `at` (default: the training latents themselves, weighted)."""
    model = fit_gaussian(latents, weights, max_rank)
    if at is not None:
        return expected_k0_forward(model, at, alpha_bar).mean(0)
    w = torch.ones(len(latents), dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    return (w[:, None] * expected_k0_forward(model, latents, alpha_bar)).sum(0) / w.sum()


def premise_reference(pool_latents: torch.Tensor, pool_weights, probe_latents: torch.Tensor, dup_factors,
                      probe_timesteps, alpha_bar: torch.Tensor, first_timestep: int, high_noise_timestep: int,
                      max_rank: int = MAX_RANK) -> dict:
    """The analytic k_0 of the optimal Gaussian denoiser fitted on the training pool, as premise_reference.json holds it.

    Fitted on `pool_latents` (one per unique training image) weighted by `pool_weights` (copies in training, so
    the model is the training distribution as trained on). Read on the pool ('training', weighted) and on the probe
    latents per duplication factor ('by_dup', dup 0 = held out): per probe timestep, `k0_forward` (forward-noised
    latents: the shrinkage) and `k0_gauss` (pure-noise input: the Gaussian probes' null); their means over the grid
    (`_mean`) and over `t >= high_noise_timestep` (`_early`, the window of `k_uncond_early`); and at the sampler's
    first timestep the mean and sd over seeds of `k0_first` (the premise's null: about 0).
    """
    model = fit_gaussian(pool_latents, pool_weights, max_rank)
    w = torch.as_tensor(pool_weights, dtype=torch.float64)
    timesteps = torch.as_tensor(probe_timesteps).reshape(-1).long()
    grid = alpha_bar.double()[timesteps]
    early = timesteps >= high_noise_timestep
    dup_factors = torch.as_tensor(dup_factors).reshape(-1)
    groups = {"training": (pool_latents, w)}
    groups.update({str(int(d)): (probe_latents[dup_factors == d], None) for d in sorted(set(dup_factors.tolist()))})

    def mean_over(values: torch.Tensor, weights) -> torch.Tensor:
        return values.mean(0) if weights is None else (weights.reshape((-1,) + (1,) * (values.ndim - 1)) * values).sum(0) / weights.sum()

    out = dict(model=dict(kind=model.kind, n_latents=model.n, dims=int(model.mu.numel()), rank=int(model.eigenvalues.numel()),
                          weights="copies in train (as trained on)"),
               probe_timesteps=timesteps.tolist(), alpha_bar=grid.tolist(), high_noise_timestep=int(high_noise_timestep),
               first_step=dict(timestep=int(first_timestep), alpha_bar=float(alpha_bar[int(first_timestep)])))
    for name, (latents, weights) in groups.items():
        forward = mean_over(expected_k0_forward(model, latents, grid), weights)
        gauss = mean_over(torch.stack([expected_k0_first_step(model, latents, a)[0] for a in grid.tolist()], 1), weights)
        first_mean, first_sd = expected_k0_first_step(model, latents, out["first_step"]["alpha_bar"])
        for key, per_t in (("k0_forward", forward), ("k0_gauss", gauss)):
            out.setdefault(key, {})[name] = per_t.tolist()
            out.setdefault(f"{key}_mean", {})[name] = float(per_t.mean())
            out.setdefault(f"{key}_early", {})[name] = float(per_t[early].mean()) if early.any() else None
        out["first_step"].setdefault("k0_mean", {})[name] = float(mean_over(first_mean, weights))
        out["first_step"].setdefault("k0_sd", {})[name] = float(mean_over(first_sd, weights))
    return out
