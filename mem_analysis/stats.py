"""M7 relations (docs/science.md M7): correlations with bootstrap intervals, detection AUROC / TPR at low FPR,
onset step, split-half reliability across seeds and the correlation corrected for it, distances between image
distributions (MMD, Frechet) for comparing runs, and for studies of many runs the t-interval of a mean over runs
and the least-squares line with its intervals. Ranks come from SciPy (AUROC is their Mann-Whitney form) and the ROC curve from scikit-learn;
the bootstrap, onset and reliability are ours."""
from __future__ import annotations

import math
from collections import namedtuple

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_curve

Correlation = namedtuple("Correlation", ["r", "low", "high", "n"])


def as_pairs(x, y) -> tuple[np.ndarray, np.ndarray]:
    """Two equal-length float64 vectors, with pairs holding a NaN dropped."""
    x, y = np.asarray(x, dtype=np.float64).reshape(-1), np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.size} and {y.size}")
    keep = ~(np.isnan(x) | np.isnan(y))
    return x[keep], y[keep]


def pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """`r = sum (x - xbar)(y - ybar) / sqrt(sum (x - xbar)^2 sum (y - ybar)^2)` along the last axis."""
    x = x - x.mean(-1, keepdims=True)
    y = y - y.mean(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x * y).sum(-1) / np.sqrt((x * x).sum(-1) * (y * y).sum(-1))


def correlation(x, y, method: str = "pearson", n_bootstrap: int = 1000, confidence: float = 0.95,
                seed: int = 0) -> Correlation:
    """Pearson r, or Spearman rho (Pearson of average ranks), with a percentile bootstrap interval.

    The interval resamples the (x, y) pairs `n_bootstrap` times (numpy Generator seeded by
    `seed`) and takes the `(1 - confidence) / 2` and `(1 + confidence) / 2` quantiles.
    """
    if method not in ("pearson", "spearman"):
        raise ValueError(f"method must be 'pearson' or 'spearman', got {method!r}")
    x, y = as_pairs(x, y)
    if x.size < 3:
        raise ValueError(f"need at least 3 (x, y) pairs for a correlation, got {x.size}")

    def r_of(a, b):
        return pearson_rows(rankdata(a, axis=-1), rankdata(b, axis=-1)) if method == "spearman" else pearson_rows(a, b)

    r = float(r_of(x, y))
    if n_bootstrap <= 0:
        return Correlation(r, float("nan"), float("nan"), x.size)
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_bootstrap, x.size))
    boot = r_of(x[idx], y[idx])
    low, high = np.nanquantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Correlation(r, float(low), float(high), x.size)


def stratified_indices(strata, n_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    """(n_bootstrap, n) resample indices drawn within strata: position i of every resample is a uniform draw,
    with replacement, from the positions whose stratum equals `strata[i]` (so each stratum keeps its size)."""
    strata = np.asarray(strata).reshape(-1)
    idx = np.empty((n_bootstrap, strata.size), dtype=np.int64)
    for value in np.unique(strata):
        members = np.flatnonzero(strata == value)
        idx[:, members] = members[rng.integers(0, members.size, (n_bootstrap, members.size))]
    return idx


def residualise_on_groups(values: np.ndarray, groups) -> np.ndarray:
    """`v_i - mean_{j: g_j = g_i} v_j` along the last axis: the residual of a regression on group dummies."""
    _, codes = np.unique(np.asarray(groups).reshape(-1), return_inverse=True)
    onehot = np.eye(codes.max() + 1)[codes]  # (n, k)
    means = (values @ onehot) / onehot.sum(0)
    return values - means @ onehot.T


def residualise_on_covariate(values: np.ndarray, covariate) -> np.ndarray:
    """`v - (a + b z)` along the last axis, (a, b) the least-squares fit of v on [1, z]: the residual of a
    linear regression on the covariate z (with intercept)."""
    design = np.column_stack([np.ones(np.size(covariate)), np.asarray(covariate, dtype=np.float64).reshape(-1)])
    hat = design @ np.linalg.pinv(design)  # (n, n), symmetric projection onto span[1, z]
    return values - values @ hat


WITHIN_METHODS = ("fixed_effects", "partial")


def within_factor_correlation(x, y, factors, method: str = "fixed_effects", n_bootstrap: int = 1000,
                              confidence: float = 0.95, seed: int = 0) -> Correlation:
    """Pearson r of x and y *within* duplication factor, with a bootstrap interval resampling within factor.

    `method` 'fixed_effects': both variables residualised on factor dummies (each value minus its factor's mean),
        r_FE = sum_F sum_i (x_Fi - xbar_F)(y_Fi - ybar_F) / sqrt(sum (x_Fi - xbar_F)^2 sum (y_Fi - ybar_F)^2):
        only the variation among samples of equal factor counts, whatever the shape of the dependence on F.
    `method` 'partial': partial Pearson r given z = log(1 + F) (F = 0, a held-out image, has z = 0): the Pearson r
        of the residuals of x and y after a least-squares fit on [1, z], equal to
        (r_xy - r_xz r_yz) / sqrt((1 - r_xz^2)(1 - r_yz^2)); it removes only what is linear in z.
    The interval resamples samples within each factor (`stratified_indices`) `n_bootstrap` times and takes the
    `(1 -+ confidence) / 2` quantiles. r is NaN (interval too) when the residuals of x or y are constant, e.g. when
    no factor holds two samples. Pairs with a NaN are dropped.
    """
    if method not in WITHIN_METHODS:
        raise ValueError(f"method must be one of {WITHIN_METHODS}, got {method!r}")
    x, y = np.asarray(x, dtype=np.float64).reshape(-1), np.asarray(y, dtype=np.float64).reshape(-1)
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if not x.shape == y.shape == factors.shape:
        raise ValueError(f"x, y and factors must have the same length, got {x.size}, {y.size}, {factors.size}")
    keep = ~(np.isnan(x) | np.isnan(y) | np.isnan(factors))
    x, y, factors = x[keep], y[keep], factors[keep]
    if x.size < 3:
        raise ValueError(f"need at least 3 (x, y) pairs for a correlation, got {x.size}")

    def r_of(a, b):
        if method == "fixed_effects":
            a, b = residualise_on_groups(a, factors), residualise_on_groups(b, factors)
        else:
            z = np.log1p(factors)
            a, b = residualise_on_covariate(a, z), residualise_on_covariate(b, z)
        r = pearson_rows(a, b)
        flat = np.ptp(a, -1) <= 1e-9 * np.maximum(1.0, np.abs(a).max(-1))
        flat |= np.ptp(b, -1) <= 1e-9 * np.maximum(1.0, np.abs(b).max(-1))
        return np.where(flat, np.nan, r)

    r = float(r_of(x, y))
    if n_bootstrap <= 0 or np.isnan(r):
        return Correlation(r, float("nan"), float("nan"), x.size)
    idx = stratified_indices(factors, n_bootstrap, np.random.default_rng(seed))
    boot = r_of(x[idx], y[idx])
    if np.isnan(boot).all():
        return Correlation(r, float("nan"), float("nan"), x.size)
    low, high = np.nanquantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Correlation(r, float(low), float(high), x.size)


Difference = namedtuple("Difference", ["diff", "low", "high", "n_pos", "n_neg"])


def stratified_difference(values, labels, strata=None, n_bootstrap: int = 1000, confidence: float = 0.95,
                          seed: int = 0) -> Difference:
    """Mean difference positives minus negatives *at equal stratum*, with a bootstrap interval.

    Per stratum s with both classes, d_s = mean(v | pos, s) - mean(v | neg, s); the estimate is
    sum_s w_s d_s / sum_s w_s with w_s = n_pos,s n_neg,s / (n_pos,s + n_neg,s) (the weight that minimises the
    variance of the combination when both classes share one variance). Strata with one class only carry no
    contrast and are left out. `strata=None`: one stratum, the plain (pooled) difference of means. The interval
    resamples within each (stratum, class) cell `n_bootstrap` times. NaN when no stratum holds both classes.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    strata = np.zeros(values.size) if strata is None else np.asarray(strata, dtype=np.float64).reshape(-1)
    if not values.shape == labels.shape == strata.shape:
        raise ValueError(f"values, labels and strata must have the same length, got {values.size}, {labels.size}, "
                         f"{strata.size}")
    keep = ~np.isnan(values)
    values, labels, strata = values[keep], labels[keep], strata[keep]
    both = [s for s in np.unique(strata) if labels[strata == s].any() and not labels[strata == s].all()]
    use = np.isin(strata, both)
    n_pos, n_neg = int(labels[use].sum()), int((~labels[use]).sum())
    if not both:
        return Difference(float("nan"), float("nan"), float("nan"), n_pos, n_neg)
    values, labels, strata = values[use], labels[use], strata[use]
    cells = [(strata == s) & (labels == c) for s in both for c in (True, False)]
    onehot = np.stack(cells, 1).astype(np.float64)  # (n, 2k): positives then negatives of each stratum
    counts = onehot.sum(0)
    weights = counts[0::2] * counts[1::2] / (counts[0::2] + counts[1::2])

    def diff_of(v):
        means = (v @ onehot) / counts
        return ((means[..., 0::2] - means[..., 1::2]) @ weights) / weights.sum()

    diff = float(diff_of(values))
    if n_bootstrap <= 0:
        return Difference(diff, float("nan"), float("nan"), n_pos, n_neg)
    cell_of = onehot.argmax(1)
    boot = diff_of(values[stratified_indices(cell_of, n_bootstrap, np.random.default_rng(seed))])
    low, high = np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Difference(diff, float(low), float(high), n_pos, n_neg)


def group_difference(a, b, n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0) -> Difference:
    """mean(a) - mean(b) of two independent groups with a percentile bootstrap interval resampling each group
    separately (n_pos = len(a), n_neg = len(b)); NaN when a group is empty. NaNs dropped."""
    a, b = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (a, b))
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    values, labels = np.r_[a, b], np.r_[np.ones(a.size, bool), np.zeros(b.size, bool)]
    return stratified_difference(values, labels, None, n_bootstrap, confidence, seed)


def check_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """Scores (float64) and boolean labels, with both classes present."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"scores ({scores.size}) and labels ({labels.size}) must have the same length")
    if labels.all() or not labels.any():
        raise ValueError("labels need both memorized (True) and non-memorized (False) samples")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return scores, labels


DIRECTIONS = ("higher", "lower")
MIN_NEGATIVES_FOR_1PCT_FPR = 100


def oriented(scores, direction: str) -> np.ndarray:
    """Scores turned so that higher = memorized: `s` for direction 'higher', `-s` for 'lower'."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS} (which way a memorized sample's score goes), "
                         f"got {direction!r}")
    scores = np.asarray(scores, dtype=np.float64)
    return scores if direction == "higher" else -scores


def auroc_rows(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC of each row (last axis), higher = positive: `(sum of the positives' average ranks
    - n_pos (n_pos + 1) / 2) / (n_pos n_neg)` = Mann-Whitney U / (n_pos n_neg), ties counted one half;
    NaN for a row without both classes. Vectorised, for bootstrap resamples (B, n)."""
    labels = np.asarray(labels, dtype=bool)
    n_pos = labels.sum(-1)
    n_neg = labels.shape[-1] - n_pos
    rank_sum = (rankdata(scores, axis=-1) * labels).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def auroc(scores, labels, direction: str = "higher") -> float:
    """`P(s_pos > s_neg) + 0.5 P(s_pos = s_neg)` (Mann-Whitney U / (n_pos n_neg)) with `s` oriented by
    `direction`: 'higher' (a memorized sample scores higher) or 'lower' (it scores lower, e.g. diversity)."""
    scores, labels = check_labels(oriented(scores, direction), labels)
    return float(auroc_rows(scores, labels))


def auroc_with_ci(scores, labels, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """AUROC (stats.auroc) with a percentile bootstrap interval over samples (resamples with one class skipped).

    {'auroc', 'ci_low', 'ci_high', 'n', 'n_positive'}; auroc None when a class is missing.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    ok = np.isfinite(scores)
    scores, labels = scores[ok], labels[ok]
    out = dict(auroc=None, ci_low=None, ci_high=None, n=int(len(scores)), n_positive=int(labels.sum()))
    if labels.all() or not labels.any():
        return out
    out["auroc"] = auroc(scores, labels)
    pick = np.random.default_rng(seed).integers(0, len(scores), (max(n_boot, 0), len(scores)))
    boots = auroc_rows(scores[pick], labels[pick])
    boots = boots[np.isfinite(boots)]  # a resample holding one class has no AUROC
    if boots.size:
        out["ci_low"], out["ci_high"] = (float(q) for q in np.quantile(boots, [(1 - confidence) / 2,
                                                                                (1 + confidence) / 2]))
    return out


def tpr_at_fpr(scores, labels, max_fpr: float = 0.01) -> float:
    """Largest TPR over thresholds `s >= tau` whose FPR = share of negatives with `s >= tau` is <= max_fpr."""
    scores, labels = check_labels(scores, labels)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(tpr[fpr <= max_fpr].max())  # the curve starts at (0, 0), so the set is never empty


def detection(scores, labels, direction: str = "higher") -> dict:
    """AUROC in the stated direction and the TPR at low FPR that the number of negatives supports.

    With at least 100 negatives: TPR at 1% FPR. With fewer, 1% FPR means less than one false
    positive, so the reported figure is the TPR at zero false positives, labelled with n negatives.
    """
    scores, labels = check_labels(oriented(scores, direction), labels)
    n_neg = int((~labels).sum())
    if n_neg >= MIN_NEGATIVES_FOR_1PCT_FPR:
        label, tpr = "TPR at 1% FPR", tpr_at_fpr(scores, labels, 0.01)
    else:
        label, tpr = f"TPR at 0 FP ({n_neg} negatives)", tpr_at_fpr(scores, labels, 0.0)
    return dict(auroc=auroc(scores, labels), direction=direction, tpr=float(tpr), tpr_label=label,
                n_positives=int(labels.sum()), n_negatives=n_neg)


def is_constant(values) -> bool:
    """True when the finite values are equal up to rounding (`ptp <= 1e-9 max(1, max |v|)`): they rank nothing."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return values.size == 0 or np.ptp(values) <= 1e-9 * max(1.0, np.abs(values).max())


def split_half_reliability(values) -> dict:
    """Split-half reliability across seeds of a per-sample mean, with the Spearman-Brown step-up.

    `values` (S samples, N seeds): `r_half` = Pearson across samples between the means over the
    even-indexed and the odd-indexed seeds; `reliability = 2 r_half / (1 + r_half)` (Spearman-Brown),
    the reliability of the mean over all N seeds. Samples with a NaN are dropped; None when undefined.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] < 2:
        raise ValueError(f"values must be (samples, seeds) with at least 2 seeds, got shape {values.shape}")
    values = values[~np.isnan(values).any(1)]
    a, b = values[:, 0::2].mean(1), values[:, 1::2].mean(1)
    if len(a) < 3 or is_constant(a) or is_constant(b):
        return dict(r_half=None, reliability=None, n_samples=int(len(a)), n_seeds=int(values.shape[1]))
    r = float(pearson_rows(a, b))
    return dict(r_half=r, reliability=spearman_brown(r), n_samples=int(len(a)), n_seeds=int(values.shape[1]))


def spearman_brown(r_half: float, factor: float = 2.0) -> float:
    """Reliability of a measure `factor` times longer: `factor r / (1 + (factor - 1) r)`."""
    return float(factor * r_half / (1 + (factor - 1) * r_half))


def disattenuated(r_xy: float, reliability_x: float, reliability_y: float = 1.0) -> float | None:
    """Correlation corrected for measurement noise (Spearman 1904): `r_xy / sqrt(rel_x rel_y)`; None when
    a reliability is not positive. It can exceed 1 when the reliabilities are themselves noisy."""
    if r_xy is None or reliability_x is None or reliability_y is None or reliability_x <= 0 or reliability_y <= 0:
        return None
    return float(r_xy / np.sqrt(reliability_x * reliability_y))


def onset_step(steps, severity, threshold: float) -> np.ndarray:
    """Per sample, the first checkpoint step with `severity > threshold`; NaN if it never crosses.

    `steps` (C,) increasing checkpoint steps; `severity` (C,) or (S, C).
    """
    steps = np.asarray(steps, dtype=np.float64).reshape(-1)
    severity = np.atleast_2d(np.asarray(severity, dtype=np.float64))
    if severity.shape[-1] != steps.size:
        raise ValueError(f"severity has {severity.shape[-1]} checkpoints, steps {steps.size}")
    if np.any(np.diff(steps) <= 0):
        raise ValueError("checkpoint steps must be strictly increasing")
    over = severity > threshold
    first = over.argmax(-1)
    return np.where(over.any(-1), steps[first], np.nan)


SetDetection = namedtuple("SetDetection", ["direction", "auroc", "low", "high", "tpr", "tpr_label", "n_pos", "n_neg"])


def set_detection(positives, negatives, direction: str = "higher", n_bootstrap: int = 1000,
                  confidence: float = 0.95, seed: int = 0) -> SetDetection:
    """`detection` of two sets (e.g. memorized vs normal prompts) with a percentile bootstrap interval of the AUROC.

    `direction` is stated in advance ('lower' when a memorized prompt's score is predicted lower, e.g. diversity;
    mem_analysis.verdicts.direction), never chosen from the data. The TPR follows `detection`'s rule (1% FPR with
    at least 100 negatives, else at 0 false positives). The interval resamples each set separately; NaNs dropped.
    """
    pos = np.asarray(positives, dtype=np.float64).reshape(-1)
    neg = np.asarray(negatives, dtype=np.float64).reshape(-1)
    pos, neg = pos[~np.isnan(pos)], neg[~np.isnan(neg)]
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"need scores in both sets, got {pos.size} and {neg.size}")
    labels = np.r_[np.ones(pos.size, bool), np.zeros(neg.size, bool)]
    d = detection(np.r_[pos, neg], labels, direction)
    low = high = float("nan")
    if n_bootstrap > 0:
        pos, neg = oriented(pos, direction), oriented(neg, direction)
        rng = np.random.default_rng(seed)
        boot = np.concatenate([pos[rng.integers(0, pos.size, (n_bootstrap, pos.size))],
                               neg[rng.integers(0, neg.size, (n_bootstrap, neg.size))]], 1)
        values = auroc_rows(boot, labels)
        low, high = np.quantile(values, [(1 - confidence) / 2, (1 + confidence) / 2])
    return SetDetection(direction, d["auroc"], float(low), float(high), d["tpr"], d["tpr_label"],
                        d["n_positives"], d["n_negatives"])


def mean_interval(values, n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of the finite values with a percentile bootstrap interval (NaN when empty)."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    if n_bootstrap <= 0:
        return float(values.mean()), float("nan"), float("nan")
    boots = values[np.random.default_rng(seed).integers(0, values.size, (n_bootstrap, values.size))].mean(1)
    low, high = np.quantile(boots, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(values.mean()), float(low), float(high)


def mean_t_interval(values, confidence: float = 0.95) -> tuple[float, float, float, int]:
    """(mean, low, high, n) of the finite values: `mean -+ t_{(1+confidence)/2, n-1} s / sqrt(n)`, s the sample
    standard deviation (ddof 1); Student's interval, for few values (runs of a study) where a bootstrap over
    3 values has only 10 distinct resamples. low and high are NaN with fewer than 2 values."""
    from scipy.stats import t as student

    values = np.asarray(values, dtype=np.float64).reshape(-1)
    values = values[np.isfinite(values)]
    n = int(values.size)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    mean = float(values.mean())
    if n < 2:
        return mean, float("nan"), float("nan"), n
    half = float(student.ppf((1 + confidence) / 2, n - 1) * values.std(ddof=1) / np.sqrt(n))
    return mean, mean - half, mean + half, n


LinearFit = namedtuple("LinearFit", ["a", "a_low", "a_high", "b", "b_low", "b_high", "r2", "p_a_zero", "n"])


def linear_fit(x, y, confidence: float = 0.95) -> LinearFit:
    """Least squares `y = a + b x` over the pairs without a NaN, with Student intervals and the test of
    proportionality (H0: a = 0).

    `b = S_xy / S_xx`, `a = mean(y) - b mean(x)`, residual variance `s^2 = SSE / (n - 2)`,
    `se(b) = s / sqrt(S_xx)`, `se(a) = s sqrt(1/n + mean(x)^2 / S_xx)`, intervals `-+ t_{(1+confidence)/2, n-2} se`,
    `p_a_zero = 2 P(T_{n-2} > |a| / se(a))`, `r2 = 1 - SSE / S_yy`. Needs two distinct x (ValueError otherwise);
    with n = 2 the line is exact and the intervals and p are NaN.
    """
    from scipy.stats import t as student

    x, y = as_pairs(x, y)
    n = int(x.size)
    if n < 2 or is_constant(x):
        raise ValueError(f"a line needs at least two distinct x values, got {n} pair(s)")
    sxx = float(((x - x.mean()) ** 2).sum())
    b = float(((x - x.mean()) * (y - y.mean())).sum() / sxx)
    a = float(y.mean() - b * x.mean())
    sse = float(((y - a - b * x) ** 2).sum())
    syy = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - sse / syy if syy > 0 else float("nan")
    if n < 3:
        return LinearFit(a, math.nan, math.nan, b, math.nan, math.nan, r2, math.nan, n)
    s = math.sqrt(sse / (n - 2))
    se_b, se_a = s / math.sqrt(sxx), s * math.sqrt(1 / n + x.mean() ** 2 / sxx)
    q = float(student.ppf((1 + confidence) / 2, n - 2))
    p = float(2 * student.sf(abs(a) / se_a, n - 2)) if se_a > 0 else (0.0 if a != 0 else 1.0)
    return LinearFit(a, a - q * se_a, a + q * se_a, b, b - q * se_b, b + q * se_b, r2, p, n)


def squared_distances(a, b) -> np.ndarray:
    """(N, M) matrix of `||a_i - b_j||^2` (float64, clipped at 0), via |a|^2 + |b|^2 - 2 a.b."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0.0)


def median_distance(features) -> float:
    """Median pairwise Euclidean distance between the rows of `features` (N, D): a kernel bandwidth."""
    d = squared_distances(features, features)
    return float(np.sqrt(np.median(d[np.triu_indices(len(d), 1)])))


def mmd_squared(x, y, bandwidth: float) -> float:
    """Unbiased MMD^2 with the Gaussian kernel k(a, b) = exp(-||a - b||^2 / (2 s^2)), s = bandwidth:
    `mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j) - 2 mean_{i, j} k(x_i, y_j)` (0 in expectation
    when x and y come from the same distribution). x (N, D), y (M, D), N, M >= 2."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or len(y) < 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd_squared needs two sets of >= 2 rows of equal width, got {x.shape} and {y.shape}")
    kxx, kyy, kxy = (np.exp(-squared_distances(a, b) / (2 * bandwidth ** 2)) for a, b in ((x, x), (y, y), (x, y)))
    n, m = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.mean())


def frechet_distance(x, y) -> float:
    """`||m_x - m_y||^2 + tr(C_x + C_y - 2 (C_x C_y)^(1/2))` between Gaussians fitted to x (N, D) and y (M, D)
    (FID's formula when the features are Inception's)."""
    from scipy import linalg

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    cx, cy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = linalg.sqrtm(np.atleast_2d(cx) @ np.atleast_2d(cy))
    root = root.real if np.iscomplexobj(root) else root
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(cx + cy - 2 * root))
