"""Follow memorization over a fine-tuning run: M1-M7 of docs/science.md on the base model and every checkpoint.

    python eval/evaluate_checkpoints.py --run_dir RUN [--weights ema|raw] [--num_seeds 10] ...
    accelerate launch eval/evaluate_checkpoints.py --run_dir RUN ...   # shards the probe samples

For each model (step 0 = the base model, then every RUN/checkpoint-N) and guidance scale:
M1/M2 probes at the run's fixed probe noise, DDIM sampling of every probe caption from
`--num_seeds` seeds with the trajectory recorded (M3 alignment, M4 decomposition, M5 collapse),
decoding and every severity back end (M6). Rows are gathered on the main process, which
appends them atomically to RUN/eval/per_seed.csv and per_sample.csv (+ parquet), writes
TensorBoard scalars and generated-vs-training image grids at the checkpoint's global_step (one run per
duplication factor, RUN/logs/eval/dup_F), and at the end the report's headline as text in RUN/logs/eval,
summary.json (M7), the figures and report.md (eval/report.py). A model whose rows were measured on the same
weights (`checkpoint_id`: mem_analysis.run.checkpoint_identity, new at every save and whenever a weights file
is replaced) is skipped; one whose weights changed is evaluated again; the rows of a checkpoint whose folder
is gone are dropped (the weights they measured can no longer be checked); tables of another run are refused.

per_sample.csv columns (one row per checkpoint, sample, guidance scale):
- `checkpoint_step`, `checkpoint`, `checkpoint_id` (the weights measured), `caption_tokens_cut` (tokens of the
  sample's caption past the text encoder's window, which no model sees);
- `severity`: the headline back end's mean over seeds (the severity scale); `memorized_fraction`: the share of
  seeds labelled memorized by `--label` (default `copy`: the seed's nearest training image is the paired one by
  a margin, d(paired) / d(nearest other) < `--copy_ratio`, per seed `copy` and `copy_ratio` in per_seed.csv;
  `similarity`: over `--threshold` on the headline back end); `similarity_fraction`: the share over `--threshold`
  whatever the label; a sample is memorized when `memorized_fraction >= 0.5` (mem_analysis.severity.is_memorized);
  `sev_<backend>`: every back end's mean over seeds (per seed in per_seed.csv);
- M1/M2 at the run's probe noise (averaged over --probe_noise_draws draws per (sample, t); draw 0 is the
  training probes' noise): `loss_cond`, `loss_uncond`, `loss_cfg_<g>` (epsilon space) and `loss_cond_x0`,
  `loss_uncond_x0`, `loss_cfg_<g>_x0` (x0 space, L / SNR_t), `k_cond`, `k_uncond`, `k_cfg_<g>` (centred on mu)
  and `k_..._uncentred`; `loss_cfg`, `loss_cfg_x0`, `k_cfg`, `k_cfg_uncentred` at the row's own g; means over
  the probe grid, and with `_early` over the high-noise window t >= --high_noise_timestep;
- M4: `D_x`, `D_T` against the `paper` schedule, `D_x_exact`, `D_T_exact` against the `exact` one,
  `_early` over the first K sampling steps (K = steps with t >= --high_noise_timestep unless
  --early_steps), `D_x_final...` regressing on the generated latent instead of the training one,
  `D_x_centred...` on the centred basis [x - mu, mu, x_T], `D_x_mean...` per-step means instead of sums;
  the latents summed over are --deviation_latents (inputs x_T..x_1, or outputs x_{T-1}..x_0);
- M3/M5: `cos_*_early`, `fit_*_ratio_early` (fitted / theoretical coefficient), `wen_magnitude`
  (||e_c - e_0|| over the first K steps), `diversity` (seeds' final images), `collapse_early`;
- M2 where the paper measures it: `k0_first`, `kc_first`, `kg_first` (the row's g), k of the sampler's first
  prediction from pure noise against x, centred on mu (per seed in per_seed.csv; the per-sample mean is the
  pooled least-squares fit over seeds, mem_analysis.losses.first_step_overestimation); `k0_gauss`, `kc_gauss`,
  `kg_gauss` (+ `_early`): k on Gaussian probes, pure noise as the input at each probe timestep, same noise
  draws as the M1/M2 probes (mem_analysis.probes.gaussian_probe_metrics).
Also RUN/eval/premise_reference.json (the analytic k_0 of the optimal Gaussian denoiser fitted on the training
latents, mem_analysis.gaussian_reference) and premise_latents.safetensors (the latents it was fitted and read on).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from eval import markdown
from eval.tables import EvalError, append_rows, check_same_settings, drop_steps, save_arrays, stored_identities
from mem_analysis import guidance_key, run
from mem_analysis.board import FactorWriters, pair_grid
from mem_analysis.cli import output_folder, parse_list, run_command
from mem_analysis.gaussian_reference import premise_reference
from mem_analysis.io import atomic_path, write_text_atomic
from mem_analysis.measure import (SEVERITY_BACKENDS, MeasureSettings, ProbeSet, Stopwatch, at_own_scale, encode_pixels,
                                  load_probe_set, measure_prompts, probe_rows, probe_settings, prompts_per_call)
from mem_analysis.mitigations import parse_guidance_schedule
from mem_analysis.sampling import ddim_scheduler
from mem_analysis.sd import compute_dtype, cut_prompts_line, load_components, tokens_cut
from mem_analysis.severity import DEFAULT_COPY_RATIO, DEFAULT_THRESHOLDS, LABELS, embed_images, load_sscd
from mem_analysis.threads import use_cpu_threads


@dataclass(frozen=True)
class EvalSettings(MeasureSettings):
    """Everything that shapes the tables, resolved once from the flags and the run (settings.json);
    a rerun must use the same to append to them."""

    weights: str
    seed: int
    guidance_scale: float
    guidance_scales: tuple[float, ...]
    max_samples: int | None
    model: str
    dataset: str
    lora: bool
    run_fingerprint: str | None = field(default=None, kw_only=True)  # the run's run.json: tables of one run only


@dataclass
class CheckpointResult:
    """One model's rows: per (sample, g, seed), per (sample, g), per-step curves, and (sample_id, image) pairs."""

    per_seed: list[dict] = field(default_factory=list)
    per_sample: list[dict] = field(default_factory=list)
    curves: list[dict] = field(default_factory=list)
    images: list[tuple[int, np.ndarray]] = field(default_factory=list)

    @classmethod
    def merge(cls, parts: list[CheckpointResult]) -> CheckpointResult:
        """The processes' shards as one result, curves and images in sample order."""
        return cls(per_seed=[r for part in parts for r in part.per_seed],
                   per_sample=[r for part in parts for r in part.per_sample],
                   curves=sorted((c for part in parts for c in part.curves),
                                 key=lambda c: (c["guidance_scale"], c["sample_id"])),
                   images=sorted((im for part in parts for im in part.images), key=lambda im: im[0]))


def parse_args(argv=None):
    """Command-line flags (defaults follow docs/science.md M4/M6; unset run-related ones come from the run)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run_dir", required=True, help="output_dir of train/finetune.py")
    p.add_argument("--output_dir", default=None, help="default RUN/eval")
    p.add_argument("--logging_dir", default=None, help="TensorBoard folder, default RUN/logs/eval")
    p.add_argument("--weights", choices=("ema", "raw"), default=None,
                   help="EMA or raw UNet of each checkpoint; default ema when the run used EMA")
    p.add_argument("--checkpoints", default=None,
                   help="subset of steps, e.g. 0,500,1000 (0 = base model), or last (the last checkpoint only)")
    p.add_argument("--num_seeds", type=int, default=10)
    p.add_argument("--seed", type=int, default=None, help="default: the run's seed (matches training probes)")
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=7.5, help="headline guidance scale")
    p.add_argument("--guidance_scales", default=None, help="optional sweep, e.g. 1,3,7.5")
    p.add_argument("--guidance_schedule", default="constant",
                   help="per-step guidance: constant, linear, or delay:T0 (g = 1 while t >= T0, Jain et al. 2025); "
                        "a schedule other than constant writes to RUN/eval_<schedule> by default")
    p.add_argument("--probe_timesteps", default=None, help="default: the run's probe_timesteps")
    p.add_argument("--severity_backend", default="pixel_cosine",
                   help=f"headline back end: {', '.join(SEVERITY_BACKENDS)}, sscd")
    p.add_argument("--sscd_path", default=None, help="TorchScript SSCD model; adds the sscd back end")
    p.add_argument("--threshold", type=float, default=None,
                   help="memorization threshold on the headline back end (default: the back end's own)")
    p.add_argument("--label", choices=LABELS, default="copy",
                   help="a seed is memorized when it is a copy (d(paired) / d(nearest other training image) < "
                        "--copy_ratio; default) or when its similarity is over --threshold (similarity)")
    p.add_argument("--copy_ratio", type=float, default=DEFAULT_COPY_RATIO,
                   help="the copy label's distance-ratio threshold (docs/science.md M6)")
    p.add_argument("--high_noise_timestep", type=int, default=None,
                   help="t >= this is the high-noise window (default: the run's high_noise_timestep)")
    p.add_argument("--early_steps", type=int, default=None,
                   help="sampling steps counted as early (default: steps with t >= --high_noise_timestep)")
    p.add_argument("--probe_noise_draws", type=int, default=4,
                   help="noise draws per (sample, timestep) averaged in the probes (draw 0 = the training probes')")
    p.add_argument("--deviation_latents", choices=("inputs", "outputs"), default="inputs",
                   help="latents D sums over: each step's input x_T..x_1, or its output x_{T-1}..x_0")
    p.add_argument("--max_samples", type=int, default=None, help="evaluate only the first N probe samples")
    p.add_argument("--batch_size", type=int, default=64, help="images sampled and decoded per batch")
    p.add_argument("--pretrained_model_name_or_path", default=None, help="override the run's base model")
    p.add_argument("--train_data_dir", default=None, help="override the run's dataset")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for confidence intervals")
    args = p.parse_args(argv)
    if args.severity_backend not in SEVERITY_BACKENDS + ("sscd",):
        raise EvalError(f"unknown --severity_backend {args.severity_backend!r}; choose one of "
                        f"{', '.join(SEVERITY_BACKENDS + ('sscd',))}")
    if args.severity_backend == "sscd" and not args.sscd_path:
        raise EvalError("--severity_backend sscd needs --sscd_path (a TorchScript SSCD model file)")
    if args.num_seeds < 2:
        raise EvalError("--num_seeds must be >= 2 (trajectory collapse compares seeds)")
    if args.probe_noise_draws < 1:
        raise EvalError("--probe_noise_draws must be >= 1")
    if not 0 < args.copy_ratio <= 1:
        raise EvalError(f"--copy_ratio {args.copy_ratio} must lie in (0, 1]")
    try:
        args.guidance_schedule = parse_guidance_schedule(args.guidance_schedule)
    except ValueError as err:
        raise EvalError(str(err)) from None
    return args


def read_run(args) -> dict:
    """RUN/config.yaml (with mem_analysis.run's defaults), the evaluation's overrides applied."""
    return run.read_run(args.run_dir, args.pretrained_model_name_or_path, args.train_data_dir)


def read_probe_set(config: dict, args, components, device) -> ProbeSet:
    """The run's probe samples and training pool, encoded once (the run's saved mu when there is one)."""
    try:
        return load_probe_set(config["train_data_dir"], components, device, args.batch_size, args.max_samples,
                              mu=run.read_probe_mu(args.run_dir))
    except (FileNotFoundError, ValueError) as err:
        raise EvalError(str(err).splitlines()[0]) from err


def evaluate_samples(unet, components, probe: ProbeSet, index, settings: EvalSettings, batch_size: int, sscd=None,
                     show_progress=True, timings: dict | None = None) -> CheckpointResult:
    """All measurements for the probe samples `index` (one process's shard) of one model.

    `timings`, when given, accumulates seconds spent in probes, sampling, decoding and metrics.
    """
    result = CheckpointResult()
    clock = Stopwatch({} if timings is None else timings)
    if len(index) == 0:
        return result
    components = replace(components, unet=unet)
    clock("start")
    step_m12, per_t = probe_rows(unet, components, probe, index, settings, batch_size)
    clock("probes")

    chunk = prompts_per_call(settings, batch_size, probe.latents[0].numel())
    work = [(g, lo) for g in settings.guidance_scales for lo in range(0, len(index), chunk)]
    for g, lo in tqdm(work, desc="sampling", leave=False, disable=not show_progress):
        gk = guidance_key(g)
        batch = index[lo:lo + chunk]
        measured = measure_prompts(components, probe, batch, g, settings, batch_size, sscd, clock)
        headline = measured.scores[settings.severity_backend]
        for p, i in enumerate(batch):
            sid = int(probe.sample_ids[i])
            common = dict(sample_id=sid, dup_factor=int(probe.dup_factors[i]), guidance_scale=g,
                          guidance_schedule=settings.guidance_schedule)
            labels, seed_labels = measured.label_columns(settings, p)
            labels.pop("label")  # settings.json records the label of every row
            for j, seed in enumerate(settings.seeds):
                result.per_seed.append(dict(common, seed=seed, **measured.per_seed[p][j], **seed_labels[j],
                                            **{f"sev_{b}": float(r.similarity[p, j]) for b, r in measured.scores.items()}))
            row = dict(common, **{k: float(v[lo + p]) for k, v in step_m12.items()})
            row.update(at_own_scale(row, g))
            row.update(severity=float(headline.severity[p]), **labels,
                       **{f"sev_{b}": float(r.severity[p]) for b, r in measured.scores.items()}, **measured.values[p])
            result.per_sample.append(row)
            result.curves.append(dict(sample_id=sid, guidance_scale=g, alpha_bar=measured.traj.alpha_bar.numpy(),
                                      timesteps=measured.traj.timesteps.numpy(),
                                      probe_timesteps=np.asarray(settings.probe_timesteps),
                                      probe_loss_cfg=per_t[f"loss_cfg_{gk}"][lo + p].numpy(),
                                      probe_loss_cfg_x0=per_t[f"loss_cfg_{gk}_x0"][lo + p].numpy(),
                                      probe_loss_cond_x0=per_t["loss_cond_x0"][lo + p].numpy(), **measured.curves[p]))
            if g == settings.guidance_scale:
                image = measured.traj.images[p, 0].permute(1, 2, 0).numpy()
                result.images.append((sid, (image * 255).round().astype(np.uint8)))
        clock("metrics")
    return result


def resolve_settings(args, config) -> EvalSettings:
    """The flags, with what they leave unset taken from the run's config.yaml."""
    use_ema = bool(config["use_ema"])
    weights = args.weights or ("ema" if use_ema else "raw")
    if weights == "ema" and not use_ema:
        raise EvalError("--weights ema but the run was trained without --use_ema; use --weights raw")
    if config["use_lora"] and args.weights == "ema":
        raise EvalError("--weights ema does not apply to a LoRA run; omit --weights")
    seed = args.seed if args.seed is not None else int(config["seed"])
    guidance_scales = sorted(set([args.guidance_scale] + parse_list(args.guidance_scales)))
    high_noise = args.high_noise_timestep if args.high_noise_timestep is not None else config["high_noise_timestep"]
    return EvalSettings(
        weights=weights, seed=seed,
        seeds=tuple(seed + j for j in range(args.num_seeds)), num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale, guidance_scales=tuple(guidance_scales),
        guidance_schedule=args.guidance_schedule,
        **probe_settings(config, args.probe_timesteps, guidance_scales, args.probe_noise_draws),
        deviation_latents=args.deviation_latents,
        backends=SEVERITY_BACKENDS + (("sscd",) if args.sscd_path else ()),
        severity_backend=args.severity_backend,
        threshold=args.threshold if args.threshold is not None else DEFAULT_THRESHOLDS[args.severity_backend],
        label=args.label, copy_ratio=args.copy_ratio,
        high_noise_timestep=int(high_noise), early_steps=args.early_steps, max_samples=args.max_samples,
        model=str(config["pretrained_model_name_or_path"]), dataset=str(config["train_data_dir"]),
        lora=bool(config["use_lora"]), run_fingerprint=(run.recorded_identity(args.run_dir) or {}).get("fingerprint"))


def plan_checkpoints(out_dir: Path, run_dir: Path, models, settings: EvalSettings) -> tuple[list, list[str], list]:
    """(models to evaluate as (step, folder, identity), one line per model skipped or re-evaluated and why, steps
    whose rows to drop). A model is evaluated unless per_sample.csv holds its rows measured on the same weights
    (mem_analysis.run.checkpoint_identity; the base model is 'base'). Rows of a checkpoint whose folder is gone
    are dropped: the weights they measured can no longer be checked. Refuses tables of other settings or runs."""
    stored = {}
    if (out_dir / "per_sample.csv").is_file():
        check_same_settings(out_dir, settings)
        stored = stored_identities(out_dir / "per_sample.csv")
    gone = sorted(set(stored) - {step for step, _ in run.find_checkpoints(run_dir)})
    todo, lines = [], []
    for step, folder in models:
        name, identity = (folder.name, run.checkpoint_identity(folder)) if folder else ("base model", "base")
        if step in stored and stored[step] == identity:
            lines.append(f"skipping {name} (step {step}): already evaluated in {out_dir}")
            continue
        if step in stored:
            why = "its rows record no weights identity" if stored[step] is None else "its weights changed since"
            lines.append(f"re-evaluating {name} (step {step}): {why} its rows in {out_dir} were written")
        todo.append((step, folder, identity))
    if gone:
        lines.append(f"dropping the rows of step(s) {', '.join(map(str, gone))} from {out_dir}: their checkpoint "
                     "folders are gone (deleted, or pruned by --checkpoints_total_limit), so the weights they "
                     "measured cannot be checked")
    return todo, lines, gone


def write_premise_reference(out_dir: Path, components, probe: ProbeSet, settings: EvalSettings, device,
                            batch_size: int) -> None:
    """premise_reference.json: the analytic k_0 of the optimal Gaussian denoiser fitted on the training latents
    (mem_analysis.gaussian_reference.premise_reference) at the probe timesteps and the sampler's first step; and
    premise_latents.safetensors: the pool latents (with their copies in training) and probe latents it used."""
    from safetensors.torch import save_file

    pool_latents = encode_pixels(components.vae, probe.pool_pixels * 2 - 1, device, batch_size)
    first = int(ddim_scheduler(components, settings.num_inference_steps).timesteps[0])
    reference = premise_reference(pool_latents, probe.pool_counts, probe.latents, probe.dup_factors,
                                  settings.probe_timesteps, probe.alpha_bar, first, settings.high_noise_timestep)
    write_text_atomic(out_dir / "premise_reference.json", json.dumps(reference, indent=1))
    tensors = dict(pool_latents=pool_latents, pool_counts=torch.as_tensor(probe.pool_counts, dtype=torch.int64),
                   pool_sample_ids=torch.as_tensor(probe.pool_ids, dtype=torch.int64), probe_latents=probe.latents,
                   probe_sample_ids=torch.as_tensor(probe.sample_ids, dtype=torch.int64),
                   probe_dup_factors=torch.as_tensor(probe.dup_factors, dtype=torch.int64), mu=probe.mu)
    with atomic_path(out_dir / "premise_latents.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


def log_scalars(writer, factor_writers: FactorWriters, per_sample: pd.DataFrame, step: int, settings: EvalSettings):
    """TensorBoard means per duplication factor at the headline guidance scale, at the checkpoint's step:
    `eval/NAME` in the run logs/eval/dup_F of each factor; the D_x-severity correlation in logs/eval."""
    rows = per_sample[per_sample["guidance_scale"] == settings.guidance_scale]
    names = ["severity", "memorized_fraction", "similarity_fraction", "D_x", "D_T", "D_x_exact", "D_T_exact",
             "loss_cond", "loss_cfg", "loss_cfg_early", "k_cfg", "k_cfg_early", "k0_first", "kg_first", "wen_magnitude",
             "diversity"]
    factor_writers.log({f"eval/{name}/dup_{dup}": float(group[name].mean())
                        for dup, group in rows.groupby("dup_factor") for name in names if name in group}, step)
    if len(rows) > 2 and rows["severity"].std() > 0:
        writer.add_scalar("eval/pearson_D_x_severity", float(rows["D_x"].corr(rows["severity"])), step)
    writer.flush()
    factor_writers.flush()


def log_images(factor_writers: FactorWriters, probe: ProbeSet, result: CheckpointResult, step: int) -> None:
    """Per duplication factor, the images generated at the headline g (first seed) below their training images."""
    generated = dict(result.images)
    for factor in sorted(set(int(d) for d in probe.dup_factors)):
        index = [i for i, (sid, dup) in enumerate(zip(probe.sample_ids, probe.dup_factors))
                 if dup == factor and int(sid) in generated]
        if not index:
            continue
        training = (probe.pixels[index].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        made = np.stack([generated[int(probe.sample_ids[i])] for i in index])
        factor_writers.writer(factor).add_image("images/training_above_generated", pair_grid(training, made), step,
                                                dataformats="HWC")


def log_headline(writer, out_dir: Path, step: int) -> None:
    """The report's headline as TensorBoard text at the last checkpoint: headline.md, else the findings of report.md."""
    headline = out_dir / "headline.md"
    if headline.is_file():
        text = headline.read_text()
    else:
        report_text = (out_dir / "report.md").read_text()
        section = report_text.split("## The paper's three findings, on this run", 1)[-1]
        text = section.split("\n## ", 1)[0].strip()
    writer.add_text("report/headline", text, step)
    writer.flush()


def store_checkpoint(out_dir: Path, step: int, name: str, result: CheckpointResult, settings: EvalSettings, writer,
                     factor_writers: FactorWriters | None = None, identity: str | None = None,
                     cut: dict | None = None):
    """Main process: append one model's rows (tables last: they mark the step done), each with the identity of
    the weights measured and, per sample, the tokens its caption loses to the text encoder's window (`cut`)."""
    for row in result.per_seed + result.per_sample:
        row.update(checkpoint_step=step, checkpoint=name, checkpoint_id=identity)
    for row in result.per_sample:
        row["caption_tokens_cut"] = (cut or {}).get(row["sample_id"], 0)
    curves, images = result.curves, result.images
    save_arrays(out_dir / "curves" / f"step-{step}.npz",
                sample_id=np.array([c["sample_id"] for c in curves]),
                guidance_scale=np.array([c["guidance_scale"] for c in curves]),
                **{k: np.stack([c[k] for c in curves]) for k in curves[0] if k not in ("sample_id", "guidance_scale")})
    save_arrays(out_dir / "images" / f"step-{step}.npz", sample_id=np.array([i[0] for i in images]),
                images=np.stack([i[1] for i in images]))
    append_rows(out_dir / "per_seed.csv", result.per_seed, step)
    append_rows(out_dir / "per_sample.csv", result.per_sample, step)
    if writer is not None:
        log_scalars(writer, factor_writers, pd.DataFrame(result.per_sample), step, settings)


def main(args):
    config = read_run(args)
    run_dir = Path(args.run_dir)
    out_dir = output_folder(args.output_dir or run.eval_dir(run_dir, args.guidance_schedule))
    models = run.find_checkpoints(run_dir, args.checkpoints)
    settings = resolve_settings(args, config)
    todo, lines, gone = plan_checkpoints(out_dir, run_dir, models, settings)
    accelerator = Accelerator()
    accelerator.print(use_cpu_threads())  # accelerate launch alone would leave one thread
    is_main = accelerator.is_main_process
    accelerator.wait_for_everyone()  # every process has read the tables before main changes them
    if is_main:
        write_text_atomic(out_dir / "settings.json", json.dumps(settings.as_dict(), indent=1))
        for line in lines:
            print(line)
        drop_steps(out_dir, gone)

    device = accelerator.device
    # --mixed_precision fp16/bf16 runs the networks in that dtype; metrics accumulate in float32.
    dtype = compute_dtype(accelerator.mixed_precision)
    try:
        sscd = load_sscd(args.sscd_path).to(device) if args.sscd_path else None
    except (FileNotFoundError, ValueError) as err:
        raise EvalError(str(err)) from err
    components = load_components(config["pretrained_model_name_or_path"]).to(device, dtype)
    base_unet = components.unet.eval()
    probe = read_probe_set(config, args, components, device) if todo else None
    cut = dict(zip(probe.sample_ids.tolist(), tokens_cut(components.tokenizer, probe.captions))) if todo else {}
    long_captions = cut_prompts_line(components.tokenizer, probe.captions, "probe captions") if todo else None
    if is_main and long_captions:
        print(f"{long_captions} (per_sample.csv column caption_tokens_cut)")
    if probe is not None and sscd is not None:  # the copy label's SSCD back end: the pool's descriptors, once
        probe = replace(probe, pool_sscd=embed_images(probe.pool_pixels, sscd))
    writer = None
    if is_main and todo:
        write_premise_reference(out_dir, components, probe, settings, device, args.batch_size)
        save_arrays(out_dir / "images" / "training.npz", sample_id=probe.sample_ids,
                    images=(probe.pixels.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(args.logging_dir or str(run_dir / config["logging_dir"]
                                                       / run.eval_dir(run_dir, args.guidance_schedule).name))
        factor_writers = FactorWriters(writer.log_dir)
    shard = np.arange(len(probe.sample_ids))[accelerator.process_index::accelerator.num_processes] if todo else None
    failed, timings = [], {}
    for step, folder, identity in tqdm(todo, desc="checkpoints", disable=not is_main):
        name = folder.name if folder else "base"
        try:
            unet = base_unet if folder is None else run.load_checkpoint_unet(folder, base_unet, settings.weights)
        except Exception as err:  # a broken checkpoint must not stop the others
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            if is_main:
                print(f"skipping {name}: cannot load its weights ({type(err).__name__}: {reason})", file=sys.stderr)
            failed.append(name)
            continue
        unet.to(device, dtype).eval().requires_grad_(False)
        result = evaluate_samples(unet, components, probe, shard, settings, args.batch_size, sscd, is_main, timings)
        gathered = gather_object([result])
        if is_main:
            merged = CheckpointResult.merge(gathered)
            store_checkpoint(out_dir, step, name, merged, settings, writer, factor_writers, identity, cut)
            log_images(factor_writers, probe, merged, step)
        accelerator.wait_for_everyone()
    if is_main:
        if timings:
            print("main process time: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
        markdown.write_report(out_dir, settings.as_dict(), failed=failed, n_boot=args.bootstrap, run_dir=run_dir)
        if writer is not None:
            last = int(pd.read_csv(out_dir / "per_sample.csv", usecols=["checkpoint_step"])["checkpoint_step"].max())
            log_headline(writer, out_dir, last)
            writer.close()
            factor_writers.close()
        print(f"wrote {out_dir}/per_seed.csv, per_sample.csv, summary.json, report.md and figures/")
    accelerator.end_training()


def cli(argv=None) -> int:
    """Entry point: bad input is one line on stderr and exit status 2 (mem_analysis.cli)."""
    return run_command(lambda given: main(parse_args(given)), "evaluate_checkpoints.py", argv, bad_input=(EvalError,))


if __name__ == "__main__":
    sys.exit(cli())
