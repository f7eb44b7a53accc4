"""The paper's protocol on a given model: M1-M7 on lists of prompts (memorized vs normal, ...).

    python eval/evaluate_prompts.py --model CompVis/stable-diffusion-v1-4 --output_dir OUT \
        --prompts memorized=sdv1_500_memorized.jsonl --prompts normal=normal.txt [--sscd_path SSCD.pt]
    python eval/evaluate_prompts.py --run_dir RUN --checkpoint N --output_dir OUT --prompts probe=captions.txt
    accelerate launch eval/evaluate_prompts.py ...    # shards the prompts over the processes

Each prompt is sampled with DDIM from `--num_seeds` seeds with its trajectory recorded, and measured by
the same code as evaluate_checkpoints: M3-M5 on every seed, Wen et al.'s ||e_c - e_0|| (first step of
the first seed, `wen_magnitude_first`, and over the early steps and all seeds, `wen_magnitude`), and,
where `--references` holds an image whose caption is exactly the prompt, M1/M2 at fixed probe noise on
its latent and severity against it. Without a reference, severity is reference-free (each seed's
similarity to the prompt's other seeds) and the decomposition regresses on each seed's own generated
latent (the authors' exploratory variant). Rows are appended after every batch of prompts, so a rerun
skips the prompts already done. Outputs under --output_dir: per_seed.csv, per_prompt.csv (+ .parquet),
curves.parquet (per-step curves), summary.json (per-set means, correlations with severity, detection
AUROC / TPR at 1% FPR for every pair of sets), figures/ and report.md (eval/prompt_report.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_file
from tqdm.auto import tqdm

import evaluate_checkpoints as ev  # eval/, beside this script
import prompt_report
from mem_analysis import (alpha_bar_from_scheduler, guidance_key, prediction_type_of, probe_metrics, probe_noise,
                          summarize_probe_metrics)
from mem_analysis.alignment import wen_magnitude
from mem_analysis.prompts import PromptFileError, load_references, parse_prompt_set, read_prompts
from mem_analysis.sampling import sample_trajectories
from mem_analysis.sd import decode_latents, encode_images, encode_prompts, load_components
from mem_analysis.severity import BACKENDS, DEFAULT_THRESHOLDS, load_sscd, self_similarity

# The training flag table's probe grid and window (train/finetune_config.py), for models without a run.
DEFAULT_PROBE_TIMESTEPS = "50,150,250,350,450,550,650,750,850,950"
DEFAULT_PROBE_SCALES = "1.5,3,7.5"
KEY = ["prompt_set", "prompt"]
# Measures that need no reference image (kept for prompts without one when other prompts have one).
REFERENCE_FREE = {"wen_magnitude", "diversity", "collapse_early"}


class EvalError(Exception):
    """Bad input: reported as one line, exit status 2."""


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
    p.add_argument("--probe_timesteps", default=None, help=f"M1/M2 grid (default: the run's, else {DEFAULT_PROBE_TIMESTEPS})")
    p.add_argument("--high_noise_timestep", type=int, default=None, help="t >= this is early (default: the run's, else 700)")
    p.add_argument("--early_steps", type=int, default=None, help="sampling steps counted as early (default: t >= the window)")
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
    if args.num_seeds < 2:
        raise EvalError("--num_seeds must be >= 2 (collapse and reference-free severity compare seeds)")
    if args.severity_backend is not None and args.severity_backend not in BACKENDS:
        raise EvalError(f"unknown --severity_backend {args.severity_backend!r}; choose one of {', '.join(BACKENDS)}")
    if args.severity_backend == "sscd" and not args.sscd_path:
        raise EvalError("--severity_backend sscd needs --sscd_path (a TorchScript SSCD model file)")
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


@dataclass
class ModelSource:
    """Where the UNet and the probe settings come from: a pipeline folder, or a run's checkpoint."""

    base: str
    config: dict
    checkpoint: Path | None
    weights: str
    name: str


def model_source(args) -> ModelSource:
    """--model, or --run_dir + --checkpoint through evaluate_checkpoints' run reader."""
    if args.model is not None:
        if not Path(args.model).exists() and (args.model.startswith((".", "/")) or args.model.count("/") != 1):
            raise EvalError(f"--model {args.model} does not exist; give a diffusers pipeline folder or a hub name")
        return ModelSource(args.model, {}, None, "raw", args.model)
    run = argparse.Namespace(run_dir=args.run_dir, pretrained_model_name_or_path=None, train_data_dir=None)
    try:
        config = ev.read_run(run)
        (step, folder), = ev.find_checkpoints(Path(args.run_dir), str(args.checkpoint))
    except ev.EvalError as err:
        raise EvalError(str(err)) from err
    use_ema = bool(config.get("use_ema"))
    weights = args.weights or ("ema" if use_ema else "raw")
    if weights == "ema" and not use_ema:
        raise EvalError("--weights ema but the run was trained without --use_ema; use --weights raw")
    name = f"{args.run_dir} {folder.name if folder else 'base model'} ({weights})"
    return ModelSource(str(config["pretrained_model_name_or_path"]), config, folder, weights, name)


def resolve_settings(args, source: ModelSource, sets: dict) -> dict:
    """Everything that shapes the tables; a rerun must use the same to append to them."""
    config = source.config
    references = args.references or config.get("train_data_dir")
    seed = args.seed if args.seed is not None else int(config.get("seed") or 0)
    backend = args.severity_backend or ("sscd" if args.sscd_path else "pixel_cosine" if references else "ssim")
    if not references and backend in ("pixel_cosine", "latent_cosine", "nn_identity"):
        raise EvalError(f"--severity_backend {backend} needs --references (a training mean or pool); "
                        "reference-free severity uses ssim, l2 or sscd")
    high = args.high_noise_timestep if args.high_noise_timestep is not None else int(config.get("probe_high_noise_from") or 700)
    probe_timesteps = ev.parse_list(args.probe_timesteps or config.get("probe_timesteps") or DEFAULT_PROBE_TIMESTEPS, int)
    probe_scales = sorted(set(ev.parse_list(config.get("probe_guidance_scales") or DEFAULT_PROBE_SCALES) + [args.guidance_scale]))
    return dict(model=source.name, weights=source.weights, references=str(references) if references else None,
                prompt_sets={k: len(v) for k, v in sets.items()}, seeds=[seed + j for j in range(args.num_seeds)],
                probe_seed=int(config.get("probe_seed") or 0), num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale, severity_backend=backend,
                threshold=args.threshold if args.threshold is not None else DEFAULT_THRESHOLDS[backend],
                sscd=bool(args.sscd_path), high_noise_timestep=high, early_steps=args.early_steps,
                probe_timesteps=probe_timesteps, probe_guidance_scales=probe_scales)


def load_model(source: ModelSource, device, dtype):
    """Components with the UNet of the chosen checkpoint (full, EMA or LoRA as evaluate_checkpoints loads it)."""
    try:
        components = load_components(source.base)
    except (OSError, FileNotFoundError, ValueError) as err:
        raise EvalError(f"cannot load the model {source.base}: {str(err).strip().splitlines()[0]}") from err
    if source.checkpoint is not None:
        base_state = {k: v.detach().clone() for k, v in components.unet.state_dict().items()}
        try:
            unet = ev.checkpoint_unet(source.checkpoint, source.weights, base_state, components)
        except (OSError, FileNotFoundError, ValueError) as err:
            raise EvalError(f"cannot load {source.checkpoint}: {str(err).strip().splitlines()[0]}") from err
        components = replace(components, unet=unet)
    components.to(device, dtype)
    components.unet.eval().requires_grad_(False)
    return components


def reference_set(settings: dict, source: ModelSource, components, batch_size: int, device) -> dict | None:
    """Reference pool in the shape evaluate_checkpoints' measurements take (pixels, latents, mu, mean image)."""
    if not settings["references"]:
        return None
    vae = components.vae
    resolution = components.unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    try:
        refs = load_references(settings["references"], resolution)
    except PromptFileError as err:
        raise EvalError(str(err)) from err
    latents = torch.cat([encode_images(vae, (chunk * 2 - 1).to(device)).float().cpu()
                         for chunk in refs.pixels.split(batch_size)])
    weights = torch.as_tensor(refs.weights, dtype=torch.float32)[:, None, None, None]
    # mu: the run's own probe mu when saved (k then equals the training probes), else the training-set mean
    saved_mu = Path(source.config.get("output_dir_of_run", "")) / "probe_mu.safetensors"
    mu = load_file(saved_mu)["mu"].float().cpu() if source.config and saved_mu.is_file() else (latents * weights).sum(0)
    return dict(refs=refs, pixels=refs.pixels, latents=latents, pool_pixels=refs.pixels, mu=mu,
                pool_index=np.arange(len(latents)), mean_image=(refs.pixels * weights).sum(0))


def work_items(sets: dict, pool: dict | None, done: set) -> list[tuple]:
    """(set, prompt, reference row or -1) for every prompt not yet done, in set order."""
    items = []
    for name, prompts in sets.items():
        index = pool["refs"].index_of(prompts) if pool else np.full(len(prompts), -1)
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


def probe_rows(components, pool, chunk, settings, batch_size, device) -> tuple[dict, dict]:
    """M1/M2 at the fixed probe noise of each reference's sample id: per-prompt means and per-t curves."""
    rows = [it[2] for it in chunk]
    timesteps = settings["probe_timesteps"]
    ids = pool["refs"].sample_ids[rows]
    noise = probe_noise(ids, timesteps, pool["latents"].shape[1:], settings["probe_seed"])
    embeds = encode_prompts(components.tokenizer, components.text_encoder, [it[1] for it in chunk] + [""]).float()
    raw = probe_metrics(components.unet, pool["latents"][rows].to(device), embeds[:-1].to(device), embeds[-1:].to(device),
                        timesteps, noise, alpha_bar_from_scheduler(components.noise_scheduler),
                        settings["probe_guidance_scales"], mu=pool["mu"].to(device),
                        prediction_type=prediction_type_of(components.noise_scheduler), chunk_size=batch_size)
    means = summarize_probe_metrics(raw, timesteps, settings["high_noise_timestep"])
    means = {(k[:-5] if k.endswith("_mean") else k[:-5] + "_early"): v for k, v in means.items()}
    gk = guidance_key(settings["guidance_scale"])
    for name in ("loss_cfg", "k_cfg"):
        means[name], means[f"{name}_early"] = means[f"{name}_{gk}"], means[f"{name}_{gk}_early"]
    curves = {"loss_cfg": raw[f"loss_cfg_{gk}"], "k_cfg": raw[f"k_cfg_{gk}"], "loss_cond": raw["loss_cond"],
              "k_cond": raw["k_cond"]}
    return means, curves


def own_similarity(traj, backend: str, threshold: float, pool: dict | None, sscd):
    """Reference-free similarity (each seed vs the prompt's other seeds) with the headline back end, or None."""
    if backend == "nn_identity":
        return None
    if backend == "latent_cosine":
        return self_similarity(traj.final, backend, threshold, pool["mu"])
    return self_similarity(traj.images, backend, threshold, pool["mean_image"] if pool else None, sscd)


def measure_chunk(components, pool, chunk, settings, args, sscd, device) -> tuple[list, list, list]:
    """Per-seed rows, per-prompt rows and per-step curves of one chunk of prompts (all matched or none)."""
    matched = chunk[0][2] >= 0
    seeds = settings["seeds"]
    traj = sample_trajectories(components, [it[1] for it in chunk], seeds, args.num_inference_steps,
                               settings["guidance_scale"], batch_size=args.batch_size, decode=False)
    latents = traj.final.reshape((-1,) + tuple(traj.final.shape[2:]))
    pixels = torch.cat([decode_latents(components.vae, part.to(device)).cpu() for part in latents.split(args.batch_size)])
    traj = replace(traj, images=pixels.reshape(traj.final.shape[:2] + pixels.shape[1:]))
    early = settings["early_steps"] or max(1, int((traj.timesteps >= settings["high_noise_timestep"]).sum()))
    backend, threshold = settings["severity_backend"], settings["threshold"]
    if matched:
        rows = np.asarray([it[2] for it in chunk])
        scores = ev.severity_scores(traj, pool, rows, dict(
            settings, backends=[b for b in BACKENDS if b != "sscd" or sscd is not None]), sscd)
        probe_means, probe_curves = probe_rows(components, pool, chunk, settings, args.batch_size, device)
    elif pool is None:  # no references at all: every back end that needs none
        scores = {b: self_similarity(traj.images, b, threshold if b == backend else None, sscd_model=sscd)
                  for b in ("ssim", "l2") + (("sscd",) if sscd is not None else ())}
    else:  # references exist but not for this prompt: no severity, no reference-based measure
        scores = {}
    own = own_similarity(traj, backend, threshold, pool, sscd)
    sims = dict(scores, **({"self": own} if own is not None else {}))
    per_seed, per_prompt, curves = [], [], []
    for p, (name, prompt, row) in enumerate(chunk):
        x = pool["latents"][row] if matched else traj.final[p]  # no reference: each seed's own generated latent
        values, seed_values, curve = ev.prompt_measurements(traj, p, x, pool["mu"] if pool else None, early)
        if not matched and pool is not None:  # keep only what needs no reference, so sets compare like with like
            values = {k: v for k, v in values.items() if k.startswith(("D_x_final", "D_T_final")) or k in REFERENCE_FREE}
            seed_values = [{k: v for k, v in sv.items() if k in REFERENCE_FREE} for sv in seed_values]
        first = wen_magnitude(traj.e_c[p][:1], traj.e_0[p][:1], first_steps=1)
        key = dict(prompt_set=name, prompt=prompt)
        for j, seed in enumerate(seeds):
            per_seed.append(dict(key, seed=seed, **seed_values[j],
                                 **{f"sev_{b}": float(r.similarity[p, j]) for b, r in sims.items()}))
        headline = scores.get(backend)
        record = dict(key, reference=matched, sample_id=int(pool["refs"].sample_ids[row]) if matched else -1,
                      severity=float(headline.severity[p]) if headline else float("nan"),
                      memorized_fraction=float(headline.memorized_fraction[p]) if headline else float("nan"),
                      wen_magnitude_first=float(first[0]), **values,
                      **{f"sev_{b}": float(r.severity[p]) for b, r in sims.items()})
        if matched:
            record.update({k: float(v[p]) for k, v in probe_means.items()})
            curve.update({k: v[p].numpy() for k, v in probe_curves.items()})
        per_prompt.append(record)
        curves.append(dict(key, timesteps=traj.timesteps.numpy(), alpha_bar=traj.alpha_bar.numpy(), **curve))
    return per_seed, per_prompt, curves


def done_prompts(out_dir: Path, settings: dict) -> set:
    """(set, prompt) pairs already in per_prompt.csv; refuses to mix tables made with other settings."""
    if not (out_dir / "per_prompt.csv").is_file():
        return set()
    saved = out_dir / "settings.json"
    if saved.is_file():
        previous = json.loads(saved.read_text())
        changed = sorted(k for k in settings if k != "prompt_sets" and previous.get(k) != settings[k])
        if changed:
            raise EvalError(f"{out_dir} holds results made with other settings ({', '.join(changed)}); "
                            "use another --output_dir or the same settings")
    table = pd.read_csv(out_dir / "per_prompt.csv", usecols=KEY, keep_default_na=False, dtype=str)
    return set(zip(table["prompt_set"], table["prompt"]))


def append_table(path: Path, rows: list[dict], sort: list[str], parquet_only: bool = False):
    """Append rows to a table, replacing earlier rows of the same prompts (a partial earlier write)."""
    new = pd.DataFrame(rows)
    if path.is_file():
        old = pd.read_parquet(path) if parquet_only else pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"prompt": str, "prompt_set": str})
        old = old[~pd.MultiIndex.from_frame(old[KEY]).isin(pd.MultiIndex.from_frame(new[KEY]))]
        new = pd.concat([old, new], ignore_index=True)
    new = new.sort_values(sort, kind="stable")
    if parquet_only:
        tmp = path.with_name(f".{path.name}.tmp")
        new.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    else:
        ev.write_atomic(new, path)


def store_round(out_dir: Path, gathered: list, order: dict):
    """Main process: the round's rows from every process, appended (per_prompt last: it marks prompts done)."""
    per_seed = [r for part in gathered for r in part[0]]
    per_prompt = [r for part in gathered for r in part[1]]
    curves = [c for part in gathered for c in part[2]]
    if not per_prompt:
        return
    rank = lambda frame_rows: [dict(r, order=order[(r["prompt_set"], r["prompt"])]) for r in frame_rows]  # noqa: E731
    append_table(out_dir / "curves.parquet", rank([{k: (list(map(float, v)) if isinstance(v, np.ndarray) else v)
                                                     for k, v in c.items()} for c in curves]), ["order"], True)
    append_table(out_dir / "per_seed.csv", rank(per_seed), ["order", "seed"])
    append_table(out_dir / "per_prompt.csv", rank(per_prompt), ["order"])


def main(args):
    sets = read_prompt_sets(args)
    source = model_source(args)
    settings = resolve_settings(args, source, sets)
    out_dir = Path(args.output_dir)
    done = done_prompts(out_dir, settings)
    accelerator = Accelerator(**({"mixed_precision": args.mixed_precision} if args.mixed_precision else {}))
    is_main, device = accelerator.is_main_process, accelerator.device
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    try:
        sscd = load_sscd(args.sscd_path).to(device) if args.sscd_path else None
    except (FileNotFoundError, ValueError) as err:
        raise EvalError(str(err)) from err
    components = load_model(source, device, dtype)
    pool = reference_set(settings, source, components, args.batch_size, device)
    accelerator.wait_for_everyone()  # every process has read the done set before main appends
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / ".settings.json.tmp"
        tmp.write_text(json.dumps(settings, indent=1))
        os.replace(tmp, out_dir / "settings.json")
        if done:
            print(f"skipping {len(done)} prompts already evaluated in {out_dir}")
    items = work_items(sets, pool, done)
    order = {(name, p): k for k, (name, p) in enumerate((n, p) for n, ps in sets.items() for p in ps)}
    chunk = ev.prompts_per_call(args, args.num_seeds, components.unet.config.in_channels
                                * components.unet.config.sample_size ** 2)
    plans = [shard_chunks(items, r, accelerator.num_processes, chunk) for r in range(accelerator.num_processes)]
    mine = plans[accelerator.process_index]
    rounds = max(len(plan) for plan in plans)
    for k in tqdm(range(rounds), desc="prompt batches", disable=not is_main):
        result = measure_chunk(components, pool, mine[k], settings, args, sscd, device) if k < len(mine) else ([], [], [])
        gathered = gather_object([result])
        if is_main:
            store_round(out_dir, gathered, order)
        accelerator.wait_for_everyone()
    if is_main:
        if pool is not None:
            settings["unmatched"] = {name: int((pool["refs"].index_of(ps) < 0).sum()) for name, ps in sets.items()}
        prompt_report.write_report(out_dir, settings, n_boot=args.bootstrap,
                                   tensorboard_dir=(args.logging_dir or str(out_dir / "logs"))
                                   if args.report_to == "tensorboard" else None, step=args.checkpoint or 0)
        print(f"wrote {out_dir}/per_seed.csv, per_prompt.csv, summary.json, report.md and figures/")
    accelerator.end_training()


def cli(argv=None) -> int:
    """Entry point: bad input is one line on stderr and exit status 2."""
    try:
        main(parse_args(argv))
    except (EvalError, PromptFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
