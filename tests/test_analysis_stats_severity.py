"""M5-M7 on analytic cases and against scipy / scikit-learn."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats
from sklearn.metrics import roc_auc_score, roc_curve

from mem_analysis import auroc, correlation, load_sscd, onset_step, severity, tpr_at_fpr, trajectory_collapse, wen_magnitude


def test_correlations_match_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = 0.5 * x + rng.normal(size=40)
    y_tied = np.round(y)  # ties, for Spearman's average ranks
    pearson = correlation(x, y, "pearson", n_bootstrap=500, seed=1)
    assert math.isclose(pearson.r, scipy_stats.pearsonr(x, y)[0], rel_tol=1e-10)
    assert pearson.low < pearson.r < pearson.high and pearson.n == 40
    assert correlation(x, y, "pearson", n_bootstrap=500, seed=1) == pearson  # seeded
    spearman = correlation(x, y_tied, "spearman", n_bootstrap=200)
    assert math.isclose(spearman.r, scipy_stats.spearmanr(x, y_tied)[0], rel_tol=1e-10)
    # the bootstrap interval covers scipy's own bootstrap estimate of the spread
    boot = scipy_stats.bootstrap((x, y), lambda a, b: scipy_stats.pearsonr(a, b)[0], paired=True,
                                 n_resamples=500, method="percentile", rng=1)
    assert abs(boot.confidence_interval.low - pearson.low) < 0.1
    assert abs(boot.confidence_interval.high - pearson.high) < 0.1


def test_auroc_and_tpr_at_fpr_match_sklearn():
    rng = np.random.default_rng(2)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.normal(size=300) + labels, 1)  # rounded: ties across classes
    assert math.isclose(auroc(scores, labels), roc_auc_score(labels, scores), rel_tol=1e-12)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    for max_fpr in (0.01, 0.1):
        assert math.isclose(tpr_at_fpr(scores, labels, max_fpr), tpr[fpr <= max_fpr].max())
    assert auroc([0.1, 0.2, 0.9, 0.8], [0, 0, 1, 1]) == 1.0
    with pytest.raises(ValueError, match="both memorized"):
        auroc([0.1, 0.2], [1, 1])


def test_auroc_rows_is_auroc_per_row_and_nan_without_both_classes():
    from mem_analysis.stats import auroc_rows
    # positives {2, 4} against negatives {1, 3}: 3 of the 4 pairs ordered, so 3/4; ties count one half
    assert auroc_rows(np.array([1.0, 2, 3, 4]), np.array([0, 1, 0, 1])) == 0.75
    assert auroc_rows(np.array([1.0, 1, 2]), np.array([1, 0, 0])) == 0.25
    rng = np.random.default_rng(3)
    scores = np.round(rng.normal(size=(50, 40)), 1)
    labels = rng.random((50, 40)) < 0.3
    labels[0] = False  # one class only
    values = auroc_rows(scores, labels)
    assert np.isnan(values[0])
    for row in range(1, 50):
        assert math.isclose(values[row], roc_auc_score(labels[row], scores[row]), rel_tol=1e-12)


def test_onset_step_is_first_checkpoint_over_threshold():
    steps = [100, 200, 300, 400]
    severity_curves = [[0.1, 0.8, 0.9, 0.95], [0.1, 0.2, 0.3, 0.2], [0.76, 0.7, 0.9, 0.9]]
    onset = onset_step(steps, severity_curves, threshold=0.75)
    assert onset[0] == 200 and np.isnan(onset[1]) and onset[2] == 100
    with pytest.raises(ValueError, match="checkpoints"):
        onset_step(steps, [[0.1, 0.2]], 0.5)


def test_severity_backends_on_analytic_images():
    torch.manual_seed(0)
    reference = torch.rand(2, 3, 16, 16)
    mean_image = torch.full((3, 16, 16), 0.5)
    generated = torch.stack([reference[0].expand(3, -1, -1, -1),  # prompt 0: every seed copies
                             torch.stack([reference[1], 1 - reference[1], mean_image + 0.5 * (reference[1] - 0.5)])])
    cosine = severity(generated, reference, "pixel_cosine", mean_image=mean_image)
    expected = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(cosine.similarity, expected)
    torch.testing.assert_close(cosine.severity, expected.mean(1))
    torch.testing.assert_close(cosine.memorized_fraction, torch.tensor([1.0, 2 / 3], dtype=torch.float64))
    ssim = severity(generated, reference, "ssim")
    torch.testing.assert_close(ssim.similarity[0], torch.ones(3, dtype=torch.float64))
    assert ssim.similarity[1, 1] < 0
    l2 = severity(generated, reference, "l2")
    rms = (2 * reference[1] - 1).pow(2).mean().sqrt().item()
    assert math.isclose(l2.similarity[1, 1].item(), 1 - rms, rel_tol=1e-6)
    pool = torch.cat([torch.rand(5, 3, 16, 16), reference])
    nn = severity(generated, None, "nn_identity", pool=pool, paired_index=[5, 6])
    assert nn.similarity[0].tolist() == [1.0, 1.0, 1.0] and nn.similarity[1, 0] == 1.0
    heldout = severity(generated, None, "nn_identity", pool=pool, paired_index=[5, -1])  # prompt 1 never trained
    assert heldout.similarity[0].tolist() == [1.0, 1.0, 1.0] and heldout.similarity[1].tolist() == [0.0, 0.0, 0.0]
    # SSIM of constant images a, b (no variance): (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01 * data_range)^2
    flat = severity(torch.full((1, 1, 3, 16, 16), 0.3), torch.full((1, 3, 16, 16), 0.6), "ssim")
    assert flat.similarity.item() == pytest.approx((0.36 + 1e-4) / (0.45 + 1e-4), rel=1e-9)
    # latent cosine (centred on mu when given) on constructed latents: a scaled copy, the negation, an orthogonal one
    ref = torch.zeros(1, 4, 8, 8)
    ref[0, 0, 0, 0] = 1.0
    other = torch.zeros(4, 8, 8)
    other[1, 0, 0] = 1.0
    mu = 0.5 * other
    generated_latents = torch.stack([mu + 3 * ref[0], mu - ref[0], mu + other])[None]
    latent = severity(generated_latents, mu + ref, "latent_cosine", mean_image=mu)
    torch.testing.assert_close(latent.similarity, torch.tensor([[1.0, -1.0, 0.0]], dtype=torch.float64))
    assert latent.threshold == 0.75 and latent.memorized_fraction.item() == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="mean_image"):
        severity(generated, reference, "pixel_cosine")
    with pytest.raises(ValueError, match="reference must be"):
        severity(generated, reference[:1], "ssim")


class TinyDescriptor(torch.nn.Module):
    """A stand-in SSCD network: global average pool of a 1x1 convolution."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 1)

    def forward(self, images):
        return self.conv(images).mean((2, 3))


def test_sscd_loads_torchscript_and_rejects_bad_files(tmp_path):
    path = tmp_path / "sscd.torchscript.pt"
    torch.jit.script(TinyDescriptor()).save(str(path))
    torch.manual_seed(1)
    reference = torch.rand(2, 3, 16, 16)
    generated = torch.stack([reference, torch.rand(2, 3, 16, 16)], 1)
    result = severity(generated, reference, "sscd", sscd_model=path, sscd_input_size=32)
    torch.testing.assert_close(result.similarity[:, 0], torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-6)
    assert result.threshold == 0.75
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sscd(tmp_path / "missing.pt")
    state_dict = tmp_path / "state_dict.pt"
    torch.save(TinyDescriptor().state_dict(), state_dict)
    with pytest.raises(ValueError, match="not a TorchScript file"):
        load_sscd(state_dict)


def test_wen_magnitude_and_trajectory_collapse():
    e_0 = torch.zeros(2, 5, 4, 2, 2)
    e_c = torch.ones(2, 5, 4, 2, 2) * torch.arange(1, 6, dtype=torch.float32)[None, :, None, None, None]
    # ||e_c - e_0|| at step k = (k + 1) * sqrt(16) = 4 (k + 1); first 2 steps average 6
    torch.testing.assert_close(wen_magnitude(e_c, e_0, first_steps=2), torch.full((2,), 6.0, dtype=torch.float64))
    trajectory = torch.zeros(3, 2, 1, 2, 2)
    trajectory[1, 0] = 1.0  # seed 1 differs from the others by 1 per element at step 0
    collapse = trajectory_collapse(trajectory)
    torch.testing.assert_close(collapse.pairwise_distance, torch.tensor([2 / 3, 0.0], dtype=torch.float64))
    assert collapse.final_diversity == 0
    with pytest.raises(ValueError, match="two seeds"):
        trajectory_collapse(trajectory[:1])


def test_self_similarity_on_analytic_seeds(tmp_path):
    """Reference-free severity: each seed's mean similarity to the prompt's other seeds."""
    from mem_analysis.severity import self_similarity

    torch.manual_seed(2)
    image = torch.rand(3, 16, 16)
    copies = image.expand(4, -1, -1, -1)  # prompt 0: every seed the same image
    varied = torch.stack([image, 1 - image, image, torch.rand(3, 16, 16)])  # prompt 1
    generated = torch.stack([copies, varied])
    mean_image = torch.full((3, 16, 16), 0.5)
    for backend in ("pixel_cosine", "ssim", "l2"):
        result = self_similarity(generated, backend, mean_image=mean_image)
        torch.testing.assert_close(result.similarity[0], torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-6)
        assert result.memorized_fraction[0] == 1.0 and result.severity[1] < 1
    # seed 0 of prompt 1: cosine 1 with seed 2, -1 with seed 1 (centred at 0.5: 1 - x is -x), c with seed 3
    centred = lambda a, b: float(torch.nn.functional.cosine_similarity((a - 0.5).flatten(), (b - 0.5).flatten(), 0))  # noqa: E731
    cosine = self_similarity(generated, "pixel_cosine", mean_image=mean_image).similarity[1]
    assert math.isclose(float(cosine[0]), (1 - 1 + centred(image, varied[3])) / 3, rel_tol=1e-6)
    path = tmp_path / "sscd.torchscript.pt"
    torch.jit.script(TinyDescriptor()).save(str(path))
    sscd = self_similarity(generated, "sscd", sscd_model=path, sscd_input_size=32)
    torch.testing.assert_close(sscd.similarity[0], torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="no back end 'nn_identity'"):
        self_similarity(generated, "nn_identity")


def test_set_detection_stated_direction_interval_and_tpr():
    from mem_analysis.stats import set_detection

    rng = np.random.default_rng(3)
    memorized, normal = rng.normal(2.0, 1.0, 60), rng.normal(0.0, 1.0, 200)
    higher = set_detection(memorized, normal, "higher", n_bootstrap=300)
    labels = np.r_[np.ones(60), np.zeros(200)]
    assert higher.direction == "higher"
    assert math.isclose(higher.auroc, roc_auc_score(labels, np.r_[memorized, normal]), rel_tol=1e-12)
    assert higher.low < higher.auroc < higher.high and (higher.n_pos, higher.n_neg) == (60, 200)
    fpr, tpr, _ = roc_curve(labels, np.r_[memorized, normal], drop_intermediate=False)
    assert math.isclose(higher.tpr, tpr[fpr <= 0.01].max()) and higher.tpr_label == "TPR at 1% FPR"
    lower = set_detection(-memorized, -normal, "lower", n_bootstrap=300)  # lower for memorized prompts, as stated
    assert lower.direction == "lower" and math.isclose(lower.auroc, higher.auroc)
    assert math.isclose(lower.low, higher.low) and math.isclose(lower.high, higher.high)
    wrong_way = set_detection(-memorized, -normal, "higher", n_bootstrap=0)  # the direction is not flipped to fit
    assert math.isclose(wrong_way.auroc, 1 - higher.auroc)
    separated = set_detection([5.0, 6.0, 7.0], [0.0, 1.0, np.nan], n_bootstrap=50)
    assert (separated.auroc, separated.tpr, separated.n_neg) == (1.0, 1.0, 2)
    assert separated.tpr_label == "TPR at 0 FP (2 negatives)"


def test_copy_label_counts_copies_not_look_alikes():
    """A pool of look-alikes (one shape, small differences) plus distinct images. A look-alike that is not the
    paired image passes the similarity threshold but is no copy; an exact copy plus small noise is; a copy of
    another training image is not a copy of the paired one; a held-out prompt (no paired image) never is."""
    from mem_analysis.severity import copy_test, is_memorized, nearest_pool_images

    g = torch.Generator().manual_seed(0)
    shape = torch.zeros(3, 16, 16)
    shape[:, 4:12, 4:12] = 1.0  # every look-alike: the same square, with its own small marks
    alike = torch.stack([shape + 0.15 * (torch.rand(3, 16, 16, generator=g) < 0.1) for _ in range(8)]).clamp(0, 1)
    pool = torch.cat([alike, torch.rand(4, 3, 16, 16, generator=g)])
    new_alike = (shape + 0.15 * (torch.rand(3, 16, 16, generator=g) < 0.1)).clamp(0, 1)
    copy = (pool[2] + 0.01 * torch.randn(3, 16, 16, generator=g)).clamp(0, 1)
    generated = torch.stack([torch.stack([copy, new_alike, pool[5], alike[2]]),   # prompt paired with pool[2]
                             torch.stack([copy, new_alike, pool[5], alike[2]])])  # prompt held out (-1)
    paired = [2, -1]
    test = copy_test(nearest_pool_images(generated, pool, paired), copy_ratio=0.5)
    assert test.copy[0].tolist() == [1.0, 0.0, 0.0, 1.0] and test.copy[1].tolist() == [0.0] * 4
    assert test.fraction.tolist() == [0.5, 0.0] and is_memorized(test.fraction).tolist() == [True, False]
    assert test.ratio[0, 0] < 0.2 and 0.6 < test.ratio[0, 1] < 1.5 and test.ratio[0, 2] > 1  # pool[5] is nearer itself
    assert torch.isnan(test.ratio[1]).all()
    similarity = severity(generated[:1], pool[2:3], "pixel_cosine", mean_image=pool.mean(0))
    assert similarity.similarity[0, 1] > 0.75  # the look-alike would count under a similarity threshold
    nn = severity(generated, None, "nn_identity", pool=pool, paired_index=paired)
    assert nn.similarity[0, 0] == 1.0 and nn.similarity[0, 2] == 0.0 and nn.similarity[1].sum() == 0


def test_copy_ratio_boundary_and_distance_features():
    """d(paired) / d(nearest other) exactly at the ratio is not a copy; just below it is; features of any shape
    (e.g. SSCD descriptors, (P, N, D)) are compared flattened; is_memorized is a majority of seeds."""
    from mem_analysis.severity import Neighbours, copy_label, is_memorized, nearest_pool_images

    pool = torch.tensor([[0.0], [3.0], [10.0]])
    generated = torch.tensor([[[1.0], [0.99], [2.0]]])  # d(paired 0) 1, 0.99, 2; nearest other (3.0): 2, 2.01, 1
    neighbours = nearest_pool_images(generated, pool, [0])
    torch.testing.assert_close(neighbours.d_paired, torch.tensor([[1.0, 0.99, 2.0]], dtype=torch.float64))
    torch.testing.assert_close(neighbours.d_other, torch.tensor([[2.0, 2.01, 1.0]], dtype=torch.float64))
    assert neighbours.nearest.tolist() == [[0, 0, 1]]
    assert copy_label(neighbours, 0.5).tolist() == [[0.0, 1.0, 0.0]]  # 1 / 2 = 0.5 is not below 0.5
    assert copy_label(neighbours, 1.0).tolist() == [[1.0, 1.0, 0.0]]  # ratio 1: Carlini's nearest-is-paired
    exact = Neighbours(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0.5, 0.0]]), torch.tensor([[1.0, 0.0]]))
    assert copy_label(exact, 0.5).tolist() == [[0.0, 0.0]]  # 0 / 0 (the pool holds the paired image twice): no copy
    with pytest.raises(ValueError, match="copy_ratio"):
        copy_label(neighbours, 1.5)
    assert is_memorized([0.5, 0.49, float("nan"), 1.0]).tolist() == [True, False, False, True]


def test_copy_label_on_descriptors_and_the_label_columns():
    """With an SSCD model (here a stand-in TorchScript embedder) the copy test also runs on descriptors of the pool;
    when SSCD is the headline back end it decides `copy`, the pixel test is kept as `copy_pixel`; the memorized
    fraction is the share of copies, the similarity fraction the share over the threshold."""
    from dataclasses import replace
    from types import SimpleNamespace

    import numpy as np

    from mem_analysis.measure import MeasureSettings, ProbeSet, PromptBatch, severity_scores
    from mem_analysis.severity import embed_images

    g = torch.Generator().manual_seed(3)
    embedder = torch.jit.script(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten()))
    pool = torch.rand(6, 3, 16, 16, generator=g)
    images = torch.stack([torch.stack([pool[1], torch.rand(3, 16, 16, generator=g)]),  # a copy, a new image
                          torch.stack([pool[1], pool[4]])])  # prompt 1 is held out: nothing to copy
    probe = ProbeSet(np.array([10, 11]), np.array([8, 0]), ["a", "b"], torch.empty(0), torch.empty(0),
                     torch.zeros(2, 4, 2, 2), torch.stack([pool[1], torch.rand(3, 16, 16, generator=g)]), pool,
                     np.arange(6), np.array([1, -1]), torch.zeros(4, 2, 2), pool.mean(0), torch.empty(0),
                     pool_counts=np.ones(6), pool_sscd=embed_images(pool, embedder))
    traj = SimpleNamespace(images=images, final=torch.rand(2, 2, 4, 2, 2, generator=g), x_T=torch.zeros(2, 2, 4, 2, 2))
    settings = MeasureSettings((0, 1), 1, ("pixel_cosine", "nn_identity", "sscd"), "sscd", 0.75, 700, None,
                               copy_ratio=0.5)
    scores, copies = severity_scores(traj, probe, [0, 1], settings, embedder)
    assert set(copies) == {"pixel", "sscd"} and set(scores) == {"pixel_cosine", "nn_identity", "sscd"}
    assert copies["sscd"].copy.tolist() == [[1.0, 0.0], [0.0, 0.0]] == copies["pixel"].copy.tolist()
    assert scores["sscd"].similarity[0, 0] == pytest.approx(1.0)  # the descriptor of the paired image itself
    batch = PromptBatch(traj=traj, scores=scores, early_steps=1, values=[], per_seed=[], curves=[], copies=copies)
    sample, seeds = batch.label_columns(settings, 0)
    assert sample["label"] == "copy" and sample["memorized_fraction"] == 0.5
    assert sample["similarity_fraction"] == float(scores["sscd"].memorized_fraction[0])
    assert set(seeds[0]) == {"copy", "copy_ratio", "copy_pixel", "copy_ratio_pixel"} and seeds[0]["copy"] == 1.0
    similarity = batch.label_columns(replace(settings, label="similarity"), 0)[0]
    assert similarity["label"] == "similarity" and similarity["memorized_fraction"] == sample["similarity_fraction"]

