"""The paper's protocol on a given model: M1-M7 on lists of prompts (memorized vs normal, ...).

    python eval/evaluate_prompts.py --model CompVis/stable-diffusion-v1-4 --output_dir OUT \
        --prompts memorized=sdv1_500_memorized.jsonl --prompts normal=normal.txt [--sscd_path SSCD.pt]
    python eval/evaluate_prompts.py --run_dir RUN --checkpoint N --output_dir OUT --prompts probe=captions.txt
    accelerate launch eval/evaluate_prompts.py ...    # shards the prompts over the processes

Each prompt is sampled with DDIM from `--num_seeds` seeds with its trajectory recorded, and measured by
the same code as evaluate_checkpoints: M3-M5 on every seed, Wen et al.'s ||e_c - e_0|| (first step of
the first seed, `wen_magnitude_first`, and over the early steps and all seeds, `wen_magnitude`), and,
where `--references` holds an image whose caption is exactly the prompt, M1/M2 at fixed probe noise on
its latent, severity against it, the copy label (`--label copy`, the default: nearest training image = the paired
one by a margin, d(paired) / d(nearest other reference) < `--copy_ratio`) and k of the sampler's first prediction
(`k0_first`, `kc_first`, `kg_first`). Without a reference, severity is reference-free (each seed's similarity to
the prompt's other seeds), the memorized fraction is the share of seeds over `--threshold` on it (the similarity
label: there is no training pool to test copies against; column `label`) and the decomposition regresses on each
seed's own generated latent (the authors' exploratory variant). Rows are appended after every batch of prompts, so
a rerun skips the prompts already done. A prompt longer than the text encoder's window is cut to it, as every
SD pipeline does: the log says how many were, and `prompt_tokens_cut` in per_prompt.csv how many tokens each
lost. Outputs under --output_dir: per_seed.csv, per_prompt.csv (+ .parquet),
curves.parquet (per-step curves), summary.json (per-set means, correlations with severity, detection
AUROC / TPR at 1% FPR for every pair of sets), figures/ and report.md (eval/prompt_report.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from eval import prompt_report
from eval.tables import EvalError, check_same_settings, write_table
from mem_analysis import guidance_key, run
from mem_analysis.cli import output_folder, run_command
from mem_analysis.io import atomic_path, write_text_atomic
from mem_analysis.measure import (MeasureSettings, ProbeSet, at_own_scale, encode_pixels, measure_prompts, probe_rows,
                                  probe_settings, prompts_per_call)
from mem_analysis.prompts import PromptFileError, load_references, parse_prompt_set, read_prompts
from mem_analysis.schedule import alpha_bar_from_scheduler
from mem_analysis.sd import compute_dtype, cut_prompts_line, encode_prompts, load_components, tokens_cut
from mem_analysis.severity import (BACKENDS, DEFAULT_COPY_RATIO, DEFAULT_THRESHOLDS, LABELS, embed_images, load_sscd,
                                   self_similarity)
from mem_analysis.threads import use_cpu_threads

KEY = ["prompt_set", "prompt"]
# Measures that need no reference image (kept for prompts without one when other prompts have one).
REFERENCE_FREE = {"wen_magnitude", "wen_magnitude_first", "diversity", "collapse_early"}


def parse_args(argv=None):
    """Command-line flags (sampling defaults as the paper: DDIM 50 steps, g = 7.5)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a diffusers Stable Diffusion folder or hub name")
    p.add_argument("--run_dir", default=None, help="a train/finetune.py output folder (with --checkpoint)")
    p.add_argument("--checkpoint", type=int, default=None, help="global step of RUN/checkpoint-N (0 = the base model)")
    p.add_argument("--weights", choices=("ema", "raw"), default=None, help="with --run_dir: default ema if the run used EMA")
    p.add_argument("--prompts", action="append", default=[], metavar="NAME=FILE",
                   help="a prompt set (.txt, .jsonl, .csv, .parquet); repeat for several sets")
    p.add_argument("--prompt_column", default=None, help="field / column of the prompts (default caption, prompt or text)")
    p.add_argument("--max_prompts", type=int, default=None, help="first N prompts of each set")
    p.add_argument("--references", default=None,
                   help="image folder with metadata.jsonl, or a study dataset (default with --run_dir: the run's)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                   help="networks in this dtype (metrics in float32); default accelerate's setting")
    p.add_argument("--num_seeds", type=int, default=10)
    p.add_argument("--seed", type=int, default=None, help="seeds are seed, seed+1, ... (default: the run's seed, else 0)")
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--severity_backend", default=None,
                   help="sscd with --sscd_path, else pixel_cosine with references, else ssim")
    p.add_argument("--sscd_path", default=None, help="TorchScript SSCD model (sscd_disc_mixup.torchscript.pt)")
    p.add_argument("--threshold", type=float, default=None, help="memorization threshold (default: the back end's)")
    p.add_argument("--label", choices=LABELS, default="copy",
                   help="a seed is memorized when it is a copy (prompts with a reference; default) or when its "
                        "similarity is over --threshold (similarity; always so for prompts without a reference)")
    p.add_argument("--copy_ratio", type=float, default=DEFAULT_COPY_RATIO,
                   help="the copy label's distance-ratio threshold (docs/science.md M6)")
    p.add_argument("--probe_timesteps", default=None, help="M1/M2 grid (default: the run's, else the training default)")
    p.add_argument("--high_noise_timestep", type=int, default=None, help="t >= this is early (default: the run's, else 700)")
    p.add_argument("--early_steps", type=int, default=None, help="sampling steps counted as early (default: t >= the window)")
    p.add_argument("--probe_noise_draws", type=int, default=4,
                   help="noise draws per (prompt, t) averaged in M1/M2 where a reference exists (draw 0 = training's)")
    p.add_argument("--deviation_latents", choices=("inputs", "outputs"), default="inputs",
                   help="latents D sums over: inputs x_T..x_1 (default) or outputs x_{T-1}..x_0 (docs/findings.md)")
    p.add_argument("--batch_size", type=int, default=64, help="images sampled and decoded per UNet call")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for confidence intervals")
    p.add_argument("--report_to", choices=("none", "tensorboard"), default="none")
    p.add_argument("--logging_dir", default=None, help="TensorBoard folder (default OUTPUT_DIR/logs)")
    args = p.parse_args(argv)
    if (args.model is None) == (args.run_dir is None):
        raise EvalError("give the model to evaluate: either --model DIR_OR_HUB_NAME or --run_dir RUN --checkpoint N")
    if args.run_dir is not None and args.checkpoint is None:
        raise EvalError("--run_dir needs --checkpoint N (the global step; 0 = the run's base model)")
    if not args.prompts:
        raise EvalError("give at least one prompt set: --prompts NAME=FILE (repeat for memorized / normal sets)")
    if args.probe_noise_draws < 1:
        raise EvalError("--probe_noise_draws must be >= 1")
    if args.num_seeds < 2:
        raise EvalError("--num_seeds must be >= 2 (collapse and reference-free severity compare seeds)")
    if args.severity_backend is not None and args.severity_backend not in BACKENDS:
        raise EvalError(f"unknown --severity_backend {args.severity_backend!r}; choose one of {', '.join(BACKENDS)}")
    if args.severity_backend == "sscd" and not args.sscd_path:
        raise EvalError("--severity_backend sscd needs --sscd_path (a TorchScript SSCD model file)")
    if not 0 < args.copy_ratio <= 1:
        raise EvalError(f"--copy_ratio {args.copy_ratio} must lie in (0, 1]")
    return args


def read_prompt_sets(args) -> dict[str, list[str]]:
    """{set name: prompts} in the order given; one-line errors for unreadable or empty files."""
    sets = {}
    for spec in args.prompts:
        name, path = parse_prompt_set(spec)
        if name in sets:
            raise EvalError(f"prompt set {name!r} is given twice; give each --prompts NAME once")
        sets[name] = read_prompts(path, args.prompt_column, args.max_prompts)
    return sets


@dataclass(frozen=True)
class PromptSettings(MeasureSettings):
    """Everything that shapes the tables (settings.json); a rerun must use the same to append to them."""

    model: str
    weights: str
    references: str | None
    guidance_scale: float


@dataclass
class ModelSource:
    """Where the UNet and the probe settings come from: a pipeline folder, or a run's checkpoint."""

    base: str
    config: dict
    checkpoint: Path | None
    weights: str
    name: str
    mu: torch.Tensor | None = None  # the run's saved probe mu


def model_source(args) -> ModelSource:
    """--model, or --run_dir + --checkpoint read through evaluate_checkpoints (mem_analysis.run's defaults)."""
    if args.model is not None:
        if not Path(args.model).exists() and (args.model.startswith((".", "/")) or args.model.count("/") != 1):
            raise EvalError(f"--model {args.model} does not exist; give a diffusers pipeline folder or a hub name")
        return ModelSource(args.model, dict(run.RUN_DEFAULTS), None, "raw", args.model)
    config = run.read_run(args.run_dir)
    (step, folder), = run.find_checkpoints(args.run_dir, str(args.checkpoint))
    weights = args.weights or ("ema" if config["use_ema"] else "raw")
    if weights == "ema" and not config["use_ema"]:
        raise EvalError("--weights ema but the run was trained without --use_ema; use --weights raw")
    name = f"{args.run_dir} {folder.name if folder else 'base model'} ({weights})"
    return ModelSource(str(config["pretrained_model_name_or_path"]), config, folder, weights, name,
                       run.read_probe_mu(args.run_dir))


def resolve_settings(args, source: ModelSource) -> PromptSettings:
    """The flags, with what they leave unset taken from the run (or mem_analysis.run's defaults)."""
    config = source.config
    references = args.references or config.get("train_data_dir")
    backend = args.severity_backend or ("sscd" if args.sscd_path else "pixel_cosine" if references else "ssim")
    if not references and backend in ("pixel_cosine", "latent_cosine", "nn_identity"):
        raise EvalError(f"--severity_backend {backend} needs --references (a training mean or pool); "
                        "reference-free severity uses ssim, l2 or sscd")
    seed = args.seed if args.seed is not None else int(config["seed"])
    high = args.high_noise_timestep if args.high_noise_timestep is not None else config["high_noise_timestep"]
    return PromptSettings(
        seeds=tuple(seed + j for j in range(args.num_seeds)), num_inference_steps=args.num_inference_steps,
        backends=tuple(b for b in BACKENDS if b != "sscd" or args.sscd_path), severity_backend=backend,
        threshold=args.threshold if args.threshold is not None else DEFAULT_THRESHOLDS[backend],
        label=args.label, copy_ratio=args.copy_ratio, high_noise_timestep=int(high), early_steps=args.early_steps,
        model=source.name, weights=source.weights,
        references=str(references) if references else None, guidance_scale=args.guidance_scale,
        **probe_settings(config, args.probe_timesteps, [args.guidance_scale], args.probe_noise_draws),
        deviation_latents=args.deviation_latents)


def load_model(source: ModelSource, device, dtype):
    """Components with the UNet of the chosen checkpoint (full, EMA or LoRA, through mem_analysis.run)."""
    try:
        components = load_components(source.base)
        if source.checkpoint is not None:
            components = replace(components, unet=run.load_checkpoint_unet(source.checkpoint, components.unet,
                                                                              source.weights))
    except (OSError, ValueError) as err:  # FileNotFoundError is an OSError
        raise EvalError(f"cannot load {source.checkpoint or source.base}: {str(err).strip().splitlines()[0]}") from err
    components.to(device, dtype)
    components.unet.eval().requires_grad_(False)
    return components


def reference_pool(settings: PromptSettings, source: ModelSource, components, batch_size: int, device, sscd=None):
    """(ProbeSet of every reference image, captions) or (None, None): what measure_prompts reads of a prompt's pair."""
    if not settings.references:
        return None, None
    vae = components.vae
    resolution = components.unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    try:
        refs = load_references(settings.references, resolution)
    except PromptFileError as err:
        raise EvalError(str(err)) from err
    latents = encode_pixels(vae, refs.pixels * 2 - 1, device, batch_size)
    weights = torch.as_tensor(refs.weights, dtype=torch.float32)[:, None, None, None]
    # mu: the run's saved probe mu (k then equals the training probes), else the training-set mean latent
    mu = source.mu if source.mu is not None else (latents * weights).sum(0)
    empty = torch.empty(0)
    pool = ProbeSet(sample_ids=refs.sample_ids, dup_factors=np.zeros(len(latents), int), captions=refs.captions,
                    cond=empty, uncond=empty, latents=latents, pixels=refs.pixels, pool_pixels=refs.pixels,
                    pool_ids=refs.sample_ids, pool_index=np.arange(len(latents)), mu=mu.float().cpu(),
                    mean_image=(refs.pixels * weights).sum(0),
                    alpha_bar=alpha_bar_from_scheduler(components.noise_scheduler), pool_counts=refs.weights,
                    pool_sscd=embed_images(refs.pixels, sscd) if sscd is not None else None)
    return pool, refs


def work_items(sets: dict, refs, done: set) -> list[tuple]:
    """(set, prompt, reference row or -1) for every prompt not yet done, in set order."""
    items = []
    for name, prompts in sets.items():
        index = refs.index_of(prompts) if refs is not None else np.full(len(prompts), -1)
        items += [(name, p, int(i)) for p, i in zip(prompts, index) if (name, p) not in done]
    return items


def shard_chunks(items: list, process: int, processes: int, chunk: int) -> list[list]:
    """This process's share (every processes-th item), in chunks that are all matched or all reference-free."""
    mine = items[process::processes]
    chunks = []
    for matched in (True, False):
        group = [it for it in mine if (it[2] >= 0) == matched]
        chunks += [group[lo:lo + chunk] for lo in range(0, len(group), chunk)]
    return chunks


def chunk_probe(components, pool: ProbeSet | None, chunk: list) -> ProbeSet:
    """The chunk's prompts as a ProbeSet: its references' rows (with the prompts' text embeddings) when they
    have references, else the prompts alone (reference-free: only captions, mu and mean image are read)."""
    rows = np.asarray([it[2] for it in chunk])
    embeds = encode_prompts(components.tokenizer, components.text_encoder, [it[1] for it in chunk] + [""]).float().cpu()
    if pool is None:
        empty = torch.empty(0)
        return ProbeSet(np.full(len(chunk), -1), np.zeros(len(chunk), int), [it[1] for it in chunk], embeds[:-1],
                        embeds[-1:], empty, empty, empty, np.zeros(0, int), np.full(len(chunk), -1), None, None,
                        alpha_bar_from_scheduler(components.noise_scheduler))
    if rows[0] < 0:
        return replace(pool, captions=[it[1] for it in chunk], cond=embeds[:-1], uncond=embeds[-1:])
    return replace(pool, sample_ids=pool.sample_ids[rows], captions=[it[1] for it in chunk], cond=embeds[:-1],
                   uncond=embeds[-1:], latents=pool.latents[rows], pixels=pool.pixels[rows], pool_index=rows)


def own_similarity(traj, settings: PromptSettings, probe: ProbeSet, sscd):
    """Reference-free similarity (each seed vs the prompt's other seeds) with the headline back end, or None."""
    backend, threshold = settings.severity_backend, settings.threshold
    if backend == "nn_identity":
        return None
    if backend == "latent_cosine":
        return self_similarity(traj.final, backend, threshold, probe.mu)
    return self_similarity(traj.images, backend, threshold, probe.mean_image, sscd)


def measure_chunk(components, pool: ProbeSet | None, chunk: list, settings: PromptSettings, batch_size: int,
                  sscd=None) -> tuple[list, list, list]:
    """Per-seed rows, per-prompt rows and per-step curves of one chunk of prompts (all matched or none),
    measured by mem_analysis.measure_prompts as evaluate_checkpoints measures probe samples."""
    matched = chunk[0][2] >= 0
    probe = chunk_probe(components, pool, chunk)
    index = np.arange(len(chunk))
    measured = measure_prompts(components, probe, index, settings.guidance_scale, settings, batch_size, sscd,
                               reference_free=not matched)
    probe_means, per_timestep = (probe_rows(components.unet, components, probe, index, settings, batch_size)
                                 if matched else ({}, {}))
    gk = guidance_key(settings.guidance_scale)
    # references exist but not for these prompts: no severity, no measure that needs a reference
    scores = {} if pool is not None and not matched else measured.scores
    measured = replace(measured, scores=scores)
    own = own_similarity(measured.traj, settings, probe, sscd)
    sims = dict(scores, **({"self": own} if own is not None else {}))
    headline = scores.get(settings.severity_backend)
    per_seed, per_prompt, curves = [], [], []
    cut = tokens_cut(components.tokenizer, [prompt for _, prompt, _ in chunk])
    for p, (name, prompt, row) in enumerate(chunk):
        values, seed_values, curve = measured.values[p], measured.per_seed[p], measured.curves[p]
        if pool is not None and not matched:  # only what needs no reference, so sets compare like with like
            values = {k: v for k, v in values.items() if k.startswith(("D_x_final", "D_T_final")) or k in REFERENCE_FREE}
            seed_values = [{k: v for k, v in sv.items() if k in REFERENCE_FREE} for sv in seed_values]
            curve = {k: v for k, v in curve.items() if k not in ("w_x", "w_T")}  # regressed on their own latents
        key = dict(prompt_set=name, prompt=prompt)
        labels, seed_labels = measured.label_columns(settings, p)
        for j, seed in enumerate(settings.seeds):
            per_seed.append(dict(key, seed=seed, **seed_values[j], **seed_labels[j],
                                 **{f"sev_{b}": float(r.similarity[p, j]) for b, r in sims.items()}))
        record = dict(key, reference=matched, sample_id=int(probe.sample_ids[p]) if matched else -1,
                      prompt_tokens_cut=cut[p],
                      severity=float(headline.severity[p]) if headline else float("nan"), **labels,
                      **values, **{f"sev_{b}": float(r.severity[p]) for b, r in sims.items()})
        if matched:
            record.update({k: float(v[p]) for k, v in probe_means.items()})
            record.update(at_own_scale(record, settings.guidance_scale))
            curve = dict(curve, **{name_: per_timestep[f"{name_}_{gk}" if "cfg" in name_ else name_][p].numpy()
                                   for name_ in ("loss_cfg", "k_cfg", "loss_cond", "k_cond")})
        per_prompt.append(record)
        curves.append(dict(key, timesteps=measured.traj.timesteps.numpy(), alpha_bar=measured.traj.alpha_bar.numpy(),
                           **curve))
    return per_seed, per_prompt, curves


def done_prompts(out_dir: Path, settings: PromptSettings) -> set:
    """(set, prompt) pairs already in per_prompt.csv; refuses to mix tables made with other settings."""
    if not (out_dir / "per_prompt.csv").is_file():
        return set()
    check_same_settings(out_dir, settings)
    table = pd.read_csv(out_dir / "per_prompt.csv", usecols=KEY, keep_default_na=False, dtype=str)
    return set(zip(table["prompt_set"], table["prompt"]))


def read_table(path: Path) -> pd.DataFrame:
    """A table of this script (prompts stay text: 'NA' or '1' are prompts, empty cells are NaN)."""
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"prompt": str, "prompt_set": str})


def append_table(path: Path, rows: list[dict], sort: list[str]):
    """Append rows to a table (CSV + parquet, or parquet alone), replacing earlier rows of the same prompts."""
    new = pd.DataFrame(rows)
    if path.is_file():
        old = read_table(path)
        old = old[~pd.MultiIndex.from_frame(old[KEY]).isin(pd.MultiIndex.from_frame(new[KEY]))]
        new = pd.concat([old, new], ignore_index=True)
    new = new.sort_values(sort, kind="stable")
    if path.suffix == ".parquet":
        with atomic_path(path) as tmp:
            new.to_parquet(tmp, index=False)
    else:
        write_table(new, path)


def store_round(out_dir: Path, gathered: list, order: dict):
    """Main process: the round's rows from every process, appended (per_prompt last: it marks prompts done)."""
    per_seed = [r for part in gathered for r in part[0]]
    per_prompt = [r for part in gathered for r in part[1]]
    curves = [{k: (v.astype(float).tolist() if isinstance(v, np.ndarray) else v) for k, v in c.items()}
              for part in gathered for c in part[2]]
    if not per_prompt:
        return

    def ranked(rows):
        return [dict(r, order=order[(r["prompt_set"], r["prompt"])]) for r in rows]

    append_table(out_dir / "curves.parquet", ranked(curves), ["order"])
    append_table(out_dir / "per_seed.csv", ranked(per_seed), ["order", "seed"])
    append_table(out_dir / "per_prompt.csv", ranked(per_prompt), ["order"])


def main(args):
    sets = read_prompt_sets(args)
    source = model_source(args)
    settings = resolve_settings(args, source)
    out_dir = output_folder(args.output_dir)
    done = done_prompts(out_dir, settings)
    accelerator = Accelerator(**({"mixed_precision": args.mixed_precision} if args.mixed_precision else {}))
    accelerator.print(use_cpu_threads())  # accelerate launch alone would leave one thread
    is_main, device = accelerator.is_main_process, accelerator.device
    # --mixed_precision fp16/bf16 runs the networks in that dtype; metrics accumulate in float32.
    dtype = compute_dtype(accelerator.mixed_precision)
    try:
        sscd = load_sscd(args.sscd_path).to(device) if args.sscd_path else None
    except (FileNotFoundError, ValueError) as err:
        raise EvalError(str(err)) from err
    components = load_model(source, device, dtype)
    pool, refs = reference_pool(settings, source, components, args.batch_size, device, sscd)
    accelerator.wait_for_everyone()  # every process has read the done set before main appends
    if is_main:
        write_text_atomic(out_dir / "settings.json", json.dumps(settings.as_dict(), indent=1))
        if done:
            print(f"skipping {len(done)} prompts already evaluated in {out_dir}")
        for name, prompts in sets.items():
            line = cut_prompts_line(components.tokenizer, prompts, f"prompts of set {name}")
            if line:
                print(f"{line} (per_prompt.csv column prompt_tokens_cut)")
    items = work_items(sets, refs, done)
    order = {(name, p): k for k, (name, p) in enumerate((n, p) for n, ps in sets.items() for p in ps)}
    chunk = prompts_per_call(settings, args.batch_size, components.unet.config.in_channels
                                * components.unet.config.sample_size ** 2)
    plans = [shard_chunks(items, r, accelerator.num_processes, chunk) for r in range(accelerator.num_processes)]
    mine = plans[accelerator.process_index]
    for k in tqdm(range(max(len(plan) for plan in plans)), desc="prompt batches", disable=not is_main):
        result = measure_chunk(components, pool, mine[k], settings, args.batch_size, sscd) if k < len(mine) \
            else ([], [], [])
        gathered = gather_object([result])
        if is_main:
            store_round(out_dir, gathered, order)
        accelerator.wait_for_everyone()
    if is_main:
        unmatched = {name: int((refs.index_of(ps) < 0).sum()) for name, ps in sets.items()} if refs else {}
        prompt_report.write_report(out_dir, dict(settings.as_dict(), unmatched=unmatched), n_boot=args.bootstrap,
                                   tensorboard_dir=(args.logging_dir or str(out_dir / "logs"))
                                   if args.report_to == "tensorboard" else None, step=args.checkpoint or 0)
        print(f"wrote {out_dir}/per_seed.csv, per_prompt.csv, summary.json, report.md and figures/")
    accelerator.end_training()


def cli(argv=None) -> int:
    """Entry point: bad input is one line on stderr and exit status 2 (mem_analysis.cli)."""
    return run_command(lambda given: main(parse_args(given)), "evaluate_prompts.py", argv,
                       bad_input=(EvalError, PromptFileError))


if __name__ == "__main__":
    sys.exit(cli())
