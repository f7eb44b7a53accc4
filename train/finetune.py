"""Fine-tune a Stable Diffusion UNet and watch memorization appear, per sample, with and without CFG.

    accelerate launch [accelerate flags] train/finetune.py --config configs/EXP.yaml [--flag value ...]

Flags (train/finetune_config.py, `--help`) override the YAML, whose keys must be flag names.
Full or LoRA fine-tuning, optional EMA, caption dropout (`--proportion_empty_prompts`) so that the
unconditional branch CFG relies on is trained. Outputs (ARCHITECTURE.md "A training run"):
config.yaml, probes.jsonl, logs/finetune (TensorBoard; probe means in one run per factor, logs/finetune/dup_F),
checkpoint-N/, the final pipeline, probe_mu.safetensors (the `mu` of the centred k, see train/finetune_probes.py),
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
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration, gather_object
from diffusers import UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from mem_analysis import run
from mem_analysis.board import FactorWriters
from mem_analysis.cli import run_command
from mem_analysis.schedule import alpha_bar_from_scheduler
from mem_analysis.sd import SDComponents, compute_dtype, encode_prompts, load_components
from mem_analysis.threads import use_cpu_threads
from train.finetune_cache import TrainInputs, cache_plan, prepare_train_inputs
from train.finetune_config import ConfigError, TrainingError, preflight, resolve_train_steps
from train.finetune_data import EpochSampler, TrainExamples, load_splits, long_captions_line, row_sampling_weights
from train.finetune_loss import LossWindow, WenFilter, WenWindow, micro_batch_loss
from train.finetune_probes import ProbeLog, build_probe_inputs
from train.finetune_state import (add_lora, checkpoint_writer, load_resume_state, log_validation, register_hooks,
                                  save_checkpoint, save_final_model, start_run_folder, zero3_init_disabled)


@dataclass
class Plan:
    """The run's length: micro-batches and optimizer steps per epoch, optimizer steps in all, epochs."""

    batches_per_epoch: int
    steps_per_epoch: int
    max_train_steps: int
    num_epochs: int


@dataclass
class Training:
    """What the loop works with: the prepared model, optimizer and data, and where the run logs."""

    args: object
    accelerator: Accelerator
    unet: torch.nn.Module
    ema_unet: EMAModel | None
    parts: SDComponents
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    loader: torch.utils.data.DataLoader
    params: list
    plan: Plan
    zero_stage: int | None
    identity: dict
    probe_split: object
    resolution: int
    inputs: TrainInputs | None = None
    uncond_hidden: torch.Tensor | None = None
    probe_log: ProbeLog | None = None
    writer: object = None
    factor_writers: FactorWriters | None = None
    wen: WenFilter | None = None
    wen_window: WenWindow | None = None

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)


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


def load_models(args, accelerator, zero_stage):
    """(UNet, SD components, EMA UNet or None): LoRA, gradient checkpointing and channels-last applied; the
    frozen text encoder and VAE on the device in the compute dtype, created outside zero.Init so ZeRO-3
    leaves them whole."""
    unet = UNet2DConditionModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="unet",
                                                revision=args.revision, variant=args.variant, use_safetensors=True)
    with zero3_init_disabled():
        parts = load_components(args.pretrained_model_name_or_path, args.revision, args.variant, unet=unet)
    if args.prediction_type is not None:
        parts.noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    if parts.noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise ConfigError(f"prediction_type {parts.noise_scheduler.config.prediction_type!r}: use epsilon or "
                          f"v_prediction")
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
    return unet, parts, ema_unet


def prepare_training(args, accelerator, unet, train_data, train_split, sampler):
    """(UNet, optimizer, data loader, LR scheduler, trainable params, Plan), prepared by accelerate."""
    loader = torch.utils.data.DataLoader(train_data, batch_size=args.train_batch_size, sampler=sampler,
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
    global_batch = args.train_batch_size * accelerator.num_processes
    steps_per_epoch = math.ceil(math.ceil(len(train_data) / global_batch) / args.gradient_accumulation_steps)
    auto_line = resolve_train_steps(args, train_split, global_batch * args.gradient_accumulation_steps)
    if auto_line:
        accelerator.print(auto_line)
    max_train_steps = args.max_train_steps if args.max_train_steps is not None else args.num_train_epochs * steps_per_epoch
    # The prepared scheduler steps once per process per optimizer step (as in diffusers' examples).
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_train_steps * accelerator.num_processes)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    if args.torch_compile:
        unet.compile()  # in place: the same module, state dict and hooks; compiles during the first step
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    plan = Plan(len(loader), steps_per_epoch, max_train_steps, math.ceil(max_train_steps / steps_per_epoch))
    return unet, optimizer, loader, lr_scheduler, params, plan


def dry_run_report(t: Training, train_rows: int, resume_path: Path | None, stale: list[Path]) -> str:
    """What the run would do (model, processes, data, steps, checkpoints, probes, resume, caches), in 3 lines."""
    args, accelerator, plan = t.args, t.accelerator, t.plan
    return (f"[dry run] model {args.pretrained_model_name_or_path} (UNet {sum(p.numel() for p in t.params):,} "
            f"trainable params, {'LoRA r=%d' % args.rank if args.use_lora else 'full'}"
            f"{', EMA' if args.use_ema else ''}); {accelerator.num_processes} process(es), "
            f"{accelerator.distributed_type}, mixed precision {accelerator.mixed_precision}\n"
            f"[dry run] data: {train_rows} train rows, {len(t.probe_split)} probe samples, "
            f"resolution {t.resolution}; {plan.steps_per_epoch} steps/epoch, {plan.max_train_steps} steps, "
            f"{plan.num_epochs} epoch(s); checkpoints every {args.checkpointing_steps or 'never'}, probes every "
            f"{args.probe_steps or 'never'} on {len(args.probe_timesteps)} timesteps; resume "
            f"{resume_path or 'none'}; output {t.output_dir}"
            + (f" (a fresh start would delete the old run's {len(stale)} entries)" if stale else "")
            + f"\n[dry run] {cache_plan(args)}")


def open_run(t: Training, stale: list[Path], resume_path: Path | None) -> int:
    """Start the run folder (or resume into it) and open TensorBoard; returns the step training starts from."""
    accelerator, output_dir = t.accelerator, t.output_dir
    global_step = 0
    start_run_folder(accelerator, output_dir, t.identity, stale)
    if resume_path is not None:
        global_step = load_resume_state(accelerator, resume_path)
        accelerator.print(f"resumed from {resume_path} at step {global_step}")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        run.write_config(output_dir, vars(t.args))
    # No hparams config: it would add a TensorBoard run without scalars; config.yaml holds the configuration.
    purge_step = global_step + 1 if resume_path else None
    accelerator.init_trackers("finetune", init_kwargs={"tensorboard": {"purge_step": purge_step} if purge_step else {}})
    if accelerator.is_main_process:
        # Per-step scalars go straight to the writer: accelerator.log flushes the event file on every call.
        t.writer = accelerator.get_tracker("tensorboard", unwrap=True)
        t.factor_writers = FactorWriters(output_dir / t.args.logging_dir / "finetune", purge_step)
    return global_step


def prepare_inputs(t: Training, train_data, train_split, resumed_step: int | None) -> None:
    """The cached training inputs, the probes (with the run's `mu`), the empty caption's embedding and Wen's
    filter, on `t`."""
    args, accelerator, parts = t.args, t.accelerator, t.parts
    # Each unique image's posterior and each caption's embedding, encoded once (or read back from RUN/cache/).
    t.inputs = prepare_train_inputs(train_data, train_split, parts, args, accelerator, t.output_dir,
                                    checkpoint_writer(accelerator), need_mu=bool(args.probe_steps))
    for line in t.inputs.lines:
        accelerator.print(line)
    probe = None
    if args.probe_steps:
        probe = build_probe_inputs(t.probe_split, parts, args, accelerator, t.resolution, t.inputs.mu)
        probe.alpha_bar = alpha_bar_from_scheduler(parts.noise_scheduler)
        probe.prediction_type = parts.noise_scheduler.config.prediction_type
        if accelerator.is_main_process:
            run.save_probe_mu(t.output_dir, probe.mu)
    t.probe_log = ProbeLog(probe, t.probe_split, args, accelerator, t.output_dir, resumed_step, t.writer,
                           t.factor_writers)
    t.uncond_hidden = encode_prompts(parts.tokenizer, parts.text_encoder, [""])
    if args.mitigation_wen_threshold is not None or args.mitigation_wen_thresholds is not None:
        t.wen = WenFilter(args, parts.noise_scheduler, accelerator.device)
        t.wen_window = WenWindow(accelerator.device, train_split["dup_factor"]
                                 if "dup_factor" in train_split.column_names else [])


def epoch_batches(t: Training, epoch: int, skip: int):
    """(micro-step, batch) of one epoch from batch `skip` on (a resumed run skips what it already trained)."""
    t.loader.set_epoch(epoch)
    loader = t.accelerator.skip_first_batches(t.loader, skip) if skip else t.loader
    if skip:
        loader.set_epoch(epoch)
    for index, batch in enumerate(loader, start=skip):
        yield epoch * t.plan.batches_per_epoch + index, batch


def log_training(t: Training, step: int, mean_loss: float, window: LossWindow, progress) -> None:
    """Loss, LR, samples/s, CPU-seconds per step (and peak GPU memory, Wen's filter counts) of the window."""
    args, accelerator, writer = t.args, t.accelerator, t.writer
    now = time.perf_counter()
    samples = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps * window.steps
    if writer is not None:
        writer.add_scalar("train/loss", mean_loss, step)
        writer.add_scalar("train/lr", t.lr_scheduler.get_last_lr()[0], step)
        writer.add_scalar("train/samples_per_second", samples / window.seconds(now), step)
        writer.add_scalar("train/cpu_seconds_per_step", window.cpu_seconds() / window.steps, step)
        if accelerator.device.type == "cuda":  # this process's peak so far (the benches read it)
            writer.add_scalar("train/peak_memory_gib", torch.cuda.max_memory_allocated(accelerator.device) / 2**30,
                              step)
    if t.wen_window is not None:  # read on every process (a gather when there are several)
        wen_values = {f"train/{k}": v for k, v in t.wen_window.read(accelerator).items()}
        if writer is not None:  # per-factor shares into the runs logs/finetune/dup_F
            for name, value in t.factor_writers.log(wen_values, step).items():
                writer.add_scalar(name, value, step)
    progress.set_postfix(loss=f"{mean_loss:.4f}")
    window.reset(now)


def after_step(t: Training, step: int, epoch: int, window: LossWindow, progress) -> None:
    """Logging, probes, validation and a checkpoint, each when due at optimizer step `step`."""
    args = t.args
    log_due = step % args.logging_steps == 0 or step >= t.plan.max_train_steps
    probe_due = t.probe_log.due(step)
    validation_due = args.validation_steps and step % args.validation_steps == 0 and t.zero_stage != 3
    checkpoint_due = args.checkpointing_steps and step % args.checkpointing_steps == 0
    if not (log_due or probe_due or validation_due or checkpoint_due):
        return
    # The loss is read on the host only here: before anything uses or keeps the weights, and to log.
    mean_loss, failed_step, failed_loss = window.read(t.accelerator)
    if failed_step:
        progress.close()
        complete = run.list_checkpoints(t.output_dir)
        raise TrainingError(f"loss is {failed_loss} at step {failed_step}; stopped. Last complete "
                            f"checkpoint: {complete[-1] if complete else 'none'}")
    if log_due:
        log_training(t, step, mean_loss, window, progress)
    paused = window.clock()
    if probe_due:
        t.probe_log(t.unet, step)
    if validation_due:
        log_validation(t.accelerator, t.unet, t.ema_unet, t.parts, t.probe_split, args, step, t.resolution)
    # Probes come before the checkpoint, so a checkpoint's step already has its probe rows.
    if checkpoint_due:
        save_checkpoint(t.accelerator, t.output_dir, step, args.checkpoints_total_limit,
                        {"epoch": epoch, "num_processes": t.accelerator.num_processes,
                         "distributed_type": str(t.accelerator.distributed_type), "use_lora": args.use_lora,
                         "use_ema": args.use_ema, "run_fingerprint": t.identity["fingerprint"]})
    window.exclude_since(paused)  # samples/s and CPU-seconds per step count training time only


def train(t: Training, global_step: int) -> None:
    """Optimizer steps from `global_step` to the plan's last, with after_step's work when due."""
    args, accelerator, plan = t.args, t.accelerator, t.plan
    first_epoch = global_step // plan.steps_per_epoch
    num_epochs = first_epoch if global_step >= plan.max_train_steps else plan.num_epochs  # resumed at the end
    skip_batches = (global_step % plan.steps_per_epoch) * args.gradient_accumulation_steps
    if t.probe_log.probe is not None and global_step == 0:
        t.probe_log(t.unet, 0)
    progress = tqdm(total=plan.max_train_steps, initial=global_step, disable=not accelerator.is_main_process,
                    desc="steps")
    t.unet.train()
    window = LossWindow(accelerator.device, time.perf_counter())
    compile_reported = not args.torch_compile
    for epoch in range(first_epoch, num_epochs):
        for micro_step, batch in epoch_batches(t, epoch, skip_batches if epoch == first_epoch else 0):
            with accelerator.accumulate(t.unet):
                loss, wen_filtered = micro_batch_loss(t.unet, batch, t.inputs, t.uncond_hidden,
                                                      t.parts.noise_scheduler, args, accelerator.process_index,
                                                      micro_step, t.wen)
                window.add(loss.detach() / args.gradient_accumulation_steps, global_step + 1)
                if t.wen_window is not None:
                    t.wen_window.add(*wen_filtered, batch["row"])
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(t.params, args.max_grad_norm)
                t.optimizer.step()
                t.lr_scheduler.step()
                t.optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if t.ema_unet is not None:
                t.ema_unet.step(t.unet.parameters())
            if not compile_reported:
                compile_reported = True
                accelerator.print(f"torch.compile: first step {window.seconds(time.perf_counter()):.1f} s "
                                  f"(compilation included)")
            window.steps += 1
            progress.update(1)
            after_step(t, global_step, epoch, window, progress)
            if global_step >= plan.max_train_steps:
                break
    progress.close()


def main(argv=None) -> int:
    args, identity, stale, resume_path = preflight(argv)
    accelerator = build_accelerator(args)
    accelerator.print(use_cpu_threads())  # before any work: accelerate launch alone would leave one thread
    zero_stage = (accelerator.state.deepspeed_plugin.zero_stage
                  if accelerator.distributed_type == DistributedType.DEEPSPEED else None)
    if zero_stage == 3 and args.validation_steps:
        accelerator.print("validation images are off under ZeRO-3 (the main process alone cannot run the sharded UNet)")
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if args.resume_from_checkpoint == "latest" and resume_path is None:
        accelerator.print(f"resume_from_checkpoint latest: no checkpoint in {args.output_dir} yet; starting a fresh run")
    check_same_resume(accelerator, resume_path)
    train_split, probe_split = load_splits(args)
    unet, parts, ema_unet = load_models(args, accelerator, zero_stage)
    register_hooks(accelerator, args, ema_unet, zero_stage)

    # Data: order is a function of (seed, epoch); augmentation of (seed, epoch, row).
    resolution = args.resolution or unet.config.sample_size * 2 ** (len(parts.vae.config.block_out_channels) - 1)
    train_data = TrainExamples(train_split, parts.tokenizer, resolution, args)
    long_captions = long_captions_line(parts.tokenizer, train_split, args.caption_column)
    if long_captions:
        accelerator.print(long_captions)
    sampler = EpochSampler(len(train_data), args.seed, row_sampling_weights(train_split, args))
    unet, optimizer, loader, lr_scheduler, params, plan = prepare_training(args, accelerator, unet, train_data,
                                                                           train_split, sampler)
    t = Training(args, accelerator, unet, ema_unet, parts, optimizer, lr_scheduler, loader, params, plan, zero_stage,
                 identity, probe_split, resolution)
    if args.dry_run:
        if accelerator.is_main_process:
            print(dry_run_report(t, len(train_data), resume_path, stale))
        return 0

    global_step = open_run(t, stale, resume_path)
    prepare_inputs(t, train_data, train_split, global_step if resume_path else None)
    train(t, global_step)
    accelerator.wait_for_everyone()
    save_final_model(accelerator, unet, ema_unet, args, t.output_dir, zero_stage)
    if t.factor_writers is not None:
        t.factor_writers.close()
    accelerator.end_training()
    return 0


def cli(argv=None) -> int:
    """main() with bad input reported as one line and exit status 2, a failed run (NaN loss) as one line and 1."""
    return run_command(main, "finetune.py", argv, bad_input=(ConfigError, ValueError, FileNotFoundError),
                       failures=(TrainingError,))


if __name__ == "__main__":
    sys.exit(cli())
