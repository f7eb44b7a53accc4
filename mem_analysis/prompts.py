"""Prompt sets and their reference images, for evaluating a given model on lists of prompts.

Prompt files: `.txt` (one prompt a line), `.jsonl` (a `caption`, `prompt` or `text` field; Wen et
al.'s `sdv1_500_memorized.jsonl` uses `caption`), `.csv` and `.parquet` (a column: `column`, or the
first of caption / prompt / text, case-insensitive: Gustavosta's `Prompt`, Webster's `caption`).
References: an image folder with `metadata.jsonl` (`file_name`, `text`) or a study dataset
(`load_study_dataset`); a prompt is paired with the image whose caption is exactly the prompt.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mem_analysis.io import read_utf8_text

DEFAULT_COLUMNS = ("caption", "prompt", "text")
FORMATS = (".txt", ".jsonl", ".csv", ".parquet")


class PromptFileError(ValueError):
    """A prompt or reference file that cannot be read; the message is one line naming file and line."""


def parse_prompt_set(spec: str) -> tuple[str, Path]:
    """'NAME=FILE' -> (NAME, FILE)."""
    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise PromptFileError(f"--prompts {spec!r}: write NAME=FILE, e.g. memorized=sdv1_500_memorized.jsonl")
    return name.strip(), Path(path.strip())


def pick_column(columns, column: str | None, path: Path) -> str:
    """`column` if given and present, else the first of DEFAULT_COLUMNS present (case-insensitive)."""
    columns = [str(c) for c in columns]
    if column is not None:
        if column not in columns:
            raise PromptFileError(f"{path} has no column {column!r} (--prompt_column); its columns: {', '.join(columns)}")
        return column
    lower = {c.lower(): c for c in columns}
    for name in DEFAULT_COLUMNS:
        if name in lower:
            return lower[name]
    raise PromptFileError(f"{path} has none of the columns {', '.join(DEFAULT_COLUMNS)}; its columns: "
                          f"{', '.join(columns)}; name one with --prompt_column")


def checked_prompt(value, path: Path, where: str) -> str:
    """A prompt cell as a stripped string; empty or non-text cells are errors naming their place."""
    if not isinstance(value, str) or not value.strip():
        raise PromptFileError(f"{path} {where}: the prompt is empty or not text ({value!r})")
    return value.strip()


def read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file; one line naming file and line where it is not UTF-8."""
    try:
        return read_utf8_text(path).splitlines()
    except ValueError as err:
        raise PromptFileError(str(err)) from None


def read_jsonl_prompts(path: Path, column: str | None) -> list[str]:
    """One JSON object a line; blank lines are skipped."""
    prompts = []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptFileError(f"{path} line {number}: not JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise PromptFileError(f"{path} line {number}: a JSON object is expected, got {type(record).__name__}")
        key = pick_column(record.keys(), column, Path(f"{path} line {number}"))
        prompts.append(checked_prompt(record[key], path, f"line {number}"))
    return prompts


def read_table_prompts(path: Path, column: str | None) -> list[str]:
    """A column of a CSV (header on line 1) or parquet table."""
    import pandas as pd

    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False) if path.suffix == ".csv" else pd.read_parquet(path)
    except Exception as err:  # pandas / pyarrow raise many types for a malformed file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PromptFileError(f"{path}: cannot be read as {path.suffix[1:]} ({reason})") from None
    key = pick_column(table.columns, column, path)
    where = (lambda i: f"line {i + 2}") if path.suffix == ".csv" else (lambda i: f"row {i}")  # noqa: E731
    return [checked_prompt(v, path, where(i)) for i, v in enumerate(table[key].tolist())]


def read_prompts(path, column: str | None = None, max_prompts: int | None = None) -> list[str]:
    """The prompts of a file, in file order, duplicates dropped (first kept), at most `max_prompts`."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist")
    if path.suffix == ".txt":
        prompts = [line.strip() for line in read_lines(path) if line.strip()]
    elif path.suffix == ".jsonl":
        prompts = read_jsonl_prompts(path, column)
    elif path.suffix in (".csv", ".parquet"):
        prompts = read_table_prompts(path, column)
    else:
        raise PromptFileError(f"{path}: unknown prompt file type {path.suffix!r}; use one of {', '.join(FORMATS)}")
    prompts = list(dict.fromkeys(prompts))
    if max_prompts is not None:
        prompts = prompts[:max_prompts]
    if not prompts:
        raise PromptFileError(f"{path} holds no prompts")
    return prompts


@dataclass
class References:
    """Reference images by caption: `pixels` (M, 3, H, W) in [0, 1], `captions` (M,), `sample_ids` (M,),
    `weights` (M,) the share of each image in the training set (duplicates counted; sums to 1)."""

    pixels: "torch.Tensor"  # noqa: F821
    captions: list[str]
    sample_ids: np.ndarray
    weights: np.ndarray
    source: str

    def index_of(self, prompts) -> np.ndarray:
        """Per prompt, the row of the image with exactly that caption (the first one), or -1."""
        first = {}
        for i, caption in enumerate(self.captions):
            first.setdefault(caption, i)
        return np.asarray([first.get(p, -1) for p in prompts], dtype=np.int64)


def load_references(source, resolution: int) -> References:
    """A study dataset folder (its train pool, each unique image once) or an image folder with metadata.jsonl,
    every image resized and centre-cropped to `resolution` (the generated images' size)."""
    import torch

    from mem_analysis.data import (image_to_tensor, imagefolder_images, load_source_image, load_study_dataset,
                                   resize_and_crop)

    path = Path(source)
    if (path / "metadata.jsonl").is_file():
        try:
            items = imagefolder_images(path)
            images = [load_source_image(item, resolution) for item in items]
        except ValueError as err:  # a metadata line without its fields, bad JSON, an undecodable image
            raise PromptFileError(f"--references {path}: {str(err).splitlines()[0]}") from None
        captions = [item.caption for item in items]
        sample_ids, counts = np.arange(len(items)), np.ones(len(items))
    elif path.is_dir():
        try:
            train = load_study_dataset(path)["train"]
        except (FileNotFoundError, ValueError) as err:
            raise PromptFileError(f"--references {path}: neither an image folder with metadata.jsonl nor a study "
                                  f"dataset ({str(err).splitlines()[0]})") from None
        sample_ids, rows, counts = np.unique(np.asarray(train["sample_id"]), return_index=True, return_counts=True)
        pool = train.select(rows.tolist())
        images, captions = [resize_and_crop(im, resolution) for im in pool["image"]], list(pool["text"])
    else:
        raise PromptFileError(f"--references {path} does not exist; give an image folder with metadata.jsonl "
                              "or a study dataset folder")
    if not len(captions):
        raise PromptFileError(f"--references {path} holds no images")
    pixels = (torch.stack([image_to_tensor(im) for im in images]) + 1) / 2
    weights = np.asarray(counts, dtype=np.float64)
    return References(pixels, captions, np.asarray(sample_ids), weights / weights.sum(), str(path))
