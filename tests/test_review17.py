"""Review 17 (2026-12-04) of the score map's fit: the increasing logistic from a grid and the best step, flat
only when no split rises, and bootstrap refits that are not left falsely flat. Each test fails on the code
before its mend."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs" / "score_benchmark"


# --------------------------------------------------------------------------------------------- review 17
def _baselines() -> tuple[dict[str, np.ndarray], np.ndarray]:
    label = {r["key"]: float(r["label"]) for r in csv.DictReader(open(DOCS / "test_pairs.csv", newline=""))}
    base = list(csv.DictReader(open(DOCS / "baselines.csv", newline="")))
    cols = {c: np.array([float(r[c]) for r in base]) for c in ("nr_sharpness", "nr_contrast", "nr_entropy")}
    return cols, np.array([label[r["key"]] for r in base])


def test_the_score_map_finds_the_near_step_optimum_of_a_weak_predictor():
    """Review 17 R1, R2: nine fixed starts missed the best increasing map of weak predictors, a near-step.
    Sharpness was published as having none (PLCC -0.464, its raw correlation) though one with PLCC 0.209
    exists; entropy stopped at 0.295 against 0.314. The fit starts from a grid and from the best step now (it
    matched a 420-start search on every baseline of both committed test parts; here, a 9-start check)."""
    from fundus_pipeline.evaluation.score import _best_step, _increasing_fit, fit_logistic4, iqa_metrics

    cols, y = _baselines()
    for col, plcc in (("nr_sharpness", 0.2092), ("nr_contrast", 0.4309), ("nr_entropy", 0.3141)):
        m = iqa_metrics(cols[col], y)
        assert m["mapping"]["kind"] == "logistic4" and m["plcc"] == pytest.approx(plcc, abs=5e-4), (col, m["plcc"])
    x = cols["nr_sharpness"]
    fit = fit_logistic4(x, y)
    sse = float(((y - fit(x)) ** 2).sum())
    multi = min(f[0] for q in np.percentile(x, (5, 50, 95)) for k in (1e-4, 1e-2, 1.0)
                if (f := _increasing_fit(x, y, (y.min(), np.ptp(y), q, k * x.std()), 10_000)) is not None)
    assert sse <= multi + 1e-9
    # the best step: the two-level fit of largest drop, checked against every split
    sse_step, (b2, d, b3, _) = _best_step(x, y)
    o = np.sort(np.unique(x))
    splits = [(y[x <= t].mean(), y[x > t].mean(), ((y[x <= t] - y[x <= t].mean()) ** 2).sum() + ((y[x > t] - y[x > t].mean()) ** 2).sum())
              for t in o[:-1]]
    best = min((s for s in splits if s[1] > s[0]), key=lambda s: s[2])
    assert sse_step == pytest.approx(best[2], rel=1e-9) and (b2, b2 + d) == pytest.approx(best[:2], rel=1e-9)


def test_no_increasing_map_is_flat_with_plcc_0_and_only_when_no_split_rises():
    """A score whose every split has its upper labels' mean at most the lower's has no increasing map better
    than the mean (every increasing logistic is a mixture of such steps): 'flat', PLCC 0 (the linear fallback
    had given such a score its negative raw correlation while a weaker one got a logistic's PLCC)."""
    from fundus_pipeline.evaluation.score import _best_step, iqa_metrics

    rng = np.random.default_rng(3)
    y = np.sort(rng.uniform(0.2, 0.9, 40))
    x = -y + rng.normal(0, 1e-6, y.size)
    assert _best_step(x, y) is None
    m = iqa_metrics(x, y)
    assert m["mapping"]["kind"] == "flat" and m["plcc"] == 0.0 and m["rmse"] == pytest.approx(float(y.std()), rel=1e-12)
    x[-1] = x.max() + 1  # the best label gets the highest score: one split rises, an increasing map exists and is found
    m = iqa_metrics(x, y)
    assert m["mapping"]["kind"] == "logistic4" and m["plcc"] > 0


def test_the_bootstrap_refit_leaves_no_resample_falsely_flat():
    """Review 17 R3: a resample whose one refit from the set's map ended flat counted as 'no map' though most had
    one (contrast's and entropy's CIs reached below 0; sdmp's recipe-severe bound fell 0.312 -> 0.164). A
    resample is flat now only when no split rises."""
    from fundus_pipeline.evaluation.score import _best_step, fit_logistic4, refit_logistic4, resample_indices, source_bootstrap

    cols, y = _baselines()
    src = np.unique([r["source"] for r in csv.DictReader(open(DOCS / "test_pairs.csv", newline=""))
                     if r["part"] == "test"], return_inverse=True)[1]
    keys = [r["key"] for r in csv.DictReader(open(DOCS / "baselines.csv", newline=""))]
    part = {r["key"]: r["source"] for r in csv.DictReader(open(DOCS / "test_pairs.csv", newline=""))}
    codes = np.unique([part[k] for k in keys], return_inverse=True)[1]
    assert src.max() == codes.max()
    x = cols["nr_contrast"]
    start = fit_logistic4(x, y)
    counts = source_bootstrap(int(codes.max()) + 1, 40, 0)
    for b in range(40):
        idx = resample_indices(counts[b], codes, np.arange(y.size))
        m = refit_logistic4(x[idx], y[idx], start)
        assert (m.kind == "flat") == (_best_step(x[idx], y[idx]) is None), b


# --------------------------------------------------------------------------------------------- review 18
def test_the_fit_does_not_depend_on_the_units_and_never_ends_worse_than_the_mean():
    """Review 18 R1: labels in units of 1e-12 were always 'flat' (an absolute flatness threshold; the optimiser
    ended at the bound of d, worse than its start); a rising split closer than the map's smallest scale gave a
    logistic worse than the labels' mean, reported flat while the docs said flat meant no split rises."""
    from fundus_pipeline.evaluation.score import _best_step, fit_logistic4, iqa_metrics

    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = np.tanh(x) + rng.normal(0, 0.2, 50)
    ref = iqa_metrics(x, y)
    assert ref["mapping"]["kind"] == "logistic4"
    for sx, sy in ((1, 1e-12), (1e-9, 1), (1e6, 1e6)):
        m = iqa_metrics(x * sx, y * sy)
        assert m["mapping"]["kind"] == "logistic4" and m["plcc"] == pytest.approx(ref["plcc"], abs=1e-6), (sx, sy)
    x = np.array([0.0, 1e-8] + list(np.arange(1, 21.0)))
    y = np.array([-10.0, 30.0] + list(np.linspace(1, 0, 20)))
    assert _best_step(x, y) is None and fit_logistic4(x, y).kind == "flat"  # the only rise: a gap below the scale
    x[1] = 1e-3  # a resolvable gap: the increasing map is found
    fit = fit_logistic4(x, y)
    assert fit.kind == "logistic4" and float(((y - fit(x)) ** 2).sum()) < float(((y - y.mean()) ** 2).sum())


def test_a_constant_score_or_label_has_no_plcc():
    """Review 18 R6: a constant score got the flat map's PLCC 0, and such resamples entered the CI as 0."""
    from fundus_pipeline.evaluation.score import iqa_metrics

    y = np.linspace(0.1, 0.9, 20)
    for x, lab in ((np.full(20, 3.0), y), (y, np.full(20, 0.5))):
        m = iqa_metrics(x, lab)
        assert m["mapping"]["kind"] == "flat" and m["plcc"] != m["plcc"]
