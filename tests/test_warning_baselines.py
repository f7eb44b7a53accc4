"""mem_analysis.warning_baselines on hand-made tables: paired AUROC differences, TPR at the warning's false-positive
rate, AUROC within a duplication factor, lead-time intervals on a checkpoint grid, the decision step; and the
report's verdict when a baseline is perfect (the warning does not beat it) or when the warning is."""
from __future__ import annotations

import numpy as np
import pytest
from test_early_warning import probe_rows

from mem_analysis import warning_baselines as wb


def test_paired_auroc_difference_on_a_hand_table():
    labels = np.array([1, 1, 0, 0, 0], bool)
    perfect = np.array([0.9, 0.8, 0.3, 0.2, 0.1])
    flat = np.zeros(5)  # every pair tied: AUROC 0.5
    result = wb.paired_auroc_difference(perfect, flat, labels, n_boot=300)
    assert result["diff"] == pytest.approx(0.5) and result["n"] == 5
    assert result["ci_low"] == pytest.approx(0.5) and result["ci_high"] == pytest.approx(0.5)  # every resample: 1 - 0.5
    same = wb.paired_auroc_difference(perfect, perfect * 2, labels, n_boot=300)  # same ranking, zero difference
    assert same["diff"] == 0.0 and same["ci_low"] == 0.0 and same["ci_high"] == 0.0
    assert wb.paired_auroc_difference(perfect, flat, np.zeros(5, bool))["diff"] is None


def test_tpr_at_the_warnings_fpr_and_within_factor_auroc():
    labels = np.array([1, 1, 1, 0, 0, 0, 0], bool)
    factors = np.array([64, 64, 16, 64, 16, 16, 1])
    alarms = np.array([1, 0, 0, 1, 0, 0, 0], bool)  # TPR 1/3, FPR 1/4
    scores = dict(warning=np.array([5.0, 1.0, 0.5, 4.0, 0.2, 0.1, 0.0]), duplication=factors.astype(float))
    result = wb.compare_signals(scores, labels, factors, alarms, n_boot=100)
    assert result["warning_alarm"] == pytest.approx(dict(tpr=1 / 3, fpr=1 / 4))
    # duplication at FPR <= 1/4: the threshold s >= 64 takes both 64x positives and one 64x negative (1 of 4)
    assert result["signals"]["duplication"]["tpr_at_warning_fpr"] == pytest.approx(2 / 3)
    # within 64x: positives 5, 1 vs negative 4 -> 1 of 2; within 16x: positive 0.5 vs 0.2, 0.1 -> 1
    within = result["signals"]["warning"]["within"]
    assert within["64"]["auroc"] == pytest.approx(0.5) and within["16"]["auroc"] == pytest.approx(1.0)
    assert "1" not in within  # one class only
    assert result["signals"]["duplication"]["within"]["64"]["auroc"] == 0.5  # a duplicate count ties within a factor


def test_lead_interval_on_a_hand_grid():
    grid = [0, 300, 600, 900, 1200]
    # alarm at 450 counts at checkpoint 600; crossed between 600 and 900: lead in [0, 300], certain
    assert wb.lead_interval(450, 900, grid) == dict(alarm_step=450, alarm_checkpoint=600, onset_step=900,
                                                    previous_checkpoint=600, lead_low=0, lead_high=300, certain=True)
    late = wb.lead_interval(150, 300, grid)  # alarm counts at 300, the onset checkpoint itself: no lead for sure
    assert (late["alarm_checkpoint"], late["lead_low"], late["lead_high"], late["certain"]) == (300, -300, 0, False)
    early = wb.lead_interval(0, 1200, grid)
    assert (early["lead_low"], early["lead_high"], early["certain"]) == (900, 1200, True)
    first = wb.lead_interval(0, 0, grid)  # memorized at the first checkpoint: no lower bound
    assert first["lead_low"] is None and first["lead_high"] == 0 and first["previous_checkpoint"] is None
    assert wb.lead_interval(1250, 1200, grid)["alarm_checkpoint"] is None  # after the last checkpoint
    assert wb.lead_interval(None, 600, grid)["lead_high"] is None
    with pytest.raises(ValueError):
        wb.lead_interval(0, 450, grid)


def test_lead_times_by_factor():
    first = {1: 150, 2: 450, 3: 0}
    onsets = {1: 600, 2: 600, 3: None, 4: 900}
    dups = {1: 64, 2: 64, 3: 1, 4: 64}
    result = wb.lead_times(first, onsets, dups, [0, 300, 600, 900])
    top = result["by_factor"]["64"]
    # sample 1: a_c 300, c_prev 300 -> [0, 300] certain; sample 2: a_c 600 -> [-300, 0]; sample 4: no alarm
    assert top == dict(samples=3, alarmed=2, crossed=3, certain=1, median_lead_low=-150.0, median_lead_high=150.0,
                       paired=2)
    assert result["by_factor"]["1"]["alarmed"] == 1 and result["by_factor"]["1"]["crossed"] == 0


def test_lead_table_prints_the_intervals_by_label_and_factor():
    from eval.warning_section import lead_lines

    lead = wb.lead_times({1: 150, 2: 450, 3: 0}, {1: 600, 2: 600, 3: None, 4: 900}, {1: 64, 2: 64, 3: 1, 4: 64},
                         [0, 300, 600, 900])
    text = "\n".join(lead_lines(dict(lead={"memorized": lead}, main_label="memorized", main_rule="rule")))
    assert "| memorized (rule) | 64 | 3 | 2 | 3 | 1 | [-150, 150] (2) |" in text
    assert "| memorized (rule) | 1 | 1 | 1 | 0 | 0 | [n/a, n/a] (0) |" in text


def test_decision_step_is_the_last_probe_step_before_the_first_onset():
    assert wb.decision_step([0, 150, 300, 450], [600, 300, None]) == 150
    assert wb.decision_step([0, 150, 300, 450], [None, None]) == 450
    assert wb.decision_step([150, 300], [0, 300]) is None


def test_unet_calls_of_a_probe_step_and_a_sampling_check():
    assert wb.unet_calls(10, 2, 20) == dict(probe=20, sampling=80, vae_decodes=2, ratio=4.0)
    assert wb.unet_calls(10, 2, 20, guided=False)["sampling"] == 40


def test_monitor_severity_takes_the_first_seeds():
    rows = [dict(checkpoint_step=300, sample_id=1, seed=s, sev=v) for s, v in ((7, 0.9), (2, 0.1), (5, 0.3))]
    assert wb.monitor_severity(rows, 2, "sev") == {300: {1: pytest.approx(0.2)}}  # seeds 2 and 5


def hand_run(rng, memorized_of, warning_of, steps=(0, 150, 300)):
    """Probe rows, warnings and a sampling monitor for 10 null (1x), 10 16x and 10 64x samples; the warning's score
    is `warning_of(label, rng)`, the features and the monitor are noise."""
    dups = [1] * 10 + [16] * 10 + [64] * 10
    memorized = {sid: memorized_of(sid, dup) for sid, dup in enumerate(dups)}
    rows, warnings = [], []
    for step in steps:
        for sid, dup in enumerate(dups):
            k, lg, lc = rng.normal(0, 0.1, 3)
            rows += probe_rows(step, sid, dup, 0.8 + k, np.exp(-1.5 + lg), np.exp(-2.0 + lc))
            score = warning_of(memorized[sid], rng)
            warnings.append(dict(step=step, sample_id=sid, dup_factor=dup, score=score, threshold=3.0,
                                 alarm=score > 3.0))
    monitor = {c: {sid: float(rng.normal(0.2, 0.05)) for sid in memorized} for c in (0, 300)}
    return rows, warnings, monitor, memorized


def verdict_text(rows, warnings, monitor, memorized, onsets):
    """(per-step comparison, decision step, verdict, the report's verdict line)."""
    from eval.warning_section import verdict_line

    steps = wb.compare_over_steps(rows, warnings, monitor, memorized, 0.01, 700, n_boot=300)
    decide = wb.decision_step([int(s) for s in steps], onsets)
    verdict = wb.verdict(steps[str(decide)])
    b = dict(verdict=verdict, decision_step=decide, monitor_seeds=2, cost=wb.unet_calls(10, 2, 20))
    return steps, decide, verdict, verdict_line(b)


def test_report_says_the_warning_does_not_beat_a_perfect_duplicate_count():
    rng = np.random.default_rng(0)
    rows, warnings, monitor, memorized = hand_run(rng, lambda sid, dup: dup == 64,
                                                  lambda label, r: float(r.normal(1.0 * label, 1.0)))
    steps, decide, verdict, line = verdict_text(rows, warnings, monitor, memorized, [300 if m else None
                                                                                    for m in memorized.values()])
    assert decide == 150 and steps["150"]["signals"]["duplication"]["auroc"] == 1.0
    assert steps["150"]["best_baseline"] == "duplication" and steps["150"]["sampling_checkpoint"] == 0
    assert verdict["outcome"] in ("not_shown", "worse") and verdict["margin"]["diff"] < 0
    assert "does not beat the best baseline (duplicate count (exposure)) at step 150" in line
    assert "cheap proxy for a sampling monitor" in line and "4.0 times more" in line


def test_report_says_the_warning_beats_baselines_that_cannot_tell_equally_duplicated_images_apart():
    rng = np.random.default_rng(1)
    rows, warnings, monitor, memorized = hand_run(rng, lambda sid, dup: dup > 1 and sid % 2 == 0,
                                                  lambda label, r: float(r.normal(6.0 * label, 0.5)))
    steps, decide, verdict, line = verdict_text(rows, warnings, monitor, memorized, [300 if m else None
                                                                                    for m in memorized.values()])
    entry = steps[str(decide)]
    assert entry["signals"]["warning"]["auroc"] == 1.0
    assert entry["signals"]["warning"]["within"]["64"]["auroc"] == 1.0
    assert entry["signals"]["duplication"]["within"]["64"]["auroc"] == 0.5
    assert verdict["outcome"] == "beats" and verdict["margin"]["ci_low"] > 0
    assert line.startswith("**The warning beats the best baseline") and f"at step {decide}" in line
