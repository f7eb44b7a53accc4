"""Running a study's runs: build its datasets and base models, then train and evaluate each run with the ordinary
commands, one after another here or as one SLURM array job through submitit.

A run's state is read from its folder (mem_analysis.run's layout), never from a note of ours, so a second call
picks up whatever happened in between:
- new:     no complete checkpoint (or no folder): trained from scratch (--overwrite_output_dir);
- partial: complete checkpoints, but not the one at max_train_steps (a killed run): resumed from the last one
           (`--resume_from_checkpoint latest`, which finetune.py accepts only for the run the folder records), then
           evaluated (evaluation re-evaluates a checkpoint whose weights changed and drops rows of vanished ones);
- trained: the last checkpoint is there, the evaluation is not complete: evaluated (evaluation skips the
           checkpoints it already has);
- done:    RUN/eval/summary.json and per_sample.csv rows for every checkpoint evaluation was asked for: skipped.
Each run's commands and output go to STUDY/logs/RUN.log; STUDY/records/RUN.json records its status, the stage
that failed and the wall and CPU seconds spent on it (summed over calls).
"""
from __future__ import annotations

import json
import os
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mem_analysis import run as run_folder
from mem_analysis.io import write_text_atomic
from train.study_file import ROOT, SCRIPTS, Build, Run, StudyError, find_file

MARKERS = {"data": "manifest.json", "base": "model_index.json"}  # the file a complete build folder holds
BUILD_SCRIPTS = {"data": SCRIPTS["dataset"], "base": SCRIPTS["base_model"]}
# executor keys: where runs go (kind), how each is launched (threads, gpus, accelerate_config) and, for SLURM,
# submitit's SlurmExecutor parameters (time_min is its `time`, mem_gb its `mem`, additional its
# additional_parameters: any other #SBATCH option).
LAUNCH_KEYS = {"kind", "threads", "gpus", "accelerate_config"}
SLURM_KEYS = {"partition", "time_min", "cpus_per_task", "mem_gb", "array_parallelism", "account", "qos",
              "constraint", "setup", "job_name", "additional"}
KINDS = ("local", "slurm", "debug")


def check_executor(executor: dict) -> dict:
    """The executor section with its kind and values checked (StudyError)."""
    unknown = sorted(set(executor) - LAUNCH_KEYS - SLURM_KEYS)
    if unknown:
        raise StudyError(f"executor: unknown key(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(LAUNCH_KEYS | SLURM_KEYS))}")
    if executor.get("kind", "local") not in KINDS:
        raise StudyError(f"executor kind {executor['kind']!r}: choose local or slurm (debug: the SLURM path here)")
    for key, least in (("threads", 1), ("gpus", 0), ("time_min", 1), ("cpus_per_task", 1), ("array_parallelism", 1)):
        value = executor.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
            raise StudyError(f"executor {key} must be an integer >= {least}, got {value!r}")
    return {"kind": "local", "gpus": 0, **executor}


def run_env(executor: dict) -> dict:
    """Environment of every command: OMP_NUM_THREADS from executor.threads, else the caller's, else (on CPU) the
    cores this process may use; accelerate would otherwise set 1 thread."""
    env = {"TOKENIZERS_PARALLELISM": "false"}
    threads = executor.get("threads") or os.environ.get("OMP_NUM_THREADS")
    if threads is None and not executor["gpus"]:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def launcher(executor: dict, script: Path) -> list[str]:
    """The command that starts `script`: `accelerate launch` through train/launch.py (accelerate's own launcher
    with the project's exit statuses: 2 bad input, 1 a failed run) on the CPU, one GPU, or --multi_gpu / the
    executor's accelerate_config over `gpus` processes, for training; evaluation under it only with several GPUs."""
    gpus = executor["gpus"]
    accelerate = [sys.executable, str(ROOT / "train" / "launch.py"), "--num_machines", "1", "--dynamo_backend", "no"]
    if script == ROOT / "train" / "finetune.py":
        if gpus == 0:
            return accelerate + ["--cpu", "--num_processes", "1", "--mixed_precision", "no", str(script)]
        config = executor.get("accelerate_config")
        return accelerate + (["--config_file", str(find_file(config).resolve())]
                             if config else ["--multi_gpu"] * (gpus > 1)) + ["--num_processes", str(gpus), str(script)]
    if gpus > 1:
        return accelerate + ["--multi_gpu", "--num_processes", str(gpus), str(script)]
    return [sys.executable, str(script)]


def call(command: list[str], log: Path, env: dict, what: str) -> tuple[int, float, float]:
    """Run a command with its output appended to `log`: (exit status, wall seconds, CPU seconds of its processes)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"\n== {what}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n$ {shlex.join(command)}\n")
        out.flush()
        before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        status = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                cwd=ROOT).returncode
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        out.write(f"== {what}: exit status {status}\n")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return status, time.perf_counter() - start, cpu


def last_line(log: Path) -> str:
    """The last line a command wrote before our closing line (its one-line error)."""
    lines = [line for line in log.read_text().splitlines() if line.strip() and not line.startswith("== ")]
    return lines[-1].strip() if lines else "(no output)"


# ---------------------------------------------------------------------------------------------------------------
# Datasets and base models, shared by the cells whose arguments are equal

def build(item: Build, study_dir: Path, env: dict) -> str | None:
    """Build (or reuse, when built with the same arguments, as demo.sh's `cached`) one dataset or base model;
    None when ready, else the log of a failed build. A build refused as bad input raises StudyError."""
    folder = item.folder(study_dir)
    note = folder.with_suffix(".json")
    if (folder / MARKERS[item.kind]).is_file() and note.is_file() and json.loads(note.read_text())["args"] == list(item.args):
        print(f"[study] reusing {folder} (built with the same arguments)")
        return None
    log = study_dir / "logs" / f"{item.kind}-{item.key}.log"
    print(f"[study] building {folder} (log {log})")
    command = [sys.executable, str(BUILD_SCRIPTS[item.kind]), "--output_dir", str(folder), "--overwrite", *item.args]
    note.unlink(missing_ok=True)
    status, seconds, cpu = call(command, log, env, f"build {item.kind} {item.key}")
    if status == 2:
        raise StudyError(f"{BUILD_SCRIPTS[item.kind].name} refused the arguments of {folder}: {last_line(log)}")
    if status != 0:
        return str(log)
    write_text_atomic(note, json.dumps(dict(args=list(item.args), seconds=seconds, cpu_seconds=cpu), indent=1))
    return None


def prepare(runs: list[Run], study_dir: Path, env: dict) -> dict[str, str]:
    """Every dataset, then every base model, the runs need, each once; {run name: log of its failed build}."""
    failed, broken = {}, {}
    for kind in ("data", "base"):
        items = {}
        for run in runs:
            item = run.dataset if kind == "data" else run.base
            if item is not None:
                items.setdefault(item.key, (item, []))[1].append(run)
        for item, users in items.values():
            if kind == "base" and users[0].dataset and users[0].dataset.key in broken:
                continue  # its dataset failed: the runs are already marked
            log = build(item, study_dir, env)
            if log:
                broken[item.key] = log
                failed.update({run.name: log for run in users})
    return failed


# ---------------------------------------------------------------------------------------------------------------
# One run

def asked_steps(eval_args: list[str], steps: set[int], last: int) -> set[int]:
    """The checkpoint steps evaluation covers: its --checkpoints (last, or a list), else 0 and every checkpoint."""
    if "--checkpoints" in eval_args:
        value = eval_args[eval_args.index("--checkpoints") + 1]
        return {last} if value == "last" else {int(v) for v in value.split(",") if v.strip()}
    return {0} | steps


def run_state(run_dir: Path, eval_args: list[str]) -> str:
    """new, partial, trained or done (module docstring), from the run folder alone."""
    if not (run_dir / run_folder.CONFIG_FILE).is_file():
        return "new"
    last = run_folder.read_config(run_dir).get("max_train_steps")
    steps = set()
    for checkpoint in run_folder.list_checkpoints(run_dir):
        try:
            steps.add(run_folder.checkpoint_step(checkpoint))
        except (ValueError, KeyError, TypeError):
            continue
    if not steps or not isinstance(last, int):
        return "new"
    if last not in steps:
        return "partial"
    eval_dir = run_dir / "eval"
    if not (eval_dir / "summary.json").is_file() or not (eval_dir / "per_sample.csv").is_file():
        return "trained"
    evaluated = set(pd.read_csv(eval_dir / "per_sample.csv", usecols=["checkpoint_step"])["checkpoint_step"])
    return "done" if asked_steps(eval_args, steps, last) <= evaluated else "trained"


@dataclass
class RunTask:
    """Everything one run needs, picklable: a submitit array task, or one step of the local loop."""

    name: str
    study_dir: Path
    train_command: list[str]
    eval_command: list[str]
    eval_args: list[str]
    env: dict

    @property
    def run_dir(self) -> Path:
        """STUDY/runs/NAME, the run's output_dir."""
        return self.study_dir / "runs" / self.name

    @property
    def log(self) -> Path:
        """STUDY/logs/NAME.log, every command of the run and its output."""
        return self.study_dir / "logs" / f"{self.name}.log"

    @property
    def record_path(self) -> Path:
        """STUDY/records/NAME.json, what happened to the run."""
        return self.study_dir / "records" / f"{self.name}.json"

    def __call__(self) -> dict:
        """Run it (what a submitit task calls)."""
        return execute(self)


def write_record(task: RunTask, **fields) -> dict:
    """STUDY/records/RUN.json updated with `fields`; seconds add up over calls."""
    old = json.loads(task.record_path.read_text()) if task.record_path.is_file() else {}
    record = {**old, "run": task.name, "log": str(task.log), **fields}
    for key in ("train_seconds", "train_cpu_seconds", "eval_seconds", "eval_cpu_seconds"):
        record[key] = old.get(key, 0.0) + fields.get(key, 0.0)
    write_text_atomic(task.record_path, json.dumps(record, indent=1))
    return record


def execute(task: RunTask) -> dict:
    """Bring one run to done as its folder needs (train afresh, resume, evaluate, or nothing); its record."""
    state = run_state(task.run_dir, task.eval_args)
    if state == "done":
        print(f"[study] {task.name}: done (evaluated), skipped")
        return write_record(task, status="done", stage=None)
    spent = {}
    if state in ("new", "partial"):
        # finetune.py refuses a folder holding a run unless it resumes that run or is told to start afresh
        extra = ["--resume_from_checkpoint", "latest"] if state == "partial" else ["--overwrite_output_dir"]
        what = "train, resumed from the last checkpoint" if state == "partial" else "train"
        print(f"[study] {task.name}: {what} (log {task.log})")
        status, spent["train_seconds"], spent["train_cpu_seconds"] = call(task.train_command + extra, task.log,
                                                                          task.env, what)
        if status != 0:
            return write_record(task, status="failed", stage="train", exit_status=status, **spent)
    print(f"[study] {task.name}: evaluate (log {task.log})")
    status, spent["eval_seconds"], spent["eval_cpu_seconds"] = call(task.eval_command, task.log, task.env, "evaluate")
    if status != 0 or run_state(task.run_dir, task.eval_args) != "done":
        return write_record(task, status="failed", stage="evaluate", exit_status=status, **spent)
    return write_record(task, status="done", stage=None, exit_status=0, **spent)


def make_task(run: Run, study_dir: Path, executor: dict, env: dict) -> RunTask:
    """The commands of one run: `accelerate launch train/finetune.py ...` and evaluate_checkpoints.py into RUN/eval."""
    run_dir = study_dir / "runs" / run.name
    return RunTask(run.name, study_dir, launcher(executor, ROOT / "train" / "finetune.py") + run.train_args,
                   launcher(executor, SCRIPTS["evaluate"]) + ["--run_dir", str(run_dir), "--output_dir",
                                                              str(run_dir / "eval"), *run.eval_args],
                   run.eval_args, env)


# ---------------------------------------------------------------------------------------------------------------
# Executors: a loop here, or submitit (SLURM array job; its debug executor runs the same tasks in this process)

def run_local(tasks: list[RunTask]) -> None:
    """One run after another (a laptop has no room for two); an exception in one is recorded and the rest go on."""
    for task in tasks:
        try:
            task()
        except Exception as error:  # noqa: BLE001: one run's fault must not stop the study
            write_record(task, status="failed", stage="runner", error=f"{type(error).__name__}: {error}")


def slurm_parameters(executor: dict, name: str) -> dict:
    """submitit SlurmExecutor parameters from the executor section (one node, one task per run)."""
    given = {"partition": "partition", "cpus_per_task": "cpus_per_task", "array_parallelism": "array_parallelism",
             "account": "account", "qos": "qos", "constraint": "constraint", "setup": "setup",
             "additional": "additional_parameters", "time_min": "time"}
    params = {target: executor[key] for key, target in given.items() if executor.get(key) is not None}
    params.update(job_name=executor.get("job_name", f"study-{name}"), nodes=1, ntasks_per_node=1)
    if executor["gpus"]:
        params["gpus_per_node"] = executor["gpus"]
    if executor.get("mem_gb") is not None:
        params["mem"] = f"{executor['mem_gb']}GB"
    return params


def submit(tasks: list[RunTask], executor: dict, study_dir: Path, name: str, aggregate: list[str]) -> dict:
    """Submit the tasks as one array job (submitit batch) and, on SLURM, the aggregation as a job that starts when
    the array has ended (dependency afterany); with kind debug, run them here. The job ids (STUDY/submitted.json)."""
    import submitit

    folder = study_dir / "submitit"
    if executor["kind"] == "debug":
        array = submitit.DebugExecutor(folder)
    else:
        array = submitit.SlurmExecutor(folder=folder)
        array.update_parameters(**slurm_parameters(executor, name))
    with array.batch():
        jobs = [array.submit(task) for task in tasks]
    submitted = dict(kind=executor["kind"], runs=[task.name for task in tasks], jobs=[job.job_id for job in jobs])
    if executor["kind"] == "debug":
        for job in jobs:
            job.result()
    elif jobs:
        after = submitit.SlurmExecutor(folder=folder)
        cpu_only = {**slurm_parameters({**executor, "gpus": 0}, name), "job_name": f"study-{name}-aggregate"}
        after.update_parameters(**cpu_only, dependency=f"afterany:{jobs[0].job_id.split('_')[0]}")
        submitted["aggregate_job"] = after.submit(submitit.helpers.CommandFunction(aggregate, cwd=ROOT)).job_id
    write_text_atomic(study_dir / "submitted.json", json.dumps(submitted, indent=1))
    return submitted
