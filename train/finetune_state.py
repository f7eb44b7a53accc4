"""Model state of train/finetune.py: LoRA, checkpoints (atomic, diffusers layout), resume, final model, validation.

A checkpoint is written by `accelerator.save_state` into `checkpoint-N.tmp` on every process
(DeepSpeed's save is collective) and renamed to `checkpoint-N` by the main process once
complete, so a folder named checkpoint-N always holds a whole checkpoint. With `--save_on_each_node`
(clusters whose nodes do not share a file system) the first process of every node writes its
node's copy, and DeepSpeed keeps its model states per node (`use_node_local_storage`). The save hook writes
the trained weights in diffusers format (`unet/`, `unet_ema/`, `pytorch_lora_weights.safetensors`)
instead of accelerate's `model.safetensors`; the load hook reads them back.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate.state import AcceleratorState, is_initialized
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel, cast_training_params

from mem_analysis import run
from mem_analysis.run import list_checkpoints
from train.finetune_config import ConfigError

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


@contextlib.contextmanager
def zero3_init_disabled():
    """Context in which modules are built whole, not partitioned by DeepSpeed ZeRO-3's zero.Init.

    accelerate's `zero3_init_context_manager(enable=False)` keeps transformers' ZeRO-3 flag set
    (accelerate 1.15), so the flag is cleared here and restored afterwards.
    """
    plugin = AcceleratorState().deepspeed_plugin if is_initialized() else None
    if plugin is None or plugin.zero_stage != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def add_lora(unet, rank: int, weight_dtype, seed: int = 0) -> None:
    """Freeze the UNet (in the compute dtype) and add trainable float32 LoRA adapters on the attention projections,
    initialised from `seed` (the same adapters in every launch, whatever drew random numbers before)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.to(dtype=weight_dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS))
    cast_training_params(unet, dtype=torch.float32)


def save_lora(unet, directory) -> None:
    """The UNet's LoRA adapters as `pytorch_lora_weights.safetensors` in diffusers' format."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(save_directory=str(directory), unet_lora_layers=layers,
                                              safe_serialization=True)


def checkpoint_writer(accelerator) -> bool:
    """Whether this process writes checkpoints and the final model: the main process, or with
    save_on_each_node the first process of each node (accelerate's ProjectConfiguration semantics)."""
    if accelerator.project_configuration.save_on_each_node:
        return accelerator.is_local_main_process
    return accelerator.is_main_process


def register_hooks(accelerator, args, ema_unet, zero_stage) -> None:
    """Save/load hooks that keep the trained weights in diffusers format inside accelerate's checkpoints."""

    def save_hook(models, weights, output_dir):
        # Under ZeRO-3 the whole weights exist only after a collective gather, so every process calls it.
        full = accelerator.get_state_dict(models[0]) if zero_stage == 3 and not args.use_lora else None
        if checkpoint_writer(accelerator):
            for model in models:
                unet = accelerator.unwrap_model(model)
                if args.use_lora:
                    save_lora(unet, output_dir)
                else:
                    unet.save_pretrained(os.path.join(output_dir, "unet"), state_dict=full)
            if ema_unet is not None:
                ema_unet.save_pretrained(os.path.join(output_dir, "unet_ema"))
        while weights:  # the diffusers-format copy above replaces accelerate's model.safetensors
            weights.pop()

    def load_hook(models, input_dir):
        if ema_unet is not None:
            loaded = EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), UNet2DConditionModel)
            ema_unet.load_state_dict(loaded.state_dict())
            ema_unet.to(accelerator.device)
        while models:  # empty under DeepSpeed, whose engine restores its own checkpoint
            unet = accelerator.unwrap_model(models.pop())
            if args.use_lora:
                run.load_lora(unet, input_dir)
            else:
                loaded = UNet2DConditionModel.from_pretrained(input_dir, subfolder="unet")
                unet.load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def start_run_folder(accelerator, output_dir: Path, identity: dict, stale: list[Path]) -> None:
    """After every process has checked the folder (train/finetune_config.preflight): each checkpoint writer
    removes the old run's `stale` entries (mem_analysis.run.clear_run) and records this run's identity in run.json."""
    accelerator.wait_for_everyone()
    if checkpoint_writer(accelerator):
        if stale:
            print(f"fresh start in {output_dir}: removed the old run's {', '.join(e.name for e in stale)}")
            run.clear_run(output_dir, stale)
        output_dir.mkdir(parents=True, exist_ok=True)
        run.write_run_record(output_dir, identity)
    accelerator.wait_for_everyone()


def load_resume_state(accelerator, checkpoint: Path) -> int:
    """Restore training from `checkpoint` and return its step; a file that cannot be loaded is a one-line
    ConfigError naming the checkpoint (preflight has already checked that no file is cut short)."""
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as err:  # torch, safetensors, DeepSpeed and pickle each raise their own types
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"--resume_from_checkpoint: cannot load {checkpoint} ({type(err).__name__}: {reason}); "
                          f"delete it to resume from the checkpoint before it, or give another") from None
    return run.checkpoint_step(checkpoint)


def save_checkpoint(accelerator, output_dir: Path, step: int, total_limit: int | None, info: dict) -> Path:
    """Write checkpoint-N atomically (temporary folder, then rename) and prune to the newest `total_limit`."""
    final = run.checkpoint_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    writer = checkpoint_writer(accelerator)
    if writer and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if writer:
        run.write_training_state(tmp, step, **info)
    accelerator.wait_for_everyone()
    if writer:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def save_final_model(accelerator, unet, ema_unet, args, output_dir: Path, zero_stage) -> None:
    """The trained model as a pipeline folder in output_dir (EMA weights with EMA; LoRA also fused in)."""
    full = accelerator.get_state_dict(unet) if zero_stage == 3 and not args.use_lora else None
    if not checkpoint_writer(accelerator):
        return
    model = accelerator.unwrap_model(unet)
    with zero3_init_disabled():
        write_pipeline(model, ema_unet, full, args, output_dir)


def write_pipeline(model, ema_unet, full, args, output_dir: Path) -> None:
    """Base pipeline with the trained UNet (given whole, or as a gathered `full` state dict) saved to output_dir."""
    load = dict(revision=args.revision, variant=args.variant, safety_checker=None, requires_safety_checker=False)
    if args.use_lora:
        save_lora(model, output_dir)
        pipeline = StableDiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, **load)
        pipeline.load_lora_weights(str(output_dir))
        pipeline.fuse_lora()
        pipeline.unload_lora_weights()
    else:
        if full is not None:
            model = UNet2DConditionModel.from_config(model.config)
            model.load_state_dict(full)
        if ema_unet is not None:
            ema_unet.copy_to(model.parameters())
        pipeline = StableDiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path,
                                                           unet=model.to(torch.float32), **load)
    pipeline.save_pretrained(str(output_dir))


@torch.no_grad()
def log_validation(accelerator, unet, ema_unet, parts, probe_split, args, step: int, resolution: int) -> None:
    """DDIM+CFG images for a few captions, logged beside the probe training image they came from."""
    if not accelerator.is_main_process:
        return
    model = accelerator.unwrap_model(unet)
    if ema_unet is not None:
        ema_unet.store(model.parameters())
        ema_unet.copy_to(model.parameters())
    if args.validation_prompts:
        prompts, references = args.validation_prompts, [None] * len(args.validation_prompts)
    else:
        count = min(args.num_validation_prompts, len(probe_split))
        rows = probe_split.select(range(count))
        prompts, references = [str(c) for c in rows[args.caption_column]], rows[args.image_column]
    pipeline = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                       unet=model, scheduler=parts.sampler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    writer = accelerator.get_tracker("tensorboard", unwrap=True)
    generator = torch.Generator(accelerator.device).manual_seed(args.seed)
    with accelerator.autocast():
        for i, (prompt, reference) in enumerate(zip(prompts, references)):
            image = pipeline(prompt, height=resolution, width=resolution, generator=generator, output_type="np",
                             num_inference_steps=args.validation_inference_steps,
                             guidance_scale=args.validation_guidance_scale).images[0]
            if reference is not None:
                reference = np.asarray(reference.convert("RGB").resize((resolution, resolution)), np.float32) / 255
                image = np.concatenate([reference, image], axis=1)
            writer.add_image(f"validation/{i}", image, step, dataformats="HWC")
    if ema_unet is not None:
        ema_unet.restore(model.parameters())
    model.train()
