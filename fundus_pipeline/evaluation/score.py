"""``fundus evaluate score``: agreement of predicted quality scores with ground-truth quality labels.

Inputs: a scores CSV (``fundus score``'s ``results.csv``: ``key``, the score column, optionally the
runner's ``status`` and ``error``) and a quality set's labels file (``pairs.csv``: ``key``, ``part``,
``source``, ``label`` and the grouping columns such as ``enhancer`` and ``family``). A score is taken as
*higher = better quality*; a "lower is better" score (a distance) must be negated first.

Join (on ``key``), in this order for every scores row: a key absent from the labels file is a problem
(``not in labels``); a key whose label row is of another part than ``part`` is ignored (counted,
``n_scores_other_part``); a row whose ``status`` is not ``ok`` is a problem (``status error: ...``); an
empty, non-numeric or non-finite score is a problem; the rest are scored. Label rows of the part without a
scores row are only counted (``n_labels_not_scored``, one note). No scores key in the labels of the part,
a missing column or an unreadable file is a ``UsageError``.

Metrics (:func:`iqa_metrics`, the VQEG protocol): SROCC and KROCC on the raw scores, PLCC and RMSE after
a 4-parameter logistic map of the scores onto the label scale (:func:`fit_logistic4`), overall and per
group of each ``by`` column (a separate fit per group). 95% CIs: a cluster bootstrap over source
photographs (pairs of one source are correlated), see :data:`DEFINITIONS`.

No-reference baselines (:func:`nr_contrast`, :func:`nr_sharpness`, :func:`nr_entropy`): simple image
statistics inside the FOV, scored like any other predictor once written to a CSV.
"""

from __future__ import annotations

import csv
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage, optimize, special, stats

from fundus_pipeline.errors import UsageError, refuse_repeated_columns
from fundus_pipeline.evaluation.metrics import _percentile_ci, blank_single_cluster_cis, json_safe, one_cluster_note
from fundus_pipeline.evaluation.segment import (
    EvalResult,
    _num,
    markdown_table,
    metrics_csv,
    text_table,
    write_reports,
)

METRIC_KEYS = ("srocc", "plcc", "krocc", "rmse")
MIN_PAIRS = 3  # fewer scored pairs in a set (group or resample): no metrics
MIN_LOGISTIC = 5  # fewer pairs: linear map (4 parameters need more points than that)
MAXFEV = 10_000  # logistic fit on the evaluated data
MAXFEV_BOOT = 500  # logistic refit on a bootstrap resample (200 ran out on 385 of 1,000 resamples of sdmp's
# set, none of 400 at 20,000; campaign 16a F3)
MIN_SCALE = 1e-9  # the logistic's smallest scale b4, in units of the score's std
BOOT_TOL = 1e-6  # ftol, xtol and gtol of a bootstrap refit (1e-8, the default, for the set's own fit)
OVERALL = "all"

DEFINITIONS = {
    "direction": "scores are taken as higher = better quality; a 'lower is better' score (a distance) is "
    "negated before evaluation.",
    "srocc": "Spearman rank-order correlation of score and label: the Pearson correlation of their ranks "
    "(scipy.stats.rankdata, tied values get their average rank), as scipy.stats.spearmanr.",
    "krocc": "Kendall rank-order correlation tau-b of score and label (scipy.stats.kendalltau, variant 'b': "
    "corrected for ties in both).",
    "mapping": "label ~ logistic4(score) = (b1 - b2) / (1 + exp(-(score - b3) / |b4|)) + b2 with b1 >= b2 "
    "(increasing: a higher score must mean a better label) and its asymptotes within one label range R of the "
    "labels (b2 >= min(label) - R, b1 - b2 <= 3 R; a nearly straight relation is not chased into ever wider "
    "asymptotes), least squares (scipy.optimize.least_squares, trust region with bounds, max_nfev 10000) from "
    "the 8 best points of a grid (b3 at 67 percentiles of the score, 0.5th to 99.5th; b4 at 21 log-spaced "
    "multiples of its std, 1e-4 to 10; b2 and b1 - b2 by linear least squares at each point, clipped to the "
    "bounds) "
    "and from the best increasing step (the logistic's limit as b4 goes to 0: the split of the sorted scores "
    "whose two label means rise and leave the least squared error; splits closer than 2e-8 score std, 20 times "
    "the map's smallest scale of 1e-9 std, are not searched), the lowest squared error kept, fitted on the "
    "standardised score and label; separately for the whole set and for each group. 'flat' (the labels' mean, "
    "PLCC 0) when no increasing map fits better than the mean: none exists when no split rises, i.e. the score "
    "does not rise with the label. A score that ranks the wrong way overall (SROCC < 0) can still get a "
    "positive PLCC from a step-like map, when part of its range does rise with the label. Linear least "
    "squares label ~ a * score + c when every start fails or a set has fewer than 5 pairs. 'mapping' says which "
    "was used.",
    "plcc": "Pearson linear correlation of label and mapped score (as scipy.stats.pearsonr); with a linear map, "
    "of label and score, which keeps its sign; 0 with a flat map (a constant explains none of the labels' "
    "variance, R^2 = 0; an increasing least-squares map's PLCC is the square root of its R^2 when no bound "
    "holds it), null when the score or the label is constant.",
    "rmse": "sqrt(mean((label - mapped score)^2)), in label units.",
    "n": "scored pairs; metrics are null for a set of fewer than 3 pairs.",
    "bootstrap": "cluster bootstrap over source photographs: each resample draws the S sources of the "
    "scored pairs uniformly with replacement (numpy default_rng(seed).multinomial(S, 1/S)) and takes every "
    "scored pair of a source as many times as the source was drawn; all four metrics are recomputed on each "
    "resample, the map refitted: from the set's own fitted map, and also from the better of the best point of "
    "a coarser grid (20 percentiles, 2.5th to 97.5th; 11 scales) and the best step when that point fits the "
    "resample better (max_nfev 500 and ftol, xtol, gtol 1e-6 each, against 10000 and 1e-8 for the set's own "
    "fit; a fit that reaches max_nfev keeps its last map, increasing and no worse than its start); flat when no split rises; a flat set's resamples from that point alone; linear below 5 pairs "
    "or when the set's own map is linear. boot_refit_fallbacks counts the resamples whose map is not of the "
    "set's kind (e.g. flat, PLCC 0). A refit is a local search: on weak predictors (a near-step map) it can end "
    "above the full search's optimum, by up to 0.01 PLCC on a resample (review 18 R6), so their CI bounds may "
    "sit that much low. A group's resample is its pairs in the same resamples; resamples with fewer "
    "than 3 of them are skipped. 95% CI: 2.5th and 97.5th percentiles of the finite resample values "
    "(numpy.percentile, linear interpolation).",
}


# --------------------------------------------------------------------------------------------- mapping
def logistic4(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """``(b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2``: the VQEG 4-parameter logistic (b1, b2: the
    asymptotes for x -> +inf / -inf, b3: the midpoint, |b4|: the scale)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (b1 - b2) * special.expit((np.asarray(x, np.float64) - b3) / abs(b4)) + b2


@dataclass(frozen=True)
class Mapping:
    """A fitted score-to-label map: ``logistic4`` with (b1, b2, b3, b4), ``flat`` with (the labels' mean,)
    or ``linear`` with (a, c); ``note`` says why the logistic was not used."""

    kind: str
    params: tuple[float, ...]
    note: str = ""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if self.kind == "logistic4":
            return logistic4(x, *self.params)
        if self.kind == "flat":
            return np.full(x.shape, self.params[0])
        a, c = self.params
        return a * x + c

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "params": list(self.params)}
        if self.note:
            out["note"] = self.note
        return out


def _fit_linear(x: np.ndarray, y: np.ndarray, note: str) -> Mapping:
    (a, c), *_ = np.linalg.lstsq(np.stack([x, np.ones_like(x)], axis=1), y, rcond=None)
    return Mapping("linear", (float(a), float(c)), note)


def _increasing_fit(
    x: np.ndarray, y: np.ndarray, start: Sequence[float], maxfev: int, tol: float = 1e-8
) -> tuple[float, np.ndarray] | None:
    """(sum of squared residuals, (b2, d, b3, b4)) of the least-squares logistic ``d * expit((x - b3) / b4)
    + b2`` from ``start``, with ``d >= 0`` and ``b4 > 0`` (an increasing map) and bounded asymptotes, R the
    label range: min(label) - R <= b2 <= max(label) and d <= 3 R (a nearly straight relation is not chased
    into ever wider asymptotes, which only approach the linear map); None when it fails."""
    # fitted on the score and label standardised (x - mean) / std, (y - mean) / range, then mapped back: the
    # optimiser's tolerances and steps then mean the same at any unit (labels in units of 1e-12 had ended at
    # the bound of d, worse than the start; review 18 R1)
    cx, sx = float(x.mean()), float(np.std(x)) or 1.0
    cy, sy = float(y.mean()), float(np.ptp(y)) or 1.0
    xn, yn = (x - cx) / sx, (y - cy) / sy

    def residual(p: np.ndarray) -> np.ndarray:
        return p[1] * special.expit((xn - p[2]) / p[3]) + p[0] - yn

    def jac(p: np.ndarray) -> np.ndarray:
        z = (xn - p[2]) / p[3]
        sg = special.expit(z)
        ds = p[1] * sg * (1.0 - sg)
        return np.stack([np.ones_like(xn), sg, -ds / p[3], -ds * z / p[3]], axis=1)

    lo = np.array([float(yn.min()) - 1.0, 0.0, -np.inf, MIN_SCALE])  # the bounds above, in these units
    hi = np.array([float(yn.max()), 3.0, np.inf, np.inf])
    p0 = np.array([(start[0] - cy) / sy, start[1] / sy, (start[2] - cx) / sx, abs(start[3]) / sx], np.float64)
    p0 = np.clip(p0, lo, hi)
    p0[3] = max(p0[3], 2 * MIN_SCALE)
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            res = optimize.least_squares(residual, p0, jac=jac, bounds=(lo, hi), method="trf", max_nfev=maxfev, ftol=tol, xtol=tol, gtol=tol)
            cost0 = 0.5 * float(np.sum(residual(p0) ** 2))
    except (ValueError, np.linalg.LinAlgError):
        return None
    # status 0 (max_nfev reached): the last iterate is still an increasing map within the bounds; one that fits
    # worse than its start is replaced by the start (the optimiser first moves a start on a bound inside it)
    if res.status < 0 or not np.all(np.isfinite(res.x)) or not np.isfinite(res.cost):
        return None
    q, cost = (res.x, float(res.cost)) if float(res.cost) <= cost0 or not np.isfinite(cost0) else (p0, cost0)
    return 2.0 * cost * sy * sy, np.array([cy + sy * q[0], sy * q[1], cx + sx * q[2], sx * q[3]])


#: The starts of the increasing fit come from a grid over the midpoint b3 (percentiles of the score) and the
#: scale b4 (multiples of its std, log-spaced; the small ones are the near-step maps of weak predictors): for a
#: fixed (b3, b4) the logistic is linear in (b2, d), solved in closed form and clipped to the bounds, and the
#: ``GRID_KEEP`` best grid points are refined (nine fixed starts left the fits of weak predictors in local
#: minima, review 17: the sharpness baseline's best increasing map, PLCC 0.209, was reported as none).
GRID_PERCENTILES = np.linspace(0.5, 99.5, 67)
GRID_SCALES = np.logspace(-4, 1, 21)
GRID_KEEP = 8


#: The bootstrap's coarser grid (one point of it is refined when it beats the refit from the set's own map).
BOOT_GRID_PERCENTILES = np.linspace(2.5, 97.5, 20)
BOOT_GRID_SCALES = np.logspace(-4, 1, 11)


def _grid_starts(
    x: np.ndarray, y: np.ndarray, keep: int = GRID_KEEP, percentiles: np.ndarray = GRID_PERCENTILES,
    scales: np.ndarray = GRID_SCALES,
) -> list[tuple[float, tuple[float, float, float, float]]]:
    """(squared error, (b2, d, b3, b4)) of the ``keep`` grid points (b3 at the ``percentiles`` of ``x``, b4 at
    ``scales`` times its std) whose closed-form (b2, d), clipped to the fit's bounds, leave the smallest squared
    error, best first."""
    r = float(np.ptp(y)) or 1.0
    b3 = np.percentile(x, percentiles)[:, None, None]
    b4 = ((float(np.std(x)) or 1.0) * np.asarray(scales))[None, :, None]
    with np.errstate(all="ignore"):
        sg = special.expit((x - b3) / b4)
        sm, ym = sg.mean(-1), float(y.mean())
        var = sg.var(-1)
        cov = ((sg - sm[..., None]) * (y - ym)).mean(-1)
        d = np.clip(np.where(var > 0, cov / np.where(var > 0, var, 1.0), 0.0), 0.0, 3.0 * r)
        b2 = np.clip(ym - d * sm, float(y.min()) - r, float(y.max()))
        sse = ((b2[..., None] + d[..., None] * sg - y) ** 2).sum(-1)
    sse = np.nan_to_num(sse, nan=np.inf)
    best = np.argsort(sse, axis=None, kind="stable")[:keep]
    i, j = np.unravel_index(best, sse.shape)
    return [(float(sse[p, q]), (float(b2[p, q]), float(d[p, q]), float(b3[p, 0, 0]), float(b4[0, q, 0]))) for p, q in zip(i, j)]


def _best_step(x: np.ndarray, y: np.ndarray) -> tuple[float, tuple[float, float, float, float]] | None:
    """(squared error, (b2, d, b3, b4)) of the best increasing step, the logistic's limit as its scale goes to
    0 (the map of a weak predictor is often nearly one): the two-level fit at the split between consecutive
    distinct scores whose upper labels' mean is above the lower's, with the largest drop of squared error
    (n0 n1 / n (m1 - m0)^2); b4 a tenth of the gap at the split. Only splits at a gap of at least 20 times the
    fit's smallest scale (``MIN_SCALE`` std) count: a closer one is not searched, though a map within the bounds
    may resolve it (review 18 R1, review 19 R5: with 16 times the scale, one does). None when no split rises: then no increasing map fits better than the labels' mean (an
    increasing logistic is a positive mixture of steps, so its covariance with the label is a positive mixture
    of the steps' covariances, none of which is positive), or only one whose scale is below the bound."""
    o = np.argsort(x, kind="stable")
    xs, ys = x[o], y[o]
    n = xs.size
    k = np.flatnonzero(np.diff(xs) >= 20 * MIN_SCALE * (float(np.std(x)) or 1.0)) + 1  # sizes of the lower part
    if not k.size:
        return None
    cs = np.cumsum(ys)
    m0 = cs[k - 1] / k
    m1 = (cs[-1] - cs[k - 1]) / (n - k)
    gain = np.where(m1 > m0, k * (n - k) / n * (m1 - m0) ** 2, -np.inf)
    i = int(np.argmax(gain))
    if not gain[i] > 0:
        return None
    lo, hi = float(xs[k[i] - 1]), float(xs[k[i]])
    sse = float(((ys - ys.mean()) ** 2).sum()) - float(gain[i])
    return max(sse, 0.0), (float(m0[i]), float(m1[i] - m0[i]), (lo + hi) / 2, (hi - lo) / 10)


def fit_logistic4(pred: np.ndarray, label: np.ndarray) -> Mapping:
    """Least-squares :func:`logistic4` map of ``pred`` onto ``label``, constrained to be increasing (b1 >= b2:
    a higher score means a better label, ``DEFINITIONS["direction"]``; an unconstrained fit would turn a
    predictor that ranks the wrong way around) with bounded asymptotes (:func:`_increasing_fit`). From the
    ``GRID_KEEP`` best points of a grid (:func:`_grid_starts`) and from the best step (:func:`_best_step`),
    keeping the lowest squared error (scipy.optimize.least_squares, trust region with bounds, analytic Jacobian,
    max_nfev ``MAXFEV``); a bootstrap resample is refitted by :func:`refit_logistic4`. When the best increasing map is flat (the score does not rise with the label): ``kind ==
    "flat"``, the labels' mean, whose PLCC is 0. A linear least-squares map (``kind ==
    "linear"``, the reason in ``note``) when every start fails or there are fewer than 5 pairs."""
    x = np.asarray(pred, np.float64)
    y = np.asarray(label, np.float64)
    done, step = _without_fit(x, y)
    if done is not None:
        return done
    starts = [st for _, st in _grid_starts(x, y)] + [step[1]]
    return _best_increasing(x, y, [f for f in (_increasing_fit(x, y, st, MAXFEV) for st in starts) if f is not None])


def _without_fit(x: np.ndarray, y: np.ndarray) -> tuple[Mapping | None, tuple | None]:
    """(the map, None) when no logistic is fitted: linear below ``MIN_LOGISTIC`` pairs, flat when no split
    rises (:func:`_best_step`); else (None, the best step)."""
    if x.size < MIN_LOGISTIC:
        return _fit_linear(x, y, f"fewer than {MIN_LOGISTIC} pairs"), None
    step = _best_step(x, y)
    return (_flat(y) if step is None else None), step


def _best_increasing(x: np.ndarray, y: np.ndarray, fits: list[tuple[float, np.ndarray]]) -> Mapping:
    """The map of the lowest squared error of ``fits`` (see :func:`fit_logistic4`)."""
    if not fits:
        return _fit_linear(x, y, "logistic fit failed")
    sse, (b2, d, b3, b4) = min(fits, key=lambda f: f[0])
    mapping = Mapping("logistic4", (float(b2 + d), float(b2), float(b3), float(b4)))
    mapped = mapping(x)
    if not np.all(np.isfinite(mapped)):
        return _fit_linear(x, y, "logistic fit failed: non-finite values")
    r = float(np.ptp(y)) or 1.0
    # no better than the labels' mean (a fit from a start it could not resolve may end worse), or flat for the
    # label scale: the flat map (review 18 R1: the test of flatness was absolute, so labels in units of 1e-12
    # were always flat)
    if sse >= float(((y - y.mean()) ** 2).sum()) or d <= 1e-9 * r or float(np.std(mapped)) <= 1e-12 * r:
        return _flat(y)
    return mapping


def _flat(y: np.ndarray) -> Mapping:
    return Mapping("flat", (float(y.mean()),), "no increasing map: the score does not rise with the label")


# --------------------------------------------------------------------------------------------- metrics
def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation (as scipy.stats.pearsonr, without its per-call overhead); NaN for constant input."""
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(np.clip((a @ b) / den, -1.0, 1.0)) if den > 0 else math.nan


def _kendall(a: np.ndarray, b: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: NaN
        return float(stats.kendalltau(a, b).statistic)


def _metric_values(x: np.ndarray, y: np.ndarray, mapping: Mapping) -> dict[str, float]:
    mapped = mapping(x)
    return {
        "srocc": _pearson(stats.rankdata(x), stats.rankdata(y)),  # = scipy.stats.spearmanr
        # a linear map keeps the score's sign; a flat one (no increasing map) explains none of the label: 0, or
        # NaN when the score or the label is constant (no correlation is defined; review 18 R6)
        "plcc": _pearson(y, mapped) if mapping.kind == "logistic4" else _pearson(y, x) if mapping.kind == "linear"
        else (0.0 if np.ptp(x) > 0 and np.ptp(y) > 0 else math.nan),
        "krocc": _kendall(x, y),
        "rmse": float(np.sqrt(np.mean((y - mapped) ** 2))),
    }


def _set_metrics(x: np.ndarray, y: np.ndarray) -> tuple[dict[str, float], Mapping | None]:
    """The four metrics of one set and its fitted map (NaN and None for fewer than 3 pairs)."""
    if x.size < MIN_PAIRS:
        return dict.fromkeys(METRIC_KEYS, math.nan), None
    mapping = fit_logistic4(x, y)
    return _metric_values(x, y, mapping), mapping


def iqa_metrics(pred: np.ndarray, label: np.ndarray) -> dict[str, Any]:
    """``n``, ``srocc``, ``krocc`` (on the raw scores), ``plcc`` and ``rmse`` (label vs
    :func:`fit_logistic4`-mapped scores) and ``mapping`` (:meth:`Mapping.as_dict`); see
    :data:`DEFINITIONS`. Higher ``pred`` must mean better quality: pass ``-pred`` for a "lower is better"
    score (a distance). Fewer than 3 pairs: NaN metrics and mapping None."""
    x = np.asarray(pred, np.float64).ravel()
    y = np.asarray(label, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"pred and label differ in length: {x.size} and {y.size}")
    vals, mapping = _set_metrics(x, y)
    return {"n": int(x.size), **vals, "mapping": mapping.as_dict() if mapping else None}


# --------------------------------------------------------------------------------------------- bootstrap
def source_bootstrap(n_sources: int, n_boot: int, seed: int) -> np.ndarray:
    """``n_boot x n_sources`` draw counts: each row resamples the sources uniformly with replacement."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_sources, np.full(n_sources, 1.0 / n_sources), size=n_boot)


def resample_indices(counts: np.ndarray, codes: np.ndarray, subset: np.ndarray) -> np.ndarray:
    """Pair indices of one resample: every pair of ``subset`` repeated as often as its source
    (``codes[pair]``) was drawn (``counts``, one row of :func:`source_bootstrap`)."""
    return np.repeat(subset, counts[codes[subset]])


def refit_logistic4(x: np.ndarray, y: np.ndarray, start: Mapping) -> Mapping:
    """A bootstrap resample's increasing map, cheaper than :func:`fit_logistic4`'s full search: refined from
    the set's own fitted map ``start`` (``logistic4``; ``MAXFEV_BOOT``, ``BOOT_TOL``), and also from the better of the best point
    of a coarser grid (``BOOT_GRID_*``) and the best step (:func:`_best_step`) when its squared error is below
    the refit's (the refit stopped in another basin, or ended flat though an increasing map exists); a ``flat``
    start is refined from that point alone. Fewer than 5 pairs: linear."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    done, step = _without_fit(x, y)
    if done is not None:
        return done
    fits = []
    if start.kind == "logistic4":
        b1, b2, b3, b4 = start.params
        fit = _increasing_fit(x, y, (b2, b1 - b2, b3, b4), MAXFEV_BOOT, BOOT_TOL)
        fits += [fit] if fit is not None else []
    sse, st = min([*_grid_starts(x, y, 1, BOOT_GRID_PERCENTILES, BOOT_GRID_SCALES), step], key=lambda c: c[0])
    if not fits or sse < fits[0][0]:
        fit = _increasing_fit(x, y, st, MAXFEV_BOOT, BOOT_TOL)
        fits += [fit] if fit is not None else []
    return _best_increasing(x, y, fits)


def _resample_values(x: np.ndarray, y: np.ndarray, start: Mapping) -> tuple[np.ndarray, bool]:
    """The four metrics of one resample (NaN when too small) and whether its refit is not of the kind of the
    set's own map (a logistic set's resample left flat or failed to linear, or a flat set's resample that found
    an increasing map)."""
    if x.size < MIN_PAIRS:
        return np.full(len(METRIC_KEYS), np.nan), False
    if start.kind in ("logistic4", "flat"):
        mapping = refit_logistic4(x, y, start)
    else:
        mapping = _fit_linear(x, y, start.note)
    vals = _metric_values(x, y, mapping)
    return np.array([vals[k] for k in METRIC_KEYS]), mapping.kind != start.kind


PROGRESS_EVERY_S = 30.0


def bootstrap_cis(
    pred: np.ndarray,
    label: np.ndarray,
    codes: np.ndarray,
    sets: Sequence[tuple[np.ndarray, Mapping]],
    n_boot: int,
    seed: int,
    log: Callable[[str], None] | None = None,
) -> list[tuple[dict[str, list[float | None]], int]]:
    """Source-bootstrap 95% CIs for each ``(pair indices, fitted map)`` of ``sets`` from the same
    resamples (``codes``: source index of each pair, 0..S-1); per set the CIs by metric and the number of
    resamples whose refit is not of the set's map kind (:func:`_resample_values`). ``log`` gets a progress line every 30 s (a large set
    takes minutes: 100,000 pairs in 18 groups, 1,000 resamples, 212 s on 2 cores)."""
    counts = source_bootstrap(int(codes.max()) + 1, n_boot, seed)
    boot = np.full((len(sets), n_boot, len(METRIC_KEYS)), np.nan)
    fallbacks = np.zeros(len(sets), np.int64)
    t0 = last = time.monotonic()
    for b in range(n_boot):
        if log is not None and b and time.monotonic() - last >= PROGRESS_EVERY_S:
            last = time.monotonic()
            log(f"bootstrap: {b}/{n_boot} resamples, about {(last - t0) / b * (n_boot - b):.0f} s to go")
        for j, (subset, start) in enumerate(sets):
            idx = resample_indices(counts[b], codes, subset)
            boot[j, b], fell_back = _resample_values(pred[idx], label[idx], start)
            fallbacks[j] += fell_back
    return [
        ({k: _percentile_ci(boot[j, :, m]) for m, k in enumerate(METRIC_KEYS)}, int(fallbacks[j]))
        for j in range(len(sets))
    ]


# --------------------------------------------------------------------------------------------- reading
def read_csv_rows(path: Path, what: str) -> tuple[list[dict[str, str]], list[str]]:
    """(rows, columns) of a CSV with a header (UTF-8, a byte-order mark allowed); ``UsageError`` for a file that
    cannot be read, a repeated column, or a row of more or fewer cells than the header (a short row had no key
    and was an internal error, the cells of a long one were dropped in silence; campaign 24b F3). Empty cells
    ending a row or the header (a trailing comma) are no cells."""
    try:
        with Path(path).open(newline="", encoding="utf-8-sig") as fh:
            head = csv.reader(fh, strict=True)  # an unclosed quote is an error, not the rest of the file in one cell
            header = next(head, [])
            names = list(header)
            while names and not names[-1].strip():  # a header ending in commas (review 24 R24-9), as a row may
                names = names[:-1]
            unnamed = len(header) - len(names)  # cells under those unnamed columns are no column's: passed over, as they
            offset = head.line_num  # were before R24-9's mend (review 27 R27-4)
            reader = csv.DictReader(fh, fieldnames=names, strict=True)
            rows = []
            for r in reader:
                extra = r.pop(None, None) or []
                if not any((v or "").strip() for v in [*r.values(), *extra[:unnamed]]) and not any(v.strip() for v in extra[unnamed:]):
                    continue  # a row of empty cells (",,,," as spreadsheets end a table): no row (review 23 R23-5)
                if any(v.strip() for v in extra[unnamed:]) or None in r.values():  # trailing empty cells (a trailing comma) lose nothing
                    n = sum(v is not None for v in r.values()) + len(extra)
                    raise UsageError(f"the {what} {path} has {n} cell(s) on line {reader.line_num + offset}, its header {len(header)}",
                                     hint="every row needs a cell for every column (an empty one is two commas)")
                for col in ("key", "image"):
                    if col in r and not r[col].strip():
                        raise UsageError(f"the {what} {path} has an empty {col} on line {reader.line_num + offset}")
                rows.append(r)
            columns = list(names)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        where = " (a quote opened and never closed?)" if str(exc) == "unexpected end of data" else ""
        raise UsageError(f"cannot read the {what} {path}: {exc}{where}") from None
    refuse_repeated_columns(columns, what, path)
    return rows, columns


def _read_csv(path: Path, what: str, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV with a header holding ``required``; ``UsageError`` otherwise or on duplicate keys."""
    rows, columns = read_csv_rows(path, what)
    missing = [c for c in required if c not in columns]
    if missing:
        have = ", ".join(columns) if columns else "none"
        raise UsageError(f"the {what} {path} has no column {', '.join(map(repr, missing))} (columns: {have})")
    seen: set[str] = set()
    for r in rows:
        if r["key"] in seen:
            raise UsageError(f"the {what} {path} has key '{r['key']}' twice")
        seen.add(r["key"])
    return rows


def _float(v: str | None) -> float | None:
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _score_problem(row: dict[str, str], column: str) -> str | None:
    """Why a scores row cannot be scored (status not ok, empty or invalid value), or None."""
    status = (row.get("status") or "ok").strip()
    if status != "ok":
        err = (row.get("error") or "").strip()
        return f"status {status}" + (f": {err}" if err else "")
    raw = (row.get(column) or "").strip()
    if not raw:
        return f"empty {column}"
    if _float(raw) is None:
        return f"{column} {raw!r} is not a finite number"
    return None


# --------------------------------------------------------------------------------------------- evaluation
def evaluate_scores(
    scores_csv: Path,
    labels_csv: Path,
    *,
    column: str = "score",
    by: Sequence[str] = ("enhancer", "family"),
    part: str | None = "test",
    n_boot: int = 1000,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> EvalResult:
    """Join, score and summarise (rules in the module docstring); ``part=None`` keeps every label row;
    ``log`` gets the bootstrap's progress lines.
    ``rows`` of the result are the metrics.csv rows: the whole set (group_by ``all``), then each group of
    each ``by`` column."""
    from fundus_pipeline.runner import refuse_while_written

    scores_csv, labels_csv = Path(scores_csv), Path(labels_csv)
    refuse_while_written(scores_csv.parent, "the folder of the scores file")
    by = list(dict.fromkeys(by))
    needed = ["key", "source", "label"] + (["part"] if part is not None else []) + by
    labels = {r["key"]: r for r in _read_csv(labels_csv, "labels file", list(dict.fromkeys(needed)))}
    scores = _read_csv(scores_csv, "scores file", ["key", column])
    if not scores:
        raise UsageError(f"the scores file {scores_csv} has no rows")
    if part is not None:  # a part that differs only in case or spaces is a typo, not another part (campaign 24b F5)
        near = sorted({r["part"] for r in labels.values() if r["part"] != part and r["part"].strip().casefold() == part.strip().casefold()})
        if near:
            raise UsageError(f"the labels file {labels_csv} has part {', '.join(map(repr, near))} where {part!r} is meant, it seems; "
                             "parts are compared exactly", hint="correct the labels file, or give --part as it is written there")
    in_part = {k: r for k, r in labels.items() if part is None or r["part"] == part}
    if not in_part:
        parts = ", ".join(sorted({r["part"] for r in labels.values()})) or "none"
        raise UsageError(f"no label row of {labels_csv} has part '{part}' (parts: {parts})")
    if not any(r["key"] in in_part for r in scores):
        where = f" (part {part})" if part is not None else ""
        raise UsageError(f"no key of the scores file {scores_csv} is in the labels file {labels_csv}{where}")

    label_of: dict[str, float] = {}
    for k, r in in_part.items():
        lab = _float(r["label"])
        if lab is None:
            raise UsageError(f"the labels file {labels_csv} has label {r['label']!r} for key '{k}'")
        label_of[k] = lab

    problems: list[dict[str, str]] = []
    scored: list[tuple[float, dict[str, str]]] = []
    n_other_part = 0
    for r in sorted(scores, key=lambda r: r["key"]):
        k = r["key"]
        if k not in labels:
            problems.append({"key": k, "status": "not in labels"})
        elif k not in in_part:
            n_other_part += 1
        elif (why := _score_problem(r, column)) is not None:
            problems.append({"key": k, "status": why})
        else:
            scored.append((float(r[column]), in_part[k]))
    n_labels_not_scored = len(set(in_part) - {r["key"] for r in scores})

    pred = np.array([s for s, _ in scored], np.float64)
    label = np.array([label_of[lab["key"]] for _, lab in scored], np.float64)
    # an empty source is the pair's own source, as in `evaluate grade` (they were one source "" here; 24b F6)
    uniq, codes = np.unique(np.array([lab["source"] or f"\x00{lab['key']}" for _, lab in scored], dtype=str), return_inverse=True)

    sets: list[tuple[str, str, np.ndarray]] = [(OVERALL, OVERALL, np.arange(len(scored)))]
    for col in by:
        values = np.array([lab[col] for _, lab in scored], dtype=str)
        sets += [(col, str(g), np.flatnonzero(values == g)) for g in np.unique(values)]
    entries: list[dict[str, Any]] = []
    mappings: list[Mapping | None] = []
    for _, _, idx in sets:
        vals, mapping = _set_metrics(pred[idx], label[idx])
        n_src = len(np.unique(codes[idx]))
        entries.append({"n": idx.size, "n_sources": n_src, **vals, "mapping": mapping.as_dict() if mapping else None})
        mappings.append(mapping)

    if n_boot > 0:
        fitted = [(idx, m) for (_, _, idx), m in zip(sets, mappings) if m is not None]
        cis = iter(bootstrap_cis(pred, label, codes, fitted, n_boot, seed, log) if fitted else [])
        for e, m in zip(entries, mappings):
            if m is not None:
                e["ci95"], e["boot_refit_fallbacks"] = next(cis)
            else:
                e["ci95"] = {k: [math.nan, math.nan] for k in METRIC_KEYS}
    single = blank_single_cluster_cis(sets, entries, "n_sources", METRIC_KEYS, [m is not None for m in mappings]) if n_boot > 0 else []

    groups: dict[str, dict[str, Any]] = {col: {} for col in by}
    for (col, g, _), e in zip(sets[1:], entries[1:]):
        groups[col][g] = e
    summary: dict[str, Any] = {
        "task": "quality-assessment",
        "scores_csv": str(scores_csv),
        "labels_csv": str(labels_csv),
        "column": column,
        "part": part if part is not None else "all",
        "by": by,
        "n_pairs": len(scored),
        "n_sources": len(uniq),
        "n_problems": len(problems),
        "n_scores_other_part": n_other_part,
        "n_labels_not_scored": n_labels_not_scored,
        "overall": entries[0],
        "groups": groups,
        "bootstrap": {"n": int(n_boot), "seed": int(seed), "unit": "source photograph"},
        "problems": problems,
        "definitions": DEFINITIONS,
    }
    rows = [_csv_row(i, col, g, e) for i, ((col, g, _), e) in enumerate(zip(sets, entries))]
    notes = []
    if n_labels_not_scored:
        s = "s have" if n_labels_not_scored != 1 else " has"
        notes.append(f"{n_labels_not_scored} label row{s} no row in the scores file (not scored)")
    notes += [
        f"{col}={g}: {m.kind} map ({m.note})" for (col, g, _), m in zip(sets, mappings) if m is not None and m.kind != "logistic4"
    ]
    if single:
        notes.append(one_cluster_note("source photograph", [f"{col}={g}" for col, g in single]))
    return EvalResult(
        rows=rows,
        summary=json_safe(summary),
        n_problems=len(problems),
        messages=[f"{p['key']}: {p['status']}" for p in problems],
        notes=notes,
    )


def _csv_row(order: int, col: str, group: str, e: dict[str, Any]) -> dict[str, Any]:
    """A metrics.csv row; ``key`` (not written) keeps the rows in set order."""
    row = {"key": order, "group_by": col, "group": group, "n": e["n"], "n_sources": e["n_sources"],
           **{k: e[k] for k in METRIC_KEYS}, "mapping": e["mapping"]["kind"] if e["mapping"] else ""}
    for k, (lo, hi) in e.get("ci95", {}).items():
        row[f"{k}_ci_lo"], row[f"{k}_ci_hi"] = lo, hi
    return row


# --------------------------------------------------------------------------------------------- outputs
def csv_columns(with_ci: bool) -> tuple[str, ...]:
    """metrics.csv columns (the CI columns only with a bootstrap)."""
    ci = tuple(f"{k}_ci_{end}" for k in METRIC_KEYS for end in ("lo", "hi")) if with_ci else ()
    return ("group_by", "group", "n", "n_sources") + METRIC_KEYS + ci + ("mapping",)


def summary_table(summary: dict[str, Any]) -> list[tuple[str, ...]]:
    """Header and rows (group_by, group, n, sources, each metric [with its CI]) for the tables."""
    with_ci = summary["bootstrap"]["n"] > 0
    sets = [(OVERALL, OVERALL, summary["overall"])]
    sets += [(col, g, e) for col in summary["by"] for g, e in summary["groups"][col].items()]
    out: list[tuple[str, ...]] = [("group_by", "group", "n", "sources") + tuple(k + (" [95% CI]" if with_ci else "") for k in METRIC_KEYS)]
    for col, g, e in sets:
        cells = []
        for k in METRIC_KEYS:
            cell = _num(e[k])
            if with_ci:
                lo, hi = e["ci95"][k]
                cell += f" [{_num(lo)}, {_num(hi)}]"
            cells.append(cell)
        out.append((col, g, str(e["n"]), str(e["n_sources"]), *cells))
    return out


def _counts(summary: dict[str, Any]) -> str:
    return (
        f"{summary['n_pairs']} pairs of {summary['n_sources']} sources scored (part {summary['part']}; "
        f"problems {summary['n_problems']}, label rows not scored {summary['n_labels_not_scored']}, "
        f"scores of other parts {summary['n_scores_other_part']})"
    )


def summary_human(summary: dict[str, Any]) -> str:
    """A short plain-text table for the terminal."""
    return "\n".join([f"{_counts(summary)}; score column '{summary['column']}'", *text_table(summary_table(summary))])


def summary_markdown(summary: dict[str, Any]) -> str:
    """summary.md: inputs, counts, the metric table, the definitions and the unscored rows."""
    boot = summary["bootstrap"]
    lines = [
        "# Quality-assessment evaluation",
        "",
        f"- scores: `{summary['scores_csv']}` (column `{summary['column']}`)",
        f"- labels: `{summary['labels_csv']}`",
        f"- {_counts(summary)}",
        f"- bootstrap: {boot['n']} resamples of source photographs, seed {boot['seed']}"
        if boot["n"] > 0
        else "- bootstrap: none (no confidence intervals)",
    ]
    lines += ["", *markdown_table(summary_table(summary))]
    lines += ["", "## Definitions", ""] + [f"- **{k}**: {v}" for k, v in summary["definitions"].items()] + [""]
    if summary["problems"]:
        lines += ["## Not scored", ""] + [f"- `{p['key']}`: {p['status']}" for p in summary["problems"]] + [""]
    return "\n".join(lines)


def write_outputs(result: EvalResult, out_dir: Path) -> list[Path]:
    """The quality-assessment reports of ``result`` (see ``segment.write_reports``)."""
    columns = csv_columns(result.summary["bootstrap"]["n"] > 0)
    return write_reports(out_dir, metrics_csv(result.rows, columns), result.summary, summary_markdown(result.summary))


# --------------------------------------------------------------------------------------------- no-reference baselines
# Functions of an RGB float image in [0, 1] (H x W x 3) and a boolean FOV mask (H x W); computed in float64
# on the Rec. 601 luma Y = 0.299 R + 0.587 G + 0.114 B; NaN when no pixel is left to measure.
_DISK3 = np.hypot(*np.mgrid[-3:4, -3:4]) <= 3  # pixels within Euclidean distance 3 of the centre


def luma(rgb: np.ndarray) -> np.ndarray:
    """Rec. 601 luma ``0.299 R + 0.587 G + 0.114 B`` (float64, H x W)."""
    rgb = np.asarray(rgb, np.float64)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 RGB image, got shape {rgb.shape}")
    return rgb @ np.array([0.299, 0.587, 0.114])


def _fov(y: np.ndarray, fov: np.ndarray) -> np.ndarray:
    fov = np.asarray(fov, bool)
    if fov.shape != y.shape:
        raise ValueError(f"FOV shape {fov.shape} differs from the image's {y.shape}")
    return fov


def nr_contrast(rgb: np.ndarray, fov: np.ndarray) -> float:
    """Standard deviation (population, ddof 0) of Y over the FOV pixels."""
    y = luma(rgb)
    v = y[_fov(y, fov)]
    return float(v.std()) if v.size else math.nan


def nr_sharpness(rgb: np.ndarray, fov: np.ndarray) -> float:
    """Variance (population) of ``cv2.Laplacian(Y, cv2.CV_64F, ksize=3)`` (kernel [[2, 0, 2], [0, -8, 0],
    [2, 0, 2]]) over the FOV eroded by 3 px: the pixels whose every pixel within Euclidean distance 3 lies
    inside the FOV and inside the image, so neither the FOV edge nor the image border counts. (This kernel
    only sees diagonal neighbours: a 1-px checkerboard scores 0.)"""
    import cv2

    y = luma(rgb)
    inner = ndimage.binary_erosion(_fov(y, fov), structure=_DISK3, border_value=0)
    v = cv2.Laplacian(y, cv2.CV_64F, ksize=3)[inner]
    return float(v.var()) if v.size else math.nan


def nr_entropy(rgb: np.ndarray, fov: np.ndarray) -> float:
    """Shannon entropy in bits, ``-sum p log2 p``, of the 256-bin histogram of Y over the FOV pixels; bin
    ``clip(round(255 Y), 0, 255)`` (the grey levels of an 8-bit image)."""
    y = luma(rgb)
    levels = np.clip(np.rint(y[_fov(y, fov)] * 255), 0, 255).astype(np.int64)
    if not levels.size:
        return math.nan
    p = np.bincount(levels, minlength=256) / levels.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())
