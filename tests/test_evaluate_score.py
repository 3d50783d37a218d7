"""`fundus evaluate score`: IQA metrics (known answers, scipy agreement, logistic map), the source bootstrap,
the CLI and the no-reference baselines."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from fundus_pipeline.cli import main
from fundus_pipeline.evaluation.score import (
    bootstrap_cis,
    fit_logistic4,
    iqa_metrics,
    logistic4,
    nr_contrast,
    nr_entropy,
    nr_sharpness,
    resample_indices,
    source_bootstrap,
)

TRUE = (0.9, 0.1, 0.5, 0.4)  # b1, b2, b3, b4


# --------------------------------------------------------------------------------------------- metrics
def test_perfect_monotone_nonlinear_predictor_and_its_reverse():
    label = np.random.default_rng(0).uniform(0.101, 0.899, 80)
    b1, b2, b3, b4 = TRUE
    pred = b3 + b4 * np.log((label - b2) / (b1 - label))  # the inverse logistic: monotone, far from linear
    assert stats.pearsonr(pred, label)[0] < 0.96  # the raw scores are not linear in the label
    m = iqa_metrics(pred, label)
    assert m["n"] == 80 and m["mapping"]["kind"] == "logistic4"
    assert m["srocc"] == pytest.approx(1.0, abs=1e-12) and m["krocc"] == pytest.approx(1.0, abs=1e-12)
    assert m["plcc"] == pytest.approx(1.0, abs=1e-8) and m["rmse"] == pytest.approx(0.0, abs=1e-5)
    r = iqa_metrics(-pred, label)  # a "lower is better" score passed as it is: perfectly reversed
    assert r["srocc"] == pytest.approx(-1.0, abs=1e-12) and r["krocc"] == pytest.approx(-1.0, abs=1e-12)
    # campaign 16a F1: the map must be increasing (higher = better); a decreasing fit turned the score around and
    # gave a wrong-way predictor PLCC 1. No increasing map beats the labels' mean: flat, PLCC 0 (review 17: the
    # linear fallback gave such a score its negative raw correlation, while a weak one got a logistic's PLCC)
    assert r["mapping"]["kind"] == "flat" and "does not rise" in r["mapping"]["note"]
    assert r["plcc"] == 0.0 and r["rmse"] == pytest.approx(float(np.std(label)), abs=1e-12)
    assert iqa_metrics(pred[:2], label[:2])["srocc"] != iqa_metrics(pred[:2], label[:2])["srocc"]  # n < 3: NaN


def test_small_example_against_scipy():
    pred = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.2, 0.9, 0.5, 0.5, 0.3])
    label = np.array([0.2, 0.5, 0.3, 0.7, 0.8, 0.2, 0.9, 0.4, 0.6, 0.45])  # ties in both
    m = iqa_metrics(pred, label)
    assert m["srocc"] == pytest.approx(stats.spearmanr(pred, label)[0], abs=1e-12)
    assert m["krocc"] == pytest.approx(stats.kendalltau(pred, label, variant="b")[0], abs=1e-12)
    mapped = logistic4(pred, *m["mapping"]["params"])
    assert m["plcc"] == pytest.approx(stats.pearsonr(label, mapped)[0], abs=1e-12)
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((label - mapped) ** 2)), abs=1e-12)
    assert m["plcc"] >= stats.pearsonr(label, pred)[0] - 1e-9  # the fit never does worse than linear here


def test_logistic_fit_recovers_known_parameters_and_falls_back_to_linear(monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.uniform(-1.5, 2.5, 500)
    y = logistic4(x, *TRUE) + rng.normal(0, 0.01, x.size)
    fit = fit_logistic4(x, y)
    assert fit.kind == "logistic4" and fit.note == ""
    b1, b2, b3, b4 = fit.params
    assert (b1, b2, b3, abs(b4)) == pytest.approx(TRUE, abs=0.02)
    assert logistic4(np.array([TRUE[2]]), *TRUE)[0] == pytest.approx((TRUE[0] + TRUE[1]) / 2)  # midpoint at b3
    few = fit_logistic4(x[:4], y[:4])
    assert few.kind == "linear" and "fewer than 5" in few.note
    import fundus_pipeline.evaluation.score as score_mod

    with monkeypatch.context() as m:  # every start fails (least_squares raises): a straight line, said so
        m.setattr(score_mod.optimize, "least_squares", lambda *a, **k: (_ for _ in ()).throw(ValueError("x")))
        failed = fit_logistic4(x, y)
    assert failed.kind == "linear" and failed.note.startswith("logistic fit failed")
    a, c = np.polyfit(x, y, 1)
    assert failed.params == pytest.approx((a, c))


# --------------------------------------------------------------------------------------------- bootstrap
def _clustered(n_sources: int = 12, seed: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (pred, label, source code) with 2..6 pairs per source and a per-source quality offset."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 7, n_sources)
    codes = np.repeat(np.arange(n_sources), sizes)
    label = np.clip(rng.normal(0, 0.15, n_sources)[codes] + rng.uniform(0.2, 0.8, codes.size), 0, 1)
    pred = np.tanh(2 * label) + rng.normal(0, 0.08, codes.size)
    return pred, label, codes


def test_resamples_hold_whole_sources_and_are_seeded():
    _, _, codes = _clustered()
    counts = source_bootstrap(12, 40, seed=3)
    assert counts.shape == (40, 12) and (counts.sum(axis=1) == 12).all()
    assert (counts == source_bootstrap(12, 40, seed=3)).all() and (counts != source_bootstrap(12, 40, seed=4)).any()
    everything = np.arange(codes.size)
    for row in counts:
        idx = resample_indices(row, codes, everything)
        assert (np.bincount(idx, minlength=codes.size) == row[codes]).all()  # each pair as often as its source
    group = np.flatnonzero(codes % 3 == 0)  # a group: restricted to its own pairs in the same resample
    idx = resample_indices(counts[0], codes, group)
    assert set(idx) <= set(group) and len(idx) == counts[0][codes[group]].sum()


def test_bootstrap_is_by_source_duplicated_pairs_change_nothing():
    pred, label, codes = _clustered()
    fit = fit_logistic4(pred, label)
    (ci, fallbacks), = bootstrap_cis(pred, label, codes, [(np.arange(codes.size), fit)], 300, seed=0)
    assert bootstrap_cis(pred, label, codes, [(np.arange(codes.size), fit)], 300, seed=0)[0][0] == ci  # deterministic
    assert 0 <= fallbacks <= 15  # refits from the full-data parameters rarely run out of max_nfev 2000 (then: linear)
    point = iqa_metrics(pred, label)
    for k in ("srocc", "plcc", "krocc", "rmse"):
        lo, hi = ci[k]
        assert lo < point[k] < hi
    # every pair of every source four times: a pair bootstrap would narrow the CIs by ~2; resampling
    # sources keeps each resample's metrics (hence the CIs) unchanged
    order = np.argsort(codes, kind="stable")
    p4, l4, c4 = (np.repeat(a[order], 4) for a in (pred, label, codes))
    fit4 = fit_logistic4(p4, l4)
    (ci4, _), = bootstrap_cis(p4, l4, c4, [(np.arange(c4.size), fit4)], 300, seed=0)
    for k in ci:
        assert ci4[k] == pytest.approx(ci[k], abs=1e-6)


# --------------------------------------------------------------------------------------------- CLI
LABEL_COLUMNS = ["key", "part", "source", "dataset", "degradation", "family", "enhancer", "enhancer_kind", "seed", "label"]


def _tiny(tmp: Path) -> tuple[Path, Path]:
    """8 sources x 2 enhancers x 2 families = 32 pairs (sources s0-s5 test, s6-s7 train) and their scores."""
    rng = np.random.default_rng(5)
    labels, scores = [], []
    for s in range(8):
        for enh in ("clahe", "net"):
            for fam in ("cofe-released", "recipe-moderate"):
                key = f"s{s}_{enh}_{fam}"
                y = float(rng.uniform(0.1, 0.9))
                labels.append([key, "test" if s < 6 else "train", f"s{s}", "hrf", "d", fam, enh, "k", 0, f"{y:.4f}"])
                scores.append({"key": key, "status": "ok", "error": "", "score": f"{y ** 2 + rng.normal(0, 0.05):.5f}",
                               "score_spread": "0.1"})
    lab = tmp / "qset" / "pairs.csv"
    lab.parent.mkdir()
    with lab.open("w", newline="") as fh:
        csv.writer(fh).writerows([LABEL_COLUMNS] + labels)
    sc = tmp / "scored" / "results.csv"
    sc.parent.mkdir()
    _write_scores(sc, scores)
    return sc, lab


def _write_scores(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _run(*args: object) -> int:
    return main(["evaluate", "score", *[str(a) for a in args]])


def test_cli_end_to_end(tmp_path, capsys):
    sc, lab = _tiny(tmp_path)
    assert _run(sc, lab.parent, "--bootstrap", "50", "--format", "json") == 0  # LABELS as the set's folder
    cap = capsys.readouterr()
    s = json.loads(cap.out)
    assert s["n_pairs"] == 24 and s["n_sources"] == 6 and s["n_problems"] == 0 and s["n_scores_other_part"] == 8
    assert s["part"] == "test" and s["by"] == ["enhancer", "family"] and s["bootstrap"]["n"] == 50
    assert set(s["groups"]["enhancer"]) == {"clahe", "net"} and s["groups"]["family"]["cofe-released"]["n"] == 12
    assert s["overall"]["srocc"] > 0.8 and len(s["overall"]["ci95"]["plcc"]) == 2
    assert {"srocc", "krocc", "plcc", "rmse", "mapping", "bootstrap"} <= set(s["definitions"])
    out = sc.parent / "eval_score"
    assert {p.name for p in out.iterdir()} == {"metrics.csv", "summary.json", "summary.md"}
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [(r["group_by"], r["group"]) for r in rows] == [
        ("all", "all"), ("enhancer", "clahe"), ("enhancer", "net"), ("family", "cofe-released"), ("family", "recipe-moderate")
    ]
    assert list(rows[0])[:8] == ["group_by", "group", "n", "n_sources", "srocc", "plcc", "krocc", "rmse"]
    assert "srocc_ci_lo" in rows[0] and float(rows[0]["srocc"]) == pytest.approx(s["overall"]["srocc"], abs=1e-6)
    assert (out / "summary.md").read_text().startswith("# Quality-assessment evaluation")

    assert _run(sc, lab, "--bootstrap", "0", "--by", "", "--out", tmp_path / "ev") == 0  # human, no CIs, no groups
    cap = capsys.readouterr()
    assert "24 pairs of 6 sources" in cap.out and "95% CI" not in cap.out
    rows = list(csv.DictReader((tmp_path / "ev" / "metrics.csv").open()))
    assert len(rows) == 1 and "srocc_ci_lo" not in rows[0]


def test_cli_part_filters(tmp_path, capsys):
    sc, lab = _tiny(tmp_path)
    assert _run(sc, lab, "--part", "train", "--bootstrap", "20", "--format", "json") == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["n_pairs"], s["n_sources"], s["n_scores_other_part"], s["part"]) == (8, 2, 24, "train")
    assert _run(sc, lab, "--part", "all", "--bootstrap", "0", "--format", "json") == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["n_pairs"], s["n_scores_other_part"], s["part"]) == (32, 0, "all")
    assert _run(sc, lab, "--part", "val") == 2
    assert "has part 'val' (parts: test, train)" in capsys.readouterr().err


def test_cli_problem_rows_exit_3(tmp_path, capsys):
    sc, lab = _tiny(tmp_path)
    rows = list(csv.DictReader(sc.open()))
    rows[0].update(status="error", error="out of memory while processing this image", score="")
    rows[1]["score"] = ""
    rows[2]["score"] = "nan"
    rows.append({**rows[3], "key": "stranger"})
    del rows[4]  # a label row without a score: counted, not a problem
    _write_scores(sc, rows)
    assert _run(sc, lab, "--bootstrap", "20", "--format", "json") == 3
    cap = capsys.readouterr()
    s = json.loads(cap.out)
    assert s["n_pairs"] == 24 - 4 and s["n_problems"] == 4 and s["n_labels_not_scored"] == 1
    problems = {p["key"]: p["status"] for p in s["problems"]}
    assert problems == {
        rows[0]["key"]: "status error: out of memory while processing this image",
        rows[1]["key"]: "empty score",
        rows[2]["key"]: "score 'nan' is not a finite number",
        "stranger": "not in labels",
    }
    assert f"warning: {rows[0]['key']}: status error" in cap.err and "warning: stranger: not in labels" in cap.err
    assert "1 label row has no row in the scores file (not scored)" in cap.err
    assert "## Not scored" in (sc.parent / "eval_score" / "summary.md").read_text()


def test_cli_usage_errors_are_one_line_exit_2(tmp_path, capsys):
    sc, lab = _tiny(tmp_path)
    cases = [
        (("--column", "quality"), "has no column 'quality' (columns: key, status, error, score, score_spread)"),
        (("--by", "enhancer,colour"), "has no column 'colour'"),
    ]
    for extra, msg in cases:
        assert _run(sc, lab, *extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("Error: ") and msg in err and "Traceback" not in err
    assert _run(tmp_path / "nope.csv", lab) == 2
    assert capsys.readouterr().err == f"Error: SCORES_CSV is not a file: {tmp_path / 'nope.csv'}\n"
    _write_scores(sc, [{"key": "x", "score": "0.5"}])
    assert _run(sc, lab) == 2
    assert "no key of the scores file" in capsys.readouterr().err
    assert not (sc.parent / "eval_score").exists()


# --------------------------------------------------------------------------------------------- baselines
def test_no_reference_baselines():
    fov = np.zeros((40, 40), bool)
    fov[4:36, 4:36] = True
    flat = np.full((40, 40, 3), 0.4)
    assert nr_contrast(flat, fov) == pytest.approx(0.0, abs=1e-12) and nr_entropy(flat, fov) == 0.0
    assert nr_sharpness(flat, fov) == pytest.approx(0.0, abs=1e-20)
    halves = flat.copy()
    halves[:, 20:] = 0.8  # two grey levels, 16 of the 32 FOV columns each
    assert nr_entropy(halves, fov) == pytest.approx(1.0, abs=1e-12)
    assert nr_contrast(halves, fov) == pytest.approx(0.2, abs=1e-12)  # |0.8 - 0.4| / 2 (Y of grey = grey)
    # 2-px squares: cv2's ksize-3 kernel [[2, 0, 2], [0, -8, 0], [2, 0, 2]] is blind to a 1-px checkerboard
    checker = flat + 0.05 * (((np.indices((40, 40)) // 2).sum(0) % 2)[..., None] - 0.5)
    one_px = flat + 0.05 * ((np.indices((40, 40)).sum(0) % 2)[..., None] - 0.5)
    assert nr_sharpness(one_px, fov) == pytest.approx(0.0, abs=1e-20)
    assert nr_sharpness(checker, fov) > 0 and nr_sharpness(flat + 2 * (checker - flat), fov) > nr_sharpness(checker, fov)
    dark_outside = flat * fov[..., None]  # the FOV edge is a strong step, but eroded away: still 0
    assert nr_sharpness(dark_outside, fov) == pytest.approx(0.0, abs=1e-20)
    assert np.isnan(nr_contrast(flat, np.zeros((40, 40), bool)))
