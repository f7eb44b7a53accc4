"""report.md's early-warning section and its figure, rendered from mem_analysis.warning_evaluation's result
(summary.json's `early_warning`): the warning beside its baselines, the verdict the numbers give, the lead time on
the checkpoint grid, false alarms and the probes' cost against sampling. Rendering only: every number is computed
in mem_analysis (warning_baselines, warning_evaluation, early_warning)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from eval.figures import save_figure  # noqa: E402
from eval.tables import fmt  # noqa: E402

NAMES = {"warning": "warning (training probes)", "duplication": "duplicate count (exposure)",
         "lc_fall": "L_c fall (overfitting)", "k_excess": "k_g high-noise (feature)",
         "lg_excess": "L_g high-noise (feature)", "sampling": "sampling monitor"}


def fmt_auroc(entry: dict | None) -> str:
    """'0.950 [0.800, 1.000]' (95% bootstrap interval over samples)."""
    if not entry or entry.get("auroc") is None:
        return "n/a"
    return f"{fmt(entry['auroc'])} [{fmt(entry['ci_low'])}, {fmt(entry['ci_high'])}]"


def fmt_margin(margin: dict | None) -> str:
    """'+0.050 [-0.100, 0.200]': the warning's AUROC minus a signal's, paired 95% bootstrap interval."""
    if not margin or margin.get("diff") is None:
        return "n/a"
    return f"{margin['diff']:+.3f} [{fmt(margin['ci_low'])}, {fmt(margin['ci_high'])}]"


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
    ax.plot([], [], "v", color="grey", mec="k", mew=0.5, label="onset: first checkpoint memorized (last probe step before it)")
    ax.set(xlabel="training step", ylabel="warning score (robust sd of the null)",
           title="early warning from training probes")
    ax.legend(fontsize=6)
    name = "warning_over_training.png"
    save_figure(fig, eval_dir / "figures" / name)
    return name


def row(cells: list[str]) -> str:
    """A markdown table row."""
    return "| " + " | ".join(cells) + " |"


def auroc_lines(result: dict) -> list[str]:
    """The warning's AUROC by probe step and the first step at which it reaches 0.9."""
    steps = result["auroc_by_step"]
    earliest, best = result["earliest_auroc_0_9"], result["best_auroc"]
    n_pos = max((a["n_positive"] for a in steps.values()), default=0)
    if best is None:
        line = f"AUROC undefined: {n_pos} of the probe samples are memorized at the last checkpoint (one class only)."
    elif earliest is not None:
        line = (f"**AUROC first reaches 0.9 at probe step {earliest}: {fmt_auroc(steps[str(earliest)])}** "
                f"({steps[str(earliest)]['n_positive']} memorized of {steps[str(earliest)]['n']}).")
    else:
        line = (f"**AUROC never reaches 0.9; best {fmt_auroc(steps[str(best)])} at probe step {best}** "
                f"({steps[str(best)]['n_positive']} memorized of {steps[str(best)]['n']}).")
    return [line, "", "| probe step | " + " | ".join(steps) + " |", "|---|" + "---|" * len(steps),
            "| AUROC | " + " | ".join(fmt(a["auroc"], 2) for a in steps.values()) + " |", ""]


def verdict_line(b: dict) -> str:
    """What the numbers say: an earlier signal only if it beats the best baseline at the decision step."""
    v, step, cost = b["verdict"], b["decision_step"], b["cost"]
    price = (f"a probe step costs {cost['probe']} UNet evaluations per sample, a {b['monitor_seeds']}-seed sampling "
             f"check {cost['sampling']} (and {cost['vae_decodes']} VAE decodes), {fmt(cost['ratio'], 1)} times more")
    if v["outcome"] == "undefined":
        return (f"**The warning cannot be compared with its baselines on this run** (decision step "
                f"{step if step is not None else 'none: the first onset precedes every probe step'}; one class, or "
                f"no defined margin). Cost: {price}.")
    best = NAMES.get(v["best_baseline"], v["best_baseline"])
    margin = f"AUROC margin {fmt_margin(v['margin'])}, paired bootstrap over samples"
    if v["outcome"] == "beats":
        return f"**The warning beats the best baseline ({best}) at step {step}** ({margin}). Cost: {price}."
    return (f"**The warning does not beat the best baseline ({best}) at step {step}** ({margin}): read it as a cheap "
            f"proxy for a sampling monitor, not an earlier signal; {price}.")


def baseline_lines(b: dict) -> list[str]:
    """AUROC of every signal by probe step, then at the decision step: CI, TPR at the warning's FPR, within-factor
    AUROC and the warning's margin over each, and the verdict."""
    names = [n for n in NAMES if any(n in e["signals"] for e in b["steps"].values())]
    lines = [f"Baselines (docs/science.md, \"Early warning: baselines\"): AUROC of each signal for \"memorized at the "
             f"last checkpoint\" at every probe step, on the samples where all are defined; the sampling monitor is "
             f"the mean severity of the first {b['monitor_seeds']} seeds at the latest checkpoint at or before the step, "
             "as a robust z against the null samples. The decision step is set by sampling, not by any score: the last "
             "probe step before the first onset (the last probe step when no sample is memorized).", "",
             "| probe step | sampling checkpoint | " + " | ".join(NAMES[n] for n in names) + " | best baseline | "
             "warning's margin over it |", "|---|---|" + "---|" * len(names) + "---|---|"]
    for step, e in b["steps"].items():
        best = e["best_baseline"]
        margin = e["signals"].get(best, {}).get("margin") if best else None
        cells = [fmt(e["signals"][n]["auroc"], 2) if n in e["signals"] else "n/a" for n in names]
        lines.append(f"| {step} | {e['sampling_checkpoint'] if e['sampling_checkpoint'] is not None else 'n/a'} | "
                     + " | ".join(cells) + f" | {NAMES.get(best, 'n/a')} | {fmt_margin(margin)} |")
    step = b["decision_step"]
    if step is None:
        return lines + ["", verdict_line(b), ""]
    e = b["steps"][str(step)]
    factors = sorted({f for s in e["signals"].values() for f in s["within"]}, key=int)
    fpr = e["warning_alarm"]["fpr"]
    lines += ["", f"At the decision step {step} ({e['n']} samples, {e['n_positive']} memorized; the warning's alarms: "
              f"TPR {fmt(e['warning_alarm']['tpr'], 2)} at FPR {fmt(fpr, 2)}):", "",
              row(["signal", "AUROC [95% CI]", f"TPR at FPR {fmt(fpr, 2)}"] + [f"AUROC within {f}x" for f in factors]
                  + ["warning's margin [paired 95% CI]"]), "|---|---|---|" + "---|" * len(factors) + "---|"]
    for name, s in e["signals"].items():
        lines.append(row([NAMES[name], fmt_auroc(s), fmt(s["tpr_at_warning_fpr"], 2)]
                         + [fmt_auroc(s["within"].get(f)) for f in factors]
                         + [fmt_margin(s.get("margin")) if name != "warning" else "-"]))
    return lines + ["", verdict_line(b), ""]


def lead_lines(b: dict) -> list[str]:
    """Lead time as an interval on the checkpoint grid, per definition of "memorized" and duplication factor."""
    lines = ["Lead time on the checkpoint grid: an alarm counts at the first checkpoint at or after it (a_c); a sample "
             "crossed between the last checkpoint before its onset (c_prev) and the onset (c_on), so its lead lies in "
             "[c_prev - a_c, c_on - a_c]. \"Certain\": the alarm came no later than c_prev. Medians over the samples "
             "that both alarmed and crossed.", "",
             "| memorized when | dup_factor | samples | alarmed | crossed | certain | median lead [low, high] (n) |",
             "|---|---|---|---|---|---|---|"]
    for label, lead in b["lead"].items():
        name = f"{label} ({b['main_rule']})" if label == b["main_label"] else label
        for factor, r in lead["by_factor"].items():
            lines.append(f"| {name} | {factor} | {r['samples']} | {r['alarmed']} | {r['crossed']} | {r['certain']} | "
                         f"[{fmt(r['median_lead_low'], 0)}, {fmt(r['median_lead_high'], 0)}] ({r['paired']}) |")
    return lines + [""]


def warning_lines(result: dict | None, figure: str | None) -> list[str]:
    """report.md's early-warning section."""
    lines = ["## Early warning from training probes", ""]
    if result is None:
        return lines + ["The run logged no probes (probe_steps 0): no warning to evaluate.", ""]
    b = result.get("baselines")
    design = "" if b is None else (" This run is one the warning was designed on (the Twemoji demo, training seed 0)."
                                   if b["designed_on"] else " This run is out of sample: the warning (features, null, "
                                   "threshold) was designed on the Twemoji demo, training seed 0, and is applied "
                                   "here frozen.")
    lines += ["Score per probe step and sample from the training probes alone (high-noise k_g and L_g at the "
              "largest probed g, and the fall of L_c from its start), in robust standard deviations of the null "
              "samples of the same step (held-out images when the dataset has them, else never-duplicated ones, "
              f"each null sample scored leave-one-out); the alarm fires at a {result['fpr']:g} false-alarm rate "
              "per probe step (docs/science.md, \"Early warning from training probes\"). It is measured against "
              "sampling: \"memorized\" = the report's label"
              + (f" ({b['main_rule']})" if b else "") + " at the last evaluated checkpoint." + design, ""]
    lines += auroc_lines(result)
    if b is not None:
        lines += baseline_lines(b) + lead_lines(b)
    fa = result["false_alarms"]
    lines += [f"**False alarms: {fa['count']} of {fa['never_duplicated']} never-duplicated probe samples** "
              f"alarmed at some probe step ({fa['alarmed_checks']} of {fa['checks']} (sample, step) checks, "
              f"{fmt(fa['alarmed_checks'] / fa['checks'] if fa['checks'] else None)} against the asked "
              f"{result['fpr']:g})" + (f": samples {', '.join(map(str, fa['samples']))}." if fa["samples"] else "."),
              ""]
    if figure:
        lines += [f"![early warning](figures/{figure})", ""]
    return lines


def headline_line(result: dict | None) -> str | None:
    """The README headline's line on the warning: its verdict against the best baseline, from summary.json."""
    if not result or not result.get("baselines"):
        return None
    b = result["baselines"]
    v, step = b["verdict"], b["decision_step"]
    warning = b["steps"][str(step)]["signals"].get("warning") if step is not None else None
    said = {"beats": "beats it", "not_shown": "does not beat it: a cheap proxy for sampling, not an earlier signal",
            "worse": "does worse: a cheap proxy for sampling, not an earlier signal",
            "undefined": "cannot be compared"}[v["outcome"]]
    return (f"- Early warning ({'designed on this run' if b['designed_on'] else 'out of sample'}), decided at probe "
            f"step {step if step is not None else 'n/a'} (the last before the first onset, or the last when none): AUROC {fmt_auroc(warning)}; "
            f"margin over the best baseline ({NAMES.get(v['best_baseline'], 'n/a')}) {fmt_margin(v['margin'])}: "
            f"{said} ({fmt(b['cost']['ratio'], 1)}x cheaper than a {b['monitor_seeds']}-seed sampling check).")
