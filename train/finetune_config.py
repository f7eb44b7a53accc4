"""The flags of train/finetune.py and their merging: defaults < `--config` YAML < command line.

Every YAML key must be a flag name (an unknown key is an error), and the resolved
configuration is what `finetune.py` saves as `output_dir/config.yaml` (mem_analysis.run.write_config).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import yaml

from mem_analysis import run
from mem_analysis.cli import OneLineParser, parse_list
from mem_analysis.data import dataset_fingerprint, read_metadata
from mem_analysis.run import RUN_DEFAULTS


class ConfigError(ValueError):
    """A configuration or input problem, reported as one line."""


class TrainingError(RuntimeError):
    """A failure while training (NaN loss), reported as one line."""


def comma_list(kind):
    """Parser of a list given as YAML list, comma-separated string, or repeated flag values (None kept)."""
    def parse(value):
        return None if value is None else parse_list(value, kind)
    return parse


def optional(kind):
    """Parser that keeps None (YAML `null`, flag value `none`) and converts anything else."""
    def parse(value):
        return None if value is None or str(value).lower() in ("none", "null") else kind(value)
    return parse


def boolean(value) -> bool:
    """YAML/flag boolean."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes"):
        return True
    if str(value).lower() in ("0", "false", "no"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def steps_or_auto(value):
    """Parser of max_train_steps: None, 'auto' (set from the dataset by auto_train_steps) or an int."""
    if value is not None and str(value).strip().lower() == "auto":
        return "auto"
    return optional(int)(value)


# `max_train_steps: auto` is `auto_train_passes` passes over the train rows, by default this many. Calibrated on
# the Twemoji demo (1,385 rows of 899 distinct images, batch 32): 35 passes give its tuned 1,500 steps
# (configs/demo_cpu.yaml now runs 28, 1,200 steps, to fit 10 minutes on 2 cores).
AUTO_EPOCHS = 35


# name: (default, parser, help). Names follow the diffusers text_to_image examples. The defaults of the
# fields evaluation reads from config.yaml come from mem_analysis.run.RUN_DEFAULTS.
FLAGS = {
    # model and data
    "pretrained_model_name_or_path": (None, str, "diffusers SD pipeline folder or hub name (required)"),
    "revision": (None, optional(str), "model revision on the hub"),
    "variant": (None, optional(str), "weights variant, e.g. fp16"),
    "train_data_dir": (None, optional(str), "study dataset folder (save_to_disk with train and probe splits)"),
    "dataset_name": (None, optional(str), "datasets hub name or local dataset with image/caption columns"),
    "dataset_config_name": (None, optional(str), "config of --dataset_name"),
    "image_column": ("image", str, "image column"),
    "caption_column": ("text", str, "caption column"),
    "num_probe_samples": (16, int, "with --dataset_name and no probe split: probe the first N train rows"),
    "resolution": (None, optional(int), "training resolution (default: the UNet's sample_size x VAE factor)"),
    "center_crop": (True, boolean, "centre crop (else random crop)"),
    "random_flip": (False, boolean, "random horizontal flip"),
    "cache_train_pixels": (False, boolean, "with --no-cache_latents: keep each row's preprocessed pixels in memory "
                           "after its first use (only without random crop/flip; small datasets)"),
    "max_train_samples": (None, optional(int), "truncate the train split (debugging)"),
    # training
    "output_dir": ("finetune-output", str, "run folder"),
    "seed": (RUN_DEFAULTS["seed"], int, "seed of data order, noise, timesteps and caption dropout"),
    "train_batch_size": (8, int, "batch size per process"),
    "num_train_epochs": (1, int, "epochs (ignored when --max_train_steps is set)"),
    "max_train_steps": (None, steps_or_auto, "optimizer steps in total, or 'auto': auto_train_passes passes over "
                        "the train rows (distinct images x their copies), to the nearest checkpoint interval"),
    "auto_train_passes": (AUTO_EPOCHS, float, "passes over the train rows that `max_train_steps: auto` trains for"),
    "gradient_accumulation_steps": (1, int, "micro-batches per optimizer step"),
    "gradient_checkpointing": (False, boolean, "recompute activations in backward"),
    "learning_rate": (1e-4, float, "peak learning rate"),
    "scale_lr": (False, boolean, "multiply lr by batch size x accumulation x processes"),
    "lr_scheduler": ("constant", str, "linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup"),
    "lr_warmup_steps": (0, int, "warmup steps"),
    "adam_beta1": (0.9, float, "AdamW beta1"),
    "adam_beta2": (0.999, float, "AdamW beta2"),
    "adam_weight_decay": (1e-2, float, "AdamW weight decay"),
    "adam_epsilon": (1e-8, float, "AdamW epsilon"),
    "max_grad_norm": (1.0, float, "gradient clipping norm"),
    "mixed_precision": (None, optional(str), "no, fp16 or bf16 (default: accelerate's launch setting)"),
    "allow_tf32": (False, boolean, "allow TF32 matmuls on Ampere+"),
    "channels_last": (False, boolean, "UNet weights and activations in channels-last layout (faster convolutions)"),
    "torch_compile": (False, boolean, "compile the UNet with torch.compile (the first step includes compilation)"),
    "prediction_type": (None, optional(str), "override the scheduler's prediction type (epsilon, v_prediction)"),
    "snr_gamma": (None, optional(float), "Min-SNR loss weighting gamma (5.0 recommended)"),
    "noise_offset": (0.0, float, "noise offset"),
    "proportion_empty_prompts": (0.1, float, "share of captions replaced by '' so CFG's unconditional branch is trained"),
    "cache_latents": (True, boolean, "encode each unique image's VAE posterior once before the first step "
                      "(RUN/cache/, reused on resume) and sample it each step; used where exact (centre crop, no "
                      "random flip: the VAE is frozen); off: encode every batch"),
    "cache_caption_embeddings": (True, boolean, "encode each distinct caption once before the first step "
                                 "(RUN/cache/, reused on resume; the text encoder is frozen); off: encode every batch "
                                 "(also off with a random-word or random-number caption_augmentation)"),
    "use_lora": (RUN_DEFAULTS["use_lora"], boolean, "train LoRA adapters (peft) instead of the full UNet"),
    "rank": (4, int, "LoRA rank"),
    "use_ema": (RUN_DEFAULTS["use_ema"], boolean, "keep an EMA of the UNet weights"),
    "ema_decay": (0.9999, float, "EMA decay"),
    "dataloader_num_workers": (0, int, "dataloader worker processes"),
    # mitigations of memorization (mem_analysis/mitigations.py; all off by default)
    "mitigation_wen_threshold": (None, optional(float), "Wen et al.: loss weight 0 for examples whose "
                                 "||e_c - e_0|| (epsilon space; one extra unconditional forward, no grad) exceeds "
                                 "this T at every timestep; the kept losses are averaged over the kept examples"),
    "mitigation_wen_thresholds": (None, optional(str), "Wen's filter with a threshold per timestep: a JSON file "
                                  "written by eval/wen_threshold.py --output (timesteps, thresholds; interpolated "
                                  "to every t on the x0 scale); instead of mitigation_wen_threshold"),
    "caption_augmentation": (None, optional(str), "Somepalli et al.: rand_word_add, rand_word_repeat, "
                             "rand_numbers_add or multiple_captions"),
    "caption_augmentation_p": (0.1, float, "probability that a caption is augmented"),
    "text_embedding_noise": (0.0, float, "std of Gaussian noise added to the caption embedding (0: off)"),
    "dedup_sampling": (False, boolean, "draw rows with probability proportional to 1 / dup_factor (same steps)"),
    # checkpoints and logging
    "checkpointing_steps": (500, int, "save a checkpoint every N steps (0: only at the end)"),
    "checkpoints_total_limit": (None, optional(int), "keep at most N checkpoints"),
    "save_on_each_node": (False, boolean, "nodes without a shared file system: the first process of every node "
                                          "writes checkpoints and the final model to its own output_dir"),
    "resume_from_checkpoint": (None, optional(str), "a checkpoint folder or 'latest' (of the same run: same "
                               "flags and dataset, see run.json)"),
    "overwrite_output_dir": (False, boolean, "start afresh in an output_dir that holds a run: its checkpoints, probe "
                             "rows, warnings, logs, evaluation and final model are deleted first"),
    "logging_dir": (RUN_DEFAULTS["logging_dir"], str, "TensorBoard folder, relative to output_dir"),
    "logging_steps": (10, int, "log the training loss (mean since the last log) every N steps; the loss is read "
                               "back from the device only then and before probes, validation and checkpoints"),
    "report_to": ("tensorboard", str, "tracker (tensorboard)"),
    "validation_prompts": (None, comma_list(str), "captions for validation images (default: first probe captions)"),
    "num_validation_prompts": (4, int, "probe captions used when --validation_prompts is not given"),
    "validation_steps": (0, int, "log validation images every N steps (0: off)"),
    "validation_inference_steps": (25, int, "DDIM steps of validation images"),
    "validation_guidance_scale": (7.5, float, "CFG scale of validation images"),
    # probes
    "probe_steps": (500, int, "probe every N steps and at step 0 (0: off)"),
    "probe_timesteps": (RUN_DEFAULTS["probe_timesteps"], comma_list(int), "probe timestep grid"),
    "probe_guidance_scales": (RUN_DEFAULTS["probe_guidance_scales"], comma_list(float), "CFG scales of the probe losses"),
    "probe_seed": (RUN_DEFAULTS["probe_seed"], int, "seed of the fixed probe noise"),
    "probe_batch_size": (64, int, "(sample, timestep) pairs per probe UNet call"),
    "high_noise_timestep": (RUN_DEFAULTS["high_noise_timestep"], int,
                            "timesteps >= this form the high-noise window (TensorBoard probe_high/, evaluation's _early)"),
    "warning_fpr": (RUN_DEFAULTS["warning_fpr"], float, "early warning: false-alarm rate per probe step on the null samples"),
    "dry_run": (False, boolean, "resolve config, build data and models, print the plan, train nothing"),
}


LIST_FLAGS = {"validation_prompts", "probe_timesteps", "probe_guidance_scales"}
# Old flag and YAML key names still read, each with a one-line notice: old name -> flag that replaced it.
DEPRECATED_FLAGS = {"cache_train_latents": "cache_latents"}


def build_parser() -> argparse.ArgumentParser:
    """Argparse over FLAGS; every default is None so that only given flags override the YAML."""
    parser = OneLineParser(prog="finetune.py", description="Fine-tune a Stable Diffusion UNet with per-sample CFG "
                           "probes.")
    parser.add_argument("--config", default=None, help="experiment YAML (keys = flag names)")
    for name, (default, kind, text) in FLAGS.items():
        if kind is boolean:
            parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=None, help=text)
        elif name in LIST_FLAGS:
            parser.add_argument(f"--{name}", nargs="+", default=None, help=f"{text} (default {default})")
        else:
            parser.add_argument(f"--{name}", default=None, help=f"{text} (default {default})")
    for old, name in DEPRECATED_FLAGS.items():
        parser.add_argument(f"--{old}", action=argparse.BooleanOptionalAction, default=None,
                            help=f"deprecated: use --{name}")
    return parser


def renamed(values: dict, where: str) -> dict:
    """`values` with deprecated names replaced by their flags, each replacement announced in one line on stderr."""
    for old, name in DEPRECATED_FLAGS.items():
        if values.get(old) is not None:
            print(f"finetune.py: {where}{old} is deprecated; read as {name} (same meaning)", file=sys.stderr)
            if values.get(name) is None:
                values[name] = values[old]
        values.pop(old, None)
    return values


def convert(name: str, value):
    """A YAML or flag value converted to the flag's type (one-line ConfigError otherwise)."""
    if isinstance(value, list) and name not in LIST_FLAGS:
        raise ConfigError(f"{name}: expected one value, got a list {value!r}")
    try:
        return FLAGS[name][1](value)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{name}: cannot read {value!r} ({error})") from None


def resolve_config(argv=None) -> argparse.Namespace:
    """Defaults, then the YAML of `--config`, then command-line flags; checks keys and values."""
    given = renamed(vars(build_parser().parse_args(argv)), "--")
    config = {name: default for name, (default, _, _) in FLAGS.items()}
    config_path = given.pop("config")
    if config_path:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"--config {config_path}: no such file")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of flag names to values")
        loaded = renamed(dict(loaded), f"{path}: key ")
        unknown = sorted(set(loaded) - set(FLAGS))
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; keys must be flag names "
                              f"of train/finetune.py (see --help)")
        config.update({name: convert(name, value) for name, value in loaded.items()})
    config.update({name: convert(name, value) for name, value in given.items() if value is not None})
    check_config(config)
    return argparse.Namespace(**config)


def preflight(argv=None) -> tuple[argparse.Namespace, dict, list[Path], Path | None]:
    """(flags, run identity, the old run's entries a fresh start removes, checkpoint to resume from), checked before
    any process starts or anything is written (mem_analysis.run: one run per folder); bad input is a one-line
    ConfigError. Reads no image and loads no model."""
    args = resolve_config(argv)
    if args.train_data_dir and not Path(args.train_data_dir).is_dir():
        raise ConfigError(f"study dataset {args.train_data_dir} does not exist; build it with "
                          f"data_scripts/build_duplicated_dataset.py --output_dir {args.train_data_dir}")
    source = args.train_data_dir or args.dataset_name
    try:
        if args.dataset_name and (Path(args.dataset_name) / "metadata.jsonl").is_file():
            read_metadata(args.dataset_name, args.caption_column)  # only files inside the folder are read
        identity = run.run_identity(vars(args), dataset_fingerprint(source))
        resume = run.locate_checkpoint(args.resume_from_checkpoint, args.output_dir)
        stale = run.claim_run_folder(args.output_dir, identity, args.resume_from_checkpoint,
                                     args.overwrite_output_dir, {args.logging_dir, old_logging_dir(args.output_dir)})
        if resume is not None:
            run.check_resume_checkpoint(resume, args.resume_from_checkpoint, identity)
    except ValueError as err:
        raise ConfigError(str(err).strip().splitlines()[0]) from None
    return args, identity, stale, resume


def old_logging_dir(output_dir: str) -> str | None:
    """The logging_dir in the config.yaml of a run already in output_dir (None without a readable one)."""
    try:
        return str(run.read_config(output_dir)["logging_dir"])
    except (OSError, TypeError, yaml.YAMLError):
        return None


def check_config(config: dict) -> None:
    """Cross-field checks, each failing with a one-line ConfigError."""
    if not config["pretrained_model_name_or_path"]:
        raise ConfigError("pretrained_model_name_or_path is required (a pipeline folder or hub name)")
    if bool(config["train_data_dir"]) == bool(config["dataset_name"]):
        raise ConfigError("give exactly one of train_data_dir (study dataset folder) or dataset_name")
    if not 0.0 <= config["proportion_empty_prompts"] <= 1.0:
        raise ConfigError("proportion_empty_prompts must lie in [0, 1]")
    for name in ("train_batch_size", "gradient_accumulation_steps", "rank", "probe_batch_size", "logging_steps"):
        if config[name] < 1:
            raise ConfigError(f"{name} must be >= 1, got {config[name]}")
    for name in ("probe_steps", "checkpointing_steps", "validation_steps"):
        if config[name] < 0:
            raise ConfigError(f"{name} must be >= 0 (0 turns it off), got {config[name]}")
    if config["max_train_steps"] not in (None, "auto") and config["max_train_steps"] < 0:
        raise ConfigError("max_train_steps must be >= 0")
    if config["auto_train_passes"] <= 0:
        raise ConfigError(f"auto_train_passes must be > 0 (passes over the train rows), got {config['auto_train_passes']}")
    if config["report_to"] != "tensorboard":
        raise ConfigError(f"report_to {config['report_to']!r}: only 'tensorboard' is supported")
    if config["use_lora"] and config["use_ema"]:
        raise ConfigError("use_ema applies to full fine-tuning; turn off use_lora or use_ema")
    check_mitigations(config)
    if config["probe_steps"] and not config["probe_timesteps"]:
        raise ConfigError("probe_timesteps is empty; give a timestep grid or set probe_steps 0")
    if not 0.0 < config["warning_fpr"] < 0.5:
        raise ConfigError(f"warning_fpr must lie in (0, 0.5), got {config['warning_fpr']}")


def check_mitigations(config: dict) -> None:
    """The mitigation flags' ranges (one-line ConfigError each)."""
    from mem_analysis.mitigations import CAPTION_AUGMENTATIONS

    if config["caption_augmentation"] is not None and config["caption_augmentation"] not in CAPTION_AUGMENTATIONS:
        raise ConfigError(f"caption_augmentation {config['caption_augmentation']!r}: choose one of "
                          f"{', '.join(CAPTION_AUGMENTATIONS)}")
    if not 0.0 <= config["caption_augmentation_p"] <= 1.0:
        raise ConfigError("caption_augmentation_p must lie in [0, 1]")
    if config["text_embedding_noise"] < 0:
        raise ConfigError("text_embedding_noise must be >= 0 (0 turns it off)")
    if config["mitigation_wen_threshold"] is not None and config["mitigation_wen_threshold"] < 0:
        raise ConfigError("mitigation_wen_threshold must be >= 0 (a magnitude ||e_c - e_0||)")
    if config["mitigation_wen_thresholds"] is not None:
        from mem_analysis.mitigations import read_wen_thresholds

        if config["mitigation_wen_threshold"] is not None:
            raise ConfigError("give mitigation_wen_threshold (one T) or mitigation_wen_thresholds (a file), not both")
        try:
            read_wen_thresholds(config["mitigation_wen_thresholds"])
        except ValueError as err:
            raise ConfigError(str(err)) from None


def auto_train_steps(train_rows: int, global_batch: int, interval: int, passes: float = AUTO_EPOCHS) -> int:
    """Steps for `max_train_steps: auto`: `ceil(passes * train_rows / global_batch)` rounded to the nearest
    multiple of `interval` (the checkpoint interval, so the last step is evaluated; at least one interval).

    Memorization sets in later on more distinct images (Bonnaire et al. 2025), and how often a duplicated
    image is seen is its copies x passes, so the budget is a number of passes over the rows.
    """
    steps = math.ceil(passes * train_rows / global_batch)
    if interval > 0:
        steps = max(interval, interval * round(steps / interval))
    return steps


def resolve_train_steps(args: argparse.Namespace, train_split, global_batch: int) -> str | None:
    """Replace `max_train_steps: auto` in `args` by its value for this dataset; the line to print (or None)."""
    if args.max_train_steps != "auto":
        return None
    rows = len(train_split)
    distinct = len(set(train_split["sample_id"])) if "sample_id" in train_split.column_names else rows
    args.max_train_steps = auto_train_steps(rows, global_batch, args.checkpointing_steps, args.auto_train_passes)
    return (f"max_train_steps auto = {args.max_train_steps}: {args.auto_train_passes:g} passes over {rows} train rows "
            f"({distinct} distinct images, {rows - distinct} extra copies) at {global_batch} samples per step, "
            f"to the nearest multiple of checkpointing_steps ({args.checkpointing_steps})")
