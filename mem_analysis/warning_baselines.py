"""The early warning beside the signals a practitioner already has (docs/science.md, "Early warning: baselines,
lead time, out of sample"), and its lead time on the checkpoint grid.

At a probe step s every probe sample i gets one score per signal, each oriented so that memorization raises it:
- `warning`: the warning's score (mem_analysis.early_warning);
- `duplication`: dup_factor(i), a near-duplicate count known before training; at any step s > 0 it ranks the
  samples exactly as the exposure count dup_factor(i) x s B / N_rows (copies seen so far) does;
- `lc_fall`, `k_excess`, `lg_excess`: each feature of the warning alone (`early_warning.sample_features`);
  `lc_fall`, the fall of the conditional loss since the first probe, is plain overfitting;
- `sampling`: a sampling monitor, the mean severity of sample i's first n seeds at the latest evaluated checkpoint
  c <= s, as a robust z against the null samples of that checkpoint (leave-one-out for the null ones: the
  warning's own standardisation, `early_warning.leave_one_out_scores`).
Labels: memorized at the last evaluated checkpoint (the caller's label). Each comparison uses the samples
where every compared score is defined.
"""
from __future__ import annotations

import math

import numpy as np

from mem_analysis import early_warning
from mem_analysis.stats import auroc_rows, auroc_with_ci, tpr_at_fpr

SIGNALS = ("warning", "duplication", "lc_fall", "k_excess", "lg_excess", "sampling")
BASELINES = SIGNALS[1:]


def paired_auroc_difference(score_a, score_b, labels, n_boot: int = 1000, confidence: float = 0.95,
                            seed: int = 0) -> dict:
    """`AUROC(a) - AUROC(b)` on the same samples, with a paired percentile bootstrap over samples: each resample
    draws sample indices i*_1..i*_n with replacement and takes `AUROC(a[i*]) - AUROC(b[i*])` (resamples holding
    one class are skipped). {'diff', 'ci_low', 'ci_high', 'n'}; diff None with one class."""
    a, b = np.asarray(score_a, np.float64), np.asarray(score_b, np.float64)
    labels = np.asarray(labels).astype(bool)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b, labels = a[ok], b[ok], labels[ok]
    out = dict(diff=None, ci_low=None, ci_high=None, n=int(len(a)))
    if labels.all() or not labels.any():
        return out
    out["diff"] = float(auroc_rows(a, labels) - auroc_rows(b, labels))
    pick = np.random.default_rng(seed).integers(0, len(a), (max(n_boot, 0), len(a)))
    boots = auroc_rows(a[pick], labels[pick]) - auroc_rows(b[pick], labels[pick])
    boots = boots[np.isfinite(boots)]
    if boots.size:
        out["ci_low"], out["ci_high"] = (float(q) for q in np.quantile(boots, [(1 - confidence) / 2,
                                                                                (1 + confidence) / 2]))
    return out


def alarm_rates(alarms, labels) -> dict:
    """{'tpr': share of memorized samples alarmed, 'fpr': share of the others alarmed} (None for an empty class)."""
    alarms, labels = np.asarray(alarms, bool), np.asarray(labels, bool)
    return dict(tpr=float(alarms[labels].mean()) if labels.any() else None,
                fpr=float(alarms[~labels].mean()) if (~labels).any() else None)


def within_factor_auroc(scores, labels, factors, n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Per duplication factor F holding both classes, `stats.auroc_with_ci` over the samples of factor F
    only: which of the equally duplicated images will be memorized, a question a duplicate count cannot answer."""
    scores, labels, factors = np.asarray(scores, np.float64), np.asarray(labels, bool), np.asarray(factors)
    out = {}
    for factor in sorted(set(factors.tolist())):
        own = factors == factor
        if labels[own].any() and not labels[own].all():
            out[str(int(factor))] = auroc_with_ci(scores[own], labels[own], n_boot, seed=seed)
    return out


def compare_signals(scores: dict[str, np.ndarray], labels, factors, warning_alarms, n_boot: int = 1000,
                    seed: int = 0) -> dict:
    """One probe step: every signal's AUROC [95% CI], its TPR at the warning's false-positive rate, its AUROC within
    each duplication factor, and the warning's margin over it, `AUROC_warning - AUROC_signal` [paired bootstrap CI].

    Signals defined on no sample are left out; the rest are compared on the samples where all are defined.
    The warning's own alarms give its (TPR, FPR); every signal (the warning included) is then read at its best
    threshold with FPR <= that FPR (`stats.tpr_at_fpr`). `best_baseline`: the non-warning signal of highest AUROC.
    """
    labels, factors = np.asarray(labels, bool), np.asarray(factors)
    scores = {k: np.asarray(v, np.float64) for k, v in scores.items() if np.isfinite(np.asarray(v, float)).any()}
    common = np.all([np.isfinite(v) for v in scores.values()], axis=0)
    labels, factors, alarms = labels[common], factors[common], np.asarray(warning_alarms, bool)[common]
    scores = {k: v[common] for k, v in scores.items()}
    out = dict(n=int(common.sum()), n_positive=int(labels.sum()), warning_alarm=alarm_rates(alarms, labels),
               signals={}, best_baseline=None)
    fpr = out["warning_alarm"]["fpr"]
    both = labels.any() and not labels.all()
    for name, values in scores.items():
        entry = auroc_with_ci(values, labels, n_boot, seed=seed)
        entry["tpr_at_warning_fpr"] = tpr_at_fpr(values, labels, fpr) if both and fpr is not None else None
        entry["within"] = within_factor_auroc(values, labels, factors, n_boot, seed)
        if name != "warning" and "warning" in scores:
            entry["margin"] = paired_auroc_difference(scores["warning"], values, labels, n_boot, seed=seed)
        out["signals"][name] = entry
    ranked = [(e["auroc"], k) for k, e in out["signals"].items() if k != "warning" and e["auroc"] is not None]
    out["best_baseline"] = max(ranked)[1] if ranked else None
    return out


def decision_step(probe_steps, onsets) -> int | None:
    """The step at which "earlier" is decided, fixed before looking at any score: the last probe step before the
    first onset of any sample (an alarm later than that cannot precede every onset); the last probe step when no
    sample crosses; None when the first onset precedes every probe step."""
    steps = sorted(int(s) for s in probe_steps)
    first = min((int(o) for o in onsets if o is not None), default=None)
    if first is None:
        return steps[-1] if steps else None
    before = [s for s in steps if s < first]
    return before[-1] if before else None


def verdict(entry: dict) -> dict:
    """Does the warning beat the best baseline at this step? `beats` when the paired 95% interval of the
    margin over the best baseline lies above 0; `worse` when it lies below; else `not_shown`."""
    best = entry.get("best_baseline")
    margin = entry["signals"].get(best, {}).get("margin") if best else None
    if not margin or margin["diff"] is None or margin["ci_low"] is None:
        return dict(outcome="undefined", best_baseline=best, margin=margin)
    outcome = "beats" if margin["ci_low"] > 0 else "worse" if margin["ci_high"] < 0 else "not_shown"
    return dict(outcome=outcome, best_baseline=best, margin=margin)


def lead_interval(alarm_step, onset_step, checkpoints) -> dict:
    """Alarm and onset on one grid, the checkpoints c_1 < ... < c_K: the alarm counts at the first checkpoint at or
    after it, a_c = min{c_j >= alarm}; the onset is a checkpoint c_m (the first at which the sample is memorized),
    so the sample crossed in (c_(m-1), c_m] and the lead lies in [c_(m-1) - a_c, c_m - a_c] (`lead_low`,
    `lead_high`; low None when c_m is the first checkpoint). `certain` when lead_low >= 0: the alarm came no later
    than the last checkpoint at which the sample was not yet memorized."""
    grid = sorted(int(c) for c in checkpoints)
    alarm_c = None if alarm_step is None else next((c for c in grid if c >= int(alarm_step)), None)
    out = dict(alarm_step=alarm_step, alarm_checkpoint=alarm_c, onset_step=onset_step, previous_checkpoint=None,
               lead_low=None, lead_high=None, certain=False)
    if onset_step is None:
        return out
    if int(onset_step) not in grid:
        raise ValueError(f"onset step {onset_step} is not a checkpoint of {grid}")
    position = grid.index(int(onset_step))
    out["previous_checkpoint"] = grid[position - 1] if position else None
    if alarm_c is not None:
        out["lead_high"] = int(onset_step) - alarm_c
        if position:
            out["lead_low"] = grid[position - 1] - alarm_c
            out["certain"] = out["lead_low"] >= 0
    return out


def lead_times(first_alarm: dict[int, int], onsets: dict[int, int | None], dup_factors: dict[int, int],
               checkpoints) -> dict:
    """Per sample the `lead_interval`, and per duplication factor: samples, alarmed (at a checkpoint), crossed,
    `certain` (alarm no later than the last checkpoint before the onset), and the medians of lead_low / lead_high
    over the samples that both alarmed and crossed."""
    per_sample = {str(s): dict(dup_factor=int(dup_factors[s]), **lead_interval(first_alarm.get(s), onsets.get(s),
                                                                               checkpoints))
                  for s in sorted(dup_factors)}
    by_factor = {}
    for factor in sorted(set(dup_factors.values()), reverse=True):
        rows = [r for r in per_sample.values() if r["dup_factor"] == factor]
        both = [r for r in rows if r["lead_high"] is not None]
        lows = [r["lead_low"] for r in both if r["lead_low"] is not None]
        by_factor[str(factor)] = dict(
            samples=len(rows), alarmed=sum(r["alarm_checkpoint"] is not None for r in rows),
            crossed=sum(r["onset_step"] is not None for r in rows), certain=sum(r["certain"] for r in rows),
            median_lead_low=float(np.median(lows)) if lows else None,
            median_lead_high=float(np.median([r["lead_high"] for r in both])) if both else None, paired=len(both))
    return dict(per_sample=per_sample, by_factor=by_factor)


def first_true_step(steps, flags) -> int | None:
    """The first of `steps` (increasing) whose flag is true; None when none is."""
    return next((int(s) for s, f in zip(steps, flags) if f), None)


def monitor_severity(per_seed_rows: list[dict], n_seeds: int, column: str) -> dict[int, dict[int, float]]:
    """{checkpoint step: {sample_id: mean of `column` over the sample's first `n_seeds` seeds}} (seeds in order)."""
    seeds = sorted({int(r["seed"]) for r in per_seed_rows})[:n_seeds]
    totals: dict[int, dict[int, list[float]]] = {}
    for r in per_seed_rows:
        if int(r["seed"]) in seeds:
            totals.setdefault(int(r["checkpoint_step"]), {}).setdefault(int(r["sample_id"]), []).append(
                float(r[column]))
    return {c: {s: float(np.mean(v)) for s, v in by.items()} for c, by in totals.items()}


def step_scores(rows: list[dict], baseline: dict[int, float], warnings: dict[int, dict], monitor: dict[int, float],
                high_noise_from: int, fpr: float) -> tuple[np.ndarray, np.ndarray, dict, np.ndarray]:
    """(sample_ids, dup_factors, {signal: scores}, warning alarms) of one probe step's rows."""
    ids, dups, feats = early_warning.sample_features(rows, baseline, high_noise_from)
    null = early_warning.null_mask(dups)
    nan = math.nan
    warn = np.array([nan if warnings.get(int(s), {}).get("score") is None else warnings[int(s)]["score"]
                     for s in ids], dtype=np.float64)
    alarms = np.array([bool(warnings.get(int(s), {}).get("alarm")) for s in ids])
    severity = np.array([monitor.get(int(s), nan) for s in ids], dtype=np.float64)
    sampling = (early_warning.leave_one_out_scores(severity[:, None], null, fpr)[0]
                if np.isfinite(severity).all() else np.full(len(ids), nan))
    scores = dict(warning=warn, duplication=dups.astype(np.float64), lc_fall=feats[:, 2], k_excess=feats[:, 0],
                  lg_excess=feats[:, 1], sampling=sampling)
    return ids, dups, scores, alarms


def compare_over_steps(probe_rows: list[dict], warnings: list[dict], monitor: dict[int, dict[int, float]],
                       memorized: dict[int, bool], fpr: float, high_noise_from: int, n_boot: int = 1000,
                       seed: int = 0) -> dict[str, dict]:
    """{probe step: compare_signals(...) plus `sampling_checkpoint`} over the samples that have a label; the
    sampling monitor at step s reads the latest checkpoint <= s in `monitor` (none: the signal is left out)."""
    by_step: dict[int, list[dict]] = {}
    for row in probe_rows:
        if int(row["sample_id"]) in memorized:
            by_step.setdefault(int(row["step"]), []).append(row)
    warned: dict[int, dict[int, dict]] = {}
    for w in warnings:
        warned.setdefault(int(w["step"]), {})[int(w["sample_id"])] = w
    if not by_step:
        return {}
    baseline = early_warning.mean_loss_cond(by_step[min(by_step)])
    out = {}
    for step in sorted(by_step):
        checkpoint = max((c for c in monitor if c <= step), default=None)
        ids, dups, scores, alarms = step_scores(by_step[step], baseline, warned.get(step, {}),
                                                monitor.get(checkpoint, {}), high_noise_from, fpr)
        labels = np.array([memorized[int(s)] for s in ids])
        out[str(step)] = dict(compare_signals(scores, labels, dups, alarms, n_boot, seed),
                              sampling_checkpoint=checkpoint)
    return out


def unet_calls(probe_timesteps: int, monitor_seeds: int, sampling_steps: int, guided: bool = True) -> dict:
    """Cost per sample and check, in UNet evaluations: a probe step costs 2 per probe timestep (e_c and e_0 at
    the fixed noise, every guided value derived from them); a sampling check costs seeds x steps x (2 with
    classifier-free guidance, else 1), plus one VAE decode per seed."""
    probe = 2 * int(probe_timesteps)
    sampling = int(monitor_seeds) * int(sampling_steps) * (2 if guided else 1)
    return dict(probe=probe, sampling=sampling, vae_decodes=int(monitor_seeds),
                ratio=sampling / probe if probe else None)
