"""Training inputs encoded once per run, before the first step, and kept in RUN/cache/ (mem_analysis.run):
each unique image's VAE posterior N(mean, std^2) and each distinct caption's text-encoder output.

Exact where it is used. The VAE and the text encoder are frozen, and without random crop or flip an image's
pixels never change, so its posterior is fixed: each step samples `mean + std * z` with z drawn as diffusers'
`DiagonalGaussianDistribution.sample` draws it (the step's generator, same shape and order), which is the
latent that encoding the batch draws (finetune_data.ImageLatents). With random crop or flip the latent cache
is off (the pixels change every epoch); with a random-word or random-number caption augmentation the caption
cache is off (nearly every caption is new); `--no-cache_latents` / `--no-cache_caption_embeddings` turn them
off by hand.

Unique images: one per `sample_id` in a study dataset (every row of a sample shows the same image), else one
per distinct stored image (a hash of its bytes), so a 64x image is encoded once, not 64 times. Each process
encodes the images rank, rank + W, ... and the tables are gathered to every process, since any process's
batches may draw any image. Captions are cheap (the text encoder is about 2 % of an SD image's encoder
arithmetic) and every process encodes all of them itself, with no gather.

The first process (of each node with --save_on_each_node) writes the tables with a fingerprint of what made
them: the stored images, the VAE's (text encoder's) weights, the dtype, the resolution and crop. A resumed run
whose fingerprint matches reads them back instead of encoding; any other fingerprint (another dataset, model,
resolution or precision) rebuilds them, so a stale table is never read.
"""
from __future__ import annotations

import hashlib
import json
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import gather_object

from mem_analysis import run
from mem_analysis.data import image_hash
from mem_analysis.losses import dataset_mean
from mem_analysis.sd import tokenize
from train.finetune_data import CaptionEmbeddings, ImageLatents, bounded_captions, pick_caption


@dataclass
class ImageIndex:
    """The unique images of the train split: `keys[k]` names image k (its sample_id, or its content hash),
    `rows[k]` is a train row showing it, `row_image[r]` is the image of train row r, and `content` hashes
    every image's key with its stored bytes (the dataset's part of the latent fingerprint)."""

    keys: list[str]
    rows: list[int]
    row_image: list[int]
    content: str

    def counts(self) -> torch.Tensor:
        """(K,) how many train rows show each unique image."""
        return torch.bincount(torch.tensor(self.row_image), minlength=len(self.keys))


def digest(data: bytes | str) -> str:
    """A short content hash (BLAKE2b, 16 bytes, hex)."""
    return hashlib.blake2b(data.encode() if isinstance(data, str) else data, digest_size=16).hexdigest()


def stored_image_hashes(split, rows: list[int], image_column: str) -> list[str]:
    """Hashes of the stored images of `rows`: their encoded bytes, read without decoding, for an image column;
    the decoded RGB pixels (mem_analysis.data.image_hash) for any other column."""
    import datasets

    if not rows:
        return []
    if isinstance(split.features.get(image_column), datasets.Image):
        raw = split.cast_column(image_column, datasets.Image(decode=False)).select(rows)[image_column]
        return [digest(item["bytes"] if item.get("bytes") else Path(item["path"]).read_bytes()) for item in raw]
    return [image_hash(split[row][image_column]) for row in rows]


def index_images(split, image_column: str) -> ImageIndex:
    """Unique images of a train split: by sample_id when the split has one, else by stored content."""
    if "sample_id" in split.column_names:
        row_keys = [str(int(sid)) for sid in split["sample_id"]]
        first = {}
        for row, key in enumerate(row_keys):
            first.setdefault(key, row)
        contents = stored_image_hashes(split, list(first.values()), image_column)
    else:
        row_keys = stored_image_hashes(split, list(range(len(split))), image_column)
        first = {}
        for row, key in enumerate(row_keys):
            first.setdefault(key, row)
        contents = list(first)
    position = {key: k for k, key in enumerate(first)}
    content = digest("\n".join(f"{key} {c}" for key, c in zip(first, contents)))
    return ImageIndex(list(first), list(first.values()), [position[key] for key in row_keys], content)


def weights_hash(module: torch.nn.Module) -> str:
    """Hash of a module's state dict: every tensor's name, dtype, shape and bytes."""
    hasher = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        hasher.update(f"{name} {value.dtype} {tuple(value.shape)}".encode())
        hasher.update(value.reshape(-1).view(torch.uint8).numpy())
    return hasher.hexdigest()


def fingerprint(**parts) -> str:
    """The hash of a cache's ingredients (JSON, keys sorted)."""
    return digest(json.dumps(parts, sort_keys=True, default=str))


def peak_memory_gib(device: torch.device) -> float:
    """Peak device memory since the last reset on CUDA; elsewhere the process's peak resident set, GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux


@torch.no_grad()
def encode_posteriors(train_data, index: ImageIndex, vae, accelerator, batch_size: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, C, h, w) posterior means and stds of the unique images, in the VAE's dtype, on every process;
    process r encodes images r, r + W, ... in batches of `batch_size` (padded so every process runs the same
    VAE calls and gathers equal shapes)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = list(range(rank, len(index.keys), world)) or [0]
    per_process = math.ceil(len(index.keys) / world)
    means, stds = [], []
    for start in range(0, per_process, batch_size):
        chunk = [mine[min(i, len(mine) - 1)] for i in range(start, min(start + batch_size, per_process))]
        pixels = torch.stack([train_data.pixels(index.rows[k]) for k in chunk])
        posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    mean, std = torch.cat(means), torch.cat(stds)
    if world > 1:  # gathered rank-major: image k sits at (k % W) * per_process + k // W
        order = torch.tensor([(k % world) * per_process + k // world for k in range(len(index.keys))],
                             device=mean.device)
        mean, std = accelerator.gather(mean)[order], accelerator.gather(std)[order]
    return mean.contiguous(), std.contiguous()


@torch.no_grad()
def encode_captions(captions: list[str], tokenizer, text_encoder, batch_size: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, L) token ids and (M, L, D) text-encoder outputs of the distinct captions, in batches."""
    ids = tokenize(tokenizer, captions)
    hidden = [text_encoder(ids[i:i + batch_size].to(text_encoder.device), return_dict=False)[0]
              for i in range(0, len(ids), batch_size)]
    return ids, torch.cat(hidden)


def training_captions(train_data) -> list[str]:
    """Every caption a training row can show (each entry of a list caption), once, in first-seen order."""
    found = {}
    for caption in train_data.captions:
        for text in caption if isinstance(caption, (list, tuple)) else [caption]:
            found.setdefault(pick_caption(text, None), None)
    return list(found)


def stored_or_built(name: str, fingerprint_: str, build, accelerator, output_dir: Path, writer: bool,
                    label: str) -> tuple[dict[str, torch.Tensor], str]:
    """RUN/<name>'s tensors when every process reads it with this fingerprint, else `build()` on every process
    (written by `writer`); and the line that says which, with seconds and peak memory of a build."""
    path = output_dir / name
    stored = run.read_cache(output_dir, name, fingerprint_, device=accelerator.device)
    found = [stored is not None]
    if accelerator.num_processes > 1:
        found = gather_object(found)
    if all(found):
        return stored, f"input cache: reused {path} ({label}, fingerprint {fingerprint_})"
    previous = run.cache_metadata(output_dir, name)
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    started = time.perf_counter()
    tensors = build()
    seconds, peak = time.perf_counter() - started, peak_memory_gib(accelerator.device)
    size = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
    if writer:
        run.write_cache(output_dir, name, tensors, {"fingerprint": fingerprint_, "build_seconds": f"{seconds:.3f}",
                                                     "processes": accelerator.num_processes,
                                                     "peak_memory_gib": f"{peak:.3f}", "mib": f"{size:.3f}"})
    accelerator.wait_for_everyone()
    why = " (the stored one had another fingerprint: rebuilt)" if previous is not None else ""
    return tensors, (f"input cache: built {path} ({label}, {size:.1f} MiB) in {seconds:.1f} s on "
                     f"{accelerator.num_processes} process(es), peak memory {peak:.2f} GiB, fingerprint "
                     f"{fingerprint_}{why}")


@dataclass
class TrainInputs:
    """The per-step encoders of finetune.py's loop (cached or not), mu for the probes, and the lines to print."""

    image_latents: ImageLatents
    caption_embeddings: CaptionEmbeddings
    mu: torch.Tensor | None
    lines: list[str]


def prepare_train_inputs(train_data, train_split, parts, args, accelerator, output_dir: Path, writer: bool,
                         need_mu: bool) -> TrainInputs:
    """Build or reuse the latent and caption caches (see the module docstring) and compute `mu`, the mean
    posterior-mean latent over the train rows (duplicates counted as trained), when the probes need it."""
    latents_exact = args.center_crop and not args.random_flip
    use_latents, use_captions = args.cache_latents and latents_exact, args.cache_caption_embeddings
    use_captions = use_captions and bounded_captions(args)
    image_latents = ImageLatents(parts.vae, cache=use_latents)
    caption_embeddings = CaptionEmbeddings(parts.text_encoder, cache=use_captions)
    lines, mu = [], None
    if args.cache_latents and not latents_exact:
        lines.append("input cache: latents encoded every step (random crop or flip changes the pixels)")
    if use_latents or need_mu:
        index = index_images(train_split, args.image_column)
        key = fingerprint(images=index.content, vae=weights_hash(parts.vae), dtype=parts.vae.dtype,
                          resolution=train_data.resolution, center_crop=True)
        build = lambda: dict(zip(("mean", "std"), encode_posteriors(  # noqa: E731
            train_data, index, parts.vae, accelerator, args.train_batch_size)))
        if use_latents:
            label = f"{len(index.keys)} unique images of {len(index.row_image)} rows"
            tables, line = stored_or_built(run.LATENT_CACHE_FILE, key, build, accelerator, output_dir, writer, label)
            lines.append(line)
            image_latents.preload(tables["mean"], tables["std"])
            train_data.use_image_index(index.row_image)
        else:  # only mu: the same encoding, kept in memory
            tables = build()
        if need_mu:
            mu = (dataset_mean(tables["mean"], index.counts()) * parts.vae.config.scaling_factor).cpu()
    if use_captions:
        captions = training_captions(train_data)
        key = fingerprint(text_encoder=weights_hash(parts.text_encoder), dtype=parts.text_encoder.dtype,
                          captions=digest(tokenize(parts.tokenizer, captions).numpy().tobytes()))
        build = lambda: dict(zip(("input_ids", "hidden"), encode_captions(  # noqa: E731
            captions, parts.tokenizer, parts.text_encoder, args.train_batch_size)))
        tables, line = stored_or_built(run.CAPTION_CACHE_FILE, key, build, accelerator, output_dir, writer,
                                       f"{len(captions)} distinct captions")
        lines.append(line)
        caption_embeddings.preload(tables["input_ids"], tables["hidden"])
    return TrainInputs(image_latents, caption_embeddings, mu, lines)


def cache_plan(args) -> str:
    """One line: which input caches a run with these flags uses, and why one is off."""
    latents = ("on" if args.center_crop and not args.random_flip else "off (random crop or flip)") \
        if args.cache_latents else "off (--no-cache_latents)"
    captions = ("on" if bounded_captions(args) else "off (random caption augmentation)") \
        if args.cache_caption_embeddings else "off (--no-cache_caption_embeddings)"
    return f"input cache ({run.LATENT_CACHE_FILE}, {run.CAPTION_CACHE_FILE}): latents {latents}, captions {captions}"
