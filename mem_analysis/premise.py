"""The paper's premise, k_0 ~ 0, judged against never-trained images (docs/findings.md, "The premise").

The paper's amplification argument (`k_g = 1 + (g - 1)(1 - k_0)` when `k_c = 1`) assumes the unconditional
estimate carries none of the training image. Where the paper measures it: the sampler's first prediction, from
pure Gaussian noise (`k0_first`, mean over seeds). Even a denoiser that memorizes nothing gives a k_0 that is not
exactly 0 on a finite set of seeds and images, so the premise is judged against a null: held-out probe images
(dup_factor 0, never trained) measured the same way. The forward-noised probe k_0 (`k_uncond_early`, on training
latents that still hold sqrt(abar_t) x) is a training-side probe, shown beside it and never deciding.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from mem_analysis import stats
from mem_analysis.verdicts import DOES_NOT_HOLD, HOLDS, MIN_HELDOUT, PARTLY, PREMISE_TOLERANCE, UNTESTED, entry

MEASURE = "k0_first"


def mean_by_dup(table: pd.DataFrame, column: str) -> dict[str, float]:
    """{str(dup_factor): mean of `column`} over the rows that have it."""
    if column not in table:
        return {}
    return {str(int(d)): float(v) for d, v in table.groupby("dup_factor")[column].mean().items() if np.isfinite(v)}


def mean_entry(values: np.ndarray, n_boot: int) -> dict:
    """{'mean', 'ci_low', 'ci_high', 'n'}: the mean of the finite values with a 95% bootstrap interval."""
    mean, low, high = stats.mean_interval(values, n_boot)
    clean = lambda v: float(v) if np.isfinite(v) else None  # noqa: E731
    return dict(mean=clean(mean), ci_low=clean(low), ci_high=clean(high), n=int(np.isfinite(values).sum()))


def factor_state(delta: dict, tolerance: float) -> str:
    """'fails' when delta_k0's interval lies wholly above the tolerance, 'holds' when wholly below it,
    'unresolved' when it straddles the tolerance (or is undefined)."""
    if delta["ci_low"] is None or delta["ci_high"] is None:
        return "unresolved"
    return "fails" if delta["ci_low"] > tolerance else "holds" if delta["ci_high"] < tolerance else "unresolved"


def against_null(k0: pd.Series, factors: np.ndarray, tolerance: float, n_boot: int) -> dict:
    """Per duplicated factor F: delta_k0 = mean k0_first(F) - mean k0_first(held-out) with a bootstrap interval
    (each group resampled on its own, stats.group_difference) and its state (`factor_state`)."""
    null = k0[factors == 0]
    delta, state = {}, {}
    for f in sorted(set(factors[factors > 0].tolist())):
        d = entry(stats.group_difference(k0[factors == f], null, n_boot), "diff")
        delta[str(int(f))], state[str(int(f))] = d, factor_state(d, tolerance)
    return dict(delta_k0_by_dup=delta, state_by_dup=state)


def verdict_of(states: dict[str, str]) -> str:
    """Over factors: any fail -> 'does not hold' (all that resolved fail) or 'partly holds'; none fails and one
    holds -> 'holds'; every factor unresolved -> 'cannot be tested'."""
    fails = [f for f, s in states.items() if s == "fails"]
    holds = [f for f, s in states.items() if s == "holds"]
    if fails:
        return DOES_NOT_HOLD if not holds else PARTLY
    return HOLDS if holds else UNTESTED


def sentence(out: dict) -> str:
    """The premise's one line: what was measured and what it shows, nothing beyond."""
    tol, states = out["tolerance"], out["state_by_dup"]
    named = lambda kind: ", ".join(f"{f}x" for f, s in states.items() if s == kind)  # noqa: E731
    if out["measure"] is None:
        return ("cannot be tested: first-step k_0 (k0_first) was not measured; the forward-noised probe k_0 is a "
                "training-side probe, not the premise")
    if out["null"] is None:
        worst = max(out["k0_first_by_dup"], key=lambda f: abs(out["k0_first_by_dup"][f]["mean"]))
        head = (f"cannot be judged against a null (fewer than {MIN_HELDOUT} held-out probe images); fallback "
                f"|k0_first| < {tol:g}: {out['verdict']}")
        return head + f" (largest |k0_first| {abs(out['k0_first_by_dup'][worst]['mean']):.2f} at {worst}x)"
    deltas = out["delta_k0_by_dup"]
    worst = max(deltas, key=lambda f: -np.inf if deltas[f]["diff"] is None else deltas[f]["diff"])
    d = deltas[worst]
    figure = ("delta_k0 undefined" if d["ci_low"] is None else
              f"delta_k0 = {d['diff']:.2f} [{d['ci_low']:.2f}, {d['ci_high']:.2f}] at {worst}x")
    if out["verdict"] in (DOES_NOT_HOLD, PARTLY):
        text = (f"{out['verdict']}: at {named('fails')} the first-step k_0 exceeds the held-out images' by more than "
                f"{tol:g} ({figure}): the unconditional first prediction carries more of these training images "
                "than of never-trained ones")
    elif out["verdict"] == HOLDS:
        text = f"holds: first-step k_0 within {tol:g} of the held-out images' ({figure})"
    else:
        text = f"cannot be tested: every interval of delta_k0 reaches past {tol:g} ({figure})"
    unresolved = named("unresolved")
    return text + (f"; not resolved at {unresolved} (interval straddles {tol:g})" if unresolved and out["verdict"]
                   != UNTESTED else "")


def premise(at_last: pd.DataFrame, tolerance: float = PREMISE_TOLERANCE, reference=None, n_boot: int = 1000) -> dict:
    """The premise per duplication factor, decided on first-step k_0 against the held-out images.

    `at_last`: one checkpoint's rows at one guidance scale with `dup_factor` and `k0_first` (and, shown beside,
    `k_uncond_early`, `k_uncond_uncentred_early`, `k0_gauss_early`). With at least
    MIN_HELDOUT held-out rows (dup_factor 0): per factor F > 0, `delta_k0 = mean k0_first(F) - mean
    k0_first(0)` with a 95% bootstrap interval; the premise fails for F when the interval lies wholly above
    `tolerance`, holds when wholly below it. Without them, the fallback |mean k0_first(F)| < tolerance, said as
    such. `reference`: the analytic k_0 of the optimal Gaussian denoiser fitted on the training latents (a denoiser
    that memorizes nothing), printed beside: {'first_step': {str(factor): k_0 at the sampler's first step, mean over
    seeds}, 'forward_early': {str(factor): k_0 on forward-noised latents over the high-noise window}} (`reference`
    `reference_from_file` reads it from evaluation's premise_reference.json).
    """
    factors = at_last["dup_factor"].to_numpy(float)
    sizes = at_last.groupby("dup_factor").size()
    out = dict(tolerance=tolerance, measure=None, null=None, n_by_dup={str(int(d)): int(n) for d, n in sizes.items()},
               window="the sampler's first prediction from pure Gaussian noise, mean over seeds",
               k0_first_by_dup={}, delta_k0_by_dup={}, state_by_dup={},
               analytic_k0_by_dup=dict((reference or {}).get("first_step", {})),
               analytic_k0_forward_by_dup=dict((reference or {}).get("forward_early", {})),
               k0_gauss_by_dup=mean_by_dup(at_last, "k0_gauss_early"),
               training_probe="forward-noised training latents in the high-noise window, which still hold "
                              "sqrt(abar_t) x of the image: not the premise",
               k_uncond_by_dup=mean_by_dup(at_last, "k_uncond_early"),
               k_uncond_uncentred_by_dup=mean_by_dup(at_last, "k_uncond_uncentred_early"))
    if MEASURE in at_last and at_last[MEASURE].notna().any():
        k0 = at_last[MEASURE].to_numpy(float)
        out["measure"] = MEASURE
        out["k0_first_by_dup"] = {str(int(f)): mean_entry(k0[factors == f], n_boot) for f in np.unique(factors)}
        if np.isfinite(k0[factors == 0]).sum() >= MIN_HELDOUT:
            out["null"] = "held-out probe images (dup_factor 0, never trained)"
            out.update(against_null(k0, factors, tolerance, n_boot))
        else:
            out["state_by_dup"] = {f: "holds" if abs(e["mean"]) < tolerance else "fails"
                                   for f, e in out["k0_first_by_dup"].items() if int(f) > 0 and e["mean"] is not None}
    out["holds_for"] = [int(f) for f, s in out["state_by_dup"].items() if s == "holds"]
    out["fails_for"] = [int(f) for f, s in out["state_by_dup"].items() if s == "fails"]
    out["verdict"] = verdict_of(out["state_by_dup"]) if out["measure"] else UNTESTED
    out["sentence"] = sentence(out)
    return out


def reference_from_file(premise_reference: dict | None) -> dict | None:
    """`premise`'s `reference` from evaluation's premise_reference.json (mem_analysis.gaussian_reference): per
    duplication factor the analytic first-step k_0 (`first_step.k0_mean`) and the forward-noised k_0 over the
    high-noise window (`k0_forward_early`); the 'training' pool entry is left out. None without the file."""
    if not premise_reference:
        return None
    per_dup = lambda values: {f: v for f, v in (values or {}).items() if f != "training"}  # noqa: E731
    return dict(first_step=per_dup(premise_reference.get("first_step", {}).get("k0_mean")),
                forward_early=per_dup(premise_reference.get("k0_forward_early")))
