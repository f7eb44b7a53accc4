"""Write scikit-learn's handwritten digits as an image folder of look-alikes: many images of few kinds.

    python data_scripts/make_digits_folder.py --output_dir runs/digits-folder --seed 0

The 1,797 digits of `sklearn.datasets.load_digits` (8x8, 10 classes, shipped inside scikit-learn) are upsampled
(bilinear) to `--size` px, dark ink on white, RGB. Each gets a caption naming its class and a 4-digit identifier
drawn without replacement under `--seed` ("a handwritten 3, number 0412"), so every image can be keyed to its own
caption. About 180 images share each class: a generated "3" resembles many training images, which is the case
where a similarity threshold to the paired image cannot tell a copy from a look-alike (docs/science.md M6). The
folder (PNG files + `metadata.jsonl` with `file_name`, `text`) is a `--source` of build_duplicated_dataset.py and,
through `--exclude_dataset`, the pool of make_base_model.py; configs/demo_digits.yaml runs the demo on it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from mem_analysis.cli import run_command
from mem_analysis.data import check_output_dir, write_folder_atomically


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--size", type=int, default=32, help="side of the written images in pixels")
    p.add_argument("--template", default="a handwritten {digit}, number {id:04d}",
                   help="caption; {digit} is the class, {id} a 4-digit identifier")
    p.add_argument("--seed", type=int, default=0, help="seed of the identifiers")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    return p.parse_args(argv)


def digit_image(values: np.ndarray, size: int) -> Image.Image:
    """An 8x8 digit (0 = background .. 16 = ink) as a `size`-px RGB image, dark ink on white."""
    gray = Image.fromarray((255 - values * (255 / 16)).round().astype(np.uint8), mode="L")
    return gray.resize((size, size), Image.BILINEAR).convert("RGB")


def main(argv=None) -> int:
    """Write the folder atomically (ValueError on bad input: one line, exit status 2)."""
    from sklearn.datasets import load_digits

    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    if args.size < 8:
        raise ValueError(f"--size {args.size} must be at least 8")
    if "{id" not in args.template:
        raise ValueError(f"--template {args.template!r} needs an {{id}} field so that captions differ per image")
    check_output_dir(output_dir, args.overwrite)
    digits = load_digits()
    identifiers = np.random.default_rng(args.seed).permutation(10_000)[:len(digits.images)]

    def write(folder: Path) -> None:
        rows = []
        for index, (values, digit, identifier) in enumerate(zip(digits.images, digits.target, identifiers.tolist())):
            name = f"{index:05d}.png"
            digit_image(values, args.size).save(folder / name)
            rows.append(dict(file_name=name, text=args.template.format(digit=int(digit), id=identifier)))
        (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    write_folder_atomically(write, output_dir)
    print(f"wrote {len(digits.images)} digits at {args.size} px captioned {args.template!r} to {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, "make_digits_folder.py"))
