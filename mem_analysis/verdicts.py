"""How a run's tables decide the paper's three findings, its premise and its anchor (docs/findings.md).

The rules: which measure decides each finding, the sign it must have, the window it is read in, which way each
score points for detection, the control for duplication and the premise's null and tolerance. They were
committed after the first demo reports had been read with other measures (docs/findings.md, "How these rules
came about"), so they are rules applied identically to every run since, not a pre-registration. None of the
deciding measures is severity in disguise (see `FINDINGS[...]["why"]`).

A finding holds only if it holds across all probe samples (pooled) AND among samples of equal duplication
factor (within factor): duplication causes memorization, so anything that rises with exposure correlates
with severity across factors. Pooled without within is reported as "carried by duplication alone".
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from mem_analysis import stats
from mem_analysis.severity import is_memorized

HOLDS, DOES_NOT_HOLD, CARRIED, PARTLY, UNTESTED = (
    "holds", "does not hold", "carried by duplication alone", "partly holds", "cannot be tested")
VERDICTS = (HOLDS, DOES_NOT_HOLD, CARRIED, PARTLY, UNTESTED)
# Scores whose value is *lower* for a memorized sample (all others: higher). Set from the mechanism, never fitted:
# final diversity and early collapse shrink when seeds converge; the conditional loss and the residual of the
# decomposition shrink when the image is reproduced; the noise predictions carry -x (negative cosines with x).
LOWER_IS_MEMORIZED_PREFIXES = ("diversity", "collapse_", "loss_cond", "residual", "cos_c_x", "cos_0_x", "cos_diff_x")
# Within-factor control that decides; the other method is shown beside it (stats.within_factor_correlation).
DECIDING_WITHIN, SHOWN_WITHIN = "fixed_effects", "partial"
PREMISE_TOLERANCE = 0.2  # delta_k0 (or |k_0| without a null) below this: "no more x than a never-trained image"
MIN_HELDOUT = 3  # held-out probe images needed to serve as the premise's null
PAPER_ANCHORS = (("SD v1.4", 0.92), ("SD v2.1", 0.92), ("Realistic Vision", 0.70))
FINDINGS = {
    "i": dict(title="Overestimation: under memorization the CFG loss is larger",
              kind="contrast", decide=(("loss_cfg_x0_early", +1), ("loss_cond_x0_early", -1)),
              secondary=("loss_cfg_x0", "loss_cfg_early", "loss_cfg", "loss_cond", "k_cfg_early"),
              why="the paper's contrast, at equal duplication: memorized samples have the plain conditional loss "
                  "L_c lower AND the CFG loss L_g higher than non-memorized ones (plain overfitting lowers L_c too, "
                  "so L_c alone cannot decide); both in x0 space (||x - x0hat||^2 = L / SNR_t, the paper's loss) over "
                  "the high-noise window, where a first prototype here saw the CFG excess (docs/science.md)"),
    "ii": dict(title="Trajectory collapse: memorized prompts lose seed diversity early",
               kind="correlation", decide=(("collapse_early", -1), ("cos_diff_xmu_early", -1)),
               secondary=("diversity", "wen_magnitude"),
               why="both are read over the first sampling steps, before any image is formed; final-image diversity "
                   "is low by construction whenever every seed copies one image (it restates severity)"),
    "iii": dict(title="Decomposition deviation tracks severity",
                kind="correlation", decide=(("D_x_early", +1), ("D_T_early", +1)),
                secondary=("D_T", "D_x", "D_x_exact", "D_x_centred_early", "D_T_centred", "D_x_final"),
                why="D_x and D_T over the early steps measure the trajectory, not the result; the late terms of the "
                    "all-steps sums approach the final latent's cosine with x (D_x) or its lost noise (D_T), i.e. "
                    "severity itself, so the all-steps figures are secondary"),
}


def direction(column: str) -> str:
    """'lower' when a memorized sample's score is predicted lower, else 'higher' (see LOWER_IS_MEMORIZED_PREFIXES;
    cosines with the initial noise x_T are 'higher': a memorized prompt's noise prediction is its seed's noise)."""
    return "lower" if column.startswith(LOWER_IS_MEMORIZED_PREFIXES) and "_xT" not in column else "higher"


def memorized_labels(table: pd.DataFrame) -> np.ndarray:
    """Per row, True when the sample is memorized: `severity.is_memorized(memorized_fraction)` (>= half its seeds)."""
    return is_memorized(table["memorized_fraction"].to_numpy(float))


def entry(value, kind: str = "r") -> dict:
    """A stats.Correlation or stats.Difference as the summary stores it: {kind, 'ci_low', 'ci_high', 'n'...},
    with None for what is undefined (NaN)."""
    clean = lambda v: None if v is None or not np.isfinite(v) else float(v)  # noqa: E731
    out = {kind: clean(value[0]), "ci_low": clean(value[1]), "ci_high": clean(value[2])}
    out.update({"n": int(value[3])} if kind == "r" else {"n_pos": int(value[3]), "n_neg": int(value[4])})
    return out


def excludes_zero(value: dict | None, sign: int) -> bool | None:
    """True when the 95% interval lies on the predicted side of 0, False when not, None when undefined."""
    if value is None or value.get("ci_low") is None or value.get("ci_high") is None:
        return None
    return value["ci_low"] > 0 if sign > 0 else value["ci_high"] < 0


def measure_verdict(pooled: dict | None, within: dict | None, sign: int) -> str:
    """One deciding measure: 'holds' when the interval excludes 0 on the predicted side both pooled and within
    factor; 'carried by duplication alone' when pooled only; 'does not hold' when not pooled; 'cannot be tested'
    when the pooled figure is undefined, or it holds pooled but the within-factor figure is undefined."""
    pooled_holds = excludes_zero(pooled, sign)
    if pooled_holds is None:
        return UNTESTED
    if not pooled_holds:
        return DOES_NOT_HOLD
    within_holds = excludes_zero(within, sign)
    return UNTESTED if within_holds is None else (HOLDS if within_holds else CARRIED)


def combine(parts: dict[str, str]) -> tuple[str, str]:
    """(verdict, detail) from the deciding measures' verdicts: all hold -> 'holds'; some -> 'partly holds';
    none, but all that do not are carried by duplication -> 'carried by duplication alone'; else 'does not hold'.
    Measures that cannot be tested are left out and named in the detail."""
    testable = {k: v for k, v in parts.items() if v != UNTESTED}
    untested = [k for k in parts if k not in testable]
    held = [k for k, v in testable.items() if v == HOLDS]
    if not testable:
        verdict = UNTESTED
    elif len(held) == len(testable):
        verdict = HOLDS
    elif held:
        verdict = PARTLY
    else:
        verdict = CARRIED if all(v == CARRIED for v in testable.values()) else DOES_NOT_HOLD
    mixed = verdict == PARTLY or len(set(testable.values())) > 1
    detail = "; ".join(f"{k} {v}" for k, v in testable.items()) if mixed else ""
    if untested and testable:
        detail = "; ".join(filter(None, [detail, f"{', '.join(untested)} cannot be tested"]))
    return verdict, detail


def within_entries(table: pd.DataFrame, column: str, n_boot: int) -> dict:
    """{'fixed_effects': r entry, 'partial': r entry} of `column` with severity within duplication factor."""
    x, y, f = (table[c].to_numpy(float) for c in (column, "severity", "dup_factor"))
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return {m: dict(r=None, ci_low=None, ci_high=None, n=int(ok.sum())) for m in stats.WITHIN_METHODS}
    return {m: entry(stats.within_factor_correlation(x[ok], y[ok], f[ok], m, n_boot)) for m in stats.WITHIN_METHODS}


def decide_correlation(table: pd.DataFrame, pooled: dict, finding: str, n_boot: int) -> dict:
    """A correlation finding (ii, iii): per deciding measure its pooled r (`pooled[col]['pearson']`, as summarize
    computed it), within-factor r (fixed effects, deciding; partial given log(1 + F), shown) and verdict."""
    spec, measures = FINDINGS[finding], {}
    for col, sign in spec["decide"]:
        if col not in table:
            measures[col] = dict(sign=sign, pooled=None, verdict=UNTESTED, missing=True)
            continue
        within = within_entries(table, col, n_boot)
        p = pooled.get(col, {}).get("pearson")
        measures[col] = dict(sign=sign, pooled=p, within=within[DECIDING_WITHIN], partial=within[SHOWN_WITHIN],
                             verdict=measure_verdict(p, within[DECIDING_WITHIN], sign))
    verdict, detail = combine({c: m["verdict"] for c, m in measures.items()})
    return dict(verdict=verdict, detail=detail, measures=measures, why=spec["why"], kind=spec["kind"])


def contrast_entries(table: pd.DataFrame, column: str, labels: np.ndarray, n_boot: int) -> dict:
    """Memorized minus non-memorized mean of `column`: pooled, within factor (stratified) and per factor."""
    values, factors = table[column].to_numpy(float), table["dup_factor"].to_numpy(float)
    per_factor = {}
    for f in np.unique(factors):
        at = factors == f
        if labels[at].all() or not labels[at].any():
            per_factor[str(int(f))] = dict(diff=None, ci_low=None, ci_high=None, n_pos=int(labels[at].sum()),
                                           n_neg=int((~labels[at]).sum()), untestable="one class only")
        else:
            per_factor[str(int(f))] = entry(stats.group_difference(values[at & labels], values[at & ~labels], n_boot),
                                            "diff")
    return dict(pooled=entry(stats.stratified_difference(values, labels, None, n_boot), "diff"),
                within=entry(stats.stratified_difference(values, labels, factors, n_boot), "diff"),
                per_factor=per_factor)


def decide_contrast(table: pd.DataFrame, pooled: dict, n_boot: int) -> dict:
    """Finding (i): memorized vs non-memorized at equal duplication factor. The CFG loss part (first deciding
    measure, predicted higher) carries the verdict; the conditional loss part (predicted lower) only completes it:
    L_g higher and L_c lower -> 'holds'; L_g higher alone -> 'partly holds'; L_g higher pooled only -> 'carried by
    duplication alone'; L_c lower without L_g higher (plain overfitting) -> 'does not hold'. Each measure's r with
    severity (pooled, within factor) is kept beside, for the headline; it does not decide."""
    spec = FINDINGS["i"]
    labels = memorized_labels(table)
    measures = {}
    for col, sign in spec["decide"]:
        if col not in table:
            measures[col] = dict(sign=sign, pooled=None, verdict=UNTESTED, missing=True)
            continue
        c = contrast_entries(table, col, labels, n_boot)
        within = within_entries(table, col, n_boot)  # shown beside: the same measure's r with severity
        measures[col] = dict(c, sign=sign, verdict=measure_verdict(c["pooled"], c["within"], sign),
                             r=dict(pooled=pooled.get(col, {}).get("pearson"), within=within[DECIDING_WITHIN],
                                    partial=within[SHOWN_WITHIN]))
    (cfg, _), (cond, _) = spec["decide"]
    g, c = measures[cfg]["verdict"], measures[cond]["verdict"]
    verdict = {HOLDS: HOLDS if c == HOLDS else PARTLY}.get(g, g)
    detail = "" if verdict in (HOLDS, UNTESTED) else f"{cfg} {g}; {cond} {c}"
    return dict(verdict=verdict, detail=detail, measures=measures, why=spec["why"], kind=spec["kind"])


def decide(table: pd.DataFrame, pooled_correlations: dict, finding: str, n_boot: int = 1000) -> dict:
    """{'verdict', 'detail', 'measures', 'why', 'kind'} of one finding, from one checkpoint's rows at one guidance
    scale (`dup_factor`, `severity`, `memorized_fraction`, the measures) and summarize's pooled correlations."""
    if FINDINGS[finding]["kind"] == "contrast":
        return decide_contrast(table, pooled_correlations, n_boot)
    return decide_correlation(table, pooled_correlations, finding, n_boot)


def reliability(per_seed: pd.DataFrame, per_sample: pd.DataFrame, columns, severity_column: str) -> dict:
    """Split-half reliability across seeds of each column and of severity, and the disattenuated r.

    `per_seed`: one checkpoint's per-seed rows at one guidance scale (`sample_id`, `seed`, the columns,
    `severity_column`); `per_sample`: the same checkpoint's per-sample rows (`severity`). For each
    column: `r_half`, `reliability` (Spearman-Brown), `r_severity` (Pearson across samples) and
    `r_disattenuated = r_severity / sqrt(rel_column rel_severity)`.
    """
    def matrix(col):
        return per_seed.pivot_table(index="sample_id", columns="seed", values=col).sort_index()

    sev = stats.split_half_reliability(matrix(severity_column).to_numpy())
    out = {"severity": dict(sev, column=severity_column)}
    table = per_sample.set_index("sample_id").sort_index()
    for col in columns:
        if col not in per_seed or col not in table:
            continue
        rel = stats.split_half_reliability(matrix(col).to_numpy())
        x, y = table[col].to_numpy(float), table["severity"].to_numpy(float)
        r = None if len(x) < 3 or stats.is_constant(x) or stats.is_constant(y) else float(np.corrcoef(x, y)[0, 1])
        out[col] = dict(rel, r_severity=r,
                        r_disattenuated=stats.disattenuated(r, rel["reliability"], sev["reliability"]))
    return out


def headline_block(summary: dict, at_last: pd.DataFrame, last: int) -> dict:
    """summary.json's `headline`: {'step', 'figures': {name: float or None}, 'verdicts': {name: verdict}}, the
    machine-readable figures a study runner aggregates over training seeds (names are a contract, never renamed):
    `memorized_fraction_dup_F`; per deciding measure `r_<col>` (pooled), `r_within_<col>` (fixed effects),
    `r_partial_<col>`, and for finding (i) `diff_<col>` / `diff_within_<col>` (memorized minus not); the premise's
    `k0_first_dup_F`, `delta_k0_dup_F`; the anchor `r_D_x_early` and the secondary `r_D_x`; `warning_auroc` (the
    early warning's AUROC at the last probe step) when the run has one. Verdicts: `finding_i`, `finding_ii`,
    `finding_iii`, `premise`, each one of VERDICTS."""
    figures = {f"memorized_fraction_dup_{int(d)}": float(v)
               for d, v in at_last.groupby("dup_factor")["memorized_fraction"].mean().items()}
    for result in summary["findings"].values():
        for col, m in result["measures"].items():
            r = m.get("r", m)  # contrast measures keep their r's under 'r'
            for name, key in ((f"r_{col}", "pooled"), (f"r_within_{col}", "within"), (f"r_partial_{col}", "partial")):
                figures[name] = (r.get(key) or {}).get("r")
            if result["kind"] == "contrast":
                figures[f"diff_{col}"] = (m.get("pooled") or {}).get("diff")
                figures[f"diff_within_{col}"] = (m.get("within") or {}).get("diff")
    premise = summary["premise"]
    for f, e in premise["k0_first_by_dup"].items():
        figures[f"k0_first_dup_{f}"] = e["mean"]
    for f, e in premise["delta_k0_by_dup"].items():
        figures[f"delta_k0_dup_{f}"] = e["diff"]
    correlations = summary["checkpoints"][str(last)][f"{summary['settings']['guidance_scale']:g}"]["correlations"]
    for col in ("D_x_early", "D_x"):
        figures[f"r_{col}"] = correlations.get(col, {}).get("pearson", {}).get("r")
    warning = summary.get("early_warning")
    if warning and warning.get("auroc_by_step"):
        last_probe = max(warning["auroc_by_step"], key=int)
        figures["warning_auroc"] = warning["auroc_by_step"][last_probe]["auroc"]
    verdicts = {f"finding_{k}": v["verdict"] for k, v in summary["findings"].items()}
    verdicts["premise"] = premise["verdict"]
    return dict(step=int(last), figures=figures, verdicts=verdicts)
