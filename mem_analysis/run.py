"""The run folder of ARCHITECTURE.md ("A training run"): its file names, its config.yaml, its checkpoints.

train/finetune.py writes a run through these functions and evaluation, benches and tests read it
through them, so the layout is stated once:

    RUN/run.json                  what made the run: a fingerprint of the flags that shape its content and of its
                                  dataset (`run_identity`); training into a folder that holds another run is refused
    RUN/config.yaml               the resolved flags of train/finetune.py (`read_config` adds RUN_DEFAULTS)
    RUN/probe_mu.safetensors      {"mu": the training-set mean latent of the centred k}
    RUN/probes.jsonl              one probe row per (step, sample_id, timestep) (mem_analysis.probes)
    RUN/warnings.jsonl            the early warning per probe step and sample (mem_analysis.early_warning)
    RUN/cache/latents.safetensors         {"mean", "std"}: each unique training image's VAE posterior
    RUN/cache/text_embeddings.safetensors {"input_ids", "hidden"}: each distinct caption's text-encoder output
                                  (both with metadata: the fingerprint of what made them, build seconds and memory)
    RUN/checkpoint-N/             complete once renamed from checkpoint-N.tmp; holds training_state.json
                                  and unet/ (full), unet_ema/ (EMA) or pytorch_lora_weights.safetensors (LoRA);
                                  training_state.json names the run (`run_fingerprint`) and this save (`checkpoint_id`)
    RUN/eval[_<schedule>]/        evaluate_checkpoints.py's tables (`eval_dir`)

`read_run` and `find_checkpoints` are how every evaluation opens a run; JSON-lines files are read,
appended and cut back to a step by `read_jsonl`, `append_jsonl` and `keep_jsonl_rows`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import uuid
import zipfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from mem_analysis.cli import BadInput, output_folder, parse_list
from mem_analysis.io import atomic_path, write_text_atomic
from mem_analysis.probes import HIGH_NOISE_TIMESTEP

CONFIG_FILE = "config.yaml"
PROBES_FILE = "probes.jsonl"
WARNINGS_FILE = "warnings.jsonl"
PROBE_MU_FILE = "probe_mu.safetensors"
STATE_FILE = "training_state.json"
RUN_FILE = "run.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
CACHE_DIR = "cache"
LATENT_CACHE_FILE = f"{CACHE_DIR}/latents.safetensors"
CAPTION_CACHE_FILE = f"{CACHE_DIR}/text_embeddings.safetensors"
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
    """checkpoint/training_state.json: {"global_step": step, "checkpoint_id": a new random id, **info}."""
    state = {"global_step": step, "checkpoint_id": uuid.uuid4().hex, **info}
    write_text_atomic(Path(checkpoint) / STATE_FILE, json.dumps(state, indent=1))


def read_training_state(checkpoint: str | Path) -> dict:
    """A checkpoint's training_state.json ({} when it is missing or unreadable)."""
    try:
        state = json.loads((Path(checkpoint) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


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


# ---------------------------------------------------------------------------
# One run per folder: what made a run, what of a folder belongs to it, and whose checkpoint is whose.

# Flags that change where a run writes, how it is watched, how fast it goes or how long it runs, not what its steps
# compute; a resume may change them (a larger max_train_steps extends a run). train_data_dir is a path: the
# dataset's content is fingerprinted instead.
UNFINGERPRINTED = frozenset({
    "output_dir", "logging_dir", "save_on_each_node", "report_to", "logging_steps", "validation_prompts",
    "num_validation_prompts", "validation_steps", "validation_inference_steps", "validation_guidance_scale",
    "resume_from_checkpoint", "overwrite_output_dir", "dry_run", "max_train_steps", "num_train_epochs",
    "auto_train_passes", "checkpointing_steps", "checkpoints_total_limit", "dataloader_num_workers",
    "probe_batch_size", "channels_last", "torch_compile", "gradient_checkpointing", "cache_train_pixels",
    "cache_caption_embeddings", "cache_latents", "cache_train_latents", "train_data_dir"})
# What training, evaluation and the final save write into a run folder (ARCHITECTURE.md "A training run"):
# the entries a fresh start removes; anything else in the folder is left where it is.
RUN_NAMES = (RUN_FILE, CONFIG_FILE, PROBES_FILE, WARNINGS_FILE, PROBE_MU_FILE, LORA_FILE, CACHE_DIR,
             "model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "feature_extractor",
             "safety_checker")
RUN_PATTERNS = (re.compile(r"^checkpoint-\d+(\.tmp)?$"), re.compile(r"^eval(_.+)?$"))


def run_identity(config: dict, dataset_fingerprint: str) -> dict:
    """{"fingerprint": SHA-256 of the flags that shape the run's content (all but UNFINGERPRINTED; a local model
    path made absolute) and of the dataset's fingerprint, "dataset": that fingerprint, "config": those flags}."""
    content = {key: value for key, value in sorted(config.items()) if key not in UNFINGERPRINTED}
    model = content.get("pretrained_model_name_or_path")
    if model and Path(model).exists():
        content["pretrained_model_name_or_path"] = str(Path(model).resolve())
    content = json.loads(json.dumps(content, default=str))
    text = json.dumps({"config": content, "dataset": dataset_fingerprint}, sort_keys=True)
    return {"fingerprint": hashlib.sha256(text.encode()).hexdigest(), "dataset": dataset_fingerprint,
            "config": content}


def write_run_record(run_dir: str | Path, identity: dict) -> None:
    """RUN/run.json (run_identity's record), written atomically."""
    write_text_atomic(Path(run_dir) / RUN_FILE, json.dumps(identity, indent=1))


def recorded_identity(run_dir: str | Path) -> dict | None:
    """What a folder says made its run: run.json, else the fingerprint in its newest checkpoint (a folder holding
    only copied checkpoints); None when neither records one (a run trained before runs recorded them)."""
    try:
        record = json.loads((Path(run_dir) / RUN_FILE).read_text())
        if isinstance(record, dict) and "fingerprint" in record:
            return record
    except (OSError, ValueError):
        pass
    for checkpoint in reversed(list_checkpoints(run_dir)):
        fingerprint = read_training_state(checkpoint).get("run_fingerprint")
        if fingerprint:
            return {"fingerprint": fingerprint}
    return None


def identity_difference(old: dict, new: dict) -> str:
    """What differs between two run identities, for a one-line message: the flags (old -> new) or the dataset."""
    if "config" not in old:
        return "its checkpoints record another fingerprint"
    changed = [f"{key} {old['config'].get(key)!r} -> {new['config'].get(key)!r}"
               for key in sorted(set(old["config"]) | set(new["config"]))
               if old["config"].get(key) != new["config"].get(key)]
    if old.get("dataset") != new.get("dataset"):
        changed.append("another dataset (its manifest differs)")
    return ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")


def run_entries(run_dir: str | Path, logging_dirs=()) -> list[Path]:
    """The entries of a folder that a run wrote (RUN_NAMES, checkpoint-N[.tmp], eval[_*], the relative
    `logging_dirs`), sorted; [] for a missing or empty folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    names = set(RUN_NAMES) | {Path(d).parts[0] for d in logging_dirs if d and Path(d).parts and not Path(d).is_absolute()}
    return sorted(path for path in run_dir.iterdir()
                  if path.name in names or any(pattern.match(path.name) for pattern in RUN_PATTERNS))


def clear_run(run_dir: str | Path, entries: list[Path]) -> None:
    """Remove a run's `entries` so that a crash leaves the folder with the whole old run or none of it: the folder
    is renamed to a trash folder beside it (one atomic rename), a new folder takes its name, the entries that are
    not the run's move back, and the trash is deleted."""
    run_dir = Path(run_dir).resolve()
    names = {entry.name for entry in entries}
    trash = run_dir.parent / f".{run_dir.name}.trash-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(run_dir, trash)
    run_dir.mkdir()
    for item in trash.iterdir():
        if item.name not in names:
            os.rename(item, run_dir / item.name)
    shutil.rmtree(trash)


def damaged_file(checkpoint: str | Path) -> str | None:
    """The first file of a checkpoint that is cut short or unreadable, with the reason; None when all read.

    Cheap: safetensors headers are checked against the file's length, torch.save archives (optimizer, scheduler,
    random states) for their closing directory, which a cut file lacks; empty files are damaged.
    """
    from safetensors import safe_open

    for path in sorted(p for p in Path(checkpoint).rglob("*") if p.is_file()):
        if path.stat().st_size == 0 and path.suffix in (".safetensors", ".bin", ".pt", ".pkl", ".pth", ".json"):
            return f"{path} is empty"
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), "pt"):
                    pass
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix in (".bin", ".pt", ".pkl", ".pth") and zipfile.is_zipfile(path) is False:
                with path.open("rb") as handle:  # torch.save archives are zip files; older pickles are not checked
                    if handle.read(2) == b"PK":
                        raise zipfile.BadZipFile("its zip directory is missing")
        except Exception as err:  # safetensors and zipfile raise their own types for a cut file
            return f"{path} is cut short or unreadable ({str(err).strip().splitlines()[0]})"
    return None


def checkpoint_identity(checkpoint: str | Path) -> str:
    """A short hash ('sha256:...') that changes whenever a checkpoint is saved again or a weights file in it is
    replaced: its checkpoint_id (training_state.json, new at each save) with the size and modification time of
    every file of unet/, unet_ema/ and the LoRA file. Cheap to read; a copy that keeps modification times keeps it."""
    checkpoint = Path(checkpoint)
    digest = hashlib.sha256(str(read_training_state(checkpoint).get("checkpoint_id")).encode())
    files = [checkpoint / LORA_FILE] + [p for sub in ("unet", "unet_ema") for p in sorted((checkpoint / sub).rglob("*"))]
    for path in files:
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.relative_to(checkpoint).as_posix()}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return "sha256:" + digest.hexdigest()[:16]  # never read back as a number from a CSV


def claim_run_folder(run_dir: str | Path, identity: dict, resume: str | None, overwrite: bool,
                     logging_dirs=()) -> list[Path]:
    """The old run's entries to remove before training ([] when there is nothing to remove), after checking that
    this run may use the folder; reads only. A folder holding a run is used only to resume that same run
    (`resume`, same fingerprint) or to start afresh (`overwrite`); otherwise a one-line ValueError says why.
    Resuming with 'latest' a run that has no checkpoint yet starts it afresh (its entries are removed)."""
    run_dir = output_folder(run_dir)
    if overwrite and resume is not None:
        raise ValueError("--overwrite_output_dir starts the run afresh and --resume_from_checkpoint continues it; "
                         "give one of them")
    entries = run_entries(run_dir, logging_dirs)
    if not entries:
        return []
    if not overwrite:
        check_same_run(run_dir, entries, identity, resume)
        if resume != "latest" or list_checkpoints(run_dir):
            return []
    if Path.cwd().resolve().is_relative_to(run_dir.resolve()):
        raise ValueError(f"{run_dir} holds the current folder, which a fresh start would move away; run the command "
                         "from outside it")
    return entries


def check_same_run(run_dir: Path, entries: list[Path], identity: dict, resume: str | None) -> None:
    """One-line ValueError unless the run in `run_dir` (its `entries`) is resumed (`resume`) by the run it
    records (run.json, or its checkpoints), `identity`."""
    shown = ", ".join(entry.name for entry in entries[:4]) + (", ..." if len(entries) > 4 else "")
    if resume is None:
        raise ValueError(f"--output_dir {run_dir} already holds a run ({shown}); continue it with "
                         "--resume_from_checkpoint latest, start afresh with --overwrite_output_dir (deletes it), "
                         "or choose another --output_dir")
    recorded = recorded_identity(run_dir)
    if recorded is None:
        raise ValueError(f"--output_dir {run_dir} holds a run that records no fingerprint (no {RUN_FILE}: trained "
                         "before runs recorded one), so resuming it cannot check that these flags made it; start "
                         "afresh with --overwrite_output_dir or choose another --output_dir")
    if recorded["fingerprint"] != identity["fingerprint"]:
        raise ValueError(f"--output_dir {run_dir} holds another run ({identity_difference(recorded, identity)}); "
                         "resume it with the flags and dataset that made it, start afresh with "
                         "--overwrite_output_dir (deletes it), or choose another --output_dir")


def locate_checkpoint(value: str | None, run_dir: str | Path) -> Path | None:
    """The checkpoint `--resume_from_checkpoint value` names: None (fresh start; also 'latest' with no checkpoint
    yet), the newest complete one for 'latest', else the folder (or run_dir/value); one-line ValueError when that
    is no complete checkpoint."""
    if value is None:
        return None
    if value == "latest":
        complete = list_checkpoints(run_dir)
        return complete[-1] if complete else None
    path = Path(value)
    if not path.is_dir() and (Path(run_dir) / value).is_dir():
        path = Path(run_dir) / value
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"--resume_from_checkpoint {value}: no complete checkpoint there (expected a "
                         f"checkpoint-N folder with training_state.json); give one, or 'latest'")
    return path


def check_resume_checkpoint(path: Path, value: str, identity: dict) -> None:
    """One-line ValueError when the checkpoint to resume holds a file cut short (naming the checkpoint to resume
    from instead) or was made by another run (its run_fingerprint is not `identity`'s)."""
    damage = damaged_file(path)
    if damage:
        step = folder_step(path)
        earlier = [c for c in list_checkpoints(path.parent) if step is not None and folder_step(c) < step]
        instead = (f"delete {path} to resume from {earlier[-1]} (or give that folder)" if earlier
                   else f"delete {path} and start afresh")
        raise ValueError(f"--resume_from_checkpoint {value}: {damage}; {instead}")
    fingerprint = read_training_state(path).get("run_fingerprint")
    if fingerprint != identity["fingerprint"]:
        why = "records no run fingerprint" if fingerprint is None else "was made by other flags or another dataset"
        raise ValueError(f"--resume_from_checkpoint {value}: {path} {why}; resume with the flags and dataset that "
                         "made it, or start afresh without --resume_from_checkpoint")


def folder_step(path: str | Path) -> int | None:
    """N of a folder named checkpoint-N, else None."""
    match = CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def write_cache(run_dir: str | Path, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """RUN/<name> (LATENT_CACHE_FILE, CAPTION_CACHE_FILE): tensors and string metadata, written atomically."""
    path = Path(run_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, str(tmp),
                  metadata={key: str(value) for key, value in metadata.items()})
    return path


def cache_metadata(run_dir: str | Path, name: str) -> dict[str, str] | None:
    """The metadata of RUN/<name>, or None when the file is absent or unreadable (a cache is rebuilt then)."""
    from safetensors import safe_open

    path = Path(run_dir) / name
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (OSError, ValueError, RuntimeError):  # absent, or not a safetensors file (cut short, edited)
        return None


def read_cache(run_dir: str | Path, name: str, fingerprint: str, device="cpu") -> dict[str, torch.Tensor] | None:
    """RUN/<name>'s tensors when its metadata holds `fingerprint`, else None (absent, unreadable or stale)."""
    metadata = cache_metadata(run_dir, name)
    if metadata is None or metadata.get("fingerprint") != fingerprint:
        return None
    # safetensors refuses an indexed CPU device ("cpu:0", what accelerate gives a CPU DDP rank): load, then move.
    return {key: value.to(device) for key, value in load_file(Path(run_dir) / name).items()}
