"""One run per folder: training into a folder that holds a run (refused, resumed only by the same flags and dataset,
or started afresh), resuming from a cut checkpoint, evaluation checking each checkpoint's weights against its rows,
and the launcher's exit statuses (train/launch.py). Every refusal is checked for its status, its one line and the
folder left as it was; the runs are copies of the shared tiny run (conftest.trained_run)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import ROOT, reset_accelerate_state, tree_hashes

from eval import evaluate_checkpoints
from mem_analysis import run
from train import finetune

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

LAUNCH = [sys.executable, "train/launch.py", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no", "train/finetune.py"]
EVAL_ARGS = ["--num_seeds", "2", "--num_inference_steps", "2", "--bootstrap", "20", "--probe_noise_draws", "1",
             "--max_samples", "4", "--checkpoints", "2,4"]


def flags(model, data, output_dir, *extra) -> list[str]:
    """The flags that made conftest.trained_run, into `output_dir`, plus `extra`."""
    return ["--config", str(ROOT / "configs" / "finetune_tiny.yaml"), "--pretrained_model_name_or_path", str(model),
            "--train_data_dir", str(data), "--output_dir", str(output_dir), "--max_train_steps", "4",
            "--checkpointing_steps", "2", "--probe_steps", "2", "--learning_rate", "1e-3", *map(str, extra)]


def refusal(capsys, argv) -> str:
    """finetune.py's one stderr line for `argv`, checked to be its only line and to come with exit status 2."""
    try:
        code = finetune.cli(argv)
    except SystemExit as exit_:  # argparse's errors (mem_analysis.cli.OneLineParser)
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("finetune.py: error: "), (code, err)
    return err.strip()


def cut_in_half(path: Path) -> None:
    """Truncate a file to half its length (a copy interrupted by a full disk or a kill)."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def drop_fingerprints(run_dir: Path) -> None:
    """Make a run look trained before runs recorded their fingerprint."""
    (run_dir / run.RUN_FILE).unlink()
    for checkpoint in run.list_checkpoints(run_dir):
        state = run.read_training_state(checkpoint)
        state.pop("run_fingerprint")
        (checkpoint / run.STATE_FILE).write_text(json.dumps(state))


# case -> (change to the copied run, extra flags, message; RUN is the copy's path)
CASES = {
    "trained again": (None, (), "--output_dir RUN already holds a run (cache, checkpoint-2, checkpoint-4, config.yaml, "
                      "...); continue it with --resume_from_checkpoint latest, start afresh with --overwrite_output_dir "
                      "(deletes it), or choose another --output_dir"),
    "resumed with other flags": (None, ("--learning_rate", "5e-4", "--resume_from_checkpoint", "latest"),
                                 "--output_dir RUN holds another run (learning_rate 0.001 -> 0.0005); resume it with"),
    "resumed on another dataset": ("other dataset", ("--resume_from_checkpoint", "latest"),
                                   "holds another run (another dataset (its manifest differs))"),
    "resumed from cut weights": ("cut weights", ("--resume_from_checkpoint", "latest"),
                                 "--resume_from_checkpoint latest: RUN/checkpoint-4/unet/diffusion_pytorch_model."
                                 "safetensors is cut short or unreadable (Error while deserializing header: incomplete "
                                 "metadata, file not fully covered); delete RUN/checkpoint-4 to resume from "
                                 "RUN/checkpoint-2 (or give that folder)"),
    "resumed from a cut optimizer": ("cut optimizer", ("--resume_from_checkpoint", "RUN/checkpoint-2"),
                                     "--resume_from_checkpoint RUN/checkpoint-2: RUN/checkpoint-2/optimizer.bin is cut "
                                     "short or unreadable (its zip directory is missing); delete RUN/checkpoint-2 and "
                                     "start afresh"),
    "another run's checkpoint": ("empty", ("--learning_rate", "5e-4", "--resume_from_checkpoint",
                                           "RUN/../run/checkpoint-2"), "was made by other flags or another dataset"),
    "a missing checkpoint": (None, ("--resume_from_checkpoint", "RUN/checkpoint-9"),
                             "--resume_from_checkpoint RUN/checkpoint-9: no complete checkpoint there (expected a "
                             "checkpoint-N folder with training_state.json); give one, or 'latest'"),
    "resume and fresh start": (None, ("--overwrite_output_dir", "--resume_from_checkpoint", "latest"),
                               "--overwrite_output_dir starts the run afresh and --resume_from_checkpoint continues "
                               "it; give one of them"),
    "a run without fingerprint": ("no fingerprint", ("--resume_from_checkpoint", "latest"),
                                  "holds a run that records no fingerprint (no run.json"),
    "a fresh start from inside the run": ("cwd", ("--overwrite_output_dir",),
                                          "RUN holds the current folder, which a fresh start would move away; run "
                                          "the command from outside it"),
    "output_dir is a file": ("file", (), "--output_dir RUN is a file; choose a folder path"),
    "a mistyped flag": (None, ("--learnin_rate", "1"), "unrecognized arguments: --learnin_rate 1 (see --help)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_folder_holding_a_run_is_used_only_by_that_run(case, trained_run, tiny_model_dir, tiny_dataset_dir,
                                                         tmp_path, capsys, monkeypatch):
    change, extra, message = CASES[case]
    target = shutil.copytree(trained_run, tmp_path / "run")
    data = tiny_dataset_dir
    if change == "other dataset":
        data = shutil.copytree(tiny_dataset_dir, tmp_path / "data")
        (data / "manifest.json").write_text((data / "manifest.json").read_text() + "\n")
    elif change == "cut weights":
        cut_in_half(target / "checkpoint-4" / "unet" / "diffusion_pytorch_model.safetensors")
    elif change == "cut optimizer":
        cut_in_half(target / "checkpoint-2" / "optimizer.bin")
    elif change == "no fingerprint":
        drop_fingerprints(target)
    elif change == "empty":
        target = tmp_path / "new"
        target.mkdir()
    elif change == "cwd":
        monkeypatch.chdir(target / "logs")
    elif change == "file":
        target = tmp_path / "a_file"
        target.write_text("not a folder")
    before = tree_hashes(tmp_path)
    extra = [str(value).replace("RUN", str(target)) for value in extra]
    line = refusal(capsys, flags(tiny_model_dir, data, target, *extra))
    assert message.replace("RUN", str(target)) in line
    assert tree_hashes(tmp_path) == before


def evaluate(capsys, run_dir: Path, out: Path) -> tuple[str, pd.DataFrame]:
    """evaluate_checkpoints.py in this process on checkpoints 2 and 4: (its stdout, per_sample.csv)."""
    reset_accelerate_state()
    code = evaluate_checkpoints.cli(["--run_dir", str(run_dir), "--output_dir", str(out), "--logging_dir",
                                     str(out.parent / "tb"), *EVAL_ARGS])
    reset_accelerate_state()
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    return stdout, pd.read_csv(out / "per_sample.csv")


MEASURED = ["loss_cond", "loss_cfg", "k_cfg", "severity", "D_x", "D_T", "diversity"]


def test_replaced_weights_are_evaluated_again_and_a_fresh_start_leaves_nothing_of_the_old_run(
        trained_run, tiny_model_dir, tiny_dataset_dir, tmp_path, capsys):
    """The issue's mixed run, end to end: tables never keep rows of weights that are no longer in the run."""
    run_dir, out = shutil.copytree(trained_run, tmp_path / "run"), tmp_path / "eval" / "tables"
    _, first = evaluate(capsys, run_dir, out)
    assert set(first.checkpoint_step) == {2, 4} and (first.caption_tokens_cut == 0).all()

    # checkpoint-2 now holds other weights (checkpoint-4's): its rows are measured again, on those weights
    for source in (run_dir / "checkpoint-4" / "unet").iterdir():
        shutil.copy(source, run_dir / "checkpoint-2" / "unet" / source.name)
    stdout, second = evaluate(capsys, run_dir, out)
    assert f"re-evaluating checkpoint-2 (step 2): its weights changed since its rows in {out} were written" in stdout
    assert f"skipping checkpoint-4 (step 4): already evaluated in {out}" in stdout
    at = {step: second[second.checkpoint_step == step].reset_index(drop=True) for step in (2, 4)}
    pd.testing.assert_frame_equal(at[2][MEASURED], at[4][MEASURED])  # same weights, same seeds: same numbers
    assert not first[first.checkpoint_step == 2].reset_index(drop=True)[MEASURED].equals(at[2][MEASURED])
    assert set(at[2].checkpoint_id) == {run.checkpoint_identity(run_dir / "checkpoint-2")}

    # training into the run again is refused and changes nothing
    (run_dir / "notes.txt").write_text("the user's own file")
    before = tree_hashes(run_dir)
    assert "already holds a run" in refusal(capsys, flags(tiny_model_dir, tiny_dataset_dir, run_dir))
    assert tree_hashes(run_dir) == before

    # an explicit fresh start (same flags but a shorter run) removes every file of the old run first
    old = {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in run_dir.rglob("*")
           if path.is_file() and path.name != "notes.txt"}
    assert finetune.cli(flags(tiny_model_dir, tiny_dataset_dir, run_dir, "--overwrite_output_dir",
                              "--max_train_steps", "2")) == 0
    assert "fresh start in" in capsys.readouterr().out
    kept = [path for path, stamp in old.items() if path.exists() and (path.stat().st_ino, path.stat().st_mtime_ns)
            == stamp]
    assert kept == [] and (run_dir / "notes.txt").read_text() == "the user's own file"
    assert [p.name for p in run.list_checkpoints(run_dir)] == ["checkpoint-2"]
    assert not list(tmp_path.glob(".run.trash-*"))

    # the evaluation drops the rows of the vanished checkpoint-4 and measures the new checkpoint-2
    (out.parent / "tb").exists() and shutil.rmtree(out.parent / "tb")
    reset_accelerate_state()
    code = evaluate_checkpoints.cli(["--run_dir", str(run_dir), "--output_dir", str(out), "--logging_dir",
                                     str(out.parent / "tb"), *EVAL_ARGS[:-2], "--checkpoints", "2"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert f"dropping the rows of step(s) 4 from {out}: their checkpoint folders are gone" in stdout
    assert "re-evaluating checkpoint-2 (step 2)" in stdout
    third = pd.read_csv(out / "per_sample.csv")
    assert set(third.checkpoint_step) == {2} and not (out / "curves" / "step-4.npz").exists()
    assert set(third.checkpoint_id) == {run.checkpoint_identity(run_dir / "checkpoint-2")}


def test_launch_ends_bad_input_in_one_line_and_status_2(tiny_model_dir, tiny_dataset_dir, tmp_path):
    """train/launch.py: a mistyped flag is refused before any process starts; a bad dataset that only the
    training process finds ends the launch with that process's status and line (no traceback)."""
    import datasets

    argv = flags(tiny_model_dir, tiny_dataset_dir, tmp_path / "run")
    splits = datasets.load_from_disk(str(tiny_dataset_dir))
    datasets.DatasetDict(train=splits["train"], probe=splits["probe"].select([])).save_to_disk(tmp_path / "data")
    no_probe = flags(tiny_model_dir, tmp_path / "data", tmp_path / "run")
    for extra, line in ((argv + ["--learnin_rate", "1"], "unrecognized arguments: --learnin_rate 1 (see --help)"),
                        (no_probe, f"{tmp_path / 'data'} split(s) ['probe'] hold no rows")):
        done = subprocess.run([*LAUNCH, *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
        errors = [text for text in done.stderr.splitlines() if "error" in text.lower() or "Traceback" in text]
        assert done.returncode == 2 and len(errors) == 1, done.stderr[-2000:]
        assert errors[0].startswith("finetune.py: error: ") and line in errors[0]
    assert not (tmp_path / "run").exists()


def test_resume_check_is_bitwise_or_against_the_spread_of_two_identical_runs():
    """bench/real_architecture_cpu.py's comparison of resumed and uninterrupted weights."""
    from bench.real_architecture_cpu import SPREAD_FACTOR, resume_check

    weights = {"a": torch.zeros(3, 2), "b": torch.ones(4)}
    nudged = {"a": torch.tensor([[0, 0], [0, 3e-8], [0, 0]]), "b": torch.ones(4)}
    assert resume_check(weights, {k: v.clone() for k, v in weights.items()})["passed"]
    failed = resume_check(weights, nudged)
    assert not failed["passed"] and failed["check"] == "bitwise" and failed["values_differing_resumed"] == 1
    assert failed["max_abs_resumed"] == pytest.approx(3e-8)
    twin = {"a": torch.full((3, 2), 6e-8), "b": torch.ones(4)}
    spread = resume_check(weights, nudged, twin)
    assert spread["passed"] and spread["check"] == "spread of two identical uninterrupted runs"
    assert spread["max_abs_twin"] == pytest.approx(6e-8) and spread["values_differing_twin"] == 6
    off_by_a_step = {"a": torch.full((3, 2), 1e-5), "b": torch.ones(4)}  # a wrong batch moves weights by an update
    assert 1e-5 > SPREAD_FACTOR * 6e-8 and not resume_check(weights, off_by_a_step, twin)["passed"]
    assert not resume_check(weights, nudged, {k: v.clone() for k, v in weights.items()})["passed"]  # equal twins
