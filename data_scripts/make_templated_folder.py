"""Write the Twemoji images as an image folder whose captions share one template.

    python data_scripts/make_templated_folder.py --output_dir runs/templated --seed 0

Each image gets `--template` with a 4-digit identifier drawn without replacement under `--seed`
("an emoji, item 0413"), so captions differ only in those digits: the case of a user's folder
captioned from a template. The folder (PNG files + `metadata.jsonl` with `file_name`, `text`)
is a `--source` of build_duplicated_dataset.py and an `--image_source` of make_base_model.py;
its images are listed in Twemoji's order, so the same `--max_images --seed` pick the same images.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from mem_analysis.data import check_output_dir, to_rgb, twemoji_images, write_folder_atomically


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--template", default="an emoji, item {id:04d}", help="caption; {id} is the identifier")
    p.add_argument("--seed", type=int, default=0, help="seed of the identifiers")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Write the folder atomically; one-line error and exit 1 on bad input."""
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    items = twemoji_images()
    try:
        check_output_dir(output_dir, args.overwrite)
        if len(items) > 10_000 or "{id" not in args.template:
            raise ValueError(f"--template {args.template!r} needs an {{id}} field (4-digit identifiers, at most "
                             "10,000 images)")
    except ValueError as error:
        raise SystemExit(f"make_templated_folder: error: {error}") from None
    identifiers = np.random.default_rng(args.seed).permutation(10_000)[:len(items)]

    def write(folder: Path) -> None:
        rows = []
        for index, (item, identifier) in enumerate(zip(items, identifiers.tolist())):
            name = f"{index:05d}.png"
            to_rgb(item.load()).save(folder / name)
            rows.append(dict(file_name=name, text=args.template.format(id=identifier)))
        (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    write_folder_atomically(write, output_dir)
    print(f"wrote {len(items)} images captioned {args.template!r} to {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
