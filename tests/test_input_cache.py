"""The run's input cache (train/finetune_cache.py, RUN/cache/): each unique image's VAE posterior and each
caption's embedding encoded once before the first step, reused by a resumed run, rebuilt for another dataset;
training with it equals training without it."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mem_analysis import run
from train import finetune

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def reset_accelerate() -> None:
    """Fresh accelerate singletons between two in-process runs of one test."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def short_run(model, data, output_dir, *extra) -> list[str]:
    """finetune.py flags of a 4-step run probing at steps 0, 2 and 4 (losses logged every step)."""
    return ["--config", str(ROOT / "configs" / "finetune_tiny.yaml"), "--pretrained_model_name_or_path", str(model),
            "--train_data_dir", str(data), "--output_dir", str(output_dir), "--max_train_steps", "4",
            "--probe_steps", "2", "--probe_timesteps", "100", "900", "--checkpointing_steps", "2",
            "--logging_steps", "1", *map(str, extra)]


def train_losses(run_dir: Path) -> list[float]:
    """The `train/loss` scalars of a run, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "logs" / "finetune"))
    events.Reload()
    return [event.value for event in sorted(events.Scalars("train/loss"), key=lambda e: e.step)]


def probe_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "probes.jsonl").read_text().splitlines()]


def cache_lines(text: str) -> list[str]:
    return [line for line in re.split(r"[\r\n]", text) if line.startswith("input cache:")]


def test_cache_on_and_off_train_alike_and_a_resume_reuses_the_cache(tiny_model_dir, tiny_dataset_dir, tmp_path,
                                                                     capsys):
    runs = {}
    for name, flags in (("cached", []), ("encoded", ["--no-cache_latents", "--no-cache_caption_embeddings"])):
        runs[name] = tmp_path / name
        assert finetune.cli(short_run(tiny_model_dir, tiny_dataset_dir, runs[name], *flags)) == 0
        reset_accelerate()
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("CPU threads: ")
    built = cache_lines(out)
    assert len(built) == 2 and all(" built " in line for line in built)  # the encoded run has no cache lines
    assert "48 unique images of 68 rows" in built[0] and "48 distinct captions" in built[1]
    cached, encoded = runs["cached"], runs["encoded"]
    assert not (encoded / "cache").exists()
    tables = load_file(cached / run.LATENT_CACHE_FILE)
    assert tables["mean"].shape == tables["std"].shape == (48, 4, 16, 16)

    # The same losses (posteriors encoded per unique image, not per batch: equal up to the convolutions' rounding).
    assert train_losses(cached) == pytest.approx(train_losses(encoded), rel=1e-5)
    # The probes' inputs are the same numbers: mu bit for bit, hence the step-0 rows exactly.
    assert torch.equal(run.read_probe_mu(cached), run.read_probe_mu(encoded))
    rows = {name: probe_rows(folder) for name, folder in runs.items()}
    assert [r for r in rows["cached"] if r["step"] == 0] == [r for r in rows["encoded"] if r["step"] == 0]
    for a, b in zip(rows["cached"], rows["encoded"]):
        assert a.keys() == b.keys() and a["loss_cond"] == pytest.approx(b["loss_cond"], rel=1e-4)
    # The same final weights: the two runs' updates (final - base) agree to 1 % of their size. Not closer: Adam
    # divides each gradient by its running scale, so a weight whose gradient is near 0 can move either way by
    # up to the learning rate on a rounding difference.
    base = load_file(tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    weights = [load_file(folder / "unet" / "diffusion_pytorch_model.safetensors") for folder in (cached, encoded)]
    updates = [torch.cat([(w[key] - base[key]).flatten() for key in sorted(base)]) for w in weights]
    assert (updates[0] - updates[1]).norm() < 1e-2 * updates[0].norm()

    # Resumed from checkpoint-2: the cache is read back, not rebuilt (same files, same modification times).
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for part in ("checkpoint-2", "cache"):
        (resumed / part).symlink_to(cached / part)
    stamps = {path.name: path.stat().st_mtime_ns for path in (cached / "cache").iterdir()}
    assert finetune.cli(short_run(tiny_model_dir, tiny_dataset_dir, resumed, "--resume_from_checkpoint", "latest")) == 0
    lines = cache_lines(capsys.readouterr().out)
    assert len(lines) == 2 and all(" reused " in line for line in lines), lines
    assert {path.name: path.stat().st_mtime_ns for path in (cached / "cache").iterdir()} == stamps
    final = load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(final[key], weights[0][key]) for key in final)  # resumed = uninterrupted, bit for bit


def changed_dataset(source: Path, target: Path) -> int:
    """A copy of the study dataset whose first duplicated image is mirrored in every row that shows it
    (same sample ids, same rows: only the pixels changed); returns that sample_id."""
    import datasets
    from PIL import Image

    splits = datasets.load_from_disk(str(source))
    sample = int(next(s for s, d in zip(splits["train"]["sample_id"], splits["train"]["dup_factor"]) if d > 1))

    def mirror(row):
        if row["sample_id"] == sample:
            row["image"] = row["image"].transpose(Image.FLIP_LEFT_RIGHT)
        return row

    datasets.DatasetDict({name: split.map(mirror) for name, split in splits.items()}).save_to_disk(str(target))
    return sample


def test_another_dataset_rebuilds_the_cache_instead_of_reading_a_stale_one(tiny_model_dir, tiny_dataset_dir,
                                                                           tmp_path):
    from accelerate import Accelerator

    from mem_analysis.sd import load_components
    from train.finetune_cache import index_images, prepare_train_inputs
    from train.finetune_config import resolve_config
    from train.finetune_data import TrainExamples, load_splits

    sample = changed_dataset(tiny_dataset_dir, tmp_path / "changed")
    parts = load_components(str(tiny_model_dir))
    accelerator, output_dir, seen = Accelerator(cpu=True), tmp_path / "run", []
    for data in (tiny_dataset_dir, tiny_dataset_dir, tmp_path / "changed"):
        args = resolve_config(["--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_dir", str(data),
                               "--no-cache_caption_embeddings"])
        train_split, _ = load_splits(args)
        examples = TrainExamples(train_split, parts.tokenizer, 32, args)
        inputs = prepare_train_inputs(examples, train_split, parts, args, accelerator, output_dir, True, need_mu=True)
        index = index_images(train_split, "image")
        seen.append((inputs.lines[0], load_file(output_dir / run.LATENT_CACHE_FILE)["mean"], index, inputs.mu))
    (first, table, index, mu), (second, same, _, same_mu), (third, rebuilt, changed, new_mu) = seen
    assert " built " in first and " reused " in second and " built " in third and "another fingerprint" in third
    keys = [re.search(r"fingerprint (\w+)", line).group(1) for line in (first, second, third)]
    assert keys[0] == keys[1] != keys[2]
    assert torch.equal(table, same) and torch.equal(mu, same_mu)
    assert index.keys == changed.keys and index.row_image == changed.row_image  # same ids, rows and counts
    moved = index.keys.index(str(sample))
    others = [k for k in range(len(index.keys)) if k != moved]
    assert torch.equal(rebuilt[others], table[others])  # every other image's posterior is the same
    assert not torch.allclose(rebuilt[moved], table[moved])  # the mirrored one was encoded again
    with torch.no_grad():  # ... and its new posterior is that of the mirrored pixels
        mirrored = parts.vae.encode(examples.pixels(changed.rows[moved])[None]).latent_dist.mean[0]
    torch.testing.assert_close(rebuilt[moved], mirrored, rtol=1e-5, atol=1e-5)
    assert not torch.equal(mu, new_mu)


def test_unique_images_by_sample_id_or_by_content(tiny_dataset_dir):
    """A study dataset's images are its sample ids; without that column, equal stored images are one image."""
    from mem_analysis.data import load_study_dataset
    from train.finetune_cache import index_images

    train = load_study_dataset(tiny_dataset_dir)["train"]
    by_id = index_images(train, "image")
    by_content = index_images(train.remove_columns("sample_id"), "image")
    assert len(by_id.keys) == len(by_content.keys) == 48 and len(by_id.row_image) == 68
    assert sorted(by_id.counts().tolist()) == sorted(by_content.counts().tolist()) == [1] * 44 + [4, 4, 8, 8]
    # the two indexes group the rows the same way
    assert len({(a, b) for a, b in zip(by_id.row_image, by_content.row_image)}) == 48


def test_deprecated_flag_name_is_read_with_a_notice(tmp_path, capsys):
    from train.finetune_config import resolve_config

    config = tmp_path / "old.yaml"
    config.write_text("cache_train_latents: false\n")
    base = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d"]
    assert resolve_config([*base, "--config", str(config)]).cache_latents is False
    assert resolve_config([*base, "--no-cache_train_latents"]).cache_latents is False
    assert resolve_config([*base, "--config", str(config), "--cache_latents"]).cache_latents is True
    notices = capsys.readouterr().err.strip().splitlines()
    assert len(notices) == 3 and all("cache_train_latents is deprecated; read as cache_latents" in n for n in notices)
    assert not hasattr(resolve_config(base), "cache_train_latents")
