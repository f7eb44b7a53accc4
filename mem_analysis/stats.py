"""M7 relations (docs/science.md M7): correlations with bootstrap intervals, detection AUROC / TPR at low FPR,
onset step. Ranks come from SciPy and ROC quantities from scikit-learn; the bootstrap and onset are ours."""
from __future__ import annotations

from collections import namedtuple

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score, roc_curve

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


def auroc(scores, labels) -> float:
    """`P(s_pos > s_neg) + 0.5 P(s_pos = s_neg)` (Mann-Whitney U / (n_pos n_neg)), higher score = positive."""
    scores, labels = check_labels(scores, labels)
    return float(roc_auc_score(labels, scores))


def tpr_at_fpr(scores, labels, max_fpr: float = 0.01) -> float:
    """Largest TPR over thresholds `s >= tau` whose FPR = share of negatives with `s >= tau` is <= max_fpr."""
    scores, labels = check_labels(scores, labels)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(tpr[fpr <= max_fpr].max())  # the curve starts at (0, 0), so the set is never empty


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
