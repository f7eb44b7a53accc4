"""TensorBoard layout shared by training and evaluation: one run per duplication factor.

A scalar tagged `NAME/dup_F` is written as `NAME` into the run `ROOT/dup_F`, so TensorBoard draws
one card per quantity with one line per duplication factor (the comparison the study is about),
and the run selector shows or hides factors. Scalars without a `/dup_F` suffix stay in ROOT's run.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

FACTOR_TAG = re.compile(r"^(?P<tag>.+)/dup_(?P<factor>\d+)$")


def split_by_factor(scalars: dict[str, float]) -> tuple[dict[str, float], dict[int, dict[str, float]]]:
    """(scalars without a factor, {F: {tag: value}}) from tags of the form `tag/dup_F`."""
    plain, by_factor = {}, {}
    for name, value in scalars.items():
        match = FACTOR_TAG.match(name)
        if match is None:
            plain[name] = value
        else:
            by_factor.setdefault(int(match["factor"]), {})[match["tag"]] = value
    return plain, by_factor


class FactorWriters:
    """SummaryWriters of the runs ROOT/dup_F, opened when a factor is first written (`purge_step`: as SummaryWriter's)."""

    def __init__(self, root: str | Path, purge_step: int | None = None):
        self.root, self.purge_step, self.writers = Path(root), purge_step, {}

    def writer(self, factor: int):
        """The run of duplication factor `factor`."""
        if factor not in self.writers:
            from torch.utils.tensorboard import SummaryWriter

            self.writers[factor] = SummaryWriter(str(self.root / f"dup_{factor}"), purge_step=self.purge_step)
        return self.writers[factor]

    def log(self, scalars: dict[str, float], step: int) -> dict[str, float]:
        """Write the `tag/dup_F` scalars into their factor's run; returns the others, unwritten."""
        plain, by_factor = split_by_factor(scalars)
        for factor, values in sorted(by_factor.items()):
            for tag, value in values.items():
                self.writer(factor).add_scalar(tag, value, step)
        return plain

    def flush(self) -> None:
        """Flush every factor's event file."""
        for writer in self.writers.values():
            writer.flush()

    def close(self) -> None:
        """Close every factor's event file."""
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()


def pair_grid(top: np.ndarray, bottom: np.ndarray, pad: int = 2, min_size: int = 96) -> np.ndarray:
    """(N, H, W, 3) uint8 rows -> one (2H' + 3 pad, N W' + (N + 1) pad, 3) image: `top` above `bottom`, white gaps;
    images smaller than `min_size` are enlarged by an integer factor (nearest pixel) so that they can be seen."""
    scale = max(1, min_size // top.shape[1])
    top, bottom = (images.repeat(scale, axis=1).repeat(scale, axis=2) for images in (top, bottom))
    n, h, w, c = top.shape
    grid = np.full((2 * h + 3 * pad, n * w + (n + 1) * pad, c), 255, dtype=np.uint8)
    for row, images in enumerate((top, bottom)):
        y = pad + row * (h + pad)
        for i, image in enumerate(images):
            x = pad + i * (w + pad)
            grid[y:y + h, x:x + w] = image
    return grid
