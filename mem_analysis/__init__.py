"""Memorization measurements for Stable-Diffusion-style models (see README and science.md M1-M7).

Public API; scripts may also import from the submodules directly.
"""
from mem_analysis.schedule import (
    alpha_bar_from_scheduler, check_timesteps, clean_estimate, forward_noise, prediction_type_of, snr, to_epsilon,
)
from mem_analysis.losses import DenoisingResult, denoising_losses, guided, overestimation
from mem_analysis.probes import guidance_key, probe_metrics, probe_noise, summarize_probe_metrics
