"""eval/evaluate_checkpoints.py on a tiny run trained in the test (real accelerate launches for 2 processes; the
single-process evaluations call the script's cli in this process).

One module-scoped run (base model + checkpoint-2 + checkpoint-4) is evaluated three times:
single process with checkpoint-4 corrupted, again once it is repaired (a resume), and
2-process sharded.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ACCELERATE, run, run_script

from eval import evaluate_checkpoints as ev
from mem_analysis.run import find_checkpoints

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "eval" / "evaluate_checkpoints.py"
# Tiny settings: 2 seeds, 4 DDIM steps, a g sweep of two scales, few bootstrap resamples; one probe noise
# draw (draw 0, the training probes' noise) so evaluation and training probes can be compared exactly.
EVAL_ARGS = ["--num_seeds", "2", "--num_inference_steps", "4", "--guidance_scales", "1,7.5", "--bootstrap", "50",
             "--batch_size", "16", "--probe_noise_draws", "1"]
NUM_PROBE, SEEDS, SCALES, STEPS = 8, 2, 2, (0, 2, 4)
FIGURES = ("severity_over_training.png", "deviation_vs_severity.png", "decomposition_schedule.png",
           "losses_over_training.png", "generated_vs_training.png", "warning_over_training.png",
           "loss_per_timestep.png")


def evaluate(run_dir, out_dir, *extra, check=True) -> subprocess.CompletedProcess:
    """Single-process evaluation of `run_dir` into `out_dir` (TensorBoard beside it), run in this process (the
    script's cli; the launches are the 2-process ones)."""
    return run_script(ev.cli, ["--run_dir", run_dir, "--output_dir", out_dir, "--logging_dir", Path(out_dir) / "tb",
                               *EVAL_ARGS, *extra], check=check)


@pytest.fixture(scope="module")
def single(trained_run, tmp_path_factory):
    """Evaluate with checkpoint-4 corrupted (it is skipped), then repaired: the rerun evaluates only step 4.
    The run is a copy of trained_run (modification times kept), which other xdist workers may be reading."""
    folder = tmp_path_factory.mktemp("single")
    run_dir, out = folder / "run", folder / "eval"
    shutil.copytree(trained_run, run_dir)
    weights = run_dir / "checkpoint-4" / "unet" / "diffusion_pytorch_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"not a safetensors file")
    try:
        first = evaluate(run_dir, out)
    finally:
        weights.write_bytes(good)
    before = pd.read_csv(out / "per_sample.csv")
    summary = json.loads((out / "summary.json").read_text())
    second = evaluate(run_dir, out)
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
                "loss_cfg_early", "k_cfg_early", "D_x_early", "D_T_early", "D_x_exact", "D_T_exact",
                "loss_cond_x0", "loss_uncond_x0", "loss_cfg_x0", "loss_cfg_x0_early", "loss_cfg_7.5_x0_early",
                "k_cond_uncentred", "k_cfg_uncentred", "k_cfg_uncentred_early", "D_x_centred", "D_T_centred",
                "D_x_mean", "D_T_mean_early", "cos_c_xT_early"]
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
    # D is linear in the weights: the mean over seeds of the per-seed D is the sample's D (every variant)
    seed_means = per_seed.groupby(["checkpoint_step", "guidance_scale", "sample_id"])[
        ["D_x", "D_T_early", "D_x_centred", "D_T_final"]].mean()
    np.testing.assert_allclose(merged[seed_means.columns], seed_means.loc[merged.index], rtol=1e-6, atol=1e-9)
    # the per-step mean over the 4 DDIM steps is the sum / 4
    np.testing.assert_allclose(per_sample["D_x_mean"] * 4, per_sample["D_x"], rtol=1e-9, atol=1e-12)
    # TensorBoard scalars at each checkpoint's global_step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    factors = sorted(per_sample["dup_factor"].unique())
    assert sorted(p.name for p in (out / "tb").iterdir() if p.is_dir()) == [f"dup_{f}" for f in factors]
    for factor in factors:  # one run per factor, the same tags in each
        events = EventAccumulator(str(out / "tb" / f"dup_{factor}")).Reload()
        rows = per_sample[(per_sample.dup_factor == factor) & (per_sample.guidance_scale == 7.5)]
        severity = events.Scalars("eval/severity")
        assert [e.step for e in severity] == list(STEPS)
        expected = rows.groupby("checkpoint_step")["severity"].mean()
        np.testing.assert_allclose([e.value for e in severity], expected.loc[list(STEPS)], rtol=1e-5)
        grids = events.Images("images/training_above_generated")
        assert [e.step for e in grids] == list(STEPS)
        n = rows["sample_id"].nunique()  # the factor's samples side by side, training above generated (96 px each)
        assert (grids[-1].width, grids[-1].height) == (n * 96 + (n + 1) * 2, 2 * 96 + 3 * 2)
    main_events = EventAccumulator(str(out / "tb")).Reload()
    assert main_events.Tags()["tensors"] == ["report/headline/text_summary"]
    headline = main_events.Tensors("report/headline/text_summary")[-1]  # each run writes it at its last checkpoint
    text = headline.tensor_proto.string_val[0].decode()
    source = out / "headline.md" if (out / "headline.md").is_file() else out / "report.md"
    assert headline.step == max(STEPS) and f"step {max(STEPS)}" in text.lower() and text in source.read_text()


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
    summary = json.loads((out / "summary.json").read_text())
    # each verdict follows from its deciding measures' intervals, pooled AND within duplication factor, recomputed
    # here by the rule of docs/findings.md; pooled r is the plain Pearson of the table
    correlations = summary["checkpoints"]["4"]["7.5"]["correlations"]
    lines = text.splitlines()
    for number, key, deciding in ((1, "i", {"loss_cfg_x0_early": 1, "loss_cond_x0_early": -1}),
                                  (2, "ii", {"collapse_early": -1, "cos_diff_xmu_early": -1}),
                                  (3, "iii", {"D_x_early": 1, "D_T_early": 1})):
        at = next(i for i, line in enumerate(lines) if line.startswith(f"**{number}."))
        decided = summary["findings"][key]
        assert list(decided["measures"]) == list(deciding)
        parts = {}
        for col, sign in deciding.items():
            m = decided["measures"][col]
            on_side = lambda v: None if v is None or v["ci_low"] is None else (  # noqa: E731
                v["ci_low"] > 0 if sign > 0 else v["ci_high"] < 0)
            pooled, within = on_side(m["pooled"]), on_side(m["within"])
            parts[col] = ("cannot be tested" if pooled is None or (pooled and within is None) else
                          "does not hold" if not pooled else "holds" if within else "carried by duplication alone")
            assert m["verdict"] == parts[col]
            if key != "i" and correlations[col]["pearson"]["r"] is not None:
                assert m["pooled"]["r"] == pytest.approx(np.corrcoef(last[col], last["severity"])[0, 1], abs=1e-9)
        verdict = lines[at].split(" -- ")[1]
        assert verdict.startswith(decided["verdict"])
        assert summary["headline"]["verdicts"][f"finding_{key}"] == decided["verdict"]
        if key == "i":  # the CFG loss carries it; the conditional loss alone never makes it hold
            cfg, cond = parts["loss_cfg_x0_early"], parts["loss_cond_x0_early"]
            assert decided["verdict"] == ({"holds": "holds" if cond == "holds" else "partly holds"}.get(cfg, cfg))
        else:
            testable = [v for v in parts.values() if v != "cannot be tested"]
            expected = ("cannot be tested" if not testable else "holds" if set(testable) == {"holds"} else
                        "partly holds" if "holds" in testable else "carried by duplication alone"
                        if set(testable) == {"carried by duplication alone"} else "does not hold")
            assert decided["verdict"] == expected
        assert lines[at + 1].startswith("- Decided by ")
    assert set(summary["premise"]["k_uncond_by_dup"]) == {"1", "4", "8"}
    k0 = last.groupby("dup_factor")["k_uncond_early"].mean()
    assert summary["premise"]["k_uncond_by_dup"]["8"] == pytest.approx(k0[8])
    assert summary["reliability"]["D_T"]["n_seeds"] == 2 and "severity" in summary["reliability"]
    headline = (out / "headline.md").read_text()
    assert f"r = {np.corrcoef(last['D_x'], last['severity'])[0, 1]:.3f} [" in headline
    assert set(summary["checkpoints"]) == {str(s) for s in STEPS}
    assert set(summary["onset"]) == {str(s) for s in last.sample_id}
    warning = summary["early_warning"]  # the run's warnings.jsonl against severity
    assert set(warning["auroc_by_step"]) == {str(s) for s in STEPS}  # probes every 2 steps, as checkpoints
    assert set(warning["lead_time"]) == {str(s) for s in last.sample_id}
    assert warning["false_alarms"]["never_duplicated"] == int((last.dup_factor == 1).sum())
    assert "## Early warning from training probes" in text and "**False alarms: " in text


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
    (tmp_path / "a_file").write_text("kept")
    with pytest.raises(ev.EvalError, match=f"--output_dir {tmp_path / 'a_file'} is a file; choose a folder path"):
        ev.main(ev.parse_args(["--run_dir", str(trained_run), "--output_dir", str(tmp_path / "a_file")]))
    assert (tmp_path / "a_file").read_text() == "kept"
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
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- arena:start -->\nold\n<!-- arena:end -->\nrest\n")
    out = compare_runs.main(compare_runs.parse_args([str(first), str(second), "--output_dir", str(tmp_path / "cmp"),
                                                     "--bootstrap", "50", "--feature_model", str(embedder),
                                                     "--feature_size", "16", "--publish", str(tmp_path / "docs"),
                                                     "--readme", str(readme)]))
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
    # published: the outputs copied, the report's main table (and nothing typed) in the README's block
    for name in compare_runs.PUBLISHED:
        assert (tmp_path / "docs" / name).read_bytes() == (out / name).read_bytes()
    block = readme.read_text().split("<!-- arena:start -->\n")[1].split("<!-- arena:end -->")[0]
    rows = [line for line in block.splitlines() if line.startswith("|")]
    assert len(rows) == 4 and all(row in report.splitlines() for row in rows) and "old" not in block
    assert readme.read_text().startswith("intro\n") and readme.read_text().endswith("<!-- arena:end -->\nrest\n")
    unmarked = tmp_path / "plain.md"
    unmarked.write_text("no block\n")
    assert compare_runs.cli([str(first), "--output_dir", str(tmp_path / "y"), "--publish", str(tmp_path / "d2"),
                             "--readme", str(unmarked)]) == 2
    assert not (tmp_path / "y").exists()  # refused before anything was written


def test_checkpoints_last_selects_the_last_checkpoint_only(trained_run):
    every = find_checkpoints(trained_run, None)
    assert len(every) > 2 and find_checkpoints(trained_run, "last") == every[-1:]


def test_warning_eval_reads_any_evaluated_run_and_marks_it_out_of_sample(single, trained_run, tmp_path):
    """eval/warning_eval.py on the tiny run: the frozen warning beside its baselines, the same numbers as the
    evaluation's own summary.json, the sampling monitor read at the latest checkpoint at or before each probe
    step, and the run marked out of sample (it is not the Twemoji demo)."""
    from eval import warning_eval

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("eval*"))
    shutil.copytree(single["out"], run / "eval")
    out = tmp_path / "oos"
    assert warning_eval.cli([str(run), "--output_dir", str(out), "--bootstrap", "50"]) == 0
    b = json.loads((out / "warning_eval.json").read_text())[str(run)]["baselines"]
    assert b["designed_on"] is False and b["seed"] == 0 and b["monitor_seeds"] == 2
    assert {s: e["sampling_checkpoint"] for s, e in b["steps"].items()} == {"0": 0, "2": 2, "4": 4}
    assert b["cost"] == dict(probe=8, sampling=16, vae_decodes=2, ratio=2.0)  # 4 probe t; 2 seeds x 4 DDIM x CFG
    assert set(b["lead"]) == {"memorized", "similarity > 0.5", "similarity > 0.6", "similarity > 0.75",
                              "nearest is paired"}
    summary = json.loads((single["out"] / "summary.json").read_text())["early_warning"]
    assert summary["baselines"]["steps"].keys() == b["steps"].keys()
    assert summary["baselines"]["decision_step"] == b["decision_step"]
    assert summary["figures"]["warning_sampling_to_probe_cost"] == 2.0
    report = (out / "report.md").read_text()
    assert f"| {run} | " in report and "no (out of sample)" in report and "This run is out of sample" in report
    assert "Lead time on the checkpoint grid" in (single["out"] / "report.md").read_text()
    assert warning_eval.cli([str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_compare_runs_reads_wens_filtered_share_per_factor_after_the_unmitigated_onset(tmp_path):
    """Shares written as training writes them (train/wen_filtered_share in logs/finetune/dup_F): the mean over
    the run and over the steps from the unmitigated run's median top-factor onset on, and the target's verdict."""
    from torch.utils.tensorboard import SummaryWriter

    from eval import compare_runs

    run = tmp_path / "wen"
    shares = {64: {100: 0.1, 200: 0.3, 300: 0.6, 400: 0.8}, 1: {100: 0.0, 200: 0.02, 300: 0.04, 400: 0.06}}
    for factor, by_step in shares.items():
        writer = SummaryWriter(str(run / "logs" / "finetune" / f"dup_{factor}"))
        for step, value in by_step.items():
            writer.add_scalar("train/wen_filtered_share", value, step)
        writer.close()
    comparison = pd.DataFrame([dict(run="none", mitigation="none", schedule="constant", median_onset_64x=300.0),
                               dict(run="wen", mitigation="w", schedule="constant", median_onset_64x=np.nan)])
    out = compare_runs.add_wen_shares(comparison, [tmp_path / "none", run], 64)
    wen = out[out.run == "wen"].iloc[0]
    assert wen["wen_onset_step"] == 300.0
    assert wen["wen_filtered_64x"] == pytest.approx(0.45) and wen["wen_filtered_64x_after_onset"] == pytest.approx(0.7)
    assert wen["wen_filtered_1x_after_onset"] == pytest.approx(0.05)
    lines = compare_runs.wen_lines(out, [1, 64])
    assert "| wen | 300 | 0.030 / 0.050 | 0.450 / 0.700 | yes |" in lines
    assert np.isnan(out[out.run == "none"].iloc[0].get("wen_filtered_64x", np.nan))


def test_compare_runs_change_against_the_unmitigated_run_is_paired_over_the_same_samples(tmp_path):
    from eval import compare_runs

    rows = []
    for name, fractions in (("none", [1.0, 0.75, 0.5, 0.25]), ("wen", [0.5, 0.75, 0.0, 0.25])):
        folder = tmp_path / name / "eval"
        folder.mkdir(parents=True)
        pd.DataFrame(dict(checkpoint_step=6, guidance_scale=7.5, sample_id=[1, 2, 3, 4], dup_factor=64,
                          memorized_fraction=fractions)).to_csv(folder / "per_sample.csv", index=False)
        rows.append(dict(run=name, mitigation="none" if name == "none" else "w", schedule="constant",
                         eval_dir=str(folder), guidance_scale=7.5, step=6))
    out = compare_runs.add_differences(pd.DataFrame(rows), 64, 200)
    wen = out[out.run == "wen"].iloc[0]
    # per-sample changes -0.5, 0, -0.5, 0: mean -0.25; every resample's mean lies in [-0.5, 0]
    assert wen["memorized_64x_vs_none"] == pytest.approx(-0.25)
    assert -0.5 <= wen["memorized_64x_vs_none_low"] <= -0.25 <= wen["memorized_64x_vs_none_high"] <= 0.0
    assert compare_runs.vs_none(wen, 64).startswith("-0.250 [")
    assert out[out.run == "none"].iloc[0]["memorized_64x_vs_none"] == 0.0


@pytest.fixture(scope="module")
def heldout(tiny_model_dir, tmp_path_factory):
    """The tiny dataset with 2 images held out of training (dup_factor 0, probe split only), a 2-step run on it and
    its evaluation at the last checkpoint (copy label, the default)."""
    from conftest import TINY_DATASET_ARGS

    from data_scripts import build_duplicated_dataset

    folder = tmp_path_factory.mktemp("heldout")
    build_duplicated_dataset.main(["--output_dir", str(folder / "data"), *TINY_DATASET_ARGS, "--probe_heldout", "2"])
    from train import finetune

    run_script(finetune.cli, ["--config", ROOT / "configs" / "finetune_tiny.yaml", "--pretrained_model_name_or_path",
                              tiny_model_dir, "--train_data_dir", folder / "data", "--output_dir", folder / "run",
                              "--max_train_steps", "2", "--checkpointing_steps", "2", "--probe_steps", "2",
                              "--learning_rate", "1e-3"])
    evaluate(folder / "run", folder / "run" / "eval", "--checkpoints", "last")
    return folder / "run" / "eval"


def test_first_step_gaussian_probe_and_copy_columns_with_heldout_rows(heldout):
    """The new columns, their algebra (k is linear in g; the per-sample values are the means over seeds; the
    memorized fraction is the share of copies, the similarity fraction the share over the threshold), held-out rows
    (no training image: never a copy, no ratio), premise_reference.json and the labels' section of report.md."""
    from safetensors.torch import load_file

    per_seed, per_sample = pd.read_csv(heldout / "per_seed.csv"), pd.read_csv(heldout / "per_sample.csv")
    settings = json.loads((heldout / "settings.json").read_text())
    assert settings["label"] == "copy" and 0 < settings["copy_ratio"] <= 1
    assert sorted(per_sample["dup_factor"].unique()) == [0, 1, 4, 8] and (per_sample["dup_factor"] == 0).sum() == 2 * 2
    first = ["k0_first", "kc_first", "kg_first"]
    gauss = [f"{k}_gauss{w}" for k in ("k0", "kc", "kg") for w in ("", "_early")]
    assert not per_seed[first + ["copy"]].isna().any().any()
    assert not per_sample[first + gauss + ["memorized_fraction", "similarity_fraction"]].isna().any().any()
    for frame, (k0, kc, kg) in ((per_seed, first), (per_sample, first), (per_sample, gauss[0::2]),
                                (per_sample, gauss[1::2])):
        np.testing.assert_allclose(frame[kg], frame[k0] + frame["guidance_scale"] * (frame[kc] - frame[k0]),
                                   rtol=1e-4, atol=1e-4)
    key = ["checkpoint_step", "guidance_scale", "sample_id"]
    means = per_seed.groupby(key)[first + ["copy"]].mean()
    rows = per_sample.set_index(key)
    np.testing.assert_allclose(rows[first], means.loc[rows.index, first], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows["memorized_fraction"], means.loc[rows.index, "copy"], atol=1e-12)
    over = (per_seed["sev_pixel_cosine"] > settings["threshold"]).groupby([per_seed[k] for k in key]).mean()
    np.testing.assert_allclose(rows["similarity_fraction"], over.loc[rows.index], atol=1e-12)
    # the copy label is the ratio test; a copy's nearest training image is the paired one; held-out: never a copy
    np.testing.assert_array_equal(per_seed["copy"], (per_seed["copy_ratio"] < settings["copy_ratio"]).astype(float))
    assert (per_seed.loc[per_seed["copy"] == 1, "sev_nn_identity"] == 1).all()
    held = per_seed[per_seed["dup_factor"] == 0]
    assert len(held) and (held["copy"] == 0).all() and held["copy_ratio"].isna().all() and (held["sev_nn_identity"] == 0).all()
    assert per_seed.loc[per_seed["dup_factor"] > 0, "copy_ratio"].notna().all()

    reference = json.loads((heldout / "premise_reference.json").read_text())
    assert set(reference["k0_forward"]) == {"training", "0", "1", "4", "8"}
    assert reference["first_step"]["timestep"] == 1000 // 4 * 3 + 1  # DDIM 4 steps (steps_offset 1): 751, 501, 251, 1
    assert abs(reference["first_step"]["k0_mean"]["training"]) < 0.1 < reference["k0_forward"]["training"][0]
    saved = load_file(str(heldout / "premise_latents.safetensors"))
    assert sorted(saved["probe_dup_factors"].tolist()) == sorted(per_sample.drop_duplicates("sample_id")["dup_factor"])
    assert int(saved["pool_counts"].sum()) == 68 - 2  # the two held-out images left train

    summary = json.loads((heldout / "summary.json").read_text())
    agreement = summary["label_agreement"]
    last = per_sample[(per_sample.guidance_scale == 7.5)]
    assert set(agreement) == {"0", "1", "4", "8"} and agreement["0"]["copy"] == 0 and agreement["0"]["samples"] == 2
    for dup, rows_ in last.groupby("dup_factor"):
        assert agreement[str(dup)]["copy"] == int((rows_["memorized_fraction"] >= 0.5).sum())
        assert agreement[str(dup)]["similarity"] == int((rows_["similarity_fraction"] >= 0.5).sum())
    assert set(summary["first_step_pooled"]) == {"0", "1", "4", "8"}
    onset = summary["onset"]
    for sid, o in onset.items():  # the first checkpoint at which the sample is memorized by the copy label
        memorized = last[(last.sample_id == int(sid)) & (last.memorized_fraction >= 0.5)]
        assert o["onset_step"] == (int(memorized["checkpoint_step"].min()) if len(memorized) else None)
    text = (heldout / "report.md").read_text()
    assert "| dup_factor | samples | copy | similarity | NN identity |" in text
    assert "The similarity label and the copy label" in text
