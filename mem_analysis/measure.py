"""The per-prompt measurement of checkpoint evaluation (docs/science.md M3-M6), as a library.

`measure_prompts` samples a set of probe captions from several seeds with the trajectory recorded
(DDIM + CFG), decodes the final latents, scores every severity back end against each prompt's
paired training image (M6) and computes, per prompt, the noise alignment (M3), the latent
decomposition against the schedule (M4) and the trajectory collapse (M5). eval/evaluate_checkpoints.py
and the benches call it, so what is benchmarked is what users run.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from mem_analysis.alignment import noise_alignment, wen_magnitude
from mem_analysis.cli import parse_list
from mem_analysis.data import image_to_tensor, load_study_dataset
from mem_analysis.decomposition import (decompose_latents, deviation_values, per_seed_deviations, trajectory_collapse,
                                       trajectory_latents)
from mem_analysis.losses import dataset_mean, first_step_overestimation, guided
from mem_analysis.probes import (gaussian_probe_metrics, guidance_key, probe_metrics_over_draws,
                                 summarize_probe_metrics)
from mem_analysis.run import RUN_DEFAULTS
from mem_analysis.sampling import Trajectories, sample_trajectories
from mem_analysis.schedule import alpha_bar_from_scheduler, prediction_type_of
from mem_analysis.sd import decode_latents, encode_images, encode_prompts
from mem_analysis.severity import (BACKENDS, DEFAULT_COPY_RATIO, CopyTest, Severity, copy_test, embed_images,
                                   embedding_similarity, nearest_pool_images, self_similarity, severity,
                                   summarize_similarity)

# The weight-free back ends of M6; `sscd` joins when an SSCD model is given.
SEVERITY_BACKENDS = tuple(backend for backend in BACKENDS if backend != "sscd")
REFERENCES = ("paper", "exact")


@dataclass
class ProbeSet:
    """The probe samples of a study dataset, encoded once (evaluation's counterpart of training's ProbeInputs).

    Per probe sample (P): `sample_ids`, `dup_factors`, `captions`, `cond` text embeddings (P, L, D),
    `latents` VAE posterior means (P, *latent), `pixels` in [0, 1] (P, 3, H, W), `pool_index` (row of
    its image in the pool, -1 if absent). The training pool (one row per unique image): `pool_pixels`
    in [0, 1], `pool_ids`. `uncond` (1, L, D): the empty caption; `mu` and `mean_image`: the training
    set's mean latent and mean image as trained on (duplicates counted); `alpha_bar` of the scheduler;
    `pool_counts` the copies of each pool image in training; `pool_sscd` (M, D) the pool's SSCD descriptors
    when an SSCD model is given (the copy label's SSCD back end).
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
    pool_counts: np.ndarray | None = None
    pool_sscd: torch.Tensor | None = None


@dataclass(frozen=True)
class MeasureSettings:
    """What shapes the per-prompt measurement: the seeds, DDIM steps, severity back ends (`severity_backend`
    is the headline one, judged at `threshold`) and the early window (`early_steps`, else the sampling
    steps with t >= `high_noise_timestep`), the latents D sums over (`deviation_latents`: 'inputs'
    x_T..x_1 or 'outputs' x_{T-1}..x_0, docs/findings.md), the M1/M2 probes both evaluations share
    (`probe_seed` of the fixed noise, `probe_timesteps`, `probe_guidance_scales`, `probe_noise_draws` averaged),
    and `label`: what counts a seed as memorized, `copy` (the copy test at `copy_ratio`, where a training pool
    exists) or `similarity` (the headline back end over `threshold`); docs/science.md M6."""

    seeds: tuple[int, ...]
    num_inference_steps: int
    backends: tuple[str, ...]
    severity_backend: str
    threshold: float
    high_noise_timestep: int
    early_steps: int | None
    deviation_latents: str = field(default="inputs", kw_only=True)
    guidance_schedule: str = field(default="constant", kw_only=True)  # mitigations.guidance_scales
    probe_seed: int = field(default=RUN_DEFAULTS["probe_seed"], kw_only=True)
    probe_timesteps: tuple[int, ...] = field(default=tuple(RUN_DEFAULTS["probe_timesteps"]), kw_only=True)
    probe_guidance_scales: tuple[float, ...] = field(default=tuple(RUN_DEFAULTS["probe_guidance_scales"]), kw_only=True)
    probe_noise_draws: int = field(default=1, kw_only=True)
    label: str = field(default="copy", kw_only=True)
    copy_ratio: float = field(default=DEFAULT_COPY_RATIO, kw_only=True)

    def as_dict(self) -> dict:
        """The settings as settings.json holds them (lists, not tuples)."""
        return json.loads(json.dumps(asdict(self)))


def probe_settings(config: dict, probe_timesteps, guidance_scales, probe_noise_draws: int) -> dict:
    """MeasureSettings' probe fields from a run's config.yaml (mem_analysis.run.read_config) and the flags:
    the run's probe seed, its grid unless `probe_timesteps` is given, and its probed scales plus the sampled ones."""
    return dict(probe_seed=int(config["probe_seed"]),
                probe_timesteps=tuple(parse_list(probe_timesteps or config["probe_timesteps"], int)),
                probe_guidance_scales=tuple(sorted(set(parse_list(config["probe_guidance_scales"])
                                                       + list(guidance_scales)))),
                probe_noise_draws=probe_noise_draws)


@dataclass
class PromptBatch:
    """`measure_prompts` output for P prompts: the trajectories (with decoded `images`), every back end's
    Severity (P, N), the copy test per back end (`copies`: 'pixel', and 'sscd' with an SSCD model; empty
    without a training pool), the early window K used, and per prompt its values, per-seed values and curves."""

    traj: Trajectories
    scores: dict[str, Severity]
    early_steps: int
    values: list[dict]
    per_seed: list[list[dict]]
    curves: list[dict]
    copies: dict[str, CopyTest] = field(default_factory=dict)

    def label_columns(self, settings: MeasureSettings, p: int) -> tuple[dict, list[dict]]:
        """Prompt p's labels: per sample `memorized_fraction` (share of seeds labelled memorized by
        `settings.label`; the similarity label where there is no copy test) and `similarity_fraction` (share over
        the headline back end's threshold), `label` (the one used); per seed `copy` and `copy_ratio` (the copy
        test's back end: sscd when it is the headline back end, else pixel) and `copy_sscd`, `copy_ratio_sscd`
        beside a pixel label when SSCD is given."""
        headline = self.scores.get(settings.severity_backend)
        similarity = float(headline.memorized_fraction[p]) if headline is not None else float("nan")
        backend = "sscd" if settings.severity_backend == "sscd" and "sscd" in self.copies else "pixel"
        test = self.copies.get(backend)
        label = "copy" if settings.label == "copy" and test is not None else "similarity"
        sample = dict(memorized_fraction=float(test.fraction[p]) if label == "copy" else similarity,
                      similarity_fraction=similarity, label=label)
        seeds = [{} for _ in range(self.traj.x_T.shape[1])]
        for name, copy in self.copies.items():
            suffix = "" if name == backend else f"_{name}"
            for j, row in enumerate(seeds):
                row.update({f"copy{suffix}": float(copy.copy[p, j]), f"copy_ratio{suffix}": float(copy.ratio[p, j])})
        return sample, seeds


def encode_pixels(vae, pixels: torch.Tensor, device, batch_size: int = 64) -> torch.Tensor:
    """Scaled VAE latents (posterior means, float32 on CPU) of (B, 3, H, W) images in [-1, 1], `batch_size` at a time."""
    return torch.cat([encode_images(vae, chunk.to(device)).float().cpu() for chunk in pixels.split(batch_size)])


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
        return encode_pixels(components.vae, pixels, device, batch_size)

    pool_pixels, probe_pixels = pixels_of(pool["image"]), pixels_of(probe["image"])
    if mu is None:
        mu = dataset_mean(latents_of(pool_pixels), counts)
    captions = list(probe["text"])
    embeds = encode_prompts(components.tokenizer, components.text_encoder, captions + [""]).float().cpu()
    probe_ids = np.asarray(probe["sample_id"])
    pool_row = {int(s): i for i, s in enumerate(pool_ids)}
    return ProbeSet(
        sample_ids=probe_ids, dup_factors=np.asarray(probe["dup_factor"]), captions=captions,
        cond=embeds[:-1], uncond=embeds[-1:], latents=latents_of(probe_pixels), pixels=(probe_pixels + 1) / 2,
        pool_pixels=(pool_pixels + 1) / 2, pool_ids=pool_ids,
        pool_index=np.asarray([pool_row.get(int(s), -1) for s in probe_ids]),
        mu=mu.float().cpu(), mean_image=dataset_mean((pool_pixels + 1) / 2, counts),
        alpha_bar=alpha_bar_from_scheduler(components.noise_scheduler), pool_counts=counts,
    )


def severity_scores(traj: Trajectories, probe: ProbeSet, batch, settings: MeasureSettings,
                    sscd=None) -> tuple[dict[str, Severity], dict[str, CopyTest]]:
    """Every M6 back end for prompts `batch` x seeds, against each prompt's paired training image, and the copy
    test (pixel L2 over the whole training pool; SSCD descriptors too when `probe.pool_sscd` is given). One
    nearest-neighbour search per feature space serves `nn_identity` and the copy test."""
    scores, copies = {}, {}
    paired = probe.pool_index[batch]
    neighbours = nearest_pool_images(traj.images, probe.pool_pixels, paired)
    copies["pixel"] = copy_test(neighbours, settings.copy_ratio)
    generated_sscd = None
    if sscd is not None:
        P, N = traj.images.shape[:2]
        generated_sscd = embed_images(traj.images.reshape((P * N,) + tuple(traj.images.shape[2:])), sscd).reshape(P, N, -1)
        if probe.pool_sscd is not None:
            copies["sscd"] = copy_test(nearest_pool_images(generated_sscd, probe.pool_sscd, paired), settings.copy_ratio)
    for backend in settings.backends:
        threshold = settings.threshold if backend == settings.severity_backend else None
        generated, reference, kwargs = traj.images, probe.pixels[batch], {}
        if backend == "nn_identity":
            identity = (neighbours.nearest == torch.as_tensor(paired).reshape(-1, 1)).double()
            scores[backend] = summarize_similarity(identity, backend, threshold)
            continue
        if backend == "sscd" and generated_sscd is not None:
            reference_sscd = embed_images(probe.pixels[batch], sscd)
            scores[backend] = summarize_similarity(embedding_similarity(generated_sscd, reference_sscd), backend, threshold)
            continue
        if backend == "pixel_cosine":
            kwargs = dict(mean_image=probe.mean_image)
        elif backend == "latent_cosine":  # centred on mu, the training set's mean latent
            generated, reference, kwargs = traj.final, probe.latents[batch], dict(mean_image=probe.mu)
        elif backend == "sscd":
            kwargs = dict(sscd_model=sscd)
        scores[backend] = severity(generated, reference, backend=backend, threshold=threshold, **kwargs)
    return scores, copies


def reference_free_scores(traj: Trajectories, probe: ProbeSet, settings: MeasureSettings, sscd=None) -> dict[str, Severity]:
    """M6 without a paired image: each seed's similarity to the prompt's other seeds, for every back end that
    needs no training pool (pixel_cosine only with `probe.mean_image`, latent_cosine only with `probe.mu`)."""
    scores = {}
    for backend in settings.backends:
        threshold = settings.threshold if backend == settings.severity_backend else None
        if backend == "latent_cosine" and probe.mu is not None:
            scores[backend] = self_similarity(traj.final, backend, threshold, probe.mu)
        elif backend in ("ssim", "l2", "sscd") or (backend == "pixel_cosine" and probe.mean_image is not None):
            scores[backend] = self_similarity(traj.images, backend, threshold, probe.mean_image, sscd)
    return scores


def prompt_measurements(traj: Trajectories, p: int, x: torch.Tensor, mu: torch.Tensor | None,
                        early: int, latents: str = "inputs") -> tuple[dict, list, dict]:
    """M3-M5 of prompt `p`'s seeds (training latent `x`, or (seeds, *latent) one per seed): per-sample values,
    per-seed values, per-step curves.

    D sums over `latents` ('inputs' x_T..x_1 or 'outputs' x_{T-1}..x_0) of the training-latent, final-latent
    and (with `mu`) centred decompositions; per-seed rows hold each decomposition's paper-schedule D (for
    reliability). `wen_magnitude_first` is Wen et al.'s score at the first step of the first seed's
    generation, `wen_magnitude` its mean over the early steps and all seeds.
    """
    x_t, x_T, final = traj.x_t[p], traj.x_T[p], traj.final[p]
    window, alpha_bar = trajectory_latents(x_t, final, traj.alpha_bar, traj.final_alpha_bar, latents)
    a0 = float(traj.alpha_bar[0])
    decompositions = {"": decompose_latents(window, x, x_T),  # training latent (default)
                      "_final": decompose_latents(window, x, x_T, target="final", final=final)}
    if mu is not None:
        decompositions["_centred"] = decompose_latents(window, x, x_T, mu=mu)
    values = deviation_values(decompositions[""], alpha_bar, early, alpha_bar_start=a0)
    values.update(deviation_values(decompositions["_final"], alpha_bar, early, "_final", reductions=("sum",),
                                   alpha_bar_start=a0))
    if mu is not None:
        values.update(deviation_values(decompositions["_centred"], alpha_bar, early, "_centred", ("paper",),
                                       alpha_bar_start=a0))
    dec = decompositions[""]
    collapse = trajectory_collapse(x_t, final=traj.images[p])
    wen = wen_magnitude(traj.e_c[p], traj.e_0[p], first_steps=early)  # (seeds,)
    align = noise_alignment(traj.e_c[p][:, :early], traj.e_0[p][:, :early], x, x_t[:, :early],
                            traj.alpha_bar[:early], mu=mu, x_T=x_T)
    values.update({f"{k}_early": float(v.mean()) for k, v in align.items() if k.startswith("cos_")})
    for branch in ("c", "0"):  # fitted coefficients relative to theory (1 = exact denoiser)
        values[f"fit_a_{branch}_ratio_early"] = float((align[f"fit_a_{branch}"] / align["theory_a"]).mean())
        values[f"fit_b_{branch}_ratio_early"] = float((align[f"fit_b_{branch}"] / align["theory_b"]).mean())
    first = wen_magnitude(traj.e_c[p][:1], traj.e_0[p][:1], first_steps=1)
    values.update(wen_magnitude=float(wen.mean()), wen_magnitude_first=float(first[0]),
                  diversity=float(collapse.final_diversity),
                  # seeds' distance once the early steps are done (step 0 is the seeds' own noise)
                  collapse_early=float(collapse.pairwise_distance[min(early, len(collapse.pairwise_distance) - 1)]),
                  residual=float(dec.residual.mean()))
    per_seed = [dict(row, wen_magnitude=float(wen[j]))
                for j, row in enumerate(per_seed_deviations(decompositions, alpha_bar, early, a0))]
    curves = dict(w_x=dec.w_x.mean(0).numpy(), w_T=dec.w_T.mean(0).numpy(),
                  collapse=collapse.pairwise_distance.numpy())
    return values, per_seed, curves


def measure_prompts(components, probe: ProbeSet, batch, guidance_scale: float, settings: MeasureSettings,
                    batch_size: int = 64, sscd=None, clock: Callable[[str], None] | None = None,
                    reference_free: bool = False) -> PromptBatch:
    """M3-M6 for probe samples `batch` (indices into `probe`) at one guidance scale, from `settings.seeds`.

    `reference_free`: the prompts have no paired training image (their `latents` and `pixels` are not
    read): severity is `reference_free_scores` and the decomposition and alignment use each seed's own
    generated latent (the authors' exploratory variant) in place of the training latent.

    Sampling runs `batch_size` images per UNet call and decoding as many per VAE call; `clock(name)`,
    when given, is called after the "sampling", "decoding" and "metrics" phases (for timings).
    """
    clock = clock or (lambda name: None)
    device = components.unet.device
    # Generated at the probe images' (training) resolution, which need not be the UNet's sample_size; prompts
    # without any image (reference-free, `latents` empty) at the UNet's.
    latent_shape = tuple(probe.latents.shape[1:]) if probe.latents.ndim > 1 else None
    traj = sample_trajectories(components, [probe.captions[i] for i in batch], list(settings.seeds),
                               settings.num_inference_steps, guidance_scale, batch_size=batch_size, decode=False,
                               latent_shape=latent_shape,
                               guidance_schedule=settings.guidance_schedule)
    clock("sampling")
    latents = traj.final.reshape((-1,) + tuple(traj.final.shape[2:]))
    pixels = torch.cat([decode_latents(components.vae, chunk.to(device)).cpu() for chunk in latents.split(batch_size)])
    traj = replace(traj, images=pixels.reshape(traj.final.shape[:2] + pixels.shape[1:]))
    clock("decoding")
    scores, copies = ((reference_free_scores(traj, probe, settings, sscd), {}) if reference_free
                      else severity_scores(traj, probe, batch, settings, sscd))
    early = settings.early_steps or max(1, int((traj.timesteps >= settings.high_noise_timestep).sum()))
    values, per_seed, curves = [], [], []
    for p, i in enumerate(batch):
        x = traj.final[p] if reference_free else probe.latents[i]
        value, seed_values, curve = prompt_measurements(traj, p, x, probe.mu, early, settings.deviation_latents)
        if not reference_free:  # k of the first prediction, from pure noise, against the training latent
            first = first_step_overestimation(traj.x_t[p][:, 0], traj.e_c[p][:, 0], traj.e_0[p][:, 0],
                                              float(traj.alpha_bar[0]), x, probe.mu, traj.guidance_scale)
            value.update({name: float(k.mean()) for name, k in first.items()})
            seed_values = [dict(row, **{name: float(k[j]) for name, k in first.items()})
                           for j, row in enumerate(seed_values)]
        values.append(value)
        per_seed.append(seed_values)
        curves.append(curve)
    clock("metrics")
    return PromptBatch(traj=traj, scores=scores, early_steps=early, values=values, per_seed=per_seed, curves=curves,
                       copies=copies)


class Stopwatch:
    """`clock(name)` adds the seconds since the previous call to `timings[name]` (measure_prompts' `clock`)."""

    def __init__(self, timings: dict):
        self.timings, self.last = timings, time.perf_counter()

    def __call__(self, name: str):
        now = time.perf_counter()
        if name != "start":
            self.timings[name] = self.timings.get(name, 0.0) + now - self.last
        self.last = now


def prompts_per_call(settings: MeasureSettings, batch_size: int, latent_numel: int) -> int:
    """Prompts sampled per sample_trajectories call: batches stay full, recordings stay under ~1 GB."""
    num_seeds = len(settings.seeds)
    budget = max(1, int(1e9 // (num_seeds * settings.num_inference_steps * latent_numel * 12)))
    return max(1, batch_size // num_seeds, min(budget, 4 * batch_size))


def probe_rows(unet, components, probe: ProbeSet, index, settings: MeasureSettings, batch_size: int
               ) -> tuple[dict, dict]:
    """M1/M2 at the run's probe noise (averaged over `probe_noise_draws` draws) for probe samples `index`:
    per-sample means over the grid and `_early` ones (t >= high_noise_timestep), and the per-timestep values (S, T);
    with them the Gaussian probes' `k0_gauss`, `kc_gauss` (+ `_early`): the same draws as the input itself,
    holding no x (mem_analysis.probes.gaussian_probe_metrics)."""
    device = unet.device
    timesteps = list(settings.probe_timesteps)
    common = dict(draws=settings.probe_noise_draws, mu=probe.mu.to(device),
                  prediction_type=prediction_type_of(components.noise_scheduler), chunk_size=batch_size)
    inputs = (unet, probe.latents[index].to(device), probe.cond[index].to(device), probe.uncond.to(device), timesteps,
              probe.sample_ids[index], settings.probe_seed, probe.alpha_bar)
    per_t = probe_metrics_over_draws(*inputs, guidance_scales=list(settings.probe_guidance_scales), **common)
    gauss = probe_metrics_over_draws(*inputs, metrics=gaussian_probe_metrics, **common)
    means = summarize_probe_metrics(per_t, timesteps, settings.high_noise_timestep)
    means.update({f"{short}_gauss{k[len(name):]}": v
                  for k, v in summarize_probe_metrics(gauss, timesteps, settings.high_noise_timestep).items()
                  for name, short in (("k_uncond", "k0"), ("k_cond", "kc")) if k.startswith(name + "_")})
    return {(k[:-5] if k.endswith("_mean") else k[:-5] + "_early"): v for k, v in means.items()}, per_t


def at_own_scale(row: dict, guidance_scale: float) -> dict:
    """`loss_cfg`, `k_cfg`, `loss_cfg_x0`, `k_cfg_uncentred` and their `_early` values of a probe row at its own g
    (copied from the `_<g>` columns the probes write for every probed scale), and the Gaussian probes' `kg_gauss`
    (+ `_early`): k is linear in the prediction, so `k_g = k_0 + g (k_c - k_0)` (losses.guided on the k values)."""
    gk = guidance_key(guidance_scale)
    aliases = {"loss_cfg": f"loss_cfg_{gk}", "k_cfg": f"k_cfg_{gk}", "loss_cfg_x0": f"loss_cfg_{gk}_x0",
               "k_cfg_uncentred": f"k_cfg_{gk}_uncentred"}
    out = {out: row[column + suffix] for name, column in aliases.items() for out, suffix
           in ((name, ""), (f"{name}_early", "_early")) if column + suffix in row}
    out.update({f"kg_gauss{w}": guided(row[f"kc_gauss{w}"], row[f"k0_gauss{w}"], guidance_scale)
                for w in ("", "_early") if f"kc_gauss{w}" in row})
    return out
