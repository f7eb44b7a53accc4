"""A checkpoint evaluation's tables -> summary.json (M7 of docs/science.md): per checkpoint and guidance scale the
correlation of every score with severity and its detection AUROC, each sample's onset, the findings decided by
mem_analysis.verdicts (pooled and within duplication factor), the premise (mem_analysis.premise), the reliability
across seeds, the early warning against what sampling found, and the `headline` block a study runner aggregates.

Pure computation from tables (no figures, no text): eval/markdown.py renders it, eval/figures.py draws it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from eval.tables import last_checkpoint_rows
from mem_analysis import stats, verdicts, warning_evaluation
from mem_analysis.io import write_text_atomic
from mem_analysis.losses import pooled_overestimation
from mem_analysis.premise import premise as decide_premise, reference_from_file
from mem_analysis.severity import is_memorized

# Columns that are identifiers or severity itself, not scores to correlate with severity.
NOT_SCORES = {"checkpoint_step", "checkpoint", "sample_id", "guidance_scale", "severity", "memorized_fraction",
              "similarity_fraction"}


def score_columns(table: pd.DataFrame) -> list[str]:
    """Numeric columns scored against severity (M1-M5 values, Wen's magnitude, duplication)."""
    return [c for c in table.columns if c not in NOT_SCORES and not c.startswith("sev_")
            and pd.api.types.is_numeric_dtype(table[c])]


def correlation(x: np.ndarray, y: np.ndarray, method: str, n_boot: int, seed: int) -> dict:
    """{'r', 'ci_low', 'ci_high', 'n'} or r = None when undefined (constant input, n < 3)."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    # Values equal up to rounding (e.g. D over a window that is pure noise) carry no ranking.
    if len(x) < 3 or stats.is_constant(x) or stats.is_constant(y):
        return dict(r=None, ci_low=None, ci_high=None, n=int(len(x)))
    c = stats.correlation(x, y, method=method, n_bootstrap=n_boot, seed=seed)
    return dict(r=c.r, ci_low=c.low, ci_high=c.high, n=int(c.n))


def detection(scores: np.ndarray, labels: np.ndarray, direction: str = "higher") -> dict:
    """AUROC in the score's stated direction, and TPR at 1% FPR (>= 100 negatives) or at 0 FP (fewer),
    for memorized (label 1) vs not; AUROC and TPR None with one class."""
    ok = np.isfinite(scores)
    scores, labels = scores[ok], labels[ok]
    if len(np.unique(labels)) < 2:
        return dict(auroc=None, tpr=None, tpr_label=None, direction=direction)
    return stats.detection(scores, labels, direction)


def label_rule(settings: dict) -> str:
    """The sample-level memorized label as the report states it (mem_analysis.severity.is_memorized on the
    memorized fraction of `settings['label']`; tables written before the copy label used the similarity one)."""
    if settings.get("label", "similarity") == "copy":
        return (f"copy label: at least half of the seeds are copies, d(paired) / d(nearest other training image) < "
                f"{settings['copy_ratio']:g}")
    return f"similarity label: at least half of the seeds have `{settings['severity_backend']}` > {settings['threshold']:g}"


def summarize(per_sample: pd.DataFrame, settings: dict, n_boot: int = 1000) -> dict:
    """M7 per checkpoint and guidance scale, and the onset of memorization per sample (the first checkpoint at
    which the sample is memorized, mem_analysis.severity.is_memorized)."""
    out = dict(settings=settings, checkpoints={}, onset={}, label_rule=label_rule(settings))
    for (step, g), rows in per_sample.groupby(["checkpoint_step", "guidance_scale"]):
        sev = rows["severity"].to_numpy(float)
        labels = verdicts.memorized_labels(rows).astype(int)  # at least half the seeds (severity.is_memorized)
        entry = dict(n_samples=int(len(rows)), n_memorized=int(labels.sum()),
                     mean_severity=float(sev.mean()), correlations={}, detection={})
        for col in score_columns(rows):
            values = rows[col].to_numpy(float)
            entry["correlations"][col] = {m: correlation(values, sev, m, n_boot, seed=0) for m in ("pearson", "spearman")}
            entry["detection"][col] = detection(values, labels, verdicts.direction(col))
        out["checkpoints"].setdefault(str(int(step)), {})[f"{g:g}"] = entry
    headline = per_sample[per_sample["guidance_scale"] == settings["guidance_scale"]].sort_values("checkpoint_step")
    rise_threshold, reference = deviation_rise_thresholds(headline)
    for sid, rows in headline.groupby("sample_id"):
        steps = rows["checkpoint_step"].to_numpy()
        onset = stats.onset_step(steps, verdicts.memorized_labels(rows).astype(float), 0.5)[0]
        excess = rows["D_x"].to_numpy(float) - rise_threshold.loc[steps].to_numpy(float)
        rise = stats.onset_step(steps, excess, 0.0)[0]
        out["onset"][str(int(sid))] = dict(dup_factor=int(rows["dup_factor"].iloc[0]),
                                           onset_step=None if np.isnan(onset) else int(onset),
                                           deviation_rise_step=None if np.isnan(rise) else int(rise))
    out["deviation_rise_threshold"] = {str(int(k)): float(v) for k, v in rise_threshold.items()}
    out["deviation_rise_reference"] = reference
    return out


def deviation_rise_thresholds(headline: pd.DataFrame) -> tuple[pd.Series, str]:
    """Per checkpoint step, the D_x above which a sample's deviation "rose": mean + 3 sd (across samples)
    of the never-duplicated probe samples at that checkpoint (at least 3 of them), else of the first
    evaluated model. The first evaluated model is a poor reference when its UNet is untrained (its
    D_x spread is wide and every trained model's differs), hence the controls of the same checkpoint."""
    spread = lambda v: v.mean() + 3 * v.std(ddof=0)  # noqa: E731
    steps = sorted(headline["checkpoint_step"].unique())
    controls = headline[headline["dup_factor"] == 1]
    if controls["sample_id"].nunique() >= 3 and set(controls["checkpoint_step"]) == set(steps):
        return (controls.groupby("checkpoint_step")["D_x"].agg(spread),
                "never-duplicated probe samples at the same checkpoint")
    base = headline[headline["checkpoint_step"] == steps[0]]["D_x"]
    return pd.Series(float(spread(base)) if len(base) else math.nan, index=steps), "the first evaluated model"


def decide_findings(summary: dict, settings: dict, last: int, at_last: pd.DataFrame, n_boot: int = 1000) -> dict:
    """{'i' | 'ii' | 'iii': verdict dict} at the last checkpoint and headline guidance scale."""
    entry = summary["checkpoints"][str(last)][f"{settings['guidance_scale']:g}"]
    return {key: verdicts.decide(at_last, entry["correlations"], key, n_boot) for key in verdicts.FINDINGS}


def read_findings(summary: dict, per_sample: pd.DataFrame, per_seed: pd.DataFrame | None, settings: dict,
                  n_boot: int = 1000, premise_reference: dict | None = None) -> dict:
    """summary.json's `findings`, `premise` and `reliability` (None without per_seed.csv), at the last
    checkpoint and headline guidance scale; `premise_reference`: evaluation's premise_reference.json, if any."""
    g = settings["guidance_scale"]
    last, at_last = last_checkpoint_rows(per_sample, g)
    out = dict(findings=decide_findings(summary, settings, last, at_last, n_boot),
               premise=decide_premise(at_last, reference=reference_from_file(premise_reference), n_boot=n_boot),
               reliability=None)
    if per_seed is not None:
        seeds = per_seed[(per_seed["guidance_scale"] == g) & (per_seed["checkpoint_step"] == last)]
        columns = [c for c in seeds.columns if c.startswith(("D_x", "D_T"))]
        out["reliability"] = verdicts.reliability(seeds, at_last, columns, f"sev_{settings['severity_backend']}")
    return out


def headline_block(summary: dict, per_sample: pd.DataFrame, settings: dict) -> dict:
    """summary.json's `headline` (mem_analysis.verdicts.headline_block) at the last checkpoint and headline g."""
    last, at_last = last_checkpoint_rows(per_sample, settings["guidance_scale"])
    return verdicts.headline_block(summary, at_last, last)


def build_summary(eval_dir: Path, per_sample: pd.DataFrame, settings: dict, failed=(), n_boot: int = 1000,
                  run_dir=None) -> tuple[dict, list[dict]]:
    """summary.json of `eval_dir` from its tables (and the run's warnings, from `run_dir`, by default the folder
    above `eval_dir`), written atomically; returns (summary, warnings)."""
    summary = summarize(per_sample, settings, n_boot)
    summary["skipped_checkpoints"] = list(failed)
    run_path = Path(run_dir) if run_dir else eval_dir.parent
    summary["early_warning"] = warning_evaluation.evaluate_run(run_path, eval_dir, n_boot, settings=settings)
    if summary["early_warning"] is not None:
        summary["early_warning"]["figures"] = warning_evaluation.headline_figures(summary["early_warning"])
    warnings = warning_evaluation.run_warnings(run_path)[0]
    per_seed_path = eval_dir / "per_seed.csv"
    reference_path = eval_dir / "premise_reference.json"
    summary.update(read_findings(summary, per_sample, pd.read_csv(per_seed_path) if per_seed_path.is_file() else None,
                                 settings, n_boot,
                                 json.loads(reference_path.read_text()) if reference_path.is_file() else None))
    summary.update(label_summaries(eval_dir, per_sample, pd.read_csv(per_seed_path) if per_seed_path.is_file() else None,
                                   settings))
    summary["headline"] = headline_block(summary, per_sample, settings)
    summary["headline"].setdefault("figures", {}).update((summary["early_warning"] or {}).get("figures", {}))
    write_text_atomic(eval_dir / "summary.json", json.dumps(summary, indent=1))
    return summary, warnings


# ---------------------------------------------------------------------------
# The memorization labels side by side, and k of the sampler's first step pooled per factor.

def label_agreement(seeds: pd.DataFrame, settings: dict) -> dict:
    """Per duplication factor, from one checkpoint's per-seed rows at one g: samples memorized (at least half of their
    seeds, is_memorized) by the copy label (`copy`), the similarity label (`sev_<headline>` > threshold) and
    nearest-neighbour identity (`sev_nn_identity`); the share of samples on which each pair agrees; the samples and
    seeds on which the similarity and copy labels disagree; the median distance ratio of the seeds."""
    seed_labels = pd.DataFrame(dict(
        sample_id=seeds["sample_id"], dup_factor=seeds["dup_factor"], copy=seeds["copy"] > 0.5,
        similarity=seeds[f"sev_{settings['severity_backend']}"] > settings["threshold"],
        nn_identity=seeds["sev_nn_identity"] > 0.5, ratio=seeds["copy_ratio"]))
    samples = seed_labels.groupby("sample_id")[["copy", "similarity", "nn_identity"]].mean().apply(is_memorized)
    samples["dup_factor"] = seed_labels.groupby("sample_id")["dup_factor"].first()
    out = {}
    for dup, rows in samples.groupby("dup_factor"):
        own = seed_labels[seed_labels["dup_factor"] == dup]
        copy, similar, nn = rows["copy"], rows["similarity"], rows["nn_identity"]
        out[str(int(dup))] = dict(
            samples=len(rows), copy=int(copy.sum()), similarity=int(similar.sum()), nn_identity=int(nn.sum()),
            agree_copy_similarity=float((copy == similar).mean()), agree_copy_nn=float((copy == nn).mean()),
            agree_similarity_nn=float((similar == nn).mean()),
            similar_not_copy=int((similar & ~copy).sum()), copy_not_similar=int((copy & ~similar).sum()),
            seeds=len(own), seeds_similar_not_copy=int((own["similarity"] & ~own["copy"]).sum()),
            seeds_copy_not_similar=int((own["copy"] & ~own["similarity"]).sum()),
            median_copy_ratio=None if own["ratio"].isna().all() else float(own["ratio"].median()))
    return out


def first_step_pooled(at_last: pd.DataFrame, eval_dir: Path) -> dict | None:
    """Per duplication factor, k of the sampler's first prediction pooled over samples and seeds (the least-squares
    fit `(x0hat_T - mu) ~ a (x - mu)`, mem_analysis.losses.pooled_overestimation), from the per-sample means and the
    probe latents of premise_latents.safetensors; None without them."""
    from safetensors.torch import load_file

    path = eval_dir / "premise_latents.safetensors"
    if not path.is_file() or "k0_first" not in at_last:
        return None
    saved = load_file(str(path))
    row_of = {int(s): i for i, s in enumerate(saved["probe_sample_ids"].tolist())}
    out = {}
    for dup, rows in at_last.groupby("dup_factor"):
        x = saved["probe_latents"][[row_of[int(s)] for s in rows["sample_id"]]]
        out[str(int(dup))] = dict(n_samples=len(rows), **{
            col: pooled_overestimation(rows[col].to_numpy(float, copy=True), x, saved["mu"])
            for col in ("k0_first", "kc_first", "kg_first")})
    return out


def label_summaries(eval_dir: Path, per_sample: pd.DataFrame, per_seed: pd.DataFrame | None, settings: dict) -> dict:
    """summary.json's `label_agreement` (None without per-seed copy labels) and `first_step_pooled`, at the last
    checkpoint and headline g."""
    g = settings["guidance_scale"]
    seeds = last_checkpoint_rows(per_seed, g)[1] if per_seed is not None and "copy" in per_seed else None
    return dict(label_agreement=label_agreement(seeds, settings) if seeds is not None and len(seeds) else None,
                first_step_pooled=first_step_pooled(last_checkpoint_rows(per_sample, g)[1], eval_dir))
