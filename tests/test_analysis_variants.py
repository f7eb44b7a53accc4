"""Known-answer tests of the measurement variants: x0-space loss, noise draws, uncentred k, the centred
decomposition, D's sign / window / reduction / latent range, alignment with x_T, and the honest statistics."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from analysis_oracles import OracleUNet, embeddings, oracle_eps
from diffusers import DDIMScheduler, DDPMScheduler

from mem_analysis import (
    alpha_bar_from_scheduler, auroc, decompose_latents, detection, deviation_values, disattenuated, noise_alignment,
    probe_metrics, probe_metrics_over_draws, probe_noise, reference_schedule, sample_trajectories, schedule_deviation,
    snr, spearman_brown, split_half_reliability, trajectory_latents,
)
from mem_analysis.presets import SD_SCHEDULER
from mem_analysis.sd import SDComponents

LATENT = (4, 8, 8)


@pytest.fixture(scope="module")
def alpha_bar():
    return alpha_bar_from_scheduler(DDPMScheduler(**SD_SCHEDULER))


def orthonormal(n: int, shape=LATENT, seed: int = 0) -> list[torch.Tensor]:
    """n orthonormal latents (QR of a random matrix), float64."""
    q, _ = torch.linalg.qr(torch.randn(math.prod(shape), n, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    return [q[:, i].reshape(shape) for i in range(n)]


def synthetic_trajectory(x, x_T, w_x, w_T, mu=None, w_mu=None):
    """x_t[n, k] = w_x[k] (x or x - mu) + w_mu[k] mu + w_T[k] x_T[n] exactly, (N, K, *latent)."""
    base = x if mu is None else x - mu
    traj = w_x[None, :, None, None, None] * base + w_T[None, :, None, None, None] * x_T[:, None]
    if mu is not None:
        traj = traj + w_mu[None, :, None, None, None] * mu
    return traj


# --- M1: the loss in x0 space, and several noise draws ---------------------------------------------------------

def test_x0_loss_is_eps_loss_over_snr_and_has_the_k_oracle_value(alpha_bar):
    """k-oracle: x0hat_g - x = (g k - 1)(x - mu) exactly, so L_x0 = (1 - g k)^2 mean (x - mu)^2 at every t."""
    torch.manual_seed(0)
    S, k, T = 2, 0.8, torch.tensor([20, 500, 980])
    x = torch.randn((S,) + LATENT)
    mu = 0.5 * x.mean(0) + 0.1 * torch.randn(LATENT)  # shared content: the uncentred k differs from the centred
    cond, uncond = embeddings(S)
    rows = probe_metrics(OracleUNet(x, alpha_bar, k=k, mu=mu), x, cond, uncond, T, torch.randn((S, 3) + LATENT),
                         alpha_bar, (3.0,), mu=mu)
    spread = (x - mu).pow(2).flatten(1).mean(1)[:, None].expand(S, 3)
    torch.testing.assert_close(rows["loss_cond_x0"], (1 - k) ** 2 * spread, rtol=2e-3, atol=1e-6)
    torch.testing.assert_close(rows["loss_uncond_x0"], spread, rtol=2e-3, atol=1e-6)
    torch.testing.assert_close(rows["loss_cfg_3_x0"], (1 - 3 * k) ** 2 * spread, rtol=2e-3, atol=1e-6)
    snr_t = snr(alpha_bar[T]).float()
    for key in ("cond", "uncond", "cfg_3"):
        torch.testing.assert_close(rows[f"loss_{key}_x0"], rows[f"loss_{key}"] / snr_t, rtol=2e-3, atol=1e-6)
    # uncentred k (the paper's x0hat = k x): <mu + k (x - mu), x> / ||x||^2, by hand
    xx, mx = x.pow(2).flatten(1).sum(1), (mu * x).flatten(1).sum(1)
    torch.testing.assert_close(rows["k_cond_uncentred"], ((mx + k * (xx - mx)) / xx)[:, None].expand(S, 3),
                               rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(rows["k_uncond_uncentred"], (mx / xx)[:, None].expand(S, 3), rtol=1e-3, atol=1e-4)
    assert not torch.allclose(rows["k_cond_uncentred"], rows["k_cond"], atol=1e-2)  # mu != 0: they differ


class LinearUNet(torch.nn.Module):
    """Toy denoiser `e = b x_t` (the same with or without the caption)."""

    def __init__(self, b: float):
        super().__init__()
        self.b = torch.nn.Parameter(torch.tensor(float(b)))

    def forward(self, sample, timestep, encoder_hidden_states):
        return SimpleNamespace(sample=self.b * sample)


def test_noise_draws_average_toward_the_analytic_expectation(alpha_bar):
    """Linear toy `e = b x_t`: x0hat = c x_t, c = (1 - sqrt(1 - a) b) / sqrt(a), so
    E mean (x - x0hat)^2 = (1 - c sqrt(a))^2 mean x^2 + c^2 (1 - a) over the noise."""
    torch.manual_seed(1)
    b, t = 0.5, 600
    x = torch.randn((1,) + LATENT)
    cond, uncond = embeddings(1)
    a = float(alpha_bar[t])
    c = (1 - math.sqrt(1 - a) * b) / math.sqrt(a)
    expected = (1 - c * math.sqrt(a)) ** 2 * float(x.pow(2).mean()) + c ** 2 * (1 - a)
    unet = LinearUNet(b)
    one = probe_metrics_over_draws(unet, x, cond, uncond, [t], [7], 3, alpha_bar, draws=1)["loss_cond_x0"].item()
    many = probe_metrics_over_draws(unet, x, cond, uncond, [t], [7], 3, alpha_bar, draws=48)["loss_cond_x0"].item()
    assert abs(many - expected) / expected < 0.02
    # draws=1 is exactly the training probes' noise (draw 0); other draws are new noise
    direct = probe_metrics(unet, x, cond, uncond, [t], probe_noise([7], [t], LATENT, 3), alpha_bar)["loss_cond_x0"]
    assert one == direct.item()
    assert not torch.equal(probe_noise([7], [t], LATENT, 3, draw=1), probe_noise([7], [t], LATENT, 3))
    with pytest.raises(ValueError, match="draws must be"):
        probe_metrics_over_draws(unet, x, cond, uncond, [t], [7], 3, alpha_bar, draws=0)


# --- M4: decomposition and deviation ----------------------------------------------------------------------------

def test_deviation_signs_early_window_and_reduction():
    """w_x above the reference by 0.2 on late steps only, w_T below it by 0.1 everywhere (noise suppressed)."""
    x, x_T0, x_T1 = orthonormal(3)
    x_T = torch.stack([x_T0, x_T1])
    abar = torch.linspace(0.05, 0.95, 8, dtype=torch.float64)
    ref_x, ref_T = reference_schedule(abar, "paper")
    bump = torch.tensor([0.0] * 3 + [0.2] * 5, dtype=torch.float64)
    dec = decompose_latents(synthetic_trajectory(x, x_T, ref_x + bump, ref_T - 0.1), x, x_T)
    torch.testing.assert_close(dec.w_x, (ref_x + bump).expand(2, 8))
    full = schedule_deviation(dec.w_x, dec.w_T, abar)
    early = schedule_deviation(dec.w_x, dec.w_T, abar, early_steps=3)
    assert math.isclose(full.D_x, 1.0, abs_tol=1e-9) and math.isclose(full.D_T, 0.8, abs_tol=1e-9)  # D_T > 0
    assert math.isclose(early.D_x, 0.0, abs_tol=1e-9) and math.isclose(early.D_T, 0.3, abs_tol=1e-9)
    mean = schedule_deviation(dec.w_x, dec.w_T, abar, reduction="mean")
    assert math.isclose(mean.D_x, 1.0 / 8, abs_tol=1e-9) and math.isclose(mean.D_T, 0.1, abs_tol=1e-9)
    values = deviation_values(dec, abar, early_steps=3, references=("paper",))
    assert values == pytest.approx({"D_x": 1.0, "D_T": 0.8, "D_x_mean": 0.125, "D_T_mean": 0.1,
                                    "D_x_early": 0.0, "D_T_early": 0.3, "D_x_mean_early": 0.0, "D_T_mean_early": 0.1})
    with pytest.raises(ValueError, match="unknown reduction"):
        schedule_deviation(dec.w_x, dec.w_T, abar, reduction="median")


def test_final_target_regresses_on_the_generated_latent():
    x, f, x_T0 = orthonormal(3, seed=1)
    x_T = x_T0[None]
    w_x, w_T = torch.linspace(0.1, 0.9, 5, dtype=torch.float64), torch.linspace(0.9, 0.1, 5, dtype=torch.float64)
    traj = synthetic_trajectory(f, x_T, w_x, w_T)  # built on the final latent f, orthogonal to x
    on_final = decompose_latents(traj, x, x_T, target="final", final=f[None])
    on_training = decompose_latents(traj, x, x_T)
    torch.testing.assert_close(on_final.w_x[0], w_x)
    torch.testing.assert_close(on_training.w_x[0], torch.zeros(5, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(on_training.w_T[0], w_T)
    # what the training latent cannot explain is w_x f: RMSE per element w_x ||f|| / sqrt(256) = w_x / 16
    torch.testing.assert_close(on_training.residual[0], w_x / 16)
    assert on_final.residual.max() < 1e-9


def test_centred_basis_keeps_shared_mean_content_off_w_x():
    """x_t = w (x - mu) + v mu + u x_T: the centred fit returns (w, v, u); the uncentred w_x absorbs mu."""
    e1, e2, e3 = orthonormal(3, seed=2)
    x, mu = e1 + 2 * e2, 2 * e2  # x - mu = e1: the image's own content; mu = shared content
    x_T = e3[None]
    abar = torch.linspace(0.1, 0.9, 6, dtype=torch.float64)
    ref_x, ref_T = reference_schedule(abar)
    w_mu = torch.full((6,), 1.0, dtype=torch.float64)  # the mean fully present at every step
    traj = synthetic_trajectory(x, x_T, ref_x, ref_T, mu=mu, w_mu=w_mu)
    centred = decompose_latents(traj, x, x_T, mu=mu)
    torch.testing.assert_close(centred.w_x[0], ref_x)
    torch.testing.assert_close(centred.w_mu[0], w_mu)
    torch.testing.assert_close(centred.w_T[0], ref_T)
    assert abs(schedule_deviation(centred.w_x, centred.w_T, abar).D_x) < 1e-9
    # uncentred (x_T is orthogonal to x): w_x = <x_t, x> / ||x||^2 = (ref_x <x - mu, x> + w_mu <mu, x>) / 5
    plain = decompose_latents(traj, x, x_T)
    by_hand = (ref_x * 1 + w_mu * 4) / 5
    torch.testing.assert_close(plain.w_x[0], by_hand)
    assert schedule_deviation(plain.w_x, plain.w_T, abar).D_x > 1.0


def test_output_latents_follow_the_exact_schedule_from_the_first_input(alpha_bar):
    """An exact oracle from pure noise: the outputs x_{T-1}..x_0 (with DDIM's final abar) follow the exact
    schedule anchored at the first input's abar, so D = 0 over outputs as over inputs."""
    torch.manual_seed(3)
    x = torch.randn((1,) + LATENT)
    sampler = DDIMScheduler(**SD_SCHEDULER, set_alpha_to_one=False)
    components = SDComponents(OracleUNet(x, alpha_bar), None, None, None, DDPMScheduler(**SD_SCHEDULER), sampler)

    def noise_fn(latents, t, prompt_index, seed_index):
        e = oracle_eps(latents, x[prompt_index], alpha_bar[t].float())
        return e, e

    traj = sample_trajectories(components, ["a"], [5, 6], num_inference_steps=10, guidance_scale=7.5,
                               noise_fn=noise_fn, decode=False)
    assert traj.final_alpha_bar == pytest.approx(float(alpha_bar[0]))
    outputs, abar_out = trajectory_latents(traj.x_t[0], traj.final[0], traj.alpha_bar, traj.final_alpha_bar,
                                           latents="outputs")
    torch.testing.assert_close(outputs[:, :-1], traj.x_t[0][:, 1:])
    assert abar_out[-1] == pytest.approx(float(alpha_bar[0])) and len(abar_out) == 10
    dec = decompose_latents(outputs, x[0], traj.x_T[0])
    exact = schedule_deviation(dec.w_x, dec.w_T, abar_out, reference="exact", alpha_bar_start=traj.alpha_bar[0])
    assert abs(exact.D_x) < 1e-4 and abs(exact.D_T) < 1e-4
    wrong_anchor = schedule_deviation(dec.w_x, dec.w_T, abar_out, reference="exact")
    assert abs(wrong_anchor.D_T) > 1e-2  # anchoring on the first output's abar would be wrong
    inputs, abar_in = trajectory_latents(traj.x_t[0], traj.final[0], traj.alpha_bar)
    assert torch.equal(inputs, traj.x_t[0]) and torch.equal(abar_in, traj.alpha_bar)
    with pytest.raises(ValueError, match="unknown latents"):
        trajectory_latents(traj.x_t[0], traj.final[0], traj.alpha_bar, latents="both")


# --- M3: alignment with known answers ----------------------------------------------------------------------------

def test_noise_alignment_on_constructed_predictions():
    """Orthonormal x, x_t, x_T, e4: e_c = x + x_t, e_0 = x_T, mu = e4 / 2, abar = 0.5."""
    x, x_t, x_T, e4 = orthonormal(4, seed=4)
    mu = 0.5 * e4
    e_c, e_0 = (x + x_t)[None], x_T[None]
    out = noise_alignment(e_c, e_0, x, x_t[None], torch.tensor([0.5]), mu=mu, x_T=x_T[None])
    s2, s3 = 1 / math.sqrt(2), 1 / math.sqrt(3)
    expected = {"cos_c_x": s2, "cos_0_x": 0.0, "cos_diff_x": s3,
                "cos_c_xmu": 1 / math.sqrt(2 * 1.25), "cos_0_xmu": 0.0, "cos_diff_xmu": 1 / math.sqrt(3 * 1.25),
                "cos_c_xT": 0.0, "cos_0_xT": 1.0, "cos_diff_xT": -s3,
                "fit_a_c": 1.0, "fit_b_c": 1.0, "fit_a_0": 0.0, "fit_b_0": 0.0,
                "theory_a": -1.0, "theory_b": math.sqrt(2)}
    assert set(out) == set(expected)
    for key, value in expected.items():
        assert float(out[key][0]) == pytest.approx(value, abs=1e-6), key  # x is aligned in float32


# --- M7: direction, TPR at low FPR, reliability ------------------------------------------------------------------

def test_auroc_direction_and_tpr_label_follow_the_number_of_negatives():
    scores, labels = [1.0, 2.0, 3.0, 4.0], [1, 1, 0, 0]
    assert auroc(scores, labels) == 0.0 and auroc(scores, labels, "lower") == 1.0
    few = detection([5.0, 3.0, 4.0, 1.0, 2.0], [1, 1, 0, 0, 0])
    # tau = 5 admits no negative and one of two positives; any lower tau admits the negative at 4;
    # pairs (pos > neg): 5 beats all 3 negatives, 3 beats 2 of them: AUROC 5 / 6
    assert few["tpr_label"] == "TPR at 0 FP (3 negatives)" and few["tpr"] == 0.5
    assert few["auroc"] == pytest.approx(5 / 6) and few["direction"] == "higher"
    many = detection(list(range(100)) + [99.5, 98.5, 50.0], [0] * 100 + [1] * 3)
    # tau = 98.5 admits 1 of 100 negatives (1% FPR) and 2 of 3 positives
    assert many["tpr_label"] == "TPR at 1% FPR" and many["tpr"] == pytest.approx(2 / 3)
    lower = detection([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0], "lower")  # diversity: lower = memorized
    assert lower["auroc"] == 1.0 and lower["tpr"] == 1.0
    with pytest.raises(ValueError, match="direction must be"):
        auroc(scores, labels, "up")


def test_split_half_reliability_and_disattenuation_by_hand():
    # seeds 0 and 1 give [1, 2, 3, 4] and [1, 3, 2, 4]: r = 4 / 5 = 0.8; Spearman-Brown 1.6 / 1.8
    values = np.array([[1, 1], [2, 3], [3, 2], [4, 4]], dtype=float)
    rel = split_half_reliability(values)
    assert rel["r_half"] == pytest.approx(0.8) and rel["reliability"] == pytest.approx(1.6 / 1.8)
    assert spearman_brown(0.5, 3) == pytest.approx(1.5 / 2)
    assert disattenuated(0.45, 0.9, 0.5) == pytest.approx(0.45 / math.sqrt(0.45))
    assert disattenuated(0.45, -0.1) is None and disattenuated(0.45, None) is None
    assert split_half_reliability(np.ones((5, 4)))["reliability"] is None  # constant: undefined
    with pytest.raises(ValueError, match="at least 2 seeds"):
        split_half_reliability(np.ones((5, 1)))


def test_split_half_reliability_recovers_a_known_reliability():
    """True value var 1, seed noise var 4, 4 seeds: the mean's reliability is 1 / (1 + 4 / 4) = 0.5."""
    rng = np.random.default_rng(0)
    true = rng.normal(size=(20000, 1))
    values = true + rng.normal(scale=2.0, size=(20000, 4))
    rel = split_half_reliability(values)
    assert rel["r_half"] == pytest.approx(1 / 3, abs=0.02) and rel["reliability"] == pytest.approx(0.5, abs=0.02)
    # the disattenuated correlation of the noisy mean with the true value recovers 1
    r = float(np.corrcoef(values.mean(1), true[:, 0])[0, 1])
    assert r == pytest.approx(math.sqrt(0.5), abs=0.02)
    assert disattenuated(r, rel["reliability"]) == pytest.approx(1.0, abs=0.03)
