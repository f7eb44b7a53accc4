"""Expected CPU time of study files (train/study.py) on this machine, from a timed short check.

    python bench/bench_study.py configs/studies/seeds.yaml configs/studies/premise.yaml configs/studies/onset.yaml \
        [--workdir DIR] [--output bench/results/study_sizing.txt]

Measured here, with the commands a study runs (CPU seconds of their processes, user + system, so they hold on a
shared machine better than wall time; OMP_NUM_THREADS as set, default 2):
- training: `accelerate launch train/finetune.py` with configs/demo_cpu.yaml on its dataset and a quickly built
  tiny base model, for TRAIN_STEPS[0] and TRAIN_STEPS[1] steps: the difference gives CPU seconds per step, the
  rest the fixed cost of a launch (start-up, data, probes at step 0, the final save);
- evaluation: evaluate_checkpoints.py with the demo's `# evaluate:` settings on the base model alone and on base +
  one checkpoint: the difference is one model's cost, the rest the fixed cost. Another study's model costs the
  same times its work over the demo's, work = probes x (guidance scales x seeds x DDIM steps + noise draws x
  probe timesteps) (sampling and the probes, the two parts that grow);
- a base model: docs/demo_timings.txt's base_model CPU seconds (the demo's build, VAE and text encoder 300 steps
  each: 4 minutes, not remeasured), plus --pretrain_unet_steps at the training step's cost (same UNet, batch 32).
Each study's datasets are built (they are small) to count their rows and probes, and each run's steps resolved as
finetune.py resolves them (max_train_steps auto). Printed: the units, the same estimate for the demo beside
docs/demo_timings.txt's measured train and evaluate CPU seconds, and per study its builds, training and
evaluation. Wall time on 2 idle cores is about CPU / 1.9 (the demo's ratio in docs/demo_timings.txt).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from train.finetune_config import auto_train_steps, resolve_config
from train.study_file import ROOT, Build, header_args, load_study, script_tokens
from train.study_runs import build, call, launcher, run_env

TRAIN_STEPS = (20, 80)
DEMO_CONFIG = ROOT / "configs" / "demo_cpu.yaml"
QUICK_BASE = ("--preset", "tiny", "--seed", "0", "--vae_steps", "30", "--text_encoder_steps", "20")


def demo_timings() -> dict[str, float]:
    """CPU seconds per stage of docs/demo_timings.txt (lines: name wall cpu)."""
    return {line.split()[0]: float(line.split()[2]) for line in (ROOT / "docs" / "demo_timings.txt").read_text().splitlines()}


def option(args: list[str], name: str, default, kind=int):
    """The value of `--name` in a list of script arguments."""
    return kind(args[args.index(f"--{name}") + 1]) if f"--{name}" in args else default


def eval_work(eval_args: list[str], probes: int, probe_timesteps: int) -> float:
    """probes x (guidance scales x seeds x DDIM steps + noise draws x probe timesteps), evaluate_checkpoints' defaults."""
    scales = {option(eval_args, "guidance_scale", 7.5, float)}
    scales |= {float(g) for g in str(option(eval_args, "guidance_scales", "", str)).split(",") if g}
    return probes * (len(scales) * option(eval_args, "num_seeds", 10) * option(eval_args, "num_inference_steps", 50)
                     + option(eval_args, "probe_noise_draws", 4) * probe_timesteps)


def manifest_counts(folder: Path) -> tuple[int, int]:
    """(train rows, probe samples) of a built dataset."""
    counts = json.loads((folder / "manifest.json").read_text())["counts"]
    return sum(c["rows"] for c in counts.values()), sum(c["probe"] for c in counts.values())


def measure(work: Path, env: dict) -> dict:
    """The per-step, per-model and fixed CPU costs (module docstring), measured here."""
    executor = {"gpus": 0}
    text = DEMO_CONFIG.read_text()
    data = Build("data", "demo", script_tokens(header_args(text, "dataset")))
    base = Build("base", "quick", QUICK_BASE + ("--exclude_dataset", str(data.folder(work))))
    for item in (data, base):
        if build(item, work, env):
            raise RuntimeError(f"building {item.folder(work)} failed; see {work}/logs")
    train = {}
    for steps in TRAIN_STEPS:
        run = work / f"run-{steps}"
        command = launcher(executor, ROOT / "train" / "finetune.py") + [
            "--config", str(DEMO_CONFIG), "--pretrained_model_name_or_path", str(base.folder(work)),
            "--train_data_dir", str(data.folder(work)), "--output_dir", str(run), "--max_train_steps", str(steps),
            "--checkpointing_steps", str(steps)]
        status, _, train[steps] = call(command, work / "logs" / f"train-{steps}.log", env, f"train {steps} steps")
        if status:
            raise RuntimeError(f"training failed; see {work}/logs/train-{steps}.log")
    per_step = (train[TRAIN_STEPS[1]] - train[TRAIN_STEPS[0]]) / (TRAIN_STEPS[1] - TRAIN_STEPS[0])
    evaluate, eval_args = {}, list(script_tokens(header_args(text, "evaluate")))
    for models, subset in ((1, "0"), (2, f"0,{TRAIN_STEPS[0]}")):
        command = launcher(executor, ROOT / "eval" / "evaluate_checkpoints.py") + [
            "--run_dir", str(work / f"run-{TRAIN_STEPS[0]}"), "--output_dir", str(work / f"eval-{models}"),
            "--checkpoints", subset, *eval_args]
        status, _, evaluate[models] = call(command, work / "logs" / f"eval-{models}.log", env, f"evaluate {models}")
        if status:
            raise RuntimeError(f"evaluation failed; see {work}/logs/eval-{models}.log")
    rows, probes = manifest_counts(data.folder(work))
    config = vars(resolve_config(["--config", str(DEMO_CONFIG), "--pretrained_model_name_or_path", "x",
                                  "--train_data_dir", "x"]))
    return dict(train_step=per_step, train_launch=train[TRAIN_STEPS[0]] - TRAIN_STEPS[0] * per_step,
                eval_model=evaluate[2] - evaluate[1], eval_fixed=2 * evaluate[1] - evaluate[2],
                eval_work=eval_work(eval_args, probes, len(config["probe_timesteps"])),
                base_model=demo_timings()["base_model"], demo_rows=rows)


def run_cost(run, units: dict, work: Path) -> tuple[float, float, int, int]:
    """(training CPU s, evaluation CPU s, steps, evaluated models) of one run of a study."""
    config = vars(resolve_config(run.train_args))
    rows, probes = manifest_counts(run.dataset.folder(work)) if run.dataset else (units["demo_rows"], 36)
    interval = config["checkpointing_steps"]
    steps = config["max_train_steps"]
    if steps == "auto":
        steps = auto_train_steps(rows, config["train_batch_size"], interval, config["auto_train_passes"])
    models = 1 + steps // interval
    if "--checkpoints" in run.eval_args:
        models = len(str(option(run.eval_args, "checkpoints", "", str)).split(",")) if "last" not in run.eval_args else 1
    scale = eval_work(run.eval_args, probes, len(config["probe_timesteps"])) / units["eval_work"]
    return (units["train_launch"] + steps * units["train_step"],
            units["eval_fixed"] + models * units["eval_model"] * scale, steps, models)


def estimate(path: str, units: dict, work: Path, env: dict) -> list[str]:
    """The lines for one study file: its builds, runs, and expected CPU seconds."""
    study = load_study(path, work / Path(path).stem)
    folder = work / Path(path).stem
    datasets = {run.dataset.key: run.dataset for run in study.runs if run.dataset}
    bases = {run.base.key: run.base for run in study.runs if run.base}
    for item in datasets.values():  # small: built to count rows and probes
        if build(item, folder, env):
            raise RuntimeError(f"building {item.folder(folder)} failed")
    base_cpu = sum(units["base_model"] + option(list(b.args), "pretrain_unet_steps", 0) * units["train_step"]
                   for b in bases.values())
    lines, total_train, total_eval = [], 0.0, 0.0
    for run in study.runs:
        train, evaluate, steps, models = run_cost(run, units, folder)
        total_train, total_eval = total_train + train, total_eval + evaluate
        lines.append(f"  {run.name}: {steps} steps {train:.0f} s, {models} models evaluated {evaluate:.0f} s"
                     f"  ({json.dumps(run.hparams)})")
    total = base_cpu + total_train + total_eval
    return [f"{path}: {len(study.runs)} runs, {len(datasets)} dataset(s), {len(bases)} base model(s)",
            f"  expected CPU s: base models {base_cpu:.0f} + training {total_train:.0f} + evaluation {total_eval:.0f}"
            f" = {total:.0f} ({total / 3600:.2f} CPU-h; about {total / 1.9 / 3600:.2f} h wall on 2 idle cores)", *lines]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("studies", nargs="+", help="study files")
    p.add_argument("--workdir", default=None, help="keep the check's folders here (default: a temporary folder)")
    p.add_argument("--output", default=None, help="also write the printed lines to this file")
    args = p.parse_args(argv)
    env = run_env({"gpus": 0, "threads": None})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        units = measure(work, env)
        demo = demo_timings()
        steps, models = 1200, 5
        lines = [f"bench/bench_study.py, OMP_NUM_THREADS={env.get('OMP_NUM_THREADS')}; CPU seconds (user + system)",
                 "units: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in units.items()),
                 f"check against the demo ({steps} steps, {models} models; docs/demo_timings.txt measured on an idle "
                 f"machine): training estimated {units['train_launch'] + steps * units['train_step']:.0f} vs measured "
                 f"{demo['train']:.0f}; evaluation estimated {units['eval_fixed'] + models * units['eval_model']:.0f} "
                 f"vs measured {demo['evaluate']:.0f}"]
        for path in args.studies:
            lines += estimate(path, units, work, env)
    print("\n".join(lines))
    if args.output:
        Path(args.output).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
