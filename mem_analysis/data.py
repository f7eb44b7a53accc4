"""Image preprocessing shared by the dataset builder, training and evaluation.

Written with PIL/numpy/torch (no torchvision), matching the diffusers examples:
resize the shorter side to `resolution` (bilinear), crop, optional flip, scale to [-1, 1].
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of an image; transparency is composited onto white (emoji are RGBA)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_and_crop(image: Image.Image, resolution: int, center_crop: bool = True,
                    rng: np.random.Generator | None = None) -> Image.Image:
    """Resize the shorter side to `resolution`, then crop a square (centre, or random with `rng`)."""
    image = to_rgb(image)
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((new_w, new_h), Image.BILINEAR)
    if center_crop or rng is None:
        left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    else:
        left, top = int(rng.integers(0, new_w - resolution + 1)), int(rng.integers(0, new_h - resolution + 1))
    return image.crop((left, top, left + resolution, top + resolution))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float32 tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(to_rgb(image), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def tensor_to_image(pixels: torch.Tensor) -> Image.Image:
    """Float tensor (3, H, W) in [0, 1] -> PIL RGB image."""
    array = (pixels.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)
