"""mem_analysis/run.py, the run folder's one owner: checkpoints listed and loaded as training wrote them,
config.yaml read with the training defaults."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from eval import evaluate_checkpoints as ev
from mem_analysis import run
from mem_analysis.sd import load_components
from train.finetune_config import FLAGS, resolve_config
from train.finetune_state import add_lora, save_lora  # how training writes LoRA checkpoints


def test_complete_checkpoints_are_listed_by_step_and_partial_ones_are_not(tmp_path):
    for step in (10, 2, 30):
        run.checkpoint_dir(tmp_path, step).mkdir()
        run.write_training_state(run.checkpoint_dir(tmp_path, step), step, epoch=0)
    (tmp_path / "checkpoint-40").mkdir()  # interrupted before training_state.json was written
    (tmp_path / "checkpoint-40" / "unet").mkdir()
    tmp = tmp_path / "checkpoint-50.tmp"  # an unrenamed save_state folder
    tmp.mkdir()
    run.write_training_state(tmp, 50)
    (tmp_path / "checkpoint-x").mkdir()
    listed = run.list_checkpoints(tmp_path)
    assert [p.name for p in listed] == ["checkpoint-2", "checkpoint-10", "checkpoint-30"]
    assert [run.checkpoint_step(p) for p in listed] == [2, 10, 30]
    assert run.list_checkpoints(tmp_path / "missing") == []


def test_full_ema_and_lora_checkpoints_load_the_saved_weights(tiny_model_dir, tmp_path):
    components = load_components(tiny_model_dir)
    base_state = {k: v.clone() for k, v in components.unet.state_dict().items()}

    full = run.checkpoint_dir(tmp_path, 1)
    shifted = UNet2DConditionModel.from_config(components.unet.config)
    shifted.load_state_dict({k: v + 0.01 for k, v in base_state.items()})
    components.unet.save_pretrained(full / "unet")
    shifted.save_pretrained(full / "unet_ema")
    for weights, offset in (("ema", 0.01), ("raw", 0.0)):
        unet = run.load_checkpoint_unet(full, components.unet, weights)
        for name, value in unet.state_dict().items():
            torch.testing.assert_close(value, base_state[name] + offset)

    trained = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    add_lora(trained, 4, torch.float32)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapters change the output
                param.normal_(0, 0.05)
    lora = run.checkpoint_dir(tmp_path, 2)
    save_lora(trained, lora)
    loaded = run.load_checkpoint_unet(lora, components.unet, "raw")
    gen = torch.Generator().manual_seed(0)
    x, h = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 77, 64, generator=gen)
    with torch.no_grad():
        want, got, base = (net(x, 500, encoder_hidden_states=h).sample for net in (trained, loaded, components.unet))
    assert (want - base).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for name, value in components.unet.state_dict().items():  # the base UNet is left as it was
        torch.testing.assert_close(value, base_state[name])


def test_training_defaults_are_evaluations_resolved_defaults(tmp_path):
    """A run whose config.yaml lacks the probe fields is evaluated as one trained with the default flags."""
    required = dict(pretrained_model_name_or_path="model", train_data_dir="data")
    trained = vars(resolve_config([f"--{k}={v}" for k, v in required.items()]))
    settings = {}
    for name, config in (("trained", trained), ("bare", required)):
        run.write_config(tmp_path / name, config)
        args = ev.parse_args(["--run_dir", str(tmp_path / name)])
        settings[name] = ev.resolve_settings(args, ev.read_run(args))
    assert settings["trained"] == settings["bare"]
    resolved = settings["bare"]
    assert list(resolved.probe_timesteps) == FLAGS["probe_timesteps"][0]
    assert set(FLAGS["probe_guidance_scales"][0]) <= set(resolved.probe_guidance_scales)
    assert resolved.high_noise_timestep == FLAGS["high_noise_timestep"][0]
    assert resolved.probe_seed == FLAGS["probe_seed"][0] and resolved.seed == FLAGS["seed"][0]
    assert resolved.weights == "raw" and not resolved.lora


def test_commands_run_as_scripts_and_modules_without_warnings():
    """The packages need no edit of the import path (a script sees its own folder, not the repository), and
    importing diffusers' pipelines through mem_analysis logs nothing about torchvision."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for command in (["eval/evaluate_checkpoints.py", "--help"], ["-m", "train.finetune", "--help"],
                    ["data_scripts/make_base_model.py", "--help"]):
        done = subprocess.run([sys.executable, *command], cwd=root, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0 and done.stdout.startswith("usage:"), done.stderr[-2000:]
        assert "torchvision" not in done.stderr, done.stderr[-2000:]
