"""transformers without torchvision: bind the image-processor names diffusers imports to the PIL classes.

transformers 5 gives the names `CLIPImageProcessor` and `SiglipImageProcessor` to its torchvision
back end; without torchvision (not a dependency: no torchvision wheel works beside the CPU torch)
it falls back to `CLIPImageProcessorPil` / `SiglipImageProcessorPil` and logs a warning the first
time each name is looked up, which diffusers' pipeline modules do on import. Binding the names
to the PIL classes first is that same fallback, without the warning on every command.
"""
from __future__ import annotations

import sys


def use_pil_image_processors() -> None:
    """Point transformers' torchvision image-processor names at their PIL classes when torchvision is absent."""
    import transformers
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return
    for name in ("CLIPImageProcessor", "SiglipImageProcessor"):
        pil_class = getattr(transformers, f"{name}Pil", None)
        # `from transformers import X` reads sys.modules["transformers"], which loading a class may replace
        lazy = sys.modules["transformers"]
        if pil_class is not None and name not in vars(lazy):
            setattr(lazy, name, pil_class)


use_pil_image_processors()
