"""eval/evaluate_checkpoints.py on a tiny run trained in the test (real accelerate launches).

One module-scoped run (base model + checkpoint-2 + checkpoint-4) is evaluated three times:
single process with checkpoint-4 corrupted, again once it is repaired (a resume), and
2-process sharded.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eval import evaluate_checkpoints as ev

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "eval" / "evaluate_checkpoints.py"
ACCELERATE = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
# Tiny settings: 2 seeds, 4 DDIM steps, a g sweep of two scales, few bootstrap resamples.
EVAL_ARGS = ["--num_seeds", "2", "--num_inference_steps", "4", "--guidance_scales", "1,7.5", "--bootstrap", "50",
             "--batch_size", "16"]
NUM_PROBE, SEEDS, SCALES, STEPS = 8, 2, 2, (0, 2, 4)
FIGURES = ("severity_over_training.png", "deviation_vs_severity.png", "decomposition_schedule.png",
           "losses_over_training.png", "generated_vs_training.png")


def run(cmd, env_extra=None, check=True) -> subprocess.CompletedProcess:
    """Run a command from the repository root; show its output when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}  # 2 threads spin badly on a loaded machine
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def evaluate(run_dir, out_dir, *extra, check=True) -> subprocess.CompletedProcess:
    """Single-process evaluation of `run_dir` into `out_dir` (TensorBoard beside it)."""
    return run([sys.executable, SCRIPT, "--run_dir", run_dir, "--output_dir", out_dir,
                "--logging_dir", Path(out_dir) / "tb", *EVAL_ARGS, *extra], check=check)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, tiny_dataset_dir) -> Path:
    """A 4-step full fine-tuning run with checkpoints at steps 2 and 4 and probes on."""
    out = tmp_path_factory.mktemp("eval") / "run"
    run(ACCELERATE + ["--num_processes", "1", ROOT / "train" / "finetune.py", "--config",
                      ROOT / "configs" / "finetune_tiny.yaml", "--pretrained_model_name_or_path", tiny_model_dir,
                      "--train_data_dir", tiny_dataset_dir, "--output_dir", out, "--max_train_steps", "4",
                      "--checkpointing_steps", "2", "--probe_steps", "2", "--learning_rate", "1e-3"])
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-4"}
    return out


@pytest.fixture(scope="module")
def single(trained_run, tmp_path_factory):
    """Evaluate with checkpoint-4 corrupted (it is skipped), then repaired: the rerun evaluates only step 4."""
    out = tmp_path_factory.mktemp("single") / "eval"
    weights = trained_run / "checkpoint-4" / "unet" / "diffusion_pytorch_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"not a safetensors file")
    try:
        first = evaluate(trained_run, out)
    finally:
        weights.write_bytes(good)
    before = pd.read_csv(out / "per_sample.csv")
    summary = json.loads((out / "summary.json").read_text())
    second = evaluate(trained_run, out)
    return dict(out=out, first=first, second=second, before=before, first_summary=summary)


def test_tables_hold_every_probe_sample_seed_and_checkpoint(single, tiny_dataset_dir):
    from mem_analysis.data import load_study_dataset

    out = single["out"]
    probe_ids = set(load_study_dataset(tiny_dataset_dir)["probe"]["sample_id"])
    per_seed, per_sample = pd.read_csv(out / "per_seed.csv"), pd.read_csv(out / "per_sample.csv")
    assert len(per_seed) == len(STEPS) * NUM_PROBE * SEEDS * SCALES
    assert len(per_sample) == len(STEPS) * NUM_PROBE * SCALES
    for step in STEPS:
        for g in (1.0, 7.5):
            rows = per_seed[(per_seed.checkpoint_step == step) & (per_seed.guidance_scale == g)]
            assert set(rows.sample_id) == probe_ids and rows.groupby("sample_id").seed.nunique().eq(SEEDS).all()
    required = ["checkpoint_step", "sample_id", "dup_factor", "guidance_scale", "severity", "memorized_fraction",
                "loss_cond", "loss_uncond", "loss_cfg", "k_cond", "k_cfg", "D_x", "D_T", "wen_magnitude", "diversity",
                "loss_cfg_early", "k_cfg_early", "D_x_early", "D_T_early", "D_x_exact", "D_T_exact"]
    assert not per_sample[required].isna().any().any()
    for backend in ("pixel_cosine", "ssim", "l2", "nn_identity", "latent_cosine"):
        assert per_seed[f"sev_{backend}"].notna().all()
    # severity is the headline back end's mean over seeds; loss_cfg is at the row's own scale
    means = per_seed.groupby(["checkpoint_step", "guidance_scale", "sample_id"])["sev_pixel_cosine"].mean()
    merged = per_sample.set_index(["checkpoint_step", "guidance_scale", "sample_id"])
    np.testing.assert_allclose(merged["severity"], means.loc[merged.index], rtol=1e-6, atol=1e-9)
    for g, key in ((1.0, "1"), (7.5, "7.5")):
        rows = per_sample[per_sample.guidance_scale == g]
        np.testing.assert_array_equal(rows["loss_cfg"], rows[f"loss_cfg_{key}"])
    # the base model's probe losses equal no checkpoint's: the weights really changed
    base, last = (per_sample[(per_sample.checkpoint_step == s) & (per_sample.guidance_scale == 7.5)].sort_values("sample_id")
                  for s in (0, 4))
    assert not np.allclose(base["loss_cond"], last["loss_cond"])
    pd.testing.assert_frame_equal(pd.read_parquet(out / "per_sample.parquet"), per_sample, check_dtype=False)
    # TensorBoard scalars at each checkpoint's global_step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb")).Reload()
    assert [e.step for e in events.Scalars("eval/severity/dup_8")] == list(STEPS)


def test_probe_losses_equal_the_training_probes_at_the_same_step(single, trained_run):
    """Same probe noise (run's probe_seed), latents and mu: M1/M2 at checkpoint-4 = probes.jsonl at step 4."""
    probes = pd.read_json(trained_run / "probes.jsonl", lines=True)
    train_means = probes[probes.step == 4].groupby("sample_id")[["loss_cond", "loss_cfg_7.5", "k_cfg_7.5"]].mean()
    table = pd.read_csv(single["out"] / "per_sample.csv")
    rows = table[(table.checkpoint_step == 4) & (table.guidance_scale == 7.5)].set_index("sample_id")
    for column in train_means.columns:
        np.testing.assert_allclose(rows.loc[train_means.index, column], train_means[column], rtol=1e-4, atol=1e-6)


def test_corrupted_checkpoint_is_skipped_and_the_others_evaluated(single):
    assert "skipping checkpoint-4: cannot load its weights" in single["first"].stderr
    assert set(single["before"].checkpoint_step) == {0, 2}
    assert single["first_summary"]["skipped_checkpoints"] == ["checkpoint-4"]


def test_rerun_skips_checkpoints_already_done(single):
    second, out = single["second"], single["out"]
    for step in (0, 2):
        assert f"(step {step}): already evaluated" in second.stdout
    after = pd.read_csv(out / "per_sample.csv")
    assert set(after.checkpoint_step) == set(STEPS)
    pd.testing.assert_frame_equal(after[after.checkpoint_step < 4].reset_index(drop=True), single["before"])


def test_two_process_sharded_evaluation_equals_single_process(single, trained_run, tmp_path):
    out = tmp_path / "sharded"
    run(ACCELERATE + ["--multi_gpu", "--num_processes", "2", SCRIPT, "--run_dir", trained_run, "--output_dir", out,
                      "--logging_dir", tmp_path / "tb", *EVAL_ARGS],
        env_extra=dict(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1"))
    for table in ("per_seed.csv", "per_sample.csv"):
        a, b = pd.read_csv(single["out"] / table), pd.read_csv(out / table)
        assert list(a.columns) == list(b.columns) and len(a) == len(b)
        numeric = a.select_dtypes("number").columns
        np.testing.assert_allclose(b[numeric].to_numpy(float), a[numeric].to_numpy(float), rtol=1e-3, atol=1e-4)


def test_figures_and_report_numbers_equal_the_tables(single):
    out = single["out"]
    for name in FIGURES:
        assert (out / "figures" / name).stat().st_size > 1000
    text = (out / "report.md").read_text()
    for name in FIGURES:
        assert f"figures/{name}" in text
    table = pd.read_csv(out / "per_sample.csv")
    headline = table[table.guidance_scale == 7.5]
    for (step, dup), sev in headline.groupby(["checkpoint_step", "dup_factor"])["severity"].mean().items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {step} |") and "dup" not in line)
        assert f"{sev:.3f}" in row.split("|")[2 + sorted(headline.dup_factor.unique()).index(dup)]
    last = headline[headline.checkpoint_step == 4]
    for col in ("D_x", "D_x_exact", "loss_cfg_early", "diversity"):
        r = np.corrcoef(last[col], last["severity"])[0, 1]
        assert f"r = {r:.3f} [" in text, col
    verdicts = [line for line in text.splitlines() if line.startswith(("**1.", "**2.", "**3."))]
    assert len(verdicts) == 3
    assert all(any(v in line for v in ("-- holds", "-- does not hold", "-- cannot be tested")) for line in verdicts)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["checkpoints"]) == {str(s) for s in STEPS}
    assert set(summary["onset"]) == {str(s) for s in last.sample_id}


def test_bad_input_gives_one_line_errors(trained_run, tmp_path, capsys):
    assert ev.cli(["--run_dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evaluate_checkpoints.py: error: --run_dir") and "does not exist" in err and err.count("\n") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(trained_run / "config.yaml", empty / "config.yaml")
    with pytest.raises(ev.EvalError, match="no checkpoint-N folders"):
        ev.main(ev.parse_args(["--run_dir", str(empty)]))
    with pytest.raises(ev.EvalError, match="unknown --severity_backend 'clip'"):
        ev.parse_args(["--run_dir", str(trained_run), "--severity_backend", "clip"])
    with pytest.raises(ev.EvalError, match="does not have"):
        ev.main(ev.parse_args(["--run_dir", str(trained_run), "--checkpoints", "3"]))
    assert not (empty / "eval").exists()


def test_compare_runs_reads_each_runs_own_tables(single, trained_run, tmp_path):
    """Two runs (one evaluated with constant guidance, one with delay:500): compare_runs' numbers are
    those of each run's per_sample.csv and summary.json, and the schedule is recorded in the tables."""
    from eval import compare_runs

    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(trained_run, first, ignore=shutil.ignore_patterns("eval*"))
    shutil.copytree(single["out"], first / "eval")
    shutil.copytree(trained_run, second, ignore=shutil.ignore_patterns("eval*"))
    evaluate(second, second / "eval_delay500", "--guidance_schedule", "delay:500")
    delayed = pd.read_csv(second / "eval_delay500" / "per_sample.csv")
    assert set(delayed["guidance_schedule"]) == {"delay:500"}
    assert json.loads((second / "eval_delay500" / "settings.json").read_text())["guidance_schedule"] == "delay:500"

    import torch

    embedder = tmp_path / "embedder.pt"  # a stand-in for a user's CLIP / Inception TorchScript file
    torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.Flatten())).save(str(embedder))
    out = compare_runs.main(compare_runs.parse_args([str(first), str(second), "--output_dir", str(tmp_path / "cmp"),
                                                     "--bootstrap", "50", "--feature_model", str(embedder),
                                                     "--feature_size", "16"]))
    table = pd.read_csv(out / "comparison.csv")
    assert list(zip(table["run"], table["schedule"])) == [("first", "constant"), ("second", "delay:500")]
    for _, row in table.iterrows():
        folder = Path(row["eval_dir"])
        own = pd.read_csv(folder / "per_sample.csv")
        own = own[(own["guidance_scale"] == 7.5) & (own["checkpoint_step"] == 4)]
        assert row["step"] == 4 and row["mitigation"] == "none"
        for dup, rows in own.groupby("dup_factor"):
            assert row[f"memorized_{dup}x"] == pytest.approx(rows["memorized_fraction"].mean(), abs=1e-12)
            assert row[f"D_x_early_{dup}x"] == pytest.approx(rows["D_x_early"].mean(), abs=1e-12)
            onset = json.loads((folder / "summary.json").read_text())["onset"]
            assert row[f"crossed_{dup}x"] == sum(o["dup_factor"] == dup and o["onset_step"] is not None
                                                 for o in onset.values())
        never = own[own["dup_factor"] == 1]
        assert row["loss_cond_1x"] == pytest.approx(never["loss_cond"].mean(), abs=1e-12)
        assert row["diversity_1x"] == pytest.approx(never["diversity"].mean(), abs=1e-12)
        assert row["loss_cond_1x_low"] <= row["loss_cond_1x"] <= row["loss_cond_1x_high"]
        assert np.isfinite(row["mmd_pixels"]) and row["mmd_n_generated"] == len(never)
        assert np.isfinite(row["frechet_features"]) and np.isfinite(row["mmd_features"])
    # the same model and probe noise: the probe loss is the same under either schedule, the samples are not
    assert table["loss_cond_1x"].iloc[0] == pytest.approx(table["loss_cond_1x"].iloc[1], abs=1e-12)
    report = (out / "report.md").read_text()
    assert "| first | none | constant | 4 |" in report and "| second | none | delay:500 | 4 |" in report
    assert (out / "memorization_vs_cost.png").stat().st_size > 0
    assert compare_runs.cli([str(tmp_path / "missing"), "--output_dir", str(tmp_path / "x")]) == 2
