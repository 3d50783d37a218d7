"""Segmentation metrics against hand-computed values and brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fundus_pipeline.evaluation.metrics import (
    auc_pr,
    auc_roc,
    binary_metrics,
    cldice,
    confusion,
    json_safe,
    quantise,
    score_histograms,
    segmentation_report,
)


def _ones(shape):
    return np.ones(shape, bool)


def test_confusion_hand_case():
    prob = np.array([[0.9, 0.2], [0.6, 0.4]])
    gt = np.array([[1, 0], [0, 1]], np.uint8)
    assert confusion(prob, gt, _ones((2, 2)), 0.5) == (1, 1, 1, 1)
    fov = np.array([[1, 1], [1, 0]], bool)
    assert confusion(prob, gt, fov, 0.5) == (1, 1, 1, 0)
    # prob >= threshold is positive
    assert confusion(np.array([[0.5]]), np.array([[1]]), _ones((1, 1)), 0.5) == (1, 0, 0, 0)
    # boolean masks are used as they are; 16-bit scores are v/65535
    assert confusion(np.array([[True, False]]), np.array([[1, 1]]), _ones((1, 2)), 0.99) == (1, 0, 0, 1)
    u16 = np.array([[32768, 32767]], np.uint16)
    assert confusion(u16, np.array([[1, 1]]), _ones((1, 2)), 0.5) == (1, 0, 0, 1)


def test_confusion_shape_mismatch():
    with pytest.raises(ValueError):
        confusion(np.zeros((2, 2)), np.zeros((2, 3)), np.ones((2, 2)), 0.5)


def test_binary_metrics_hand_case():
    m = binary_metrics(1, 1, 1, 1)
    assert m["sensitivity"] == m["specificity"] == m["accuracy"] == m["precision"] == m["f1"] == 0.5
    assert m["iou"] == pytest.approx(1 / 3)
    m = binary_metrics(6, 2, 90, 2)
    assert m["sensitivity"] == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(90 / 92)
    assert m["accuracy"] == pytest.approx(0.96)
    assert m["precision"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(12 / 16)
    assert m["iou"] == pytest.approx(0.6)


def test_binary_metrics_zero_division_conventions():
    m = binary_metrics(0, 0, 10, 0)  # both empty: perfect
    assert m == {"sensitivity": 1.0, "specificity": 1.0, "accuracy": 1.0, "precision": 1.0, "f1": 1.0, "iou": 1.0}
    m = binary_metrics(0, 0, 5, 5)  # empty prediction, non-empty GT
    assert m["f1"] == 0.0 and m["iou"] == 0.0 and m["sensitivity"] == 0.0 and m["precision"] == 1.0
    assert math.isnan(binary_metrics(0, 0, 0, 0)["accuracy"])


def test_auc_known_cases():
    gt = np.array([0, 0, 1, 1])
    fov = _ones(4)
    assert auc_roc(np.array([0.1, 0.2, 0.8, 0.9]), gt, fov) == 1.0
    assert auc_roc(np.array([0.9, 0.8, 0.2, 0.1]), gt, fov) == 0.0
    assert auc_roc(np.full(4, 0.3), gt, fov) == 0.5
    assert auc_pr(np.array([0.1, 0.2, 0.8, 0.9]), gt, fov) == 1.0
    # the sklearn documentation example: roc_auc 0.75, average precision 0.8333
    s = np.array([0.1, 0.4, 0.35, 0.8])
    assert auc_roc(s, gt, fov) == pytest.approx(0.75)
    assert auc_pr(s, gt, fov) == pytest.approx(0.8333333333)
    # all-equal scores: AP = prevalence
    assert auc_pr(np.full(4, 0.3), gt, fov) == pytest.approx(0.5)
    # single class inside the FOV: undefined
    assert math.isnan(auc_roc(s, np.zeros(4), fov))
    assert math.isnan(auc_pr(s, np.zeros(4), fov))
    # the FOV restricts the pixels: drop the misranked pair
    assert auc_roc(s, gt, np.array([1, 0, 1, 1], bool)) == 1.0


def _brute_auc(s, y):
    pos, neg = s[y], s[~y]
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size


def _brute_ap(s, y):
    ap, prev_r = 0.0, 0.0
    for t in np.unique(s)[::-1]:
        sel = s >= t
        tp = (sel & y).sum()
        r = tp / y.sum()
        ap += (r - prev_r) * tp / sel.sum()
        prev_r = r
    return ap


def test_auc_matches_brute_force_with_ties():
    rng = np.random.default_rng(3)
    y = rng.random(400) < 0.3
    s = np.clip(rng.normal(0.4 + 0.3 * y, 0.2), 0, 1)
    s = np.round(s * 20) / 20  # many ties
    fov = _ones(400)
    q = quantise(s).astype(np.float64)  # the grid the AUCs are exact on
    assert auc_roc(s, y, fov) == pytest.approx(_brute_auc(q, y), abs=1e-12)
    assert auc_pr(s, y, fov) == pytest.approx(_brute_ap(q, y), abs=1e-12)
    # uint16 and uint8 inputs are exact
    u16 = (s * 65535).round().astype(np.uint16)
    assert auc_roc(u16, y, fov) == pytest.approx(_brute_auc(u16.astype(float), y), abs=1e-12)
    u8 = (s * 255).round().astype(np.uint8)
    assert auc_pr(u8, y, fov) == pytest.approx(_brute_ap(u8.astype(float), y), abs=1e-12)


def test_auc_on_hrf_size():
    """Functional check on a full HRF-sized image (speed is measured in benchmarks/, not asserted here)."""
    rng = np.random.default_rng(0)
    prob = rng.integers(0, 65536, size=(2336, 3504), dtype=np.uint16)
    gt = rng.random((2336, 3504)) < 0.1
    a = auc_roc(prob, gt, _ones(gt.shape))
    assert abs(a - 0.5) < 0.01


def _line_masks():
    gt = np.zeros((40, 60), bool)
    gt[19:22, 5:55] = True  # 3-px thick horizontal vessel
    return gt


def test_cldice_synthetic_line():
    gt = _line_masks()
    fov = _ones(gt.shape)
    assert cldice(gt, gt, fov) == 1.0
    assert cldice(np.zeros_like(gt), gt, fov) == 0.0
    assert cldice(np.zeros_like(gt), np.zeros_like(gt), fov) == 1.0
    half = gt.copy()
    half[:, 30:] = False  # left half only: Tprec = 1, Tsens ~ 0.5 -> ~2/3
    assert cldice(half, gt, fov) == pytest.approx(2 / 3, abs=0.06)
    # a thinner prediction on the same centreline keeps clDice at 1 (unlike Dice)
    thin = np.zeros_like(gt)
    thin[20, 5:55] = True
    assert cldice(thin, gt, fov) == pytest.approx(1.0, abs=0.05)
    # outside the FOV nothing counts
    fov2 = np.zeros_like(gt)
    fov2[:, :30] = True
    assert cldice(half, gt, fov2) == pytest.approx(1.0, abs=0.05)


def _synthetic_items(n=8, seed=0):
    rng = np.random.default_rng(seed)
    items, probs, gts = [], [], []
    for i in range(n):
        gt = rng.random((32, 32)) < 0.15
        prob = np.clip(rng.normal(0.3 + 0.4 * gt, 0.15 + 0.03 * i), 0, 1)
        fov = _ones(gt.shape)
        tp, fp, tn, fn = confusion(prob, gt, fov, 0.5)
        pos, neg = score_histograms(prob, gt, fov)
        items.append({"key": f"{i:02d}", "tp": tp, "fp": fp, "tn": tn, "fn": fn, "pos_hist": pos, "neg_hist": neg,
                      "cldice": cldice(prob >= 0.5, gt, fov)})
        probs.append(prob)
        gts.append(gt)
    return items, probs, gts


def test_report_pooled_mean_and_bootstrap():
    items, probs, gts = _synthetic_items()
    rep = segmentation_report(items, n_boot=300, seed=1)
    assert rep["n_images"] == 8 and len(rep["per_image"]) == 8
    # pooled counts and AUC equal the metrics of all pixels concatenated
    allp, allg = np.concatenate([p.ravel() for p in probs]), np.concatenate([g.ravel() for g in gts])
    fov = _ones(allp.shape)
    assert (rep["pooled"]["tp"], rep["pooled"]["fp"], rep["pooled"]["tn"], rep["pooled"]["fn"]) == confusion(allp, allg, fov, 0.5)
    assert rep["pooled"]["auc_roc"] == pytest.approx(auc_roc(allp, allg, fov), abs=1e-12)
    assert rep["pooled"]["auc_pr"] == pytest.approx(auc_pr(allp, allg, fov), abs=1e-12)
    # mean of images
    assert rep["mean"]["f1"] == pytest.approx(np.mean([r["f1"] for r in rep["per_image"]]))
    # CIs contain the point estimates
    for k in ("sensitivity", "specificity", "accuracy", "f1", "auc_roc", "auc_pr", "cldice"):
        lo, hi = rep["ci95"]["mean"][k]
        assert lo <= rep["mean"][k] <= hi, k
    for k in ("f1", "auc_roc", "auc_pr"):
        lo, hi = rep["ci95"]["pooled"][k]
        assert lo <= rep["pooled"][k] <= hi, k
    # deterministic for a seed, different for another
    again = segmentation_report(items, n_boot=300, seed=1)
    assert again["ci95"] == rep["ci95"]
    other = segmentation_report(items, n_boot=300, seed=2)
    assert other["ci95"] != rep["ci95"]


def test_report_without_histograms_and_empty():
    items, _, _ = _synthetic_items(3)
    for it in items:
        it.pop("pos_hist")
        it.pop("neg_hist")
    rep = segmentation_report(items, n_boot=50, seed=0)
    assert math.isnan(rep["pooled"]["auc_roc"]) and math.isnan(rep["mean"]["auc_roc"])
    assert all(math.isnan(v) for v in rep["ci95"]["pooled"]["auc_roc"])
    assert json_safe(rep)["pooled"]["auc_roc"] is None
    empty = segmentation_report([], n_boot=10)
    assert empty["n_images"] == 0 and math.isnan(empty["pooled"]["f1"])


def test_pooled_f1_curve_matches_direct_counts():
    from fundus_pipeline.evaluation.metrics import binary_metrics, confusion, pooled_f1_curve

    rng = np.random.default_rng(3)
    probs = [rng.random((20, 30)).astype(np.float32) for _ in range(3)]
    gts = [(rng.random((20, 30)) < 0.2 + 0.5 * p).astype(np.float32) for p in probs]  # informative scores
    fovs = [rng.random((20, 30)) < 0.8 for _ in range(3)]
    thr, f1, auc = pooled_f1_curve(probs, gts, fovs)
    assert thr.shape == f1.shape == (1000,)
    for t in (0.1, 0.377, 0.5, 0.9):
        k = int(round(t * 1000))
        counts = np.sum([confusion(p, g, f, thr[k]) for p, g, f in zip(probs, gts, fovs)], axis=0)
        assert f1[k] == pytest.approx(binary_metrics(*map(int, counts))["f1"], abs=1e-12)
    pos = np.concatenate([p[f & (g > 0.5)] for p, g, f in zip(probs, gts, fovs)])
    neg = np.concatenate([p[f & (g <= 0.5)] for p, g, f in zip(probs, gts, fovs)])
    exact = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert 0.6 < auc and auc == pytest.approx(exact, abs=2e-3)  # 1000-level binning
