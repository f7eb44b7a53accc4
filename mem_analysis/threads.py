"""CPU threads of a training or evaluation process: the cores it may use, shared among the processes of its
machine, unless the user set a count.

`accelerate launch` hands every process OMP_NUM_THREADS, and 1 when the user gave none
(accelerate/commands/launch.py: `num_cpu_threads_per_process = get_int_from_env(["OMP_NUM_THREADS"], 1)`,
exported by accelerate/utils/launch.py; torchrun also sets 1 for several processes), so a laptop run launched
as the README says trains on one core (148 against 74 ms a step measured on 2 cores). A count the user set is
one in the launcher's own starting environment, or its `--num_cpu_threads_per_process` flag; a count that
only the launcher wrote is not the user's and is replaced by the cores available to this process
(`os.sched_getaffinity`) divided by the processes on this machine.
"""
from __future__ import annotations

import os

import torch

# Command-line words of the processes that start training workers and write OMP_NUM_THREADS for them
# (train/launch.py runs accelerate's launcher in its own process).
LAUNCHER_WORDS = ("accelerate", "torch.distributed.run", "torchrun", "deepspeed", "launch.py")
LOCAL_SIZE_VARIABLES = ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE",
                        "MV2_COMM_WORLD_LOCAL_SIZE")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system reports one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def local_processes(environ=None) -> int:
    """Processes of this run on this machine, as the launcher told them (1 without a launcher)."""
    environ = os.environ if environ is None else environ
    for name in LOCAL_SIZE_VARIABLES:
        if str(environ.get(name, "")).isdigit() and int(environ[name]) > 0:
            return int(environ[name])
    return 1


def launcher_settings() -> tuple[bool, bool] | None:
    """(whether a launcher started this process, whether the user set the thread count when launching it):
    OMP_NUM_THREADS in the outermost launcher's starting environment, or --num_cpu_threads_per_process on a
    launcher's command line. None when the parent processes cannot be read (then a set count is trusted)."""
    try:
        import psutil

        launchers, process = [], psutil.Process().parent()
        while process is not None and any(word in " ".join(process.cmdline()) for word in LAUNCHER_WORDS):
            launchers.append(process)
            process = process.parent()
        if not launchers:
            return False, False
        flag = any(arg.startswith("--num_cpu_threads_per_process") for p in launchers for arg in p.cmdline())
        # environ() is the process's starting environment: what the user's shell gave the launcher.
        return True, flag or "OMP_NUM_THREADS" in launchers[-1].environ()
    except Exception:  # noqa: BLE001 - no psutil, no permission, a process gone: fall back to trusting the variable
        return None


def choose_threads(omp_num_threads: str | None, launched: bool, user_set: bool, cores: int, processes: int
                   ) -> tuple[int, str]:
    """(threads per process, why): a count the user set is kept; otherwise the available cores shared
    evenly among the local processes (at least one each)."""
    if omp_num_threads and omp_num_threads.isdigit() and int(omp_num_threads) > 0 and (user_set or not launched):
        return int(omp_num_threads), f"OMP_NUM_THREADS={omp_num_threads} set by you"
    share = max(1, cores // max(1, processes))
    if omp_num_threads and launched:
        why = f"OMP_NUM_THREADS={omp_num_threads} was the launcher's default, not yours"
    else:
        why = "OMP_NUM_THREADS unset"
    return share, f"{why}: {cores} core(s) available / {processes} local process(es)"


def use_cpu_threads(environ=None) -> str:
    """Set torch's intra-op threads by `choose_threads` and return the line that says so."""
    environ = os.environ if environ is None else environ
    settings = launcher_settings()
    launched, user_set = settings if settings is not None else (False, True)
    threads, why = choose_threads(environ.get("OMP_NUM_THREADS"), launched, user_set, available_cores(),
                                  local_processes(environ))
    torch.set_num_threads(threads)
    return f"CPU threads: {threads} per process ({why})"
