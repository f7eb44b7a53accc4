"""Shared pytest fixtures (session-scoped: built once per test run, a few seconds in all).

- `tiny_model_dir`: a `tiny` base model folder written by data_scripts/make_base_model.py
  (StableDiffusionPipeline.save_pretrained layout, safetensors; 32 px images, 16x16x4 latents)
  whose VAE was trained for a few seconds on 128 Twemoji images (seed 0), whose
  `vae.config.scaling_factor` is 1/std of their latents, and whose text encoder was trained
  contrastively on those images' names for only 20 steps (tests/test_conditioning.py trains one
  fully). The UNet is untrained.
  Load it with `mem_analysis.sd.load_components(tiny_model_dir)`.
- `tiny_dataset_dir`: a study dataset written by data_scripts/build_duplicated_dataset.py:
  48 Twemoji images at 32 px, `--dup_factors 1,4,8 --samples_per_factor 2`, fixed captions,
  seed 0. Split `train` has 68 rows: 44 images once (2 of them chosen as the factor-1 group),
  2 images x 4 and 2 images x 8 (44 + 8 + 16); split `probe` has the
  4 duplicated images + the 2 factor-1 images + 2 more never-duplicated ones = 8 rows.
  `DIR/manifest.json` records each sample_id's dup_factor, caption and hash.
  Open it with `mem_analysis.data.load_study_dataset(tiny_dataset_dir)`.
- `trained_run`: a 4-step full fine-tuning run of the tiny model on the tiny dataset
  (configs/finetune_tiny.yaml, lr 1e-3) with checkpoints at steps 2 and 4 and probes on.
Treat the folders as read-only: copy them (shutil.copytree) before changing anything.

Under pytest-xdist (`make test`: two workers) each worker has its own session, so these folders are built
through `built_once`: the first worker that needs one builds it in a folder every worker of the run sees,
under a file lock, and the others wait for it and reuse it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

TINY_DATASET_ARGS = ["--source", "twemoji", "--max_images", "48", "--dup_factors", "1,4,8",
                     "--samples_per_factor", "2", "--resolution", "32", "--seed", "0"]
TINY_MODEL_ARGS = ["--preset", "tiny", "--seed", "0", "--max_images", "128", "--vae_steps", "30",
                   "--train_batch_size", "16", "--text_encoder_steps", "20"]


def shared_root(tmp_path_factory) -> Path:
    """A folder of this test run that every xdist worker sees (the workers' base folders' parent), else the
    session's base folder."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(exist_ok=True)
    return root


def built_once(tmp_path_factory, name: str, build) -> Path:
    """SHARED/name, made by `build(folder)` once per test run whatever the number of xdist workers: the first
    worker to ask builds it under a file lock (a build that failed is removed and tried again by the next one to
    ask); the others wait for it and reuse it. Treat it as read-only."""
    from filelock import FileLock

    root = shared_root(tmp_path_factory)
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            if folder.exists():
                shutil.rmtree(folder)
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny base model folder (VAE trained a few seconds, UNet untrained); read-only."""
    from data_scripts import make_base_model

    return built_once(tmp_path_factory, "tiny_model",
                      lambda folder: make_base_model.main(["--output_dir", str(folder), *TINY_MODEL_ARGS]))


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory) -> Path:
    """A small Twemoji study dataset (factors 1,4,8 x 2 samples, 48 images, 32 px); read-only."""
    from data_scripts import build_duplicated_dataset

    return built_once(tmp_path_factory, "tiny_dataset",
                      lambda folder: build_duplicated_dataset.main(["--output_dir", str(folder), *TINY_DATASET_ARGS]))


def reset_accelerate_state() -> None:
    """Reset accelerate's process-wide singletons, so the next in-process run starts as a new process would."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    """Reset accelerate's process-wide state after a test, so each in-process run starts as a new process would."""
    yield
    reset_accelerate_state()


ACCELERATE = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]


def run(cmd, env_extra=None, check=True) -> subprocess.CompletedProcess:
    """Run a command from the repository root; show its output when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}  # 2 threads spin badly on a loaded machine
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_script(cli, argv, check=True) -> subprocess.CompletedProcess:
    """A script's `cli(argv)` (its `__main__` block is `sys.exit(cli())`) in this process, as `run` would give it:
    exit status, stdout and stderr; shows them when it fails. It saves the ~7 CPU-seconds of imports a new Python
    process spends; accelerate's process-wide state and torch's thread count are put back afterwards."""
    import contextlib
    import io

    import torch

    out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    argv = [str(a) for a in argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli(argv)
            except SystemExit as exit_:  # argparse's errors
                code = exit_.code
    finally:
        reset_accelerate_state()
        torch.set_num_threads(threads)
    proc = subprocess.CompletedProcess(argv, code or 0, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model_dir, tiny_dataset_dir) -> Path:
    """A 4-step full fine-tuning run with checkpoints at steps 2 and 4 and probes on; read-only."""
    def train(out: Path) -> None:
        run(ACCELERATE + ["--num_processes", "1", ROOT / "train" / "finetune.py", "--config",
                          ROOT / "configs" / "finetune_tiny.yaml", "--pretrained_model_name_or_path", tiny_model_dir,
                          "--train_data_dir", tiny_dataset_dir, "--output_dir", out, "--max_train_steps", "4",
                          "--checkpointing_steps", "2", "--probe_steps", "2", "--learning_rate", "1e-3"])

    out = built_once(tmp_path_factory, "trained_run", train)
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-4"}
    return out


def tree_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder` by relative path: compared before and after a refused command."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ xdist scheduling
# `make test` distributes whole files (--dist loadfile: a module fixture such as test_demo's demo or test_eval's
# single is made once, by the worker that runs the file; xdist's loadgroup does not group under pytest 9, which
# keeps node ids in Node._id). Files are handed out in collection order, so the files of the longest tests come
# first and neither worker is left with one of them at the end: node-id fragments, longest first (measured with
# --durations on 2 cores); every other test keeps its order.
LONGEST_FIRST = [
    "test_study.py::", "test_finetune_launch.py::", "test_demo.py::", "test_conditioning.py::", "test_gpu.py::",
    "test_finetune.py::", "test_run_folder.py::", "test_input_cache.py::", "test_eval.py::", "test_configs.py::",
    "test_evaluate_prompts.py::",
]


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        return next((i for i, fragment in enumerate(LONGEST_FIRST) if fragment in item.nodeid), len(LONGEST_FIRST))
    items.sort(key=rank)  # stable: the others keep their collection order
