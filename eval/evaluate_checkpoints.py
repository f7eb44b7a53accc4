"""Follow memorization over a fine-tuning run: M1-M7 of science.md on the base model and every checkpoint.

    python eval/evaluate_checkpoints.py --run_dir RUN [--weights ema|raw] [--num_seeds 10] ...
    accelerate launch eval/evaluate_checkpoints.py --run_dir RUN ...   # shards the probe samples

For each model (step 0 = the base model, then every RUN/checkpoint-N) and guidance scale:
M1/M2 probes at the run's fixed probe noise, DDIM sampling of every probe caption from
`--num_seeds` seeds with the trajectory recorded (M3 alignment, M4 decomposition, M5 collapse),
decoding and every severity back end (M6). Rows are gathered on the main process, which
appends them atomically to RUN/eval/per_seed.csv and per_sample.csv (+ parquet), writes
TensorBoard scalars to RUN/logs/eval at the checkpoint's global_step, and at the end
summary.json (M7), the figures and report.md (eval/report.py). Done checkpoints are skipped.

per_sample.csv columns (one row per checkpoint, sample, guidance scale):
- `severity` / `memorized_fraction`: the headline back end's mean over seeds / share of seeds over
  `--threshold`; `sev_<backend>`: every back end's mean over seeds (per seed in per_seed.csv);
- M1/M2 at the run's probe noise: `loss_cond`, `loss_uncond`, `loss_cfg_<g>`, `k_cond`, `k_uncond`,
  `k_cfg_<g>`, and `loss_cfg`, `k_cfg` at the row's own g; means over the probe grid, and with
  `_early` over the high-noise window t >= --high_noise_timestep;
- M4: `D_x`, `D_T` against the `paper` schedule, `D_x_exact`, `D_T_exact` against the `exact` one,
  `_early` over the first K sampling steps (K = steps with t >= --high_noise_timestep unless
  --early_steps), `D_x_final...` regressing on the generated latent instead of the training one;
- M3/M5: `cos_*_early`, `fit_*_ratio_early` (fitted / theoretical coefficient), `wen_magnitude`
  (||e_c - e_0|| over the first K steps), `diversity` (seeds' final images), `collapse_early`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_file
from tqdm.auto import tqdm

from mem_analysis import (alpha_bar_from_scheduler, guidance_key, prediction_type_of, probe_metrics, probe_noise,
                          summarize_probe_metrics)
from mem_analysis.data import image_to_tensor, load_study_dataset
from mem_analysis.sd import decode_latents, encode_images, encode_prompts, load_components
from mem_analysis.alignment import noise_alignment, wen_magnitude
from mem_analysis.decomposition import decompose_latents, schedule_deviation, trajectory_collapse
from mem_analysis.mitigations import parse_guidance_schedule
from mem_analysis.sampling import sample_trajectories
from mem_analysis.severity import DEFAULT_THRESHOLDS, load_sscd, severity

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402  (eval/report.py, beside this script)

# Weight-free back ends of science.md M6; `sscd` joins when --sscd_path is given.
BACKENDS = ("pixel_cosine", "ssim", "l2", "nn_identity", "latent_cosine")
REFERENCES = ("paper", "exact")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class EvalError(Exception):
    """Bad input: reported as one line, exit status 2."""


def parse_list(text, cast=float):
    """'1,3,7.5' or a YAML list -> list of `cast` values."""
    if text is None or text == "":
        return []
    if isinstance(text, (list, tuple)):
        return [cast(v) for v in text]
    return [cast(v) for v in str(text).split(",") if v.strip()]


def parse_args(argv=None):
    """Command-line flags (defaults follow science.md M4/M6)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run_dir", required=True, help="output_dir of train/finetune.py")
    p.add_argument("--output_dir", default=None, help="default RUN/eval")
    p.add_argument("--logging_dir", default=None, help="TensorBoard folder, default RUN/logs/eval")
    p.add_argument("--weights", choices=("ema", "raw"), default=None,
                   help="EMA or raw UNet of each checkpoint; default ema when the run used EMA")
    p.add_argument("--checkpoints", default=None, help="subset of steps, e.g. 0,500,1000 (0 = base model)")
    p.add_argument("--num_seeds", type=int, default=10)
    p.add_argument("--seed", type=int, default=None, help="default: the run's seed (matches training probes)")
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=7.5, help="headline guidance scale")
    p.add_argument("--guidance_scales", default=None, help="optional sweep, e.g. 1,3,7.5")
    p.add_argument("--guidance_schedule", default="constant",
                   help="per-step guidance: constant, linear, or delay:T0 (g = 1 while t >= T0, Jain et al. 2025); "
                        "a schedule other than constant writes to RUN/eval_<schedule> by default")
    p.add_argument("--probe_timesteps", default=None, help="default: the run's probe_timesteps")
    p.add_argument("--severity_backend", default="pixel_cosine", help=f"headline back end: {', '.join(BACKENDS)}, sscd")
    p.add_argument("--sscd_path", default=None, help="TorchScript SSCD model; adds the sscd back end")
    p.add_argument("--threshold", type=float, default=None,
                   help="memorization threshold on the headline back end (default: the back end's own)")
    p.add_argument("--high_noise_timestep", type=int, default=None,
                   help="t >= this is the high-noise window (default: the run's probe_high_noise_from, else 700)")
    p.add_argument("--early_steps", type=int, default=None,
                   help="sampling steps counted as early (default: steps with t >= --high_noise_timestep)")
    p.add_argument("--max_samples", type=int, default=None, help="evaluate only the first N probe samples")
    p.add_argument("--batch_size", type=int, default=64, help="images sampled and decoded per batch")
    p.add_argument("--pretrained_model_name_or_path", default=None, help="override the run's base model")
    p.add_argument("--train_data_dir", default=None, help="override the run's dataset")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for confidence intervals")
    args = p.parse_args(argv)
    if args.severity_backend not in BACKENDS + ("sscd",):
        raise EvalError(f"unknown --severity_backend {args.severity_backend!r}; choose one of "
                        f"{', '.join(BACKENDS + ('sscd',))}")
    if args.severity_backend == "sscd" and not args.sscd_path:
        raise EvalError("--severity_backend sscd needs --sscd_path (a TorchScript SSCD model file)")
    if args.num_seeds < 2:
        raise EvalError("--num_seeds must be >= 2 (trajectory collapse compares seeds)")
    try:
        args.guidance_schedule = parse_guidance_schedule(args.guidance_schedule)
    except ValueError as err:
        raise EvalError(str(err)) from None
    return args


def schedule_suffix(schedule: str) -> str:
    """'' for constant guidance, else '_delay700' / '_linear': the default eval folder is RUN/eval<suffix>."""
    return "" if schedule == "constant" else "_" + schedule.replace(":", "")


def read_run(args) -> dict:
    """RUN/config.yaml, with the evaluation's overrides applied."""
    run_dir = Path(args.run_dir)
    config_path = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise EvalError(f"--run_dir {run_dir} does not exist; pass the --output_dir of train/finetune.py")
    if not config_path.is_file():
        raise EvalError(f"{config_path} is missing; --run_dir must be a train/finetune.py output folder")
    config = yaml.safe_load(config_path.read_text()) or {}
    config["output_dir_of_run"] = str(run_dir)
    if config.get("dataset_name") and not (args.train_data_dir or config.get("train_data_dir")):
        raise EvalError("the run trained on --dataset_name; evaluation needs a study dataset: pass --train_data_dir")
    for key in ("pretrained_model_name_or_path", "train_data_dir"):
        if getattr(args, key):
            config[key] = getattr(args, key)
        if not config.get(key):
            raise EvalError(f"{config_path} has no {key}; pass --{key}")
    return config


def find_checkpoints(run_dir: Path, subset) -> list[tuple[int, Path | None]]:
    """[(global_step, folder)] sorted by step; step 0 (folder None) is the base model."""
    found = []
    for folder in run_dir.iterdir():
        match = CHECKPOINT_RE.match(folder.name)
        if match and folder.is_dir():
            step = int(match.group(1))
            state = folder / "training_state.json"
            if state.is_file():
                try:
                    step = int(json.loads(state.read_text())["global_step"])
                except (ValueError, KeyError, TypeError):
                    pass  # a broken state file is reported when the weights are loaded
            found.append((step, folder))
    if not found:
        raise EvalError(f"{run_dir} has no checkpoint-N folders; train with --checkpointing_steps")
    models = [(0, None)] + sorted(found, key=lambda item: item[0])
    if subset:
        wanted = set(parse_list(subset, int))
        missing = wanted - {step for step, _ in models}
        if missing:
            raise EvalError(f"--checkpoints asks for steps {sorted(missing)} that the run does not have; "
                            f"available: {[step for step, _ in models]}")
        models = [m for m in models if m[0] in wanted]
    return models


def checkpoint_unet(folder: Path, weights: str, base_unet_state: dict, components):
    """The UNet of one checkpoint: full (unet/), EMA (unet_ema/) or LoRA on the base UNet."""
    from diffusers import UNet2DConditionModel

    lora = folder / "pytorch_lora_weights.safetensors"
    subfolder = "unet_ema" if weights == "ema" else "unet"
    if (folder / subfolder).is_dir():
        return UNet2DConditionModel.from_pretrained(folder, subfolder=subfolder, use_safetensors=True)
    if lora.is_file():
        unet = UNet2DConditionModel.from_config(components.unet.config)
        unet.load_state_dict(base_unet_state)
        prefix = "unet" if any(k.startswith("unet.") for k in load_file(lora)) else None
        unet.load_lora_adapter(str(lora), prefix=prefix)
        unet.fuse_lora()
        unet.unload_lora()
        return unet
    raise FileNotFoundError(f"no {subfolder}/ or pytorch_lora_weights.safetensors (partial checkpoint?)")


def load_probe_set(config, args, components, device) -> dict:
    """Probe samples (captions, latents, pixels) and the training pool, encoded once per run."""
    try:
        dataset = load_study_dataset(config["train_data_dir"])
    except (FileNotFoundError, ValueError) as err:
        raise EvalError(str(err).splitlines()[0]) from err
    probe = dataset["probe"]
    if args.max_samples:
        probe = probe.select(range(min(args.max_samples, len(probe))))
    train = dataset["train"]
    train_ids = np.asarray(train["sample_id"])
    pool_ids, first_rows, counts = np.unique(train_ids, return_index=True, return_counts=True)
    pool = train.select(first_rows.tolist())
    to_pixels = lambda images: torch.stack([image_to_tensor(im) for im in images])  # noqa: E731
    pool_pixels = to_pixels(pool["image"])  # [-1, 1]
    probe_pixels = to_pixels(probe["image"])
    pool_latents = torch.cat([encode_images(components.vae, chunk.to(device)).float().cpu()
                              for chunk in pool_pixels.split(args.batch_size)])
    weights = torch.as_tensor(counts, dtype=torch.float32)
    weights = weights / weights.sum()
    # mu and the mean image are those of the training set as trained on (duplicates counted);
    # the run's own probe mu, when saved, keeps k identical to the training probes.
    saved_mu = Path(config["output_dir_of_run"]) / "probe_mu.safetensors"
    mu = load_file(saved_mu)["mu"].float().cpu() if saved_mu.is_file() else (pool_latents * weights[:, None, None, None]).sum(0)
    mean_image = ((pool_pixels + 1) / 2 * weights[:, None, None, None]).sum(0)
    captions = list(probe["text"])
    embeds = encode_prompts(components.tokenizer, components.text_encoder, captions + [""]).float().cpu()
    probe_ids = np.asarray(probe["sample_id"])
    pool_index = {int(s): i for i, s in enumerate(pool_ids)}
    return dict(
        sample_ids=probe_ids, dup_factors=np.asarray(probe["dup_factor"]), captions=captions,
        cond=embeds[:-1], uncond=embeds[-1:],
        latents=torch.cat([encode_images(components.vae, c.to(device)).float().cpu()
                           for c in probe_pixels.split(args.batch_size)]),
        pixels=(probe_pixels + 1) / 2, pool_pixels=(pool_pixels + 1) / 2, pool_ids=pool_ids,
        pool_index=np.asarray([pool_index.get(int(s), -1) for s in probe_ids]),
        mu=mu, mean_image=mean_image, alpha_bar=alpha_bar_from_scheduler(components.noise_scheduler),
    )


def severity_scores(traj, probe, batch, settings, sscd) -> dict[str, object]:
    """Every M6 back end for a chunk of prompts x seeds, against each prompt's paired training image."""
    scores = {}
    for backend in settings["backends"]:
        generated, reference, kwargs = traj.images, probe["pixels"][batch], {}
        if backend == "pixel_cosine":
            kwargs = dict(mean_image=probe["mean_image"])
        elif backend == "nn_identity":
            kwargs = dict(pool=probe["pool_pixels"], paired_index=probe["pool_index"][batch])
        elif backend == "latent_cosine":  # centred on mu, the training set's mean latent
            generated, reference, kwargs = traj.final, probe["latents"][batch], dict(mean_image=probe["mu"])
        elif backend == "sscd":
            kwargs = dict(sscd_model=sscd)
        threshold = settings["threshold"] if backend == settings["severity_backend"] else None
        scores[backend] = severity(generated, reference, backend=backend, threshold=threshold, **kwargs)
    return scores


def prompt_measurements(traj, p: int, x: torch.Tensor, mu: torch.Tensor, early: int) -> tuple[dict, list, dict]:
    """M3-M5 of one prompt's seeds: per-sample values, per-seed values and per-step curves."""
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


def prompts_per_call(args, num_seeds: int, latent_numel: int) -> int:
    """Prompts sampled per sample_trajectories call: batches stay full, recordings stay under ~1 GB."""
    budget = max(1, int(1e9 // (num_seeds * args.num_inference_steps * latent_numel * 12)))
    return max(1, args.batch_size // num_seeds, min(budget, 4 * args.batch_size))


class Stopwatch:
    """`clock(name)` adds the seconds since the previous call to `timings[name]`."""

    def __init__(self, timings: dict):
        self.timings, self.last = timings, time.perf_counter()

    def __call__(self, name: str):
        now = time.perf_counter()
        if name != "start":
            self.timings[name] = self.timings.get(name, 0.0) + now - self.last
        self.last = now


def evaluate_samples(unet, components, probe, index, args, settings, sscd, device, show_progress=True,
                     timings: dict | None = None):
    """All measurements for the probe samples `index` (one process's shard) of one model.

    `timings`, when given, accumulates seconds spent in probes, sampling, decoding and metrics.
    """
    per_seed, per_sample, curves, images = [], [], [], []
    timings = {} if timings is None else timings
    clock = Stopwatch(timings)
    if len(index) == 0:
        return per_seed, per_sample, curves, images
    seeds = settings["seeds"]
    components = replace(components, unet=unet)
    prediction_type = prediction_type_of(components.noise_scheduler)
    timesteps = settings["probe_timesteps"]
    clock("start")
    noise = probe_noise(probe["sample_ids"][index], timesteps, probe["latents"].shape[1:], settings["probe_seed"])
    m12 = probe_metrics(unet, probe["latents"][index].to(device), probe["cond"][index].to(device),
                        probe["uncond"].to(device), timesteps, noise, probe["alpha_bar"],
                        settings["probe_guidance_scales"], mu=probe["mu"].to(device),
                        prediction_type=prediction_type, chunk_size=args.batch_size)
    m12 = summarize_probe_metrics(m12, timesteps, settings["high_noise_timestep"])
    step_m12 = {(k[:-5] if k.endswith("_mean") else k[:-5] + "_early"): v for k, v in m12.items()}
    clock("probes")

    chunk = prompts_per_call(args, len(seeds), probe["latents"][0].numel())
    work = [(g, lo) for g in settings["guidance_scales"] for lo in range(0, len(index), chunk)]
    for g, lo in tqdm(work, desc="sampling", leave=False, disable=not show_progress):
        gk = guidance_key(g)
        batch = index[lo:lo + chunk]
        traj = sample_trajectories(components, [probe["captions"][i] for i in batch], seeds,
                                   args.num_inference_steps, g, batch_size=args.batch_size, decode=False,
                                   guidance_schedule=settings["guidance_schedule"])
        clock("sampling")
        latents = traj.final.reshape((-1,) + tuple(traj.final.shape[2:]))
        pixels = torch.cat([decode_latents(components.vae, chunk.to(device)).cpu()
                            for chunk in latents.split(args.batch_size)])
        traj = replace(traj, images=pixels.reshape(traj.final.shape[:2] + pixels.shape[1:]))
        clock("decoding")
        scores = severity_scores(traj, probe, batch, settings, sscd)
        early = settings["early_steps"] or max(1, int((traj.timesteps >= settings["high_noise_timestep"]).sum()))
        for p, i in enumerate(batch):
            values, seed_values, curve = prompt_measurements(traj, p, probe["latents"][i], probe["mu"], early)
            sid = int(probe["sample_ids"][i])
            common = dict(sample_id=sid, dup_factor=int(probe["dup_factors"][i]), guidance_scale=g,
                          guidance_schedule=settings["guidance_schedule"])
            for j, seed in enumerate(seeds):
                per_seed.append(dict(common, seed=seed, **seed_values[j],
                                     **{f"sev_{b}": float(r.similarity[p, j]) for b, r in scores.items()}))
            pos = lo + p
            row = dict(common, **{k: float(v[pos]) for k, v in step_m12.items()})
            row.update(loss_cfg=row[f"loss_cfg_{gk}"], k_cfg=row[f"k_cfg_{gk}"],
                       loss_cfg_early=row[f"loss_cfg_{gk}_early"], k_cfg_early=row[f"k_cfg_{gk}_early"])
            headline = scores[settings["severity_backend"]]
            row.update(severity=float(headline.severity[p]),
                       memorized_fraction=float(headline.memorized_fraction[p]),
                       **{f"sev_{b}": float(r.severity[p]) for b, r in scores.items()}, **values)
            per_sample.append(row)
            curves.append(dict(sample_id=sid, guidance_scale=g, alpha_bar=traj.alpha_bar.numpy(),
                               timesteps=traj.timesteps.numpy(), **curve))
            if g == settings["guidance_scale"]:
                images.append((sid, (traj.images[p, 0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)))
        clock("metrics")
    return per_seed, per_sample, curves, images


def resolve_settings(args, config) -> dict:
    """Everything that shapes the tables; a rerun must use the same to append to them."""
    use_ema = bool(config.get("use_ema"))
    weights = args.weights or ("ema" if use_ema else "raw")
    if weights == "ema" and not use_ema:
        raise EvalError("--weights ema but the run was trained without --use_ema; use --weights raw")
    if config.get("use_lora") and args.weights == "ema":
        raise EvalError("--weights ema does not apply to a LoRA run; omit --weights")
    seed = args.seed if args.seed is not None else int(config.get("seed") or 0)
    if args.high_noise_timestep is None:
        args.high_noise_timestep = int(config.get("probe_high_noise_from") or 700)
    probe_timesteps = parse_list(args.probe_timesteps or config.get("probe_timesteps") or "100,300,500,700,900", int)
    guidance_scales = sorted(set([args.guidance_scale] + parse_list(args.guidance_scales)))
    probe_scales = sorted(set(parse_list(config.get("probe_guidance_scales") or "1.5,3,7.5") + guidance_scales))
    backends = list(BACKENDS) + (["sscd"] if args.sscd_path else [])
    threshold = args.threshold if args.threshold is not None else DEFAULT_THRESHOLDS[args.severity_backend]
    return dict(weights=weights, seed=seed, probe_seed=int(config.get("probe_seed") or 0), seeds=[seed + j for j in range(args.num_seeds)],
                num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                guidance_scales=guidance_scales, guidance_schedule=args.guidance_schedule,
                probe_timesteps=probe_timesteps,
                probe_guidance_scales=probe_scales, backends=backends,
                severity_backend=args.severity_backend, threshold=threshold,
                high_noise_timestep=args.high_noise_timestep, early_steps=args.early_steps,
                max_samples=args.max_samples, model=str(config["pretrained_model_name_or_path"]),
                dataset=str(config["train_data_dir"]), lora=bool(config.get("use_lora")))


def done_steps(out_dir: Path, settings: dict) -> set[int]:
    """Steps already in per_sample.csv; refuses to mix tables made with other settings."""
    saved = out_dir / "settings.json"
    if not (out_dir / "per_sample.csv").is_file():
        return set()
    if saved.is_file():
        previous = json.loads(saved.read_text())
        previous.setdefault("guidance_schedule", "constant")  # tables written before schedules existed
        changed = sorted(k for k in settings if previous.get(k) != settings[k])
        if changed:
            raise EvalError(f"{out_dir} holds results made with other settings ({', '.join(changed)}); "
                            "use another --output_dir or the same settings")
    return set(pd.read_csv(out_dir / "per_sample.csv", usecols=["checkpoint_step"])["checkpoint_step"].tolist())


def write_atomic(frame: pd.DataFrame, path: Path):
    """CSV + parquet copy, each written to a temporary name and renamed."""
    for target, writer in ((path, frame.to_csv), (path.with_suffix(".parquet"), frame.to_parquet)):
        tmp = target.with_name(f".{target.name}.tmp")
        writer(tmp, index=False)
        os.replace(tmp, target)


def append_rows(path: Path, rows: list[dict], step: int):
    """Append one checkpoint's rows to a table (replacing any earlier rows of that step)."""
    new = pd.DataFrame(rows)
    if path.is_file():
        old = pd.read_csv(path)
        new = pd.concat([old[old["checkpoint_step"] != step], new], ignore_index=True)
    write_atomic(new.sort_values(["checkpoint_step", "guidance_scale", "sample_id"], kind="stable"), path)


def save_arrays(path: Path, **arrays):
    """np.savez to a temporary name, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def log_scalars(writer, per_sample: pd.DataFrame, step: int, settings: dict):
    """TensorBoard means per duplication factor at the headline guidance scale, at the checkpoint's step."""
    rows = per_sample[per_sample["guidance_scale"] == settings["guidance_scale"]]
    names = ["severity", "memorized_fraction", "D_x", "D_T", "D_x_exact", "D_T_exact", "loss_cond",
             "loss_cfg", "loss_cfg_early", "k_cfg", "k_cfg_early", "wen_magnitude", "diversity"]
    for dup, group in rows.groupby("dup_factor"):
        for name in names:
            if name in group:
                writer.add_scalar(f"eval/{name}/dup_{dup}", float(group[name].mean()), step)
    if len(rows) > 2 and rows["severity"].std() > 0:
        writer.add_scalar("eval/pearson_D_x_severity", float(rows["D_x"].corr(rows["severity"])), step)
    writer.flush()


def store_checkpoint(out_dir: Path, step: int, name: str, results, settings: dict, writer):
    """Main process: merge the shards' rows and append them (tables last: they mark the step done)."""
    per_seed = [r for part in results for r in part[0]]
    per_sample = [r for part in results for r in part[1]]
    curves = sorted((c for part in results for c in part[2]), key=lambda c: (c["guidance_scale"], c["sample_id"]))
    images = sorted((im for part in results for im in part[3]), key=lambda im: im[0])
    for row in per_seed + per_sample:
        row.update(checkpoint_step=step, checkpoint=name)
    save_arrays(out_dir / "curves" / f"step-{step}.npz",
                sample_id=np.array([c["sample_id"] for c in curves]),
                guidance_scale=np.array([c["guidance_scale"] for c in curves]),
                **{k: np.stack([c[k] for c in curves]) for k in ("w_x", "w_T", "collapse", "alpha_bar", "timesteps")})
    save_arrays(out_dir / "images" / f"step-{step}.npz", sample_id=np.array([i[0] for i in images]),
                images=np.stack([i[1] for i in images]))
    append_rows(out_dir / "per_seed.csv", per_seed, step)
    append_rows(out_dir / "per_sample.csv", per_sample, step)
    if writer is not None:
        log_scalars(writer, pd.DataFrame(per_sample), step, settings)


def main(args):
    config = read_run(args)
    run_dir = Path(args.run_dir)
    suffix = schedule_suffix(args.guidance_schedule)
    out_dir = Path(args.output_dir) if args.output_dir else run_dir / f"eval{suffix}"
    models = find_checkpoints(run_dir, args.checkpoints)
    settings = resolve_settings(args, config)
    done = done_steps(out_dir, settings)
    accelerator = Accelerator()
    is_main = accelerator.is_main_process
    todo = [(step, folder) for step, folder in models if step not in done]
    accelerator.wait_for_everyone()  # every process has read the done set before main appends
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / ".settings.json.tmp"
        tmp.write_text(json.dumps(settings, indent=1))
        os.replace(tmp, out_dir / "settings.json")
        for step, folder in models:
            if step in done:
                print(f"skipping {folder.name if folder else 'base model'} (step {step}): already evaluated in {out_dir}")

    device = accelerator.device
    # --mixed_precision fp16/bf16 runs the networks in that dtype; metrics accumulate in float32.
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    try:
        sscd = load_sscd(args.sscd_path).to(device) if args.sscd_path else None
    except (FileNotFoundError, ValueError) as err:
        raise EvalError(str(err)) from err
    components = load_components(config["pretrained_model_name_or_path"]).to(device, dtype)
    base_unet = components.unet.eval()
    base_state = {k: v.detach().clone() for k, v in base_unet.state_dict().items()}
    probe = load_probe_set(config, args, components, device) if todo else None
    writer = None
    if is_main and todo:
        save_arrays(out_dir / "images" / "training.npz", sample_id=probe["sample_ids"],
                    images=(probe["pixels"].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(args.logging_dir or str(run_dir / config.get("logging_dir", "logs") / f"eval{suffix}"))
    shard = np.arange(len(probe["sample_ids"]))[accelerator.process_index::accelerator.num_processes] if todo else None
    failed, timings = [], {}
    for step, folder in tqdm(todo, desc="checkpoints", disable=not is_main):
        name = folder.name if folder else "base"
        try:
            unet = base_unet if folder is None else checkpoint_unet(folder, settings["weights"], base_state, components)
        except Exception as err:  # a broken checkpoint must not stop the others
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if is_main:
                print(f"skipping {name}: cannot load its weights ({type(err).__name__}: {reason})", file=sys.stderr)
            failed.append(name)
            continue
        unet.to(device, dtype).eval().requires_grad_(False)
        results = evaluate_samples(unet, components, probe, shard, args, settings, sscd, device, is_main, timings)
        gathered = gather_object([results])
        if is_main:
            store_checkpoint(out_dir, step, name, gathered, settings, writer)
        accelerator.wait_for_everyone()
    if is_main:
        if writer is not None:
            writer.close()
        if timings:
            print("main process time: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
        report.write_report(out_dir, settings, failed=failed, n_boot=args.bootstrap)
        print(f"wrote {out_dir}/per_seed.csv, per_sample.csv, summary.json, report.md and figures/")
    accelerator.end_training()


def cli(argv=None) -> int:
    """Entry point: bad input is one line on stderr and exit status 2."""
    try:
        main(parse_args(argv))
    except EvalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
