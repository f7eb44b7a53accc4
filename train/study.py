"""Run a study: many training runs from one file (a grid of settings x training seeds), locally or on SLURM,
evaluated and aggregated into one folder.

    python -m train.study configs/studies/seeds.yaml [--output_dir runs/studies/seeds] [--executor local|slurm]
    python -m train.study configs/studies/seeds.yaml --aggregate_only [--publish docs/studies/seeds]

1. Check the study file and every run's arguments (train/study_file.py) and that the folder was made by this
   file (STUDY/study.json holds its fingerprint): any problem is one line and exit status 2, before anything runs.
2. Build each distinct dataset and base model once (STUDY/data/<hash>, STUDY/base/<hash>; reused when built with
   the same arguments).
3. Train (`accelerate launch train/finetune.py`) and evaluate (eval/evaluate_checkpoints.py) every run that is not
   done, resuming what a previous call left (train/study_runs.py): one after another here (`local`), or as one SLURM
   array job through submitit (`slurm`; the aggregation is then a job that starts when the array has ended).
   `debug` runs the SLURM path here with submitit's DebugExecutor.
4. Aggregate: runs.csv, samples.csv, cells.csv, fits.csv, tensorboard/, plots/, report.md (train/study_report.py).
Exit status 0 when every run is done (or the array is submitted), 1 when a run failed (its row says where), 2 on
bad input.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from mem_analysis.cli import run_command
from mem_analysis.io import write_text_atomic
from train import study_runs
from train.study_file import StudyError, load_study
from train.study_report import write_outputs

FINISHED = 0
SOME_FAILED = 1
PUBLISHED = ("report.md", "runs.csv", "samples.csv", "cells.csv", "fits.csv")


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(prog="study", description=__doc__.split("\n\n")[0])
    p.add_argument("study", help="study file, e.g. configs/studies/seeds.yaml")
    p.add_argument("--output_dir", default=None, help="study folder (default runs/studies/<file name>)")
    p.add_argument("--executor", choices=study_runs.KINDS, default=None, help="overrides the file's executor kind")
    p.add_argument("--aggregate_only", action="store_true", help="only rebuild the tables, plots and report")
    p.add_argument("--publish", default=None, help="copy report.md, the tables and plots/ to this folder")
    return p.parse_args(argv)


def claim_folder(study, study_dir: Path, create: bool) -> None:
    """Refuse a folder made by another study file or holding something else; record this file's fingerprint."""
    note = study_dir / "study.json"
    if note.is_file():
        made_by = json.loads(note.read_text())
        if made_by["fingerprint"] != study.fingerprint:
            raise StudyError(f"{study_dir} was made by another study file ({made_by['study']}, fingerprint "
                             f"{made_by['fingerprint']}; this one is {study.fingerprint}); use another --output_dir")
        return
    if study_dir.exists() and any(study_dir.iterdir()):
        raise StudyError(f"{study_dir} is not empty and holds no study.json; use another --output_dir")
    if not create:
        raise StudyError(f"{study_dir} holds no study; run the study before --aggregate_only")
    write_text_atomic(note, json.dumps(dict(study=str(study.path), fingerprint=study.fingerprint), indent=1))
    write_text_atomic(study_dir / "study.yaml", study.path.read_text())


def publish(study_dir: Path, target: Path) -> None:
    """The report, its tables and plots copied to `target` (e.g. docs/studies/NAME)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in PUBLISHED:
        shutil.copy2(study_dir / name, target / name)
    if (study_dir / "plots").is_dir():
        shutil.copytree(study_dir / "plots", target / "plots", dirs_exist_ok=True)


def run_all(study, study_dir: Path, executor: dict, argv_again: list[str]) -> bool:
    """Build, then train and evaluate every run (step 2 and 3); False when the runs were handed to SLURM."""
    env = study_runs.run_env(executor)
    failed_builds = study_runs.prepare(study.runs, study_dir, env)
    tasks = [study_runs.make_task(run, study_dir, executor, env) for run in study.runs]
    for task in tasks:
        if task.name in failed_builds:
            study_runs.write_record(task, status="failed", stage="build", log=failed_builds[task.name])
    tasks = [task for task in tasks if task.name not in failed_builds]
    if executor["kind"] == "local":
        study_runs.run_local(tasks)
        return True
    todo = [task for task in tasks if study_runs.run_state(task.run_dir, task.eval_args) != "done"]
    submitted = study_runs.submit(todo, executor, study_dir, study.name, argv_again)
    if executor["kind"] == "slurm":
        print(f"[study] submitted {len(todo)} run(s) as SLURM array job {submitted['jobs'][0].split('_')[0] if todo else '-'}"
              f"; aggregation job {submitted.get('aggregate_job', '-')} runs when it ends (or run "
              f"`{' '.join(argv_again)}` yourself); job files in {study_dir / 'submitit'}")
        return False
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    study = load_study(args.study, args.output_dir)
    study_dir = Path(args.output_dir) if args.output_dir else Path("runs") / "studies" / study.name
    executor = study_runs.check_executor({**study.executor, **({"kind": args.executor} if args.executor else {})})
    claim_folder(study, study_dir, create=not args.aggregate_only)
    again = [sys.executable, "-m", "train.study", str(study.path.resolve()), "--output_dir", str(study_dir.resolve()),
             "--aggregate_only"]
    if not args.aggregate_only and not run_all(study, study_dir.resolve(), executor, again):
        return FINISHED
    frames = write_outputs(study, study_dir.resolve())
    if args.publish:
        publish(study_dir, Path(args.publish))
    runs = frames["runs"]
    print(f"[study] {study_dir}: {(runs['status'] == 'done').sum()} of {len(runs)} runs done; report {study_dir / 'report.md'}"
          f"; tensorboard --logdir {study_dir / 'tensorboard'}")
    failed = runs[runs["status"] == "failed"]
    if len(failed):
        print(f"study: error: {len(failed)} of {len(runs)} runs failed ({', '.join(failed['run'])}); their logs are in "
              f"runs.csv", file=sys.stderr)
        return SOME_FAILED
    return FINISHED


def cli(argv=None) -> int:
    """main() with bad input as one line and exit status 2 (mem_analysis.cli)."""
    return run_command(main, "study", argv, bad_input=(StudyError,))


if __name__ == "__main__":
    sys.exit(cli())
