"""Vessel-segmentation metrics: confusion counts, AUCs from 16-bit score histograms, clDice, reports.

Conventions (all metrics are computed inside the field-of-view mask ``fov``):

* A pixel is predicted positive when ``prob >= threshold`` (boolean masks are used as they are).
* Ground truth and FOV arrays are taken as boolean (``!= 0``).
* ``binary_metrics``: sensitivity TP/(TP+FN), specificity TN/(TN+FP), accuracy (TP+TN)/N,
  precision TP/(TP+FP), f1 = Dice = 2TP/(2TP+FP+FN), iou = TP/(TP+FP+FN).
  **0/0 cases:** a ratio whose denominator is 0 has, by definition, no possible error on the pixels it
  counts, so it is 1.0 (e.g. sensitivity with no vessel pixels in the ground truth, precision with no
  predicted vessel pixel, f1/iou when both prediction and ground truth are empty). The one exception is
  accuracy on an empty FOV (N = 0), which is NaN. Note that an empty prediction against a non-empty
  ground truth still gets f1 = iou = sensitivity = 0.
* AUCs are exact for scores on a 65536-level grid: scores are quantised to ``round(p * 65535)``
  (uint16 input is used as is, uint8 is scaled by 257, which preserves order and ties), counted in
  per-class histograms, and integrated exactly: AUC-ROC is the Mann-Whitney statistic with ties
  counted 1/2 (= trapezoidal ROC area, as sklearn's ``roc_auc_score``); AUC-PR is the step-wise
  average precision sum_k (R_k - R_{k-1}) P_k over the distinct score levels (as sklearn's
  ``average_precision_score``). AUC-ROC is NaN when the FOV holds only one class; AUC-PR is NaN without
  positives and 1.0 with positives only (as sklearn).
* clDice (Shit et al., CVPR 2021): skeletons of prediction and ground truth (both restricted to the
  FOV) by ``skimage.morphology.skeletonize``; Tprec = |S(P) & G| / |S(P)|, Tsens = |S(G) & P| / |S(G)|,
  clDice = 2 Tprec Tsens / (Tprec + Tsens); 1.0 when both skeletons are empty, 0.0 when only one is.
* ``segmentation_report``: per-image metrics; overall *pooled* metrics (confusion counts and score
  histograms summed over all images, i.e. AUCs over all FOV pixels of all images pooled) and the
  *mean of per-image* metrics (NaN-skipping); bootstrap 95% percentile CIs resampling images with
  replacement, for every mean metric and for pooled F1, AUC-ROC and AUC-PR.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

LEVELS = 65536
BINARY_KEYS = ("sensitivity", "specificity", "accuracy", "precision", "f1", "iou")
ALL_KEYS = BINARY_KEYS + ("auc_roc", "auc_pr", "cldice")
POOLED_CI_KEYS = ("f1", "auc_roc", "auc_pr")


# --------------------------------------------------------------------------------------------- helpers
def _as_bool(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a if a.dtype == bool else a != 0


def _check_shapes(*arrays: np.ndarray) -> None:
    shapes = {np.shape(a) for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"array shapes differ: {sorted(shapes)}")


def _ratio(num: float, den: float) -> float:
    return 1.0 if den == 0 else float(num) / float(den)


def quantise(prob: np.ndarray) -> np.ndarray:
    """Scores as integer levels 0..65535 (uint16 as is, uint8 x 257, floats round(clip(p,0,1)*65535))."""
    prob = np.asarray(prob)
    if prob.dtype == np.uint16:
        return prob
    if prob.dtype == np.uint8:
        return prob.astype(np.uint16) * np.uint16(257)
    if prob.dtype == bool:
        return prob.astype(np.uint16) * np.uint16(65535)
    p = np.clip(np.nan_to_num(prob.astype(np.float64), nan=0.0), 0.0, 1.0)
    return np.rint(p * (LEVELS - 1)).astype(np.uint16)


def predicted_mask(prob_or_mask: np.ndarray, threshold: float) -> np.ndarray:
    """Bool input as is; else ``prob >= threshold`` (uint16 read as v/65535, uint8 as v/255)."""
    a = np.asarray(prob_or_mask)
    if a.dtype == bool:
        return a
    if a.dtype == np.uint16:
        return a.astype(np.float64) / 65535.0 >= threshold
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0 >= threshold
    return a >= threshold


# --------------------------------------------------------------------------------------------- binary
def confusion(prob_or_mask: np.ndarray, gt: np.ndarray, fov: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    """(TP, FP, TN, FN) inside ``fov``. Bool input is a mask; otherwise positive means ``prob >= threshold``
    (uint16 scores are read as v/65535 and uint8 as v/255)."""
    _check_shapes(prob_or_mask, gt, fov)
    pred = predicted_mask(prob_or_mask, threshold)
    g = _as_bool(gt)
    f = _as_bool(fov)
    n = int(np.count_nonzero(f))
    tp = int(np.count_nonzero(pred & g & f))
    p_in = int(np.count_nonzero(pred & f))
    g_in = int(np.count_nonzero(g & f))
    fp = p_in - tp
    fn = g_in - tp
    tn = n - tp - fp - fn
    return tp, fp, tn, fn


def binary_metrics(tp: int, fp: int, tn: int, fn: int) -> dict[str, float]:
    """Sensitivity, specificity, accuracy, precision, f1 (= Dice), iou; 0/0 := 1.0 (see module doc),
    accuracy of an empty FOV is NaN."""
    n = tp + fp + tn + fn
    return {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "accuracy": float("nan") if n == 0 else (tp + tn) / n,
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
    }


# --------------------------------------------------------------------------------------------- AUCs
def score_histograms(prob: np.ndarray, gt: np.ndarray, fov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class counts (positives, negatives) of the quantised scores inside ``fov`` (int64, 65536 bins)."""
    _check_shapes(prob, gt, fov)
    q = quantise(prob)
    f = _as_bool(fov)
    g = _as_bool(gt)
    pos = np.bincount(q[f & g].ravel(), minlength=LEVELS).astype(np.int64)
    neg = np.bincount(q[f & ~g].ravel(), minlength=LEVELS).astype(np.int64)
    return pos, neg


def auc_roc_from_hist(pos: np.ndarray, neg: np.ndarray) -> np.ndarray | float:
    """Exact AUC-ROC (ties = 1/2) from histograms; accepts (..., 65536) stacks."""
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    p = pos.sum(-1)
    n = neg.sum(-1)
    neg_below = np.cumsum(neg, axis=-1) - neg  # negatives with a strictly lower score
    u = (pos * (neg_below + 0.5 * neg)).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = np.where((p > 0) & (n > 0), u / (p * n), np.nan)
    return float(auc) if auc.ndim == 0 else auc


def auc_pr_from_hist(pos: np.ndarray, neg: np.ndarray) -> np.ndarray | float:
    """Exact step-wise average precision from histograms; accepts (..., 65536) stacks."""
    pos = np.asarray(pos, dtype=np.float64)[..., ::-1]  # descending score
    neg = np.asarray(neg, dtype=np.float64)[..., ::-1]
    tp = np.cumsum(pos, axis=-1)
    fp = np.cumsum(neg, axis=-1)
    p = tp[..., -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        ap = np.where(p > 0, (pos * prec).sum(-1) / p, np.nan)
    return float(ap) if ap.ndim == 0 else ap


def pooled_f1_curve(probs, gts, fovs, bins: int = 1000) -> tuple[np.ndarray, np.ndarray, float]:
    """Pooled F1 at the thresholds ``k / bins`` (k = 0..bins-1) and the pooled AUC-ROC, inside the FOVs.

    One histogram pass: float probabilities are binned by ``floor(p * bins)``, so the F1 at ``t = k / bins``
    counts ``p >= t`` as positive (the rule of ``fundus segment``). Ground truth is ``> 0.5``. The AUC is
    integrated on the same ``bins`` levels (ties at 1/2), a close approximation used for model selection;
    reported AUCs come from :func:`auc_roc` on the 65536-level grid. Returns ``(thresholds, f1, auc)``.
    """
    pos = np.zeros(bins, np.int64)
    neg = np.zeros(bins, np.int64)
    for p, g, f in zip(probs, gts, fovs):
        f = _as_bool(f)
        q = np.clip((np.asarray(p, np.float64)[f] * bins).astype(np.int64), 0, bins - 1)
        gt = np.asarray(g)[f] > 0.5
        pos += np.bincount(q[gt], minlength=bins)
        neg += np.bincount(q[~gt], minlength=bins)
    tp = np.cumsum(pos[::-1])[::-1]  # predicted positive at threshold k / bins
    fp = np.cumsum(neg[::-1])[::-1]
    fn = pos.sum() - tp
    f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    return np.arange(bins) / bins, f1, float(auc_roc_from_hist(pos, neg))


def auc_roc(prob: np.ndarray, gt: np.ndarray, fov: np.ndarray) -> float:
    """Exact AUC-ROC inside ``fov`` (scores on a 65536-level grid; NaN with a single class)."""
    return float(auc_roc_from_hist(*score_histograms(prob, gt, fov)))


def auc_pr(prob: np.ndarray, gt: np.ndarray, fov: np.ndarray) -> float:
    """Exact average precision inside ``fov`` (NaN without positives)."""
    return float(auc_pr_from_hist(*score_histograms(prob, gt, fov)))


# --------------------------------------------------------------------------------------------- clDice
def cldice(pred_mask: np.ndarray, gt_mask: np.ndarray, fov: np.ndarray) -> float:
    """Centreline Dice of two binary masks inside ``fov`` (see module doc for the empty cases)."""
    from skimage.morphology import skeletonize

    _check_shapes(pred_mask, gt_mask, fov)
    f = _as_bool(fov)
    p = _as_bool(pred_mask) & f
    g = _as_bool(gt_mask) & f
    sp = skeletonize(p) if p.any() else p
    sg = skeletonize(g) if g.any() else g
    n_sp, n_sg = int(np.count_nonzero(sp)), int(np.count_nonzero(sg))
    if n_sp == 0 and n_sg == 0:
        return 1.0
    if n_sp == 0 or n_sg == 0:
        return 0.0
    tprec = np.count_nonzero(sp & g) / n_sp
    tsens = np.count_nonzero(sg & p) / n_sg
    if tprec + tsens == 0:
        return 0.0
    return float(2 * tprec * tsens / (tprec + tsens))


# --------------------------------------------------------------------------------------------- report
def image_metrics(item: dict[str, Any]) -> dict[str, float]:
    """Metrics of one item dict (``tp, fp, tn, fn``; optional ``pos_hist``/``neg_hist``, ``cldice``)."""
    m = binary_metrics(item["tp"], item["fp"], item["tn"], item["fn"])
    if item.get("pos_hist") is not None and item.get("neg_hist") is not None:
        m["auc_roc"] = float(auc_roc_from_hist(item["pos_hist"], item["neg_hist"]))
        m["auc_pr"] = float(auc_pr_from_hist(item["pos_hist"], item["neg_hist"]))
    else:
        m["auc_roc"] = m["auc_pr"] = float("nan")
    c = item.get("cldice")
    m["cldice"] = float("nan") if c is None else float(c)
    return m


def one_cluster_note(unit: str, where: list[str] | None = None) -> str:
    """The note said when a set has one bootstrap cluster: every resample is that cluster, so the "interval" would
    have zero width; it is reported as n/a instead."""
    at = f" ({', '.join(where)})" if where else ""
    return f"95% CIs are n/a where a set holds a single {unit}{at}: a bootstrap needs two or more"


def blank_single_cluster_cis(sets, entries, count_key: str, ci_keys, noted=None) -> list[tuple[str, str]]:
    """Make n/a the 95% CIs of each set (``(column, group, index)``) whose entry holds one bootstrap cluster
    (``entry[count_key] == 1``): every resample is that cluster, a zero-width "interval". Returns the
    ``(column, group)`` of those sets that ``noted`` (one bool a set; all by default) keeps, for
    :func:`one_cluster_note`. Call it only when CIs were asked for."""
    single = []
    for i, ((col, g, _), e) in enumerate(zip(sets, entries)):
        if e[count_key] == 1:
            e["ci95"] = {k: [math.nan, math.nan] for k in ci_keys}
            if noted is None or noted[i]:
                single.append((col, g))
    return single


def _percentile_ci(samples: np.ndarray) -> list[float | None]:
    s = samples[np.isfinite(samples)]
    if s.size == 0:
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(s, [2.5, 97.5])
    return [float(lo), float(hi)]


def segmentation_report(items: list[dict[str, Any]], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Per-image and overall metrics with bootstrap 95% CIs over images.

    ``items``: dicts with ``key``, ``tp``, ``fp``, ``tn``, ``fn`` and optionally ``pos_hist``/``neg_hist``
    (from :func:`score_histograms`; pooled AUCs need them on every item) and ``cldice``.
    Returns ``{"n_images", "per_image": [{key, tp, fp, tn, fn, metrics...}], "pooled": {...},
    "mean": {...}, "ci95": {"mean": {metric: [lo, hi]}, "pooled": {f1/auc_roc/auc_pr: [lo, hi]}},
    "bootstrap": {...}}``. The bootstrap is deterministic for a given ``seed``; ``n_boot = 0`` gives NaN CIs.
    """
    n = len(items)
    per_image = []
    for it in items:
        row = {"key": it.get("key"), "tp": int(it["tp"]), "fp": int(it["fp"]), "tn": int(it["tn"]), "fn": int(it["fn"])}
        row.update(image_metrics(it))
        per_image.append(row)
    nan = float("nan")
    out: dict[str, Any] = {
        "n_images": n,
        "per_image": per_image,
        "pooled": {},
        "mean": {},
        "ci95": {"mean": {}, "pooled": {}},
        "bootstrap": {
            "n": int(n_boot),
            "seed": int(seed),
            "method": "percentile (2.5, 97.5) over resamples of the images with replacement",
        },
    }
    if n == 0:
        out["pooled"] = {k: nan for k in ALL_KEYS if k != "cldice"}
        out["mean"] = {k: nan for k in ALL_KEYS}
        return out

    counts = np.array([[r["tp"], r["fp"], r["tn"], r["fn"]] for r in per_image], dtype=np.int64)
    tp, fp, tn, fn = (int(v) for v in counts.sum(0))
    pooled: dict[str, Any] = {"tp": tp, "fp": fp, "tn": tn, "fn": fn, **binary_metrics(tp, fp, tn, fn)}
    have_hist = all(it.get("pos_hist") is not None and it.get("neg_hist") is not None for it in items)
    if have_hist:
        pos_sum = np.sum([it["pos_hist"] for it in items], axis=0)
        neg_sum = np.sum([it["neg_hist"] for it in items], axis=0)
        pooled["auc_roc"] = float(auc_roc_from_hist(pos_sum, neg_sum))
        pooled["auc_pr"] = float(auc_pr_from_hist(pos_sum, neg_sum))
    else:
        pooled["auc_roc"] = pooled["auc_pr"] = nan
    out["pooled"] = pooled

    M = np.array([[r[k] for k in ALL_KEYS] for r in per_image], dtype=np.float64)  # n x m
    finite = np.isfinite(M)
    with np.errstate(invalid="ignore"):
        for j, k in enumerate(ALL_KEYS):
            col = M[finite[:, j], j]
            out["mean"][k] = float(col.mean()) if col.size else nan
            out["mean"][k + "_std"] = float(col.std(ddof=1)) if col.size > 1 else nan

    if n_boot <= 0 or n < 2:  # one image: every resample is that image, a zero-width "interval" (n/a instead)
        out["ci95"]["mean"] = {k: [nan, nan] for k in ALL_KEYS}
        out["ci95"]["pooled"] = {k: [nan, nan] for k in POOLED_CI_KEYS}
        return out

    rng = np.random.default_rng(seed)
    W = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)  # n_boot x n resample counts
    Mz = np.where(finite, M, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        boot_mean = (W @ Mz) / (W @ finite.astype(np.float64))  # n_boot x m, NaN-skipping means
    out["ci95"]["mean"] = {k: _percentile_ci(boot_mean[:, j]) for j, k in enumerate(ALL_KEYS)}

    bc = W @ counts.astype(np.float64)  # n_boot x 4 pooled counts
    btp, bfp, bfn = bc[:, 0], bc[:, 1], bc[:, 3]
    den = 2 * btp + bfp + bfn
    boot_f1 = np.where(den > 0, 2 * btp / np.maximum(den, 1), 1.0)
    ci_pooled = {"f1": _percentile_ci(boot_f1)}
    if have_hist:
        P = np.stack([it["pos_hist"] for it in items]).astype(np.float64)
        N = np.stack([it["neg_hist"] for it in items]).astype(np.float64)
        roc, pr = [], []
        chunk = max(1, 2_000_000 // LEVELS)  # ~16 MB per chunk of pooled histograms
        for s in range(0, n_boot, chunk):
            w = W[s : s + chunk]
            bp, bn = w @ P, w @ N
            roc.append(np.atleast_1d(auc_roc_from_hist(bp, bn)))
            pr.append(np.atleast_1d(auc_pr_from_hist(bp, bn)))
        ci_pooled["auc_roc"] = _percentile_ci(np.concatenate(roc))
        ci_pooled["auc_pr"] = _percentile_ci(np.concatenate(pr))
    else:
        ci_pooled["auc_roc"] = ci_pooled["auc_pr"] = [nan, nan]
    out["ci95"]["pooled"] = ci_pooled
    return out


def json_safe(obj: Any) -> Any:
    """Recursively replace NaN/inf floats by None and numpy scalars/arrays by Python values."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
