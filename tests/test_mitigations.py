"""Mitigations (mem_analysis/mitigations.py): the pure pieces against constructed cases, the guidance
schedules through the project's own DDIM sampler with an oracle denoiser, and the distribution distances."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from analysis_oracles import OracleUNet, oracle_eps
from diffusers import DDIMScheduler, DDPMScheduler

from mem_analysis import alpha_bar_from_scheduler, sample_trajectories
from mem_analysis.alignment import guidance_norm
from mem_analysis.mitigations import (augment_caption, dedup_sampling_weights, guidance_scales, kept_mean,
                                      parse_guidance_schedule, read_wen_thresholds, wen_epsilon_magnitude,
                                      wen_filter_weights, wen_threshold_curve,
                                      wen_threshold_table)
from mem_analysis.schedule import clean_estimate, snr
from mem_analysis.presets import SD_SCHEDULER
from mem_analysis.sd import SDComponents
from mem_analysis.stats import frechet_distance, mean_interval, median_distance, mmd_squared

LATENT = (4, 8, 8)


def test_wen_filter_zeroes_exactly_the_examples_over_the_threshold():
    e_0 = torch.randn(5, *LATENT)
    direction = torch.randn(LATENT)
    direction /= direction.norm()
    norms = torch.tensor([0.5, 2.0, 1.0, 3.5, 0.0])  # constructed ||e_c - e_0||; 1.0 sits on the threshold
    e_c = e_0 + norms[:, None, None, None] * direction
    magnitudes = guidance_norm(e_c, e_0)
    torch.testing.assert_close(magnitudes, norms, atol=1e-5, rtol=0)
    weights = wen_filter_weights(magnitudes, thresholds=1.0 + 1e-4)
    assert weights.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    per_example = torch.tensor([0.4, 2.5, 0.9, 3.0, 1.0])  # one threshold per example (its timestep's)
    assert wen_filter_weights(magnitudes, per_example).tolist() == [0.0, 1.0, 0.0, 0.0, 1.0]


def test_wen_window_reports_the_filtered_share_per_factor_and_the_mean_magnitude_on_cpu():
    """The logged train/wen_* scalars: shares of the examples seen in the window, per factor, then a new window."""
    from types import SimpleNamespace

    from train.finetune_loss import WenWindow

    row_factors = [1, 1, 1, 64, 64, 16]  # the dup_factor of train rows 0..5
    window, accelerator = WenWindow(torch.device("cpu"), row_factors), SimpleNamespace(num_processes=1)
    window.add(torch.tensor([1.0, 5.0, 3.0, 7.0]), torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0, 3, 1, 4]))
    window.add(torch.tensor([5.0, 5.0]), torch.tensor([0.0, 0.0]), torch.tensor([5, 2]))  # the whole batch filtered
    values = window.read(accelerator)
    assert values == pytest.approx({"wen_filtered_share": 4 / 6, "wen_magnitude_mean": 26 / 6,
                                    "wen_fully_filtered_processes": 0.5, "wen_filtered_share/dup_1": 1 / 3,
                                    "wen_filtered_share/dup_64": 1.0, "wen_filtered_share/dup_16": 1.0})
    assert window.read(accelerator)["wen_magnitude_mean"] == 0.0  # the window starts anew


def test_kept_mean_averages_over_the_kept_examples_and_is_zero_with_a_gradient_when_none_is_kept():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    mean = kept_mean(losses, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert mean.item() == pytest.approx((1.0 + 3.0) / 2)  # over the 2 kept, not the batch of 4
    mean.backward()
    assert losses.grad.tolist() == [0.5, 0.0, 0.5, 0.0]
    losses.grad = None
    none_kept = kept_mean(losses, torch.zeros(4))
    none_kept.backward()  # defined: the process still runs its backward (DDP / ZeRO never wait on it)
    assert none_kept.item() == 0.0 and losses.grad.tolist() == [0.0] * 4
    assert kept_mean(losses.detach(), torch.ones(4)).item() == pytest.approx(2.5)


def sd_alpha_bar() -> np.ndarray:
    """SD's scaled-linear schedule, abar_t for t = 0..999."""
    return alpha_bar_from_scheduler(DDPMScheduler(**SD_SCHEDULER)).numpy()


def test_text_magnitude_is_root_snr_times_the_clean_estimates_distance():
    """||e_c - e_0|| = sqrt(SNR_t) ||x0hat(e_c) - x0hat(e_0)||, whatever x_t: why one T cannot fit every t."""
    alpha_bar = torch.tensor([0.999, 0.9, 0.3, 0.01], dtype=torch.float64)
    x_t, e_c, e_0 = (torch.randn(4, *LATENT, dtype=torch.float64) for _ in range(3))
    x0_gap = (clean_estimate(x_t, e_c, alpha_bar) - clean_estimate(x_t, e_0, alpha_bar)).flatten(1).norm(dim=1)
    torch.testing.assert_close(guidance_norm(e_c, e_0).double(), snr(alpha_bar).sqrt() * x0_gap,
                               rtol=1e-5, atol=0)


def test_v_prediction_magnitude_is_the_epsilon_space_one():
    """A v-model that predicts v = sqrt(abar) e - sqrt(1 - abar) x0hat(e) for known e_c, e_0 (its definition)
    gives, converted, ||e_c - e_0||: the filter and the probes' calibration live in one space."""
    alpha_bar = torch.tensor([0.95, 0.5, 0.02])
    x_t, e_c, e_0 = (torch.randn(3, *LATENT) for _ in range(3))
    a = alpha_bar[:, None, None, None]

    def v_of(e):
        return a.sqrt() * e - (1 - a).sqrt() * clean_estimate(x_t, e, alpha_bar)

    expected = (e_c - e_0).flatten(1).norm(dim=1)
    torch.testing.assert_close(wen_epsilon_magnitude(v_of(e_c), v_of(e_0), x_t, alpha_bar, "v_prediction"), expected,
                               rtol=1e-4, atol=1e-4)
    # it is sqrt(abar_t) ||v_c - v_0||, not the raw v-space norm the filter used to threshold
    torch.testing.assert_close(expected, alpha_bar.sqrt() * (v_of(e_c) - v_of(e_0)).flatten(1).norm(dim=1),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(wen_epsilon_magnitude(e_c, e_0, x_t, alpha_bar, "epsilon"), expected)


def planted_magnitudes(rng):
    """Never-duplicated magnitudes sqrt(SNR_t) * 0.3 * lognormal(0, 0.1) at the probe grid (200 per t), and
    planted rows at t >= 750 three times the null's median there: above every null value of their own t,
    below the low-noise values that set a pooled quantile."""
    alpha_bar = sd_alpha_bar()
    grid = np.arange(50, 1000, 100)
    scale = np.sqrt(alpha_bar[grid] / (1 - alpha_bar[grid])) * 0.3
    t_null = np.repeat(grid, 200)
    m_null = np.repeat(scale, 200) * rng.lognormal(0.0, 0.1, t_null.size)
    t_planted = np.repeat(grid[grid >= 750], 5)
    m_planted = 3 * np.sqrt(alpha_bar[t_planted] / (1 - alpha_bar[t_planted])) * 0.3
    return alpha_bar, grid, t_null, m_null, t_planted, m_planted


def test_per_timestep_threshold_filters_the_planted_rows_where_a_pooled_one_filters_none():
    alpha_bar, grid, t_null, m_null, t_planted, m_planted = planted_magnitudes(np.random.default_rng(0))
    pooled = np.quantile(m_null, 0.95)
    assert wen_filter_weights(torch.tensor(m_planted), pooled).tolist() == [1.0] * len(m_planted)  # keeps them all
    table_t, table_T = wen_threshold_table(t_null, m_null, 0.95)
    assert table_t.tolist() == grid.tolist()
    for t, T in zip(table_t, table_T):
        assert T == pytest.approx(np.quantile(m_null[t_null == t], 0.95))
    curve = wen_threshold_curve(table_t, table_T, alpha_bar)
    assert wen_filter_weights(torch.tensor(m_planted), torch.tensor(curve[t_planted])).sum() == 0  # removes them all
    null_filtered = 1 - wen_filter_weights(torch.tensor(m_null), torch.tensor(curve[t_null])).numpy()
    for t in grid:  # 5 % of ordinary images at every timestep, by construction of the quantile
        assert null_filtered[t_null == t].mean() == pytest.approx(0.05, abs=0.006)


def test_threshold_curve_is_exact_at_the_grid_and_linear_on_the_x0_scale_between():
    alpha_bar = sd_alpha_bar()
    root_snr = np.sqrt(alpha_bar / (1 - alpha_bar))
    grid, thresholds = np.array([100, 300]), np.array([2.0, 0.5])
    curve = wen_threshold_curve(grid, thresholds, alpha_bar)
    assert curve[100] == pytest.approx(2.0) and curve[300] == pytest.approx(0.5)
    x0_scale = curve / root_snr
    assert x0_scale[200] == pytest.approx((2.0 / root_snr[100] + 0.5 / root_snr[300]) / 2)
    assert x0_scale[0] == pytest.approx(2.0 / root_snr[100]) and x0_scale[999] == pytest.approx(0.5 / root_snr[300])
    assert curve[0] > 3 * curve[100]  # sqrt(SNR) grows steeply toward t = 0, and the threshold with it
    assert wen_threshold_curve([500], [1.5], alpha_bar)[500] == pytest.approx(1.5)


def test_threshold_file_is_read_back_and_a_bad_one_is_one_line(tmp_path):
    good = tmp_path / "t.json"
    good.write_text(json.dumps({"space": "epsilon", "timesteps": [50, 950], "thresholds": [3.0, 0.2]}))
    grid, thresholds = read_wen_thresholds(good)
    assert grid.tolist() == [50, 950] and thresholds.tolist() == [3.0, 0.2]
    for name, content in (("missing.json", None), ("text.json", "not json"),
                          ("order.json", {"timesteps": [950, 50], "thresholds": [1, 1]}),
                          ("count.json", {"timesteps": [50], "thresholds": [1, 2]}),
                          ("space.json", {"space": "v", "timesteps": [50], "thresholds": [1]})):
        path = tmp_path / name
        if content is not None:
            path.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(ValueError) as err:
            read_wen_thresholds(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("kind", ["rand_word_add", "rand_word_repeat", "rand_numbers_add", "multiple_captions"])
def test_caption_augmentation_is_a_function_of_the_generator_and_changes_only_at_rate_p(kind):
    caption, vocab, others = "a smiling face with hearts", ["zebra", "quartz", "violin"], ["hearts smiling", "grin"]
    draw = lambda key, p=0.3: augment_caption(caption, kind, p, np.random.default_rng(key), vocab, others)  # noqa: E731
    first = [draw([0, 1, i]) for i in range(400)]
    assert first == [draw([0, 1, i]) for i in range(400)]  # same keys, same captions
    changed = [c for c in first if c != caption]
    assert 0.2 < len(changed) / 400 < 0.4  # rate p = 0.3
    assert all(draw([0, 1, i], p=0.0) == caption for i in range(50))
    for text in changed:
        words = text.split(" ")
        if kind == "rand_word_add":
            assert len(words) == 7 and set(words) - set(caption.split()) <= set(vocab)
        elif kind == "rand_word_repeat":
            assert len(words) == 7 and set(words) == set(caption.split())
        elif kind == "rand_numbers_add":
            added = [w for w in words if w.isdigit()]
            assert len(words) == 6 and len(added) == 1 and 0 <= int(added[0]) < 10 ** 6
        else:
            assert text in others
    assert augment_caption(caption, None, 1.0, np.random.default_rng(0)) == caption


def test_dedup_weights_give_every_unique_image_the_same_mass():
    factors = [1, 4, 4, 4, 4, 1, 2, 2]  # three images: x1, x4, x1, x2
    weights = dedup_sampling_weights(factors)
    assert weights.sum() == pytest.approx(1.0)
    assert weights[1:5].sum() == pytest.approx(0.25) and weights[6:].sum() == pytest.approx(0.25)
    assert weights[0] == pytest.approx(0.25)
    with pytest.raises(ValueError):
        dedup_sampling_weights([1, 0])


def test_guidance_schedule_values():
    t = torch.tensor([981, 701, 700, 401, 1])
    assert guidance_scales("constant", t, 7.5).tolist() == [7.5] * 5
    assert guidance_scales("delay:700", t, 7.5).tolist() == [1.0, 1.0, 1.0, 7.5, 7.5]
    torch.testing.assert_close(guidance_scales("linear", t, 7.5), 1 + 6.5 * (1 - t.double() / 1000))
    assert parse_guidance_schedule(" delay:0700 ") == "delay:700"
    for bad in ("delay:", "delay:-5", "cosine", "delay:x"):
        with pytest.raises(ValueError):
            parse_guidance_schedule(bad)


def sample_with(schedule, g, x, alpha_bar, steps=10):
    """Oracle DDIM run whose e_c carries 1.3 x and e_0 only the mean (CFG amplifies the x-component)."""
    sampler = DDIMScheduler(**SD_SCHEDULER)
    components = SDComponents(OracleUNet(x, alpha_bar), None, None, None, DDPMScheduler(**SD_SCHEDULER), sampler)

    def noise_fn(latents, t, prompt_index, seed_index):
        abar = alpha_bar[t].float()
        return oracle_eps(latents, 1.3 * x[prompt_index], abar), oracle_eps(latents, torch.zeros_like(latents), abar)

    return sample_trajectories(components, ["a", "b"], [100, 101], num_inference_steps=steps, guidance_scale=g,
                               noise_fn=noise_fn, decode=False, guidance_schedule=schedule)


def test_delayed_guidance_through_the_sampler_equals_its_oracles():
    alpha_bar = alpha_bar_from_scheduler(DDPMScheduler(**SD_SCHEDULER))
    torch.manual_seed(0)
    x = torch.randn((2,) + LATENT)
    constant = sample_with("constant", 7.5, x, alpha_bar)
    unguided = sample_with("constant", 1.0, x, alpha_bar)
    first = int(constant.timesteps[0])
    above = sample_with(f"delay:{first + 1}", 7.5, x, alpha_bar)  # T0 above the first timestep: never delayed
    torch.testing.assert_close(above.x_t, constant.x_t, atol=0, rtol=0)
    torch.testing.assert_close(above.final, constant.final, atol=0, rtol=0)
    never = sample_with("delay:0", 7.5, x, alpha_bar)  # every t >= 0: no guidance at all
    torch.testing.assert_close(never.final, unguided.final, atol=0, rtol=0)
    t0 = 500
    delayed = sample_with(f"delay:{t0}", 7.5, x, alpha_bar)
    unguided_steps = int((delayed.timesteps >= t0).sum())
    assert 0 < unguided_steps < len(delayed.timesteps)
    # x_t entering step k depends on steps < k: equal to the g = 1 run through the first guided step's input
    torch.testing.assert_close(delayed.x_t[:, :, :unguided_steps + 1], unguided.x_t[:, :, :unguided_steps + 1],
                               atol=0, rtol=0)
    after = unguided_steps + 1  # the first latent a guided step produced
    assert not torch.allclose(delayed.x_t[:, :, after], unguided.x_t[:, :, after])
    assert not torch.allclose(delayed.x_t[:, :, after], constant.x_t[:, :, after])
    assert delayed.step_guidance.tolist() == [1.0] * unguided_steps + [7.5] * (10 - unguided_steps)
    # e_guided uses each step's own scale
    g = delayed.step_guidance.float().reshape(1, 1, -1, 1, 1, 1)
    torch.testing.assert_close(delayed.e_guided(), delayed.e_0 + g * (delayed.e_c - delayed.e_0))


def test_distribution_distances_against_analytic_cases():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 3)), rng.normal(size=(400, 3))
    shifted = b + np.array([2.0, 0.0, 0.0])
    s = median_distance(a)
    assert s == pytest.approx(np.sqrt(2 * 2.366), rel=0.05)  # |a - a'|^2 ~ 2 chi2_3, whose median is 2.366
    assert abs(mmd_squared(a, b, s)) < 0.01 < mmd_squared(a, shifted, s)
    # Frechet distance between Gaussians: ||m1 - m2||^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2))
    x = rng.normal(size=(20000, 2)) * np.array([1.0, 2.0])
    y = rng.normal(size=(20000, 2)) * np.array([3.0, 2.0]) + np.array([1.0, 0.0])
    assert frechet_distance(x, y) == pytest.approx(1.0 + (1 - 3) ** 2 + 0.0, abs=0.1)
    mean, low, high = mean_interval(np.array([1.0, 2.0, 3.0, np.nan]), 200)
    assert mean == 2.0 and 1.0 <= low <= mean <= high <= 3.0
