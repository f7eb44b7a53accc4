"""Tables -> summary.json (M7), figures and report.md for evaluate_checkpoints.py.

    python eval/report.py --eval_dir RUN/eval     # rebuild from the tables alone

Every number in report.md is read from per_sample.csv (through summary.json), so the
report and the tables agree by construction; figures are matplotlib (Agg) PNGs.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mem_analysis import early_warning, run, stats, verdicts  # noqa: E402
from mem_analysis.decomposition import reference_schedule  # noqa: E402
from mem_analysis.io import atomic_path, replace_marked_block, write_text_atomic  # noqa: E402

GUIDED_K = re.compile(r"^k_cfg_(\d+(?:\.\d+)?)_early$")  # k_cfg_<g>_early, not the _uncentred variants
# Columns that are identifiers or severity itself, not scores to correlate with severity.
NOT_SCORES = {"checkpoint_step", "checkpoint", "sample_id", "guidance_scale", "severity", "memorized_fraction"}


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


def summarize(per_sample: pd.DataFrame, settings: dict, n_boot: int = 1000) -> dict:
    """M7 per checkpoint and guidance scale, and the onset of memorization per sample."""
    threshold = settings["threshold"]
    out = dict(settings=settings, checkpoints={}, onset={})
    for (step, g), rows in per_sample.groupby(["checkpoint_step", "guidance_scale"]):
        sev = rows["severity"].to_numpy(float)
        labels = (sev > threshold).astype(int)  # as M6's memorized fraction: similarity over the threshold
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
        onset = stats.onset_step(steps, rows["severity"].to_numpy(float), threshold)[0]
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


def fmt(value, digits: int = 3) -> str:
    """A number as the report prints it (the test reads the same format)."""
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def fmt_corr(c: dict) -> str:
    """'r = 0.870 [0.710, 0.950]' (95% bootstrap interval)."""
    return "r = n/a (undefined: constant values or fewer than 3 samples)" if c["r"] is None else \
        f"r = {fmt(c['r'])} [{fmt(c['ci_low'])}, {fmt(c['ci_high'])}]"


def verdict(c: dict, sign: int) -> str:
    """'holds' when the 95% interval excludes 0 on the predicted side."""
    if c["r"] is None:
        return "cannot be tested on this run"
    if (sign > 0 and c["ci_low"] > 0) or (sign < 0 and c["ci_high"] < 0):
        return "holds"
    return "does not hold"


def save_figure(fig, path: Path):
    """Save a PNG atomically and close the figure."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)


def by_dup_over_steps(ax, table: pd.DataFrame, column: str, label_fmt: str = "dup {}", style: str = "-o"):
    """Mean of a column per duplication factor against step."""
    for dup, rows in table.groupby("dup_factor"):
        mean = rows.groupby("checkpoint_step")[column].mean()
        ax.plot(mean.index, mean.values, style, label=label_fmt.format(dup), ms=3)


def figures(eval_dir: Path, per_sample: pd.DataFrame, summary: dict, settings: dict) -> dict[str, str]:
    """The five figures of the issue; returns {name: file name}."""
    fig_dir = eval_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    g = settings["guidance_scale"]
    table = per_sample[per_sample["guidance_scale"] == g]
    last = int(table["checkpoint_step"].max())
    at_last = table[table["checkpoint_step"] == last]
    names = {}

    fig, ax = plt.subplots(figsize=(5, 3.5))
    by_dup_over_steps(ax, table, "severity")
    ax.axhline(settings["threshold"], color="grey", ls=":", label="threshold")
    ax.set(xlabel="training step", ylabel=f"severity ({settings['severity_backend']})", title=f"g = {g:g}")
    ax.legend(fontsize=7)
    save_figure(fig, fig_dir / "severity_over_training.png")
    names["severity"] = "severity_over_training.png"

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, col in zip(axes, ("D_x", "D_T")):
        for dup, rows in at_last.groupby("dup_factor"):
            ax.scatter(rows["severity"], rows[col], s=14, label=f"dup {dup}")
        c = summary["checkpoints"][str(last)][f"{g:g}"]["correlations"][col]["pearson"]
        ax.set(xlabel="severity", ylabel=f"{col} (paper schedule)", title=f"step {last}: Pearson {fmt_corr(c)}")
        ax.title.set_fontsize(8)
    axes[0].legend(fontsize=7)
    save_figure(fig, fig_dir / "deviation_vs_severity.png")
    names["deviation"] = "deviation_vs_severity.png"

    curves = np.load(eval_dir / "curves" / f"step-{last}.npz")
    pick = curves["guidance_scale"] == g
    ids = curves["sample_id"][pick]
    sev = at_last.set_index("sample_id").loc[ids, "severity"].to_numpy()
    memorized, plain = ids[np.argmax(sev)], ids[np.argmin(sev)]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    ab = curves["alpha_bar"][pick][0]
    t = curves["timesteps"][pick][0]
    for ref, ls in (("paper", "--"), ("exact", ":")):
        w_x, w_T = reference_schedule(ab, reference=ref)
        axes[0].plot(t, w_x, "k" + ls, label=f"theory ({ref})")
        axes[1].plot(t, w_T, "k" + ls, label=f"theory ({ref})")
    for sid, name in ((memorized, "most memorized"), (plain, "least memorized")):
        k = np.where(ids == sid)[0][0]
        axes[0].plot(t, curves["w_x"][pick][k], label=f"{name} (id {sid})")
        axes[1].plot(t, curves["w_T"][pick][k], label=f"{name} (id {sid})")
    for ax, name in zip(axes, ("w_x", "w_T")):
        ax.set(xlabel="timestep t", ylabel=name, title=f"step {last}, g = {g:g}")
        ax.invert_xaxis()
        ax.legend(fontsize=7)
    save_figure(fig, fig_dir / "decomposition_schedule.png")
    names["schedule"] = "decomposition_schedule.png"

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, window, title in ((axes[0], "", "all probe timesteps"), (axes[1], "_early", f"t >= {settings['high_noise_timestep']}")):
        by_dup_over_steps(ax, table, f"loss_cond{window}", "L_c dup {}", "-o")
        ax.set_prop_cycle(None)
        by_dup_over_steps(ax, table, f"loss_cfg{window}", f"L_g={g:g} dup {{}}", "--s")
        ax.set(xlabel="training step", ylabel="probe loss", title=title, yscale="log")
        ax.legend(fontsize=6)
    save_figure(fig, fig_dir / "losses_over_training.png")
    names["losses"] = "losses_over_training.png"

    generated = np.load(eval_dir / "images" / f"step-{last}.npz")
    training = np.load(eval_dir / "images" / "training.npz")
    train_of = {int(s): im for s, im in zip(training["sample_id"], training["images"])}
    order = at_last.sort_values("dup_factor", ascending=False)["sample_id"].tolist()[:16]
    gen_of = {int(s): im for s, im in zip(generated["sample_id"], generated["images"])}
    fig, axes = plt.subplots(2, len(order), figsize=(1.1 * len(order), 2.6), squeeze=False)
    for k, sid in enumerate(order):
        row = at_last[at_last["sample_id"] == sid].iloc[0]
        axes[0, k].imshow(train_of[sid])
        axes[1, k].imshow(gen_of[sid])
        axes[0, k].set_title(f"dup {row['dup_factor']}", fontsize=6)
        axes[1, k].set_title(f"sev {row['severity']:.2f}", fontsize=6)
        for ax in axes[:, k]:
            ax.axis("off")
    fig.suptitle(f"training image (top) and seed-0 generation (bottom), step {last}, g = {g:g}", fontsize=7)
    save_figure(fig, fig_dir / "generated_vs_training.png")
    names["images"] = "generated_vs_training.png"
    return names


def findings(summary: dict, settings: dict, last: int, at_last: pd.DataFrame) -> list[str]:
    """The paper's three findings, each decided by a measure fixed in advance (mem_analysis.verdicts.FINDINGS),
    with the line saying which measure decided it and why, then the secondary figures."""
    g = f"{settings['guidance_scale']:g}"
    entry = summary["checkpoints"][str(last)][g]
    corr = lambda col: entry["correlations"].get(col, {}).get("pearson", dict(r=None))  # noqa: E731
    det = lambda col: entry["detection"].get(col, {})  # noqa: E731
    hi = settings["high_noise_timestep"]
    K = f"{settings['early_steps']} DDIM steps" if settings.get("early_steps") else f"DDIM steps with t >= {hi}"
    n, m = entry["n_samples"], entry["n_memorized"]
    lines = [f"At the last evaluated checkpoint (step {last}, g = {g}, {n} probe samples, {m} memorized: "
             f"severity > {settings['threshold']:g}); r is Pearson across samples with a 95% bootstrap interval. "
             f"Each verdict is decided by the measures named on its second line (rules: docs/findings.md).", ""]
    if m in (0, n):
        lines += [f"{'No' if m == 0 else 'Every'} probe sample is memorized at this checkpoint: the verdicts rest on "
                  "the spread of severity alone, and detection scores (AUROC) are undefined.", ""]
    for key, number in (("i", 1), ("ii", 2), ("iii", 3)):
        spec, decided = verdicts.FINDINGS[key], summary["findings"][key]
        measures = "; ".join(f"{col} {fmt_corr(corr(col))} ({'+' if sign > 0 else '-'} predicted): "
                             f"{decided['measures'][col]}" for col, sign in spec["decide"])
        lines += [f"**{number}. {spec['title']}** -- {decided['verdict']}.",
                  f"- Decided by {measures}. Why these: {spec['why']}.",
                  "- Secondary: " + "; ".join(f"{col} {fmt_corr(corr(col))}" for col in spec["secondary"]
                                              if col in entry["correlations"]) + "."]
        if key == "ii":
            d = det("wen_magnitude")
            lines.append(f"- Wen et al.'s magnitude ||e_c - e_0|| (first {K}): AUROC {fmt(d.get('auroc'))}, "
                         f"{d.get('tpr_label') or 'TPR'} {fmt(d.get('tpr'))}.")
        lines.append("")
    lines += [f"Window of finding 1: t >= {hi} of the probe grid (x0 space, averaged over "
              f"{settings.get('probe_noise_draws', 1)} noise draws per (sample, t)); early steps of findings 2-3: "
              f"the first {K}; D sums over the {settings.get('deviation_latents', 'inputs')} "
              f"latents (docs/findings.md), paper schedule unless marked `exact`.",
              f"Detection: AUROC with each score's predicted direction (lower = memorized for "
              f"{', '.join(verdicts.LOWER_IS_MEMORIZED_PREFIXES)}; higher for the rest); "
              f"{det('D_x_early').get('tpr_label') or 'TPR at low FPR'} (TPR at 1% FPR needs >= "
              f"{stats.MIN_NEGATIVES_FOR_1PCT_FPR} negatives). D_x_early AUROC {fmt(det('D_x_early').get('auroc'))}, "
              f"loss_cfg_x0_early AUROC {fmt(det('loss_cfg_x0_early').get('auroc'))}, diversity (lower) AUROC "
              f"{fmt(det('diversity').get('auroc'))}."]
    return lines


def decide_findings(summary: dict, settings: dict, last: int) -> dict:
    """{'i' | 'ii' | 'iii': verdict dict} at the last checkpoint and headline guidance scale."""
    entry = summary["checkpoints"][str(last)][f"{settings['guidance_scale']:g}"]
    return {key: verdicts.decide(entry["correlations"], key) for key in verdicts.FINDINGS}


def premise_lines(premise: dict) -> list[str]:
    """The premise check: k_0 (centred and uncentred) per duplication factor, and its one-line verdict."""
    uncentred = premise.get("k_uncond_uncentred_by_dup", {})
    lines = [f"**Premise: the unconditional prediction carries no x (k_0 ~ 0)** -- {premise['verdict']}.",
             f"- Measure: k_uncond (centred on mu) in the {premise['window']}, mean over samples; holds when "
             f"|k_0| < {premise['tolerance']:g}.", "",
             "| dup_factor | samples | k_0 centred | k_0 uncentred |", "|---|---|---|---|"]
    for dup, k0 in premise["k_uncond_by_dup"].items():
        lines.append(f"| {dup} | {premise['n_by_dup'][dup]} | {fmt(k0, 2)} | {fmt(uncentred.get(dup), 2)} |")
    return lines


def anchor_lines(summary: dict, settings: dict, last: int) -> list[str]:
    """The paper's per-model Pearson r beside this run's figure of the same kind, and what differs."""
    entry = summary["checkpoints"][str(last)][f"{settings['guidance_scale']:g}"]
    lines = ["Each of the paper's figures is ONE Pearson correlation per model, across its prompts, between the "
             "schedule deviation and SSCD severity. The mapping of the three numbers to models is taken from the "
             "paper's text (as docs/findings.md quotes it); this run is a fourth model, not a fourth measure.", "",
             "| model | Pearson r (D_x, paper schedule, vs severity) | n prompts |", "|---|---|---|"]
    lines += [f"| {model} (paper) | {r:.2f} | (paper) |" for model, r in verdicts.PAPER_ANCHORS]
    c = entry["correlations"].get("D_x", {}).get("pearson", dict(r=None, n=0))
    lines += [f"| this run (step {last}) | {fmt_corr(c)} | {c.get('n')} |", "",
              f"Conditions that differ: model (this run: `{settings['model']}`, fine-tuned here, vs pretrained SD "
              f"v1.4 / v2.1 / Realistic Vision); prompts (the probe captions of a dataset with controlled duplication, "
              f"vs the paper's prompt sets); severity (`{settings['severity_backend']}` vs SSCD); seeds "
              f"({len(settings['seeds'])} vs the paper's); sampler steps "
              f"(DDIM {settings['num_inference_steps']} vs 50, "
              f"so a sum D is not comparable: the per-step D_x_mean is). D_x_early and D_T are other measures and "
              f"are not set beside these figures."]
    return lines


def reliability_lines(rel: dict) -> list[str]:
    """Split-half reliability across seeds of each D and of severity, and the noise-corrected r."""
    sev = rel["severity"]
    lines = [f"Split-half reliability across seeds (even vs odd seeds, Spearman-Brown to all {sev['n_seeds']}); "
             f"severity's own: {fmt(sev['reliability'], 2)}. Disattenuated r = r / sqrt(rel_D rel_severity); "
             "it can exceed 1 when the reliabilities are themselves noisy.", "",
             "| measure | reliability | r with severity | disattenuated r |", "|---|---|---|---|"]
    for col, v in rel.items():
        if col != "severity":
            lines.append(f"| {col} | {fmt(v['reliability'], 2)} | {fmt(v['r_severity'], 2)} | "
                         f"{fmt(v['r_disattenuated'], 2)} |")
    return lines


def loss_curve_figure(eval_dir: Path, at_last: pd.DataFrame, settings: dict, last: int) -> str | None:
    """Per-timestep L_g (x0 and epsilon space) at the last checkpoint, memorized vs not (finding 1's curve)."""
    curves = np.load(eval_dir / "curves" / f"step-{last}.npz")
    g = settings["guidance_scale"]
    if "probe_loss_cfg_x0" not in curves:
        return None
    pick = curves["guidance_scale"] == g
    ids, t = curves["sample_id"][pick], curves["probe_timesteps"][pick][0]
    memorized = at_last.set_index("sample_id").loc[ids, "severity"].to_numpy() > settings["threshold"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, space in ((axes[0], "probe_loss_cfg_x0", "x0 space: ||x - x0hat(e_g)||^2"),
                           (axes[1], "probe_loss_cfg", "epsilon space: ||eps - e_g||^2")):
        values = curves[key][pick]
        for group, name, color in ((memorized, "memorized", "C3"), (~memorized, "not memorized", "C0")):
            if group.any():
                ax.plot(t, values[group].T, color=color, alpha=0.25, lw=0.8)
                ax.plot(t, values[group].mean(0), color=color, lw=2, label=f"{name} (n = {int(group.sum())})")
        ax.axvspan(settings["high_noise_timestep"], t.max(), color="grey", alpha=0.1, label="finding-1 window")
        ax.set(xlabel="timestep t", ylabel=f"L_g, g = {g:g}", title=space, yscale="log")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=6)
    save_figure(fig, eval_dir / "figures" / "loss_per_timestep.png")
    return "loss_per_timestep.png"


def write_report(eval_dir, settings: dict | None = None, failed=(), n_boot: int = 1000, run_dir=None) -> Path:
    """summary.json, figures/ and report.md from the tables in `eval_dir` (and the run's warnings, from
    `run_dir`, by default the folder above `eval_dir`)."""
    eval_dir = Path(eval_dir)
    settings = settings or json.loads((eval_dir / "settings.json").read_text())
    per_sample = pd.read_csv(eval_dir / "per_sample.csv")
    summary = summarize(per_sample, settings, n_boot)
    summary["skipped_checkpoints"] = list(failed)
    warnings, fpr = run_warnings(Path(run_dir) if run_dir else eval_dir.parent)
    summary["early_warning"] = warning_summary(per_sample, warnings, fpr, summary, settings, n_boot)
    per_seed_path = eval_dir / "per_seed.csv"
    summary.update(read_findings(summary, per_sample, pd.read_csv(per_seed_path) if per_seed_path.is_file() else None,
                                 settings))
    write_text_atomic(eval_dir / "summary.json", json.dumps(summary, indent=1))
    names = figures(eval_dir, per_sample, summary, settings)

    g = settings["guidance_scale"]
    table = per_sample[per_sample["guidance_scale"] == g]
    last = int(table["checkpoint_step"].max())
    severity = table.pivot_table(index="checkpoint_step", columns="dup_factor", values="severity", aggfunc="mean")
    fraction = table.pivot_table(index="checkpoint_step", columns="dup_factor", values="memorized_fraction", aggfunc="mean")
    lines = [f"# Memorization over training", "",
             f"Model `{settings['model']}`, dataset `{settings['dataset']}`, {settings['weights']} weights"
             f"{' (LoRA)' if settings.get('lora') else ''}; DDIM {settings['num_inference_steps']} steps, "
             f"{len(settings['seeds'])} seeds, g = {g:g} ({settings.get('guidance_schedule', 'constant')} schedule); severity = `{settings['severity_backend']}` "
             f"(threshold {settings['threshold']:g}); deviations D use the `paper` schedule unless marked `exact`.", ""]
    if failed:
        lines += [f"Skipped (could not be loaded): {', '.join(failed)}.", ""]
    lines += ["## Severity over training", "", "Mean severity per duplication factor (rows: training step):", ""]
    lines += markdown_table(severity)
    lines += ["", "Memorized fraction of seeds:", ""] + markdown_table(fraction)
    lines += ["", f"![severity]({'figures/' + names['severity']})", "", "## The paper's three findings, on this run", ""]
    at_last = table[table["checkpoint_step"] == last]
    lines += findings(summary, settings, last, at_last)
    lines += [""] + premise_lines(summary["premise"])
    curve_figure = loss_curve_figure(eval_dir, at_last, settings, last)
    if curve_figure:
        lines += ["", f"![L_g per timestep](figures/{curve_figure})"]
    lines += ["", "## The paper's anchor, read per model", ""] + anchor_lines(summary, settings, last)
    if summary.get("reliability"):
        lines += ["", "## Reliability across seeds", ""] + reliability_lines(summary["reliability"])
    lines += [""] + group_lines(at_last, settings, n_boot)
    lines += ["", f"![D vs severity](figures/{names['deviation']})", "",
              f"![schedule](figures/{names['schedule']})", "", f"![losses](figures/{names['losses']})", "",
              "## Onset of memorization", ""]
    lines += onset_summary(summary)
    lines += ["", f"Per sample: first step at which its severity crosses the threshold, and at which its D_x rose "
              f"above the mean + 3 sd of {summary['deviation_rise_reference']}:", "",
              "| sample_id | dup_factor | onset step | D_x rise step |", "|---|---|---|---|"]
    for sid, o in sorted(summary["onset"].items(), key=lambda kv: (-kv[1]["dup_factor"], int(kv[0]))):
        lines.append(f"| {sid} | {o['dup_factor']} | {o['onset_step'] if o['onset_step'] is not None else 'never'} | "
                     f"{o['deviation_rise_step'] if o['deviation_rise_step'] is not None else 'never'} |")
    lines += ["", f"![generated next to training](figures/{names['images']})", ""]
    lines += warning_lines(summary["early_warning"], warning_figure(eval_dir, warnings, summary["early_warning"]))
    write_text_atomic(eval_dir / "report.md", "\n".join(lines))
    write_text_atomic(eval_dir / "headline.md", "\n".join(headline_lines(summary, settings, at_last, last)) + "\n")
    return eval_dir / "report.md"


# --- Reading the findings: verdicts, premise, anchors, reliability and the published headline -----------------

def read_findings(summary: dict, per_sample: pd.DataFrame, per_seed: pd.DataFrame | None, settings: dict) -> dict:
    """summary.json's `findings`, `premise` and `reliability` (None without per_seed.csv), at the last
    checkpoint and headline guidance scale."""
    g = settings["guidance_scale"]
    table = per_sample[per_sample["guidance_scale"] == g]
    last = int(table["checkpoint_step"].max())
    at_last = table[table["checkpoint_step"] == last]
    out = dict(findings=decide_findings(summary, settings, last), premise=verdicts.premise(at_last), reliability=None)
    if per_seed is not None:
        seeds = per_seed[(per_seed["guidance_scale"] == g) & (per_seed["checkpoint_step"] == last)]
        columns = [c for c in seeds.columns if c.startswith(("D_x", "D_T"))]
        out["reliability"] = verdicts.reliability(seeds, at_last, columns, f"sev_{settings['severity_backend']}")
    return out


def headline_lines(summary: dict, settings: dict, at_last: pd.DataFrame, last: int) -> list[str]:
    """The figures the README quotes, all read from summary.json / per_sample.csv of this evaluation."""
    g = f"{settings['guidance_scale']:g}"
    entry = summary["checkpoints"][str(last)][g]
    corr = lambda col: fmt_corr(entry["correlations"].get(col, {}).get("pearson", dict(r=None)))  # noqa: E731
    fraction = at_last.groupby("dup_factor")["memorized_fraction"].mean().sort_index(ascending=False)
    f = summary["findings"]
    lines = [f"Step {last}, g = {g}, {len(settings['seeds'])} seeds, DDIM {settings['num_inference_steps']} steps, "
             f"{entry['n_samples']} probe samples ({entry['n_memorized']} memorized: `{settings['severity_backend']}` "
             f"> {settings['threshold']:g}); written by eval/report.py, do not edit.", "",
             "- Share of seeds over the threshold by duplication factor: "
             + ", ".join(f"{d}x {fmt(v, 2)}" for d, v in fraction.items()) + ".",
             f"- Finding 1 (CFG loss larger), decided by loss_cfg_x0_early: {f['i']['verdict']}; "
             f"{corr('loss_cfg_x0_early')} (epsilon space, all t: {corr('loss_cfg')}).",
             f"- Finding 2 (early collapse), decided by collapse_early and cos_diff_xmu_early: {f['ii']['verdict']}; "
             f"{corr('collapse_early')} and {corr('cos_diff_xmu_early')}.",
             f"- Finding 3 (deviation tracks severity), decided by D_x_early and D_T: {f['iii']['verdict']}; "
             f"{corr('D_x_early')} and {corr('D_T')}.",
             f"- Premise k_0 ~ 0: {summary['premise']['verdict']}.",
             f"- Anchor: Pearson of D_x with severity across this run's samples {corr('D_x')}, beside the paper's "
             + ", ".join(f"{r:.2f} ({m})" for m, r in verdicts.PAPER_ANCHORS)
             + " (one figure per model; the conditions differ, see report.md)."]
    rel = summary.get("reliability") or {}
    if "D_T" in rel and "D_x_early" in rel:
        lines.append(f"- Reliability across seeds: D_x_early {fmt(rel['D_x_early']['reliability'], 2)}, "
                     f"D_T {fmt(rel['D_T']['reliability'], 2)}, severity {fmt(rel['severity']['reliability'], 2)}.")
    return lines


README_START, README_END = "<!-- headline:start -->", "<!-- headline:end -->"  # replace_marked_block's, name "headline"


def publish_headline(eval_dir, docs_file, readme=None):
    """Copy eval_dir/headline.md to `docs_file` and, when given, into the README between the headline markers."""
    text = (Path(eval_dir) / "headline.md").read_text()
    write_text_atomic(Path(docs_file), text)
    if readme:
        try:
            replace_marked_block(readme, "headline", text)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None


def onset_summary(summary: dict) -> list[str]:
    """Per duplication factor: how many samples crossed the severity threshold, when, and whether D_x rose first."""
    lines = ["| dup_factor | samples | crossed | median onset step | D_x rose | rose before crossing | "
             "rose at the crossing checkpoint | rose after |", "|---|---|---|---|---|---|---|---|"]
    frame = pd.DataFrame(summary["onset"].values())
    for dup, rows in sorted(frame.groupby("dup_factor"), key=lambda kv: -kv[0]):
        onset, rise = rows["onset_step"].astype(float), rows["deviation_rise_step"].astype(float)
        crossed = onset.notna()
        before = int((crossed & (rise < onset)).sum())
        same = int((crossed & (rise == onset)).sum())
        after = int((crossed & ((rise > onset) | rise.isna())).sum())
        median = fmt(float(onset[crossed].median()), 0) if crossed.any() else "never"
        lines.append(f"| {dup} | {len(rows)} | {int(crossed.sum())} | {median} | {int(rise.notna().sum())} | "
                     f"{before} | {same} | {after} |")
    return lines


def mean_ci(values: np.ndarray, n_boot: int, seed: int = 0) -> str:
    """'mean [low, high]': the mean with a 95% percentile-bootstrap interval (resampling the values)."""
    mean, low, high = stats.mean_interval(values, n_boot, seed=seed)
    return "n/a (no samples)" if np.isnan(mean) else f"{fmt(mean)} [{fmt(low)}, {fmt(high)}]"


def group_lines(at_last: pd.DataFrame, settings: dict, n_boot: int) -> list[str]:
    """Finding 1 by group (memorized vs not) and k by duplication factor and guidance scale, at one checkpoint."""
    g, hi = f"{settings['guidance_scale']:g}", settings["high_noise_timestep"]
    memorized = (at_last["severity"] > settings["threshold"]).to_numpy()
    lines = [f"Memorized (n = {int(memorized.sum())}) vs not (n = {int((~memorized).sum())}), mean per sample "
             f"with a 95% bootstrap interval:", "",
             "| quantity | memorized | not memorized |", "|---|---|---|"]
    for col, name in ((f"loss_cfg_{g}_x0_early", f"L_g x0 space (g = {g}), t >= {hi}"),
                      (f"loss_cfg_{g}_x0", f"L_g x0 space (g = {g}), all t"),
                      (f"loss_cfg_{g}_early", f"L_g (g = {g}), t >= {hi}"), (f"loss_cfg_{g}", f"L_g (g = {g}), all t"),
                      ("loss_cond_early", f"L_c, t >= {hi}"), ("loss_cond", "L_c, all t"),
                      (f"k_cfg_{g}_early", f"k_g (g = {g}), t >= {hi}"), ("k_cond_early", f"k_c, t >= {hi}")):
        if col in at_last:
            values = at_last[col].to_numpy(float)
            lines.append(f"| {name} | {mean_ci(values[memorized], n_boot)} | {mean_ci(values[~memorized], n_boot)} |")
    scales = sorted({float(m.group(1)) for m in map(GUIDED_K.match, at_last.columns) if m} - {1.0})  # g = 1: k_cond
    columns = [("k_cond", "1")] + [(f"k_cfg_{s:g}", f"{s:g}") for s in scales]
    lines += ["", f"Overestimation k (centred) by duplication factor and guidance scale g, mean over samples, "
              f"t >= {hi} / all t (k = 1: one unit of the training image; g = 1 is the conditional prediction):", "",
              "| dup_factor | " + " | ".join(f"g = {name}" for _, name in columns) + " |",
              "|---|" + "---|" * len(columns)]
    for dup, rows in at_last.groupby("dup_factor"):
        cells = [f"{fmt(rows[c + '_early'].mean(), 2)} / {fmt(rows[c].mean(), 2)}" for c, _ in columns]
        lines.append(f"| {dup} | " + " | ".join(cells) + " |")
    return lines


def markdown_table(frame: pd.DataFrame) -> list[str]:
    """A step x duplication-factor table in markdown, numbers as `fmt` prints them."""
    head = "| step | " + " | ".join(f"dup {c}" for c in frame.columns) + " |"
    lines = [head, "|" + "---|" * (len(frame.columns) + 1)]
    for step, row in frame.iterrows():
        lines.append(f"| {int(step)} | " + " | ".join(fmt(float(v)) for v in row.values) + " |")
    return lines


# ---------------------------------------------------------------------------
# Early warning (mem_analysis.early_warning): training-probe scores against what sampling found.

def run_warnings(run_dir: Path) -> tuple[list[dict], float]:
    """The run's warnings.jsonl (else its probes.jsonl scored; else []) and its --warning_fpr."""
    config = run.read_config(run_dir) if (run_dir / run.CONFIG_FILE).is_file() else dict(run.RUN_DEFAULTS)
    fpr = float(config["warning_fpr"])
    return early_warning.run_warnings(run_dir, fpr, int(config["high_noise_timestep"])), fpr


def warning_summary(per_sample: pd.DataFrame, warnings: list[dict], fpr: float, summary: dict, settings: dict,
                    n_boot: int) -> dict | None:
    """summary.json's `early_warning`: the warning against "memorized at the last checkpoint" (severity over
    the threshold at the headline g, as everywhere in this report) and against each sample's onset step."""
    if not warnings:
        return None
    table = per_sample[per_sample["guidance_scale"] == settings["guidance_scale"]]
    at_last = table[table["checkpoint_step"] == table["checkpoint_step"].max()]
    memorized = {int(s): bool(v > settings["threshold"]) for s, v in zip(at_last["sample_id"], at_last["severity"])}
    onset = {int(s): o["onset_step"] for s, o in summary["onset"].items()}
    return dict(fpr=fpr, **early_warning.evaluate_warning(warnings, memorized, onset, n_boot))


def fmt_auroc(entry: dict) -> str:
    """'0.950 [0.800, 1.000]' (95% bootstrap interval over samples)."""
    return f"{fmt(entry['auroc'])} [{fmt(entry['ci_low'])}, {fmt(entry['ci_high'])}]"


def warning_figure(eval_dir: Path, warnings: list[dict], result: dict | None) -> str | None:
    """Score over training: each sample (thin) and the mean per duplication factor, the alarm threshold,
    and each sample's severity onset step marked on its own curve."""
    if result is None:
        return None
    frame = pd.DataFrame(warnings).dropna(subset=["score"])
    frame = frame[frame["sample_id"].astype(str).isin(result["lead_time"])]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for k, (dup, rows) in enumerate(sorted(frame.groupby("dup_factor"), key=lambda kv: kv[0])):
        colour = f"C{k}"
        for sid, own in rows.groupby("sample_id"):
            own = own.sort_values("step")
            ax.plot(own["step"], own["score"], color=colour, lw=0.5, alpha=0.4)
            onset = result["lead_time"][str(int(sid))]["onset_step"]
            if onset is not None:
                at = own[own["step"] <= onset].tail(1)
                ax.plot(at["step"], at["score"], "v", color=colour, ms=6, mec="k", mew=0.5)
        mean = rows.groupby("step")["score"].mean()
        ax.plot(mean.index, mean.values, "-o", color=colour, ms=3, lw=1.8, label=f"dup {dup}")
    scored = frame[frame["dup_factor"] > 1] if (frame["dup_factor"] > 1).any() else frame
    ax.axhline(float(scored["threshold"].median()), color="grey", ls=":", label=f"alarm ({result['fpr']:g} FPR)")
    ax.plot([], [], "v", color="grey", mec="k", mew=0.5, label="severity onset (last probe step before it)")
    ax.set(xlabel="training step", ylabel="warning score (robust sd of the null)",
           title="early warning from training probes")
    ax.legend(fontsize=6)
    name = "warning_over_training.png"
    save_figure(fig, eval_dir / "figures" / name)
    return name


def warning_lines(result: dict | None, figure: str | None) -> list[str]:
    """report.md's early-warning section: AUROC over probe steps, lead times per dup factor, false alarms."""
    lines = ["## Early warning from training probes", ""]
    if result is None:
        return lines + ["The run logged no probes (probe_steps 0): no warning to evaluate.", ""]
    lines += ["Score per probe step and sample from the training probes alone (high-noise k_g and L_g at the "
              "largest probed g, and the fall of L_c from its start), in robust standard deviations of the null "
              "samples of the same step (held-out images when the dataset has them, else never-duplicated ones, "
              f"each null sample scored leave-one-out); the alarm fires at a {result['fpr']:g} false-alarm rate "
              "per probe step (docs/science.md, \"Early warning from training probes\"). It is measured against "
              "severity: \"memorized\" = over the threshold at the last evaluated checkpoint; lead time = onset step - "
              "first alarm step.", ""]
    steps = result["auroc_by_step"]
    earliest, best = result["earliest_auroc_0_9"], result["best_auroc"]
    n_pos = max((a["n_positive"] for a in steps.values()), default=0)
    if best is None:
        lines.append(f"AUROC undefined: {n_pos} of the probe samples are memorized at the last checkpoint "
                     "(one class only).")
    elif earliest is not None:
        lines.append(f"**AUROC first reaches 0.9 at probe step {earliest}: {fmt_auroc(steps[str(earliest)])}** "
                     f"({steps[str(earliest)]['n_positive']} memorized of {steps[str(earliest)]['n']}).")
    else:
        lines.append(f"**AUROC never reaches 0.9; best {fmt_auroc(steps[str(best)])} at probe step {best}** "
                     f"({steps[str(best)]['n_positive']} memorized of {steps[str(best)]['n']}).")
    lines += ["", "| probe step | " + " | ".join(steps) + " |", "|---|" + "---|" * len(steps),
              "| AUROC | " + " | ".join(fmt(a["auroc"], 2) for a in steps.values()) + " |", ""]
    lead = pd.DataFrame(result["lead_time"].values())
    lines += ["| dup_factor | samples | alarmed | first alarm (median step) | crossed severity | "
              "alarmed no later than the crossing | median lead time (steps) |", "|---|---|---|---|---|---|---|"]
    for dup, rows in sorted(lead.groupby("dup_factor"), key=lambda kv: -kv[0]):
        alarmed, crossed = rows["first_alarm_step"].notna(), rows["onset_step"].notna()
        leads = rows["lead_time"].dropna().astype(float)
        lines.append(f"| {dup} | {len(rows)} | {int(alarmed.sum())} | "
                     f"{fmt(float(rows['first_alarm_step'].dropna().median()), 0) if alarmed.any() else 'never'} | "
                     f"{int(crossed.sum())} | {int((leads >= 0).sum())} | "
                     f"{fmt(float(leads.median()), 0) if len(leads) else 'n/a'} |")
    top = lead[lead["dup_factor"] == lead["dup_factor"].max()]
    leads = top["lead_time"].dropna().astype(float)
    missed = int((top["onset_step"].notna() & top["first_alarm_step"].isna()).sum())
    lines += ["", f"**Median lead time for the {int(lead['dup_factor'].max())}x samples: "
              f"{fmt(float(leads.median()), 0) + ' steps' if len(leads) else 'n/a'}** (over the {len(leads)} of "
              f"{len(top)} that both alarmed and crossed the severity threshold; {missed} crossed without an alarm)."]
    fa = result["false_alarms"]
    lines += ["", f"**False alarms: {fa['count']} of {fa['never_duplicated']} never-duplicated probe samples** "
              f"alarmed at some probe step ({fa['alarmed_checks']} of {fa['checks']} (sample, step) checks, "
              f"{fmt(fa['alarmed_checks'] / fa['checks'] if fa['checks'] else None)} against the asked "
              f"{result['fpr']:g})" + (f": samples {', '.join(map(str, fa['samples']))}." if fa["samples"] else "."),
              ""]
    if figure:
        lines += [f"![early warning](figures/{figure})", ""]
    return lines

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Rebuild summary.json, figures and report.md from the tables")
    parser.add_argument("--eval_dir", required=True)
    parser.add_argument("--run_dir", default=None, help="the training run (warnings.jsonl); default: above --eval_dir")
    parser.add_argument("--publish", default=None,
                        help="also copy headline.md to this file (e.g. docs/demo_headline.md)")
    parser.add_argument("--readme", default=None,
                        help="with --publish: put the headline into this README's marked block")
    cli_args = parser.parse_args()
    print(write_report(cli_args.eval_dir, run_dir=cli_args.run_dir))
    if cli_args.publish:
        publish_headline(cli_args.eval_dir, cli_args.publish, cli_args.readme)
        print(f"published {cli_args.publish}" + (f" and {cli_args.readme}" if cli_args.readme else ""))
