"""The report's summaries (eval/summary.py), verdicts, premise, detection and reliability (eval/markdown.py) on
small hand-made tables, and the README's figures against the headline file a command wrote."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eval import markdown, report, summary as summary_module

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = dict(guidance_scale=7.5, threshold=0.75, high_noise_timestep=700, early_steps=None, seeds=[0, 1],
                severity_backend="pixel_cosine", num_inference_steps=30, model="tiny", probe_noise_draws=4)


def hand_table() -> pd.DataFrame:
    """6 samples at one checkpoint: severity rises with sample order; two are memorized (> 0.75)."""
    severity = np.array([0.1, 0.2, 0.3, 0.4, 0.8, 0.9])
    return pd.DataFrame(dict(
        checkpoint_step=500, sample_id=np.arange(6), dup_factor=[1, 1, 4, 4, 64, 64], guidance_scale=7.5,
        severity=severity, memorized_fraction=[0, 0, 0, 0, 1, 1],
        loss_cfg_x0_early=severity * 2,                 # rises with severity: finding 1 holds
        loss_cfg=severity[::-1].copy(),                  # epsilon space falls: secondary only
        collapse_early=severity + 1,                     # predicted to fall, rises: does not hold
        cos_diff_xmu_early=-severity,                    # falls as predicted: holds
        diversity=[0.9, 0.8, 0.7, 0.6, 0.1, 0.2],        # lower = memorized
        D_x_early=np.full(6, 0.5),                       # constant: cannot be tested
        D_T_early=[0.0, 0.1, 0.2, 0.3, 0.4, 0.6],        # rises with severity within each factor too: holds
        D_T=[0.0, 0.1, 0.2, 0.3, 0.4, 0.6], D_x=severity * 3,
        k0_first=[0.0, 0.1, 0.1, 0.1, 0.4, 0.5],         # no held-out rows: the fallback |k_0| < 0.2
        k_uncond_early=[0.0, 0.1, 0.1, 0.1, 0.4, 0.5], k_uncond_uncentred_early=[0.3] * 6,
    ))


@pytest.fixture(scope="module")
def summary():
    table = hand_table()
    out = summary_module.summarize(table, SETTINGS, n_boot=200)
    out.update(summary_module.read_findings(out, table, None, SETTINGS))
    return out


def test_verdicts_are_decided_by_the_named_measures(summary):
    f = summary["findings"]
    # finding (i) is a contrast at equal duplication: here every factor holds one class only (64x all memorized)
    assert f["i"]["verdict"] == "cannot be tested" and f["i"]["measures"]["loss_cfg_x0_early"]["within"]["diff"] is None
    assert f["i"]["measures"]["loss_cfg_x0_early"]["per_factor"]["64"]["untestable"] == "one class only"
    assert f["ii"]["verdict"] == "partly holds"
    assert f["ii"]["detail"] == "collapse_early does not hold; cos_diff_xmu_early holds"
    assert f["iii"]["verdict"] == "holds" and f["iii"]["detail"] == "D_x_early cannot be tested"
    lines = markdown.findings(summary, SETTINGS, 500, hand_table())
    verdict_lines = [i for i, line in enumerate(lines) if line.startswith("**")]
    assert [lines[i].split(" -- ")[1] for i in verdict_lines] == [
        "cannot be tested.", "partly holds (collapse_early does not hold; cos_diff_xmu_early holds).",
        "holds (D_x_early cannot be tested)."]
    assert lines[verdict_lines[0] + 1].startswith("- Decided by the contrast at equal duplication factor")
    for i, key in zip(verdict_lines[1:], ("collapse_early", "D_x_early")):
        assert lines[i + 1].startswith(f"- Decided by {key} pooled r = ") and "Why these:" in lines[i + 1]
        assert "within factor (fixed effects) r = " in lines[i + 1]
    assert "diversity r = " in lines[verdict_lines[1] + 2]  # final diversity only as secondary


def test_detection_uses_each_scores_direction_and_counts_negatives(summary):
    entry = summary["checkpoints"]["500"]["7.5"]
    assert entry["n_memorized"] == 2
    diversity = entry["detection"]["diversity"]
    assert diversity["direction"] == "lower" and diversity["auroc"] == 1.0
    assert diversity["tpr_label"] == "TPR at 0 FP (4 negatives)" and diversity["tpr"] == 1.0
    # collapse_early is predicted lower but rises with severity: AUROC 0 in its stated direction
    assert entry["detection"]["collapse_early"]["auroc"] == 0.0
    assert entry["detection"]["D_T"] == dict(auroc=1.0, direction="higher", tpr=1.0, n_positives=2, n_negatives=4,
                                             tpr_label="TPR at 0 FP (4 negatives)")


def test_premise_per_duplication_factor(summary):
    premise = summary["premise"]
    # the training-side probe is kept, labelled; it does not decide
    assert premise["k_uncond_by_dup"] == pytest.approx({"1": 0.05, "4": 0.1, "64": 0.45})
    k0_first = {f: e["mean"] for f, e in premise["k0_first_by_dup"].items()}
    assert k0_first == pytest.approx({"1": 0.05, "4": 0.1, "64": 0.45})
    # no held-out rows: the fallback |k0_first| < 0.2, said as such
    assert premise["null"] is None and premise["holds_for"] == [1, 4] and premise["fails_for"] == [64]
    assert premise["verdict"] == "partly holds"
    assert premise["sentence"].startswith("cannot be judged against a null") and "fallback |k0_first| < 0.2" in \
        premise["sentence"] and "largest |k0_first| 0.45 at 64x" in premise["sentence"]
    assert "carries the training image" not in premise["sentence"]
    lines = markdown.premise_lines(premise)
    row = next(line for line in lines if line.startswith("| 64 |"))
    assert row.startswith("| 64 | 2 | 0.45 [0.40, 0.50] | n/a | fails |") and row.endswith("| 0.45 / 0.30 | n/a |")


def test_reliability_by_hand():
    # two seeds; D_x seed 0 = [1, 2, 3, 4], seed 1 = [1, 3, 2, 4]: r_half 0.8, Spearman-Brown 1.6 / 1.8
    per_seed = pd.DataFrame(dict(sample_id=np.repeat(np.arange(4), 2), seed=[0, 1] * 4,
                                 D_x=[1, 1, 2, 3, 3, 2, 4, 4], sev_pixel_cosine=[0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.9, 0.9]))
    per_sample = pd.DataFrame(dict(sample_id=np.arange(4), D_x=[1, 2.5, 2.5, 4], severity=[0.1, 0.2, 0.3, 0.9]))
    from mem_analysis.verdicts import reliability

    rel = reliability(per_seed, per_sample, ["D_x"], "sev_pixel_cosine")
    assert rel["severity"]["reliability"] == pytest.approx(1.0)  # both seeds agree exactly
    assert rel["D_x"]["r_half"] == pytest.approx(0.8) and rel["D_x"]["reliability"] == pytest.approx(1.6 / 1.8)
    r = np.corrcoef([1, 2.5, 2.5, 4], [0.1, 0.2, 0.3, 0.9])[0, 1]
    assert rel["D_x"]["r_severity"] == pytest.approx(r)
    assert rel["D_x"]["r_disattenuated"] == pytest.approx(r / np.sqrt(1.6 / 1.8))


def test_anchor_table_reads_the_paper_per_model(summary):
    text = "\n".join(markdown.anchor_lines(summary, SETTINGS, 500))
    for row in ("| SD v1.4 (paper) | 0.92 |", "| SD v2.1 (paper) | 0.92 |", "| Realistic Vision (paper) | 0.70 |"):
        assert row in text
    r = np.corrcoef(hand_table()["D_x"], hand_table()["severity"])[0, 1]
    assert "| this run (step 500), D_x_early | r = n/a" in text  # constant in the hand table
    assert f"| this run (step 500), all-steps D_x (secondary) | r = {r:.3f} [" in text
    assert "taken from the paper's text" in text and "severity (`pixel_cosine` vs SSCD)" in text


def test_publish_headline_fills_the_readme_block(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "headline.md").write_text("- figure 0.123\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_START}\nold 0.9\n{report.README_END}\nrest\n")
    report.publish_headline(tmp_path / "eval", tmp_path / "docs.md", readme)
    assert (tmp_path / "docs.md").read_text() == "- figure 0.123\n"
    assert readme.read_text() == f"intro\n{report.README_START}\n- figure 0.123\n{report.README_END}\nrest\n"


def science_section(text: str) -> str:
    """The README's 'What it shows' section (up to the next bold paragraph heading)."""
    start = text.index("**What it shows**")
    return text[start:text.index("**Changing it.**", start)]


def test_readme_figures_equal_the_committed_headline():
    """Every science figure the README states is the block `eval/report.py --publish` wrote; none typed by hand."""
    text = (ROOT / "README.md").read_text()
    section = science_section(text)
    head, rest = section.split(report.README_START)
    block, tail = rest.split(report.README_END)
    outside = head + tail
    assert not re.findall(r"\d", outside), "the README's 'What it shows' states figures outside the generated block"
    committed = ROOT / "docs" / "demo_headline.md"
    if committed.is_file():
        assert block.strip("\n") == committed.read_text().strip("\n")
    else:
        assert not re.findall(r"\d", block), "figures in the README without docs/demo_headline.md to back them"


def test_memorized_is_the_label_majority_not_severity_over_the_threshold():
    """A sample whose mean similarity is over the threshold but whose seeds are mostly not copies is not memorized;
    one under it whose seeds are mostly copies is (mem_analysis.severity.is_memorized); onset follows the label."""
    table = pd.concat([hand_table().assign(checkpoint_step=step) for step in (100, 500)], ignore_index=True)
    table["memorized_fraction"] = [0, 0, 0, 0, 0, 0.5] + [0, 0, 0, 0.5, 0.25, 0.75]  # sample 4: severity 0.8, few copies
    out = summary_module.summarize(table, dict(SETTINGS, label="copy", copy_ratio=0.5), n_boot=50)
    assert out["checkpoints"]["500"]["7.5"]["n_memorized"] == 2  # samples 3 (severity 0.4) and 5
    assert out["onset"]["3"]["onset_step"] == 500 and out["onset"]["4"]["onset_step"] is None
    assert out["onset"]["5"]["onset_step"] == 100
    assert out["label_rule"].startswith("copy label: at least half of the seeds are copies")


def test_label_agreement_by_hand():
    """Per factor: the copy, similarity and NN-identity labels of hand-made seeds, their agreement, and the seeds
    where similarity and copy disagree (a look-alike: similar, not a copy)."""
    seeds = pd.DataFrame(dict(
        sample_id=np.repeat([0, 1, 2, 3], 2), dup_factor=np.repeat([64, 64, 1, 0], 2),
        copy=[1, 1, 1, 0, 0, 0, 0, 0], copy_ratio=[0.1, 0.2, 0.3, 0.9, 0.95, 0.9, np.nan, np.nan],
        sev_pixel_cosine=[0.9, 0.9, 0.7, 0.6, 0.8, 0.9, 0.2, 0.1], sev_nn_identity=[1, 1, 1, 1, 1, 0, 0, 0]))
    out = summary_module.label_agreement(seeds, SETTINGS)
    assert out["64"] == dict(samples=2, copy=2, similarity=1, nn_identity=2, agree_copy_similarity=0.5,
                             agree_copy_nn=1.0, agree_similarity_nn=0.5, similar_not_copy=0, copy_not_similar=1,
                             seeds=4, seeds_similar_not_copy=0, seeds_copy_not_similar=1, median_copy_ratio=0.25)
    assert out["1"]["similarity"] == 1 and out["1"]["copy"] == 0 and out["1"]["similar_not_copy"] == 1
    assert out["1"]["seeds_similar_not_copy"] == 2 and out["0"]["median_copy_ratio"] is None
    lines = markdown.label_agreement_lines(out, dict(SETTINGS, copy_ratio=0.5), 500)
    assert "| 64 | 2 | 2 | 1 | 2 | 0.50 | 1.00 | 0 of 4 | 1 of 4 | 0.25 |" in lines
    assert any(line.startswith("**The similarity label and the copy label disagree on 2 of 4 samples**") for line in lines)
