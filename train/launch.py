"""`accelerate launch` with the project's exit statuses: bad input is one line and status 2, before any process starts.

    python train/launch.py [accelerate launch flags] train/finetune.py [flags]

It takes exactly `accelerate launch`'s arguments (accelerate's own parser) and calls accelerate's launcher, with
two differences. For train/finetune.py the flags, dataset, run folder and checkpoint to resume are checked first
(train/finetune_config.preflight): bad input prints `finetune.py: error: ...` and exits 2 before any process is
started. And a process that fails ends the launch with that process's own exit status (2 bad input, 1 a failed
run) after its own one line, instead of accelerate's traceback (`subprocess.CalledProcessError` for one process,
torchrun's `ChildFailedError` report for several), which turns every failure into status 1.
"""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from accelerate.commands.launch import launch_command, launch_command_parser
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from mem_analysis.cli import BAD_INPUT, FAILED, report_error
from train.finetune_config import ConfigError, preflight

CHECKS = {"finetune.py": preflight}  # script name -> its check of the flags, run before any process starts


def child_status(prog: str, status: int) -> int:
    """The launch's exit status for a process that ended with `status` (negative: killed by a signal)."""
    if status > 0:
        return status  # the process has printed its own line
    report_error(prog, f"a process was stopped by signal {-status}")
    return FAILED


def main(argv=None) -> int:
    args = launch_command_parser().parse_args(argv)
    prog = Path(args.training_script).name
    if prog in CHECKS:
        try:
            CHECKS[prog](args.training_script_args)
        except ConfigError as err:
            report_error(prog, str(err))
            return BAD_INPUT
    # torchrun logs each failed worker and the signals it sends to the others; the worker's own line says why.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        launch_command(args)
    except subprocess.CalledProcessError as err:
        return child_status(prog, err.returncode)
    except ChildFailedError as err:
        return child_status(prog, err.get_first_failure()[1].exitcode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
