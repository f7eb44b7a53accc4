"""docs/science.md oracle checks, run through mem_analysis' own DDIM sampler and M1/M2 code."""
from __future__ import annotations

import pytest
import torch
from analysis_oracles import GaussianOracleUNet, OracleUNet, embeddings, gaussian_posterior_mean, oracle_eps
from diffusers import DDIMScheduler, DDPMScheduler

from mem_analysis import (
    alpha_bar_from_scheduler, clean_estimate, decompose_latents, denoising_losses, first_step_overestimation,
    forward_noise, gaussian_probe_metrics, noise_alignment, overestimation, probe_metrics, probe_metrics_over_draws,
    reference_schedule, sample_trajectories, schedule_deviation, snr, to_epsilon,
)
from mem_analysis.gaussian_reference import GaussianModel, expected_k0_first_step, expected_k0_forward
from mem_analysis.presets import SD_SCHEDULER
from mem_analysis.sd import SDComponents

LATENT = (4, 8, 8)


@pytest.fixture(scope="module")
def alpha_bar():
    return alpha_bar_from_scheduler(DDPMScheduler(**SD_SCHEDULER))


def oracle_components(x, alpha_bar, **kwargs):
    """SDComponents whose UNet is an OracleUNet (no text encoder or VAE needed with noise_fn / decode=False)."""
    sampler = DDIMScheduler(**SD_SCHEDULER)
    return SDComponents(OracleUNet(x, alpha_bar, **kwargs), None, None, None, DDPMScheduler(**SD_SCHEDULER), sampler)


def exact_noise_fn(x, alpha_bar, k=1.0, uncond_informative=True):
    """noise_fn for sample_trajectories: e_c has clean estimate k x_p; e_0 exact, or with clean estimate 0."""
    def noise_fn(latents, t, prompt_index, seed_index):
        e_c = oracle_eps(latents, k * x[prompt_index], alpha_bar[t].float())
        e_0 = oracle_eps(latents, x[prompt_index] if uncond_informative else torch.zeros_like(latents),
                         alpha_bar[t].float())
        return e_c, e_0
    return noise_fn


def test_alpha_bar_is_sd_scaled_linear_schedule(alpha_bar):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(alpha_bar, torch.cumprod(1 - betas, 0), rtol=1e-6, atol=1e-7)


def test_exact_oracle_from_pure_noise_follows_exact_schedule(alpha_bar):
    torch.manual_seed(0)
    x = torch.randn((2,) + LATENT)
    traj = sample_trajectories(oracle_components(x, alpha_bar), ["a", "b"], [100, 101, 102], num_inference_steps=20,
                               guidance_scale=7.5, batch_size=4, noise_fn=exact_noise_fn(x, alpha_bar), decode=False)
    for p in range(2):
        dec = decompose_latents(traj.x_t[p], x[p], traj.x_T[p])
        ref_x, ref_T = reference_schedule(traj.alpha_bar, "exact")
        torch.testing.assert_close(dec.w_x, ref_x.expand_as(dec.w_x), atol=2e-5, rtol=0)
        torch.testing.assert_close(dec.w_T, ref_T.expand_as(dec.w_T), atol=2e-5, rtol=0)
        assert dec.residual.max() < 1e-5
        exact = schedule_deviation(dec.w_x, dec.w_T, traj.alpha_bar, reference="exact")
        assert abs(exact.D_x) < 1e-4 and abs(exact.D_T) < 1e-4
        paper = schedule_deviation(dec.w_x, dec.w_T, traj.alpha_bar, reference="paper")
        # from pure noise the x content lags sqrt(abar) by c sqrt(1 - abar) at every step
        c = (traj.alpha_bar[0] / (1 - traj.alpha_bar[0])).sqrt()
        torch.testing.assert_close(paper.D_x, -(c * (1 - traj.alpha_bar).sqrt()).sum(), atol=1e-4, rtol=0)
        # k_c = 1 and L_c = 0 at every recorded step of every seed
        abar = traj.alpha_bar.float().expand(3, 20)
        k_c = overestimation(clean_estimate(traj.x_t[p], traj.e_c[p], abar), x[p])
        torch.testing.assert_close(k_c, torch.ones_like(k_c), atol=1e-4, rtol=0)
        torch.testing.assert_close(traj.final[p], x[p].expand(3, *LATENT), atol=1e-4, rtol=0)


def test_oracle_from_forward_noised_start_follows_paper_schedule(alpha_bar):
    torch.manual_seed(1)
    x = torch.randn((1,) + LATENT)
    traj = sample_trajectories(oracle_components(x, alpha_bar), ["a"], [100, 101, 102, 103], num_inference_steps=25,
                               guidance_scale=3.0, forward_noised_from=x[0], noise_fn=exact_noise_fn(x, alpha_bar),
                               decode=False)
    dec = decompose_latents(traj.x_t[0], x[0], traj.x_T[0])
    torch.testing.assert_close(dec.w_x, traj.alpha_bar.sqrt().expand_as(dec.w_x), atol=2e-5, rtol=0)
    torch.testing.assert_close(dec.w_T, (1 - traj.alpha_bar).sqrt().expand_as(dec.w_T), atol=2e-5, rtol=0)
    paper = schedule_deviation(dec.w_x, dec.w_T, traj.alpha_bar, early_steps=10)
    assert abs(paper.D_x) < 1e-4 and abs(paper.D_T) < 1e-4
    final_variant = decompose_latents(traj.x_t[0], x[0], traj.x_T[0], target="final", final=traj.final[0])
    torch.testing.assert_close(final_variant.w_x, dec.w_x, atol=1e-4, rtol=0)  # the final latent is x here


@pytest.mark.parametrize("k", [0.6, 1.3])
def test_k_scaled_oracle_and_cfg_amplification_through_sampler(alpha_bar, k):
    torch.manual_seed(2)
    x = torch.randn((2,) + LATENT)
    g = 7.5
    traj = sample_trajectories(oracle_components(x, alpha_bar), ["a", "b"], [100, 101], num_inference_steps=10,
                               guidance_scale=g, noise_fn=exact_noise_fn(x, alpha_bar, k, uncond_informative=False),
                               decode=False)
    abar = traj.alpha_bar.float().expand(2, 2, 10)
    k_c = overestimation(clean_estimate(traj.x_t, traj.e_c, abar), x)
    k_0 = overestimation(clean_estimate(traj.x_t, traj.e_0, abar), x)
    k_g = overestimation(clean_estimate(traj.x_t, traj.e_guided(), abar), x)
    torch.testing.assert_close(k_c, torch.full_like(k_c, k), atol=1e-4, rtol=0)
    torch.testing.assert_close(k_0, torch.zeros_like(k_0), atol=1e-4, rtol=0)
    torch.testing.assert_close(k_g, k_0 + g * (k_c - k_0), atol=1e-3, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_denoising_losses_with_k_oracle(alpha_bar, prediction_type):
    """L_c = SNR (1-k)^2 mean (x - mu)^2, L_0 = SNR mean (x - mu)^2, k_g = k_0 + g (k_c - k_0) with k_0 = 0,
    ||e_c - e_0|| = sqrt(SNR) k ||x - mu|| (e = (x_t - sqrt(abar) x0hat) / sqrt(1 - abar))."""
    torch.manual_seed(3)
    S, k = 3, 0.8
    x, mu = torch.randn((S,) + LATENT), 0.3 * torch.randn(LATENT)
    cond, uncond = embeddings(S)
    timesteps = torch.tensor([1, 250, 700, 999])
    noise = torch.randn((S, 4) + LATENT)
    unet = OracleUNet(x, alpha_bar, k=k, mu=mu, prediction_type=prediction_type)
    rows = probe_metrics(unet, x, cond, uncond, timesteps, noise, alpha_bar, (1.5, 3.0, 7.5), mu=mu,
                         prediction_type=prediction_type, chunk_size=5)
    snr_t = snr(alpha_bar[timesteps]).float()
    spread = (x - mu).pow(2).flatten(1).mean(1)[:, None]
    torch.testing.assert_close(rows["loss_cond"], snr_t * (1 - k) ** 2 * spread, rtol=2e-3, atol=1e-5)
    torch.testing.assert_close(rows["loss_uncond"], snr_t * spread, rtol=2e-3, atol=1e-5)
    torch.testing.assert_close(rows["k_cond"], torch.full((S, 4), k), atol=1e-3, rtol=0)
    torch.testing.assert_close(rows["k_uncond"], torch.zeros(S, 4), atol=1e-3, rtol=0)
    distance = (x - mu).flatten(1).norm(dim=1)[:, None]
    torch.testing.assert_close(rows["text_magnitude"], snr_t.sqrt() * k * distance, rtol=2e-3, atol=1e-5)
    for g, key in ((1.5, "1.5"), (3.0, "3"), (7.5, "7.5")):
        torch.testing.assert_close(rows[f"k_cfg_{key}"], rows["k_uncond"] + g * (rows["k_cond"] - rows["k_uncond"]),
                                   atol=1e-3, rtol=0)
        torch.testing.assert_close(rows[f"loss_cfg_{key}"], snr_t * (1 - g * k) ** 2 * spread, rtol=2e-3, atol=1e-5)


def test_exact_oracle_gives_zero_loss_and_theoretical_alignment(alpha_bar):
    torch.manual_seed(4)
    x = torch.randn((2,) + LATENT)
    cond, uncond = embeddings(2)
    timesteps = [50, 500, 950]
    result = denoising_losses(OracleUNet(x, alpha_bar), x, cond, uncond, timesteps, torch.randn((2, 3) + LATENT),
                              alpha_bar, (7.5,))
    assert result.loss_cond.abs().max() < 1e-8
    align = noise_alignment(result.e_c, result.e_0, x, result.x_t, result.alpha_bar)
    torch.testing.assert_close(align["fit_a_c"], align["theory_a"].expand(2, 3), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(align["fit_b_c"], align["theory_b"].expand(2, 3), rtol=1e-4, atol=1e-4)


def test_loss_identity(alpha_bar):
    """||eps - e||^2 = SNR_t ||x - x0hat(e)||^2 for any prediction e."""
    torch.manual_seed(5)
    x, eps, e = torch.randn((3,) + LATENT), torch.randn((3,) + LATENT), torch.randn((3,) + LATENT)
    abar = alpha_bar[torch.tensor([10, 400, 990])].float()
    x_t = forward_noise(x, eps, abar)
    lhs = (eps - e).pow(2).flatten(1).sum(1)
    rhs = snr(abar) * (x - clean_estimate(x_t, e, abar)).pow(2).flatten(1).sum(1)
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-4)


def test_v_prediction_converts_to_eps(alpha_bar):
    torch.manual_seed(6)
    x, eps = torch.randn((2,) + LATENT), torch.randn((2,) + LATENT)
    abar = alpha_bar[torch.tensor([100, 800])].float()
    a = abar[:, None, None, None]
    v = a.sqrt() * eps - (1 - a).sqrt() * x
    torch.testing.assert_close(to_epsilon(v, forward_noise(x, eps, abar), abar, "v_prediction"), eps,
                               rtol=1e-5, atol=1e-5)


def gaussian_data_model(seed: int = 7):
    """A Gaussian data model over LATENT (256 dims): mu of norm comparable to the spread, a rotated spectrum from 0.1
    to 30 (a few strong directions, as image latents have), and its covariance."""
    g = torch.Generator().manual_seed(seed)
    D = int(torch.tensor(LATENT).prod())
    mu = 0.5 * torch.randn(D, generator=g, dtype=torch.float64)
    eigenvalues = torch.logspace(-1, 1.5, D, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    cov = basis @ torch.diag(eigenvalues) @ basis.T
    return mu, eigenvalues, basis, cov


def draw_latents(n: int, mu, eigenvalues, basis, seed: int) -> torch.Tensor:
    """n latents from N(mu, basis diag(eigenvalues) basis^T), (n, *LATENT) float32."""
    z = torch.randn(n, len(mu), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (mu + (z * eigenvalues.sqrt()) @ basis.T).float().reshape((n,) + LATENT)


def analytic_k0(x, mu, cov, a: float):
    """By a linear solve (not the code's eigenbasis): E k_0 of the optimal Gaussian denoiser on forward-noised x,
    `a (x - mu)^T cov (a cov + (1 - a) I)^{-1} (x - mu) / ||x - mu||^2`, and from a pure-noise input at abar a,
    mean `-sqrt(a) <M mu, x - mu> / ||x - mu||^2` and sd `||M (x - mu)|| / ||x - mu||^2`, M = sqrt(a) cov (...)^{-1}."""
    c = x.double().reshape(len(x), -1) - mu
    gain = a ** 0.5 * cov @ torch.linalg.inv(a * cov + (1 - a) * torch.eye(len(mu), dtype=torch.float64))
    norm2 = c.pow(2).sum(1)
    forward = a ** 0.5 * ((c @ gain.T) * c).sum(1) / norm2
    first_mean = -(a ** 0.5) * (c @ (gain @ mu)) / norm2
    first_sd = (c @ gain.T).norm(dim=1) / norm2
    return forward, first_mean, first_sd


def test_gaussian_denoiser_gives_k0_near_zero_at_the_first_step_and_the_shrinkage_on_forward_noised_latents(alpha_bar):
    """The optimal denoiser of a Gaussian data model memorizes nothing. Through the project's sampler (20 DDIM steps
    from pure noise, 64 seeds) its first prediction has k_0 ~ 0 (per sample the analytic mean, about 0); fed
    forward-noised training latents it gives the linear-Gaussian shrinkage, far from 0 at high noise. The
    conditional branch here returns x exactly: k_c = 1 and k_g = k_0 + g (1 - k_0) at the first step."""
    mu, eigenvalues, basis, cov = gaussian_data_model()
    x = draw_latents(16, mu, eigenvalues, basis, seed=8)
    g, seeds = 7.5, list(range(64))

    def noise_fn(latents, t, prompt_index, seed_index):
        abar = alpha_bar[t].float()
        return (oracle_eps(latents, x[prompt_index], abar),
                oracle_eps(latents, gaussian_posterior_mean(latents, abar, mu, cov), abar))

    components = oracle_components(x, alpha_bar)
    traj = sample_trajectories(components, [str(i) for i in range(16)], seeds, num_inference_steps=20,
                               guidance_scale=g, batch_size=256, noise_fn=noise_fn, decode=False)
    a0 = float(traj.alpha_bar[0])
    assert int(traj.timesteps[0]) > 900 and a0 < 0.01  # the sampler's first step: pure noise at high t
    mu_latent = mu.float().reshape(LATENT)
    first = [first_step_overestimation(traj.x_t[p][:, 0], traj.e_c[p][:, 0], traj.e_0[p][:, 0], a0, x[p], mu_latent, g)
             for p in range(16)]
    k0 = torch.stack([f["k0_first"] for f in first])  # (prompts, seeds)
    assert abs(float(k0.mean())) < 0.02
    _, mean, sd = analytic_k0(x, mu, cov, a0)
    assert (k0.mean(1).double() - mean).abs().max() < 4 * sd.max() / 8 + 1e-3  # 4 standard errors over 64 seeds
    for f in first:
        torch.testing.assert_close(f["kc_first"], torch.ones(64), atol=1e-4, rtol=0)
        torch.testing.assert_close(f["kg_first"], f["k0_first"] + g * (1 - f["k0_first"]), atol=1e-3, rtol=0)

    timesteps = torch.tensor([250, 750, 850, 950])
    unet = GaussianOracleUNet(x, alpha_bar, mu, cov)
    cond, uncond = embeddings(16)
    ids = list(range(16))
    forward = probe_metrics_over_draws(unet, x, cond, uncond, timesteps, ids, 0, alpha_bar, draws=16,
                                       guidance_scales=(), mu=mu_latent, chunk_size=256)
    gauss = probe_metrics_over_draws(unet, x, cond, uncond, timesteps, ids, 0, alpha_bar, draws=16,
                                     metrics=gaussian_probe_metrics, mu=mu_latent, chunk_size=256)
    for j, t in enumerate(timesteps.tolist()):
        a = float(alpha_bar[t])
        shrinkage, gauss_mean, _ = analytic_k0(x, mu, cov, a)
        assert abs(float(forward["k_uncond"][:, j].mean()) - float(shrinkage.mean())) < 0.02, t
        assert abs(float(gauss["k_uncond"][:, j].mean()) - float(gauss_mean.mean())) < 0.02, t
        torch.testing.assert_close(gauss["k_cond"][:, j], torch.ones(16), atol=1e-3, rtol=0)
        model = GaussianModel(mu, eigenvalues, basis, "full", 0)  # the code's eigenbasis formula, same answer
        torch.testing.assert_close(expected_k0_forward(model, x, [a])[:, 0], shrinkage, atol=1e-6, rtol=0)
        torch.testing.assert_close(expected_k0_first_step(model, x, a)[0], gauss_mean, atol=1e-6, rtol=0)
    high = float(forward["k_uncond"][:, 1:].mean())
    assert high > 0.1  # forward-noised latents still hold x at t >= 750: the probe's k_0 is not the premise's


def test_first_step_k_of_a_memorizing_conditional_branch_and_uninformative_cfg(alpha_bar):
    """e_c whose clean estimate is x, e_0 whose clean estimate is mu (no x): at the first step from pure noise
    k_c = 1, k_0 = 0 and k_g = g (the revised Corollary 3, x0hat_T(c; g) = mu + g (x - mu)), per seed."""
    torch.manual_seed(9)
    x, mu = torch.randn((3,) + LATENT), 0.4 * torch.randn(LATENT)
    g = 5.0

    def noise_fn(latents, t, prompt_index, seed_index):
        abar = alpha_bar[t].float()
        return oracle_eps(latents, x[prompt_index], abar), oracle_eps(latents, mu.expand_as(latents), abar)

    traj = sample_trajectories(oracle_components(x, alpha_bar), ["a", "b", "c"], [0, 1, 2, 3], num_inference_steps=10,
                               guidance_scale=g, noise_fn=noise_fn, decode=False)
    for p in range(3):
        k = first_step_overestimation(traj.x_t[p][:, 0], traj.e_c[p][:, 0], traj.e_0[p][:, 0],
                                      float(traj.alpha_bar[0]), x[p], mu, g)
        torch.testing.assert_close(k["kc_first"], torch.ones(4), atol=1e-4, rtol=0)
        torch.testing.assert_close(k["k0_first"], torch.zeros(4), atol=1e-4, rtol=0)
        torch.testing.assert_close(k["kg_first"], torch.full((4,), g), atol=1e-3, rtol=0)


def test_dataset_mean_counts_each_duplicate_as_a_training_row():
    """Two unique latents seen 1 and 3 times: mu = (x_1 + 3 x_2) / 4, the mean over the 4 rows written out."""
    from mem_analysis.losses import dataset_mean

    unique = torch.randn(2, 4, 8, 8)
    rows = torch.stack([unique[0], unique[1], unique[1], unique[1]])
    torch.testing.assert_close(dataset_mean(unique, [1, 3]), rows.mean(0))
    with pytest.raises(ValueError, match="one positive-sum count per row"):
        dataset_mean(unique, [1, 2, 3])
