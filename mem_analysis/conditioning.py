"""Is the caption conditioning usable? Separation of caption embeddings, and the CLIP loss that
trains the tiny text encoder to separate them (data_scripts/make_base_model.py).

A UNet can key a memory to a caption only if the text encoder gives that caption hidden states
unlike the others'. A random character-level encoder gives templated captions ("an emoji, item
0413" vs "... 8925") flattened hidden states with cosine about 0.99: nearly nothing to key on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def caption_separation(hidden: torch.Tensor) -> dict[str, float]:
    """Mean and max over pairs i != j of `cos(h_i, h_j)`, `h_i` = caption i's hidden states flattened.

    `hidden`: (N, L, D) text-encoder outputs, N >= 2. Lower is better separated (1: identical).
    """
    if hidden.shape[0] < 2:
        raise ValueError(f"caption_separation needs at least 2 captions, got {hidden.shape[0]}")
    unit = F.normalize(hidden.flatten(1).double(), dim=1)
    cosines = unit @ unit.T
    pairs = cosines[~torch.eye(len(unit), dtype=torch.bool)]
    return dict(mean_cosine=pairs.mean().item(), max_cosine=pairs.max().item(), captions=len(unit))


def clip_loss(text: torch.Tensor, image: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP (Radford et al. 2021) over a batch of N matching (text, image) pairs.

    `logits = exp(logit_scale) <t_i / ||t_i||, v_j / ||v_j||>`; loss = (CE(logits, diag) + CE(logits^T, diag)) / 2.
    """
    logits = logit_scale.exp() * F.normalize(text, dim=-1) @ F.normalize(image, dim=-1).T
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
