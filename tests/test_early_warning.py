"""mem_analysis.early_warning on constructed probe rows: known drift is ranked first and alarms at its
crossing step; without drift the false-alarm rate is the one asked for; eval's AUROC and lead times
equal values computed by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mem_analysis import early_warning as ew
from mem_analysis import stats

TIMESTEPS = (100, 500, 800, 900)


def probe_rows(step: int, sample_id: int, dup: int, k: float, loss_cfg: float, loss_cond: float) -> list[dict]:
    """Probe rows of one sample at one step: k_g and L_g at g = 7.5 in the high-noise window (t >= 700),
    L_c everywhere (its grid mean is `loss_cond`); low-noise k_g / L_g are junk the score must ignore."""
    rows = []
    for t in TIMESTEPS:
        high = t >= 700
        rows.append({"step": step, "sample_id": sample_id, "dup_factor": dup, "timestep": t,
                     "loss_cond": loss_cond, "loss_uncond": 1.0, "loss_cfg_1.5": 0.5, "loss_cfg_7.5":
                     loss_cfg if high else 1e3 * (sample_id + 1), "k_cond": 0.5, "k_uncond": 0.2,
                     "k_cfg_1.5": 0.7, "k_cfg_7.5": k if high else -1e3 * (sample_id + 1),
                     # the x0-space and uncentred columns real probe rows carry: not guidance scales, and ignored
                     "loss_cfg_7.5_x0": 9e9, "loss_cfg_1.5_x0": 9e9, "k_cfg_7.5_uncentred": 9e9})
    return rows


def noisy_run(rng, steps, n_null, n_other, drift=None) -> list[dict]:
    """Every sample's three features i.i.d. Gaussian (in the score's own units) at every step;
    `drift[sample] = (start_step, per_step)` adds a linear rise to all three from start_step on."""
    drift = drift or {}
    rows = []
    for step_index, step in enumerate(steps):
        for sid in range(n_null + n_other):
            start, slope = drift.get(sid, (math.inf, 0.0))
            d = slope * max(0, step_index - start + 1) if step_index >= start else 0.0
            k, lg, lc = rng.normal(0.0, 0.1, 3) + d * 0.1
            rows += probe_rows(step, sid, 1 if sid < n_null else 4, 0.8 + k, math.exp(-1.5 + lg),
                               math.exp(-2.0 - lc) if step_index else 0.135)
    return rows


def test_robust_z_is_median_and_mad_and_ignores_a_constant_reference():
    reference = np.array([[1.0, 5.0], [2.0, 5.0], [4.0, 5.0]])
    z = ew.robust_z(np.array([[6.0, 9.0]]), reference)
    assert z[0, 0] == pytest.approx((6 - 2) / (1.4826 * 1.0)) and z[0, 1] == 0.0


def test_threshold_matches_the_normal_quantile_for_a_large_null_and_grows_for_a_small_one():
    from scipy.stats import norm

    assert ew.alarm_threshold(300, 0.01) == pytest.approx(norm.ppf(0.99), abs=0.08)
    assert ew.alarm_threshold(17, 0.01) > ew.alarm_threshold(300, 0.01) + 0.5


def test_drifting_samples_rank_first_and_alarm_when_the_drift_crosses():
    rng = np.random.default_rng(0)
    steps = list(range(0, 1000, 100))
    # samples 18 and 19 drift from step index 3 on; 20 from index 6 on; 21..29 never (they are not null)
    rows = noisy_run(rng, steps, 18, 12, drift={18: (3, 3.0), 19: (3, 3.0), 20: (6, 3.0)})
    warnings = ew.score_run(rows, fpr=0.01, high_noise_from=700)
    last = [w for w in warnings if w["step"] == steps[-1]]
    top = [w["sample_id"] for w in sorted(last, key=lambda w: -w["score"])[:3]]
    assert set(top) == {18, 19, 20}
    first = ew.first_alarms(warnings)
    for sid in (18, 19, 20):  # the alarm fires at the first step whose score crosses the threshold, not before
        own = sorted((w for w in warnings if w["sample_id"] == sid), key=lambda w: w["step"])
        crossing = next(w["step"] for w in own if w["score"] > w["threshold"])
        assert first[sid] == crossing
    assert 300 <= first[18] <= 500 and 300 <= first[19] <= 500 and 600 <= first[20] <= 800
    quiet = [w["alarm"] for w in warnings if w["sample_id"] not in (18, 19, 20) and w["step"] > 0]
    assert np.mean(quiet) < 0.03  # 27 quiet samples x 9 steps at a 1 % rate


def test_without_drift_the_false_alarm_rate_is_the_one_asked():
    rng = np.random.default_rng(1)
    steps = list(range(150))
    rows = noisy_run(rng, steps, 18, 40)
    for fpr in (0.01, 0.05):
        warnings = [w for w in ew.score_run(rows, fpr=fpr, high_noise_from=700) if w["step"] > 0]
        null = np.array([w["alarm"] for w in warnings if w["dup_factor"] == 1])
        other = np.array([w["alarm"] for w in warnings if w["dup_factor"] != 1])
        # Alarms within a step share their reference, so the rate over steps is noisier than binomial:
        # 149 steps of 40 samples, and 149 x 18 leave-one-out scores of the null samples themselves.
        for alarms in (null, other):
            assert abs(alarms.mean() - fpr) < 2.5 * math.sqrt(fpr * (1 - fpr) / 149) + 0.25 * fpr, (fpr, alarms.mean())


def test_heldout_samples_are_the_null_when_present_and_too_few_nulls_give_no_score():
    rows = []
    for sid, dup in enumerate([0, 0, 0, 1, 1, 4]):
        rows += probe_rows(0, sid, dup, 0.8 + 0.01 * sid, 0.2 + 0.01 * sid, 0.1)
    assert ew.null_mask(np.array([0, 0, 0, 1, 1, 4])).tolist() == [True] * 3 + [False] * 3
    assert ew.null_mask(np.array([0, 0, 1, 1, 1, 4])).tolist() == [False, False, True, True, True, False]
    warnings = ew.score_step(rows, {}, 0.01, 700)
    # 3 held-out samples: the others are scored against them; each held-out one has only 2 left: no score
    assert [w["score"] is None for w in warnings] == [True] * 3 + [False] * 3
    assert not any(w["alarm"] for w in warnings[:3])


def test_features_use_the_largest_scale_the_high_noise_window_and_the_own_start():
    rows = probe_rows(5, 7, 4, k=1.3, loss_cfg=0.25, loss_cond=0.05)
    ids, dups, feats = ew.sample_features(rows, {7: 0.2}, high_noise_from=700)
    assert ids.tolist() == [7] and dups.tolist() == [4]
    assert feats[0] == pytest.approx([1.3, math.log(0.25), math.log(0.2 / 0.05)])


def test_auroc_with_ci_on_a_hand_table():
    # positives 0.9, 0.4; negatives 0.5, 0.1, 0.4: 0.9 beats all three, 0.4 beats 0.1 and ties 0.4: 4.5 of 6
    result = stats.auroc_with_ci([0.9, 0.4, 0.5, 0.1, 0.4], [1, 1, 0, 0, 0], n_boot=200)
    assert result["auroc"] == pytest.approx(4.5 / 6)
    assert result["ci_low"] <= result["auroc"] <= result["ci_high"] and result["n_positive"] == 2
    assert stats.auroc_with_ci([0.1, 0.2], [0, 0])["auroc"] is None


def hand_table_result() -> dict:
    """evaluate_warning on a 5-sample, 3-step table small enough to check by hand."""
    dup = {1: 64, 2: 64, 3: 1, 4: 1, 5: 16}
    scores = {0: {1: 0.5, 2: 0.1, 3: 0.3, 4: 0.2, 5: 0.4},
              100: {1: 2.5, 2: 1.0, 3: 0.1, 4: 2.1, 5: 0.5},
              200: {1: 4.0, 2: 3.0, 3: 0.0, 4: 0.2, 5: 2.5}}
    warnings = [dict(step=step, sample_id=sid, dup_factor=dup[sid], score=score, threshold=2.0, alarm=score > 2.0)
                for step, row in scores.items() for sid, score in row.items()]
    memorized = {1: True, 2: True, 3: False, 4: False, 5: False}
    onset = {1: 300, 2: None, 3: None, 4: None, 5: 200}
    return ew.evaluate_warning(warnings, memorized, onset, n_boot=100)


def test_evaluation_auroc_lead_times_and_false_alarms_equal_a_hand_table():
    result = hand_table_result()
    # step 0: 0.5 beats 0.3, 0.2, 0.4 and 0.1 beats none: 3/6; step 100: 3 + 2 (1.0 loses to 2.1) = 5/6; step 200: 6/6
    assert [result["auroc_by_step"][s]["auroc"] for s in ("0", "100", "200")] == pytest.approx([0.5, 5 / 6, 1.0])
    assert result["earliest_auroc_0_9"] == 200 and result["best_auroc"] == 200
    # first alarms: 1 at 100, 2 at 200, 4 at 100, 5 at 200; onset - first alarm where both exist
    lead = {int(s): v["lead_time"] for s, v in result["lead_time"].items()}
    assert lead == {1: 200, 2: None, 3: None, 4: None, 5: 0}
    assert result["lead_time"]["2"]["first_alarm_step"] == 200 and result["lead_time"]["3"]["first_alarm_step"] is None
    assert result["false_alarms"] == dict(count=1, samples=[4], never_duplicated=2, checks=6, alarmed_checks=1)


def test_report_section_prints_the_hand_table_figures():
    from eval.warning_section import warning_lines

    result = hand_table_result()
    text = "\n".join(warning_lines(dict(fpr=0.01, **result), None))
    ci = result["auroc_by_step"]["200"]
    assert f"AUROC first reaches 0.9 at probe step 200: 1.000 [{ci['ci_low']:.3f}, {ci['ci_high']:.3f}]" in text
    assert "| AUROC | 0.50 | 0.83 | 1.00 |" in text
    assert "False alarms: 1 of 2 never-duplicated probe samples** alarmed at some probe step (1 of 6" in text
