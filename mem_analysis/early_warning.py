"""Early warning of memorization from the training probes alone (docs/science.md, "Early warning").

Per probe step s and tracked sample i, three features from the probe rows (docs/science.md M1, M2),
each oriented so that memorization raises it:
- `k_excess`  = mean over the high-noise window (t >= high_noise_from) of k_g at the largest probed g;
- `lg_excess` = log of the same window's mean L_g at that g;
- `lc_fall`   = log Lbar_c(first probe step) - log Lbar_c(s), Lbar_c the mean of L_c over the grid
  (the sample's own fall, which removes how hard the image is to denoise).
The null population of a step is its held-out probe samples (dup_factor 0) when there are at
least MIN_NULL of them, else its never-duplicated ones (dup_factor 1). For a sample i, with R the
null minus i itself (leave-one-out, so a null sample is scored exactly as a new one would be):

    z_f(i) = (x_f(i) - median_R x_f) / (1.4826 MAD_R x_f)        (robust z; 0 when MAD_R = 0)
    C(i)   = mean_f z_f(i)
    score(i) = (C(i) - median_R C) / (1.4826 MAD_R C)

so the score is in robust standard deviations of the null. The alarm fires when
score > tau(|R|, fpr), tau the (1 - fpr) quantile of that same statistic for a Gaussian null of
|R| reference samples (simulated once per size): with 18 null samples an empirical 1 % quantile
does not exist (the finest is 1/19), and the plain normal quantile would ignore that the median
and MAD come from 18 values.
"""
from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import numpy as np

from mem_analysis import run
from mem_analysis.probes import HIGH_NOISE_TIMESTEP
from mem_analysis.stats import auroc_with_ci

FEATURES = ("k_excess", "lg_excess", "lc_fall")
MIN_NULL = 3  # fewer reference samples than this leave the score undefined
MAD_TO_SD = 1.4826  # MAD of a normal sample times this estimates its sd
SIMULATIONS = 100_000


GUIDED_LOSS = re.compile(r"^loss_cfg_(\d+(?:\.\d+)?)$")  # loss_cfg_<g>, not its _x0 variant


def largest_guidance(row: dict) -> str:
    """The `<g>` of the largest guidance scale among a probe row's `loss_cfg_<g>` keys (epsilon space; the
    `loss_cfg_<g>_x0` variants are not scales)."""
    scales = [match[1] for key in row if (match := GUIDED_LOSS.match(key))]
    if not scales:
        raise ValueError("probe rows have no loss_cfg_<g> columns; probe with at least one guidance scale")
    return max(scales, key=float)


def mean_loss_cond(rows: list[dict]) -> dict[int, float]:
    """Per sample_id, L_c averaged over the probe grid (the baseline of `lc_fall` at the first probe step)."""
    totals: dict[int, list[float]] = {}
    for row in rows:
        totals.setdefault(int(row["sample_id"]), []).append(float(row["loss_cond"]))
    return {sid: float(np.mean(values)) for sid, values in totals.items()}


def sample_features(rows: list[dict], baseline: dict[int, float], high_noise_from: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample_ids (N,), dup_factors (N,), features (N, 3) in FEATURES order) of one probe step's rows.

    The high-noise window is t >= high_noise_from, or the largest probed timestep when none is that high.
    """
    g = largest_guidance(rows[0])
    by_sample: dict[int, list[dict]] = {}
    for row in rows:
        by_sample.setdefault(int(row["sample_id"]), []).append(row)
    top = max(int(row["timestep"]) for row in rows)
    window_from = min(high_noise_from, top)
    ids, dups, feats = [], [], []
    for sid in sorted(by_sample):
        group = by_sample[sid]
        high = [r for r in group if int(r["timestep"]) >= window_from]
        loss_cond = float(np.mean([r["loss_cond"] for r in group]))
        start = baseline.get(sid, loss_cond)
        ids.append(sid)
        dups.append(int(group[0]["dup_factor"]))
        feats.append([float(np.mean([r[f"k_cfg_{g}"] for r in high])),
                      math.log(max(float(np.mean([r[f"loss_cfg_{g}"] for r in high])), 1e-12)),
                      math.log(max(start, 1e-12)) - math.log(max(loss_cond, 1e-12))])
    return np.asarray(ids), np.asarray(dups), np.asarray(feats, dtype=np.float64)


def null_mask(dup_factors: np.ndarray) -> np.ndarray:
    """The null population: held-out samples (dup_factor 0) when there are MIN_NULL of them, else dup_factor 1."""
    dup_factors = np.asarray(dup_factors)
    heldout = dup_factors == 0
    return heldout if heldout.sum() >= MIN_NULL else dup_factors == 1


def robust_z(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`(values - median(reference)) / (1.4826 MAD(reference))` per column; 0 where the MAD is 0."""
    centre = np.median(reference, axis=0)
    scale = MAD_TO_SD * np.median(np.abs(reference - centre), axis=0)
    tiny = scale <= 1e-12 * np.maximum(1.0, np.abs(centre))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (values - centre) / np.where(tiny, 1.0, scale)
    return np.where(tiny, 0.0, z)


def null_score(features: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Score of the rows of `features` (M, F) against a null `reference` (R, F): robust z of the mean robust z."""
    combined = robust_z(features, reference).mean(axis=1)
    combined_ref = robust_z(reference, reference).mean(axis=1)
    return robust_z(combined[:, None], combined_ref[:, None])[:, 0]


@functools.lru_cache(maxsize=64)
def alarm_threshold(reference_size: int, fpr: float) -> float:
    """tau: the (1 - fpr) quantile of `(X_0 - median X_1..R) / (1.4826 MAD X_1..R)`, X iid N(0, 1), R = reference_size.

    Simulated (SIMULATIONS draws, fixed seed; about 0.1 s per 20 reference samples, once per run and size);
    beyond 300 reference samples, where the two differ by a few hundredths, the normal quantile.
    """
    if not 0 < fpr < 0.5:
        raise ValueError(f"false-alarm rate {fpr} must lie in (0, 0.5)")
    if reference_size < MIN_NULL:
        raise ValueError(f"need at least {MIN_NULL} null samples, got {reference_size}")
    if reference_size > 300:
        from scipy.stats import norm

        return float(norm.ppf(1 - fpr))
    rng = np.random.default_rng(reference_size)
    stats = np.empty(SIMULATIONS)
    for start in range(0, SIMULATIONS, 10_000):  # chunks keep memory at 10,000 x R
        draws = rng.standard_normal((10_000, reference_size + 1))
        centre = np.median(draws[:, 1:], axis=1)
        scale = MAD_TO_SD * np.median(np.abs(draws[:, 1:] - centre[:, None]), axis=1)
        stats[start:start + 10_000] = (draws[:, 0] - centre) / scale
    return float(np.quantile(stats, 1 - fpr))


def leave_one_out_scores(features: np.ndarray, null: np.ndarray, fpr: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """(score, alarm threshold) per row of `features` (N, F): `null_score` against the `null` rows, each null
    row against the other null rows (leave-one-out); NaN where fewer than MIN_NULL reference rows remain."""
    features, null = np.asarray(features, dtype=np.float64), np.asarray(null, dtype=bool)
    scores, thresholds = np.full(len(features), np.nan), np.full(len(features), np.nan)
    others = ~null
    if null.sum() >= MIN_NULL and others.any():
        scores[others] = null_score(features[others], features[null])
        thresholds[others] = alarm_threshold(int(null.sum()), fpr)
    if null.sum() - 1 >= MIN_NULL:
        for i in np.flatnonzero(null):
            reference = null.copy()
            reference[i] = False
            scores[i] = null_score(features[i:i + 1], features[reference])[0]
            thresholds[i] = alarm_threshold(int(reference.sum()), fpr)
    return scores, thresholds


def score_step(rows: list[dict], baseline: dict[int, float], fpr: float = 0.01,
               high_noise_from: int = HIGH_NOISE_TIMESTEP) -> list[dict]:
    """Warning rows of one probe step: {step, sample_id, dup_factor, score, threshold, alarm} per sample.

    Null samples are scored against the other null samples (leave-one-out), every other sample against
    the whole null. With fewer than MIN_NULL reference samples the score is None and no alarm fires.
    """
    if not rows:
        return []
    step = int(rows[0]["step"])
    ids, dups, feats = sample_features(rows, baseline, high_noise_from)
    scores, thresholds = leave_one_out_scores(feats, null_mask(dups), fpr)
    return [dict(step=step, sample_id=int(sid), dup_factor=int(dup),
                 score=None if np.isnan(s) else float(s), threshold=None if np.isnan(t) else float(t),
                 alarm=bool(np.isfinite(s) and s > t))
            for sid, dup, s, t in zip(ids, dups, scores, thresholds)]


def score_run(probe_rows: list[dict], fpr: float = 0.01, high_noise_from: int = HIGH_NOISE_TIMESTEP) -> list[dict]:
    """Warning rows of every probe step of a run (probes.jsonl rows), `lc_fall` against the first step."""
    by_step: dict[int, list[dict]] = {}
    for row in probe_rows:
        by_step.setdefault(int(row["step"]), []).append(row)
    if not by_step:
        return []
    baseline = mean_loss_cond(by_step[min(by_step)])
    return [w for step in sorted(by_step) for w in score_step(by_step[step], baseline, fpr, high_noise_from)]


def first_alarms(warnings: list[dict]) -> dict[int, int]:
    """Per sample_id, the first probe step at which its alarm fired (samples that never alarmed are absent)."""
    first: dict[int, int] = {}
    for row in sorted(warnings, key=lambda r: r["step"]):
        if row["alarm"]:
            first.setdefault(int(row["sample_id"]), int(row["step"]))
    return first


def run_warnings(run_dir: Path, fpr: float = 0.01, high_noise_from: int = HIGH_NOISE_TIMESTEP) -> list[dict]:
    """A run's warnings: RUN/warnings.jsonl as training wrote it, else scored from RUN/probes.jsonl (else [])."""
    run_dir = Path(run_dir)
    if (run_dir / run.WARNINGS_FILE).is_file():
        return run.read_jsonl(run_dir / run.WARNINGS_FILE)
    if (run_dir / run.PROBES_FILE).is_file():
        return score_run(run.read_jsonl(run_dir / run.PROBES_FILE), fpr, high_noise_from)
    return []


def evaluate_warning(warnings: list[dict], memorized: dict[int, bool], onset: dict[int, int | None],
                     n_boot: int = 1000, seed: int = 0) -> dict:
    """How early and how right the warning was, against what sampling found.

    - `auroc_by_step`: per probe step, auroc_with_ci of that step's score for `memorized[sample]`
      (memorized at the last checkpoint), over the samples evaluated;
    - `lead_time`: per sample, `onset_step - first_alarm_step` (steps; None when either is missing);
    - `false_alarms`: never-duplicated samples (dup_factor <= 1, held-out included) whose alarm ever
      fired, and the share of their (sample, step) checks that alarmed;
    - `earliest_auroc_0_9` / `best_auroc`: the first step whose AUROC reaches 0.9, and the step of the highest.
    """
    warnings = [w for w in warnings if int(w["sample_id"]) in memorized]
    by_step: dict[int, list[dict]] = {}
    for w in warnings:
        by_step.setdefault(int(w["step"]), []).append(w)
    auroc_by_step = {}
    for step, rows in sorted(by_step.items()):
        scores = [math.nan if w["score"] is None else w["score"] for w in rows]
        auroc_by_step[str(step)] = auroc_with_ci(scores, [memorized[int(w["sample_id"])] for w in rows], n_boot,
                                                 seed=seed)
    defined = [(int(s), a) for s, a in auroc_by_step.items() if a["auroc"] is not None]
    earliest = next((s for s, a in defined if a["auroc"] >= 0.9), None)
    best = max(defined, key=lambda sa: (sa[1]["auroc"], -sa[0]))[0] if defined else None
    first = first_alarms(warnings)
    dup_of = {int(w["sample_id"]): int(w["dup_factor"]) for w in warnings}
    lead = {}
    for sid in sorted(dup_of):
        alarm, crossed = first.get(sid), onset.get(sid)
        lead[str(sid)] = dict(dup_factor=dup_of[sid], memorized=bool(memorized[sid]), first_alarm_step=alarm,
                              onset_step=crossed,
                              lead_time=None if alarm is None or crossed is None else int(crossed - alarm))
    null_checks = [w for w in warnings if w["dup_factor"] <= 1 and w["score"] is not None]
    null_ids = sorted({int(w["sample_id"]) for w in warnings if w["dup_factor"] <= 1})
    false_ids = sorted({int(w["sample_id"]) for w in null_checks if w["alarm"]})
    false_alarms = dict(count=len(false_ids), samples=false_ids, never_duplicated=len(null_ids),
                        checks=len(null_checks), alarmed_checks=sum(bool(w["alarm"]) for w in null_checks))
    return dict(auroc_by_step=auroc_by_step, lead_time=lead, false_alarms=false_alarms,
                earliest_auroc_0_9=earliest, best_auroc=best)
