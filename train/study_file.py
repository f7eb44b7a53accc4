"""A study file (configs/studies/NAME.yaml) read, checked and expanded into runs, before anything is built or trained.

    base_config: configs/demo_cpu.yaml   # a train/finetune.py YAML; its `# dataset:`, `# base_model:` and
                                         # `# evaluate:` header lines are the arguments of the three other stages
    seeds: [0, 1, 2]                     # training seeds: every cell runs once per seed
    grid:                                # cartesian product, in file order; each key a list of values
      proportion_empty_prompts: [0.1, 0.02]      # a train/finetune.py flag
      dataset.max_images: [450, 900]             # an argument of data_scripts/build_duplicated_dataset.py
      base_model.pretrain_unet_steps: [0, 600]   # ... of data_scripts/make_base_model.py
      evaluate.num_seeds: [4, 8]                 # ... of eval/evaluate_checkpoints.py
      duplicated_share:                          # any other name: a list of mappings, each setting several
        - {label: "36 %", dataset.samples_per_factor: 6, dataset.max_images: 900}   # keys at once; its label
        - {label: "5 %", dataset.samples_per_factor: 1, dataset.max_images: 1600}   # names it in the tables
    fixed: {checkpointing_steps: 100}    # the same keys, one value each, for every cell
    figures: {columns: [memorized_fraction, k_uncond_early], onset_level: 0.25}   # mem_analysis.studies
    executor: {kind: local, threads: 2}  # or kind: slurm with its parameters (train/study_runs.py EXECUTOR_KEYS)
    title: one line for the report

A value True gives a script argument as a bare flag, False or null leaves it out. The base model is built as
data_scripts/demo.sh builds it (`--preset tiny` unless given, `--exclude_dataset` the cell's dataset), and datasets
and base models are shared by every cell whose arguments are equal (their folders are named by a hash of them).
Everything is checked here: an unknown key, a key of another script's flag that script does not have, and every
run's finetune.py arguments through train/finetune_config.py's own resolution (StudyError, one line, exit 2).
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import itertools
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mem_analysis.cli import BadInput
from train.finetune_config import FLAGS, LIST_FLAGS, ConfigError, resolve_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"dataset": ROOT / "data_scripts" / "build_duplicated_dataset.py",
           "base_model": ROOT / "data_scripts" / "make_base_model.py",
           "evaluate": ROOT / "eval" / "evaluate_checkpoints.py"}
# Arguments the study sets itself, per stage (a study file may not give them).
RESERVED = {"dataset": {"output_dir", "overwrite"}, "base_model": {"output_dir", "overwrite", "exclude_dataset"},
            "evaluate": {"run_dir", "output_dir", "logging_dir"},
            "train": {"config", "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "dry_run", "seed"}}
TOP_KEYS = {"base_config", "seeds", "grid", "fixed", "figures", "executor", "title"}


class StudyError(BadInput):
    """A study file, or the folder it would write to, that cannot be used: one line, exit status 2."""


@dataclass(frozen=True)
class Build:
    """A dataset or base model folder of the study: made by `script` with `args` into STUDY/<kind>/<key>."""

    kind: str  # "data" or "base"
    key: str
    args: tuple[str, ...]

    def folder(self, study_dir: Path) -> Path:
        """Where it is built."""
        return Path(study_dir) / self.kind / self.key


@dataclass
class Run:
    """One training run of the study: a grid cell at one seed, with every stage's arguments resolved."""

    name: str
    cell: int
    seed: int
    hparams: dict
    dataset: Build | None
    base: Build | None
    train_args: list[str]  # finetune.py flags, output folder included, resume flags not
    eval_args: list[str]   # evaluate_checkpoints.py flags after --run_dir


@dataclass
class Study:
    """A checked study file: its settings, the runs it expands to, and the fingerprint of what decides results."""

    path: Path
    name: str
    title: str
    base_config: Path
    seeds: list[int]
    grid: dict
    figures: dict
    executor: dict
    fingerprint: str
    runs: list[Run] = field(default_factory=list)

    @property
    def swept(self) -> list[str]:
        """The grid keys that take more than one value."""
        return [key for key, values in self.grid.items() if len(values) > 1]

    @property
    def levels(self) -> dict[str, list]:
        """Each grid key's values as the tables show them (a mapping by its label)."""
        return {key: [level(value) for value in values] for key, values in self.grid.items()}


def level(value):
    """A grid value as the tables show it: a mapping by its `label` (else as JSON), anything else as it is."""
    if isinstance(value, dict):
        return str(value.get("label", json.dumps(value, sort_keys=True)))
    return value


def script_flags(script: Path) -> set[str]:
    """The `--name` flags a script's argparse parser declares, read from its source (the script is not imported:
    scripts import no script); tests/test_study.py checks the set against the parser itself."""
    tree = ast.parse(Path(script).read_text())
    return {node.args[0].value[2:] for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument" and node.args
            and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("--")}


def header_args(config_text: str, name: str) -> dict:
    """The `# NAME: --flag value ...` header line of a config as {flag: value or True}, in order ({} if absent)."""
    for line in config_text.splitlines():
        if line.startswith(f"# {name}:"):
            tokens, args = shlex.split(line.split(":", 1)[1]), {}
            for i, token in enumerate(tokens):
                if token.startswith("--"):
                    following = tokens[i + 1] if i + 1 < len(tokens) else None
                    args[token[2:]] = True if following is None or following.startswith("--") else following
            return args
    return {}


def script_tokens(args: dict) -> tuple[str, ...]:
    """{flag: value} as command-line tokens: True a bare flag, False/None left out, a list comma-joined."""
    tokens = []
    for name, value in args.items():
        if value is None or value is False:
            continue
        tokens.append(f"--{name}")
        if value is not True:
            tokens.append(",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))
    return tuple(tokens)


def flag_tokens(name: str, value) -> list[str]:
    """One finetune.py flag as tokens its parser reads (booleans as --name / --no-name, lists as several values)."""
    if isinstance(value, bool):
        return [f"--{name}" if value else f"--no-{name}"]
    if value is None:
        return [f"--{name}", "none"]
    if isinstance(value, (list, tuple)) and name in LIST_FLAGS:
        return [f"--{name}", *map(str, value)]
    return [f"--{name}", json.dumps(value) if isinstance(value, (list, dict)) else str(value)]


def digest(*parts) -> str:
    """A short hash of JSON-serialisable parts (folder names of shared builds, the study's fingerprint)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def split_key(key: str, where: str, flags: dict) -> tuple[str, str]:
    """A grid or fixed key as (stage, flag), checked against that stage's flags."""
    stage, _, flag = key.rpartition(".") if "." in key else ("train", "", key)
    if stage not in ("train", *SCRIPTS):
        raise StudyError(f"{where} key {key!r}: the prefix must be dataset., base_model. or evaluate. "
                         "(a plain key is a train/finetune.py flag)")
    if flag == "seed" and stage == "train":
        raise StudyError(f"{where} key 'seed': give the training seeds as the list `seeds:`")
    if flag in RESERVED[stage]:
        raise StudyError(f"{where} key {key!r}: the study sets {flag} itself")
    if flag not in flags[stage]:
        script = "train/finetune.py" if stage == "train" else SCRIPTS[stage].relative_to(ROOT)
        raise StudyError(f"{where} key {key!r}: {flag} is not a flag of {script}")
    return stage, flag


def read_yaml(path: Path) -> dict:
    """A YAML mapping (StudyError otherwise)."""
    if not path.is_file():
        raise StudyError(f"{path}: no such file")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise StudyError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise StudyError(f"{path}: expected a mapping of study keys ({', '.join(sorted(TOP_KEYS))})")
    return loaded


def find_file(name: str) -> Path:
    """A path as given (from the current folder), else from the repository root."""
    path = Path(name)
    return path if path.exists() or path.is_absolute() else ROOT / path


def check_shape(spec: dict, path: Path) -> tuple[list[int], dict, dict]:
    """seeds, grid and fixed of a study file, with their types checked."""
    unknown = sorted(set(spec) - TOP_KEYS)
    if unknown:
        raise StudyError(f"{path}: unknown key(s) {', '.join(unknown)}; a study file has {', '.join(sorted(TOP_KEYS))}")
    if "base_config" not in spec:
        raise StudyError(f"{path}: base_config is required (a train/finetune.py YAML such as configs/demo_cpu.yaml)")
    seeds, grid, fixed = spec.get("seeds", [0]), spec.get("grid") or {}, spec.get("fixed") or {}
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise StudyError(f"{path}: seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise StudyError(f"{path}: seeds {seeds} repeat a seed")
    if not isinstance(grid, dict) or not isinstance(fixed, dict):
        raise StudyError(f"{path}: grid and fixed must be mappings of keys to values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise StudyError(f"{path}: grid key {key!r} needs a non-empty list of values, got {values!r}")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise StudyError(f"{path}: grid key {key!r} repeats a value")
        if any(isinstance(v, dict) for v in values) and not all(isinstance(v, dict) and v for v in values):
            raise StudyError(f"{path}: grid key {key!r} mixes mappings (several keys at once) with single values")
    both = sorted(set(grid) & set(fixed))
    if both:
        raise StudyError(f"{path}: {', '.join(both)} in both grid and fixed")
    return seeds, grid, fixed


def stage_flags(used_stages: set[str]) -> dict:
    """The flags of each stage's script (read only for the stages a study file names)."""
    flags = {"train": set(FLAGS)}
    flags.update({stage: script_flags(SCRIPTS[stage]) for stage in used_stages if stage != "train"})
    return flags


def cell_builds(overrides: dict, headers: dict, study_dir: Path) -> tuple[Build | None, Build | None, list[str]]:
    """The dataset and base model of one cell (None where the base config builds none) and its evaluation args."""
    data_args = {**headers["dataset"], **overrides["dataset"]}
    dataset = Build("data", digest(script_tokens(data_args)), script_tokens(data_args)) if data_args else None
    base = None
    base_args = {**headers["base_model"], **overrides["base_model"]}
    if base_args:
        base_args = {"preset": "tiny", **base_args}  # as data_scripts/demo.sh
        tokens = script_tokens(base_args)
        key = digest(tokens, dataset.key if dataset else None)
        if dataset:  # the base model never sees the study's images (demo.sh's --exclude_dataset)
            tokens += ("--exclude_dataset", str(dataset.folder(study_dir)))
        base = Build("base", key, tokens)
    return dataset, base, list(script_tokens({**headers["evaluate"], **overrides["evaluate"]}))


def check_run(run: Run, where: str) -> None:
    """finetune.py's own resolution of the run's flags, and what a study needs of a run (StudyError)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()) as said:  # argparse's usage lines: our message is one line
            config = vars(resolve_config(run.train_args))
    except ConfigError as error:
        raise StudyError(f"{where}: {error}") from None
    except SystemExit:
        reason = (said.getvalue().strip().splitlines() or ["cannot parse its flags"])[-1]
        raise StudyError(f"{where}: train/finetune.py {reason}") from None
    interval, steps = config["checkpointing_steps"], config["max_train_steps"]
    if interval <= 0:
        raise StudyError(f"{where}: checkpointing_steps must be > 0 (evaluation reads the checkpoints)")
    if steps is None or (steps != "auto" and steps % interval):
        raise StudyError(f"{where}: max_train_steps must be auto or a multiple of checkpointing_steps ({interval}), "
                         f"got {steps}, so that the last step is a checkpoint")


def expand(study: Study, headers: dict, fixed: dict, flags: dict, study_dir: Path) -> list[Run]:
    """Every (cell, seed) of the grid as a Run, each checked (check_run)."""
    runs = []
    keys = list(study.grid)
    for cell, values in enumerate(itertools.product(*(study.grid[k] for k in keys))):
        chosen = dict(zip(keys, values))
        overrides = {stage: {} for stage in ("train", *SCRIPTS)}
        for key, value in {**fixed, **chosen}.items():
            where = "grid" if key in chosen else "fixed"
            for name, setting in (value.items() if isinstance(value, dict) and key in chosen else [(key, value)]):
                if name != "label":
                    stage, flag = split_key(name, where, flags)
                    overrides[stage][flag] = setting
        dataset, base, eval_args = cell_builds(overrides, headers, study_dir)
        for name in ("pretrained_model_name_or_path", "train_data_dir"):
            built = base if name.startswith("pretrained") else dataset
            if built and name in overrides["train"]:
                raise StudyError(f"{study.path}: {name} is set by the study (the base config's header builds it)")
        for seed in study.seeds:
            run_name = f"cell{cell:02d}-seed{seed}"
            args = ["--config", str(study.base_config), "--output_dir", str(Path(study_dir) / "runs" / run_name),
                    "--seed", str(seed)]
            if dataset:
                args += ["--train_data_dir", str(dataset.folder(study_dir))]
            if base:
                args += ["--pretrained_model_name_or_path", str(base.folder(study_dir))]
            for name, value in overrides["train"].items():
                args += flag_tokens(name, value)
            run = Run(run_name, cell, seed, {k: level(v) for k, v in chosen.items()}, dataset, base, args, eval_args)
            check_run(run, f"{study.path}: cell {cell} ({json.dumps(chosen)}), seed {seed}")
            runs.append(run)
    return runs


def load_study(path: str | Path, study_dir: str | Path | None = None) -> Study:
    """The study file checked and expanded; `study_dir` defaults to runs/studies/<file stem>."""
    path = Path(path)
    spec = read_yaml(path)
    seeds, grid, fixed = check_shape(spec, path)
    base_config = find_file(str(spec["base_config"]))
    if not base_config.is_file():
        raise StudyError(f"{path}: base_config {spec['base_config']} not found")
    text = base_config.read_text()
    headers = {name: header_args(text, name) for name in SCRIPTS}
    named = [*fixed, *(k for key, values in grid.items() for value in values
                       for k in (value if isinstance(value, dict) else [key]))]
    used = {key.rpartition(".")[0] for key in named if "." in key} | {"train"}
    figures = spec.get("figures") or {}
    if not isinstance(figures, dict) or set(figures) - {"columns", "onset_level"}:
        raise StudyError(f"{path}: figures takes columns (per_sample.csv columns) and onset_level")
    executor = spec.get("executor") or {"kind": "local"}
    if not isinstance(executor, dict):
        raise StudyError(f"{path}: executor must be a mapping (kind: local or slurm, and its parameters)")
    # What decides the results; not where they run (the executor) nor the file's name.
    fingerprint = digest({k: v for k, v in spec.items() if k not in ("executor", "title")}, yaml.safe_load(text),
                         headers)
    study_dir = Path(study_dir) if study_dir else Path("runs") / "studies" / path.stem
    study = Study(path, path.stem, str(spec.get("title") or path.stem), base_config.resolve(), seeds, grid, figures,
                  executor, fingerprint)
    study.runs = expand(study, headers, fixed, stage_flags(used), study_dir.resolve())
    return study
