"""How a run's tables decide the paper's three findings, its premise and its anchor (docs/findings.md).

Every rule here is fixed before any run: which measure decides each finding, the sign it must
have, the window it is read in, which way each score points for detection, and the premise's
tolerance. None of the deciding measures is severity in disguise (see `FINDINGS[...]["why"]`).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from mem_analysis import stats

# Scores whose value is *lower* for a memorized sample (all others: higher). Stated in advance, never fitted:
# final diversity and early collapse shrink when seeds converge; the conditional loss and the residual of the
# decomposition shrink when the image is reproduced; the noise predictions carry -x (negative cosines with x).
LOWER_IS_MEMORIZED_PREFIXES = ("diversity", "collapse_", "loss_cond", "residual", "cos_c_x", "cos_0_x", "cos_diff_x")
PREMISE_TOLERANCE = 0.2  # |k_0| below this counts as "the unconditional branch carries no x" (docs/findings.md)
PAPER_ANCHORS = (("SD v1.4", 0.92), ("SD v2.1", 0.92), ("Realistic Vision", 0.70))
FINDINGS = {
    "i": dict(title="Overestimation: under memorization the CFG loss is larger",
              decide=(("loss_cfg_x0_early", +1),),
              secondary=("loss_cfg_x0", "loss_cfg_early", "loss_cfg", "k_cfg_early", "k_cfg_uncentred_early"),
              why="the x0-space loss ||x - x0hat(e_g)||^2 = L_g / SNR_t is the paper's loss, and the high-noise window "
                  "is where the paper places overestimation; both were named in docs/findings.md before any run "
                  "(epsilon space weighs t by SNR_t, so its all-t average mostly reflects low-noise steps)"),
    "ii": dict(title="Trajectory collapse: memorized prompts lose seed diversity early",
               decide=(("collapse_early", -1), ("cos_diff_xmu_early", -1)),
               secondary=("diversity", "wen_magnitude"),
               why="both are read over the first sampling steps, before any image is formed; final-image diversity "
                   "is low by construction whenever every seed copies one image (it restates severity)"),
    "iii": dict(title="Decomposition deviation tracks severity",
                decide=(("D_x_early", +1), ("D_T", +1)),
                secondary=("D_x", "D_x_exact", "D_x_centred_early", "D_T_centred", "D_x_final"),
                why="D_x over the early steps and D_T measure the trajectory, not the result; the late terms of the "
                    "all-steps D_x approach the final latent's cosine with x, i.e. severity itself"),
}


def direction(column: str) -> str:
    """'lower' when a memorized sample's score is predicted lower, else 'higher' (see LOWER_IS_MEMORIZED_PREFIXES;
    cosines with the initial noise x_T are 'higher': a memorized prompt's noise prediction is its seed's noise)."""
    return "lower" if column.startswith(LOWER_IS_MEMORIZED_PREFIXES) and "_xT" not in column else "higher"


def ci_verdict(corr: dict | None, sign: int) -> str:
    """'holds' when the 95% interval of r excludes 0 on the predicted side, 'does not hold' otherwise,
    'cannot be tested' when r is undefined (constant values, fewer than 3 samples) or missing."""
    if corr is None or corr.get("r") is None:
        return "cannot be tested"
    return "holds" if (corr["ci_low"] > 0 if sign > 0 else corr["ci_high"] < 0) else "does not hold"


def combine(parts: dict[str, str]) -> str:
    """One verdict from the deciding measures' verdicts: all hold -> 'holds', none -> 'does not hold',
    some -> 'partly holds (...)'; measures that cannot be tested are named and left out."""
    testable = {k: v for k, v in parts.items() if v != "cannot be tested"}
    if not testable:
        return "cannot be tested"
    untested = [k for k in parts if k not in testable]
    held = [k for k, v in testable.items() if v == "holds"]
    if len(held) == len(testable):
        verdict = "holds"
    elif not held:
        verdict = "does not hold"
    else:
        verdict = "partly holds (" + "; ".join(f"{k} {v}" for k, v in testable.items()) + ")"
    return verdict + (f" ({', '.join(untested)} cannot be tested)" if untested else "")


def decide(correlations: dict, finding: str) -> dict:
    """{'verdict', 'measures': {column: verdict}} of one finding from {column: {'pearson': corr}}."""
    spec = FINDINGS[finding]
    parts = {col: ci_verdict(correlations.get(col, {}).get("pearson"), sign) for col, sign in spec["decide"]}
    return dict(verdict=combine(parts), measures=parts, why=spec["why"])


def premise(at_last: pd.DataFrame, tolerance: float = PREMISE_TOLERANCE) -> dict:
    """The mechanism's premise, k_0 ~ 0, per duplication factor: mean k_uncond (centred, high-noise window).

    `at_last`: one checkpoint's rows at one guidance scale, with `dup_factor`, `k_uncond_early` and
    (when present) `k_uncond_uncentred_early`. Holds for a factor when |mean k_0| < `tolerance`.
    """
    by_dup = at_last.groupby("dup_factor")
    k0 = by_dup["k_uncond_early"].mean()
    out = dict(window="high-noise window (t >= high_noise_timestep)", tolerance=tolerance,
               k_uncond_by_dup={str(int(d)): float(v) for d, v in k0.items()},
               n_by_dup={str(int(d)): int(n) for d, n in by_dup.size().items()})
    if "k_uncond_uncentred_early" in at_last:
        out["k_uncond_uncentred_by_dup"] = {str(int(d)): float(v)
                                            for d, v in by_dup["k_uncond_uncentred_early"].mean().items()}
    fails = [int(d) for d, v in k0.items() if not abs(v) < tolerance]
    out["holds_for"] = [int(d) for d in k0.index if int(d) not in fails]
    out["fails_for"] = fails
    if not fails:
        out["verdict"] = f"holds: |k_0| < {tolerance:g} at every duplication factor"
    else:
        worst = int(k0.abs().idxmax())
        out["verdict"] = (f"fails for duplication factor(s) {', '.join(map(str, fails))} (k_0 = {k0[worst]:.2f} at "
                          f"{worst}x): the unconditional branch also carries the training image, so guidance "
                          f"amplifies it by (1 - k_0) = {1 - k0[worst]:.2f} of the paper's factor")
    return out


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
