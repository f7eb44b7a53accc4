"""The run folder of ARCHITECTURE.md ("A training run"): its file names, its config.yaml, its checkpoints.

train/finetune.py writes a run through these functions and evaluation, benches and tests read it
through them, so the layout is stated once:

    RUN/config.yaml               the resolved flags of train/finetune.py (`read_config` adds RUN_DEFAULTS)
    RUN/probe_mu.safetensors      {"mu": the training-set mean latent of the centred k}
    RUN/warnings.jsonl            the early warning per probe step and sample (mem_analysis.early_warning)
    RUN/checkpoint-N/             complete once renamed from checkpoint-N.tmp; holds training_state.json
                                  and unet/ (full), unet_ema/ (EMA) or pytorch_lora_weights.safetensors (LoRA)
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from mem_analysis.io import atomic_path, write_text_atomic
from mem_analysis.probes import HIGH_NOISE_TIMESTEP

CONFIG_FILE = "config.yaml"
PROBE_MU_FILE = "probe_mu.safetensors"
STATE_FILE = "training_state.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")

# The config.yaml fields that evaluation reads, with their defaults. train/finetune_config.py's flag
# table takes these defaults from here, so a run and its evaluation can never disagree on them.
RUN_DEFAULTS = {
    "seed": 0,
    "use_lora": False,
    "use_ema": False,
    "logging_dir": "logs",
    "probe_timesteps": [50, 150, 250, 350, 450, 550, 650, 750, 850, 950],
    "probe_guidance_scales": [1.5, 3.0, 7.5],
    "probe_seed": 0,
    "high_noise_timestep": HIGH_NOISE_TIMESTEP,
    "warning_fpr": 0.01,
}


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """RUN/checkpoint-N, the folder of the checkpoint at optimizer step N."""
    return Path(run_dir) / f"checkpoint-{step}"


def write_config(run_dir: str | Path, config: dict) -> None:
    """RUN/config.yaml (keys = flag names of train/finetune.py), written atomically."""
    write_text_atomic(Path(run_dir) / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))


def read_config(run_dir: str | Path) -> dict:
    """RUN/config.yaml with RUN_DEFAULTS for the fields it lacks (FileNotFoundError when absent)."""
    loaded = yaml.safe_load((Path(run_dir) / CONFIG_FILE).read_text()) or {}
    return {**copy.deepcopy(RUN_DEFAULTS), **loaded}


def save_probe_mu(run_dir: str | Path, mu: torch.Tensor) -> None:
    """RUN/probe_mu.safetensors, written atomically."""
    with atomic_path(Path(run_dir) / PROBE_MU_FILE) as tmp:
        save_file({"mu": mu.detach().cpu().contiguous()}, str(tmp))


def read_probe_mu(run_dir: str | Path) -> torch.Tensor | None:
    """The run's saved mu (float32, CPU), or None when the run saved none (probes off)."""
    path = Path(run_dir) / PROBE_MU_FILE
    return load_file(path)["mu"].float() if path.is_file() else None


def write_training_state(checkpoint: str | Path, step: int, **info) -> None:
    """checkpoint/training_state.json: {"global_step": step, **info}."""
    write_text_atomic(Path(checkpoint) / STATE_FILE, json.dumps({"global_step": step, **info}, indent=1))


def checkpoint_step(checkpoint: str | Path) -> int:
    """The global_step recorded in a checkpoint's training_state.json."""
    return int(json.loads((Path(checkpoint) / STATE_FILE).read_text())["global_step"])


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete RUN/checkpoint-N folders (with training_state.json), oldest first; [] without a run folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in run_dir.iterdir()
             if (m := CHECKPOINT_NAME.match(path.name)) and (path / STATE_FILE).is_file()]
    return [path for _, path in sorted(found)]


def load_lora(unet, checkpoint: str | Path) -> None:
    """Set the UNet's LoRA adapters to checkpoint/pytorch_lora_weights.safetensors (diffusers format).

    Adapters are added (rank and target modules read from the file) when the UNet has none, as
    for evaluation; training resumes into the adapters it created.
    """
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import LoraConfig, set_peft_model_state_dict

    path = Path(checkpoint) / LORA_FILE
    state = load_file(path)
    if any(key.startswith("unet.") for key in state):
        state = {key.removeprefix("unet."): value for key, value in state.items() if key.startswith("unet.")}
    state = convert_unet_state_dict_to_peft(state)
    if not getattr(unet, "peft_config", None):
        down = {key.split(".lora_A")[0]: value for key, value in state.items() if ".lora_A" in key}
        rank = next(iter(down.values())).shape[0]
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(down)))
    result = set_peft_model_state_dict(unet, state, adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{path}: LoRA weights do not match the UNet ({result.unexpected_keys[:3]} ...)")


def load_checkpoint_unet(checkpoint: str | Path, base_unet, weights: str = "raw"):
    """The UNet of one checkpoint: unet/ (raw) or unet_ema/ (ema) when saved, else its LoRA fused into a
    copy of `base_unet` (the run's base model UNet, left unchanged). FileNotFoundError when neither is there."""
    from diffusers import UNet2DConditionModel

    checkpoint = Path(checkpoint)
    subfolder = "unet_ema" if weights == "ema" else "unet"
    if (checkpoint / subfolder).is_dir():
        return UNet2DConditionModel.from_pretrained(checkpoint, subfolder=subfolder, use_safetensors=True)
    if (checkpoint / LORA_FILE).is_file():
        unet = copy.deepcopy(base_unet).to(torch.float32)
        load_lora(unet, checkpoint)
        unet.fuse_lora()
        unet.unload_lora()
        return unet
    raise FileNotFoundError(f"no {subfolder}/ or {LORA_FILE} (partial checkpoint?)")
