"""Write a Stable-Diffusion-style base model folder without any download.

    python data_scripts/make_base_model.py --output_dir runs/base-tiny --preset tiny --seed 0

The folder is a `StableDiffusionPipeline.save_pretrained` folder (safetensors), loaded by
`StableDiffusionPipeline.from_pretrained(DIR)` and `mem_analysis.sd.load_components(DIR)`
exactly as a copy of `CompVis/stable-diffusion-v1-4`.
- `tiny` (32 px, 16x16x4 latents): the VAE is trained briefly on an image pool so that it
  really reconstructs images; its `scaling_factor` is then set to 1/std of the pool's latents,
  as SD did, so the UNet sees unit-variance latents. The text encoder is then trained as a small
  CLIP (contrastive loss against the pool images' latents), as SD's is pretrained: a random one
  gives captions that share a template nearly identical hidden states, which the UNet cannot key
  a memory to. The separation of caption embeddings (mean/max pairwise cosine) is printed and
  recorded before and after, for the pool and for the study's captions. `--pretrain_unet_steps N` optionally
  trains the UNet on the pool (every image once, 10% empty captions) so fine-tuning starts
  from a model that already generates.
- `sd15-shape`: the SD v1.5 architecture (860 M UNet, 512 px), random weights, not trained;
  `--config_only` writes the configs, tokenizer and scheduler without any weights.
Deterministic under `--seed` (bitwise-identical weights with the same seed and thread count).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mem_analysis.cli import run_command
from mem_analysis.conditioning import caption_separation, clip_loss
from mem_analysis.data import (check_output_dir, image_to_tensor, list_source_images, load_source_image, read_manifest,
                               subsample, write_folder_atomically)
from mem_analysis.presets import PRESETS, build_pipeline
from mem_analysis.sd import encode_images, encode_prompts, tokenize


# Mean pairwise cosine of flattened caption embeddings under which the UNet can key memories to captions:
# Twemoji names under the random encoder (0.73) were memorized, templated captions (0.99) were not.
USABLE_MEAN_COSINE = 0.9


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image_source", default=None,
                   help="image pool: any --source of build_duplicated_dataset.py (default: the source of "
                        "--exclude_dataset, so the pool's captions are like the study's; else twemoji)")
    p.add_argument("--image_column", default="image")
    p.add_argument("--caption_column", default="text")
    p.add_argument("--max_images", type=int, default=1024, help="pool size, drawn under --seed")
    p.add_argument("--exclude_dataset", default=None,
                   help="a study dataset folder: leave its images (by source name) out of the pool, so the "
                        "base model has never seen them")
    p.add_argument("--holdout_fraction", type=float, default=0.1, help="pool share kept out to measure the VAE")
    p.add_argument("--vae_steps", type=int, default=300)
    p.add_argument("--vae_learning_rate", type=float, default=1e-3)
    p.add_argument("--kl_weight", type=float, default=1e-6, help="weight of the KL term (SD used 1e-6)")
    p.add_argument("--text_encoder_steps", type=int, default=300,
                   help="CLIP-style training of the text encoder on the pool (0: keep it random)")
    p.add_argument("--text_encoder_learning_rate", type=float, default=2e-3)
    p.add_argument("--text_encoder_batch_size", type=int, default=128, help="pairs per contrastive batch")
    p.add_argument("--pretrain_unet_steps", type=int, default=0)
    p.add_argument("--unet_learning_rate", type=float, default=5e-4)
    p.add_argument("--proportion_empty_prompts", type=float, default=0.1)
    p.add_argument("--train_batch_size", type=int, default=32)
    p.add_argument("--config_only", action="store_true",
                   help="write configs, tokenizer and scheduler but no weights (e.g. to inspect sd15-shape)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    return p.parse_args(argv)


def psnr(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for pixels in [0, 1]: 10 log10(1 / mean((prediction - target)^2))."""
    mse = (prediction - target).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-12))


def study_manifest(args: argparse.Namespace) -> dict | None:
    """The manifest of --exclude_dataset (None without it)."""
    if not args.exclude_dataset:
        return None
    return read_manifest(args.exclude_dataset)


def pool_items(args: argparse.Namespace) -> list:
    """The pool's source images, without those of --exclude_dataset, drawn under --seed."""
    manifest = study_manifest(args)
    source = args.image_source or (manifest["source"] if manifest else "twemoji")
    items = list_source_images(source, args.image_column, args.caption_column)
    if manifest:
        excluded = {sample["name"] for sample in manifest["samples"]}
        items = [item for item in items if item.name not in excluded]
    return subsample(items, args.max_images, args.seed)


def load_pool(args: argparse.Namespace, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """The image pool as pixels in [-1, 1] (N, 3, R, R) with captions."""
    items = pool_items(args)
    if len(items) < 4:
        raise ValueError(f"--image_source {args.image_source} gives {len(items)} images; the VAE needs at least 4")
    pixels = torch.stack([image_to_tensor(load_source_image(item, resolution)) for item in items])
    return pixels, [item.caption for item in items]


def batches(num_items: int, batch_size: int, steps: int, generator: torch.Generator):
    """Index batches for `steps` steps, reshuffled every epoch from `generator`."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(num_items, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]


def take_step(optimizer, loss: torch.Tensor, step: int, steps: int, what: str, schedule=None) -> None:
    """One optimizer (and lr schedule) step on `loss`; prints the loss every fifth of `steps` and at the last."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if schedule is not None:
        schedule.step()
    if step % max(steps // 5, 1) == 0 or step == steps - 1:
        print(f"  {what} step {step:4d}/{steps}  loss {loss.item():.4f}")


def train_vae(vae, pixels: torch.Tensor, args: argparse.Namespace, generator: torch.Generator) -> None:
    """Fit the VAE on `pixels`: mean squared reconstruction error + kl_weight * KL(posterior || N(0, I))."""
    vae.train().requires_grad_(True)
    # fused: one kernel over every parameter (a CPU otherwise loops over tensors; bench_demo.py --stages optimizer)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_learning_rate, weight_decay=0.0, fused=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(args.vae_steps, 1))
    for step, index in enumerate(batches(len(pixels), args.train_batch_size, args.vae_steps, generator)):
        x = pixels[index]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = F.mse_loss(reconstruction, x) + args.kl_weight * posterior.kl().mean()
        take_step(optimizer, loss, step, args.vae_steps, "vae", schedule)
    vae.eval().requires_grad_(False)


@torch.no_grad()
def vae_quality(vae, held_out: torch.Tensor, train_pixels: torch.Tensor) -> dict[str, float]:
    """Mean PSNR of VAE reconstructions of held-out images, and of predicting the training mean image."""
    target = (held_out + 1) / 2
    reconstruction = (vae.decode(vae.encode(held_out).latent_dist.mean).sample + 1).div(2).clamp(0, 1)
    mean_image = ((train_pixels + 1) / 2).mean(0, keepdim=True).expand_as(target)
    return dict(vae_psnr_db=psnr(reconstruction, target).mean().item(),
                mean_image_psnr_db=psnr(mean_image, target).mean().item(), held_out_images=len(held_out))


@torch.no_grad()
def latent_scaling_factor(vae, pixels: torch.Tensor) -> float:
    """1 / std of the pool's (unscaled) posterior-mean latents, so that scaled latents have unit variance."""
    latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(256)])
    return float(1.0 / latents.std())


def train_text_encoder(pipe, latents: torch.Tensor, captions: list[str], args: argparse.Namespace,
                       generator: torch.Generator) -> None:
    """Train the text encoder as a small CLIP: caption i's hidden states (mean over all positions,
    padding included, since the UNet attends to all of them) against a linear map of image i's latent."""
    text_encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    ids = tokenize(tokenizer, captions)
    image_head = torch.nn.Linear(latents[0].numel(), text_encoder.config.hidden_size)
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
    text_encoder.train().requires_grad_(True)
    optimizer = torch.optim.AdamW([*text_encoder.parameters(), *image_head.parameters(), logit_scale],
                                  lr=args.text_encoder_learning_rate, weight_decay=0.0, fused=True)
    steps = args.text_encoder_steps
    for step, index in enumerate(batches(len(ids), args.text_encoder_batch_size, steps, generator)):
        text = text_encoder(ids[index]).last_hidden_state.mean(1)
        loss = clip_loss(text, image_head(latents[index].flatten(1)), logit_scale.clamp(max=math.log(100)))
        take_step(optimizer, loss, step, steps, "text encoder (contrastive)")
    text_encoder.eval().requires_grad_(False)


def study_captions(args: argparse.Namespace) -> list[str]:
    """The distinct captions of --exclude_dataset's images (measured, never trained on)."""
    manifest = study_manifest(args)
    return sorted({sample["caption"] for sample in manifest["samples"]}) if manifest else []


def print_separation(separation: dict[str, dict], seconds: float | None) -> None:
    """One line per caption set: pairwise cosine of flattened hidden states, random vs trained encoder."""
    for name, values in separation.items():
        line = "  ".join(f"{state} encoder mean {v['mean_cosine']:.3f} max {v['max_cosine']:.3f}"
                         for state, v in values.items())
        usable = values.get("trained", values["random"])["mean_cosine"] < USABLE_MEAN_COSINE
        print(f"caption embeddings, {name} ({values['random']['captions']} captions), pairwise cosine: {line}"
              f" -> conditioning {'usable' if usable else 'NOT usable'} (mean < {USABLE_MEAN_COSINE})")
    if seconds is not None:
        print(f"text encoder trained contrastively in {seconds} s")


def separation_of(pipe, caption_sets: dict[str, list[str]]) -> dict[str, dict]:
    """caption_separation of each named caption set under the pipeline's text encoder."""
    return {name: caption_separation(encode_prompts(pipe.tokenizer, pipe.text_encoder, captions))
            for name, captions in caption_sets.items() if len(captions) >= 2}


def pretrain_unet(pipe, latents: torch.Tensor, captions: list[str], args: argparse.Namespace,
                  generator: torch.Generator) -> None:
    """Denoising training of the UNet on the pool's latents (epsilon loss, empty caption with probability p)."""
    unet, scheduler = pipe.unet, pipe.scheduler
    unet.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.unet_learning_rate, fused=True)
    steps = args.pretrain_unet_steps
    for step, index in enumerate(batches(len(latents), args.train_batch_size, steps, generator)):
        # Empty captions teach the unconditional prediction that classifier-free guidance needs.
        drop = torch.rand(len(index), generator=generator) < args.proportion_empty_prompts
        prompts = ["" if d else captions[i] for d, i in zip(drop.tolist(), index.tolist())]
        hidden = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts)
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t, hidden).sample, noise)
        take_step(optimizer, loss, step, steps, "unet")
    unet.eval().requires_grad_(False)


def build_empty_pipeline(preset: str, seed: int):
    """The preset's pipeline with weights on the meta device (configs only, no memory for weights)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return build_pipeline(preset, seed)


def save_configs_only(pipe, folder: Path) -> None:
    """model_index.json, each model's config.json, tokenizer and scheduler files; no weights."""
    pipe.save_config(folder)
    pipe.unet.save_config(folder / "unet")
    pipe.vae.save_config(folder / "vae")
    pipe.text_encoder.config.save_pretrained(folder / "text_encoder")
    pipe.tokenizer.save_pretrained(folder / "tokenizer")
    pipe.scheduler.save_pretrained(folder / "scheduler")


def make(args: argparse.Namespace) -> tuple[object, dict]:
    """Build (and for `tiny`, train) the pipeline; returns it with a record of what was done."""
    record = dict(preset=args.preset, seed=args.seed, arguments=vars(args))
    if args.config_only:
        return build_empty_pipeline(args.preset, args.seed), record
    pipe = build_pipeline(args.preset, args.seed)
    if args.preset != "tiny" or (args.vae_steps == 0 and args.pretrain_unet_steps == 0
                                 and args.text_encoder_steps == 0):
        return pipe, record
    generator = torch.Generator().manual_seed(args.seed)
    pixels, captions = load_pool(args, PRESETS[args.preset]["resolution"])
    order = torch.randperm(len(pixels), generator=generator)
    n_held = max(1, round(args.holdout_fraction * len(pixels)))
    train_index, held_index = order[n_held:].sort().values, order[:n_held].sort().values
    train_pixels = pixels[train_index]
    started = time.perf_counter()
    train_vae(pipe.vae, train_pixels, args, generator)
    record.update(vae_quality(pipe.vae, pixels[held_index], train_pixels), vae_train_images=len(train_pixels))
    record["vae_seconds"] = round(time.perf_counter() - started, 1)
    # Registered config change: saved to vae/config.json and used by encode_images/decode_latents.
    pipe.vae.register_to_config(scaling_factor=latent_scaling_factor(pipe.vae, train_pixels))
    record["scaling_factor"] = pipe.vae.config.scaling_factor
    print(f"VAE on {n_held} held-out images: PSNR {record['vae_psnr_db']:.2f} dB vs mean-image baseline "
          f"{record['mean_image_psnr_db']:.2f} dB; scaling_factor {record['scaling_factor']:.4f} "
          f"({record['vae_seconds']} s)")
    train_captions = [captions[i] for i in train_index.tolist()]
    latents = torch.cat([encode_images(pipe.vae, chunk) for chunk in train_pixels.split(256)])
    caption_sets = dict(pool_held_out=[captions[i] for i in held_index.tolist()], study=study_captions(args))
    separation = {name: dict(random=value) for name, value in separation_of(pipe, caption_sets).items()}
    if args.text_encoder_steps > 0:
        started = time.perf_counter()
        train_text_encoder(pipe, latents, train_captions, args, generator)
        record["text_encoder_seconds"] = round(time.perf_counter() - started, 1)
        for name, value in separation_of(pipe, caption_sets).items():
            separation[name]["trained"] = value
    record["caption_separation"] = separation
    print_separation(separation, record.get("text_encoder_seconds"))
    if args.pretrain_unet_steps > 0:
        started = time.perf_counter()
        pretrain_unet(pipe, latents, train_captions, args, generator)
        record["unet_seconds"] = round(time.perf_counter() - started, 1)
    return pipe, record


def main(argv=None) -> int:
    """Build the base model and write it atomically (ValueError / FileNotFoundError on bad input)."""
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    torch.manual_seed(args.seed)
    check_output_dir(output_dir, args.overwrite)
    pipe, record = make(args)

    def write(folder: Path) -> None:
        if args.config_only:
            save_configs_only(pipe, folder)
        else:
            pipe.save_pretrained(folder, safe_serialization=True)
        (folder / "make_base_model.json").write_text(json.dumps(record, indent=1))

    write_folder_atomically(write, output_dir)
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    what = "configs only (no weights)" if args.config_only else "weights (safetensors)"
    print(f"wrote {args.preset} base model ({unet_params / 1e6:.2f} M UNet parameters, {what}) to {output_dir}: "
          f"{', '.join(sorted(p.name for p in output_dir.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, "make_base_model.py"))
