"""Mitigations of memorization as pure functions: training-time filters, caption augmentations,
duplicate-aware sampling weights, and inference-time guidance schedules.

Training time (train/finetune.py flags):
- Wen et al. (ICLR 2024): drop from the loss the examples whose text-conditional noise magnitude
  `||e_c - e_0||` (epsilon space, `wen_epsilon_magnitude`) exceeds a threshold of their timestep
  (`wen_threshold_table`, `wen_threshold_curve`, `wen_filter_weights`), the kept losses averaged over the
  kept examples (`kept_mean`).
- Somepalli et al. (NeurIPS 2023, somepago/DCR): caption randomisation (`augment_caption`) and
  Gaussian noise on the caption embedding (`noisy_text_embedding`).
- Deduplication at equal compute: rows drawn with probability proportional to 1 / dup_factor
  (`dedup_sampling_weights`), so every unique image is equally likely.
Inference time: `guidance_scales` gives the per-step scale of a schedule (Jain et al., CVPR 2025:
no guidance in the first, high-noise steps).
"""
from __future__ import annotations

import numpy as np
import torch

CAPTION_AUGMENTATIONS = ("rand_word_add", "rand_word_repeat", "rand_numbers_add", "multiple_captions")
GUIDANCE_SCHEDULES = ("constant", "delay:T0", "linear")


def wen_epsilon_magnitude(out_c: torch.Tensor, out_0: torch.Tensor, x_t: torch.Tensor, alpha_bar,
                          prediction_type: str = "epsilon") -> torch.Tensor:
    """`||e_c - e_0||` in epsilon space from the model's outputs (`to_epsilon` on both branches), (B,) float32.

    The probes' `text_magnitude` (the calibration's values) is in epsilon space, so the filter is too:
    for v-prediction `e = sqrt(abar) v + sqrt(1 - abar) x_t`, hence `e_c - e_0 = sqrt(abar_t) (v_c - v_0)`.
    """
    from mem_analysis.alignment import guidance_norm
    from mem_analysis.schedule import to_epsilon

    return guidance_norm(to_epsilon(out_c.float(), x_t.float(), alpha_bar, prediction_type),
                         to_epsilon(out_0.float(), x_t.float(), alpha_bar, prediction_type), latent_ndim=out_c.ndim - 1)


def wen_threshold_table(timesteps, magnitudes, quantile: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Per-timestep thresholds `T_k = quantile_q {m_i : t_i = t_k}` over the distinct timesteps t_k (increasing).

    Fed the never-duplicated probe magnitudes of an unmitigated run (one value per sample and probe
    timestep), so that at each probe timestep a share 1 - q of ordinary images lies above T_k.
    One T pooled over every t cannot do that: `||e_c - e_0|| = sqrt(SNR_t) ||x0hat_c - x0hat_0||`, and
    sqrt(SNR_t) spans two orders of magnitude over SD's schedule, so the low-noise values set a pooled T
    that the high-noise values of memorized images never reach (docs/science.md, "Wen's filter").
    """
    timesteps = np.asarray(timesteps, dtype=np.int64).reshape(-1)
    magnitudes = np.asarray(magnitudes, dtype=np.float64).reshape(-1)
    if timesteps.shape != magnitudes.shape or magnitudes.size == 0:
        raise ValueError(f"need one timestep per magnitude, got {timesteps.size} and {magnitudes.size}")
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile {quantile} must lie in (0, 1]")
    grid = np.unique(timesteps)
    return grid, np.array([np.quantile(magnitudes[timesteps == t], quantile) for t in grid])


def wen_threshold_curve(grid, thresholds, alpha_bar) -> np.ndarray:
    """The threshold at every training timestep t = 0..N-1 from per-timestep thresholds `T_k` at `grid` t_k:

        T(t) = sqrt(SNR_t) * interp(t; t_k, T_k / sqrt(SNR_{t_k}))

    (linear between grid timesteps, constant beyond the ends), i.e. interpolated on the x0 scale
    `||x0hat_c - x0hat_0|| = ||e_c - e_0|| / sqrt(SNR_t)`, where the steep factor sqrt(SNR_t) is removed:
    near t = 0 sqrt(SNR_t) grows several-fold within the first grid interval, which a linear interpolation
    of T itself would not follow. A single grid point gives a constant x0-scale threshold; pass one T for
    every t (`np.full`) to get Wen's single threshold back.
    """
    grid = np.asarray(grid, dtype=np.float64).reshape(-1)
    thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    alpha_bar = np.asarray(alpha_bar, dtype=np.float64).reshape(-1)
    if grid.shape != thresholds.shape or grid.size == 0 or np.any(np.diff(grid) <= 0):
        raise ValueError("grid timesteps must be increasing, one threshold each")
    if grid[0] < 0 or grid[-1] >= alpha_bar.size:
        raise ValueError(f"grid timesteps {grid.tolist()} lie outside the schedule [0, {alpha_bar.size - 1}]")
    root_snr = np.sqrt(alpha_bar / (1 - alpha_bar))
    on_x0_scale = thresholds / root_snr[grid.astype(np.int64)]
    return root_snr * np.interp(np.arange(alpha_bar.size), grid, on_x0_scale)


def read_wen_thresholds(path) -> tuple[np.ndarray, np.ndarray]:
    """(grid timesteps, thresholds) of a threshold file written by eval/wen_threshold.py: JSON with
    `timesteps` (increasing) and `thresholds` (epsilon space, one per timestep; `bin_edges` and the
    calibration's provenance are kept for the reader). ValueError, one line, when it is not one."""
    import json
    from pathlib import Path

    try:
        table = json.loads(Path(path).read_text())
        grid = np.asarray(table["timesteps"], dtype=np.float64)
        thresholds = np.asarray(table["thresholds"], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"Wen threshold file {path}: {type(err).__name__}: {err}; write it with "
                         f"eval/wen_threshold.py --output FILE") from None
    if table.get("space", "epsilon") != "epsilon":
        raise ValueError(f"Wen threshold file {path}: space {table['space']!r}; the filter compares epsilon-space "
                         f"magnitudes")
    if grid.ndim != 1 or grid.shape != thresholds.shape or grid.size == 0 or np.any(np.diff(grid) <= 0) \
            or np.any(grid != np.round(grid)) or not np.all(np.isfinite(thresholds)) or np.any(thresholds < 0):
        raise ValueError(f"Wen threshold file {path}: timesteps must be increasing integers with one threshold "
                         f">= 0 each")
    return grid.astype(np.int64), thresholds


def wen_filter_weights(magnitudes: torch.Tensor, thresholds) -> torch.Tensor:
    """Loss weights `w_i = 0 if m_i > T_i else 1` (float, as `magnitudes`); `thresholds` one T or one per example."""
    thresholds = torch.as_tensor(thresholds, device=magnitudes.device, dtype=torch.float32)
    return (magnitudes.float() <= thresholds).to(torch.float32)


def kept_mean(per_example: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`sum_i w_i l_i / max(sum_i w_i, 1)`: the mean over the kept examples (Wen et al.'s code averages the
    loss over the examples its mask keeps, so filtering does not shrink the step of the others).

    A process that keeps nothing gets `0 * sum l_i = 0`: a loss still connected to the graph, so its
    backward runs and DDP / ZeRO never wait on it; its zero gradient enters the average over processes.
    """
    if per_example.shape != weights.shape:
        raise ValueError(f"per-example losses {tuple(per_example.shape)} and weights {tuple(weights.shape)} differ")
    weights = weights.to(per_example.dtype)
    return (per_example * weights).sum() / weights.sum().clamp(min=1.0)


def noisy_text_embedding(hidden: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """`c + sigma * z`, `z ~ N(0, I)` drawn from `generator` (Somepalli et al.'s Gaussian noise on c)."""
    noise = torch.randn(hidden.shape, generator=generator, device=hidden.device, dtype=hidden.dtype)
    return hidden + sigma * noise


def insert_word(words: list[str], word: str, rng: np.random.Generator) -> list[str]:
    """`word` inserted at a uniform position among the len(words) + 1 gaps."""
    position = int(rng.integers(len(words) + 1))
    return words[:position] + [word] + words[position:]


def augment_caption(caption: str, kind: str | None, p: float, rng: np.random.Generator,
                    vocabulary=(), alternatives=()) -> str:
    """One caption randomised with probability `p` (Somepalli et al., somepago/DCR `datasets.py`).

    With probability p (one uniform draw u; augmented when u < p), else the caption unchanged:
    - `rand_word_add`: two words drawn uniformly from `vocabulary` inserted at random positions;
    - `rand_word_repeat`: two words drawn from the caption's own words inserted at random positions;
    - `rand_numbers_add`: a uniform integer in [0, 10^6) inserted at a random position;
    - `multiple_captions`: replaced by one of `alternatives` (the image's other captions), uniformly.
    `kind` None returns the caption without drawing. Draws come only from `rng`.
    """
    if kind is None:
        return caption
    if kind not in CAPTION_AUGMENTATIONS:
        raise ValueError(f"caption augmentation {kind!r}: choose one of {', '.join(CAPTION_AUGMENTATIONS)}")
    if rng.random() >= p:
        return caption
    words = caption.split(" ")
    if kind == "multiple_captions":
        return str(alternatives[int(rng.integers(len(alternatives)))]) if len(alternatives) else caption
    if kind == "rand_numbers_add":
        return " ".join(insert_word(words, str(int(rng.integers(10 ** 6))), rng))
    pool = list(vocabulary) if kind == "rand_word_add" else [w for w in words if w]
    if not pool:
        return caption
    for _ in range(2):
        words = insert_word(words, str(pool[int(rng.integers(len(pool)))]), rng)
    return " ".join(words)


def dedup_sampling_weights(dup_factors) -> np.ndarray:
    """Row probabilities `q_r = (1 / d_r) / sum_s (1 / d_s)`: each unique image (d_r rows) gets mass 1 / n_unique."""
    factors = np.asarray(dup_factors, dtype=np.float64)
    if factors.ndim != 1 or len(factors) == 0 or (factors < 1).any():
        raise ValueError("dup_factors must be a non-empty list of counts >= 1")
    weights = 1.0 / factors
    return weights / weights.sum()


def parse_guidance_schedule(text: str) -> str:
    """Check a schedule name (`constant`, `linear`, `delay:T0` with integer T0 >= 0); returns it normalised."""
    text = str(text).strip()
    if text in ("constant", "linear"):
        return text
    if text.startswith("delay:"):
        try:
            t0 = int(text[len("delay:"):])
        except ValueError:
            t0 = -1
        if t0 >= 0:
            return f"delay:{t0}"
    raise ValueError(f"guidance schedule {text!r}: use constant, linear or delay:T0 (T0 an integer timestep >= 0)")


def guidance_scales(schedule: str, timesteps, guidance_scale: float, num_train_timesteps: int = 1000
                    ) -> torch.Tensor:
    """Per sampling step k at timestep t_k, the scale g_k of `e_0 + g_k (e_c - e_0)`; (K,) float64.

    - `constant`: g_k = g.
    - `delay:T0` (Jain et al. 2025): g_k = 1 (the conditional prediction, no guidance) while t_k >= T0,
      g_k = g once t_k < T0. T0 above the first timestep is `constant`; T0 = 0 never guides.
    - `linear`: g_k = 1 + (g - 1)(1 - t_k / T), T = num_train_timesteps: guidance rises linearly from
      about 1 at pure noise to g at t = 0 (weak where the overestimation arises, full at the end).
    """
    t = torch.as_tensor(timesteps, dtype=torch.float64).reshape(-1)
    g = float(guidance_scale)
    schedule = parse_guidance_schedule(schedule)
    if schedule == "constant":
        return torch.full_like(t, g)
    if schedule == "linear":
        return 1.0 + (g - 1.0) * (1.0 - t / float(num_train_timesteps))
    t0 = int(schedule.split(":")[1])
    return torch.where(t >= t0, torch.ones_like(t), torch.full_like(t, g))
