"""A run's early warning judged against sampling: AUROC by probe step beside the baselines, the verdict, the lead
time on the checkpoint grid for several definitions of "memorized", false alarms, and the cost of the probes
against a sampling monitor. Read from the run folder (config.yaml, probes.jsonl, warnings.jsonl) and its
evaluation (settings.json, per_sample.csv, per_seed.csv); eval/report.py's early-warning section and
eval/warning_eval.py (any evaluated run, out of sample) print it. The warning itself is frozen: its features,
null and threshold are those of mem_analysis.early_warning, whatever run it is read on.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from mem_analysis import early_warning, run, verdicts, warning_baselines
from mem_analysis.severity import MEMORIZED_SHARE

MONITOR_SEEDS = 2  # the sampling monitor's seeds per sample and checkpoint (the first ones of per_seed.csv)
SIMILARITY_THRESHOLDS = (0.5, 0.6, 0.75)  # onsets on the similarity scale of the headline severity
COPY_SHARE = 0.5
# The run the warning's features and threshold were chosen on: the Twemoji demo (configs/demo_cpu.yaml's dataset
# line: source twemoji, 900 images, dataset seed 0) trained with seed 0.
DESIGN_DATASET = dict(source="twemoji", max_images=900, seed=0)
DESIGN_TRAINING_SEED = 0
MAIN_LABEL = "memorized"


def memorized_flags(rows: pd.DataFrame, settings: dict) -> np.ndarray:
    """The report's "memorized" per row, the one label of every report (`verdicts.memorized_labels`)."""
    return verdicts.memorized_labels(rows)


def label_flags(rows: pd.DataFrame, settings: dict) -> dict[str, np.ndarray]:
    """Per definition of "memorized", a flag per row: the report's own (MAIN_LABEL), severity over each of
    SIMILARITY_THRESHOLDS, and `nearest is paired`: the nearest training image of the generation is the paired one
    (`sev_nn_identity`, Carlini et al.'s test without the copy label's distance-ratio margin) for at least
    COPY_SHARE of the seeds."""
    flags = {MAIN_LABEL: memorized_flags(rows, settings)}
    flags.update({f"similarity > {t:g}": rows["severity"].to_numpy(float) > t for t in SIMILARITY_THRESHOLDS})
    if "sev_nn_identity" in rows:
        flags["nearest is paired"] = rows["sev_nn_identity"].to_numpy(float) >= COPY_SHARE
    return flags


def onsets_by_label(table: pd.DataFrame, settings: dict) -> tuple[list[int], dict[str, dict[int, int | None]]]:
    """(evaluated checkpoints, {label: {sample_id: first checkpoint at which the label holds, or None}})."""
    table = table.sort_values("checkpoint_step")
    checkpoints = sorted(int(s) for s in table["checkpoint_step"].unique())
    flags = label_flags(table, settings)
    out: dict[str, dict[int, int | None]] = {name: {} for name in flags}
    for sid, rows in table.groupby("sample_id"):
        pick = table.index.get_indexer(rows.index)
        for name, flag in flags.items():
            out[name][int(sid)] = warning_baselines.first_true_step(rows["checkpoint_step"], flag[pick])
    return checkpoints, out


def designed_on(settings: dict, config: dict) -> bool:
    """Whether the warning was designed on this run: the Twemoji demo's dataset (DESIGN_DATASET, read from the
    dataset's manifest.json) trained with seed DESIGN_TRAINING_SEED. Any other dataset or seed is out of sample."""
    path = Path(settings.get("dataset", "")) / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    arguments = manifest.get("arguments", {})
    same_data = (manifest.get("source") == DESIGN_DATASET["source"] and manifest.get("seed") == DESIGN_DATASET["seed"]
                 and arguments.get("max_images") == DESIGN_DATASET["max_images"])
    return same_data and int(config.get("seed", -1)) == DESIGN_TRAINING_SEED


def headline_table(eval_dir: Path, settings: dict) -> pd.DataFrame:
    """per_sample.csv's rows at the headline guidance scale."""
    table = pd.read_csv(eval_dir / "per_sample.csv")
    return table[table["guidance_scale"] == settings["guidance_scale"]]


def monitor(eval_dir: Path, settings: dict, monitor_seeds: int) -> dict[int, dict[int, float]]:
    """The sampling monitor's severity per checkpoint and sample (first `monitor_seeds` seeds at the headline g)."""
    path = eval_dir / "per_seed.csv"
    if not path.is_file():
        return {}
    seeds = pd.read_csv(path)
    seeds = seeds[seeds["guidance_scale"] == settings["guidance_scale"]]
    column = f"sev_{settings['severity_backend']}"
    return warning_baselines.monitor_severity(seeds.to_dict("records"), monitor_seeds, column)


def run_warnings(run_dir) -> tuple[list[dict], dict]:
    """(the run's warnings: warnings.jsonl, else probes.jsonl scored, else [], its config with RUN_DEFAULTS)."""
    run_dir = Path(run_dir)
    config = run.read_config(run_dir) if (run_dir / run.CONFIG_FILE).is_file() else dict(run.RUN_DEFAULTS)
    return early_warning.run_warnings(run_dir, float(config["warning_fpr"]), int(config["high_noise_timestep"])), config


def evaluate_run(run_dir, eval_dir, n_boot: int = 1000, monitor_seeds: int = MONITOR_SEEDS, seed: int = 0,
                 settings: dict | None = None) -> dict | None:
    """Everything the early-warning section reports, or None when the run logged no probes."""
    run_dir, eval_dir = Path(run_dir), Path(eval_dir)
    warnings, config = run_warnings(run_dir)
    fpr, high = float(config["warning_fpr"]), int(config["high_noise_timestep"])
    probes_path = run_dir / run.PROBES_FILE
    if not warnings or not probes_path.is_file():
        return None
    settings = settings or json.loads((eval_dir / "settings.json").read_text())
    table = headline_table(eval_dir, settings)
    last = table[table["checkpoint_step"] == table["checkpoint_step"].max()]
    memorized = dict(zip(last["sample_id"].astype(int), memorized_flags(last, settings)))
    checkpoints, onsets = onsets_by_label(table, settings)
    result = dict(fpr=fpr, **early_warning.evaluate_warning(warnings, memorized, onsets[MAIN_LABEL], n_boot, seed))
    steps = warning_baselines.compare_over_steps(run.read_jsonl(probes_path), warnings,
                                                 monitor(eval_dir, settings, monitor_seeds), memorized, fpr, high,
                                                 n_boot, seed)
    decide_at = warning_baselines.decision_step([int(s) for s in steps], onsets[MAIN_LABEL].values())
    verdict = (warning_baselines.verdict(steps[str(decide_at)]) if decide_at is not None
               else dict(outcome="undefined", best_baseline=None, margin=None))
    first = early_warning.first_alarms([w for w in warnings if int(w["sample_id"]) in memorized])
    dups = dict(zip(last["sample_id"].astype(int), last["dup_factor"].astype(int)))
    result["baselines"] = dict(
        steps=steps, decision_step=decide_at, verdict=verdict, main_label=MAIN_LABEL, monitor_seeds=monitor_seeds,
        lead={name: warning_baselines.lead_times(first, onset, dups, checkpoints) for name, onset in onsets.items()},
        cost=warning_baselines.unet_calls(len(config["probe_timesteps"]), monitor_seeds,
                                          settings["num_inference_steps"], settings["guidance_scale"] != 1),
        main_rule=f"memorized_fraction >= {MEMORIZED_SHARE:g}",
        designed_on=designed_on(settings, config), seed=int(config.get("seed", -1)),
        dataset=settings.get("dataset"), threshold=settings["threshold"])
    return result


def headline_figures(result: dict | None) -> dict[str, float]:
    """The warning's key figures as flat numbers (summary.json, aggregated over training seeds elsewhere)."""
    if not result:
        return {}
    b = result["baselines"]
    out = {f"warning_auroc_step_{s}": e["signals"]["warning"]["auroc"] for s, e in b["steps"].items()
           if "warning" in e["signals"]}
    decide = b["decision_step"]
    if decide is not None:
        entry = b["steps"][str(decide)]
        out["warning_decision_step"] = decide
        for name, e in entry["signals"].items():
            if "margin" in e and e["margin"]["diff"] is not None:
                out[f"warning_margin_over_{name}"] = e["margin"]["diff"]
            for factor, w in (e["within"].items() if name == "warning" else ()):
                out[f"warning_within_auroc_{factor}x"] = w["auroc"]
        margin = b["verdict"]["margin"] or {}
        out.update(warning_margin_over_best_baseline=margin.get("diff"),
                   warning_margin_over_best_baseline_ci_low=margin.get("ci_low"),
                   warning_margin_over_best_baseline_ci_high=margin.get("ci_high"),
                   warning_beats_best_baseline=float(b["verdict"]["outcome"] == "beats"))
    lead = b["lead"][b["main_label"]]["by_factor"]
    top = max(lead, key=int) if lead else None
    if top is not None:
        out[f"warning_lead_low_{top}x"] = lead[top]["median_lead_low"]
        out[f"warning_lead_high_{top}x"] = lead[top]["median_lead_high"]
    out["warning_sampling_to_probe_cost"] = b["cost"]["ratio"]
    return {k: (None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v) for k, v in out.items()}
