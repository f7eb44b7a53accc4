"""Fine-tune a Stable Diffusion UNet and watch memorization appear, per sample, with and without CFG.

    accelerate launch [accelerate flags] train/finetune.py --config configs/EXP.yaml [--flag value ...]

Flags (train/finetune_config.py, `--help`) override the YAML, whose keys must be flag names.
Full or LoRA fine-tuning, optional EMA, caption dropout (`--proportion_empty_prompts`) so that the
unconditional branch CFG relies on is trained. Outputs (ARCHITECTURE.md "A training run"):
config.yaml, probes.jsonl, logs/finetune (TensorBoard; probe means in one run per factor, logs/finetune/dup_F),
checkpoint-N/, the final pipeline, probe_mu.safetensors (the `mu` of the centred k, see train/finetune_data.py),
and cache/ (each unique image's VAE posterior and each caption's embedding, encoded once before the first step:
train/finetune_cache.py). The first line says how many CPU threads each process uses (mem_analysis/threads.py).

Probes: at step 0 and every `--probe_steps` steps, every probe-split sample is noised at each
`--probe_timesteps` with noise fixed by (probe_seed, sample_id, timestep), and
`mem_analysis.probes.probe_metrics` gives L_c, L_0, L_g and k (docs/science.md M1, M2) on the
training weights (not EMA). Each process probes a shard; rows are gathered and written once.
The loss stays on the device between logging steps (`--logging_steps`; also read before probes,
validation and checkpoints), so the loop does not wait for the accelerator on every micro-step;
a non-finite loss stops the run naming its step, before any checkpoint is written after it.
Resume: random draws of a micro-batch depend only on (seed, process, micro-step) and the data
order only on (seed, epoch), so `--resume_from_checkpoint latest` skips to the exact batch and
continues as the uninterrupted run would; probe rows after the resumed step are rewritten.
Early warning: each probe step's rows are scored by `mem_analysis.early_warning` against the
never-duplicated (or held-out) probe samples; scores go to RUN/warnings.jsonl and TensorBoard
(`warning/...`), and a sample is announced once, when its alarm first fires (`--warning_fpr`).
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration, gather_object
from diffusers import UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from tqdm.auto import tqdm

from mem_analysis import run
from mem_analysis.board import FactorWriters
from mem_analysis.cli import run_command
from mem_analysis.mitigations import (kept_mean, noisy_text_embedding, read_wen_thresholds, wen_epsilon_magnitude,
                                      wen_filter_weights, wen_threshold_curve)
from mem_analysis.probes import probe_metrics
from mem_analysis.schedule import alpha_bar_from_scheduler
from mem_analysis.sd import compute_dtype, encode_prompts, load_components
from train.finetune_config import ConfigError, TrainingError, preflight, resolve_train_steps
from mem_analysis.threads import use_cpu_threads
from train.finetune_cache import cache_plan, prepare_train_inputs
from train.finetune_data import (EarlyWarningLog, EpochSampler, TrainExamples, build_probe_inputs, load_splits,
                                 long_captions_line, probe_scalars, row_sampling_weights, warning_scalars)
from train.finetune_state import (add_lora, checkpoint_writer, load_resume_state, log_validation, register_hooks,
                                  save_checkpoint, save_final_model, start_run_folder, zero3_init_disabled)


def build_accelerator(args) -> Accelerator:
    """Accelerator with TensorBoard in output_dir/logs; gloo process groups for DeepSpeed on CPU; checkpoints
    written once per node with save_on_each_node."""
    handlers = []
    # DeepSpeed miscounts the world size on CPU unless the process group is gloo; a plain run rejects this.
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not torch.cuda.is_available():
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    project = ProjectConfiguration(project_dir=args.output_dir, save_on_each_node=args.save_on_each_node,
                                   logging_dir=os.path.join(args.output_dir, args.logging_dir))
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision, log_with=args.report_to,
                              project_config=project, kwargs_handlers=handlers)
    if args.save_on_each_node and accelerator.distributed_type == DistributedType.DEEPSPEED:
        # Each node's first process then writes the engine's model states too: a node resumes from its own disk.
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config.setdefault("checkpoint", {})["use_node_local_storage"] = True
    return accelerator


def check_same_resume(accelerator, resume_path: Path | None) -> None:
    """Stop (one line, every process) unless all processes resume from the same checkpoint step, e.g. when
    nodes with their own output folders (--save_on_each_node) hold different latest checkpoints."""
    if accelerator.num_processes == 1:
        return
    names = gather_object([resume_path.name if resume_path else "none (fresh start)"])
    if len(set(names)) > 1:
        raise TrainingError(f"processes would resume from different checkpoints ({', '.join(sorted(set(names)))}); "
                            f"give every node the same checkpoint-N, or --resume_from_checkpoint PATH")


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


def main(argv=None) -> int:
    args, identity, stale, resume_path = preflight(argv)
    output_dir = Path(args.output_dir)
    accelerator = build_accelerator(args)
    accelerator.print(use_cpu_threads())  # before any work: accelerate launch alone would leave one thread
    rank, main_process = accelerator.process_index, accelerator.is_main_process
    zero_stage = (accelerator.state.deepspeed_plugin.zero_stage
                  if accelerator.distributed_type == DistributedType.DEEPSPEED else None)
    if zero_stage == 3 and args.validation_steps:
        accelerator.print("validation images are off under ZeRO-3 (the main process alone cannot run the sharded UNet)")
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.resume_from_checkpoint == "latest" and resume_path is None:
        accelerator.print(f"resume_from_checkpoint latest: no checkpoint in {output_dir} yet; starting a fresh run")
    check_same_resume(accelerator, resume_path)
    train_split, probe_split = load_splits(args)

    # Models: the frozen text encoder and VAE are created outside zero.Init so ZeRO-3 leaves them whole.
    unet = UNet2DConditionModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="unet",
                                                revision=args.revision, variant=args.variant, use_safetensors=True)
    with zero3_init_disabled():
        parts = load_components(args.pretrained_model_name_or_path, args.revision, args.variant, unet=unet)
    noise_scheduler = parts.noise_scheduler
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise ConfigError(f"prediction_type {noise_scheduler.config.prediction_type!r}: use epsilon or v_prediction")
    weight_dtype = compute_dtype(accelerator.mixed_precision)
    parts.vae.to(accelerator.device, dtype=weight_dtype)
    parts.text_encoder.to(accelerator.device, dtype=weight_dtype)
    if args.use_lora:
        add_lora(unet, args.rank, weight_dtype, args.seed)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)
    ema_unet = None
    if args.use_ema:
        with zero3_init_disabled():
            source = unet if zero_stage != 3 else UNet2DConditionModel.from_pretrained(
                args.pretrained_model_name_or_path, subfolder="unet", revision=args.revision, variant=args.variant)
        ema_unet = EMAModel(source.parameters(), decay=args.ema_decay, model_cls=UNet2DConditionModel,
                            model_config=source.config)
        ema_unet.to(accelerator.device)
    register_hooks(accelerator, args, ema_unet, zero_stage)

    # Data: order is a function of (seed, epoch); augmentation of (seed, epoch, row).
    resolution = args.resolution or unet.config.sample_size * 2 ** (len(parts.vae.config.block_out_channels) - 1)
    train_data = TrainExamples(train_split, parts.tokenizer, resolution, args)
    long_captions = long_captions_line(parts.tokenizer, train_split, args.caption_column)
    if long_captions:
        accelerator.print(long_captions)
    sampler = EpochSampler(len(train_data), args.seed, row_sampling_weights(train_split, args))
    train_dataloader = torch.utils.data.DataLoader(train_data, batch_size=args.train_batch_size, sampler=sampler,
                                                   num_workers=args.dataloader_num_workers, drop_last=False)

    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    params = [p for p in unet.parameters() if p.requires_grad]
    # fused: one kernel over every parameter; PyTorch's default on a CPU is a loop over tensors, 5x slower here
    # (bench/bench_demo.py --stages optimizer).
    optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
                                  fused=accelerator.device.type in ("cpu", "cuda"))
    steps_per_epoch = math.ceil(math.ceil(len(train_data) / (args.train_batch_size * accelerator.num_processes))
                                / args.gradient_accumulation_steps)
    auto_line = resolve_train_steps(args, train_split, args.train_batch_size * accelerator.num_processes
                                    * args.gradient_accumulation_steps)
    if auto_line:
        accelerator.print(auto_line)
    max_train_steps = args.max_train_steps if args.max_train_steps is not None else args.num_train_epochs * steps_per_epoch
    # The prepared scheduler steps once per process per optimizer step (as in diffusers' examples).
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_train_steps * accelerator.num_processes)
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, train_dataloader,
                                                                          lr_scheduler)
    if args.torch_compile:
        unet.compile()  # in place: the same module, state dict and hooks; compiles during the first step
    batches_per_epoch = len(train_dataloader)
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)

    if args.dry_run:
        if main_process:
            print(f"[dry run] model {args.pretrained_model_name_or_path} (UNet {sum(p.numel() for p in params):,} "
                  f"trainable params, {'LoRA r=%d' % args.rank if args.use_lora else 'full'}"
                  f"{', EMA' if args.use_ema else ''}); {accelerator.num_processes} process(es), "
                  f"{accelerator.distributed_type}, mixed precision {accelerator.mixed_precision}\n"
                  f"[dry run] data: {len(train_data)} train rows, {len(probe_split)} probe samples, "
                  f"resolution {resolution}; {steps_per_epoch} steps/epoch, {max_train_steps} steps, "
                  f"{num_epochs} epoch(s); checkpoints every {args.checkpointing_steps or 'never'}, probes every "
                  f"{args.probe_steps or 'never'} on {len(args.probe_timesteps)} timesteps; resume "
                  f"{resume_path or 'none'}; output {output_dir}"
                  + (f" (a fresh start would delete the old run's {len(stale)} entries)" if stale else "")
                  + f"\n[dry run] {cache_plan(args)}")
        return 0

    global_step = 0
    start_run_folder(accelerator, output_dir, identity, stale)
    if resume_path is not None:
        global_step = load_resume_state(accelerator, resume_path)
        accelerator.print(f"resumed from {resume_path} at step {global_step}")
    first_epoch = global_step // steps_per_epoch
    if global_step >= max_train_steps:  # resumed from the last step: nothing left to train
        num_epochs = first_epoch
    skip_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps

    probe_path = output_dir / run.PROBES_FILE
    warn = None
    if main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        run.write_config(output_dir, vars(args))
        # Rows after the resumed step belong to the interrupted run and are written again below.
        kept_probes = run.keep_jsonl_rows(probe_path, last_step=global_step if resume_path else -1)
        kept_warnings = run.keep_jsonl_rows(output_dir / run.WARNINGS_FILE, last_step=global_step if resume_path else -1)
        if args.probe_steps:
            warn = EarlyWarningLog(output_dir / run.WARNINGS_FILE, probe_split, args, kept_probes, kept_warnings)
    # No hparams config: it would add a TensorBoard run without scalars; config.yaml holds the configuration.
    purge_step = global_step + 1 if resume_path else None
    accelerator.init_trackers("finetune", init_kwargs={"tensorboard": {"purge_step": purge_step} if purge_step else {}})
    # Per-step scalars go straight to the writer: accelerator.log flushes the event file on every call.
    writer = accelerator.get_tracker("tensorboard", unwrap=True) if main_process else None
    factor_writers = FactorWriters(output_dir / args.logging_dir / "finetune", purge_step) if main_process else None
    # Each unique image's posterior and each caption's embedding, encoded once (or read back from RUN/cache/).
    inputs = prepare_train_inputs(train_data, train_split, parts, args, accelerator, output_dir,
                                  checkpoint_writer(accelerator), need_mu=bool(args.probe_steps))
    for line in inputs.lines:
        accelerator.print(line)
    probe = None
    if args.probe_steps:
        probe = build_probe_inputs(probe_split, parts, args, accelerator, resolution, inputs.mu)
        probe.alpha_bar = alpha_bar_from_scheduler(noise_scheduler)
        probe.prediction_type = noise_scheduler.config.prediction_type
        if main_process:
            run.save_probe_mu(output_dir, probe.mu)
    uncond_hidden = encode_prompts(parts.tokenizer, parts.text_encoder, [""])

    def probe_and_log(step: int) -> None:
        """Probe rows to probes.jsonl, early-warning scores to warnings.jsonl, per-dup-factor means and
        warning scalars to TensorBoard (the main process writes)."""
        rows = run_probes(unet, probe, args, step, accelerator)
        scalars = probe_scalars(rows, args.high_noise_timestep)
        if main_process:
            run.append_jsonl(probe_path, rows)
            warnings, announcements = warn(rows)
            for line in announcements:
                tqdm.write(line)
            warning_values, top_table = warning_scalars(warnings)
            scalars.update(warning_values)
            writer.add_text("warning/top_samples", top_table, step)
        if factor_writers is not None:  # per-factor means go to the runs logs/finetune/dup_F
            accelerator.log(factor_writers.log(scalars, step), step=step)
            factor_writers.flush()

    if probe is not None and global_step == 0:
        probe_and_log(0)
    progress = tqdm(total=max_train_steps, initial=global_step, disable=not main_process, desc="steps")
    unet.train()
    window = LossWindow(accelerator.device, time.perf_counter())
    wen = wen_window = None
    if args.mitigation_wen_threshold is not None or args.mitigation_wen_thresholds is not None:
        wen = WenFilter(args, noise_scheduler, accelerator.device)
        wen_window = WenWindow(accelerator.device, train_split["dup_factor"]
                               if "dup_factor" in train_split.column_names else [])
    compile_reported = not args.torch_compile
    for epoch in range(first_epoch, num_epochs):
        train_dataloader.set_epoch(epoch)
        skip = skip_batches if epoch == first_epoch else 0
        loader = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        if skip:
            loader.set_epoch(epoch)
        for batch_index, batch in enumerate(loader, start=skip):
            micro_step = epoch * batches_per_epoch + batch_index
            generator = step_generator(args.seed, rank, micro_step, accelerator.device)
            with accelerator.accumulate(unet):
                latents = inputs.image_latents(batch.get("pixel_values"), batch["image"], generator)
                # Embedding noise is drawn after the cache lookup, so every use of a caption gets fresh noise.
                hidden = mitigate_embeddings(inputs.caption_embeddings(batch["input_ids"]), args, rank, micro_step)
                # Caption dropout trains the unconditional branch that CFG extrapolates from.
                drop = torch.rand(hidden.shape[0], generator=generator, device=hidden.device)
                hidden = torch.where((drop < args.proportion_empty_prompts)[:, None, None], uncond_hidden, hidden)
                loss, wen_filtered = diffusion_loss(unet, latents, hidden, noise_scheduler, generator, args,
                                                    uncond_hidden, wen)
                window.add(loss.detach() / args.gradient_accumulation_steps, global_step + 1)
                if wen_window is not None:
                    wen_window.add(*wen_filtered, batch["row"])
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if ema_unet is not None:
                ema_unet.step(unet.parameters())
            if not compile_reported:
                compile_reported = True
                accelerator.print(f"torch.compile: first step {window.seconds(time.perf_counter()):.1f} s "
                                  f"(compilation included)")
            window.steps += 1
            log_due = global_step % args.logging_steps == 0 or global_step >= max_train_steps
            probe_due = probe is not None and global_step % args.probe_steps == 0
            validation_due = args.validation_steps and global_step % args.validation_steps == 0 and zero_stage != 3
            checkpoint_due = args.checkpointing_steps and global_step % args.checkpointing_steps == 0
            progress.update(1)
            # The loss is read on the host only here: before anything uses or keeps the weights, and to log.
            if log_due or probe_due or validation_due or checkpoint_due:
                mean_loss, failed_step, failed_loss = window.read(accelerator)
                if failed_step:
                    progress.close()
                    complete = run.list_checkpoints(output_dir)
                    raise TrainingError(f"loss is {failed_loss} at step {failed_step}; stopped. Last complete "
                                        f"checkpoint: {complete[-1] if complete else 'none'}")
                if log_due:
                    now = time.perf_counter()
                    samples = (args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
                               * window.steps)
                    if writer is not None:
                        writer.add_scalar("train/loss", mean_loss, global_step)
                        writer.add_scalar("train/lr", lr_scheduler.get_last_lr()[0], global_step)
                        writer.add_scalar("train/samples_per_second", samples / window.seconds(now), global_step)
                        writer.add_scalar("train/cpu_seconds_per_step", window.cpu_seconds() / window.steps,
                                          global_step)
                        if accelerator.device.type == "cuda":  # this process's peak so far (the benches read it)
                            writer.add_scalar("train/peak_memory_gib",
                                              torch.cuda.max_memory_allocated(accelerator.device) / 2**30, global_step)
                    if wen_window is not None:  # read on every process (a gather when there are several)
                        wen_values = {f"train/{k}": v for k, v in wen_window.read(accelerator).items()}
                        if writer is not None:  # per-factor shares into the runs logs/finetune/dup_F
                            for name, value in factor_writers.log(wen_values, global_step).items():
                                writer.add_scalar(name, value, global_step)
                    progress.set_postfix(loss=f"{mean_loss:.4f}")
                    window.reset(now)
            paused = window.clock()
            if probe_due:
                probe_and_log(global_step)
            if validation_due:
                log_validation(accelerator, unet, ema_unet, parts, probe_split, args, global_step, resolution)
            # Probes come before the checkpoint, so a checkpoint's step already has its probe rows.
            if checkpoint_due:
                save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit,
                                {"epoch": epoch, "num_processes": accelerator.num_processes,
                                 "distributed_type": str(accelerator.distributed_type),
                                 "use_lora": args.use_lora, "use_ema": args.use_ema,
                                 "run_fingerprint": identity["fingerprint"]})
            window.exclude_since(paused)  # samples/s and CPU-seconds per step count training time only
            if global_step >= max_train_steps:
                break
    progress.close()
    accelerator.wait_for_everyone()
    save_final_model(accelerator, unet, ema_unet, args, output_dir, zero_stage)
    if factor_writers is not None:
        factor_writers.close()
    accelerator.end_training()
    return 0


def cli(argv=None) -> int:
    """main() with bad input reported as one line and exit status 2, a failed run (NaN loss) as one line and 1."""
    return run_command(main, "finetune.py", argv, bad_input=(ConfigError, ValueError, FileNotFoundError),
                       failures=(TrainingError,))


if __name__ == "__main__":
    sys.exit(cli())
