"""train/finetune.py in-process: configuration, data order, probe-row bookkeeping, bad inputs, crashes.

Runs `finetune.cli(argv)` in this process (single process, CPU); the launches through
`accelerate launch` are in test_finetune_launch.py.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import reset_accelerate_state

from mem_analysis import run
from mem_analysis.run import list_checkpoints
from train import finetune, finetune_data, finetune_loss, finetune_probes
from train.finetune_config import FLAGS, ConfigError, auto_train_steps, resolve_config

ROOT = Path(__file__).resolve().parents[1]

TINY_CONFIG = ROOT / "configs" / "finetune_tiny.yaml"


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def error_lines(stderr: str) -> list[str]:
    """The script's own error lines (library progress bars and warnings also go to stderr)."""
    return [line for line in re.split(r"[\r\n]", stderr) if line.startswith("finetune.py: error:")]


def argv(model, data, output_dir, *extra) -> list[str]:
    """Command line of a short run on the tiny model and dataset."""
    return ["--config", str(TINY_CONFIG), "--pretrained_model_name_or_path", str(model),
            "--train_data_dir", str(data), "--output_dir", str(output_dir), *map(str, extra)]


def test_flags_override_yaml_and_lists_parse(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({"pretrained_model_name_or_path": "m", "train_data_dir": "d",
                                      "learning_rate": 0.5, "probe_timesteps": "10, 20", "use_ema": True}))
    args = resolve_config(["--config", str(config), "--learning_rate", "0.25", "--probe_guidance_scales", "2", "4.5",
                           "--no-use_ema"])
    assert args.learning_rate == 0.25 and args.probe_timesteps == [10, 20]
    assert args.probe_guidance_scales == [2.0, 4.5] and args.use_ema is False
    assert args.train_batch_size == FLAGS["train_batch_size"][0]


def test_auto_train_steps_are_passes_over_the_rows_to_the_checkpoint_interval():
    # the Twemoji demo (1,385 rows, batch 32): 35 passes are 1,514.8 steps, 1,500 at interval 300
    assert auto_train_steps(1385, 32, 300) == 1500
    assert auto_train_steps(2448, 32, 300) == 2700  # 2,677.5 steps
    assert auto_train_steps(2448, 32, 0) == 2678  # no checkpoints: ceil(35 * 2448 / 32)
    assert auto_train_steps(1385, 64, 300) == 900  # twice the batch: 758 steps
    assert auto_train_steps(68, 32, 300) == 300  # at least one interval
    assert auto_train_steps(1385, 32, 300, passes=28) == 1200  # the demo's 28 passes: 1,211.9 steps
    base = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d"]
    assert resolve_config([*base, "--max_train_steps", "auto"]).max_train_steps == "auto"
    assert resolve_config([*base, "--max_train_steps", "7"]).max_train_steps == 7
    with pytest.raises(ConfigError, match="max_train_steps"):
        resolve_config([*base, "--max_train_steps", "automatic"])
    with pytest.raises(ConfigError, match="auto_train_passes must be > 0"):
        resolve_config([*base, "--max_train_steps", "auto", "--auto_train_passes", "0"])


@pytest.mark.parametrize("content, message", [
    ({"pretrained_model_name_or_path": "m", "train_data_dir": "d", "learnin_rate": 1e-4}, "unknown key(s) learnin_rate"),
    ({"pretrained_model_name_or_path": "m", "train_data_dir": "d", "train_batch_size": "many"}, "train_batch_size"),
    ({"pretrained_model_name_or_path": "m"}, "exactly one of train_data_dir"),
])
def test_bad_config_is_one_line_error(tmp_path, capsys, content, message):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(content))
    assert finetune.cli(["--config", str(config)]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and message in err[0]
    with pytest.raises(ConfigError):
        resolve_config(["--config", str(config)])


def test_epoch_sampler_order_depends_only_on_seed_and_epoch():
    first, second = finetune_data.EpochSampler(50, seed=3), finetune_data.EpochSampler(50, seed=3)
    second.set_epoch(1)
    epoch1 = list(second)
    second.set_epoch(0)
    assert list(first) == list(second)
    assert sorted(i for i, _ in epoch1) == list(range(50))
    assert [i for i, _ in epoch1] != [i for i, _ in list(first)]
    assert {e for _, e in epoch1} == {1}


def test_keep_probe_rows_drops_later_steps_duplicates_and_cut_lines(tmp_path):
    path = tmp_path / "probes.jsonl"
    rows = [{"step": s, "sample_id": i, "timestep": 5} for s in (0, 2, 4) for i in (0, 1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:2]) + '{"step": 6, "sam')
    run.keep_jsonl_rows(path, last_step=2)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == rows[:4]


def test_probe_scalars_are_means_per_dup_factor_and_high_noise_window():
    rows = [{"step": 1, "sample_id": s, "dup_factor": d, "timestep": t, "loss_cond": float(s * 10 + t)}
            for s, d in ((0, 1), (1, 4), (2, 4)) for t in (100, 800)]
    scalars = finetune_probes.probe_scalars(rows, high_noise_timestep=700)
    assert scalars["probe/loss_cond/dup_1"] == pytest.approx(450.0)
    assert scalars["probe/loss_cond/dup_4"] == pytest.approx((110 + 810 + 120 + 820) / 4)
    assert scalars["probe_high/loss_cond/dup_4"] == pytest.approx(815.0)


def test_dry_run_builds_everything_and_writes_nothing(tiny_model_dir, tiny_dataset_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert finetune.cli(argv(tiny_model_dir, tiny_dataset_dir, run, "--dry_run")) == 0
    out = capsys.readouterr().out
    assert "[dry run]" in out and "68 train rows, 8 probe samples" in out
    assert not run.exists()


@pytest.mark.parametrize("damage", ["no_probe_split", "no_dup_factor"])
def test_bad_dataset_is_one_line_error(tiny_model_dir, tiny_dataset_dir, tmp_path, capsys, damage):
    import datasets

    splits = datasets.load_from_disk(str(tiny_dataset_dir))
    if damage == "no_probe_split":
        splits = datasets.DatasetDict(train=splits["train"])
    else:
        splits = datasets.DatasetDict({k: v.remove_columns("dup_factor") for k, v in splits.items()})
    splits.save_to_disk(str(tmp_path / "data"))
    assert finetune.cli(argv(tiny_model_dir, tmp_path / "data", tmp_path / "run")) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and ("probe" if damage == "no_probe_split" else "dup_factor") in err[0]


def test_crash_while_checkpointing_leaves_latest_on_previous(tiny_model_dir, tiny_dataset_dir, tmp_path,
                                                             monkeypatch, capsys):
    """A crash inside save_state of checkpoint-4 leaves checkpoint-2 as latest; the same command then resumes."""
    from accelerate import Accelerator

    run = tmp_path / "run"
    command = argv(tiny_model_dir, tiny_dataset_dir, run, "--max_train_steps", 6, "--checkpointing_steps", 2,
                   "--probe_steps", 2, "--probe_timesteps", 500, "--resume_from_checkpoint", "latest")
    original = Accelerator.save_state

    def crashing_save_state(self, output_dir=None, **kwargs):
        result = original(self, output_dir, **kwargs)
        if "checkpoint-4" in str(output_dir):
            raise KeyboardInterrupt("injected crash while writing checkpoint-4")
        return result

    monkeypatch.setattr(Accelerator, "save_state", crashing_save_state)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(command)
    assert "no checkpoint in" in capsys.readouterr().out  # 'latest' with nothing yet starts fresh and says so
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2"]
    assert (run / "checkpoint-4.tmp").is_dir() and not (run / "checkpoint-4").exists()
    assert list_checkpoints(run)[-1] == run / "checkpoint-2"

    monkeypatch.setattr(Accelerator, "save_state", original)
    reset_accelerate_state()
    assert finetune.cli(command) == 0
    assert "resumed from" in capsys.readouterr().out
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert not (run / "checkpoint-4.tmp").exists()
    steps = [json.loads(line)["step"] for line in (run / "probes.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == [0, 2, 4, 6] and all(steps.count(s) == 8 for s in (0, 2, 4, 6))
    warnings = [json.loads(line) for line in (run / "warnings.jsonl").read_text().splitlines()]
    keys = [(w["step"], w["sample_id"]) for w in warnings]
    assert len(keys) == len(set(keys))  # the resumed run rewrote steps 4 and 6 without repeating them
    assert [w["step"] for w in warnings].count(4) == 8 and {w["step"] for w in warnings} == {0, 2, 4, 6}


def test_diverging_loss_stops_with_step_and_keeps_checkpoint(tiny_model_dir, tiny_dataset_dir, tmp_path, capsys):
    run = tmp_path / "run"
    code = finetune.cli(argv(tiny_model_dir, tiny_dataset_dir, run, "--learning_rate", 1e30, "--max_train_steps", 30,
                             "--checkpointing_steps", 1, "--checkpoints_total_limit", 2, "--probe_steps", 0))
    err = error_lines(capsys.readouterr().err)
    assert code == 1 and len(err) == 1
    assert "loss is" in err[0] and " at step " in err[0]
    failed_step = int(err[0].split(" at step ")[1].split(";")[0])
    last = list_checkpoints(run)[-1]
    assert last.name == f"checkpoint-{failed_step - 1}" and last.name in err[0]
    assert json.loads((last / "training_state.json").read_text())["global_step"] == failed_step - 1
    assert not (run / "model_index.json").exists()


def test_loss_read_at_logging_steps_still_names_the_failed_step(tiny_model_dir, tiny_dataset_dir, tmp_path, capsys):
    """With the loss read back only every 7 steps, a divergence is reported at the same step as when read every step,
    and no checkpoint is written after it."""
    failed = []
    for logging_steps, checkpointing_steps in ((1, 0), (7, 7)):
        reset_accelerate_state()
        run = tmp_path / f"log{logging_steps}"
        code = finetune.cli(argv(tiny_model_dir, tiny_dataset_dir, run, "--learning_rate", 1e30, "--max_train_steps",
                                 30, "--logging_steps", logging_steps, "--checkpointing_steps", checkpointing_steps,
                                 "--probe_steps", 0))
        err = error_lines(capsys.readouterr().err)
        assert code == 1 and len(err) == 1 and "loss is nan" in err[0]
        failed.append(int(err[0].split(" at step ")[1].split(";")[0]))
    assert 1 < failed[0] < 7 and failed[1] == failed[0]  # read at step 7, yet named exactly
    assert list_checkpoints(tmp_path / "log7") == [] and not (tmp_path / "log7" / "model_index.json").exists()


def test_dataset_name_without_probe_split_probes_first_rows(tiny_model_dir, tmp_path, capsys):
    """A plain image+caption dataset (imagefolder): the probe split is its first num_probe_samples rows."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "imagefolder"
    folder.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"picture {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    args = resolve_config(["--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_name", str(folder),
                           "--num_probe_samples", "4"])
    train, probe = finetune_data.load_splits(args)
    assert len(train) == 6 and probe["sample_id"] == [0, 1, 2, 3] and probe["dup_factor"] == [1] * 4
    assert probe["text"] == ["picture 0", "picture 1", "picture 2", "picture 3"]
    code = finetune.cli(["--pretrained_model_name_or_path", str(tiny_model_dir), "--dataset_name", str(folder),
                         "--output_dir", str(tmp_path / "run"), "--dry_run", "--probe_timesteps", "500"])
    assert code == 0 and "6 train rows, 6 probe samples, resolution 32" in capsys.readouterr().out


def unet_tensors(folder: Path) -> dict:
    """The UNet tensors of a diffusers unet/ folder."""
    from safetensors.torch import load_file

    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def test_step_generator_streams_leave_the_training_draws_unchanged():
    import numpy as np
    import torch

    legacy = np.random.SeedSequence([3, 1, 7]).generate_state(1, np.uint64)[0]
    assert torch.equal(torch.randn(4, generator=finetune_loss.step_generator(3, 1, 7, "cpu")),
                       torch.randn(4, generator=torch.Generator().manual_seed(int(legacy))))
    assert not torch.equal(torch.randn(4, generator=finetune_loss.step_generator(3, 1, 7, "cpu", stream=1)),
                           torch.randn(4, generator=finetune_loss.step_generator(3, 1, 7, "cpu")))


def test_caption_augmentation_changes_only_captions_keyed_by_seed_epoch_row(tiny_model_dir, tiny_dataset_dir):
    import torch
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir, subfolder="tokenizer")
    plain_args = resolve_config(argv(tiny_model_dir, tiny_dataset_dir, "unused"))
    train, _ = finetune_data.load_splits(plain_args)
    plain = finetune_data.TrainExamples(train, tokenizer, 32, plain_args)
    for kind in ("rand_word_add", "rand_word_repeat", "rand_numbers_add"):
        args = resolve_config(argv(tiny_model_dir, tiny_dataset_dir, "unused", "--caption_augmentation", kind,
                                   "--caption_augmentation_p", 0.5))
        augmented = finetune_data.TrainExamples(train, tokenizer, 32, args)
        keys = [(row, epoch) for row in range(0, 68, 3) for epoch in (0, 1)]
        changed = 0
        for key in keys:
            a, b = augmented[key], plain[key]
            assert torch.equal(a["pixel_values"], b["pixel_values"])  # crops, flips: untouched
            assert torch.equal(a["input_ids"], augmented[key]["input_ids"])  # same key, same caption (resume)
            changed += not torch.equal(a["input_ids"], b["input_ids"])
        assert 0.25 < changed / len(keys) < 0.75, (kind, changed)
    with pytest.raises(ValueError, match="caption_mode varied"):  # fixed captions: one caption per image
        args = resolve_config(argv(tiny_model_dir, tiny_dataset_dir, "unused", "--caption_augmentation",
                                   "multiple_captions"))
        finetune_data.TrainExamples(train, tokenizer, 32, args)


def test_dedup_sampler_is_keyed_by_seed_and_epoch_and_balances_unique_images(tiny_dataset_dir):
    import numpy as np
    from mem_analysis.data import load_study_dataset

    train = load_study_dataset(tiny_dataset_dir)["train"]
    weights = finetune_data.row_sampling_weights(train, type("Args", (), {"dedup_sampling": True})())
    sampler = finetune_data.EpochSampler(len(train), 0, weights)
    sampler.set_epoch(3)
    first = list(sampler)
    assert len(first) == len(train) and first == list(sampler)
    sampler.set_epoch(4)
    assert list(sampler) != first
    draws = []
    for epoch in range(300):
        sampler.set_epoch(epoch)
        draws += [row for row, _ in sampler]
    dup = np.asarray(train["dup_factor"])[draws]
    share = {d: float(np.mean(dup == d)) for d in (1, 4, 8)}
    images = {d: len(set(np.asarray(train["sample_id"])[np.asarray(train["dup_factor"]) == d])) for d in (1, 4, 8)}
    for d in (1, 4, 8):  # each unique image is drawn equally often: share of a factor = its images / all images
        assert share[d] == pytest.approx(images[d] / sum(images.values()), abs=0.01)


def test_mitigations_off_or_inactive_change_nothing_and_resume_exactly(tiny_model_dir, tiny_dataset_dir, tmp_path):
    """A Wen threshold nobody exceeds trains the same weights bit for bit as no flag; a run with every
    mitigation on, resumed from its step-2 checkpoint, ends with the same weights as the uninterrupted one."""
    def train(name, *extra):
        code = finetune.cli(argv(tiny_model_dir, tiny_dataset_dir, tmp_path / name, "--probe_steps", 0,
                                 "--checkpointing_steps", 2, *extra))
        reset_accelerate_state()
        assert code == 0
        return tmp_path / name

    plain = train("plain", "--max_train_steps", 2)
    inactive = train("inactive", "--max_train_steps", 2, "--mitigation_wen_threshold", 1e9)
    a, b = unet_tensors(plain / "unet"), unet_tensors(inactive / "unet")
    assert all(a[k].equal(b[k]) for k in a)
    assert yaml.safe_load((inactive / "config.yaml").read_text())["mitigation_wen_threshold"] == 1e9

    every = ("--max_train_steps", 4, "--mitigation_wen_threshold", 1.3, "--caption_augmentation", "rand_word_add",
             "--caption_augmentation_p", 0.5, "--text_embedding_noise", 0.1, "--dedup_sampling")
    full = train("full", *every)
    config = yaml.safe_load((full / "config.yaml").read_text())
    assert config["caption_augmentation"] == "rand_word_add" and config["dedup_sampling"] is True
    resumed = train("resumed", *every, "--resume_from_checkpoint", full / "checkpoint-2")
    c, d = unet_tensors(full / "unet"), unet_tensors(resumed / "unet")
    assert all(c[k].equal(d[k]) for k in c)
    assert any(not a[k].equal(unet_tensors(full / "checkpoint-2" / "unet")[k]) for k in a)


def test_each_alarmed_sample_is_announced_once_with_caption_and_first_step(tiny_model_dir, tiny_dataset_dir,
                                                                            tmp_path, capsys):
    """A loose false-alarm rate (45 %) makes alarms fire on an untrained model; each is printed once."""
    import datasets

    run = tmp_path / "run"
    assert finetune.cli(argv(tiny_model_dir, tiny_dataset_dir, run, "--max_train_steps", 3, "--probe_steps", 1,
                             "--probe_timesteps", 500, 900, "--warning_fpr", 0.45)) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[early warning]")]
    warnings = [json.loads(line) for line in (run / "warnings.jsonl").read_text().splitlines()]
    first = {}
    for w in warnings:
        if w["alarm"]:
            first.setdefault(w["sample_id"], w["step"])
    assert first and len(lines) == len(first)
    probe = datasets.load_from_disk(str(tiny_dataset_dir))["probe"]
    caption_of = dict(zip(probe["sample_id"], probe["text"]))
    for sid, step in first.items():
        (line,) = [line for line in lines if f" sample {sid} " in line]
        assert line.startswith(f"[early warning] step {step}: ") and repr(caption_of[sid]) in line


def test_wen_thresholds_calibrated_per_timestep_on_a_run_and_a_filter_that_keeps_nothing(
        trained_run, tiny_model_dir, tiny_dataset_dir, tmp_path):
    """eval/wen_threshold.py --output on the trained run: each probe timestep's 0.95 quantile of the 4
    never-duplicated samples (so 1 of 4 lies above it); then thresholds of 0 with no caption dropout filter
    every example: the loss is 0, the backward still runs, and the share logged per factor is 1."""
    import numpy as np
    import pandas as pd
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from eval import compare_runs, wen_threshold

    table_path = tmp_path / "wen" / "thresholds.json"
    assert wen_threshold.cli(["--run_dir", str(trained_run), "--output", str(table_path)]) == 0
    table = json.loads(table_path.read_text())
    probes = pd.read_json(trained_run / "probes.jsonl", lines=True)
    last = probes[(probes.step == probes.step.max()) & (probes.dup_factor == 1)]
    assert table["timesteps"] == sorted(int(t) for t in probes.timestep.unique())
    for t, threshold in zip(table["timesteps"], table["thresholds"]):
        assert threshold == pytest.approx(np.quantile(last[last.timestep == t].text_magnitude, 0.95))
    assert last.sample_id.nunique() == 4 and table["share_over_threshold"][str(probes.step.max())]["1"] == 0.25
    assert table["bin_edges"] == [0.0, 300.0, 625.0, 825.0, 1000.0]

    zeros = tmp_path / "zeros.json"
    zeros.write_text(json.dumps({"timesteps": table["timesteps"], "thresholds": [0.0] * len(table["timesteps"])}))
    run = tmp_path / "run"
    assert finetune.cli(argv(tiny_model_dir, tiny_dataset_dir, run, "--max_train_steps", 2, "--probe_steps", 0,
                             "--checkpointing_steps", 0, "--logging_steps", 1, "--proportion_empty_prompts", 0,
                             "--mitigation_wen_thresholds", zeros)) == 0
    events = EventAccumulator(str(run / "logs" / "finetune")).Reload()
    assert [e.value for e in events.Scalars("train/loss")] == [0.0, 0.0]
    assert [e.value for e in events.Scalars("train/wen_filtered_share")] == [1.0, 1.0]
    shares = compare_runs.wen_shares_by_factor(run)
    assert set(shares) == {1, 4, 8} and all((series == 1.0).all() for series in shares.values())


def test_wen_flags_are_one_or_the_other_and_a_bad_file_is_one_line(tiny_model_dir, tiny_dataset_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    for extra in (["--mitigation_wen_thresholds", bad], ["--mitigation_wen_thresholds", bad,
                                                         "--mitigation_wen_threshold", 1.0]):
        assert finetune.cli(argv(tiny_model_dir, tiny_dataset_dir, tmp_path / "run", *extra)) == 2
        lines = error_lines(capsys.readouterr().err)
        assert len(lines) == 1 and ("bad.json" in lines[0] or "not both" in lines[0])
    assert not (tmp_path / "run").exists()
