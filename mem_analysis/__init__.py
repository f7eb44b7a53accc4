"""Memorization measurements for Stable-Diffusion-style models (docs/science.md M1-M7).

Public API; scripts may also import from the submodules directly.
"""
import mem_analysis.compat  # noqa: F401  (first: before any diffusers pipeline is imported)
from mem_analysis.schedule import (
    alpha_bar_from_scheduler, check_timesteps, clean_estimate, forward_noise, prediction_type_of, snr, to_epsilon,
)
from mem_analysis.losses import DenoisingResult, denoising_losses, first_step_overestimation, guided, overestimation
from mem_analysis.probes import (
    gaussian_probe_metrics, guidance_key, probe_metrics, probe_metrics_over_draws, probe_noise, summarize_probe_metrics,
)
from mem_analysis.alignment import noise_alignment, wen_magnitude
from mem_analysis.sampling import Trajectories, initial_noise_for_seeds, sample_trajectories
from mem_analysis.decomposition import (
    decompose_latents, deviation_values, per_seed_deviations, reference_schedule, schedule_deviation,
    trajectory_collapse, trajectory_latents,
)
from mem_analysis.severity import (
    DEFAULT_COPY_RATIO, DEFAULT_THRESHOLDS, copy_label, copy_test, is_memorized, load_sscd, nearest_pool_images, severity,
)
from mem_analysis.stats import (
    auroc, correlation, detection, disattenuated, onset_step, spearman_brown, split_half_reliability, tpr_at_fpr,
)
