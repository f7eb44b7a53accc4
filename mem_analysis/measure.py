"""The per-prompt measurement of checkpoint evaluation (docs/science.md M3-M6), as a library.

`measure_prompts` samples a set of probe captions from several seeds with the trajectory recorded
(DDIM + CFG), decodes the final latents, scores every severity back end against each prompt's
paired training image (M6) and computes, per prompt, the noise alignment (M3), the latent
decomposition against the schedule (M4) and the trajectory collapse (M5). eval/evaluate_checkpoints.py
and the benches call it, so what is benchmarked is what users run.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from mem_analysis.alignment import noise_alignment, wen_magnitude
from mem_analysis.data import image_to_tensor, load_study_dataset
from mem_analysis.decomposition import decompose_latents, schedule_deviation, trajectory_collapse
from mem_analysis.sampling import Trajectories, sample_trajectories
from mem_analysis.schedule import alpha_bar_from_scheduler
from mem_analysis.sd import decode_latents, encode_images, encode_prompts
from mem_analysis.severity import Severity, severity

# Weight-free back ends of M6; `sscd` joins when an SSCD model is given.
SEVERITY_BACKENDS = ("pixel_cosine", "ssim", "l2", "nn_identity", "latent_cosine")
REFERENCES = ("paper", "exact")


@dataclass
class ProbeSet:
    """The probe samples of a study dataset, encoded once (evaluation's counterpart of training's ProbeInputs).

    Per probe sample (P): `sample_ids`, `dup_factors`, `captions`, `cond` text embeddings (P, L, D),
    `latents` VAE posterior means (P, *latent), `pixels` in [0, 1] (P, 3, H, W), `pool_index` (row of
    its image in the pool, -1 if absent). The training pool (one row per unique image): `pool_pixels`
    in [0, 1], `pool_ids`. `uncond` (1, L, D): the empty caption; `mu` and `mean_image`: the training
    set's mean latent and mean image as trained on (duplicates counted); `alpha_bar` of the scheduler.
    """

    sample_ids: np.ndarray
    dup_factors: np.ndarray
    captions: list[str]
    cond: torch.Tensor
    uncond: torch.Tensor
    latents: torch.Tensor
    pixels: torch.Tensor
    pool_pixels: torch.Tensor
    pool_ids: np.ndarray
    pool_index: np.ndarray
    mu: torch.Tensor
    mean_image: torch.Tensor
    alpha_bar: torch.Tensor


@dataclass(frozen=True)
class MeasureSettings:
    """What shapes the per-prompt measurement: the seeds, DDIM steps, severity back ends (`severity_backend`
    is the headline one, judged at `threshold`) and the early window (`early_steps`, else the sampling
    steps with t >= `high_noise_timestep`)."""

    seeds: tuple[int, ...]
    num_inference_steps: int
    backends: tuple[str, ...]
    severity_backend: str
    threshold: float
    high_noise_timestep: int
    early_steps: int | None
    guidance_schedule: str = field(default="constant", kw_only=True)  # mitigations.guidance_scales


@dataclass
class PromptBatch:
    """`measure_prompts` output for P prompts: the trajectories (with decoded `images`), every back end's
    Severity (P, N), the early window K used, and per prompt its values, per-seed values and curves."""

    traj: Trajectories
    scores: dict[str, Severity]
    early_steps: int
    values: list[dict]
    per_seed: list[list[dict]]
    curves: list[dict]


def load_probe_set(dataset_dir: str | Path, components, device, batch_size: int = 64, max_samples: int | None = None,
                   mu: torch.Tensor | None = None) -> ProbeSet:
    """The probe split of a study dataset and its training pool, encoded once.

    `mu` (a run's saved probe mu, keeping k identical to the training probes) defaults to the mean
    latent of the train split as trained on. Raises FileNotFoundError / ValueError on a bad dataset.
    """
    dataset = load_study_dataset(dataset_dir)
    probe = dataset["probe"]
    if max_samples:
        probe = probe.select(range(min(max_samples, len(probe))))
    train = dataset["train"]
    pool_ids, first_rows, counts = np.unique(np.asarray(train["sample_id"]), return_index=True, return_counts=True)
    pool = train.select(first_rows.tolist())

    def pixels_of(images) -> torch.Tensor:
        return torch.stack([image_to_tensor(image) for image in images])  # [-1, 1]

    def latents_of(pixels: torch.Tensor) -> torch.Tensor:
        return torch.cat([encode_images(components.vae, chunk.to(device)).float().cpu()
                          for chunk in pixels.split(batch_size)])

    pool_pixels, probe_pixels = pixels_of(pool["image"]), pixels_of(probe["image"])
    weights = torch.as_tensor(counts, dtype=torch.float32)
    weights = (weights / weights.sum())[:, None, None, None]
    if mu is None:
        mu = (latents_of(pool_pixels) * weights).sum(0)
    captions = list(probe["text"])
    embeds = encode_prompts(components.tokenizer, components.text_encoder, captions + [""]).float().cpu()
    probe_ids = np.asarray(probe["sample_id"])
    pool_row = {int(s): i for i, s in enumerate(pool_ids)}
    return ProbeSet(
        sample_ids=probe_ids, dup_factors=np.asarray(probe["dup_factor"]), captions=captions,
        cond=embeds[:-1], uncond=embeds[-1:], latents=latents_of(probe_pixels), pixels=(probe_pixels + 1) / 2,
        pool_pixels=(pool_pixels + 1) / 2, pool_ids=pool_ids,
        pool_index=np.asarray([pool_row.get(int(s), -1) for s in probe_ids]),
        mu=mu.float().cpu(), mean_image=((pool_pixels + 1) / 2 * weights).sum(0),
        alpha_bar=alpha_bar_from_scheduler(components.noise_scheduler),
    )


def severity_scores(traj: Trajectories, probe: ProbeSet, batch, settings: MeasureSettings,
                    sscd=None) -> dict[str, Severity]:
    """Every M6 back end for prompts `batch` x seeds, against each prompt's paired training image."""
    scores = {}
    for backend in settings.backends:
        generated, reference, kwargs = traj.images, probe.pixels[batch], {}
        if backend == "pixel_cosine":
            kwargs = dict(mean_image=probe.mean_image)
        elif backend == "nn_identity":
            kwargs = dict(pool=probe.pool_pixels, paired_index=probe.pool_index[batch])
        elif backend == "latent_cosine":  # centred on mu, the training set's mean latent
            generated, reference, kwargs = traj.final, probe.latents[batch], dict(mean_image=probe.mu)
        elif backend == "sscd":
            kwargs = dict(sscd_model=sscd)
        threshold = settings.threshold if backend == settings.severity_backend else None
        scores[backend] = severity(generated, reference, backend=backend, threshold=threshold, **kwargs)
    return scores


def prompt_measurements(traj: Trajectories, p: int, x: torch.Tensor, mu: torch.Tensor,
                        early: int) -> tuple[dict, list, dict]:
    """M3-M5 of prompt `p`'s seeds (training latent `x`): per-sample values, per-seed values, per-step curves."""
    x_t, x_T, final = traj.x_t[p], traj.x_T[p], traj.final[p]
    decompositions = {"": decompose_latents(x_t, x, x_T),  # training latent (default)
                      "_final": decompose_latents(x_t, x, x_T, target="final", final=final)}
    values = {}
    for ref in REFERENCES:
        for window, k in (("", None), ("_early", early)):
            suffix = ("" if ref == "paper" else "_exact") + window
            for tag, d in decompositions.items():
                dev = schedule_deviation(d.w_x, d.w_T, traj.alpha_bar, early_steps=k, reference=ref)
                values[f"D_x{tag}{suffix}"], values[f"D_T{tag}{suffix}"] = float(dev.D_x), float(dev.D_T)
    dec = decompositions[""]
    collapse = trajectory_collapse(x_t, final=traj.images[p])
    wen = wen_magnitude(traj.e_c[p], traj.e_0[p], first_steps=early)  # (seeds,)
    align = noise_alignment(traj.e_c[p][:, :early], traj.e_0[p][:, :early], x, x_t[:, :early],
                            traj.alpha_bar[:early], mu=mu)
    values.update({f"{k}_early": float(v.mean()) for k, v in align.items() if k.startswith("cos_")})
    for branch in ("c", "0"):  # fitted coefficients relative to theory (1 = exact denoiser)
        values[f"fit_a_{branch}_ratio_early"] = float((align[f"fit_a_{branch}"] / align["theory_a"]).mean())
        values[f"fit_b_{branch}_ratio_early"] = float((align[f"fit_b_{branch}"] / align["theory_b"]).mean())
    values.update(wen_magnitude=float(wen.mean()), diversity=float(collapse.final_diversity),
                  # seeds' distance once the early steps are done (step 0 is the seeds' own noise)
                  collapse_early=float(collapse.pairwise_distance[min(early, len(collapse.pairwise_distance) - 1)]),
                  residual=float(dec.residual.mean()))
    per_seed = []
    for j in range(x_t.shape[0]):
        dev = schedule_deviation(dec.w_x[j:j + 1], dec.w_T[j:j + 1], traj.alpha_bar, reference="paper")
        per_seed.append(dict(D_x=float(dev.D_x), D_T=float(dev.D_T), wen_magnitude=float(wen[j])))
    curves = dict(w_x=dec.w_x.mean(0).numpy(), w_T=dec.w_T.mean(0).numpy(),
                  collapse=collapse.pairwise_distance.numpy())
    return values, per_seed, curves


def measure_prompts(components, probe: ProbeSet, batch, guidance_scale: float, settings: MeasureSettings,
                    batch_size: int = 64, sscd=None, clock: Callable[[str], None] | None = None) -> PromptBatch:
    """M3-M6 for probe samples `batch` (indices into `probe`) at one guidance scale, from `settings.seeds`.

    Sampling runs `batch_size` images per UNet call and decoding as many per VAE call; `clock(name)`,
    when given, is called after the "sampling", "decoding" and "metrics" phases (for timings).
    """
    clock = clock or (lambda name: None)
    device = components.unet.device
    traj = sample_trajectories(components, [probe.captions[i] for i in batch], list(settings.seeds),
                               settings.num_inference_steps, guidance_scale, batch_size=batch_size, decode=False,
                               guidance_schedule=settings.guidance_schedule)
    clock("sampling")
    latents = traj.final.reshape((-1,) + tuple(traj.final.shape[2:]))
    pixels = torch.cat([decode_latents(components.vae, chunk.to(device)).cpu() for chunk in latents.split(batch_size)])
    traj = replace(traj, images=pixels.reshape(traj.final.shape[:2] + pixels.shape[1:]))
    clock("decoding")
    scores = severity_scores(traj, probe, batch, settings, sscd)
    early = settings.early_steps or max(1, int((traj.timesteps >= settings.high_noise_timestep).sum()))
    values, per_seed, curves = [], [], []
    for p, i in enumerate(batch):
        value, seed_values, curve = prompt_measurements(traj, p, probe.latents[i], probe.mu, early)
        values.append(value)
        per_seed.append(seed_values)
        curves.append(curve)
    clock("metrics")
    return PromptBatch(traj=traj, scores=scores, early_steps=early, values=values, per_seed=per_seed, curves=curves)
