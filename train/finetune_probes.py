"""Probes of train/finetune.py: the fixed probe inputs, M1 + M2 on the training weights at a probe step, and
what a probe step writes (probes.jsonl, the early warning's warnings.jsonl and announcements, TensorBoard).

Probe inputs are computed once: probe latents are VAE posterior means, captions go through the frozen text
encoder once, noise is fixed by (probe_seed, sample_id, timestep), and `mu` (for the centred k of M2, the
mean posterior-mean latent over the train rows, duplicates counted as trained; saved as
`output_dir/probe_mu.safetensors`) comes from the unique images' posteriors (train/finetune_cache.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from mem_analysis import run
from mem_analysis.data import image_to_tensor, resize_and_crop
from mem_analysis.early_warning import mean_loss_cond, score_step
from mem_analysis.probes import probe_metrics, probe_noise
from mem_analysis.sd import encode_images, encode_prompts
from train.finetune_data import pick_caption

PROBE_ROW_KEYS = ("step", "sample_id", "dup_factor", "timestep")


@dataclass
class ProbeInputs:
    """This process's shard of the probe split, padded to equal size on every process (`valid` marks real rows)."""

    sample_ids: list
    dup_factors: list
    valid: list
    latents: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor
    noise: torch.Tensor
    mu: torch.Tensor
    alpha_bar: torch.Tensor | None = None
    prediction_type: str = "epsilon"


@torch.no_grad()
def build_probe_inputs(probe_split, parts, args, accelerator, resolution: int, mu: torch.Tensor) -> ProbeInputs:
    """Latents, caption embeddings and fixed noise for this process's probe shard, with the run's `mu`."""
    size = len(probe_split)
    per_process = math.ceil(size / accelerator.num_processes)
    wanted = range(accelerator.process_index * per_process, (accelerator.process_index + 1) * per_process)
    rows = [min(i, size - 1) for i in wanted]  # padding repeats a row so every process runs the same UNet calls
    shard = probe_split.select(rows)
    pixels = torch.stack([image_to_tensor(resize_and_crop(image, resolution)) for image in shard[args.image_column]])
    latents = torch.cat([encode_images(parts.vae, pixels[i:i + args.probe_batch_size]).float()
                         for i in range(0, len(rows), args.probe_batch_size)])
    captions = [pick_caption(c, None) for c in shard[args.caption_column]]
    cond = encode_prompts(parts.tokenizer, parts.text_encoder, captions)
    uncond = encode_prompts(parts.tokenizer, parts.text_encoder, [""])
    sample_ids = [int(s) for s in shard["sample_id"]]
    noise = probe_noise(sample_ids, args.probe_timesteps, latents.shape[1:], args.probe_seed)
    return ProbeInputs(sample_ids, [int(d) for d in shard["dup_factor"]], [i < size for i in wanted],
                       latents, cond, uncond, noise, mu)


def probe_scalars(rows: list[dict], high_noise_timestep: int) -> dict[str, float]:
    """TensorBoard scalars: each probe metric averaged per dup factor, over the grid and over t >= high_noise_timestep."""
    scalars, groups = {}, {}
    for row in rows:
        groups.setdefault(row["dup_factor"], []).append(row)
    for dup, group in sorted(groups.items()):
        high = [row for row in group if row["timestep"] >= high_noise_timestep]
        for name in (key for key in group[0] if key not in PROBE_ROW_KEYS):
            scalars[f"probe/{name}/dup_{dup}"] = float(np.mean([row[name] for row in group]))
            if high:
                scalars[f"probe_high/{name}/dup_{dup}"] = float(np.mean([row[name] for row in high]))
    return scalars


class EarlyWarningLog:
    """Per probe step: mem_analysis.early_warning scores appended to RUN/warnings.jsonl, and one console
    line per sample the first time its alarm fires (a resumed run remembers the alarms before its step)."""

    def __init__(self, path: Path, probe_split, args, kept_probes: list[dict], kept_warnings: list[dict]):
        self.path, self.fpr, self.high_noise_from = path, args.warning_fpr, args.high_noise_timestep
        first = min((row["step"] for row in kept_probes), default=None)
        self.baseline = mean_loss_cond([r for r in kept_probes if r["step"] == first]) if kept_probes else None
        self.announced = {int(w["sample_id"]) for w in kept_warnings if w["alarm"]}
        self.captions = {int(sid): pick_caption(caption, None)
                         for sid, caption in zip(probe_split["sample_id"], probe_split[args.caption_column])}

    def __call__(self, rows: list[dict]) -> tuple[list[dict], list[str]]:
        """Warning rows of one probe step's probe rows (written to the file), and the announcements to print."""
        if self.baseline is None:  # the first probe step of the run is the start L_c falls from
            self.baseline = mean_loss_cond(rows)
        warnings = score_step(rows, self.baseline, self.fpr, self.high_noise_from)
        run.append_jsonl(self.path, warnings)
        messages = []
        for w in warnings:
            if w["alarm"] and w["sample_id"] not in self.announced:
                self.announced.add(w["sample_id"])
                messages.append(f"[early warning] step {w['step']}: sample {w['sample_id']} (dup {w['dup_factor']}, "
                                f"{self.captions.get(w['sample_id'], '?')!r}) crossed the memorization alarm "
                                f"(score {w['score']:.2f} > {w['threshold']:.2f} at a {self.fpr:g} false-alarm rate)")
        return warnings, messages


def warning_scalars(warnings: list[dict], top: int = 5) -> tuple[dict[str, float], str]:
    """TensorBoard scalars (mean / max score and alarm share per dup factor, the threshold) and a markdown
    table of the `top` highest-scoring samples."""
    scored = [w for w in warnings if w["score"] is not None]
    scalars, groups = {}, {}
    for w in scored:
        groups.setdefault(w["dup_factor"], []).append(w)
    for dup, group in sorted(groups.items()):
        scalars[f"warning/score/dup_{dup}"] = float(np.mean([w["score"] for w in group]))
        scalars[f"warning/max_score/dup_{dup}"] = float(max(w["score"] for w in group))
        scalars[f"warning/alarm_fraction/dup_{dup}"] = float(np.mean([w["alarm"] for w in group]))
    if scored:
        scalars["warning/threshold"] = float(np.median([w["threshold"] for w in scored]))
    best = sorted(scored, key=lambda w: -w["score"])[:top]
    table = "| sample_id | dup_factor | score | alarm |\n|---|---|---|---|\n" + "".join(
        f"| {w['sample_id']} | {w['dup_factor']} | {w['score']:.2f} | {w['alarm']} |\n" for w in best)
    return scalars, table


def run_probes(unet, probe, args, step: int, accelerator) -> list[dict]:
    """M1 + M2 rows of this process's probe shard, gathered to every process (one row per sample, timestep)."""
    metrics = probe_metrics(unet, probe.latents, probe.cond, probe.uncond, args.probe_timesteps, probe.noise,
                            probe.alpha_bar, args.probe_guidance_scales, mu=probe.mu,
                            prediction_type=probe.prediction_type, chunk_size=args.probe_batch_size)
    rows = [{"step": step, "sample_id": sid, "dup_factor": dup, "timestep": int(t),
             **{name: float(value[i, j]) for name, value in metrics.items()}}
            for i, (sid, dup, valid) in enumerate(zip(probe.sample_ids, probe.dup_factors, probe.valid)) if valid
            for j, t in enumerate(args.probe_timesteps)]
    rows = gather_object(rows) if accelerator.num_processes > 1 else rows
    return sorted(rows, key=lambda row: (row["sample_id"], row["timestep"]))


class ProbeLog:
    """What a probe step writes: probe rows to probes.jsonl, early-warning scores to warnings.jsonl and its
    announcements to the console, per-dup-factor means and warning scalars to TensorBoard (main process)."""

    def __init__(self, probe: ProbeInputs | None, probe_split, args, accelerator, output_dir: Path,
                 resumed_step: int | None, writer, factor_writers):
        self.probe, self.args, self.accelerator = probe, args, accelerator
        self.writer, self.factor_writers = writer, factor_writers
        self.path, self.warn = output_dir / run.PROBES_FILE, None
        if accelerator.is_main_process:
            # Rows after the resumed step belong to the interrupted run and are written again.
            last = -1 if resumed_step is None else resumed_step
            kept_probes = run.keep_jsonl_rows(self.path, last_step=last)
            kept_warnings = run.keep_jsonl_rows(output_dir / run.WARNINGS_FILE, last_step=last)
            if probe is not None:
                self.warn = EarlyWarningLog(output_dir / run.WARNINGS_FILE, probe_split, args, kept_probes,
                                            kept_warnings)

    def due(self, step: int) -> bool:
        """Whether `step` is a probe step (every --probe_steps; never without probes)."""
        return self.probe is not None and step % self.args.probe_steps == 0

    def __call__(self, unet, step: int) -> None:
        """Probe the training weights at `step` and write the rows, warnings and scalars (call on every process)."""
        rows = run_probes(unet, self.probe, self.args, step, self.accelerator)
        scalars = probe_scalars(rows, self.args.high_noise_timestep)
        if self.accelerator.is_main_process:
            run.append_jsonl(self.path, rows)
            warnings, announcements = self.warn(rows)
            for line in announcements:
                tqdm.write(line)
            warning_values, top_table = warning_scalars(warnings)
            scalars.update(warning_values)
            self.writer.add_text("warning/top_samples", top_table, step)
        if self.factor_writers is not None:  # per-factor means go to the runs logs/finetune/dup_F
            self.accelerator.log(self.factor_writers.log(scalars, step), step=step)
            self.factor_writers.flush()
