"""Loading and encoding with Stable-Diffusion-style components.

One code path for every model: a local pipeline folder (the tiny models that
`data_scripts/make_base_model.py` writes, or a copy of SD v1.4/v2.1) or a hub name.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion pipeline this project uses."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler  # the training forward process
    sampler: DDIMScheduler  # deterministic DDIM, same betas

    def to(self, device=None, dtype=None) -> "SDComponents":
        """Move the networks (not the schedulers) to a device / dtype."""
        for net in (self.unet, self.vae, self.text_encoder):
            net.to(device=device, dtype=dtype)
        return self


def compute_dtype(mixed_precision: str | None) -> torch.dtype:
    """The networks' dtype under accelerate's `mixed_precision` ("fp16", "bf16", else float32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def load_components(
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    unet: UNet2DConditionModel | None = None,
) -> SDComponents:
    """Load tokenizer, text encoder, VAE, UNet and schedulers from a pipeline folder or hub name.

    Weights load through safetensors (`use_safetensors=True`); no remote code runs.
    """
    path = str(pretrained_model_name_or_path)
    if Path(path).exists() and not (Path(path) / "model_index.json").exists():
        raise FileNotFoundError(
            f"{path} is not a diffusers pipeline folder (no model_index.json); "
            "point --pretrained_model_name_or_path at a folder written by "
            "StableDiffusionPipeline.save_pretrained or data_scripts/make_base_model.py"
        )
    common = dict(revision=revision, use_safetensors=True)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=variant, **common)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=variant, **common)
    if unet is None:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=variant, **common)
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
    sampler = DDIMScheduler.from_config(noise_scheduler.config)
    for frozen in (vae, text_encoder):
        frozen.requires_grad_(False).eval()
    return SDComponents(unet, vae, text_encoder, tokenizer, noise_scheduler, sampler)


@torch.no_grad()
def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]) -> torch.Tensor:
    """Prompts -> CLIP hidden states (N, max_length, D), padded to the tokenizer's max length as SD does."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """Prompts -> padded token ids (N, max_length), for encoding inside a training step."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids


def tokens_cut(tokenizer: CLIPTokenizer, prompts: list[str]) -> list[int]:
    """Per prompt, how many of its tokens (start and end tokens counted) fall past the text encoder's window
    `tokenizer.model_max_length` (77 for CLIP) and are cut by `tokenize` and `encode_prompts`; 0 when it fits."""
    ids = tokenizer(list(prompts), truncation=False, verbose=False)["input_ids"]
    return [max(0, len(row) - tokenizer.model_max_length) for row in ids]


def cut_prompts_line(tokenizer: CLIPTokenizer, prompts: list[str], what: str) -> str | None:
    """One line saying how many of the distinct `prompts` are longer than the text encoder's window and how
    many tokens are cut from them (None when every prompt fits)."""
    distinct = list(dict.fromkeys(prompts))
    cut = [n for n in tokens_cut(tokenizer, distinct) if n]
    if not cut:
        return None
    return (f"{len(cut)} of {len(distinct)} {what} are longer than the text encoder's {tokenizer.model_max_length}-"
            f"token window and are cut: {min(cut)} to {max(cut)} tokens each ({sum(cut)} in all) are never seen")


@torch.no_grad()
def encode_images(vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator | None = None,
                  sample: bool = False) -> torch.Tensor:
    """Pixels in [-1, 1] (N, 3, H, W) -> scaled latents `scaling_factor * E(x)`.

    The posterior mean by default (the training image's latent `x` of docs/science.md);
    `sample=True` draws from the posterior as diffusers' training scripts do.
    """
    dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    latents = dist.sample(generator) if sample else dist.mean
    return latents * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> float32 pixels in [0, 1] (N, 3, H, W)."""
    images = vae.decode(latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)
