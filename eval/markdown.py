"""report.md and headline.md of a checkpoint evaluation, rendered from summary.json (eval/summary.py) and the
tables: severity over training, the paper's findings with the measures that decided them, the premise, the anchor,
reliability, onset, and the early warning. `write_report` builds summary, figures and text in that order."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from eval.figures import draw_figures, loss_curve_figure
from eval.warning_section import headline_line, warning_figure, warning_lines
from eval.summary import build_summary
from eval.tables import fmt, fmt_corr, fmt_diff, last_checkpoint_rows
from mem_analysis import stats, verdicts
from mem_analysis.io import write_text_atomic
from mem_analysis.severity import MEMORIZED_SHARE

GUIDED_K = re.compile(r"^k_cfg_(\d+(?:\.\d+)?)_early$")  # k_cfg_<g>_early, not the _uncentred variants


def markdown_table(frame: pd.DataFrame) -> list[str]:
    """A step x duplication-factor table in markdown, numbers as `fmt` prints them."""
    head = "| step | " + " | ".join(f"dup {c}" for c in frame.columns) + " |"
    lines = [head, "|" + "---|" * (len(frame.columns) + 1)]
    for step, row in frame.iterrows():
        lines.append(f"| {int(step)} | " + " | ".join(fmt(float(v)) for v in row.values) + " |")
    return lines


def mean_ci(values: np.ndarray, n_boot: int, seed: int = 0) -> str:
    """'mean [low, high]': the mean with a 95% percentile-bootstrap interval (resampling the values)."""
    mean, low, high = stats.mean_interval(values, n_boot, seed=seed)
    return "n/a (no samples)" if np.isnan(mean) else f"{fmt(mean)} [{fmt(low)}, {fmt(high)}]"


def measure_line(col: str, m: dict) -> str:
    """One deciding measure of a correlation finding: pooled r, within-factor r (deciding), partial r, verdict."""
    if m.get("missing"):
        return f"{col}: not in the table: {m['verdict']}"
    return (f"{col} pooled {fmt_corr(m['pooled'] or dict(r=None))}, within factor (fixed effects) "
            f"{fmt_corr(m['within'])}, partial given log(1 + F) {fmt_corr(m['partial'])} "
            f"({'+' if m['sign'] > 0 else '-'} predicted): {m['verdict']}")


def contrast_line(col: str, m: dict) -> str:
    """One measure of finding (i): memorized minus not within factor (deciding) and pooled, and its verdict."""
    if m.get("missing"):
        return f"{col}: not in the table: {m['verdict']}"
    return (f"{col} within factor {fmt_diff(m['within'])}, pooled {fmt_diff(m['pooled'])} "
            f"({'higher' if m['sign'] > 0 else 'lower'} predicted): {m['verdict']}")


def contrast_table(decided: dict) -> list[str]:
    """Finding (i) per duplication factor: memorized minus not of each deciding measure (one class: untestable)."""
    cols = [c for c, m in decided["measures"].items() if not m.get("missing")]
    if not cols:
        return []
    lines = ["", "| dup_factor | memorized / not | " + " | ".join(f"{c} (memorized - not)" for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for f, d in decided["measures"][cols[0]]["per_factor"].items():
        cells = ["untestable (one class only)" if decided["measures"][c]["per_factor"][f].get("untestable")
                 else fmt_diff(decided["measures"][c]["per_factor"][f]) for c in cols]
        lines.append(f"| {f} | {d['n_pos']} / {d['n_neg']} | " + " | ".join(cells) + " |")
    return lines + [""]


def verdict_text(decided: dict) -> str:
    """'holds', or 'partly holds (D_x_early holds; D_T_early carried by duplication alone)'."""
    return decided["verdict"] + (f" ({decided['detail']})" if decided.get("detail") else "")


def findings(summary: dict, settings: dict, last: int, at_last: pd.DataFrame) -> list[str]:
    """The paper's three findings, each decided by the measures of mem_analysis.verdicts.FINDINGS, pooled and within
    duplication factor, with the line saying which measure decided it and why, then the secondary figures."""
    g = f"{settings['guidance_scale']:g}"
    entry = summary["checkpoints"][str(last)][g]
    corr = lambda col: entry["correlations"].get(col, {}).get("pearson", dict(r=None))  # noqa: E731
    det = lambda col: entry["detection"].get(col, {})  # noqa: E731
    hi = settings["high_noise_timestep"]
    K = f"{settings['early_steps']} DDIM steps" if settings.get("early_steps") else f"DDIM steps with t >= {hi}"
    n, m = entry["n_samples"], entry["n_memorized"]
    lines = [f"At the last evaluated checkpoint (step {last}, g = {g}, {n} probe samples, {m} memorized: "
             f"memorized_fraction >= {MEMORIZED_SHARE:g}). A finding holds only if it holds across all samples "
             "(pooled) AND among samples of equal duplication factor (within factor: both variables residualised "
             "on factor dummies, the deciding figure; the partial r given log(1 + F) is shown beside); pooled without "
             "within is \"carried by duplication alone\". r is Pearson with severity; intervals are 95% bootstrap, "
             "within factor resampling samples within their factor. Rules: docs/findings.md.", ""]
    if m in (0, n):
        lines += [f"{'No' if m == 0 else 'Every'} probe sample is memorized at this checkpoint: finding 1's contrast "
                  "cannot be formed and detection scores (AUROC) are undefined.", ""]
    for key, number in (("i", 1), ("ii", 2), ("iii", 3)):
        spec, decided = verdicts.FINDINGS[key], summary["findings"][key]
        if decided["kind"] == "contrast":
            decided_by = ("the contrast at equal duplication factor, memorized minus not: "
                          + "; ".join(contrast_line(c, mm) for c, mm in decided["measures"].items()))
        else:
            decided_by = "; ".join(measure_line(c, mm) for c, mm in decided["measures"].items())
        lines += [f"**{number}. {spec['title']}** -- {verdict_text(decided)}.",
                  f"- Decided by {decided_by}. Why these: {spec['why']}.",
                  "- Secondary (pooled): " + "; ".join(f"{col} {fmt_corr(corr(col))}" for col in spec["secondary"]
                                                       if col in entry["correlations"]) + "."]
        if decided["kind"] == "contrast":
            lines += contrast_table(decided)
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


def premise_lines(premise: dict) -> list[str]:
    """The premise check: first-step k_0 per duplication factor against the held-out images, the references beside
    it, the training-side probe, and its one-line verdict."""
    null = premise["null"] or (f"none: fewer than {verdicts.MIN_HELDOUT} held-out probe images, so the fallback "
                               f"|k0_first| < {premise['tolerance']:g} (not a test against a null)")
    lines = [f"**Premise: the unconditional prediction carries no x (k_0 ~ 0)** -- {premise['sentence']}.",
             f"- Decided by k0_first ({premise['window']}) against the null: {null}. A factor fails when the 95% "
             f"interval of delta_k0 = k0_first(factor) - k0_first(held-out) lies above {premise['tolerance']:g}, holds "
             f"when it lies below. Beside it: the analytic k_0 of the optimal Gaussian denoiser fitted on the training "
             f"latents (a denoiser that memorizes nothing; premise_reference.json), k_0 on Gaussian probes, and the "
             f"training-side probe k_uncond_early ({premise['training_probe']}) with its analytic value.", "",
             "| dup_factor | samples | k0_first [95% CI] | delta_k0 [95% CI] | premise | analytic k_0, first step | "
             "k_0 Gaussian probes | training-side probe k_uncond_early centred / uncentred | its analytic value |",
             "|---|---|---|---|---|---|---|---|---|"]
    for dup, n in premise["n_by_dup"].items():
        k0 = premise["k0_first_by_dup"].get(dup)
        first = f"{fmt(k0['mean'], 2)} [{fmt(k0['ci_low'], 2)}, {fmt(k0['ci_high'], 2)}]" if k0 else "n/a"
        delta = premise["delta_k0_by_dup"].get(dup)
        delta = fmt_diff(delta) if delta else ("(the null)" if dup == "0" and premise["null"] else "n/a")
        lines.append(f"| {dup} | {n} | {first} | {delta} | {premise['state_by_dup'].get(dup, '')} | "
                     f"{fmt(premise['analytic_k0_by_dup'].get(dup), 2)} | "
                     f"{fmt(premise['k0_gauss_by_dup'].get(dup), 2)} | "
                     f"{fmt(premise['k_uncond_by_dup'].get(dup), 2)} / "
                     f"{fmt(premise['k_uncond_uncentred_by_dup'].get(dup), 2)} | "
                     f"{fmt(premise['analytic_k0_forward_by_dup'].get(dup), 2)} |")
    return lines


def anchor_lines(summary: dict, settings: dict, last: int) -> list[str]:
    """The paper's per-model Pearson r beside this run's D_x_early figure, the all-steps D_x below, and what differs."""
    entry = summary["checkpoints"][str(last)][f"{settings['guidance_scale']:g}"]
    c = lambda col: entry["correlations"].get(col, {}).get("pearson", dict(r=None, n=0))  # noqa: E731
    lines = ["Each of the paper's figures is ONE Pearson correlation per model, across its prompts, between the "
             "schedule deviation and SSCD severity. The mapping of the three numbers to models is taken from the "
             "paper's text (as docs/findings.md quotes it); this run is a fourth model, read with D_x over the early "
             "steps, not the paper's all-steps D_x (whose late terms restate severity here).", "",
             "| model | Pearson r (D_x vs severity, paper schedule; the paper's rows over all steps) | n prompts |",
             "|---|---|---|"]
    lines += [f"| {model} (paper) | {r:.2f} | (paper) |" for model, r in verdicts.PAPER_ANCHORS]
    lines += [f"| this run (step {last}), D_x_early | {fmt_corr(c('D_x_early'))} | {c('D_x_early').get('n')} |",
              f"| this run (step {last}), all-steps D_x (secondary) | {fmt_corr(c('D_x'))} | {c('D_x').get('n')} |", "",
              f"Conditions that differ: the window (the first sampling steps here, all steps in the paper); model "
              f"(this run: `{settings['model']}`, fine-tuned here, vs pretrained SD v1.4 / v2.1 / Realistic Vision); "
              f"prompts (the probe captions of a dataset with controlled duplication, vs the paper's prompt sets, so "
              f"this r also spans duplication factors: its within-factor figure is finding 3's); severity "
              f"(`{settings['severity_backend']}` vs SSCD); seeds ({len(settings['seeds'])} vs the paper's); sampler "
              f"steps (DDIM {settings['num_inference_steps']} vs 50, so a sum D is not comparable: the per-step "
              f"D_x_mean is)."]
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


def group_lines(at_last: pd.DataFrame, settings: dict, n_boot: int) -> list[str]:
    """Finding 1 by group (memorized vs not) and k by duplication factor and guidance scale, at one checkpoint."""
    g, hi = f"{settings['guidance_scale']:g}", settings["high_noise_timestep"]
    memorized = verdicts.memorized_labels(at_last)
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


def label_agreement_lines(agreement: dict | None, settings: dict, last: int) -> list[str]:
    """report.md: the labels' counts and agreement per duplication factor, and where similarity and copy disagree."""
    if not agreement:
        return ["The tables hold no per-seed copy label (written before it existed): the labels are not compared.", ""]
    lines = [f"Labels compared at step {last}, g = {settings['guidance_scale']:g}: samples memorized (at least half of "
             f"their seeds) by the copy label (d(paired) / d(nearest other training image) < "
             f"{settings.get('copy_ratio', float('nan')):g}, pixel L2 over the training pool), by the similarity label "
             f"(`{settings['severity_backend']}` > {settings['threshold']:g}) and by nearest-neighbour identity (the "
             f"nearest training image is the paired one); agreement = share of samples on which two labels agree. "
             f"Held-out samples (dup 0) have no training image to copy.", "",
             "| dup_factor | samples | copy | similarity | NN identity | agree copy/similarity | agree copy/NN | "
             "seeds similar, not copies | seeds copies, not similar | median d(paired) / d(other) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for dup, a in agreement.items():
        lines.append(f"| {dup} | {a['samples']} | {a['copy']} | {a['similarity']} | {a['nn_identity']} | "
                     f"{fmt(a['agree_copy_similarity'], 2)} | {fmt(a['agree_copy_nn'], 2)} | "
                     f"{a['seeds_similar_not_copy']} of {a['seeds']} | {a['seeds_copy_not_similar']} of {a['seeds']} | "
                     f"{fmt(a['median_copy_ratio'], 2)} |")
    differ = {dup: a["similar_not_copy"] + a["copy_not_similar"] for dup, a in agreement.items()}
    total, n = sum(differ.values()), sum(a["samples"] for a in agreement.values())
    if total == 0:
        lines += ["", f"The similarity label and the copy label agree on all {n} samples."]
    else:
        lines += ["", f"**The similarity label and the copy label disagree on {total} of {n} samples**: "
                  + ", ".join(f"{dup}x {count} of {agreement[dup]['samples']} ({agreement[dup]['similar_not_copy']} "
                              f"similar but not copies, {agreement[dup]['copy_not_similar']} copies not similar)"
                              for dup, count in differ.items() if count) + "."]
    return lines + [""]


def onset_summary(summary: dict) -> list[str]:
    """Per duplication factor: how many samples became memorized (`label_rule`), when, and whether D_x rose first."""
    lines = ["| dup_factor | samples | memorized | median onset step | D_x rose | rose before the onset | "
             "rose at the onset checkpoint | rose after |", "|---|---|---|---|---|---|---|---|"]
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


def headline_lines(summary: dict, settings: dict, at_last: pd.DataFrame, last: int) -> list[str]:
    """headline.md, rendered from summary.json's `headline` block (and the intervals of its `findings`)."""
    g = f"{settings['guidance_scale']:g}"
    entry = summary["checkpoints"][str(last)][g]
    corr = lambda col: fmt_corr(entry["correlations"].get(col, {}).get("pearson", dict(r=None)))  # noqa: E731
    block, f = summary["headline"], summary["findings"]
    fraction = sorted(((int(k.rsplit("_", 1)[1]), v) for k, v in block["figures"].items()
                       if k.startswith("memorized_fraction_dup_")), reverse=True)

    def pooled_within(key):
        parts = []
        for col, m in f[key]["measures"].items():
            if m.get("missing"):
                parts.append(f"{col} not measured")
            elif f[key]["kind"] == "contrast":
                parts.append(f"{col} memorized - not {fmt_diff(m['within'])} within factor, "
                             f"{fmt_diff(m['pooled'])} pooled")
            else:
                parts.append(f"{col} {fmt_corr(m['pooled'] or dict(r=None))} pooled, "
                             f"{fmt_corr(m['within'])} within factor")
        return "; ".join(parts)

    lines = [f"Step {block['step']}, g = {g}, {len(settings['seeds'])} seeds, DDIM {settings['num_inference_steps']} "
             f"steps, {entry['n_samples']} probe samples ({entry['n_memorized']} memorized: memorized_fraction >= "
             f"{MEMORIZED_SHARE:g}); a finding holds only if it holds pooled and within duplication factor; written by "
             "eval/report.py, do not edit.", "",
             "- Memorized fraction of seeds by duplication factor: "
             + ", ".join(f"{d}x {fmt(v, 2)}" for d, v in fraction) + ".",
             f"- Finding 1 (at equal duplication, memorized samples have the CFG loss higher and the conditional loss "
             f"lower), decided by loss_cfg_x0_early and loss_cond_x0_early: {block['verdicts']['finding_i']}; "
             f"{pooled_within('i')}.",
             f"- Finding 2 (early collapse), decided by collapse_early and cos_diff_xmu_early: "
             f"{block['verdicts']['finding_ii']}; {pooled_within('ii')}.",
             f"- Finding 3 (deviation tracks severity), decided by D_x_early and D_T_early: "
             f"{block['verdicts']['finding_iii']}; {pooled_within('iii')} (all-steps D_T, secondary: {corr('D_T')}).",
             f"- Premise k_0 ~ 0 (first-step k_0 against held-out images): {summary['premise']['sentence']}.",
             f"- Anchor: Pearson of D_x over the early steps with severity across this run's samples "
             f"{corr('D_x_early')}, beside the paper's "
             + ", ".join(f"{r:.2f} ({m})" for m, r in verdicts.PAPER_ANCHORS)
             + f" (all-steps D_x on pretrained models with SSCD severity; here all-steps D_x {corr('D_x')}, whose late "
             "terms restate severity; other conditions: report.md)."]
    rel = summary.get("reliability") or {}
    if "D_T_early" in rel and "D_x_early" in rel:
        lines.append(f"- Reliability across seeds: D_x_early {fmt(rel['D_x_early']['reliability'], 2)}, "
                     f"D_T_early {fmt(rel['D_T_early']['reliability'], 2)}, "
                     f"severity {fmt(rel['severity']['reliability'], 2)}.")
    warning = headline_line(summary.get("early_warning"))
    return lines + ([warning] if warning else [])


def write_report(eval_dir, settings: dict | None = None, failed=(), n_boot: int = 1000, run_dir=None) -> Path:
    """summary.json (eval/summary.py), figures/ (eval/figures.py), report.md and headline.md from the tables in
    `eval_dir` (and the run's warnings, from `run_dir`, by default the folder above `eval_dir`)."""
    eval_dir = Path(eval_dir)
    settings = settings or json.loads((eval_dir / "settings.json").read_text())
    per_sample = pd.read_csv(eval_dir / "per_sample.csv")
    summary, warnings = build_summary(eval_dir, per_sample, settings, failed, n_boot, run_dir)
    names = draw_figures(eval_dir, per_sample, summary, settings)

    g = settings["guidance_scale"]
    table = per_sample[per_sample["guidance_scale"] == g]
    last, at_last = last_checkpoint_rows(per_sample, g)
    severity = table.pivot_table(index="checkpoint_step", columns="dup_factor", values="severity", aggfunc="mean")
    fraction = table.pivot_table(index="checkpoint_step", columns="dup_factor", values="memorized_fraction", aggfunc="mean")
    lines = ["# Memorization over training", "",
             f"Model `{settings['model']}`, dataset `{settings['dataset']}`, {settings['weights']} weights"
             f"{' (LoRA)' if settings.get('lora') else ''}; DDIM {settings['num_inference_steps']} steps, "
             f"{len(settings['seeds'])} seeds, g = {g:g} ({settings.get('guidance_schedule', 'constant')} schedule); severity = `{settings['severity_backend']}` "
             f"(threshold {settings['threshold']:g}); deviations D use the `paper` schedule unless marked `exact`.", ""]
    if failed:
        lines += [f"Skipped (could not be loaded): {', '.join(failed)}.", ""]
    lines += ["## Severity over training", "", "Mean severity per duplication factor (rows: training step):", ""]
    lines += markdown_table(severity)
    lines += ["", f"Memorized fraction of seeds ({settings.get('label', 'similarity')} label; a sample is memorized "
              f"when it is at least {MEMORIZED_SHARE:g}, {summary['label_rule']}):", ""] + markdown_table(fraction)
    lines += ["", f"![severity]({'figures/' + names['severity']})", "", "## Labels compared", ""]
    lines += label_agreement_lines(summary.get("label_agreement"), settings, last)
    lines += ["## The paper's three findings, on this run", ""]
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
    lines += ["", f"Per sample: first step at which it is memorized ({summary['label_rule']}), and at which its D_x rose "
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
