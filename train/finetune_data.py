"""Data of train/finetune.py: the train and probe splits, training examples in a resumable order (with the
caption mitigations), and the latent and caption-embedding sources the input cache fills.
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from mem_analysis.data import image_to_tensor, load_study_dataset, resize_and_crop
from mem_analysis.mitigations import augment_caption, dedup_sampling_weights
from mem_analysis.sd import cut_prompts_line, encode_images, tokenize


def load_splits(args):
    """(train, probe) datasets from --train_data_dir (study dataset) or --dataset_name.

    With --dataset_name and no `probe` split, the probe split is the first `num_probe_samples`
    train rows, with sample_id = row index and dup_factor = 1 (unknown duplication).
    """
    import datasets

    if args.train_data_dir:
        splits = load_study_dataset(args.train_data_dir)
        source = args.train_data_dir
    else:
        source = args.dataset_name
        try:
            splits = datasets.load_dataset(args.dataset_name, args.dataset_config_name)
        except (FileNotFoundError, ConnectionError, OSError) as error:
            raise ValueError(f"cannot load dataset {args.dataset_name!r} ({error}); give a local folder or a "
                             "reachable hub name, or use --train_data_dir") from None
        if "train" not in splits:
            raise ValueError(f"dataset {source} has no 'train' split (splits: {sorted(splits)})")
    train = splits["train"]
    for flag, column in (("--image_column", args.image_column), ("--caption_column", args.caption_column)):
        if column not in train.column_names:
            raise ValueError(f"dataset {source} split 'train' has no column {column!r} "
                             f"(columns: {train.column_names}); pass {flag}")
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if "probe" in splits:
        probe = splits["probe"]
    else:
        probe = train.select(range(min(args.num_probe_samples, len(train))))
    if "sample_id" not in probe.column_names:
        probe = probe.add_column("sample_id", list(range(len(probe))))
    if "dup_factor" not in probe.column_names:
        probe = probe.add_column("dup_factor", [1] * len(probe))
    missing = [c for c in (args.image_column, args.caption_column) if c not in probe.column_names]
    if missing:
        raise ValueError(f"dataset {source} split 'probe' lacks column(s) {missing} (has {probe.column_names})")
    if len(train) == 0 or len(probe) == 0:
        raise ValueError(f"dataset {source}: the train and probe splits must not be empty")
    return train, probe


def pick_caption(caption, rng: np.random.Generator | None) -> str:
    """The caption of a row; one of several (random with `rng`, else the first) when it is a list."""
    if isinstance(caption, (list, tuple)):
        return str(caption[int(rng.integers(len(caption)))] if rng is not None else caption[0])
    return str(caption)


def caption_vocabulary(tokenizer) -> list[str]:
    """The tokenizer's tokens as words (special tokens left out): the pool of random-word caption augmentation."""
    special = set(tokenizer.all_special_ids)
    words = (tokenizer.decode([i]).strip() for i in range(tokenizer.vocab_size) if i not in special)
    return [w for w in words if w]


def captions_by_sample(split, caption_column: str) -> dict[int, list[str]]:
    """sample_id -> the distinct captions of its rows (a list caption column counts every entry)."""
    if "sample_id" not in split.column_names:
        raise ValueError("caption_augmentation multiple_captions needs a sample_id column (a study dataset)")
    found: dict[int, list[str]] = {}
    for sid, caption in zip(split["sample_id"], split[caption_column]):
        bucket = found.setdefault(int(sid), [])
        for text in caption if isinstance(caption, (list, tuple)) else [caption]:
            if text not in bucket:
                bucket.append(str(text))
    if all(len(v) < 2 for v in found.values()):
        raise ValueError("caption_augmentation multiple_captions needs several captions per image; build the "
                         "dataset with --caption_mode varied or give a list caption column")
    return found


def long_captions_line(tokenizer, split, caption_column: str) -> str | None:
    """The line finetune.py prints when training captions are longer than the text encoder's window (how many,
    how many tokens are cut); None when all fit."""
    captions = [str(text) for caption in split[caption_column]
                for text in (caption if isinstance(caption, (list, tuple)) else [caption])]
    return cut_prompts_line(tokenizer, captions, "distinct training captions")


def bounded_captions(args) -> bool:
    """Whether the training captions form a fixed set: true unless a random-word or random-number caption
    augmentation makes nearly every drawn caption new (then per-caption caches would only grow)."""
    return getattr(args, "caption_augmentation", None) in (None, "multiple_captions")


class TrainExamples(torch.utils.data.Dataset):
    """Training rows as pixels in [-1, 1] and token ids; key (row, epoch) seeds that row's augmentation.

    Caption augmentation (--caption_augmentation) draws from its own generator keyed by
    (seed, epoch, row, 1), so it leaves crops, flips and caption choice as they were and is
    the same on every process and after a resume.
    """

    def __init__(self, split, tokenizer, resolution: int, args):
        self.split, self.tokenizer, self.resolution, self.args = split, tokenizer, resolution, args
        self.captions = split[args.caption_column]  # text only: no image is decoded
        # Without random crop or flip a row's pixels never change, so --cache_train_pixels keeps them.
        self.pixel_cache = {} if args.cache_train_pixels and args.center_crop and not args.random_flip else None
        self.token_cache = {}
        self.row_image = None  # set by use_image_index: rows then carry their image's index, not pixels
        kind = getattr(args, "caption_augmentation", None)
        self.vocabulary = caption_vocabulary(tokenizer) if kind == "rand_word_add" else ()
        self.alternatives = captions_by_sample(split, args.caption_column) if kind == "multiple_captions" else {}
        self.sample_ids = split["sample_id"] if self.alternatives else None

    def __len__(self) -> int:
        return len(self.split)

    def pixels(self, index: int, rng: np.random.Generator | None = None, image=None) -> torch.Tensor:
        """Row `index` (or its already decoded `image`) resized and cropped; random crop / flip only with `rng`."""
        image = self.split[index][self.args.image_column] if image is None else image
        image = resize_and_crop(image, self.resolution, center_crop=self.args.center_crop or rng is None, rng=rng)
        if rng is not None and self.args.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return image_to_tensor(image)

    def __getitem__(self, key) -> dict:
        index, epoch = key
        rng = np.random.default_rng([self.args.seed, epoch, index])
        caption = original = pick_caption(self.captions[index], rng)
        kind = getattr(self.args, "caption_augmentation", None)
        if kind is not None:
            alternatives = self.alternatives.get(int(self.sample_ids[index]), ()) if self.alternatives else ()
            caption = augment_caption(caption, kind, self.args.caption_augmentation_p,
                                      np.random.default_rng([self.args.seed, epoch, index, 1]), self.vocabulary,
                                      alternatives)
        if caption in self.token_cache:
            input_ids = self.token_cache[caption]
        else:
            input_ids = tokenize(self.tokenizer, [caption])[0]
            if caption == original or bounded_captions(self.args):  # random-word captions are not kept
                self.token_cache[caption] = input_ids
        if self.row_image is not None:  # the latent cache holds this image's posterior: no pixels decoded
            return {"image": self.row_image[index], "input_ids": input_ids, "row": index}
        return {"pixel_values": self.row_pixels(index, rng), "image": index, "input_ids": input_ids, "row": index}

    def use_image_index(self, row_image: list[int]) -> None:
        """Yield each row's unique-image index (finetune_cache.ImageIndex.row_image) instead of its pixels."""
        self.row_image = row_image

    def row_pixels(self, index: int, rng: np.random.Generator) -> torch.Tensor:
        """Row `index`'s training pixels, decoded once per row when they are cached."""
        if self.pixel_cache is None:
            return self.pixels(index, rng)
        if index not in self.pixel_cache:
            self.pixel_cache[index] = self.pixels(index, rng)
        return self.pixel_cache[index]


class EpochSampler(torch.utils.data.Sampler):
    """A permutation of the rows that depends only on (seed, epoch); yields (row, epoch) keys.

    With `weights` (row probabilities, e.g. `dedup_sampling_weights`) an epoch is instead num_rows
    rows drawn with replacement from those probabilities, again a function of (seed, epoch) only,
    so the step count and an exact resume are unchanged.
    """

    def __init__(self, num_rows: int, seed: int, weights: np.ndarray | None = None):
        self.num_rows, self.seed, self.epoch, self.weights = num_rows, seed, 0, weights

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the next iteration yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_rows

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.weights is None:
            order = rng.permutation(self.num_rows)
        else:
            order = rng.choice(self.num_rows, size=self.num_rows, replace=True, p=self.weights)
        return iter([(int(i), self.epoch) for i in order])


def row_sampling_weights(split, args) -> np.ndarray | None:
    """--dedup_sampling: each row's probability 1 / dup_factor, normalised (None when off)."""
    if not getattr(args, "dedup_sampling", False):
        return None
    if "dup_factor" not in split.column_names:
        raise ValueError("dedup_sampling needs a dup_factor column in the train split (a study dataset)")
    return dedup_sampling_weights(split["dup_factor"])


class CaptionEmbeddings:
    """Frozen text encoder outputs of token-id rows, each distinct row encoded once and then reused.

    The text encoder is frozen and its output for a caption does not depend on the other captions of
    the batch, so a lookup returns what encoding the batch would (the tests check equal losses).
    With `cache=False` every call encodes its batch (finetune does so when a random-word or random-number
    caption augmentation makes the captions unbounded; rows are keyed by token ids, so the augmented
    caption, not the dataset's, is what a cached row holds).
    """

    def __init__(self, text_encoder, cache: bool = True):
        self.text_encoder, self.cache, self.stored = text_encoder, cache, {}

    def preload(self, input_ids: torch.Tensor, hidden: torch.Tensor) -> None:
        """Store already encoded rows: (M, L) token ids and their (M, L, D) hidden states."""
        self.stored.update(zip((tuple(row) for row in input_ids.tolist()), hidden.unbind(0)))

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids -> (N, L, D) hidden states."""
        input_ids = input_ids.to(self.text_encoder.device)
        if not self.cache:
            return self.text_encoder(input_ids, return_dict=False)[0]
        keys = [tuple(row) for row in input_ids.tolist()]
        missing = [row for row in dict.fromkeys(keys) if row not in self.stored]
        if missing:
            hidden = self.text_encoder(torch.tensor(missing, device=input_ids.device), return_dict=False)[0]
            self.stored.update(zip(missing, hidden.unbind(0)))
        return torch.stack([self.stored[key] for key in keys])


class ImageLatents:
    """Frozen VAE posteriors of the training images, each image encoded once and then sampled afresh.

    Without random crop or flip an image's pixels never change and the VAE is frozen, so its posterior
    N(mean, std^2) is fixed: a lookup draws `mean + std * noise` with the noise drawn as diffusers'
    `DiagonalGaussianDistribution.sample` draws it (same generator, shape and order), and returns the
    scaled latents that `encode_images(..., sample=True)` of the batch would. Keys name images (finetune
    preloads every unique image's posterior before the first step, train/finetune_cache.py; a key not
    stored is encoded from its pixels on first use). With `cache=False` every call encodes its batch.
    """

    def __init__(self, vae, cache: bool = True):
        self.vae, self.cache, self.stored = vae, cache, {}

    def preload(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store the (K, C, h, w) posteriors of images 0..K-1."""
        self.stored.update(enumerate(zip(mean.unbind(0), std.unbind(0))))

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor | None, keys: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(N, 3, H, W) pixels of images `keys` (None when all are stored) -> (N, 4, h, w) sampled latents
        times the VAE's scaling factor."""
        if not self.cache:
            return encode_images(self.vae, pixels, generator, sample=True)
        keys = [int(key) for key in keys]
        missing = [i for i, key in enumerate(keys) if key not in self.stored and key not in keys[:i]]
        if missing:
            posterior = self.vae.encode(pixels[missing].to(device=self.vae.device, dtype=self.vae.dtype)).latent_dist
            self.stored.update(zip([keys[i] for i in missing], zip(posterior.mean.unbind(0), posterior.std.unbind(0))))
        mean = torch.stack([self.stored[key][0] for key in keys])
        std = torch.stack([self.stored[key][1] for key in keys])
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + std * noise) * self.vae.config.scaling_factor
