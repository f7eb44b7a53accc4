"""The training step of train/finetune.py: its random draws, the diffusion loss (Min-SNR, Wen's filter,
embedding noise, caption dropout), and the loss and filter counts kept on the device between host reads.

Every random draw of a micro-batch comes from `step_generator(seed, process, micro-step)`, so a resumed run
draws what the uninterrupted run would have drawn.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from mem_analysis.mitigations import (kept_mean, noisy_text_embedding, read_wen_thresholds, wen_epsilon_magnitude,
                                      wen_filter_weights, wen_threshold_curve)
from mem_analysis.schedule import alpha_bar_from_scheduler


def step_generator(seed: int, rank: int, micro_step: int, device, stream: int = 0) -> torch.Generator:
    """Generator of one micro-batch's random draws, a function of (seed, process, micro-step[, stream]) only.

    Stream 0 holds the training draws; a mitigation draws from its own stream so the others stay as they were.
    """
    entropy = [seed, rank, micro_step] + ([stream] if stream else [])
    state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(state))


def mitigate_embeddings(hidden, args, rank: int, micro_step: int) -> torch.Tensor:
    """--text_embedding_noise: `c + sigma z` with z from stream 1 of the micro-step (before caption dropout)."""
    if not args.text_embedding_noise:
        return hidden
    generator = step_generator(args.seed, rank, micro_step, hidden.device, stream=1)
    return noisy_text_embedding(hidden, args.text_embedding_noise, generator)


class WenFilter:
    """Wen et al.'s training filter: an example whose `||e_c - e_0||` (epsilon space) exceeds the threshold
    of its timestep gets loss weight 0; the kept losses are averaged over the kept examples (`kept_mean`).

    The threshold curve T(t), t = 0..N-1, comes from `--mitigation_wen_thresholds FILE` (per-timestep
    thresholds, mem_analysis.mitigations.wen_threshold_curve) or `--mitigation_wen_threshold T` (T at every t).
    """

    def __init__(self, args, noise_scheduler, device):
        alpha_bar = alpha_bar_from_scheduler(noise_scheduler)
        if args.mitigation_wen_thresholds is not None:
            grid, thresholds = read_wen_thresholds(args.mitigation_wen_thresholds)
            curve = wen_threshold_curve(grid, thresholds, alpha_bar.numpy())
        else:
            curve = np.full(alpha_bar.numel(), float(args.mitigation_wen_threshold))
        self.curve = torch.as_tensor(curve, dtype=torch.float32, device=device)
        self.alpha_bar = alpha_bar.to(device, torch.float32)
        self.prediction_type = noise_scheduler.config.prediction_type

    def loss(self, unet, noisy, timesteps, prediction, target, uncond_hidden, weights):
        """(loss, magnitudes, keep): `e_0` from one extra unconditional forward without gradients on the same
        noisy input. Every process runs its backward, even when it keeps nothing (its loss is then 0)."""
        with torch.no_grad():
            out_0 = unet(noisy, timesteps, uncond_hidden.expand(noisy.shape[0], -1, -1), return_dict=False)[0]
        magnitudes = wen_epsilon_magnitude(prediction.detach(), out_0, noisy, self.alpha_bar[timesteps],
                                           self.prediction_type)
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if weights is not None:
            per_sample = per_sample * weights
        keep = wen_filter_weights(magnitudes, self.curve[timesteps])
        return kept_mean(per_sample, keep), magnitudes, keep


def diffusion_loss(unet, latents, hidden, noise_scheduler, generator, args, uncond_hidden=None, wen=None):
    """(loss, Wen's (magnitudes, keep) or None): batch mean of ||target - prediction||^2 at uniform random t
    (target eps or v), Min-SNR weighted if asked, through Wen's filter when `wen` (a WenFilter) is given."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if args.noise_offset:
        noise += args.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator,
                                                 device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator, device=latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    epsilon = noise_scheduler.config.prediction_type == "epsilon"
    target = noise if epsilon else noise_scheduler.get_velocity(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, hidden, return_dict=False)[0]
    weights = None
    if args.snr_gamma is not None:
        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=args.snr_gamma) / (snr if epsilon else snr + 1)
    if wen is not None:
        loss, magnitudes, keep = wen.loss(unet, noisy, timesteps, prediction, target, uncond_hidden, weights)
        return loss, (magnitudes, keep)
    if weights is None:
        return F.mse_loss(prediction.float(), target.float()), None
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean(), None


def micro_batch_loss(unet, batch, inputs, uncond_hidden, noise_scheduler, args, rank: int, micro_step: int, wen=None):
    """diffusion_loss of one micro-batch: latents and caption embeddings (cached or encoded), embedding noise,
    then caption dropout (which trains the unconditional branch CFG extrapolates from)."""
    generator = step_generator(args.seed, rank, micro_step, uncond_hidden.device)
    latents = inputs.image_latents(batch.get("pixel_values"), batch["image"], generator)
    # Embedding noise is drawn after the cache lookup, so every use of a caption gets fresh noise.
    hidden = mitigate_embeddings(inputs.caption_embeddings(batch["input_ids"]), args, rank, micro_step)
    drop = torch.rand(hidden.shape[0], generator=generator, device=hidden.device)
    hidden = torch.where((drop < args.proportion_empty_prompts)[:, None, None], uncond_hidden, hidden)
    return diffusion_loss(unet, latents, hidden, noise_scheduler, generator, args, uncond_hidden, wen)


class WenWindow:
    """Wen filter counts summed on the device between logging steps (read with the loss, no extra host sync):
    per duplication factor the examples seen and filtered, the magnitudes' sum, and the micro-batches whose
    every example was filtered."""

    def __init__(self, device, row_factors):
        """`row_factors`: the dup_factor of every train row (empty: no per-factor counts)."""
        self.factors = sorted({int(f) for f in row_factors}) or [0]
        lookup = {f: i for i, f in enumerate(self.factors)}
        self.row_index = torch.tensor([lookup[int(f)] for f in row_factors], dtype=torch.long, device=device)
        self.counts = torch.zeros(len(self.factors), 2, device=device)  # per factor: seen, filtered
        self.totals = torch.zeros(3, device=device)  # magnitude sum, fully filtered micro-batches, micro-batches

    def add(self, magnitudes: torch.Tensor, keep: torch.Tensor, rows: torch.Tensor) -> None:
        """Add one micro-batch: its magnitudes, keep weights (1 kept, 0 filtered) and train row indices."""
        index = self.row_index[rows.to(self.row_index.device)] if len(self.row_index) else torch.zeros_like(rows)
        self.counts.index_add_(0, index, torch.stack([torch.ones_like(keep), 1 - keep], 1).float())
        self.totals += torch.stack([magnitudes.float().sum(), (keep.sum() == 0).float(), torch.ones(())
                                    .to(keep.device)])

    def read(self, accelerator) -> dict[str, float]:
        """The window's scalars over all processes (call on every process), then a new window:
        `wen_filtered_share` (filtered / seen examples), `wen_filtered_share/dup_F` per factor,
        `wen_magnitude_mean`, and `wen_fully_filtered_processes` (per micro-step, processes that kept nothing)."""
        local = torch.cat([self.counts.flatten(), self.totals])[None]
        rows = (accelerator.gather(local) if accelerator.num_processes > 1 else local).cpu().double()
        # not zero_(): on CPU, .cpu() above may return this very storage
        self.counts, self.totals = torch.zeros_like(self.counts), torch.zeros_like(self.totals)
        counts = rows[:, :-3].reshape(len(rows), -1, 2).sum(0)
        magnitude_sum, fully, micro = rows[:, -3], rows[:, -2], rows[:, -1]
        seen = float(counts[:, 0].sum())
        values = {"wen_filtered_share": float(counts[:, 1].sum()) / max(seen, 1.0),
                  "wen_magnitude_mean": float(magnitude_sum.sum()) / max(seen, 1.0),
                  "wen_fully_filtered_processes": float((fully / micro.clamp(min=1)).sum())}
        if len(self.row_index):
            values.update({f"wen_filtered_share/dup_{f}": float(counts[i, 1] / counts[i, 0])
                           for i, f in enumerate(self.factors) if counts[i, 0] > 0})
        return values


class LossWindow:
    """Training loss summed on the device between host reads, and the first step whose loss was not finite.

    Reading a device value on the host waits for all queued work, so the loop reads only at logging,
    probe, validation and checkpoint steps; the non-finite check stays exact to the step.
    """

    def __init__(self, device, start: float):
        self.total = torch.zeros((), device=device)
        self.failed_step = torch.zeros((), device=device)  # 0: every loss so far was finite
        self.failed_loss = torch.zeros((), device=device)
        self.steps, self.start, self.excluded = 0, start, 0.0
        self.cpu_start, self.cpu_excluded = time.process_time(), 0.0

    def seconds(self, now: float) -> float:
        """Training seconds of the window (probes, validation and checkpoints left out)."""
        return now - self.start - self.excluded

    def cpu_seconds(self) -> float:
        """This process's CPU-seconds in the window (all its threads; probes, validation and checkpoints left
        out): unlike wall time, what a step costs on a machine shared with other jobs."""
        return time.process_time() - self.cpu_start - self.cpu_excluded

    def clock(self) -> tuple[float, float]:
        """(wall, CPU) now, the start of a pause that `exclude_since` leaves out of the window."""
        return time.perf_counter(), time.process_time()

    def exclude_since(self, paused: tuple[float, float]) -> None:
        """Leave the time since `paused` (probes, validation, checkpoints) out of the window's seconds."""
        self.excluded += time.perf_counter() - paused[0]
        self.cpu_excluded += time.process_time() - paused[1]

    def add(self, loss: torch.Tensor, step: int) -> None:
        """Add one micro-step's loss (already divided by the accumulation steps) of optimizer step `step`."""
        first = ~torch.isfinite(loss) & (self.failed_step == 0)
        self.failed_step = torch.where(first, float(step), self.failed_step)
        self.failed_loss = torch.where(first, loss.float(), self.failed_loss)
        self.total += loss.float()

    def read(self, accelerator) -> tuple[float, int, float]:
        """(mean loss per step over processes, first non-finite step or 0, its loss), read once on the host."""
        local = torch.stack([self.total / max(self.steps, 1), self.failed_step, self.failed_loss])
        rows = accelerator.gather(local[None]).cpu() if accelerator.num_processes > 1 else local[None].cpu()
        failed = rows[rows[:, 1] > 0]
        if len(failed):
            first = failed[failed[:, 1].argmin()]
            return float("nan"), int(first[1]), float(first[2])
        return float(rows[:, 0].mean()), 0, 0.0

    def reset(self, start: float) -> None:
        """Start a new logging window."""
        self.total.zero_()
        self.steps, self.start, self.excluded = 0, start, 0.0
        self.cpu_start, self.cpu_excluded = time.process_time(), 0.0
