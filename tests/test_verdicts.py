"""Verdicts that control for duplication (mem_analysis.verdicts, mem_analysis.premise, stats.within_factor_*):
known answers on hand-made and synthetic tables, each of which the old pooled-only rules would get wrong."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from eval import markdown, summary as summary_module
from mem_analysis import stats, verdicts
from mem_analysis.premise import premise, reference_from_file

SETTINGS = dict(guidance_scale=7.5, threshold=0.75, high_noise_timestep=700, early_steps=None, seeds=[0, 1],
                severity_backend="pixel_cosine", num_inference_steps=30, model="tiny", probe_noise_draws=4)
FACTORS = np.repeat([1, 4, 16, 64], 12)


def study_table(rng, severity, **columns) -> pd.DataFrame:
    """One checkpoint's rows: 12 samples at each of 1x/4x/16x/64x, memorized when severity > 0.5 (D_x = severity
    unless given: summarize's onset needs it)."""
    columns.setdefault("D_x", severity)
    return pd.DataFrame(dict(checkpoint_step=100, sample_id=np.arange(len(FACTORS)), dup_factor=FACTORS,
                             guidance_scale=7.5, severity=severity, memorized_fraction=(severity > 0.5).astype(float),
                             **columns))


def decide(table: pd.DataFrame, finding: str) -> dict:
    """summarize's pooled correlations, then the finding's verdict (as eval/summary.py does)."""
    entry = summary_module.summarize(table, SETTINGS, n_boot=300)["checkpoints"]["100"]["7.5"]
    return verdicts.decide(table, entry["correlations"], finding, n_boot=300)


def test_within_factor_r_on_a_hand_table():
    # 1x: x = 0, 1, 2 and y = 0, 1, 2; 64x: x = 10, 11, 12 and y = 10, 12, 11.
    # Pooled (means 6, 6): sum xy = 36 + 25 + 16 + 16 + 30 + 30 = 153, sum x^2 = sum y^2 = 154: r = 153 / 154.
    # Within (deviations from the factor means): x -1, 0, 1 | -1, 0, 1; y -1, 0, 1 | -1, 1, 0:
    # sum xy = 2 + 1 = 3, sum x^2 = sum y^2 = 4: r = 3 / 4. With two factors, log(1 + F) is a dummy: partial = FE.
    x, y, f = [0, 1, 2, 10, 11, 12], [0, 1, 2, 10, 12, 11], [1, 1, 1, 64, 64, 64]
    assert stats.correlation(x, y, n_bootstrap=0).r == pytest.approx(153 / 154)
    assert stats.within_factor_correlation(x, y, f, "fixed_effects", n_bootstrap=0).r == pytest.approx(0.75)
    assert stats.within_factor_correlation(x, y, f, "partial", n_bootstrap=0).r == pytest.approx(0.75)
    # y = 12, 11, 10 at 64x: within-factor deviations cancel exactly (2 - 2 = 0) while pooled r = 150 / 154
    flipped = [0, 1, 2, 12, 11, 10]
    assert stats.correlation(x, flipped, n_bootstrap=0).r == pytest.approx(150 / 154)
    assert stats.within_factor_correlation(x, flipped, f, n_bootstrap=0).r == pytest.approx(0.0, abs=1e-12)


def test_partial_r_is_the_closed_form_and_differs_from_fixed_effects_with_three_factors():
    rng = np.random.default_rng(4)
    f = np.repeat([0, 1, 16], 10)
    x, y = f ** 0.5 + rng.normal(size=30), (f == 16) + 0.5 * rng.normal(size=30)
    z = np.log1p(f)
    r = lambda a, b: np.corrcoef(a, b)[0, 1]  # noqa: E731
    closed = (r(x, y) - r(x, z) * r(y, z)) / np.sqrt((1 - r(x, z) ** 2) * (1 - r(y, z) ** 2))
    partial = stats.within_factor_correlation(x, y, f, "partial", n_bootstrap=200)
    assert partial.r == pytest.approx(closed) and partial.low < partial.r < partial.high
    demeaned = [np.concatenate([v[f == k] - v[f == k].mean() for k in (0, 1, 16)]) for v in (x, y)]
    assert stats.within_factor_correlation(x, y, f, n_bootstrap=0).r == pytest.approx(r(*demeaned))
    assert abs(stats.within_factor_correlation(x, y, f, n_bootstrap=0).r - partial.r) > 1e-3
    assert np.isnan(stats.within_factor_correlation([1, 2, 3], [3, 1, 2], [1, 4, 16], n_bootstrap=50).r)


def test_negative_control_score_driven_by_duplication_is_carried_by_duplication_alone():
    rng = np.random.default_rng(0)
    severity = np.select([FACTORS == 64, FACTORS == 16], [0.8, 0.35], 0.1) + 0.05 * rng.normal(size=FACTORS.size)
    for score in (np.log(FACTORS) + 0.3 * rng.normal(size=FACTORS.size),  # log factor plus noise
                  FACTORS + 3.0 * rng.normal(size=FACTORS.size)):         # the factor itself: FE removes any shape
        table = study_table(rng, severity, D_x_early=score, D_T_early=score)
        result = decide(table, "iii")
        for m in result["measures"].values():
            assert m["pooled"]["ci_low"] > 0.5  # the old pooled rule: "holds"
            assert m["within"]["ci_low"] < 0 < m["within"]["ci_high"]
            assert m["verdict"] == "carried by duplication alone"
        assert result["verdict"] == "carried by duplication alone"


def test_positive_control_score_tracking_severity_within_factor_holds():
    rng = np.random.default_rng(1)
    severity = np.select([FACTORS == 64, FACTORS == 16], [0.8, 0.35], 0.1) + 0.1 * rng.normal(size=FACTORS.size)
    table = study_table(rng, severity, D_x_early=severity + 0.03 * rng.normal(size=FACTORS.size),
                        D_T_early=np.log(FACTORS) + 0.3 * rng.normal(size=FACTORS.size))
    result = decide(table, "iii")
    assert result["measures"]["D_x_early"]["verdict"] == "holds"
    assert result["measures"]["D_T_early"]["verdict"] == "carried by duplication alone"
    assert result["verdict"] == "partly holds"
    assert result["detail"] == "D_x_early holds; D_T_early carried by duplication alone"


def contrast_table(rng, cfg_excess: float, cond_drop: float = 1.0) -> pd.DataFrame:
    """16x and 64x each half memorized, 1x none; memorized samples' L_c lower by `cond_drop`, L_g higher by
    `cfg_excess`; L_g also rises with duplication (log F), as plain exposure would make it."""
    severity = np.where(np.arange(FACTORS.size) % 2 == 0, 0.9, 0.2) * (FACTORS >= 16) + 0.05
    memorized = severity > 0.5
    noise = lambda: 0.1 * rng.normal(size=FACTORS.size)  # noqa: E731
    return study_table(rng, severity, loss_cond_x0_early=2.0 - cond_drop * memorized - 0.1 * np.log(FACTORS) + noise(),
                       loss_cfg_x0_early=1.0 + cfg_excess * memorized + 0.3 * np.log(FACTORS) + noise())


def test_the_plain_conditional_loss_cannot_decide_finding_i():
    rng = np.random.default_rng(2)
    plain = contrast_table(rng, cfg_excess=0.0)  # plain overfitting: L_c lower, no CFG excess
    entry = summary_module.summarize(plain, SETTINGS, n_boot=300)["checkpoints"]["100"]["7.5"]
    assert entry["correlations"]["loss_cond_x0_early"]["pearson"]["ci_high"] < -0.5  # pooled r alone would "hold"
    result = verdicts.decide(plain, entry["correlations"], "i", n_boot=300)
    assert result["measures"]["loss_cond_x0_early"]["verdict"] == "holds"
    assert result["measures"]["loss_cfg_x0_early"]["verdict"] == "carried by duplication alone"  # pooled by log F only
    assert result["verdict"] == "carried by duplication alone"
    without_cfg = plain.drop(columns="loss_cfg_x0_early")
    assert verdicts.decide(without_cfg, entry["correlations"], "i", n_boot=300)["verdict"] == "cannot be tested"
    flat = plain.assign(loss_cfg_x0_early=1.0 + 0.1 * rng.normal(size=FACTORS.size))
    assert verdicts.decide(flat, entry["correlations"], "i", n_boot=300)["verdict"] == "does not hold"


def test_finding_i_holds_on_the_papers_contrast_and_reports_one_class_factors():
    rng = np.random.default_rng(3)
    result = decide(contrast_table(rng, cfg_excess=1.0), "i")
    assert result["verdict"] == "holds" and result["detail"] == ""
    cfg = result["measures"]["loss_cfg_x0_early"]
    assert cfg["within"]["diff"] == pytest.approx(1.0, abs=0.15) and cfg["within"]["ci_low"] > 0
    assert cfg["per_factor"]["1"]["untestable"] == "one class only" and cfg["per_factor"]["1"]["n_neg"] == 12
    assert cfg["per_factor"]["64"]["n_pos"] == 6 and cfg["per_factor"]["64"]["ci_low"] > 0
    assert result["measures"]["loss_cond_x0_early"]["within"]["ci_high"] < 0
    partly = decide(contrast_table(rng, cfg_excess=1.0, cond_drop=0.0), "i")
    assert partly["verdict"] == "partly holds"


def test_stratified_difference_by_hand():
    # stratum a: positives 3, 5 (mean 4), negatives 1 (mean 1): d = 3, w = 2 * 1 / 3;
    # stratum b: positives 10, negatives 4, 6, 8 (mean 6): d = 4, w = 1 * 3 / 4; stratum c: one class, left out.
    values = [3, 5, 1, 10, 4, 6, 8, 100, 100]
    labels = [1, 1, 0, 1, 0, 0, 0, 1, 1]
    strata = [0, 0, 0, 1, 1, 1, 1, 2, 2]
    d = stats.stratified_difference(values, labels, strata, n_bootstrap=0)
    assert d.diff == pytest.approx((2 / 3 * 3 + 3 / 4 * 4) / (2 / 3 + 3 / 4)) and (d.n_pos, d.n_neg) == (3, 4)
    pooled = stats.stratified_difference(values, labels, None, n_bootstrap=200)
    assert pooled.diff == pytest.approx(np.mean([3, 5, 10, 100, 100]) - np.mean([1, 4, 6, 8]))
    assert pooled.low <= pooled.diff <= pooled.high


def premise_table(rng, k0_by_factor: dict, n_heldout: int = 12) -> pd.DataFrame:
    """k0_first per sample: mean k0_by_factor[F] with noise 0.05; n_heldout held-out rows (F = 0) drawn as 0x."""
    factors = np.r_[np.zeros(n_heldout, int), FACTORS]
    k0 = np.array([k0_by_factor[f] for f in factors]) + 0.05 * rng.normal(size=factors.size)
    probe = 0.4 + 0.05 * rng.normal(size=factors.size)  # the training-side probe: never deciding
    return pd.DataFrame(dict(dup_factor=factors, k0_first=k0, k_uncond_early=probe))


def test_premise_holds_on_a_no_memorization_control():
    rng = np.random.default_rng(5)
    # nothing memorized, but a denoiser's first prediction keeps some shrinkage toward x for every image alike
    table = premise_table(rng, {0: 0.3, 1: 0.3, 4: 0.3, 16: 0.3, 64: 0.3})
    result = premise(table, n_boot=300)
    assert result["null"].startswith("held-out") and result["verdict"] == "holds"
    assert result["fails_for"] == [] and result["holds_for"] == [1, 4, 16, 64]
    assert all(abs(d["diff"]) < 0.1 for d in result["delta_k0_by_dup"].values())
    assert result["sentence"].startswith("holds: first-step k_0 within 0.2 of the held-out images'")
    # judged without the null, the same measurements would fail everywhere
    assert premise(table[table.dup_factor > 0], n_boot=300)["verdict"] == "does not hold"
    # the analytic Gaussian reference (evaluation's premise_reference.json) is printed beside, never deciding
    file = {"first_step": {"k0_mean": {"training": 0.01, "0": 0.002, "64": 0.003}},
            "k0_forward_early": {"training": 0.4, "0": 0.41, "64": 0.47}}
    beside = premise(table, reference=reference_from_file(file), n_boot=300)
    assert beside["analytic_k0_by_dup"] == {"0": 0.002, "64": 0.003}
    assert beside["analytic_k0_forward_by_dup"] == {"0": 0.41, "64": 0.47}
    assert beside["verdict"] == result["verdict"] and beside["delta_k0_by_dup"] == result["delta_k0_by_dup"]
    row = next(line for line in markdown.premise_lines(beside) if line.startswith("| 64 |"))
    assert "| holds | 0.00 |" in row and row.endswith("| 0.47 |")


def test_premise_fails_where_duplicated_k0_is_planted_above_the_held_out():
    rng = np.random.default_rng(6)
    result = premise(premise_table(rng, {0: 0.0, 1: 0.0, 4: 0.0, 16: 0.1, 64: 0.6}), n_boot=300)
    assert result["state_by_dup"] == {"1": "holds", "4": "holds", "16": "holds", "64": "fails"}
    assert result["verdict"] == "partly holds" and result["fails_for"] == [64]
    assert result["delta_k0_by_dup"]["64"]["ci_low"] > 0.2
    assert "at 64x the first-step k_0 exceeds the held-out images' by more than 0.2" in result["sentence"]
    everywhere = premise(premise_table(rng, {0: 0.0, 1: 0.6, 4: 0.6, 16: 0.6, 64: 0.6}), n_boot=300)
    assert everywhere["verdict"] == "does not hold"
    assert premise(pd.DataFrame(dict(dup_factor=[1, 4], k_uncond_early=[0.4, 0.5])))["verdict"] == "cannot be tested"


def test_summary_headline_block_has_the_contract_names():
    rng = np.random.default_rng(7)
    table = contrast_table(rng, cfg_excess=1.0)
    severity = table["severity"].to_numpy()
    table = table.assign(D_x_early=severity + 0.05 * rng.normal(size=len(table)),
                         D_T_early=severity + 0.05 * rng.normal(size=len(table)), collapse_early=1 - severity,
                         cos_diff_xmu_early=-severity, k0_first=0.05 * rng.normal(size=len(table)))
    heldout = table.iloc[:4].assign(dup_factor=0, sample_id=100 + np.arange(4), memorized_fraction=0.0)
    table = pd.concat([table, heldout], ignore_index=True)
    summary = summary_module.summarize(table, SETTINGS, n_boot=100)
    summary.update(summary_module.read_findings(summary, table, None, SETTINGS, n_boot=100))
    summary["early_warning"] = dict(auroc_by_step={"50": dict(auroc=0.6), "100": dict(auroc=0.9)})
    block = summary_module.headline_block(summary, table, SETTINGS)
    assert block["step"] == 100 and set(block) == {"step", "figures", "verdicts"}
    assert set(block["verdicts"]) == {"finding_i", "finding_ii", "finding_iii", "premise"}
    assert set(block["verdicts"].values()) <= set(verdicts.VERDICTS)
    figures = block["figures"]
    for f in (0, 1, 4, 16, 64):
        rows = table[table.dup_factor == f]
        assert figures[f"memorized_fraction_dup_{f}"] == pytest.approx(rows.memorized_fraction.mean())
        assert figures[f"k0_first_dup_{f}"] == pytest.approx(rows.k0_first.mean())
    for f in (1, 4, 16, 64):
        assert f"delta_k0_dup_{f}" in figures
    for col in ("loss_cfg_x0_early", "loss_cond_x0_early", "collapse_early", "cos_diff_xmu_early", "D_x_early",
                "D_T_early"):
        assert {f"r_{col}", f"r_within_{col}", f"r_partial_{col}"} <= set(figures)
    assert {"diff_loss_cfg_x0_early", "diff_within_loss_cfg_x0_early", "r_D_x"} <= set(figures)
    assert figures["r_D_x_early"] == pytest.approx(np.corrcoef(table.D_x_early, table.severity)[0, 1])
    assert figures["warning_auroc"] == 0.9  # the last probe step's, never the best one's
    assert block["verdicts"]["finding_i"] == "holds" and block["verdicts"]["premise"] == "holds"
    summary["headline"] = block
    at_last = table[table.checkpoint_step == 100]
    text = "\n".join(markdown.headline_lines(summary, SETTINGS, at_last, 100))
    assert "decided by loss_cfg_x0_early and loss_cond_x0_early: holds;" in text
    assert f"Pearson of D_x over the early steps with severity across this run's samples r = " \
           f"{figures['r_D_x_early']:.3f} [" in text and "beside the paper's 0.92 (SD v1.4)" in text
