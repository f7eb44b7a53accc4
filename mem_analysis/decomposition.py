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

Decomposition = namedtuple("Decomposition", ["w_x", "w_T", "residual", "w_mu"], defaults=(None,))
Deviation = namedtuple("Deviation", ["D_x", "D_T"])
Collapse = namedtuple("Collapse", ["pairwise_distance", "final_diversity"])
REFERENCES = ("paper", "exact")
TARGETS = ("training", "final")
LATENT_RANGES = ("inputs", "outputs")
REDUCTIONS = ("sum", "mean")


def decompose_latents(trajectory: torch.Tensor, x: torch.Tensor, x_T: torch.Tensor, target: str = "training",
                      final: torch.Tensor | None = None, mu: torch.Tensor | None = None) -> Decomposition:
    """M4: least-squares `x_t ~ w_x x + w_T x_T` per seed and step; residual = RMSE per element.

    `trajectory` (N, K, *latent); `x` (*latent) or (N, *latent); `x_T` (N, *latent).
    `target="final"` (the authors' exploratory variant) regresses on `final` (N, *latent),
    each seed's generated latent, instead of the training latent `x`. With `mu` (*latent), the
    centred basis: `x_t ~ w_x (x - mu) + w_mu mu + w_T x_T`, so content every image shares (the
    mean latent, e.g. backgrounds) loads on `w_mu`, not on `w_x` (its theory is the same
    `sqrt(abar_t)`). Solved in float64 by the normal equations `(B B^T) w = B x_t`, B the basis rows.
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
    rows = [x.reshape(N, -1).double()]
    if mu is not None:
        if tuple(mu.shape) != latent:
            raise ValueError(f"mu must have the latent shape {latent}, got {tuple(mu.shape)}")
        mu_row = mu.reshape(1, -1).double().expand(N, -1)
        rows = [rows[0] - mu_row, mu_row]
    basis = torch.stack(rows + [x_T.reshape(N, -1).double()], 1)  # (N, m, D)
    gram = basis @ basis.transpose(1, 2)  # (N, m, m)
    scale = torch.diagonal(gram, dim1=1, dim2=2).prod(-1)
    if (torch.linalg.det(gram) <= 1e-12 * scale).any():
        raise ValueError("the basis (x, x_T, and mu when centred) is degenerate for some seed; the decomposition is "
                         "undefined (was the initial noise drawn from the same seed as x, or is x equal to mu?)")
    w = torch.empty(N, K, basis.shape[1], dtype=torch.float64)
    residual = torch.empty(N, K, dtype=torch.float64)
    for k in range(K):  # one step at a time keeps float64 copies small for SD-sized latents
        x_t = trajectory[:, k].reshape(N, -1).double()
        w[:, k] = torch.linalg.solve(gram, (basis @ x_t[:, :, None]))[..., 0]
        fit = (w[:, k, :, None] * basis).sum(1)
        residual[:, k] = (x_t - fit).pow(2).mean(1).sqrt()
    return Decomposition(w[..., 0], w[..., -1], residual, None if mu is None else w[..., 1])


def trajectory_latents(x_t: torch.Tensor, final: torch.Tensor, alpha_bar: torch.Tensor, final_alpha_bar: float = 1.0,
                       latents: str = "inputs") -> tuple[torch.Tensor, torch.Tensor]:
    """The latents D sums over, with their `abar`: `inputs` x_T..x_1 (each step's input, as recorded)
    or `outputs` x_{T-1}..x_0 (each step's output, as in the authors' exploratory code).

    `x_t` (N, K, *latent) recorded inputs; `final` (N, *latent) the sampler's output; `alpha_bar` (K,)
    of the inputs; `final_alpha_bar` the `abar` of the last output (DDIM's `final_alpha_cumprod`).
    Returns (trajectory (N, K, *latent), alpha_bar (K,) float64). The exact reference still starts at
    the first input's `abar` (pass `alpha_bar_start=alpha_bar[0]` to `schedule_deviation`).
    """
    if latents not in LATENT_RANGES:
        raise ValueError(f"unknown latents {latents!r}; choose one of {LATENT_RANGES}")
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64).reshape(-1)
    if latents == "inputs":
        return x_t, alpha_bar
    if tuple(final.shape) != (x_t.shape[0],) + tuple(x_t.shape[2:]):
        raise ValueError(f"final must be (seeds, *latent) = {(x_t.shape[0],) + tuple(x_t.shape[2:])}, "
                         f"got {tuple(final.shape)}")
    trajectory = torch.cat([x_t[:, 1:], final[:, None].to(x_t.dtype)], 1)
    return trajectory, torch.cat([alpha_bar[1:], torch.tensor([float(final_alpha_bar)], dtype=torch.float64)])


def reference_schedule(alpha_bar: torch.Tensor, reference: str = "paper", alpha_bar_start: float | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Theoretical (w_x, w_T) per recorded step; `abar_t0` = `alpha_bar_start`, default `alpha_bar[0]`.

    paper: `(sqrt(abar_t), sqrt(1 - abar_t))`; exact: `(sqrt(abar_t) - c sqrt(1 - abar_t),
    sqrt(1 - abar_t) / sqrt(1 - abar_t0))` with `c = sqrt(abar_t0 / (1 - abar_t0))`, `t0` the
    first sampling timestep (pass it when the steps are the outputs x_{T-1}..x_0).
    """
    if reference not in REFERENCES:
        raise ValueError(f"unknown reference {reference!r}; choose one of {REFERENCES}")
    abar = torch.as_tensor(alpha_bar, dtype=torch.float64).reshape(-1)
    if reference == "paper":
        return abar.sqrt(), (1 - abar).sqrt()
    a0 = abar[0] if alpha_bar_start is None else torch.as_tensor(float(alpha_bar_start), dtype=torch.float64)
    c = (a0 / (1 - a0)).sqrt()
    return abar.sqrt() - c * (1 - abar).sqrt(), (1 - abar).sqrt() / (1 - a0).sqrt()


def schedule_deviation(w_x: torch.Tensor, w_T: torch.Tensor, alpha_bar: torch.Tensor, early_steps: int | None = None,
                       reference: str = "paper", reduction: str = "sum", alpha_bar_start: float | None = None
                       ) -> Deviation:
    """M4: `D_x = sum_k (mean_seeds w_x - w_x_ref)`, `D_T = -sum_k (mean_seeds w_T - w_T_ref)`.

    `w_x`, `w_T` (seeds, K); `alpha_bar` (K,) of the recorded steps; the sum runs over the
    first `early_steps` steps when given. `reduction="mean"` divides by the number of steps summed
    (comparable across step counts; the paper's D is the sum). References: see `reference_schedule`.
    0-d float64.
    """
    if w_x.shape != w_T.shape or w_x.ndim != 2 or w_x.shape[1] != torch.as_tensor(alpha_bar).numel():
        raise ValueError(f"w_x {tuple(w_x.shape)} and w_T {tuple(w_T.shape)} must both be (seeds, K) with "
                         f"K = len(alpha_bar) = {torch.as_tensor(alpha_bar).numel()}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {REDUCTIONS}")
    ref_x, ref_T = reference_schedule(alpha_bar, reference, alpha_bar_start)
    K = w_x.shape[1] if early_steps is None else int(early_steps)
    if not 1 <= K <= w_x.shape[1]:
        raise ValueError(f"early_steps must be in [1, {w_x.shape[1]}], got {early_steps}")
    D_x = (w_x.double().mean(0) - ref_x)[:K].sum()
    D_T = -(w_T.double().mean(0) - ref_T)[:K].sum()
    if reduction == "mean":
        D_x, D_T = D_x / K, D_T / K
    return Deviation(D_x, D_T)


def deviation_values(dec: Decomposition, alpha_bar: torch.Tensor, early_steps: int, tag: str = "",
                     references=REFERENCES, reductions=REDUCTIONS, alpha_bar_start: float | None = None
                     ) -> dict[str, float]:
    """M4 columns of one decomposition (seeds averaged): `D_x<tag><red><ref><window>` and `D_T...`.

    `<tag>` names the decomposition ('' training latent, '_final', '_centred'); `<red>` is '' for
    the sum (the paper's D) and '_mean' for the per-step mean; `<ref>` '' (paper schedule) or
    '_exact'; `<window>` '' (all steps) or '_early' (the first `early_steps`).
    """
    values = {}
    for ref in references:
        for window, k in (("", None), ("_early", early_steps)):
            for reduction in reductions:
                dev = schedule_deviation(dec.w_x, dec.w_T, alpha_bar, k, ref, reduction, alpha_bar_start)
                name = f"{tag}{'_mean' if reduction == 'mean' else ''}{'_exact' if ref == 'exact' else ''}{window}"
                values[f"D_x{name}"], values[f"D_T{name}"] = float(dev.D_x), float(dev.D_T)
    return values


def per_seed_deviations(decompositions: dict, alpha_bar: torch.Tensor, early_steps: int,
                        alpha_bar_start: float | None = None) -> list[dict[str, float]]:
    """Per seed, the paper-schedule sums `D_x<tag>`, `D_T<tag>` and their `_early` windows of each
    decomposition in `decompositions` ({tag: Decomposition}), for reliability across seeds (the mean
    over seeds of these equals the per-sample value, D being linear in w)."""
    seeds = next(iter(decompositions.values())).w_x.shape[0]
    rows = [{} for _ in range(seeds)]
    for tag, dec in decompositions.items():
        for j, row in enumerate(rows):
            one = Decomposition(dec.w_x[j:j + 1], dec.w_T[j:j + 1], dec.residual[j:j + 1])
            row.update(deviation_values(one, alpha_bar, early_steps, tag, ("paper",), ("sum",), alpha_bar_start))
    return rows


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
