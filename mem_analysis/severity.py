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


def nn_identity(generated: torch.Tensor, pool: torch.Tensor, paired_index) -> torch.Tensor:
    """1.0 where the nearest image of the whole training `pool` (pixel L2) is the paired one `paired_index[p]`, else 0.0.

    `paired_index[p] = -1`: the paired image is not in the pool (held out of training), so always 0.0.
    """
    paired_index = torch.as_tensor(paired_index).reshape(-1)
    if paired_index.numel() != generated.shape[0]:
        raise ValueError(f"paired_index needs one pool index per prompt ({generated.shape[0]}), got {paired_index.numel()}")
    if pool.shape[1:] != generated.shape[2:]:
        raise ValueError(f"pool images {tuple(pool.shape[1:])} and generated {tuple(generated.shape[2:])} differ in shape")
    if paired_index.min() < -1 or paired_index.max() >= len(pool):
        raise ValueError(f"paired_index must lie in [0, {len(pool) - 1}] (the training pool), or be -1 (held out)")
    P, N = generated.shape[:2]
    nearest = torch.cdist(generated.double().reshape(P * N, -1), pool.double().reshape(len(pool), -1)).argmin(1)
    return (nearest.reshape(P, N) == paired_index[:, None].to(nearest.device)).double()


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


@torch.no_grad()
def sscd_similarity(generated: torch.Tensor, reference: torch.Tensor, model, input_size: int = 288,
                    batch_size: int = 64) -> torch.Tensor:
    """Cosine of L2-normalized SSCD descriptors of images resized to `input_size`^2, ImageNet-normalized."""
    model = load_sscd(model) if isinstance(model, (str, Path)) else model
    P, N = generated.shape[:2]
    g = embed_images(generated.reshape((P * N,) + tuple(generated.shape[2:])), model, input_size,
                     batch_size).reshape(P, N, -1)
    r = embed_images(reference, model, input_size, batch_size)
    return (g * r[:, None]).sum(-1).double()


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
    threshold = DEFAULT_THRESHOLDS[backend] if threshold is None else float(threshold)
    return Severity(similarity, similarity.mean(1), (similarity > threshold).double().mean(1), threshold)
