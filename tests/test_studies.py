"""mem_analysis.studies and the study statistics of mem_analysis.stats against values computed by hand.

Student quantiles are taken in closed form where one exists: df = 1, t_p = tan(pi (p - 1/2)); df = 2,
t_p = (2p - 1) / sqrt(2 p (1 - p)), and the df = 2 tail P(T > t) = (1 - t / sqrt(t^2 + 2)) / 2.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from mem_analysis import stats, studies

T_DF1 = math.tan(math.pi * 0.475)                         # 12.706...
T_DF2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)               # 4.3027...


def test_crossing_step_interpolates_between_the_checkpoints_around_the_level():
    steps = [0, 100, 200, 300]
    assert studies.crossing_step(steps, [0.0, 0.1, 0.3, 0.6], 0.25) == pytest.approx(100 + 0.15 / 0.2 * 100)
    assert studies.crossing_step(steps, [0.0, 0.25, 0.3, 0.6], 0.25) == pytest.approx(100)  # reached exactly
    assert studies.crossing_step(steps, [0.5, 0.6, 0.7, 0.8], 0.25) == 0                    # from the start
    assert math.isnan(studies.crossing_step(steps, [0.0, 0.1, 0.2, 0.24], 0.25))            # never
    # a dip after the first crossing does not move it
    assert studies.crossing_step(steps, [0.0, 0.5, 0.1, 0.9], 0.25) == pytest.approx(50)
    with pytest.raises(ValueError):
        studies.crossing_step([0, 200, 100], [0, 0.1, 0.2], 0.25)


def test_mean_t_interval_is_students_interval():
    mean, low, high, n = stats.mean_t_interval([1.0, 2.0, 3.0, float("nan")])
    assert (mean, n) == (2.0, 3)  # s = 1
    assert low == pytest.approx(2 - T_DF2 / math.sqrt(3)) and high == pytest.approx(2 + T_DF2 / math.sqrt(3))
    mean, low, high, n = stats.mean_t_interval([0.2, 0.4])
    assert high - mean == pytest.approx(T_DF1 * math.sqrt(0.02) / math.sqrt(2))
    mean, low, high, n = stats.mean_t_interval([0.7])
    assert mean == 0.7 and n == 1 and math.isnan(low) and math.isnan(high)


def test_linear_fit_against_a_hand_computed_line():
    # x = 1..4, y = 2, 3, 5, 6: Sxx = 5, Sxy = 7, b = 1.4, a = 0.5, SSE = 0.2, s^2 = 0.1, SST = 10
    fit = stats.linear_fit([1, 2, 3, 4], [2, 3, 5, 6])
    se_b, se_a = math.sqrt(0.1 / 5), math.sqrt(0.1 * (1 / 4 + 2.5 ** 2 / 5))
    assert (fit.a, fit.b, fit.r2, fit.n) == (pytest.approx(0.5), pytest.approx(1.4), pytest.approx(0.98), 4)
    assert fit.b_low == pytest.approx(1.4 - T_DF2 * se_b) and fit.b_high == pytest.approx(1.4 + T_DF2 * se_b)
    assert fit.a_low == pytest.approx(0.5 - T_DF2 * se_a) and fit.a_high == pytest.approx(0.5 + T_DF2 * se_a)
    t = 0.5 / se_a
    assert fit.p_a_zero == pytest.approx(1 - t / math.sqrt(t * t + 2))


def test_linear_fit_exact_lines_and_too_few_points():
    proportional = stats.linear_fit([100, 200, 400], [30, 60, 120])
    assert proportional.a == pytest.approx(0, abs=1e-9) and proportional.b == pytest.approx(0.3)
    assert proportional.p_a_zero == 1.0  # a = 0 exactly: nothing to reject
    offset = stats.linear_fit([100, 200, 400], [80, 110, 170])
    assert offset.a == pytest.approx(50) and offset.p_a_zero == 0.0
    two = stats.linear_fit([1, 2], [1, 3])
    assert two.b == pytest.approx(2) and math.isnan(two.b_low) and math.isnan(two.p_a_zero)
    with pytest.raises(ValueError):
        stats.linear_fit([3, 3, 3], [1, 2, 3])


def per_sample_table() -> pd.DataFrame:
    """Two factor-4 samples, two factor-1 samples and one held-out (factor 0), three checkpoints, rows at two
    guidance scales (g = 1 rows are decoys with memorized fraction 1)."""
    curves = {10: (4, [0.0, 0.2, 0.6]), 11: (4, [0.0, 0.4, 0.8]), 20: (1, [0.0, 0.0, 0.1]),
              21: (1, [0.0, 0.0, 0.0]), 30: (0, [0.0, 0.0, 0.05])}
    rows = []
    for sid, (factor, values) in curves.items():
        for step, value in zip((0, 100, 200), values):
            for g in (1.0, 7.5):
                rows.append(dict(checkpoint_step=step, sample_id=sid, dup_factor=factor, guidance_scale=g,
                                 memorized_fraction=value if g == 7.5 else 1.0,
                                 severity=value if g == 7.5 else 1.0, k_uncond_early=0.1 * factor + sid / 100))
    return pd.DataFrame(rows)


def test_run_figures_per_factor_at_the_last_checkpoint_and_the_onset():
    figures = studies.run_figures(per_sample_table(), 7.5, columns=("memorized_fraction", "k_uncond_early"),
                                  onset_level=0.25)
    assert figures["memorized_fraction_dup_4"] == pytest.approx(0.7)
    assert figures["memorized_fraction_dup_1"] == pytest.approx(0.05)
    assert figures["memorized_fraction_dup_4_minus_heldout"] == pytest.approx(0.65)
    # factor-4 mean over steps 0, 100, 200: 0, 0.3, 0.7 -> reaches 0.25 at 100 * 0.25 / 0.3
    assert figures["onset_step_dup_4"] == pytest.approx(100 * 0.25 / 0.3)
    assert math.isnan(figures["onset_step_dup_1"])
    assert figures["k_uncond_early_dup_4"] == pytest.approx(0.4 + 0.105)
    assert figures["k_uncond_early_dup_4_minus_heldout"] == pytest.approx(0.505 - 0.30)
    with pytest.raises(ValueError):
        studies.run_figures(per_sample_table(), 3.0)


def test_sample_rows_and_headline():
    rows = studies.sample_rows(per_sample_table(), 7.5, threshold=0.5).set_index("sample_id")
    assert rows.loc[10, "onset_step"] == 200 and rows.loc[11, "onset_step"] == 200  # severity > 0.5 first at 200
    assert math.isnan(rows.loc[20, "onset_step"])
    assert rows.loc[11, "memorized_fraction"] == pytest.approx(0.8) and rows.loc[30, "dup_factor"] == 0
    assert studies.headline({}) == ({}, {})
    figures, verdicts = studies.headline({"headline": {"step": 5, "figures": {"r": 0.5, "none": None},
                                                       "verdicts": {"finding_1": "holds"}}})
    assert figures["r"] == 0.5 and math.isnan(figures["none"]) and verdicts == {"finding_1": "holds"}


def test_aggregate_cells_means_intervals_and_verdict_tallies():
    runs = pd.DataFrame(dict(
        cell=[0, 0, 0, 1, 1, 1], lr=[1, 1, 1, 2, 2, 2], status=["done"] * 3 + ["failed", "done", "done"],
        m=[0.5, 0.6, 0.7, np.nan, 0.2, 0.4],
        verdict_f1=["holds", "does not hold", " Holds ", None, "holds", None]))
    cells = studies.aggregate_cells(runs, ["lr"], ["m"], ["f1"]).set_index("cell")
    assert cells.loc[0, "m_mean"] == pytest.approx(0.6)
    assert cells.loc[0, "m_high"] - 0.6 == pytest.approx(T_DF2 * 0.1 / math.sqrt(3))
    assert cells.loc[1, "m_mean"] == pytest.approx(0.3) and cells.loc[1, "m_n"] == 2
    assert cells.loc[1, "m_high"] - 0.3 == pytest.approx(T_DF1 * math.sqrt(0.02) / math.sqrt(2))
    assert (cells.loc[0, "runs"], cells.loc[1, "runs"], cells.loc[1, "failed"]) == (3, 2, 1)
    assert cells.loc[0, "verdict_f1"] == "holds in 2 of 3 (does not hold 1)" and cells.loc[1, "verdict_f1"] == "holds in 1 of 1"


def test_marginal_and_fit_lines_pool_runs():
    runs = pd.DataFrame(dict(n=[100, 200, 400, 400], a=[0, 0, 0, 1], status=["done"] * 3 + ["failed"],
                             onset=[80.0, 110.0, 170.0, 999.0]))
    fits = studies.fit_lines(runs, "n", ["onset", "missing"])
    assert list(fits["figure"]) == ["onset"]  # the failed run is not a point
    assert fits["a"].iloc[0] == pytest.approx(50) and fits["b"].iloc[0] == pytest.approx(0.3)
    by = studies.marginal(runs, "n", "onset")
    assert list(by["n"]) == [1, 1, 1] and by["mean"].iloc[2] == pytest.approx(170)
