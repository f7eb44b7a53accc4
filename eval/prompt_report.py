"""Tables of evaluate_prompts.py -> summary.json, figures and report.md (per-set means, correlations, detection).

Every number in report.md is read from per_prompt.csv through summary.json; `python eval/report.py --eval_dir OUT`
rebuilds them from the tables alone.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from eval.figures import plt, save_figure
from eval.summary import correlation
from eval.summary import score_columns as numeric_scores
from eval.tables import fmt, fmt_corr
from mem_analysis import stats, verdicts
from mem_analysis.decomposition import reference_schedule
from mem_analysis.io import write_text_atomic
from mem_analysis.severity import is_memorized

NOT_SCORES = {"reference", "order", "seed"}
# The scores the report tables show (summary.json holds every numeric column).
HEADLINE = ["wen_magnitude_first", "wen_magnitude", "D_x_early", "D_x", "D_T_early", "D_T", "D_x_final_early",
            "diversity", "collapse_early", "loss_cfg_early", "loss_cfg", "k_cfg_early", "k_cfg", "k0_first",
            "kg_first", "severity"]
WEN = "Wen et al. (ICLR 2024), SD v1.4, 500 memorized vs 500 normal prompts, DDIM 50, g = 7.5, 4 images a prompt: " \
      "AUC 0.994, TPR 0.982 at 1% FPR"


def score_columns(table: pd.DataFrame) -> list[str]:
    """Numeric measurement columns (not identifiers, not severity back ends)."""
    return [c for c in numeric_scores(table) if c not in NOT_SCORES]


def set_means(rows: pd.DataFrame, columns: list[str], n_boot: int) -> dict:
    """{column: {mean, low, high, n}} over the set's prompts (finite values)."""
    out = {}
    for col in columns:
        mean, low, high = stats.mean_interval(rows[col].to_numpy(float), n_boot)
        out[col] = dict(mean=None if np.isnan(mean) else mean, low=None if np.isnan(low) else low,
                        high=None if np.isnan(high) else high, n=int(np.isfinite(rows[col].to_numpy(float)).sum()))
    return out


def pair_detection(a: pd.DataFrame, b: pd.DataFrame, col: str, n_boot: int) -> dict | None:
    """AUROC [CI] and TPR at low FPR of a score for set a (positive) vs set b, in its stated direction."""
    pos, neg = a[col].to_numpy(float), b[col].to_numpy(float)
    if not (np.isfinite(pos).any() and np.isfinite(neg).any()):
        return None
    d = stats.set_detection(pos[np.isfinite(pos)], neg[np.isfinite(neg)], verdicts.direction(col), n_boot)
    return dict(direction=d.direction, auroc=d.auroc, ci_low=None if np.isnan(d.low) else d.low,
                ci_high=None if np.isnan(d.high) else d.high, tpr=d.tpr, tpr_label=d.tpr_label,
                n_pos=d.n_pos, n_neg=d.n_neg)


def summarize(per_prompt: pd.DataFrame, settings: dict, n_boot: int = 1000) -> dict:
    """Per-set means with CIs, every score's Pearson / Spearman with severity, detection for every pair of sets."""
    scores = score_columns(per_prompt)
    shown = ["severity", "memorized_fraction", "similarity_fraction"] + [c for c in per_prompt if c.startswith("sev_")] + scores
    names = list(dict.fromkeys(per_prompt["prompt_set"]))
    sets = {}
    for name in names:
        rows = per_prompt[per_prompt["prompt_set"] == name]
        labels = rows["label"] if "label" in rows else pd.Series(["similarity"] * len(rows), index=rows.index)
        sets[name] = dict(n_prompts=int(len(rows)), n_with_reference=int(rows["reference"].sum()),
                          n_memorized=int(is_memorized(rows["memorized_fraction"]).sum()),
                          labels={k: int(v) for k, v in labels[rows["memorized_fraction"].notna()].value_counts().items()},
                          means=set_means(rows, shown, n_boot))
    sev = per_prompt["severity"].to_numpy(float)
    correlations = {col: {m: correlation(per_prompt[col].to_numpy(float), sev, m, n_boot, seed=0)
                          for m in ("pearson", "spearman")} for col in scores}
    detection = {}
    for a, b in itertools.combinations(names, 2):
        ra, rb = per_prompt[per_prompt["prompt_set"] == a], per_prompt[per_prompt["prompt_set"] == b]
        detection[f"{a} vs {b}"] = {col: pair_detection(ra, rb, col, n_boot) for col in scores + ["severity"]}
    severity_kind = ("against the reference image paired by exact caption (prompts without one: n/a)"
                     if settings.get("references") else "reference-free: each seed's similarity to the prompt's other seeds")
    target = ("the reference latent (D_x_final*: each seed's own generated latent)" if settings.get("references")
              else "each seed's own generated latent (no reference: the authors' exploratory variant)")
    return dict(settings=settings, severity_kind=severity_kind, decomposition_target=target, sets=sets,
                correlations=correlations, detection=detection)


def mean_cell(entry: dict | None) -> str:
    """'mean [low, high]' of a set_means entry."""
    if not entry or entry["mean"] is None:
        return "n/a"
    return f"{fmt(entry['mean'])} [{fmt(entry['low'])}, {fmt(entry['high'])}]" \
        if entry["low"] is not None else fmt(entry["mean"])


def detection_cell(d: dict | None) -> str:
    """'0.950 [0.900, 0.990], higher; TPR 0.800' or n/a."""
    if d is None:
        return "n/a | n/a | n/a"
    ci = f" [{fmt(d['ci_low'])}, {fmt(d['ci_high'])}]" if d["ci_low"] is not None else ""
    return f"{fmt(d['auroc'])}{ci} | {d['direction']} | {fmt(d['tpr'])} ({d['tpr_label']})"


def figures(out_dir: Path, per_prompt: pd.DataFrame, settings: dict) -> dict[str, str]:
    """Per-step curves by set against both schedules, scores by set, D_x vs severity; {name: file}."""
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    curves = pd.read_parquet(out_dir / "curves.parquet")
    names = list(dict.fromkeys(per_prompt["prompt_set"]))
    files = {}
    panels = [("w_x", "w_x(t)"), ("w_T", "w_T(t)"), ("k_cfg", f"k_g(t), g = {settings['guidance_scale']:g}"),
              ("loss_cfg", f"L_g(t), g = {settings['guidance_scale']:g}")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    t = np.asarray(curves["timesteps"].iloc[0], float)
    for ref, ls in (("paper", "--"), ("exact", ":")):
        w_x, w_T = reference_schedule(np.array(curves["alpha_bar"].iloc[0], float), reference=ref)
        axes[0].plot(t, w_x, "k" + ls, label=f"theory ({ref})")
        axes[1].plot(t, w_T, "k" + ls, label=f"theory ({ref})")
    for ax, (col, title) in zip(axes, panels):
        for name in names:
            rows = curves[(curves["prompt_set"] == name)]
            if col not in rows or rows[col].isna().all():
                continue
            values = np.stack([np.asarray(v, float) for v in rows[col].dropna()])
            x = t if col.startswith("w_") else np.asarray(settings["probe_timesteps"], float)
            ax.plot(x, values.mean(0), "-o", ms=2, label=f"{name} (n = {len(values)})")
        ax.set(xlabel="timestep t", title=title)
        ax.invert_xaxis()
        if ax.lines:
            ax.legend(fontsize=6)
    save = save_figure
    save(fig, fig_dir / "curves_by_set.png")
    files["curves"] = "curves_by_set.png"

    shown = [c for c in ("severity", "wen_magnitude_first", "wen_magnitude", "D_x_early") if per_prompt[c].notna().any()]
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.2), squeeze=False)
    for ax, col in zip(axes[0], shown):
        values = per_prompt[col].dropna()
        lo, hi = float(values.min()), float(values.max())
        if hi - lo <= 1e-9 * max(1.0, abs(hi)):  # (near-)constant scores: one visible bin
            lo, hi = lo - 0.5, hi + 0.5
        ax.hist([per_prompt[per_prompt["prompt_set"] == n][col].dropna() for n in names], bins=20, range=(lo, hi),
                label=names)
        ax.set(xlabel=col, ylabel="prompts")
        ax.legend(fontsize=6)
    save(fig, fig_dir / "scores_by_set.png")
    files["scores"] = "scores_by_set.png"

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, col in zip(axes, ("D_x", "D_x_early")):
        for name in names:
            rows = per_prompt[per_prompt["prompt_set"] == name]
            ax.scatter(rows["severity"], rows[col], s=10, label=name)
        ax.set(xlabel=f"severity ({settings['severity_backend']})", ylabel=f"{col} (paper schedule)")
        ax.legend(fontsize=6)
    save(fig, fig_dir / "deviation_vs_severity.png")
    files["deviation"] = "deviation_vs_severity.png"
    return files


def report_lines(summary: dict, files: dict) -> list[str]:
    """report.md: the sets, the detection figure (Wen's), then the paper's relations with severity."""
    s = summary["settings"]
    lines = ["# Prompt sets evaluated", "",
             f"Model `{s['model']}`; DDIM {s['num_inference_steps']} steps, {len(s['seeds'])} seeds a prompt, "
             f"g = {s['guidance_scale']:g}; severity = `{s['severity_backend']}` (threshold {s['threshold']:g}), "
             f"{summary['severity_kind']}. The decomposition regresses on {summary['decomposition_target']}; "
             "deviations D use the `paper` schedule unless marked `exact`. Intervals are 95% bootstrap intervals.", ""]
    if s.get("references"):
        unmatched = ", ".join(f"{k}: {v}" for k, v in s.get("unmatched", {}).items())
        lines += [f"References `{s['references']}`, matched by exact caption; prompts without a reference: {unmatched}.", ""]
    cols = ["severity", "memorized_fraction", "similarity_fraction", "wen_magnitude_first", "wen_magnitude",
            "D_x_early", "diversity"]
    lines += ["## Prompt sets (mean per prompt)", "",
              f"A prompt is memorized when at least half of its seeds are: copies (label `copy`: the nearest reference "
              f"image is its own by a margin, d(paired) / d(nearest other) < {s.get('copy_ratio', float('nan')):g}) "
              f"where it has a reference, else over the similarity threshold (label `similarity`: reference-free, "
              f"there is no training pool to test a copy against). Column `label` of per_prompt.csv says which.", "",
              "| set | prompts | with reference | memorized (label: prompts) | " + " | ".join(cols) + " |",
              "|---|---|---|---|" + "---|" * len(cols)]
    for name, entry in summary["sets"].items():
        used = ", ".join(f"{k}: {v}" for k, v in entry.get("labels", {}).items()) or "none"
        lines.append(f"| {name} | {entry['n_prompts']} | {entry['n_with_reference']} | {entry['n_memorized']} "
                     f"({used}) | " + " | ".join(mean_cell(entry["means"].get(c)) for c in cols) + " |")
    lines += ["", "## Detection: each score separating the sets (Wen et al.'s figure)", "",
              "AUROC with its 95% bootstrap interval, in the direction each score is predicted to move for the first "
              "set, stated in advance (mem_analysis.verdicts.direction: lower for diversity and collapse), never "
              "chosen on these data; TPR at 1% FPR only with at least 100 negatives, else TPR at 0 false positives. "
              "For comparison only like with like: " + WEN + ".", ""]
    for pair, scores in summary["detection"].items():
        lines += [f"**{pair}**", "", "| score | AUROC [95% CI] | direction | TPR |", "|---|---|---|---|"]
        lines += [f"| {c} | {detection_cell(scores.get(c))} |" for c in HEADLINE if c in scores]
        lines.append("")
    lines += ["## Relations with severity across prompts (the paper's figure)", "",
              "The paper reports one Pearson per model between its schedule deviation and SSCD severity: "
              + ", ".join(f"{r:.2f} ({m})" for m, r in verdicts.PAPER_ANCHORS) + " (the mapping of numbers to models "
              "comes from the paper's text).", "",
              "| score | Pearson | Spearman |", "|---|---|---|"]
    for col in HEADLINE:
        c = summary["correlations"].get(col)
        if c:
            lines.append(f"| {col} | {fmt_corr(c['pearson'])} | {fmt_corr(c['spearman'])} |")
    lines += ["", f"![curves](figures/{files['curves']})", "", f"![scores](figures/{files['scores']})", "",
              f"![deviation](figures/{files['deviation']})", ""]
    return lines


def log_scalars(tensorboard_dir: str, summary: dict, step: int):
    """Per-set means and pairwise AUROCs as TensorBoard scalars at `step`."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(tensorboard_dir) as writer:
        for name, entry in summary["sets"].items():
            for col in HEADLINE:
                value = entry["means"].get(col)
                if value and value["mean"] is not None:
                    writer.add_scalar(f"prompts/{col}/{name}", value["mean"], step)
        for pair, scores in summary["detection"].items():
            for col in HEADLINE:
                if scores.get(col):
                    writer.add_scalar(f"prompts/auroc/{col}/{pair.replace(' ', '_')}", scores[col]["auroc"], step)


def write_report(out_dir, settings: dict | None = None, n_boot: int = 1000, tensorboard_dir: str | None = None,
                 step: int = 0) -> Path:
    """summary.json, figures/ and report.md from the tables in `out_dir`."""
    out_dir = Path(out_dir)
    settings = settings or json.loads((out_dir / "settings.json").read_text())
    per_prompt = pd.read_csv(out_dir / "per_prompt.csv", keep_default_na=False, na_values=[""],
                             dtype={"prompt": str, "prompt_set": str})
    summary = summarize(per_prompt, settings, n_boot)
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=1))
    files = figures(out_dir, per_prompt, settings)
    write_text_atomic(out_dir / "report.md", "\n".join(report_lines(summary, files)))
    if tensorboard_dir:
        log_scalars(tensorboard_dir, summary, step)
    return out_dir / "report.md"

