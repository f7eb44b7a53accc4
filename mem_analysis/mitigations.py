"""Mitigations of memorization as pure functions: training-time filters, caption augmentations,
duplicate-aware sampling weights, and inference-time guidance schedules.

Training time (train/finetune.py flags):
- Wen et al. (ICLR 2024): drop from the loss the examples whose text-conditional noise magnitude
  `||e_c - e_0||` exceeds a threshold (`wen_example_magnitude`, `wen_filter_weights`, `weighted_mean`).
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


def wen_example_magnitude(e_c: torch.Tensor, e_0: torch.Tensor) -> torch.Tensor:
    """Per example `m_i = ||e_c[i] - e_0[i]||_2` over the flattened latent; (B, *latent) -> (B,) float32."""
    if e_c.shape != e_0.shape or e_c.ndim < 2:
        raise ValueError(f"e_c {tuple(e_c.shape)} and e_0 {tuple(e_0.shape)} must match and be (batch, ...)")
    return (e_c.float() - e_0.float()).flatten(1).norm(dim=1)


def wen_filter_weights(magnitudes: torch.Tensor, threshold: float) -> torch.Tensor:
    """Loss weights `w_i = 0 if m_i > threshold else 1` (float, same shape and device as `magnitudes`)."""
    return (magnitudes <= threshold).to(torch.float32)


def weighted_mean(per_example: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`sum_i w_i l_i / B`: the batch mean with dropped examples counted as zero, not renormalised.

    Dividing by the batch size B (not by sum w) keeps the loss defined and differentiable when every
    example of a process is dropped (the backward pass still runs, so DDP / ZeRO never wait on a
    process that skipped it), and makes the average over P processes of batch B equal the weighted
    loss of one process holding all P * B examples.
    """
    if per_example.shape != weights.shape:
        raise ValueError(f"per-example losses {tuple(per_example.shape)} and weights {tuple(weights.shape)} differ")
    return (per_example * weights.to(per_example.dtype)).sum() / per_example.numel()


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
