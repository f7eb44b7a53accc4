"""M6 memorization severity: similarity of each generated image to its paired training image.

`generated` is (P, N, ...) (P prompts x N seeds), `reference` is (P, ...); pixels in [0, 1].
Severity of a prompt = mean similarity over seeds; memorized fraction = share of seeds whose
similarity is over the threshold. Pixel-space back ends are the default (docs/science.md M6).
"""
from __future__ import annotations

from collections import namedtuple
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

Severity = namedtuple("Severity", ["similarity", "severity", "memorized_fraction", "threshold"])
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_THRESHOLDS = {"pixel_cosine": 0.75, "ssim": 0.75, "l2": 0.9, "nn_identity": 0.5,
                      "latent_cosine": 0.75, "sscd": 0.75}
BACKENDS = tuple(DEFAULT_THRESHOLDS)
LABELS = ("copy", "similarity")  # what a seed's memorized label is (docs/science.md M6)
# Copy label: d(paired) / d(nearest other training image) below this. Bonnaire et al. (2025) use 1/3; through the
# demo's 32-px VAE that counts only 13 % (Twemoji) / 58 % (digits) of exact reconstructions. 0.5 is the largest of
# 1/3, 0.5, 0.6, 0.7 that lets at most 5 % of look-alikes pass on both (3.0 % / 0 %), counting 43 % / 85 % of exact
# copies (bench/copy_ratio.py, bench/results/copy_ratio-2026-12-05.md; docs/science.md M6, "The copy ratio").
DEFAULT_COPY_RATIO = 0.5
MEMORIZED_SHARE = 0.5  # a sample is memorized when at least this share of its seeds are (is_memorized)


def centred_cosine(generated: torch.Tensor, reference: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
    """`<g - m, r - m> / (||g - m|| ||r - m||)` per (prompt, seed); m = 0 when `mean` is None."""
    g, r = generated.double().flatten(2), reference.double().flatten(1)[:, None]
    if mean is not None:
        m = mean.double().reshape(1, 1, -1)
        g, r = g - m, r - m
    return (g * r).sum(-1) / (g.norm(dim=-1) * r.norm(dim=-1))


def l2_similarity(generated: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`1 - ||g - r||_2 / sqrt(D)` (one minus the per-pixel RMS distance, pixels in [0, 1])."""
    g, r = generated.double().flatten(2), reference.double().flatten(1)[:, None]
    return 1 - (g - r).pow(2).mean(-1).sqrt()


def ssim_similarity(generated: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """SSIM (skimage defaults: 7x7 uniform window; data_range 1) per (prompt, seed) of (3, H, W) images."""
    from skimage.metrics import structural_similarity

    P, N = generated.shape[:2]
    out = torch.empty(P, N, dtype=torch.float64)
    for p in range(P):
        ref = reference[p].double().cpu().numpy()
        for n in range(N):
            out[p, n] = structural_similarity(generated[p, n].double().cpu().numpy(), ref,
                                              channel_axis=0, data_range=1.0)
    return out


Neighbours = namedtuple("Neighbours", ["nearest", "d_paired", "d_other"])


def nearest_pool_images(generated: torch.Tensor, pool: torch.Tensor, paired_index) -> Neighbours:
    """The one nearest-neighbour search of M6: L2 distances from every generated item to every pool item.

    `generated` (P, N, ...) and `pool` (M, ...) are pixels (or any features, e.g. SSCD descriptors (P, N, D) and
    (M, D)), compared flattened. Returns per (prompt, seed): `nearest`, the index of the nearest pool item;
    `d_paired = ||g - pool[paired_index[p]]||` (NaN when `paired_index[p] = -1`: the paired image is not in the
    pool, e.g. held out of training); `d_other = min_{j != paired_index[p]} ||g - pool[j]||`, the nearest
    *other* training image (the nearest of all when there is no paired one; NaN with a one-image pool).
    """
    paired_index = torch.as_tensor(paired_index).reshape(-1).long()
    if paired_index.numel() != generated.shape[0]:
        raise ValueError(f"paired_index needs one pool index per prompt ({generated.shape[0]}), got {paired_index.numel()}")
    if pool.shape[1:] != generated.shape[2:]:
        raise ValueError(f"pool images {tuple(pool.shape[1:])} and generated {tuple(generated.shape[2:])} differ in shape")
    if paired_index.min() < -1 or paired_index.max() >= len(pool):
        raise ValueError(f"paired_index must lie in [0, {len(pool) - 1}] (the training pool), or be -1 (held out)")
    P, N = generated.shape[:2]
    distances = torch.cdist(generated.double().reshape(P * N, -1), pool.double().reshape(len(pool), -1).to(
        generated.device)).reshape(P, N, len(pool))
    paired = paired_index.to(distances.device)
    has_pair = (paired >= 0)[:, None].expand(P, N)
    d_paired = distances.gather(2, paired.clamp(min=0)[:, None, None].expand(P, N, 1))[..., 0]
    d_paired = torch.where(has_pair, d_paired, torch.full_like(d_paired, float("nan")))
    others = distances.scatter(2, paired.clamp(min=0)[:, None, None].expand(P, N, 1), float("inf"))
    others = torch.where(has_pair[..., None], others, distances)
    d_other = others.min(2).values
    d_other = torch.where(torch.isinf(d_other), torch.full_like(d_other, float("nan")), d_other)  # a one-image pool
    return Neighbours(distances.argmin(2), d_paired, d_other)


def nn_identity(generated: torch.Tensor, pool: torch.Tensor, paired_index) -> torch.Tensor:
    """1.0 where the nearest image of the whole training `pool` (pixel L2) is the paired one `paired_index[p]`, else 0.0.

    `paired_index[p] = -1`: the paired image is not in the pool (held out of training), so always 0.0.
    """
    neighbours = nearest_pool_images(generated, pool, paired_index)
    paired = torch.as_tensor(paired_index).reshape(-1, 1).to(neighbours.nearest.device)
    return (neighbours.nearest == paired).double()


def copy_distance_ratio(neighbours: Neighbours) -> torch.Tensor:
    """`rho = d(paired) / d(nearest other training image)` per (prompt, seed) (NaN without a paired image).

    rho < 1 exactly when the paired image is the nearest training image; a copy has rho near 0, an image
    that merely resembles the set (many training images about as near) has rho near 1.
    """
    return neighbours.d_paired / neighbours.d_other


def copy_label(neighbours: Neighbours, copy_ratio: float | None = None) -> torch.Tensor:
    """M6 copy label per (prompt, seed): 1.0 when `d(paired) / d(nearest other) < copy_ratio`, else 0.0.

    The test of Bonnaire et al. 2025 (nearest / second-nearest training distance below 1/3) and, for any
    `copy_ratio` <= 1, Carlini et al.'s condition that the paired image be the nearest: a generated image is
    a copy of its training image only if it is nearer to it *by a margin* than to every other training image,
    so a look-alike of a set of similar images is not counted. No paired image in the pool (held out): 0.
    Default `DEFAULT_COPY_RATIO` = 0.5 (its basis: that constant's comment and docs/science.md M6).
    """
    copy_ratio = DEFAULT_COPY_RATIO if copy_ratio is None else float(copy_ratio)
    if not 0 < copy_ratio <= 1:
        raise ValueError(f"copy_ratio must lie in (0, 1], got {copy_ratio}")
    ratio = copy_distance_ratio(neighbours)
    return (torch.nan_to_num(ratio, nan=float("inf")) < copy_ratio).double()


CopyTest = namedtuple("CopyTest", ["copy", "ratio", "fraction", "copy_ratio"])


def copy_test(neighbours: Neighbours, copy_ratio: float | None = None) -> CopyTest:
    """The copy label per (prompt, seed) (`copy_label`), the distance ratio it thresholds (`copy_distance_ratio`),
    the share of copied seeds per prompt (`fraction`, the memorized fraction under `label: copy`) and the ratio."""
    copy_ratio = DEFAULT_COPY_RATIO if copy_ratio is None else float(copy_ratio)
    copy = copy_label(neighbours, copy_ratio)
    return CopyTest(copy, copy_distance_ratio(neighbours), copy.mean(1), copy_ratio)


def is_memorized(memorized_fraction):
    """The sample-level label of every report: memorized when `memorized_fraction >= 0.5`, i.e. when at least
    half of its seeds are copies (the copy label) or over the similarity threshold (`--label similarity`).
    Takes a float, array or Series; NaN (no label) is not memorized."""
    return np.asarray(memorized_fraction, dtype=np.float64) >= MEMORIZED_SHARE


def load_sscd(path: str | Path) -> torch.jit.ScriptModule:
    """Load an SSCD TorchScript file (e.g. sscd_disc_mixup.torchscript.pt) on CPU, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SSCD model file {path} does not exist; download the TorchScript file "
                                "from facebookresearch/sscd-copy-detection and pass its path")
    try:
        model = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:  # torch raises RuntimeError or ValueError depending on the content
        raise ValueError(f"{path} is not a TorchScript file ({type(error).__name__}); SSCD needs the "
                         "*.torchscript.pt release, not a state dict or a pickle") from None
    return model.eval()


@torch.no_grad()
def embed_images(images: torch.Tensor, model, input_size: int = 288, batch_size: int = 64) -> torch.Tensor:
    """L2-normalized descriptors of a TorchScript image model on (B, 3, H, W) images in [0, 1], resized to
    `input_size`^2 and ImageNet-normalized (SSCD, or any image embedder exported the same way); (B, D) on CPU."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    mean = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)
    chunks = []
    for lo in range(0, len(images), batch_size):
        batch = F.interpolate(images[lo:lo + batch_size].float().cpu(), size=(input_size, input_size),
                              mode="bilinear", align_corners=False, antialias=True)
        chunks.append(F.normalize(model(((batch - mean) / std).to(device)).float().cpu(), dim=-1))
    return torch.cat(chunks)


def embedding_similarity(generated: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`<g, r>` of L2-normalized descriptors: generated (P, N, D), reference (P, D) -> (P, N) float64."""
    return (generated * reference[:, None]).sum(-1).double()


@torch.no_grad()
def sscd_similarity(generated: torch.Tensor, reference: torch.Tensor, model, input_size: int = 288,
                    batch_size: int = 64) -> torch.Tensor:
    """Cosine of L2-normalized SSCD descriptors of images resized to `input_size`^2, ImageNet-normalized."""
    model = load_sscd(model) if isinstance(model, (str, Path)) else model
    P, N = generated.shape[:2]
    g = embed_images(generated.reshape((P * N,) + tuple(generated.shape[2:])), model, input_size,
                     batch_size).reshape(P, N, -1)
    return embedding_similarity(g, embed_images(reference, model, input_size, batch_size))


def severity(generated: torch.Tensor, reference: torch.Tensor | None = None, backend: str = "pixel_cosine",
             threshold: float | None = None, mean_image: torch.Tensor | None = None,
             pool: torch.Tensor | None = None, paired_index=None, sscd_model=None,
             sscd_input_size: int = 288) -> Severity:
    """M6: per-(prompt, seed) similarity (P, N), severity = mean over seeds (P,), memorized fraction =
    `mean_seeds [similarity > threshold]` (P,).

    Back ends: `pixel_cosine` (centred on `mean_image`, the training set's mean image),
    `ssim`, `l2` (`1 - RMS distance`), `nn_identity` (against the whole training `pool` with the
    paired images at `paired_index`), `latent_cosine` (pass latents; centred on `mean_image` = mu
    when given) and `sscd` (`sscd_model`: TorchScript path or loaded module). Default thresholds:
    DEFAULT_THRESHOLDS (SSCD 0.75 as in the SSCD paper).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown severity backend {backend!r}; choose one of {BACKENDS}")
    if generated.ndim < 3:
        raise ValueError(f"generated must be (prompts, seeds, ...), got {tuple(generated.shape)}")
    if backend != "nn_identity":
        if reference is None or tuple(reference.shape) != (generated.shape[0],) + tuple(generated.shape[2:]):
            raise ValueError(f"reference must be (prompts, ...) = {(generated.shape[0],) + tuple(generated.shape[2:])}, "
                             f"got {None if reference is None else tuple(reference.shape)}")
    if backend == "pixel_cosine":
        if mean_image is None:
            raise ValueError("pixel_cosine is centred on the training mean image: pass mean_image=(3, H, W)")
        similarity = centred_cosine(generated, reference, mean_image)
    elif backend == "latent_cosine":
        similarity = centred_cosine(generated, reference, mean_image)
    elif backend == "ssim":
        similarity = ssim_similarity(generated, reference)
    elif backend == "l2":
        similarity = l2_similarity(generated, reference)
    elif backend == "nn_identity":
        if pool is None or paired_index is None:
            raise ValueError("nn_identity needs pool=(M, 3, H, W) (the whole training pool) and paired_index=(P,)")
        similarity = nn_identity(generated, pool, paired_index)
    else:
        if sscd_model is None:
            raise ValueError("the sscd backend needs sscd_model=PATH to the SSCD TorchScript file")
        similarity = sscd_similarity(generated, reference, sscd_model, sscd_input_size)
    return summarize_similarity(similarity, backend, threshold)


def summarize_similarity(similarity: torch.Tensor, backend: str, threshold: float | None = None) -> Severity:
    """Severity from per-(prompt, seed) similarities (P, N): mean over seeds, and the share of seeds over the
    threshold (the back end's default when None)."""
    threshold = DEFAULT_THRESHOLDS[backend] if threshold is None else float(threshold)
    return Severity(similarity, similarity.mean(1), (similarity > threshold).double().mean(1), threshold)


def self_similarity(generated: torch.Tensor, backend: str = "ssim", threshold: float | None = None,
                    mean_image: torch.Tensor | None = None, sscd_model=None, sscd_input_size: int = 288) -> Severity:
    """Reference-free M6 (no training image known): seed j's similarity is its mean similarity to the
    prompt's other seeds, `s_j = mean_{i != j} sim(g_j, g_i)`; severity = `mean_j s_j`, memorized
    fraction = `mean_j [s_j > threshold]`. `generated` (P, N >= 2, ...); back ends as `severity`
    but `nn_identity` (it needs a training pool). SSCD descriptors are computed once per image.
    """
    if backend == "nn_identity" or backend not in BACKENDS:
        raise ValueError(f"reference-free severity has no back end {backend!r}; choose one of "
                         f"{tuple(b for b in BACKENDS if b != 'nn_identity')}")
    if generated.ndim < 3 or generated.shape[1] < 2:
        raise ValueError(f"generated must be (prompts, seeds >= 2, ...), got {tuple(generated.shape)}")
    P, N = generated.shape[:2]
    pairwise = torch.empty(P, N, N, dtype=torch.float64)  # [p, j, i] = sim(g_j, g_i)
    if backend == "sscd":
        if sscd_model is None:
            raise ValueError("the sscd backend needs sscd_model=PATH to the SSCD TorchScript file")
        model = load_sscd(sscd_model) if isinstance(sscd_model, (str, Path)) else sscd_model
        e = embed_images(generated.reshape((P * N,) + tuple(generated.shape[2:])), model,
                         sscd_input_size).reshape(P, N, -1)
        pairwise = (e @ e.transpose(1, 2)).double()
    else:  # every back end here is symmetric: compute each pair once
        for i in range(N - 1):
            sim = severity(generated[:, i + 1:], generated[:, i], backend=backend, mean_image=mean_image).similarity
            pairwise[:, i + 1:, i], pairwise[:, i, i + 1:] = sim, sim
    off_diagonal = ~torch.eye(N, dtype=torch.bool)
    similarity = pairwise[:, off_diagonal].reshape(P, N, N - 1).mean(-1)
    return summarize_similarity(similarity, backend, threshold)
