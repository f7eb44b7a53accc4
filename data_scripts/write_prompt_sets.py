"""Prompt files from a study dataset, for eval/evaluate_prompts.py: captions by duplication factor, and
captions never trained on.

    python data_scripts/write_prompt_sets.py --dataset runs/demo/data --output_dir runs/demo/prompts [--max_prompts 50]

Writes `dup<F>.txt` for every duplication factor F of the train split (the captions of its unique
images in dataset order; `dup1.txt`: images seen once) and, when the dataset's source is `twemoji`,
`unseen.txt`: Twemoji captions that no training image has. At most `--max_prompts` a file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from mem_analysis.cli import run_command
from mem_analysis.data import load_study_dataset, read_manifest, twemoji_images


def prompt_sets(dataset_dir: Path, max_prompts: int | None) -> dict[str, list[str]]:
    """{file stem: captions}: one set per duplication factor, plus unseen Twemoji captions."""
    train = load_study_dataset(dataset_dir)["train"]
    ids, rows = np.unique(np.asarray(train["sample_id"]), return_index=True)
    unique = train.select(sorted(rows.tolist()))
    sets = {}
    for caption, factor in zip(unique["text"], unique["dup_factor"]):
        sets.setdefault(f"dup{factor}", []).append(caption)
    source = (read_manifest(dataset_dir, required=False) or {}).get("source")
    if source == "twemoji":
        seen = set(train["text"])
        sets["unseen"] = list(dict.fromkeys(im.caption for im in twemoji_images() if im.caption not in seen))
    return {name: captions[:max_prompts] for name, captions in sorted(sets.items())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", required=True, help="a study dataset (build_duplicated_dataset.py)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_prompts", type=int, default=None, help="at most N prompts a file")
    args = parser.parse_args(argv)
    sets = prompt_sets(Path(args.dataset), args.max_prompts)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, captions in sets.items():
        (out / f"{name}.txt").write_text("\n".join(captions) + "\n")
        print(f"{out / name}.txt: {len(captions)} prompts")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, "write_prompt_sets.py"))
