"""The run folder of ARCHITECTURE.md ("A training run"): its file names, its config.yaml, its checkpoints.

train/finetune.py writes a run through these functions and evaluation, benches and tests read it
through them, so the layout is stated once:

    RUN/config.yaml               the resolved flags of train/finetune.py (`read_config` adds RUN_DEFAULTS)
    RUN/probe_mu.safetensors      {"mu": the training-set mean latent of the centred k}
    RUN/probes.jsonl              one probe row per (step, sample_id, timestep) (mem_analysis.probes)
    RUN/warnings.jsonl            the early warning per probe step and sample (mem_analysis.early_warning)
    RUN/checkpoint-N/             complete once renamed from checkpoint-N.tmp; holds training_state.json
                                  and unet/ (full), unet_ema/ (EMA) or pytorch_lora_weights.safetensors (LoRA)
    RUN/eval[_<schedule>]/        evaluate_checkpoints.py's tables (`eval_dir`)

`read_run` and `find_checkpoints` are how every evaluation opens a run; JSON-lines files are read,
appended and cut back to a step by `read_jsonl`, `append_jsonl` and `keep_jsonl_rows`.
"""
from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from mem_analysis.cli import BadInput, parse_list
from mem_analysis.io import atomic_path, write_text_atomic
from mem_analysis.probes import HIGH_NOISE_TIMESTEP

CONFIG_FILE = "config.yaml"
PROBES_FILE = "probes.jsonl"
WARNINGS_FILE = "warnings.jsonl"
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


class RunFolderError(BadInput):
    """A run folder that cannot be used (missing, incomplete): bad input, reported as one line."""


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


def eval_dir(run_dir: str | Path, guidance_schedule: str = "constant") -> Path:
    """RUN/eval for constant guidance, else RUN/eval_delay700 / RUN/eval_linear (the schedule without ':')."""
    return Path(run_dir) / ("eval" if guidance_schedule == "constant" else "eval_" + guidance_schedule.replace(":", ""))


def read_run(run_dir: str | Path, pretrained_model_name_or_path: str | None = None,
             train_data_dir: str | None = None) -> dict:
    """RUN/config.yaml (with RUN_DEFAULTS), the base model and dataset overridden when given; RunFolderError
    (one line) when the folder, its config or what evaluation needs of it is missing."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        raise RunFolderError(f"--run_dir {run_dir} does not exist; pass the --output_dir of train/finetune.py")
    if not config_path.is_file():
        raise RunFolderError(f"{config_path} is missing; --run_dir must be a train/finetune.py output folder")
    config = read_config(run_dir)
    if config.get("dataset_name") and not (train_data_dir or config.get("train_data_dir")):
        raise RunFolderError("the run trained on --dataset_name; evaluation needs a study dataset: pass --train_data_dir")
    for key, override in (("pretrained_model_name_or_path", pretrained_model_name_or_path),
                          ("train_data_dir", train_data_dir)):
        if override:
            config[key] = override
        if not config.get(key):
            raise RunFolderError(f"{config_path} has no {key}; pass --{key}")
    return config


def find_checkpoints(run_dir: str | Path, subset: str | None = None) -> list[tuple[int, Path | None]]:
    """[(global_step, folder)] of the complete checkpoints, by step; step 0 (folder None) is the base model.

    `subset`: None (all), 'last', or steps such as '0,500,1000' (RunFolderError naming the missing ones).
    """
    found = []
    for folder in list_checkpoints(run_dir):
        try:
            found.append((checkpoint_step(folder), folder))
        except (ValueError, KeyError, TypeError):  # a broken state file: the folder name says the step
            found.append((int(CHECKPOINT_NAME.match(folder.name).group(1)), folder))
    if not found:
        raise RunFolderError(f"{run_dir} has no checkpoint-N folders; train with --checkpointing_steps")
    models = [(0, None)] + sorted(found, key=lambda item: item[0])
    if subset == "last":
        return models[-1:]
    if subset:
        wanted = set(parse_list(subset, int))
        missing = wanted - {step for step, _ in models}
        if missing:
            raise RunFolderError(f"--checkpoints asks for steps {sorted(missing)} that the run does not have; "
                                 f"available: {[step for step, _ in models]}")
        models = [m for m in models if m[0] in wanted]
    return models


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSON-lines file (probes.jsonl, warnings.jsonl), skipping a last line cut short by a kill."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def append_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Append rows to a JSON-lines file and sync it to disk (a kill loses at most the line being written)."""
    with open(path, "a") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
        handle.flush()
        os.fsync(handle.fileno())


def keep_jsonl_rows(path: str | Path, last_step: int) -> list[dict]:
    """Rewrite a run's JSON-lines file atomically with only its rows of step <= last_step, each
    (step, sample, timestep) once; returns the kept rows ([] when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    kept, seen = [], set()
    for row in read_jsonl(path):
        key = (row["step"], row["sample_id"], row.get("timestep"))
        if row["step"] <= last_step and key not in seen:
            seen.add(key)
            kept.append(row)
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))
    return kept
