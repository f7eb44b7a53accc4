"""Tables -> summary.json (M7), figures and report.md for evaluate_checkpoints.py.

    python eval/report.py --eval_dir RUN/eval     # rebuild from the tables alone

Every number in report.md is read from per_sample.csv (through summary.json), so the
report and the tables agree by construction; figures are matplotlib (Agg) PNGs.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mem_analysis import stats  # noqa: E402
from mem_analysis.decomposition import reference_schedule  # noqa: E402
from mem_analysis.io import atomic_path, write_text_atomic  # noqa: E402

# Columns that are identifiers or severity itself, not scores to correlate with severity.
NOT_SCORES = {"checkpoint_step", "checkpoint", "sample_id", "guidance_scale", "severity", "memorized_fraction"}
PAPER_PEARSON = "about 0.92 (SD v1.4), 0.92 (SD v2.1) and 0.70 (Realistic Vision)"


def score_columns(table: pd.DataFrame) -> list[str]:
    """Numeric columns scored against severity (M1-M5 values, Wen's magnitude, duplication)."""
    return [c for c in table.columns if c not in NOT_SCORES and not c.startswith("sev_")
            and pd.api.types.is_numeric_dtype(table[c])]


def correlation(x: np.ndarray, y: np.ndarray, method: str, n_boot: int, seed: int) -> dict:
    """{'r', 'ci_low', 'ci_high', 'n'} or r = None when undefined (constant input, n < 3)."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    # Values equal up to rounding (e.g. D over a window that is pure noise) carry no ranking.
    if len(x) < 3 or any(np.ptp(v) <= 1e-9 * max(1.0, np.abs(v).max()) for v in (x, y)):
        return dict(r=None, ci_low=None, ci_high=None, n=int(len(x)))
    c = stats.correlation(x, y, method=method, n_bootstrap=n_boot, seed=seed)
    return dict(r=c.r, ci_low=c.low, ci_high=c.high, n=int(c.n))


def detection(scores: np.ndarray, labels: np.ndarray) -> dict:
    """AUROC and TPR at 1% FPR of a score for memorized (label 1) vs not; None with one class."""
    ok = np.isfinite(scores)
    scores, labels = scores[ok], labels[ok]
    if len(np.unique(labels)) < 2:
        return dict(auroc=None, tpr_at_1fpr=None)
    return dict(auroc=float(stats.auroc(scores, labels)), tpr_at_1fpr=float(stats.tpr_at_fpr(scores, labels, 0.01)))


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
            entry["detection"][col] = detection(values, labels)
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
    """The paper's three findings, each with this run's numbers and a verdict."""
    g = f"{settings['guidance_scale']:g}"
    entry = summary["checkpoints"][str(last)][g]
    corr = lambda col: entry["correlations"][col]["pearson"]  # noqa: E731
    det = lambda col: entry["detection"][col]  # noqa: E731
    hi = settings["high_noise_timestep"]
    n, m = entry["n_samples"], entry["n_memorized"]
    lines = [f"At the last evaluated checkpoint (step {last}, g = {g}, {n} probe samples, {m} memorized: "
             f"severity > {settings['threshold']:g}); intervals are 95% bootstrap intervals.", ""]
    if m in (0, n):
        lines += [f"{'No' if m == 0 else 'Every'} probe sample is memorized at this checkpoint: the verdicts rest on "
                  "the spread of severity alone, and detection scores (AUROC) are undefined.", ""]
    lines += [
        f"**1. Overestimation: under memorization the CFG loss is larger** -- {verdict(corr('loss_cfg_early'), +1)} "
        f"(high-noise window t >= {hi}).",
        f"- L_g (g = {g}) vs severity, t >= {hi}: Pearson {fmt_corr(corr('loss_cfg_early'))}; "
        f"all timesteps: Pearson {fmt_corr(corr('loss_cfg'))}.",
        f"- L_c vs severity, t >= {hi}: Pearson {fmt_corr(corr('loss_cond_early'))}; all timesteps: {fmt_corr(corr('loss_cond'))}.",
        f"- k_g vs severity, t >= {hi}: Pearson {fmt_corr(corr('k_cfg_early'))}; AUROC of k_g (t >= {hi}) "
        f"{fmt(det('k_cfg_early')['auroc'])}, of L_g (t >= {hi}) {fmt(det('loss_cfg_early')['auroc'])}.",
        "",
        f"**2. Trajectory collapse: memorized prompts lose seed diversity** -- {verdict(corr('diversity'), -1)}.",
        f"- final diversity vs severity: Pearson {fmt_corr(corr('diversity'))}; early collapse "
        f"(mean seed distance once the early steps are done): {fmt_corr(corr('collapse_early'))}.",
        f"- Wen et al.'s magnitude ||e_c - e_0|| (early steps): Pearson {fmt_corr(corr('wen_magnitude'))}; "
        f"AUROC {fmt(det('wen_magnitude')['auroc'])}, TPR at 1% FPR {fmt(det('wen_magnitude')['tpr_at_1fpr'])}.",
        "",
        f"**3. Decomposition deviation tracks severity** -- {verdict(corr('D_x'), +1)} (D_x, paper schedule).",
        f"- D_x vs severity, paper schedule (sqrt(abar_t)): Pearson {fmt_corr(corr('D_x'))}; "
        f"exact schedule (unrolled DDIM): {fmt_corr(corr('D_x_exact'))}.",
        f"- D_x over the early steps only: paper {fmt_corr(corr('D_x_early'))}; exact {fmt_corr(corr('D_x_exact_early'))}.",
        f"- D_T vs severity: paper {fmt_corr(corr('D_T'))}; exact {fmt_corr(corr('D_T_exact'))}.",
        f"- mean D_x over samples: paper {fmt(at_last['D_x'].mean())}, exact {fmt(at_last['D_x_exact'].mean())}; "
        "for a fixed sampler the two references differ by the same constant for every sample, so their r agree.",
        f"- regressing on the final generated latent instead (the authors' exploratory variant): "
        f"D_x paper {fmt_corr(corr('D_x_final'))}.",
        f"- the paper reports Pearson {PAPER_PEARSON} with SSCD severity on pretrained models.",
    ]
    return lines


def write_report(eval_dir, settings: dict | None = None, failed=(), n_boot: int = 1000) -> Path:
    """summary.json, figures/ and report.md from the tables in `eval_dir`."""
    eval_dir = Path(eval_dir)
    settings = settings or json.loads((eval_dir / "settings.json").read_text())
    per_sample = pd.read_csv(eval_dir / "per_sample.csv")
    summary = summarize(per_sample, settings, n_boot)
    summary["skipped_checkpoints"] = list(failed)
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
    lines += findings(summary, settings, last, table[table["checkpoint_step"] == last])
    lines += [""] + group_lines(table[table["checkpoint_step"] == last], settings, n_boot)
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
    write_text_atomic(eval_dir / "report.md", "\n".join(lines))
    return eval_dir / "report.md"


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
    mean, low, high = stats.bootstrap_mean(values, n_boot, seed=seed)
    if math.isnan(mean):
        return "n/a (no samples)"
    return f"{fmt(mean)} [{fmt(low)}, {fmt(high)}]"


def group_lines(at_last: pd.DataFrame, settings: dict, n_boot: int) -> list[str]:
    """Finding 1 by group (memorized vs not) and k by duplication factor and guidance scale, at one checkpoint."""
    g, hi = f"{settings['guidance_scale']:g}", settings["high_noise_timestep"]
    memorized = (at_last["severity"] > settings["threshold"]).to_numpy()
    lines = [f"Memorized (n = {int(memorized.sum())}) vs not (n = {int((~memorized).sum())}), mean per sample "
             f"with a 95% bootstrap interval:", "",
             "| quantity | memorized | not memorized |", "|---|---|---|"]
    for col, name in ((f"loss_cfg_{g}_early", f"L_g (g = {g}), t >= {hi}"), (f"loss_cfg_{g}", f"L_g (g = {g}), all t"),
                      ("loss_cond_early", f"L_c, t >= {hi}"), ("loss_cond", "L_c, all t"),
                      (f"k_cfg_{g}_early", f"k_g (g = {g}), t >= {hi}"), ("k_cond_early", f"k_c, t >= {hi}")):
        if col in at_last:
            values = at_last[col].to_numpy(float)
            lines.append(f"| {name} | {mean_ci(values[memorized], n_boot)} | {mean_ci(values[~memorized], n_boot)} |")
    scales = sorted({float(c[len("k_cfg_"):-len("_early")]) for c in at_last.columns
                     if c.startswith("k_cfg_") and c.endswith("_early") and c != "k_cfg_early"})
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Rebuild summary.json, figures and report.md from the tables")
    parser.add_argument("--eval_dir", required=True)
    print(write_report(parser.parse_args().eval_dir))
