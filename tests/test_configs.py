"""Every shipped experiment config is valid: `train/finetune.py --dry_run` resolves it, builds the
dataloader and the models and prints the plan, and its `# base_model:`, `# dataset:` and
`# evaluate:` header lines parse with the scripts they are meant for.

Real-scale recipes name CompVis/stable-diffusion-v1-4 and a 512 px dataset that is not here:
the dry runs swap in the tiny base model and the tiny study dataset and keep every other key.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data_scripts import build_duplicated_dataset, make_base_model
from eval import evaluate_checkpoints
from train import finetune

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
RECIPES = [c for c in CONFIGS if "pretrained_model_name_or_path" in yaml.safe_load(c.read_text())]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def header(config: Path, name: str) -> list[str] | None:
    """The flags of a `# NAME:` header line, or None when the config has none."""
    for line in config.read_text().splitlines():
        if line.startswith(f"# {name}:"):
            return shlex.split(line.split(":", 1)[1])
    return None


def test_the_shipped_configs_are_there():
    names = {c.name for c in CONFIGS}
    assert {"demo_cpu.yaml", "demo_test.yaml", "sd14_full_zero2.yaml", "sd14_lora.yaml",
            "wen_duplication.yaml", "somepalli_duplication.yaml"} <= names
    assert {c.name for c in RECIPES} >= {"sd14_full_zero2.yaml", "sd14_lora.yaml", "wen_duplication.yaml",
                                         "somepalli_duplication.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_dry_run_resolves_builds_and_plans(config, tiny_model_dir, tiny_dataset_dir, tmp_path, capsys):
    loaded = yaml.safe_load(config.read_text())
    run = tmp_path / "run"
    code = finetune.cli(["--config", str(config), "--pretrained_model_name_or_path", str(tiny_model_dir),
                         "--train_data_dir", str(tiny_dataset_dir), "--output_dir", str(run), "--dry_run"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    plan = captured.out
    assert "[dry run]" in plan and "68 train rows, 8 probe samples" in plan
    steps = loaded.get("max_train_steps")
    if steps == "auto":  # the config's passes over the fixture's 68 rows are under one checkpoint interval
        steps = loaded["checkpointing_steps"]
        passes = loaded.get("auto_train_passes", 35)
        assert f"max_train_steps auto = {steps}: {passes:g} passes over 68 train rows (48 distinct images" in plan
    if steps is not None:
        assert f"{steps} steps" in plan
    if loaded.get("use_lora"):
        assert f"LoRA r={loaded['rank']}" in plan
    else:
        assert "full" in plan
    if loaded.get("resolution"):
        assert f"resolution {loaded['resolution']}" in plan
    assert not run.exists(), "a dry run must write nothing"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_header_lines_parse_with_their_scripts(config):
    dataset, evaluate, base = (header(config, n) for n in ("dataset", "evaluate", "base_model"))
    if config.name.startswith("demo") or config in RECIPES:
        assert dataset is not None and evaluate is not None, f"{config.name} lacks a # dataset: or # evaluate: line"
    if dataset is not None:
        args = build_duplicated_dataset.parse_args(["--output_dir", "unused", *dataset])
        assert build_duplicated_dataset.choose_scheme(args)["name"] in ("factors", "weighted", "repeated")
        if config in RECIPES:  # the dataset is built at the resolution the recipe trains at
            assert args.resolution == yaml.safe_load(config.read_text())["resolution"]
    if evaluate is not None:
        evaluate_checkpoints.parse_args(["--run_dir", "unused", *evaluate])
    if base is not None:
        make_base_model.parse_args(["--output_dir", "unused", *base])


@pytest.mark.parametrize("config", RECIPES, ids=lambda c: c.name)
def test_recipe_launch_lines_name_existing_files(config):
    text = config.read_text()
    launch = [line for line in text.splitlines() if "accelerate launch" in line and "train/finetune.py" in text]
    assert launch, f"{config.name}: no 'accelerate launch' command line in its header"
    for path in re.findall(r"configs/[\w/.-]+\.yaml", text):
        assert (ROOT / path).is_file(), f"{config.name} names {path}, which does not exist"
    assert f"--config configs/{config.name}" in text


@pytest.mark.slow
def test_zero2_recipe_dry_runs_under_deepspeed(tiny_model_dir, tiny_dataset_dir, tmp_path):
    """The full fine-tuning recipe through its own accelerate config (DeepSpeed ZeRO-2, one CPU process)."""
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    done = subprocess.run(
        [accelerate, "launch", "--config_file", "configs/accelerate/deepspeed_zero2.yaml", "--num_processes", "1",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "train/finetune.py",
         "--config", "configs/sd14_full_zero2.yaml", "--pretrained_model_name_or_path", str(tiny_model_dir),
         "--train_data_dir", str(tiny_dataset_dir), "--output_dir", str(tmp_path / "run"), "--dry_run",
         "--mixed_precision", "no"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "DistributedType.DEEPSPEED" in done.stdout and "[dry run]" in done.stdout
    assert not (tmp_path / "run").exists()
