"""What distance ratio a copy and a look-alike give: the basis of the copy label's default ratio (docs/science.md M6).

    python bench/copy_ratio.py --model BASE --dataset DATA [--dataset DATA2 ...]   # before any training
    python bench/copy_ratio.py --eval_dir RUN/eval [--eval_dir ...]                # the generated seeds of runs

With `--model` and `--dataset` (a study dataset and a base model whose VAE never saw its images): for every
unique training image x, the ratio rho = d(paired) / d(nearest other training image), pixel L2 over the training
pool (mem_analysis.severity.nearest_pool_images), and the centred pixel cosine to the paired image (the similarity
back end, threshold 0.75), of
- a copy: the VAE's reconstruction of x, the most faithful copy a generation can be;
- a copy with an error: the decoded `encode(x) + s eps` (latents have unit spread), s = 0.25, 0.5, 1;
- a look-alike: x's reconstruction when x itself is left out of the pool, its nearest other training image taken
  as the paired one (the smallest ratio an image that copies no training image can reach), and the same for the
  held-out probe images (dup_factor 0, never trained).
With `--eval_dir`: per duplication factor at the last checkpoint and headline g, the generated seeds' copy_ratio
(per_seed.csv), the share under each candidate ratio and the share over the similarity threshold.
Prints quantiles of rho and the share of each kind under candidate ratios side by side.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

CANDIDATES = (1 / 3, 0.5, 0.6, 0.7, 1.0)
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
NOISE = (0.25, 0.5, 1.0)


def row(name: str, ratio: np.ndarray, cosine: np.ndarray | None) -> str:
    """One table line: quantiles of rho, the share under each candidate, the cosine's median and share over 0.75."""
    ratio = ratio[np.isfinite(ratio)]  # held-out samples have no paired training image: no ratio
    cells = ([f"{q:.2f}" for q in np.quantile(ratio, QUANTILES)] + [f"{(ratio < c).mean():.3f}" for c in CANDIDATES]
             if len(ratio) else ["n/a"] * (len(QUANTILES) + len(CANDIDATES)))
    cosine_cells = ["n/a", "n/a"] if cosine is None else [f"{np.median(cosine):.2f}", f"{(cosine > 0.75).mean():.3f}"]
    return f"| {name} | {len(ratio)} | " + " | ".join(cells + cosine_cells) + " |"


def header(first: str) -> list[str]:
    """The table's two header lines."""
    names = [f"rho p{int(q * 100)}" for q in QUANTILES] + [f"rho < {c:.2f}" for c in CANDIDATES]
    return [f"| {first} | n | " + " | ".join(names) + " | cosine median | cosine > 0.75 |",
            "|---|---|" + "---|" * (len(names) + 2)]


def ratio_and_cosine(generated: torch.Tensor, pool: torch.Tensor, paired, mean_image: torch.Tensor):
    """rho and the centred cosine to the paired pool image of (M, 3, H, W) images (one seed each)."""
    from mem_analysis.severity import centred_cosine, copy_distance_ratio, nearest_pool_images

    paired = torch.as_tensor(paired)
    rho = copy_distance_ratio(nearest_pool_images(generated[:, None], pool, paired))[:, 0]
    cosine = centred_cosine(generated[:, None], pool[paired], mean_image)[:, 0]
    return rho.numpy(), cosine.numpy()


def look_alike(generated: torch.Tensor, pool: torch.Tensor, mean_image: torch.Tensor, exclude=None):
    """rho and cosine of images that copy nothing: the nearest pool image (leaving out `exclude[i]`) as the pair."""
    from mem_analysis.severity import nearest_pool_images

    ratios, cosines = [], []
    for i, image in enumerate(generated):
        keep = torch.ones(len(pool), dtype=torch.bool)
        if exclude is not None:
            keep[exclude[i]] = False
        others = pool[keep]
        nearest = nearest_pool_images(image[None, None], others, [-1]).nearest[0, 0]
        rho, cosine = ratio_and_cosine(image[None], others, [int(nearest)], mean_image)
        ratios.append(rho[0])
        cosines.append(cosine[0])
    return np.array(ratios), np.array(cosines)


def vae_lines(model: str, dataset: str, seed: int = 0) -> list[str]:
    """The copy / look-alike table of one dataset through one VAE."""
    from mem_analysis.data import image_to_tensor, load_study_dataset
    from mem_analysis.measure import encode_pixels
    from mem_analysis.sd import decode_latents, load_components

    vae = load_components(model).vae.eval()
    data = load_study_dataset(dataset)
    train, probe = data["train"], data["probe"]
    ids, first, counts = np.unique(np.asarray(train["sample_id"]), return_index=True, return_counts=True)
    pool = torch.stack([image_to_tensor(im) for im in train.select(first.tolist())["image"]])  # [-1, 1]
    held = [i for i, d in enumerate(probe["dup_factor"]) if d == 0]
    heldout = torch.stack([image_to_tensor(probe[i]["image"]) for i in held]) if held else None
    weights = torch.as_tensor(counts / counts.sum(), dtype=torch.float32)[:, None, None, None]
    mean_image = ((pool + 1) / 2 * weights).sum(0)

    def through_vae(pixels: torch.Tensor, noise: float = 0.0) -> torch.Tensor:
        latents = encode_pixels(vae, pixels, "cpu")
        latents = latents + noise * torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            return torch.cat([decode_latents(vae, chunk) for chunk in latents.split(64)]).float()

    target = (pool + 1) / 2
    index = np.arange(len(pool))
    lines = [f"**{dataset}**: {len(pool)} unique training images, {len(held)} held out; VAE of {model}", ""]
    lines += header("kind")
    recon = through_vae(pool)
    lines.append(row("copy: VAE reconstruction", *ratio_and_cosine(recon, target, index, mean_image)))
    for s in NOISE:
        lines.append(row(f"copy: latent + {s:g} noise", *ratio_and_cosine(through_vae(pool, s), target, index,
                                                                            mean_image)))
    lines.append(row("look-alike: itself left out", *look_alike(recon, target, mean_image, exclude=index)))
    if heldout is not None:
        lines.append(row("look-alike: held-out image", *look_alike(through_vae(heldout), target, mean_image)))
    return lines + [""]


def eval_lines(eval_dir: str) -> list[str]:
    """Per duplication factor: the generated seeds' rho at the last checkpoint and headline g."""
    folder = Path(eval_dir)
    settings = json.loads((folder / "settings.json").read_text())
    seeds = pd.read_csv(folder / "per_seed.csv")
    seeds = seeds[seeds["guidance_scale"] == settings["guidance_scale"]]
    seeds = seeds[seeds["checkpoint_step"] == seeds["checkpoint_step"].max()]
    similarity = seeds[f"sev_{settings['severity_backend']}"].to_numpy(float)
    lines = [f"**{eval_dir}** (step {int(seeds['checkpoint_step'].max())}, g = {settings['guidance_scale']:g}; "
             f"cosine: `{settings['severity_backend']}`, whose threshold is {settings['threshold']:g})", ""]
    lines += header("dup_factor")
    for dup, rows in seeds.groupby("dup_factor"):
        pick = (seeds["dup_factor"] == dup).to_numpy()
        lines.append(row(f"{dup}x", rows["copy_ratio"].to_numpy(float), similarity[pick]))
    return lines + [""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a base model folder (its VAE)")
    p.add_argument("--dataset", action="append", default=[], help="a study dataset (repeat for several)")
    p.add_argument("--eval_dir", action="append", default=[], help="an evaluate_checkpoints.py output (repeat)")
    args = p.parse_args(argv)
    if args.dataset and not args.model:
        p.error("--dataset needs --model (the VAE the copies go through)")
    if not (args.dataset or args.eval_dir):
        p.error("give --model with --dataset, or --eval_dir")
    lines = [f"Candidate ratios {', '.join(f'{c:.2f}' for c in CANDIDATES)}; rho = d(paired) / d(nearest other "
             "training image), pixel L2; cosine = centred pixel cosine to the paired image.", ""]
    for dataset in args.dataset:
        lines += vae_lines(args.model, dataset)
    for eval_dir in args.eval_dir:
        lines += eval_lines(eval_dir)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
