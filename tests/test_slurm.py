"""configs/slurm/finetune_zero2.sbatch rendered for 2 nodes on this machine: `scontrol` and `srun` are
stand-ins (srun starts the task once per node id, here on one host), and the launch line the script
builds really runs: two `accelerate launch` under DeepSpeed ZeRO-2, one process each, with
finetune.py --dry_run, so both nodes must join one process group for the plan to print.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "configs" / "slurm" / "finetune_zero2.sbatch"
FAKE_SCONTROL = "#!/bin/bash\nprintf '127.0.0.1\\n127.0.0.2\\n'\n"
# srun with --ntasks-per-node=1 on N nodes: the command once per node, SLURM_NODEID set, all at once.
FAKE_SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" & pids+=($!); done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""


@pytest.mark.slow
def test_rendered_for_two_nodes_the_launch_line_dry_runs_under_zero2(tiny_model_dir, tiny_dataset_dir, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, body in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (fake / name).write_text(body)
        (fake / name).chmod(0o755)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run = tmp_path / "run"
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "node[1-2]", "GPUS_PER_NODE": "1", "MIXED_PRECISION": "no", "MAIN_PORT": str(port),
           "ACCELERATE": str(Path(sys.executable).with_name("accelerate")), "OMP_NUM_THREADS": "1",
           "EXTRA_ARGS": f"--pretrained_model_name_or_path {tiny_model_dir} --train_data_dir {tiny_dataset_dir} "
                         f"--output_dir {run} --mixed_precision no --dry_run"}
    done = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(l for l in done.stdout.splitlines() if l.startswith("launch line (node N of 2)"))
    for part in ("launch --machine_rank N --config_file configs/accelerate/deepspeed_zero2.yaml",
                 "--num_machines 2 --num_processes 2", "--main_process_ip 127.0.0.1",
                 "--deepspeed_multinode_launcher standard", "train/finetune.py --config configs/sd14_full_zero2.yaml"):
        assert part in line, part
    plan = re.findall(r"\[dry run\] .*", done.stdout)
    assert len(plan) == 3  # printed once (main process of node 0): model, data, input cache
    assert "input cache" in plan[2]
    assert "2 process(es), DistributedType.DEEPSPEED" in plan[0]
    assert not run.exists(), "a dry run must write nothing"
    text = SCRIPT.read_text()  # on a cluster: 8 GPU processes a node, started by one task a node
    assert "#SBATCH --gpus-per-node=8" in text and "#SBATCH --ntasks-per-node=1" in text
