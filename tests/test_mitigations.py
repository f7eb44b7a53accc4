"""Mitigations (mem_analysis/mitigations.py): the pure pieces against constructed cases, the guidance
schedules through the project's own DDIM sampler with an oracle denoiser, and the distribution distances."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from analysis_oracles import OracleUNet, oracle_eps
from diffusers import DDIMScheduler, DDPMScheduler

from mem_analysis import alpha_bar_from_scheduler, sample_trajectories
from mem_analysis.mitigations import (augment_caption, dedup_sampling_weights, guidance_scales,
                                      parse_guidance_schedule, weighted_mean, wen_example_magnitude,
                                      wen_filter_weights)
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
    magnitudes = wen_example_magnitude(e_c, e_0)
    torch.testing.assert_close(magnitudes, norms, atol=1e-5, rtol=0)
    weights = wen_filter_weights(magnitudes, threshold=1.0 + 1e-4)
    assert weights.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]


def test_wen_window_reports_the_share_over_the_threshold_and_the_mean_magnitude_on_cpu():
    """The logged train/wen_* scalars: means per micro-step over the window, then a new window."""
    from types import SimpleNamespace

    from train.finetune import WenWindow

    window, accelerator = WenWindow(torch.device("cpu")), SimpleNamespace(num_processes=1)
    window.add(torch.tensor([1.0, 5.0, 3.0, 7.0]), threshold=4.0)  # share 0.5, mean 4
    window.add(torch.tensor([5.0, 5.0]), threshold=4.0)  # share 1 (whole batch filtered), mean 5
    values = window.read(accelerator, micro_steps=2)
    assert values == pytest.approx({"wen_filtered_share": 0.75, "wen_magnitude_mean": 4.5,
                                    "wen_fully_filtered_processes": 0.5})
    assert window.read(accelerator, micro_steps=1)["wen_magnitude_mean"] == 0.0  # the window starts anew


def test_weighted_mean_is_per_process_average_of_one_big_batch_even_when_a_shard_is_all_dropped():
    losses = torch.rand(8, requires_grad=True)
    weights = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # the second "process" keeps nothing
    whole = weighted_mean(losses, weights)
    shards = (weighted_mean(losses[:4], weights[:4]) + weighted_mean(losses[4:], weights[4:])) / 2
    torch.testing.assert_close(whole, shards)
    torch.testing.assert_close(whole, (losses[0] + losses[2] + losses[3]) / 8)
    dropped = weighted_mean(losses[4:], weights[4:])
    dropped.backward()  # defined, with a zero gradient: the process still runs its backward
    assert dropped.item() == 0.0 and losses.grad[4:].abs().sum() == 0 and torch.isfinite(losses.grad).all()
    assert weighted_mean(losses.detach(), torch.ones(8)).item() == pytest.approx(losses.detach().mean().item())


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
