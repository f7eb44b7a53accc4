"""CPU threads as users launch training: a count the user set is kept, `accelerate launch`'s default of one
thread is not, and the first line of the run says what it uses (mem_analysis/threads.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ACCELERATE
from mem_analysis.threads import available_cores, choose_threads, local_processes

ROOT = Path(__file__).resolve().parents[1]


def test_a_user_count_is_kept_and_a_launcher_default_replaced_by_the_cores_per_process():
    assert choose_threads("3", launched=False, user_set=False, cores=8, processes=1)[0] == 3  # plain python, set
    assert choose_threads("3", launched=True, user_set=True, cores=8, processes=2)[0] == 3  # set, then launched
    threads, why = choose_threads("1", launched=True, user_set=False, cores=8, processes=2)  # accelerate's default
    assert threads == 4 and "launcher's default" in why
    assert choose_threads(None, launched=False, user_set=False, cores=8, processes=1)[0] == 8
    assert choose_threads(None, launched=True, user_set=False, cores=2, processes=4)[0] == 1  # at least one
    assert choose_threads("0", launched=False, user_set=True, cores=6, processes=3)[0] == 2  # not a count


def test_local_processes_from_the_launchers_variables():
    assert local_processes({}) == 1
    assert local_processes({"LOCAL_WORLD_SIZE": "4"}) == 4
    assert local_processes({"OMPI_COMM_WORLD_LOCAL_SIZE": "2"}) == 2


@pytest.mark.parametrize("launcher,omp", [("accelerate", None), ("accelerate", "1"), ("train/launch.py", None)],
                         ids=["unset", "set_to_1", "project_launcher_unset"])
def test_first_line_of_accelerate_launch_reports_the_threads(tiny_model_dir, tiny_dataset_dir, tmp_path, launcher,
                                                             omp):
    """Without OMP_NUM_THREADS, accelerate launch (also through train/launch.py) hands the process 1; training
    uses the available cores."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if omp is not None:
        env["OMP_NUM_THREADS"] = omp
    start = ACCELERATE if launcher == "accelerate" else [sys.executable, str(ROOT / launcher), *ACCELERATE[2:]]
    done = subprocess.run([*start, "--num_processes", "1", str(ROOT / "train" / "finetune.py"), "--config",
                           str(ROOT / "configs" / "finetune_tiny.yaml"), "--pretrained_model_name_or_path",
                           str(tiny_model_dir), "--train_data_dir", str(tiny_dataset_dir), "--output_dir",
                           str(tmp_path / "run"), "--dry_run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    first = done.stdout.splitlines()[0]
    expected = 1 if omp == "1" else available_cores()
    assert first.startswith(f"CPU threads: {expected} per process ("), first
    assert ("set by you" in first) == (omp is not None)
