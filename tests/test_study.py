"""train/study.py: a study file run end to end on CPU and resumed after its folder is cut, bad study files
refused before anything runs, the aggregation of hand-made run folders, and the SLURM array job it submits
(checked through stand-in `sbatch` / `srun` commands: nothing is submitted)."""
from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mem_analysis import run as run_folder
from train import study as study_cli
from train.study_file import SCRIPTS, load_study, script_flags
from train.study_report import write_outputs
from train.study_runs import run_state

ROOT = Path(__file__).resolve().parents[1]
T_DF1 = math.tan(math.pi * 0.475)
T_DF2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)


def write_yaml(path: Path, content: dict, header: str = "") -> Path:
    """A YAML file (with optional comment header lines)."""
    path.write_text(header + yaml.safe_dump(content, sort_keys=False))
    return path


def unbuilt_config(tmp_path: Path) -> Path:
    """A finetune.py YAML without header lines: nothing to build (its model and data are never opened here)."""
    return write_yaml(tmp_path / "base.yaml", dict(pretrained_model_name_or_path=str(tmp_path / "no-model"),
                                                   train_data_dir=str(tmp_path / "no-data"), max_train_steps=200,
                                                   checkpointing_steps=100, probe_steps=100))


def test_script_flags_are_the_parsers_flags():
    from data_scripts import build_duplicated_dataset, make_base_model
    from eval import evaluate_checkpoints

    parsed = {"dataset": build_duplicated_dataset.parse_args(["--output_dir", "x"]),
              "base_model": make_base_model.parse_args(["--output_dir", "x"]),
              "evaluate": evaluate_checkpoints.parse_args(["--run_dir", "x"])}
    for stage, args in parsed.items():
        assert script_flags(SCRIPTS[stage]) == set(vars(args)), stage


BAD = {
    "unknown flag": ({"grid": {"learning_rat": [1e-3]}}, "learning_rat is not a flag of train/finetune.py"),
    "unknown dataset flag": ({"grid": {"dataset.dup_factor": ["1,4"]}}, "dup_factor is not a flag of data_scripts"),
    "invalid cell": ({"grid": {"proportion_empty_prompts": [0.1, 1.5]}}, "cell 1"),
    "steps not a checkpoint": ({"fixed": {"max_train_steps": 150}}, "multiple of checkpointing_steps"),
    "seed in the grid": ({"grid": {"seed": [0, 1]}}, "seeds:"),
    "reserved flag": ({"fixed": {"output_dir": "x"}}, "sets output_dir itself"),
    "unknown key": ({"grids": {}}, "unknown key(s) grids"),
    "executor key": ({"executor": {"kind": "slurm", "gpu": 8}}, "unknown key(s) gpu"),
    "repeated seed": ({"seeds": [0, 0]}, "repeat a seed"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_study_file_is_one_line_and_exit_2_before_anything_is_written(case, tmp_path, capsys):
    change, message = BAD[case]
    spec = {"base_config": str(unbuilt_config(tmp_path)), **change}
    path = write_yaml(tmp_path / "bad.yaml", spec)
    assert study_cli.cli([str(path), "--output_dir", str(tmp_path / "study")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("study: error:") and message in err[0], err
    assert not (tmp_path / "study").exists()


def hand_made_run(run_dir: Path, final: float, headline: dict | None) -> None:
    """A finished run folder: config, checkpoints 100 and 200, and evaluation tables whose factor-4 memorized
    fraction is 0, final / 2, final over steps 0, 100, 200 (two samples at -+ 0.1), factor 1 never."""
    run_folder.write_config(run_dir, {"max_train_steps": 200})
    for step in (100, 200):
        run_folder.checkpoint_dir(run_dir, step).mkdir(parents=True)
        run_folder.write_training_state(run_folder.checkpoint_dir(run_dir, step), step)
    rows = []
    for sid, factor, spread in ((10, 4, -1), (11, 4, 1), (20, 1, 0), (21, 1, 0)):
        values = [0.0, final / 2 + 0.05 * spread, final + 0.1 * spread] if factor == 4 else [0.0, 0.0, 0.0]
        for step, value in zip((0, 100, 200), values):
            rows.append(dict(checkpoint_step=step, sample_id=sid, dup_factor=factor, guidance_scale=7.5,
                             memorized_fraction=value, severity=value))
    (run_dir / "eval").mkdir()
    pd.DataFrame(rows).to_csv(run_dir / "eval" / "per_sample.csv", index=False)
    summary = {"settings": {"guidance_scale": 7.5, "threshold": 0.5}, **({"headline": headline} if headline else {})}
    (run_dir / "eval" / "summary.json").write_text(json.dumps(summary))


def test_aggregation_of_hand_made_runs_gives_the_known_values(tmp_path):
    path = write_yaml(tmp_path / "agg.yaml", {"base_config": str(unbuilt_config(tmp_path)), "seeds": [0, 1, 2],
                                              "grid": {"learning_rate": [0.001, 0.002]}})
    study_dir = tmp_path / "study"
    study = load_study(path, study_dir)
    finals = {"cell00-seed0": 0.5, "cell00-seed1": 0.6, "cell00-seed2": 0.7, "cell01-seed1": 0.2, "cell01-seed2": 0.4}
    said = {"cell00-seed0": "holds", "cell00-seed1": "does not hold", "cell00-seed2": "holds", "cell01-seed2": "holds"}
    for name, final in finals.items():
        headline = {"step": 200, "figures": {"r_dx": final + 0.3}, "verdicts": {"finding_1": said[name]}} \
            if name in said else None  # cell01-seed1: an evaluation without the headline key
        hand_made_run(study_dir / "runs" / name, final, headline)
    (study_dir / "records").mkdir()
    (study_dir / "records" / "cell01-seed0.json").write_text(json.dumps({"status": "failed", "stage": "train",
                                                                          "log": str(study_dir / "logs" / "x.log")}))
    write_outputs(study, study_dir)

    runs = pd.read_csv(study_dir / "runs.csv").set_index("run")
    assert runs.loc["cell01-seed0", "status"] == "failed" and runs.loc["cell01-seed0", "log"] == "logs/x.log"
    assert runs.loc["cell00-seed1", "memorized_fraction_dup_4"] == pytest.approx(0.6)
    assert runs.loc["cell00-seed1", "onset_step_dup_4"] == pytest.approx(100 * 0.25 / 0.3)
    assert runs.loc["cell01-seed2", "onset_step_dup_4"] == pytest.approx(100 + 100 * 0.05 / 0.2)
    assert math.isnan(runs.loc["cell01-seed1", "onset_step_dup_4"]) and math.isnan(runs.loc["cell01-seed1", "r_dx"])
    cells = pd.read_csv(study_dir / "cells.csv").set_index("cell")
    assert cells.loc[0, "memorized_fraction_dup_4_mean"] == pytest.approx(0.6)
    assert cells.loc[0, "memorized_fraction_dup_4_low"] == pytest.approx(0.6 - T_DF2 * 0.1 / math.sqrt(3))
    assert cells.loc[1, "memorized_fraction_dup_4_high"] == pytest.approx(0.3 + T_DF1 * math.sqrt(0.02) / math.sqrt(2))
    assert cells.loc[0, "r_dx_mean"] == pytest.approx(0.9) and cells.loc[1, "r_dx_n"] == 1
    assert cells.loc[1, "onset_step_dup_4_n"] == 1 and math.isnan(cells.loc[1, "onset_step_dup_4_low"])
    assert cells.loc[0, "verdict_finding_1"] == "holds in 2 of 3 (does not hold 1)" and cells.loc[1, "verdict_finding_1"] == "holds in 1 of 1"
    assert (cells.loc[1, "runs"], cells.loc[1, "failed"], cells.loc[1, "learning_rate"]) == (2, 1, 0.002)
    samples = pd.read_csv(study_dir / "samples.csv")
    assert len(samples) == 5 * 4 and set(samples["learning_rate"]) == {0.001, 0.002}
    onset = samples.set_index(["run", "sample_id"])["onset_step"]
    assert onset["cell00-seed2", 11] == 200 and onset["cell00-seed0", 11] == 200 and math.isnan(onset["cell00-seed0", 10])
    report = (study_dir / "report.md").read_text()
    assert "holds in 2 of 3" in report and "1 of 6 runs did not finish: cell01-seed0 (failed, train)" in report
    assert sorted(p.name for p in (study_dir / "tensorboard").iterdir() if p.is_dir()) == sorted(r.name for r in study.runs)
    assert (study_dir / "plots" / "learning_rate.png").is_file() and (study_dir / "plots" / "by_dup_factor.png").is_file()


FAKE_SBATCH = """#!/bin/bash
n=$(( $(cat "$FAKE_SLURM/counter" 2>/dev/null || echo 4241) + 1 ))
echo $n > "$FAKE_SLURM/counter"
cp "$1" "$FAKE_SLURM/sbatch-$n.sh"
echo "Submitted batch job $n"
"""


def test_slurm_executor_submits_one_array_job_and_an_aggregation_after_it(tmp_path, monkeypatch, capsys):
    import submitit

    fake = tmp_path / "bin"
    fake.mkdir()
    for name, body in (("sbatch", FAKE_SBATCH), ("srun", "#!/bin/bash\nexit 1\n")):
        (fake / name).write_text(body)
        (fake / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(fake))
    executor = dict(kind="slurm", gpus=8, accelerate_config="configs/accelerate/multi_gpu.yaml", partition="gpu",
                    time_min=600, cpus_per_task=32, mem_gb=200, array_parallelism=2, setup=["module load cuda"])
    path = write_yaml(tmp_path / "sd.yaml", {"base_config": str(unbuilt_config(tmp_path)), "seeds": [0, 1],
                                             "grid": {"learning_rate": [1e-5, 2e-5]}, "executor": executor})
    study_dir = tmp_path / "study"
    assert study_cli.cli([str(path), "--output_dir", str(study_dir)]) == 0
    assert "submitted 4 run(s) as SLURM array job 4242; aggregation job 4243" in capsys.readouterr().out
    array, after = (fake / "sbatch-4242.sh").read_text(), (fake / "sbatch-4243.sh").read_text()
    for line in ("#SBATCH --array=0-3%2", "#SBATCH --gpus-per-node=8", "#SBATCH --time=600", "#SBATCH --partition=gpu",
                 "#SBATCH --cpus-per-task=32", "#SBATCH --mem=200GB", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
                 "module load cuda", "-m submitit.core._submit"):
        assert line in array, line
    assert "#SBATCH --dependency=afterany:4242" in after and "gpus-per-node" not in after
    submitted = json.loads((study_dir / "submitted.json").read_text())
    assert submitted["jobs"] == [f"4242_{i}" for i in range(4)] and submitted["aggregate_job"] == "4243"
    folder = study_dir / "submitit"
    for i, name in enumerate(submitted["runs"]):
        task = pickle.loads(submitit.SlurmJob(folder, f"4242_{i}").paths.submitted_pickle.read_bytes()).function
        seed, cell = int(name[-1]), int(name[4:6])
        train = " ".join(task.train_command)
        assert "train/launch.py" in train and "--num_processes 8" in train
        assert f"--config_file {ROOT}/configs/accelerate/multi_gpu.yaml" in train
        assert f"train/finetune.py --config {tmp_path}/base.yaml --output_dir {study_dir}/runs/{name} --seed {seed}" in train
        assert f"--learning_rate {[1e-5, 2e-5][cell]}" in train
        assert "--multi_gpu --num_processes 8" in " ".join(task.eval_command)
        assert f"eval/evaluate_checkpoints.py --run_dir {study_dir}/runs/{name}" in " ".join(task.eval_command)
    aggregate = pickle.loads(submitit.SlurmJob(folder, "4243").paths.submitted_pickle.read_bytes()).function
    assert aggregate.command[-1] == "--aggregate_only" and str(path.resolve()) in aggregate.command
    assert not (study_dir / "runs").exists()  # nothing ran here


def read_log(study_dir: Path, name: str) -> str:
    return (study_dir / "logs" / f"{name}.log").read_text()


@pytest.mark.slow
def test_two_cells_two_seeds_run_end_to_end_and_resume_after_the_folder_is_cut(tmp_path):
    """Four runs of 4 steps on CPU; then one run folder deleted, one evaluation removed, one run cut back to its
    first checkpoint as a kill leaves it; the second call (through submitit's debug executor: the SLURM path
    without a cluster) redoes, evaluates and resumes exactly those and leaves the fourth alone."""
    path = write_yaml(tmp_path / "tiny.yaml", {
        "base_config": str(ROOT / "configs" / "demo_test.yaml"), "seeds": [0, 1],
        "grid": {"proportion_empty_prompts": [0.1, 0.5]},
        "fixed": {"max_train_steps": 4, "checkpointing_steps": 2, "probe_steps": 2,
                  "evaluate.probe_noise_draws": 1, "evaluate.guidance_scales": 7.5},
        "executor": {"kind": "local", "threads": 1}})
    study_dir = tmp_path / "study"
    command = [sys.executable, "-m", "train.study", str(path), "--output_dir", str(study_dir)]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    runs = pd.read_csv(study_dir / "runs.csv")
    assert list(runs["status"]) == ["done"] * 4 and list(runs["last_step"]) == [4] * 4
    assert len(list((study_dir / "data").glob("*/manifest.json"))) == 1  # one dataset and one base model,
    assert len(list((study_dir / "base").glob("*/model_index.json"))) == 1  # shared by the four runs
    assert len(pd.read_csv(study_dir / "samples.csv")) == 4 * (8 + 4)  # per run: 8 tracked samples, 4 held-out images
    cells = pd.read_csv(study_dir / "cells.csv")
    assert list(cells["runs"]) == [2, 2] and "memorized_fraction_dup_8_mean" in cells

    shutil.rmtree(study_dir / "runs" / "cell00-seed0")
    shutil.rmtree(study_dir / "runs" / "cell00-seed1" / "eval")
    killed = study_dir / "runs" / "cell01-seed0"
    shutil.rmtree(killed / "checkpoint-4")
    untouched = study_dir / "runs" / "cell01-seed1" / "eval" / "per_sample.csv"
    before, untouched_log = untouched.stat().st_mtime_ns, read_log(study_dir, "cell01-seed1")
    assert [run_state(study_dir / "runs" / n, []) for n in ("cell00-seed0", "cell00-seed1", "cell01-seed0")] == \
        ["new", "trained", "partial"]

    second = subprocess.run(command + ["--executor", "debug"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "reusing" in second.stdout and "building" not in second.stdout
    assert read_log(study_dir, "cell00-seed0").count("== train, ") == 2
    assert read_log(study_dir, "cell00-seed1").count("== train, ") == 1
    assert read_log(study_dir, "cell00-seed1").count("== evaluate, ") == 2
    assert "resumed from" in read_log(study_dir, "cell01-seed0") and "checkpoint-2 at step 2" in read_log(study_dir, "cell01-seed0")
    assert untouched.stat().st_mtime_ns == before and read_log(study_dir, "cell01-seed1") == untouched_log
    assert json.loads((study_dir / "submitted.json").read_text())["runs"] == ["cell00-seed0", "cell00-seed1", "cell01-seed0"]
    runs = pd.read_csv(study_dir / "runs.csv")
    assert list(runs["status"]) == ["done"] * 4
    evaluated = pd.read_csv(killed / "eval" / "per_sample.csv")
    assert sorted(evaluated["checkpoint_step"].unique()) == [0, 2, 4]


def test_a_failed_run_is_recorded_with_its_stage_and_log_and_the_next_run_goes_on(tmp_path):
    from train.study_runs import RunTask, run_local

    python = sys.executable
    makes_a_run = ("import sys; from mem_analysis import run; d = sys.argv[1]; run.write_config(d, {'max_train_steps': 2});"
                   " run.checkpoint_dir(d, 2).mkdir(parents=True); run.write_training_state(run.checkpoint_dir(d, 2), 2)")
    broken = RunTask("cell00-seed0", tmp_path, [python, "-c", "print('boom'); raise SystemExit(1)"], [python, "-V"], [], {})
    trained = RunTask("cell00-seed1", tmp_path, [python, "-c", makes_a_run, str(tmp_path / "runs" / "cell00-seed1")],
                      [python, "-c", "raise SystemExit(3)"], [], {})
    run_local([broken, trained])
    first = json.loads(broken.record_path.read_text())
    assert (first["status"], first["stage"], first["exit_status"]) == ("failed", "train", 1)
    assert "boom" in Path(first["log"]).read_text()
    second = json.loads(trained.record_path.read_text())
    assert (second["status"], second["stage"], second["exit_status"]) == ("failed", "evaluate", 3)
    assert run_state(trained.run_dir, []) == "trained"  # a third call would evaluate it again, not retrain
