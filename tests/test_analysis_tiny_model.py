"""mem_analysis on a real (untrained) tiny diffusers UNet: batching, the pipeline match, bad input."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDIMScheduler

from mem_analysis import (
    alpha_bar_from_scheduler, decompose_latents, denoising_losses, probe_metrics, probe_noise, sample_trajectories,
    schedule_deviation, summarize_probe_metrics,
)
from mem_analysis.presets import build_pipeline
from mem_analysis.sd import SDComponents, encode_prompts


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny UNet's ops are too small to gain from threads; on a shared 2-core machine a second
    OpenMP thread made a batch-1 call 150x slower (2.5 s instead of 15 ms), so run these on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe():
    pipeline = build_pipeline("tiny", seed=0)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def components(pipe):
    return SDComponents(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                        DDIMScheduler.from_config(pipe.scheduler.config))


def test_probe_noise_depends_only_on_seed_sample_and_timestep():
    full = probe_noise([3, 9, 4], [10, 500, 990], (4, 16, 16), seed=7)
    single = probe_noise([4], [500], (4, 16, 16), seed=7)
    torch.testing.assert_close(full[2, 1], single[0, 0], rtol=0, atol=0)
    reordered = probe_noise([4, 3], [990, 10], (4, 16, 16), seed=7)
    torch.testing.assert_close(reordered[1, 0], full[0, 2], rtol=0, atol=0)
    assert not torch.equal(probe_noise([4], [500], (4, 16, 16), seed=8)[0, 0], single[0, 0])
    assert abs(float(full.std()) - 1) < 0.05


def test_batched_m1_equals_one_at_a_time(pipe):
    prompts = ["a red circle", "two dogs"]
    cond = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts)
    uncond = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""])
    alpha_bar = alpha_bar_from_scheduler(pipe.scheduler)
    timesteps = [5, 999]
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 16)
    noise = probe_noise([0, 1], timesteps, (4, 16, 16), seed=0)
    rows = probe_metrics(pipe.unet, x, cond, uncond, timesteps, noise, alpha_bar, (7.5,), chunk_size=3)
    for s in range(2):
        for j, t in enumerate(timesteps):
            a = alpha_bar[t].float()
            x_t = a.sqrt() * x[s:s + 1] + (1 - a).sqrt() * noise[s, j:j + 1]
            with torch.no_grad():
                e_c = pipe.unet(x_t, t, encoder_hidden_states=cond[s:s + 1]).sample
                e_0 = pipe.unet(x_t, t, encoder_hidden_states=uncond).sample
            e_g = e_0 + 7.5 * (e_c - e_0)
            x0hat = (x_t - (1 - a).sqrt() * e_g) / a.sqrt()
            expected = {"loss_cond": (noise[s, j] - e_c).pow(2).mean(), "loss_uncond": (noise[s, j] - e_0).pow(2).mean(),
                        "loss_cfg_7.5": (noise[s, j] - e_g).pow(2).mean(),
                        "k_cfg_7.5": (x0hat * x[s]).sum() / x[s].pow(2).sum()}
            for key, value in expected.items():
                torch.testing.assert_close(rows[key][s, j], value, rtol=1e-4, atol=1e-5)
    summary = summarize_probe_metrics(rows, timesteps, high_noise_timestep=700)
    torch.testing.assert_close(summary["loss_cond_high"], rows["loss_cond"][:, 1])
    torch.testing.assert_close(summary["k_cond_mean"], rows["k_cond"].mean(1))


def test_bf16_unet_gives_float32_results_close_to_float32(pipe):
    cond = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a red circle"])
    uncond = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""])
    alpha_bar = alpha_bar_from_scheduler(pipe.scheduler)
    x, noise = torch.randn(1, 4, 16, 16), probe_noise([0], [300, 800], (4, 16, 16), seed=1)
    full = denoising_losses(pipe.unet, x, cond, uncond, [300, 800], noise, alpha_bar, (3.0,))
    half = denoising_losses(copy.deepcopy(pipe.unet).to(torch.bfloat16), x, cond, uncond, [300, 800], noise,
                            alpha_bar, (3.0,))
    assert half.loss_cfg[3.0].dtype == torch.float32 and half.e_c.dtype == torch.float32
    torch.testing.assert_close(half.loss_cfg[3.0], full.loss_cfg[3.0], rtol=5e-2, atol=1e-3)


def test_sample_trajectories_equals_stable_diffusion_pipeline(pipe, components):
    prompts, seeds = ["a red circle", "two dogs"], [11, 12]
    traj = sample_trajectories(components, prompts, seeds, num_inference_steps=6, guidance_scale=7.5, batch_size=4)
    images = pipe(prompts, num_inference_steps=6, guidance_scale=7.5, num_images_per_prompt=2,
                  latents=traj.x_T.reshape(4, 4, 16, 16), output_type="pt").images
    torch.testing.assert_close(traj.images.reshape(images.shape), images.float(), rtol=0, atol=1e-5)
    one = pipe(prompts[1], num_inference_steps=6, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(12), output_type="pt").images
    torch.testing.assert_close(traj.images[1, 1], one[0].float(), rtol=0, atol=1e-4)
    assert traj.x_t.shape == (2, 2, 6, 4, 16, 16) and traj.e_c.dtype == torch.float32
    torch.testing.assert_close(traj.x_t[:, :, 0], traj.x_T)
    assert torch.equal(traj.timesteps, pipe.scheduler.timesteps)
    dec = decompose_latents(traj.x_t[0], traj.final[0, 0], traj.x_T[0])
    # step 0's input is the seed's own noise, which is in the basis: w_x = 0, w_T = 1, no residual
    torch.testing.assert_close(dec.w_x[:, 0], torch.zeros(2, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(dec.w_T[:, 0], torch.ones(2, dtype=torch.float64), atol=1e-6, rtol=0)
    assert dec.residual[:, 0].max() < 1e-6 and dec.residual[:, 1:].min() > 0  # a real UNet leaves a residual later
    # so step 0 adds -sqrt(abar_t0) to D_x and -(1 - sqrt(1 - abar_t0)) to D_T, whatever the network
    first = schedule_deviation(dec.w_x, dec.w_T, traj.alpha_bar, early_steps=1)
    assert float(first.D_x) == pytest.approx(-float(traj.alpha_bar[0].sqrt()), abs=1e-6)
    assert float(first.D_T) == pytest.approx(float((1 - traj.alpha_bar[0]).sqrt()) - 1, abs=1e-6)


def test_sample_trajectories_at_another_resolution_equals_the_pipeline_there(pipe, components):
    """A model trained at another resolution than its sample_size (e.g. SD v1.5 at 64 px) is sampled at that one."""
    traj = sample_trajectories(components, ["a red circle"], [3], num_inference_steps=3, latent_shape=(4, 8, 8))
    images = pipe("a red circle", height=16, width=16, num_inference_steps=3, guidance_scale=7.5,
                  generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert traj.final.shape == (1, 1, 4, 8, 8)
    torch.testing.assert_close(traj.images[0, 0], images[0].float(), rtol=0, atol=1e-4)


def test_sampler_spills_recordings_to_disk(components, tmp_path):
    in_memory = sample_trajectories(components, ["x"], [1, 2], num_inference_steps=2, decode=False)
    spilled = sample_trajectories(components, ["x"], [1, 2], num_inference_steps=2, decode=False, spill_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e_0.npy", "e_c.npy", "x_t.npy"]
    torch.testing.assert_close(spilled.e_c, in_memory.e_c)


def test_bad_inputs_give_clear_errors(pipe, components):
    alpha_bar = alpha_bar_from_scheduler(pipe.scheduler)
    cond = torch.zeros(2, 77, 64)
    x = torch.zeros(2, 4, 16, 16)
    with pytest.raises(ValueError, match="outside the schedule"):
        denoising_losses(pipe.unet, x, cond, cond[:1], [10, 1000], torch.zeros(2, 2, 4, 16, 16), alpha_bar)
    with pytest.raises(ValueError, match="noise must be"):
        denoising_losses(pipe.unet, x, cond, cond[:1], [10], torch.zeros(2, 2, 4, 16, 16), alpha_bar)
    with pytest.raises(ValueError, match="cond must be"):
        denoising_losses(pipe.unet, x, torch.zeros(3, 77, 64), cond[:1], [10], torch.zeros(2, 1, 4, 16, 16), alpha_bar)
    with pytest.raises(ValueError, match="initial_noise must be"):
        sample_trajectories(components, ["a"], [1, 2], 2, initial_noise=torch.zeros(3, 4, 16, 16))
    with pytest.raises(ValueError, match="x_T must be"):
        decompose_latents(torch.zeros(2, 5, 4, 8, 8), torch.ones(4, 8, 8), torch.zeros(3, 4, 8, 8))
    with pytest.raises(ValueError, match="K = len"):
        schedule_deviation(torch.zeros(2, 5), torch.zeros(2, 5), torch.rand(4))
    with pytest.raises(ValueError, match="unknown reference"):
        schedule_deviation(torch.zeros(2, 4), torch.zeros(2, 4), torch.rand(4), reference="theory")
