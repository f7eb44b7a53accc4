"""M4 latent decomposition along sampling trajectories and M5 trajectory collapse.

Per seed n and step k, least squares over the flattened latent:
`x_t[n, k] ~ w_x[n, k] x + w_T[n, k] x_T[n]`. Theory (docs/science.md, "The two reference
schedules"): `paper` `w_x = sqrt(abar_t)`, `w_T = sqrt(1 - abar_t)`; `exact` (a perfect
denoiser run by DDIM from pure noise) `w_x = sqrt(abar_t) - c sqrt(1 - abar_t)`,
`w_T = sqrt(1 - abar_t) / sqrt(1 - abar_t0)`, `c = sqrt(abar_t0 / (1 - abar_t0))`.
"""
from __future__ import annotations

from collections import namedtuple

import torch

Decomposition = namedtuple("Decomposition", ["w_x", "w_T", "residual"])
Deviation = namedtuple("Deviation", ["D_x", "D_T"])
Collapse = namedtuple("Collapse", ["pairwise_distance", "final_diversity"])
REFERENCES = ("paper", "exact")
TARGETS = ("training", "final")


def decompose_latents(trajectory: torch.Tensor, x: torch.Tensor, x_T: torch.Tensor, target: str = "training",
                      final: torch.Tensor | None = None) -> Decomposition:
    """M4: least-squares `x_t ~ w_x x + w_T x_T` per seed and step; residual = RMSE per element.

    `trajectory` (N, K, *latent); `x` (*latent) or (N, *latent); `x_T` (N, *latent).
    `target="final"` (the authors' exploratory variant) regresses on `final` (N, *latent),
    each seed's generated latent, instead of the training latent `x`. Solved in float64 by the
    2x2 normal equations `[<x,x> <x,x_T>; <x_T,x> <x_T,x_T>] w = [<x,x_t>; <x_T,x_t>]`.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {TARGETS}")
    if target == "final":
        if final is None:
            raise ValueError("target='final' needs final=(seeds, *latent), the generated latents")
        x = final
    if trajectory.ndim < 3:
        raise ValueError(f"trajectory must be (seeds, steps, *latent), got {tuple(trajectory.shape)}")
    N, K, latent = trajectory.shape[0], trajectory.shape[1], tuple(trajectory.shape[2:])
    if tuple(x_T.shape) != (N,) + latent:
        raise ValueError(f"x_T must be (seeds, *latent) = {(N,) + latent}, got {tuple(x_T.shape)}")
    if tuple(x.shape) == latent:
        x = x.expand((N,) + latent)
    if tuple(x.shape) != (N,) + latent:
        raise ValueError(f"x must be (*latent) = {latent} or (seeds, *latent), got {tuple(x.shape)}")
    basis = torch.stack([x.reshape(N, -1), x_T.reshape(N, -1)], 1).double()  # (N, 2, D)
    gram = basis @ basis.transpose(1, 2)  # (N, 2, 2)
    if (torch.linalg.det(gram) <= 1e-12 * gram[:, 0, 0] * gram[:, 1, 1]).any():
        raise ValueError("x and x_T are collinear (or zero) for some seed; the decomposition is undefined "
                         "(was the initial noise drawn from the same seed as x?)")
    w = torch.empty(N, K, 2, dtype=torch.float64)
    residual = torch.empty(N, K, dtype=torch.float64)
    for k in range(K):  # one step at a time keeps float64 copies small for SD-sized latents
        x_t = trajectory[:, k].reshape(N, -1).double()
        w[:, k] = torch.linalg.solve(gram, (basis @ x_t[:, :, None]))[..., 0]
        fit = (w[:, k, :, None] * basis).sum(1)
        residual[:, k] = (x_t - fit).pow(2).mean(1).sqrt()
    return Decomposition(w[..., 0], w[..., 1], residual)


def reference_schedule(alpha_bar: torch.Tensor, reference: str = "paper") -> tuple[torch.Tensor, torch.Tensor]:
    """Theoretical (w_x, w_T) per recorded step; `alpha_bar[0]` is the first sampling timestep's.

    paper: `(sqrt(abar_t), sqrt(1 - abar_t))`; exact: `(sqrt(abar_t) - c sqrt(1 - abar_t),
    sqrt(1 - abar_t) / sqrt(1 - abar_t0))` with `c = sqrt(abar_t0 / (1 - abar_t0))`.
    """
    if reference not in REFERENCES:
        raise ValueError(f"unknown reference {reference!r}; choose one of {REFERENCES}")
    abar = torch.as_tensor(alpha_bar, dtype=torch.float64).reshape(-1)
    if reference == "paper":
        return abar.sqrt(), (1 - abar).sqrt()
    c = (abar[0] / (1 - abar[0])).sqrt()
    return abar.sqrt() - c * (1 - abar).sqrt(), (1 - abar).sqrt() / (1 - abar[0]).sqrt()


def schedule_deviation(w_x: torch.Tensor, w_T: torch.Tensor, alpha_bar: torch.Tensor, early_steps: int | None = None,
                       reference: str = "paper") -> Deviation:
    """M4: `D_x = sum_k (mean_seeds w_x - w_x_ref)`, `D_T = -sum_k (mean_seeds w_T - w_T_ref)`.

    `w_x`, `w_T` (seeds, K); `alpha_bar` (K,) of the recorded steps; the sum runs over the
    first `early_steps` steps when given. References: see `reference_schedule`. 0-d float64.
    """
    if w_x.shape != w_T.shape or w_x.ndim != 2 or w_x.shape[1] != torch.as_tensor(alpha_bar).numel():
        raise ValueError(f"w_x {tuple(w_x.shape)} and w_T {tuple(w_T.shape)} must both be (seeds, K) with "
                         f"K = len(alpha_bar) = {torch.as_tensor(alpha_bar).numel()}")
    ref_x, ref_T = reference_schedule(alpha_bar, reference)
    K = w_x.shape[1] if early_steps is None else int(early_steps)
    if not 1 <= K <= w_x.shape[1]:
        raise ValueError(f"early_steps must be in [1, {w_x.shape[1]}], got {early_steps}")
    D_x = (w_x.double().mean(0) - ref_x)[:K].sum()
    D_T = -(w_T.double().mean(0) - ref_T)[:K].sum()
    return Deviation(D_x, D_T)


def mean_pairwise_distance(samples: torch.Tensor) -> torch.Tensor:
    """`mean_{i<j} ||s_i - s_j||_2 / sqrt(D)` over the first dim (per-element RMS distance)."""
    if samples.shape[0] < 2:
        raise ValueError("need at least two seeds to measure a pairwise distance")
    flat = samples.reshape(samples.shape[0], -1).double()
    dist = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
    i, j = torch.triu_indices(len(flat), len(flat), 1)
    return dist[i, j].mean()


def trajectory_collapse(trajectory: torch.Tensor, final: torch.Tensor | None = None) -> Collapse:
    """M5: per step k, `mean_{i<j} ||x_t[i,k] - x_t[j,k]|| / sqrt(D)`; final diversity, the same over `final`.

    `trajectory` (seeds, K, *latent); `final` (seeds, ...) final images or latents
    (default: the last recorded step).
    """
    if trajectory.ndim < 3:
        raise ValueError(f"trajectory must be (seeds, steps, *latent), got {tuple(trajectory.shape)}")
    per_step = torch.stack([mean_pairwise_distance(trajectory[:, k]) for k in range(trajectory.shape[1])])
    final = trajectory[:, -1] if final is None else final
    if final.shape[0] != trajectory.shape[0]:
        raise ValueError(f"final has {final.shape[0]} seeds, trajectory {trajectory.shape[0]}")
    return Collapse(per_step, mean_pairwise_distance(final))
