"""mem_analysis.gaussian_reference against numpy's covariance and closed forms (docs/science.md M2)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mem_analysis.gaussian_reference import (expected_k0_first_step, expected_k0_forward, fit_gaussian, k0_shrinkage,
                                             optimal_clean_estimate, premise_reference)


def covariance_of(model) -> np.ndarray:
    """U diag(lam) U^T (or diag(lam)) as a dense matrix."""
    if model.eigenvectors is None:
        return np.diag(model.eigenvalues.numpy())
    u = model.eigenvectors.numpy()
    return u @ np.diag(model.eigenvalues.numpy()) @ u.T


@pytest.mark.parametrize("n", [300, 40])  # more latents than dims, and fewer (rank n - 1: exact, not approximated)
def test_fit_equals_the_weighted_empirical_mean_and_covariance(n):
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(n, 2, 4, 4)) * rng.uniform(0.2, 2.0, size=(1, 2, 4, 4)) + 1.5
    weights = rng.integers(1, 5, size=n)
    model = fit_gaussian(torch.as_tensor(latents), weights)
    flat = latents.reshape(n, -1)
    np.testing.assert_allclose(model.mu.numpy(), np.average(flat, axis=0, weights=weights), atol=1e-12)
    np.testing.assert_allclose(covariance_of(model), np.cov(flat.T, aweights=weights, bias=True), atol=1e-10)
    # weights = copies: the same model as the latents repeated
    repeated = fit_gaussian(torch.as_tensor(np.repeat(latents, weights, axis=0)))
    np.testing.assert_allclose(covariance_of(repeated), covariance_of(model), atol=1e-10)
    diagonal = fit_gaussian(torch.as_tensor(latents), weights, max_rank=8)
    assert diagonal.kind == "diagonal" and model.kind == "full"
    np.testing.assert_allclose(diagonal.eigenvalues.numpy(),
                               np.diag(np.cov(flat.T, aweights=weights, bias=True)), atol=1e-10)


def test_shrinkage_and_first_step_closed_forms():
    """Isotropic data N(mu, lam I): E k_0 on forward-noised latents is a lam / (a lam + 1 - a) for every x, the
    optimal estimate is mu + sqrt(a) lam / (a lam + 1 - a) (x_t - sqrt(a) mu), and from pure noise
    E k_0 = -a lam <mu, x - mu> / ((a lam + 1 - a) ||x - mu||^2)."""
    rng = np.random.default_rng(1)
    lam, d, n = 2.0, 16, 40000
    mu = rng.normal(size=d)
    latents = torch.as_tensor(mu + np.sqrt(lam) * rng.normal(size=(n, d)))
    abar = torch.tensor([0.9, 0.3, 0.05, 0.008], dtype=torch.float64)
    expected = abar * lam / (abar * lam + 1 - abar)
    torch.testing.assert_close(k0_shrinkage(latents, abar), expected, atol=0.01, rtol=0)
    model = fit_gaussian(latents)
    x_t = torch.as_tensor(rng.normal(size=(3, d)))
    cov = torch.as_tensor(np.cov(latents.numpy().T, bias=True))  # the posterior mean by a linear solve
    solved = model.mu + 0.3 ** 0.5 * torch.linalg.solve(0.3 * cov + 0.7 * torch.eye(d, dtype=torch.float64),
                                                         (x_t - 0.3 ** 0.5 * model.mu).T).T @ cov
    torch.testing.assert_close(optimal_clean_estimate(model, x_t, 0.3), solved, atol=1e-8, rtol=0)
    fitted_lam = float(model.eigenvalues.mean())
    x = latents[:5]
    centred = x - model.mu
    mean, sd = expected_k0_first_step(model, x, 0.008)
    closed = -0.008 * fitted_lam / (0.008 * fitted_lam + 0.992) * (centred @ model.mu) / centred.pow(2).sum(1)
    torch.testing.assert_close(mean, closed, atol=2e-3, rtol=0)
    assert (sd > 0).all() and (expected_k0_forward(model, x, abar) > 0).all()


def test_premise_reference_reads_training_and_each_factor():
    rng = np.random.default_rng(2)
    pool = torch.as_tensor(rng.normal(size=(60, 4, 2, 2)) * 3 + 1, dtype=torch.float32)
    counts = np.r_[np.full(50, 1), np.full(10, 8)]
    probe = torch.cat([pool[:4], pool[50:54], torch.as_tensor(rng.normal(size=(3, 4, 2, 2)) * 3 + 1,
                                                              dtype=torch.float32)])
    dups = [1] * 4 + [8] * 4 + [0] * 3
    alpha_bar = torch.linspace(0.999, 0.004, 1000, dtype=torch.float64)
    out = premise_reference(pool, counts, probe, dups, [100, 800, 950], alpha_bar, 951, 700)
    assert set(out["k0_forward"]) == {"training", "0", "1", "8"} and out["model"]["kind"] == "full"
    model = fit_gaussian(pool, counts)
    grid = alpha_bar[[100, 800, 950]]
    per_t = expected_k0_forward(model, probe[4:8], grid).mean(0)
    np.testing.assert_allclose(out["k0_forward"]["8"], per_t.numpy(), atol=1e-9)
    assert out["k0_forward_early"]["8"] == pytest.approx(float(per_t[1:].mean()))
    assert out["first_step"]["alpha_bar"] == pytest.approx(float(alpha_bar[951]))
    assert abs(out["first_step"]["k0_mean"]["training"]) < 0.05 < out["k0_forward_early"]["training"]
