"""`make demo` end to end, shortened (configs/demo_test.yaml): data_scripts/demo.sh runs every stage,
every promised output exists, a second run reuses base model and dataset, and the numbers in
report.md equal those recomputed here from the tables (per_sample.csv), not read from summary.json.
"""
from __future__ import annotations

import json

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from mem_analysis.severity import is_memorized

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/demo_test.yaml"
STAGES = ("setup", "dataset", "base_model", "train", "evaluate")

pytestmark = pytest.mark.slow


def run_demo(demo_dir: Path) -> str:
    """bash data_scripts/demo.sh on the shortened config; its stdout (fails with the log tail)."""
    # One thread: two threads per process thrash when the rest of the suite shares the 2 cores.
    env = {**os.environ, "DEMO_CONFIG": CONFIG, "DEMO_DIR": str(demo_dir), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "data_scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One shortened demo run, then a second one over the same folder: (folder, first log, second log)."""
    folder = tmp_path_factory.mktemp("demo") / "demo"
    first = run_demo(folder)
    second = run_demo(folder)
    return folder, first, second


def report_table(report: str, caption: str) -> pd.DataFrame:
    """The step x dup-factor markdown table printed after `caption` in report.md, as floats."""
    lines = report[report.index(caption):].splitlines()[2:]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    factors = [int(h.removeprefix("dup ")) for h in head[1:]]
    return pd.DataFrame([[float(v) for v in r[1:]] for r in rows], index=[int(r[0]) for r in rows], columns=factors)


def test_every_stage_runs_and_every_output_exists(demo):
    folder, log, _ = demo
    for stage in STAGES:
        assert re.search(rf"\[demo\] {stage}: [\d.]+ s wall, [\d.]+ s CPU", log), f"no timing line for {stage}"
    run, evaluation = folder / "run", folder / "run" / "eval"
    config = yaml.safe_load((ROOT / CONFIG).read_text())
    steps = range(config["checkpointing_steps"], config["max_train_steps"] + 1, config["checkpointing_steps"])
    expected = [folder / "base" / "model_index.json", folder / "data" / "manifest.json", run / "config.yaml",
                run / "probes.jsonl", run / "model_index.json", evaluation / "per_sample.csv",
                evaluation / "per_seed.csv", evaluation / "summary.json", evaluation / "report.md",
                evaluation / "headline.md", folder / "timings.txt"]
    expected += [run / f"checkpoint-{s}" / "training_state.json" for s in steps]
    for path in expected:
        assert path.is_file(), f"{path} is missing"
    for tracker in ("finetune", "eval"):
        assert list((run / "logs" / tracker).rglob("events.out.tfevents.*")), f"no TensorBoard events in logs/{tracker}"
    figures = list((evaluation / "figures").glob("*.png"))
    assert figures and all(f.stat().st_size > 1000 for f in figures)
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", (evaluation / "report.md").read_text()):
        assert (evaluation / image).is_file(), f"report.md shows {image}, which is missing"
    table = pd.read_csv(evaluation / "per_sample.csv")
    assert sorted(table["checkpoint_step"].unique()) == [0, *steps]
    assert f"{run / 'eval' / 'report.md'}" in log and f"tensorboard --logdir {run / 'logs'}" in log


def test_second_run_reuses_base_model_and_dataset(demo):
    folder, _, second = demo
    assert "reusing .venv" in second
    assert f"reusing dataset {folder / 'data'}" in second and f"reusing base model {folder / 'base'}" in second
    assert (folder / "run" / "eval" / "report.md").is_file()


def test_report_numbers_equal_the_tables(demo):
    folder, _, _ = demo
    evaluation = folder / "run" / "eval"
    report = (evaluation / "report.md").read_text()
    settings = yaml.safe_load((evaluation / "settings.json").read_text())
    table = pd.read_csv(evaluation / "per_sample.csv")
    table = table[table["guidance_scale"] == settings["guidance_scale"]]
    for caption, column in (("Mean severity per duplication factor", "severity"),
                            ("Memorized fraction of seeds", "memorized_fraction")):
        expected = table.pivot_table(index="checkpoint_step", columns="dup_factor", values=column, aggfunc="mean")
        printed = report_table(report, caption)
        assert list(printed.index) == list(expected.index) and list(printed.columns) == list(expected.columns)
        np.testing.assert_allclose(printed.to_numpy(), expected.to_numpy(), atol=5e-4, err_msg=caption)

    last = table[table["checkpoint_step"] == table["checkpoint_step"].max()]
    for column, row in (("D_x_early", "D_x_early"), ("D_x", "all-steps D_x \\(secondary\\)")):
        r = np.corrcoef(last[column], last["severity"])[0, 1]
        printed_r = re.search(rf"^\| this run \(step \d+\), {row} \| r = (-?[\d.]+)", report, flags=re.M)
        assert printed_r, f"report.md's anchor table does not print the {column} Pearson r"
        assert float(printed_r.group(1)) == pytest.approx(r, abs=5e-4)

    onset_rows = re.findall(r"^\| (\d+) \| (\d+) \| (\d+|never) \| (\d+|never) \|$", report, flags=re.M)
    assert len(onset_rows) == last["sample_id"].nunique()
    for sample_id, dup_factor, onset, _ in onset_rows:
        rows = table[table["sample_id"] == int(sample_id)].sort_values("checkpoint_step")
        assert int(dup_factor) == int(rows["dup_factor"].iloc[0])
        crossed = rows[is_memorized(rows["memorized_fraction"])]["checkpoint_step"]  # the label's majority of seeds
        assert onset == (str(int(crossed.iloc[0])) if len(crossed) else "never")


def test_arena_calibrates_wen_on_the_unmitigated_run_and_compares_both_schedules(demo):
    """data_scripts/arena.sh shortened: none then wen, with wen's threshold read from none's probes;
    delayed guidance evaluated at the last checkpoint only, so its onset is n/a."""
    folder = demo[0]
    env = {**os.environ, "ARENA_CONFIG": CONFIG, "ARENA_DIR": str(folder), "ARENA_MITIGATIONS": "wen none",
           "ARENA_SKIP_SETUP": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "data_scripts/arena.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.index("== train none") < done.stdout.index("== train wen")  # none first, whatever the order
    probes = pd.read_json(folder / "none" / "probes.jsonl", lines=True)
    last = probes[(probes.step == probes.step.max()) & (probes.dup_factor == 1)]
    table = yaml.safe_load((folder / "wen" / "config.yaml").read_text())["mitigation_wen_thresholds"]
    thresholds = json.loads(Path(table).read_text())
    assert thresholds["timesteps"] == sorted(int(t) for t in last["timestep"].unique())
    for t, threshold in zip(thresholds["timesteps"], thresholds["thresholds"]):  # one per probe timestep
        assert threshold == pytest.approx(np.quantile(last[last.timestep == t]["text_magnitude"], 0.95), rel=1e-5)
    comparison = pd.read_csv(folder / "compare" / "comparison.csv")
    wen = comparison[comparison.run == "wen"].iloc[0]
    shares = [wen[f"wen_filtered_{f}x"] for f in sorted(probes.dup_factor.unique()) if f"wen_filtered_{f}x" in wen]
    assert shares and all(0.0 <= v <= 1.0 for v in shares)  # logged per factor, read by compare_runs
    assert sorted(zip(comparison["run"], comparison["schedule"])) == [
        ("none", "constant"), ("none", "delay:700"), ("wen", "constant"), ("wen", "delay:700")]
    delayed = pd.read_csv(folder / "wen" / "eval_delay700" / "per_sample.csv")
    assert set(delayed["checkpoint_step"]) == {6}
    assert comparison[comparison.schedule == "delay:700"].filter(like="median_onset").isna().all().all()
