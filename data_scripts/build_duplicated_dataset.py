"""Build a study dataset whose duplication is controlled and recorded.

    python data_scripts/build_duplicated_dataset.py --source twemoji --output_dir runs/data \
        --dup_factors 1,4,16,64 --samples_per_factor 8 --resolution 32 --max_images 256

Writes a `datasets.DatasetDict` (`save_to_disk`, images embedded) with splits `train`
(one row per training example, duplicates expanded) and `probe` (the unique images that
training and evaluation track), columns image / text / sample_id / dup_factor, plus
`manifest.json`: the ground truth of who was duplicated how often. Three schemes:
- factors (default): `--dup_factors F1,F2,.. --samples_per_factor K`: K images per factor
  appear that many times; every other image once.
- weighted (Somepalli et al. 2023): `--dup_fraction P --dup_weight W`: a share P of the
  images appears W times (W copies = sampling weight W), the rest once.
- repeated (Wen et al. 2024): `--repeated_images N --repeats R --fresh_images M`: the first
  N images R times each, plus the next M images once; other images are not used.
`--probe_heldout N` moves N once-seen images out of `train` into the probe split only, with
dup_factor 0: images the model never trains on, a clean null for the early warning.
Images with identical pixels after resizing (Twemoji has a few, e.g. flags) are kept once,
so that no image is duplicated without the manifest saying so.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from mem_analysis.cli import parse_list, run_command
from mem_analysis.data import (check_output_dir, image_hash, list_source_images, load_source_image, subsample,
                               write_folder_atomically, write_manifest)

# Varied captions: every copy gets "<prefix><caption><suffix>", combinations drawn without repetition.
CAPTION_PREFIXES = ("", "an emoji of ", "a picture of ", "an icon of ", "a drawing of ", "clip art of ",
                    "a small image of ", "an illustration of ")
CAPTION_SUFFIXES = ("", ", flat colours", " on a white background", ", simple vector art", ", centred",
                    ", high quality")


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags (diffusers-style names where one exists)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="twemoji",
                   help="'twemoji', an image folder with metadata.jsonl, or a datasets hub name / save_to_disk path")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--image_column", default="image")
    p.add_argument("--caption_column", default="text")
    p.add_argument("--split", default="train", help="split to read from a datasets source")
    p.add_argument("--max_images", type=int, default=None,
                   help="use at most this many source images, drawn under --seed (default: all)")
    p.add_argument("--dup_factors", default=None, help="factors scheme: comma list, e.g. 1,4,16,64 (the default)")
    p.add_argument("--samples_per_factor", type=int, default=None, help="factors scheme: images per factor (8)")
    p.add_argument("--dup_fraction", type=float, default=None, help="weighted scheme: share of duplicated images")
    p.add_argument("--dup_weight", type=int, default=None, help="weighted scheme: copies of each duplicated image")
    p.add_argument("--repeated_images", type=int, default=None, help="repeated scheme: first N images ...")
    p.add_argument("--repeats", type=int, default=None, help="repeated scheme: ... repeated R times ...")
    p.add_argument("--fresh_images", type=int, default=None, help="repeated scheme: ... plus M fresh images")
    p.add_argument("--caption_mode", choices=("fixed", "varied"), default="fixed",
                   help="fixed: every copy has the image's caption; varied: each copy a different wording")
    p.add_argument("--probe_unduplicated", type=int, default=None,
                   help="never-duplicated images in the probe split (default: as many as duplicated ones)")
    p.add_argument("--probe_heldout", type=int, default=0,
                   help="images taken out of train and kept in the probe split only (dup_factor 0): a null "
                        "population the early warning prefers to never-duplicated images")
    p.add_argument("--resolution", type=int, default=32, help="resize the shorter side and centre-crop to this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    return p.parse_args(argv)


def positive_ints(text: str, flag: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16]; one-line error for anything else."""
    try:
        values = parse_list(text, int)
    except ValueError:
        values = []
    if not values or min(values) < 1 or len(set(values)) != len(values):
        raise ValueError(f"{flag} {text!r} must be distinct positive integers separated by commas, e.g. 1,4,16")
    return values


def choose_scheme(args: argparse.Namespace) -> dict:
    """The duplication scheme and its parameters, from whichever flags were given (one scheme only)."""
    given = {
        "factors": args.dup_factors is not None or args.samples_per_factor is not None,
        "weighted": args.dup_fraction is not None or args.dup_weight is not None,
        "repeated": args.repeated_images is not None or args.repeats is not None or args.fresh_images is not None,
    }
    if sum(given.values()) > 1:
        raise ValueError(f"flags of several schemes given ({[k for k, v in given.items() if v]}); "
                         "use only one of --dup_factors/--samples_per_factor, --dup_fraction/--dup_weight, "
                         "--repeated_images/--repeats/--fresh_images")
    if given["weighted"]:
        if args.dup_fraction is None or args.dup_weight is None:
            raise ValueError("the weighted scheme needs both --dup_fraction and --dup_weight")
        if not 0 < args.dup_fraction < 1 or args.dup_weight < 2:
            raise ValueError(f"--dup_fraction {args.dup_fraction} must be in (0, 1) and --dup_weight "
                             f"{args.dup_weight} at least 2")
        return dict(name="weighted", dup_fraction=args.dup_fraction, dup_weight=args.dup_weight)
    if given["repeated"]:
        if args.repeated_images is None or args.repeats is None:
            raise ValueError("the repeated scheme needs --repeated_images and --repeats (and optionally --fresh_images)")
        fresh = args.fresh_images or 0
        if args.repeated_images < 1 or args.repeats < 2 or fresh < 0:
            raise ValueError(f"--repeated_images {args.repeated_images} must be >= 1, --repeats {args.repeats} "
                             f">= 2 and --fresh_images {fresh} >= 0")
        return dict(name="repeated", repeated_images=args.repeated_images, repeats=args.repeats, fresh_images=fresh)
    factors = positive_ints(args.dup_factors or "1,4,16,64", "--dup_factors")
    per_factor = 8 if args.samples_per_factor is None else args.samples_per_factor
    if per_factor < 1:
        raise ValueError(f"--samples_per_factor {per_factor} must be at least 1")
    return dict(name="factors", dup_factors=factors, samples_per_factor=per_factor)


def plan_duplication(num_images: int, scheme: dict, rng: np.random.Generator) -> tuple[dict[int, int], list[int]]:
    """Copies per used image index, and the never-duplicated indices the scheme singles out as controls."""
    name = scheme["name"]
    if name == "factors":
        factors, k = scheme["dup_factors"], scheme["samples_per_factor"]
        needed = k * len(factors)
        if needed > num_images:
            raise ValueError(f"--dup_factors {','.join(map(str, factors))} x --samples_per_factor {k} asks for "
                             f"{needed} images but the source has {num_images}; lower them or add images")
        order = rng.permutation(num_images)
        copies = {i: 1 for i in range(num_images)}
        controls = []
        for group, factor in enumerate(factors):
            chosen = sorted(int(i) for i in order[group * k:(group + 1) * k])
            copies.update({i: factor for i in chosen})
            controls += chosen if factor == 1 else []
        return copies, controls
    if name == "weighted":
        count = round(scheme["dup_fraction"] * num_images)
        if count < 1:
            raise ValueError(f"--dup_fraction {scheme['dup_fraction']} of {num_images} images selects none; raise it")
        chosen = rng.choice(num_images, size=count, replace=False)
        copies = {i: 1 for i in range(num_images)}
        copies.update({int(i): scheme["dup_weight"] for i in chosen})
        return copies, []
    repeated, fresh = scheme["repeated_images"], scheme["fresh_images"]
    if repeated + fresh > num_images:
        raise ValueError(f"--repeated_images {repeated} + --fresh_images {fresh} asks for {repeated + fresh} "
                         f"images but the source has {num_images}; lower them or add images")
    copies = {i: scheme["repeats"] for i in range(repeated)}
    copies.update({i: 1 for i in range(repeated, repeated + fresh)})
    return copies, []


def choose_probe(copies: dict[int, int], controls: list[int], requested: int | None,
                 rng: np.random.Generator) -> list[int]:
    """Every duplicated image plus never-duplicated ones: the scheme's controls first, then drawn at random."""
    duplicated = sorted(i for i, c in copies.items() if c > 1)
    singles = sorted(i for i, c in copies.items() if c == 1)
    if requested is not None and not 0 <= requested <= len(singles):
        raise ValueError(f"--probe_unduplicated {requested} asks for more never-duplicated images than the "
                         f"{len(singles)} in the dataset; lower it")
    count = min(len(duplicated), len(singles)) if requested is None else requested
    control_set = set(controls)
    others = [i for i in singles if i not in control_set]
    drawn = [others[j] for j in rng.permutation(len(others))]
    return sorted(duplicated + (controls + drawn)[:count])


def choose_heldout(copies: dict[int, int], probe: set[int], requested: int, rng: np.random.Generator) -> list[int]:
    """`requested` never-duplicated images outside the probe so far, drawn at random, to be held out of train."""
    candidates = sorted(i for i, c in copies.items() if c == 1 and i not in probe)
    if not 0 <= requested <= len(candidates):
        raise ValueError(f"--probe_heldout {requested} asks for more images than the {len(candidates)} once-seen "
                         "images outside the probe split; lower it (or --probe_unduplicated)")
    return sorted(int(candidates[j]) for j in rng.permutation(len(candidates))[:requested])


def vary_captions(caption: str, copies: int, rng: np.random.Generator) -> list[str]:
    """`copies` wordings of a caption, all prefix/suffix combinations used before any repeats."""
    combos = [(p, s) for p in CAPTION_PREFIXES for s in CAPTION_SUFFIXES]
    order = rng.permutation(len(combos))
    return [f"{combos[order[j % len(combos)]][0]}{caption}{combos[order[j % len(combos)]][1]}" for j in range(copies)]


def unique_images(items: list, resolution: int) -> tuple[list, list, list[list[str]]]:
    """Decode and resize; keep the first of images with identical pixels (they would be hidden duplicates)."""
    kept, images, first_of = [], [], {}
    for item in items:
        image = load_source_image(item, resolution)
        digest = image_hash(image)
        if digest in first_of:
            first_of[digest].append(item.name)
            continue
        first_of[digest] = [item.name]
        kept.append(item)
        images.append(image)
    return kept, images, [names for names in first_of.values() if len(names) > 1]


def build(args: argparse.Namespace) -> tuple[object, dict]:
    """The DatasetDict and its manifest; raises ValueError / FileNotFoundError on bad input."""
    import datasets

    datasets.disable_progress_bars()
    if args.resolution < 8:
        raise ValueError(f"--resolution {args.resolution} is too small; use at least 8")
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max_images {args.max_images} must be at least 1")
    scheme = choose_scheme(args)
    listed = list_source_images(args.source, args.image_column, args.caption_column, args.split)
    if not listed:
        raise ValueError(f"source {args.source} has no images")
    source_ids = {id(item): i for i, item in enumerate(listed)}
    items, images, identical = unique_images(subsample(listed, args.max_images, args.seed), args.resolution)
    rng = np.random.default_rng(args.seed)
    copies, controls = plan_duplication(len(items), scheme, rng)
    probe = set(choose_probe(copies, controls, args.probe_unduplicated, rng))
    if args.probe_heldout:  # drawn only when asked, so that other datasets stay identical
        heldout = choose_heldout(copies, probe, args.probe_heldout, rng)
        copies.update({i: 0 for i in heldout})  # dup_factor 0: in the probe split, no row in train
        probe.update(heldout)
    if not probe:
        raise ValueError("the probe split would be empty (no image is duplicated and no never-duplicated one is asked "
                         "for): give a --dup_factors value above 1, --probe_unduplicated N or --probe_heldout N")
    controls = set(controls)

    train_rows, probe_rows, samples = [], [], []
    for index in sorted(copies):
        item = items[index]
        sample_id = source_ids[id(item)]  # position in the full source listing: stable across subsamples
        image = images[index]
        factor = copies[index]
        captions = (vary_captions(item.caption, factor, rng) if args.caption_mode == "varied"
                    else [item.caption] * factor)
        train_rows += [dict(image=image, text=text, sample_id=sample_id, dup_factor=factor) for text in captions]
        if index in probe:
            probe_rows.append(dict(image=image, text=item.caption, sample_id=sample_id, dup_factor=factor))
        samples.append(dict(sample_id=sample_id, name=item.name, dup_factor=factor, caption=item.caption,
                            captions=captions, sha256=image_hash(image), probe=index in probe,
                            control=index in controls, heldout=factor == 0))
    train_rows = [train_rows[j] for j in rng.permutation(len(train_rows))]

    features = datasets.Features(image=datasets.Image(), text=datasets.Value("string"),
                                 sample_id=datasets.Value("int64"), dup_factor=datasets.Value("int64"))
    to_dataset = lambda rows: datasets.Dataset.from_dict(  # noqa: E731
        {k: [r[k] for r in rows] for k in features}, features=features)
    dataset = datasets.DatasetDict(train=to_dataset(train_rows), probe=to_dataset(probe_rows))
    manifest = dict(
        source=args.source, source_images=len(listed), used_images=len(samples), identical_images_dropped=identical,
        scheme=scheme,
        caption_mode=args.caption_mode, resolution=args.resolution, seed=args.seed,
        arguments={k: v for k, v in vars(args).items()},
        counts=count_by_factor(samples), samples=samples,
    )
    return dataset, manifest


def count_by_factor(samples: list[dict]) -> dict[str, dict[str, int]]:
    """Per dup_factor: unique images, train rows, probe images."""
    images = Counter(s["dup_factor"] for s in samples)
    probes = Counter(s["dup_factor"] for s in samples if s["probe"])
    return {str(f): dict(images=images[f], rows=f * images[f], probe=probes[f]) for f in sorted(images)}


def print_summary(manifest: dict, output_dir: Path) -> None:
    """Counts per factor, and where the dataset went."""
    for names in manifest["identical_images_dropped"]:
        print(f"identical pixels: kept {names[0]}, dropped {', '.join(names[1:])}")
    print(f"source {manifest['source']}: {manifest['used_images']} of {manifest['source_images']} images used, "
          f"scheme {manifest['scheme']}, captions {manifest['caption_mode']}, {manifest['resolution']} px")
    print(f"{'dup_factor':>10} {'images':>7} {'rows':>7} {'probe':>6}")
    for factor, c in manifest["counts"].items():
        print(f"{factor:>10} {c['images']:>7} {c['rows']:>7} {c['probe']:>6}")
    rows = sum(c["rows"] for c in manifest["counts"].values())
    probes = sum(c["probe"] for c in manifest["counts"].values())
    print(f"{'total':>10} {manifest['used_images']:>7} {rows:>7} {probes:>6}")
    print(f"wrote {output_dir} (splits train, probe; manifest.json)")


def main(argv=None) -> int:
    """Build the dataset, write it atomically, print a summary (ValueError / FileNotFoundError on bad input)."""
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    check_output_dir(output_dir, args.overwrite, source=None if args.source == "twemoji" else args.source)
    dataset, manifest = build(args)

    def write(folder: Path) -> None:
        dataset.save_to_disk(str(folder))
        write_manifest(folder, manifest)

    write_folder_atomically(write, output_dir)
    print_summary(manifest, output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, "build_duplicated_dataset.py"))
