"""`fundus evaluate grade`: grading metrics against hand-computed values (kappa, macro F1, ECE, AUC with ties,
the temperature inversion), the label formats, the cluster bootstrap and the CLI."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.special import softmax

from fundus_pipeline.cli import main
from fundus_pipeline.evaluation.grade import (
    _conf_bins,
    auc_mann_whitney,
    class_scores,
    cluster_ids,
    evaluate_grades,
    expected_calibration_error,
    nll,
    quadratic_kappa,
    read_labels,
    uncalibrated_probabilities,
)
from fundus_pipeline.quality.grading import GRADES

# rows truth (good, usable, reject), columns prediction
HAND_CM = np.array([[2, 1, 0], [0, 1, 1], [0, 0, 1]])


# --------------------------------------------------------------------------------------------- metrics
def test_quadratic_kappa_hand_computed():
    # weights w_ij = (i - j)^2 / 4: [[0, 1/4, 1], [1/4, 0, 1/4], [1, 1/4, 0]]; n = 6
    # observed weighted disagreement: sum(w * O) = 1 * 1/4 (good->usable) + 1 * 1/4 (usable->reject) = 1/2
    # truth counts r = (3, 2, 1), predicted counts c = (2, 2, 2): E = r c^T / 6 = rows (1, 1, 1), (2/3, 2/3, 2/3), (1/3, 1/3, 1/3)
    # sum(w * E) = (0 + 1/4 + 1) + 2/3 (1/4 + 0 + 1/4) + 1/3 (1 + 1/4 + 0) = 5/4 + 1/3 + 5/12 = 2
    # kappa = 1 - (1/2) / 2 = 3/4
    assert quadratic_kappa(HAND_CM) == pytest.approx(0.75, abs=1e-12)
    assert quadratic_kappa(np.diag([4, 2, 3])) == 1.0  # perfect agreement
    # complete reversal, one image per class: sum(w O) = 1 + 1 = 2; E = 1/3 everywhere: sum(w E) = 3 / 3 = 1 -> -1
    assert quadratic_kappa(np.fliplr(np.eye(3))) == pytest.approx(-1.0, abs=1e-12)
    # one class off by one everywhere, usable and reject swapped with good: [[0, 2, 0], [2, 0, 0], [0, 0, 2]]
    # sum(w O) = 4 / 4 = 1; r = c = (2, 2, 2), E = 2/3 everywhere: sum(w E) = 2/3 * 3 = 2 -> kappa = 1/2
    assert quadratic_kappa(np.array([[0, 2, 0], [2, 0, 0], [0, 0, 2]])) == pytest.approx(0.5, abs=1e-12)
    assert quadratic_kappa(np.array([[3, 2, 1], [0, 0, 0], [0, 0, 0]])) == pytest.approx(0.0, abs=1e-12)  # truth one class
    assert math.isnan(quadratic_kappa(np.array([[5, 0, 0], [0, 0, 0], [0, 0, 0]])))  # both the same one class: 0/0
    stack = quadratic_kappa(np.stack([HAND_CM, np.diag([1, 1, 1])]))
    assert stack == pytest.approx([0.75, 1.0])


def test_class_scores_hand_computed():
    s = class_scores(HAND_CM)
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["precision"] == pytest.approx([2 / 2, 1 / 2, 1 / 2])  # TP / column sums (2, 2, 2)
    assert s["recall"] == pytest.approx([2 / 3, 1 / 2, 1 / 1])  # TP / row sums (3, 2, 1)
    # F1 = 2TP / (2TP + FP + FN): good 4 / (4 + 0 + 1), usable 2 / (2 + 1 + 1), reject 2 / (2 + 1 + 0)
    assert s["f1"] == pytest.approx([4 / 5, 1 / 2, 2 / 3])
    assert s["macro_f1"] == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3)  # = 59/90
    # truth all good, one predicted usable, reject in neither: recall n/a for usable and reject, reject's
    # precision n/a; macro over good (6/7) and usable (0: predicted, never true) = 3/7
    s = class_scores(np.array([[3, 1, 0], [0, 0, 0], [0, 0, 0]]))
    assert np.isnan(s["recall"][1]) and np.isnan(s["recall"][2]) and np.isnan(s["precision"][2])
    assert s["precision"][1] == 0.0 and np.isnan(s["f1"][2])
    assert s["macro_f1"] == pytest.approx(3 / 7)
    assert class_scores(np.diag([5, 0, 0]))["macro_f1"] == 1.0  # an all-good set predicted all good


def test_ece_hand_computed():
    # bins of width 1/15 = 0.0667, (lower, upper]
    probs = np.array([
        [0.88, 0.07, 0.05],  # bin (0.8667, 0.9333], correct
        [0.92, 0.05, 0.03],  # same bin, wrong (truth usable)
        [0.62, 0.30, 0.08],  # bin (0.6, 0.6667], correct
        [0.10, 0.50, 0.40],  # bin (0.4667, 0.5333], argmax usable, wrong (truth reject)
    ])
    truth = np.array([0, 1, 0, 2])
    # bin 1: 2 images, acc 1/2, mean conf 0.90 -> |0.5 - 0.9| = 0.40, weight 2/4 -> 0.200
    # bin 2: 1 image,  acc 1,   conf 0.62      -> 0.38,              weight 1/4 -> 0.095
    # bin 3: 1 image,  acc 0,   conf 0.50      -> 0.50,              weight 1/4 -> 0.125
    assert expected_calibration_error(probs, truth) == pytest.approx(0.42, abs=1e-12)
    # one equal-width bin: |mean acc - mean conf| = |2/4 - (0.88 + 0.92 + 0.62 + 0.5) / 4| = |0.5 - 0.73|
    assert expected_calibration_error(probs, truth, n_bins=1) == pytest.approx(0.23, abs=1e-12)
    assert nll(probs, truth) == pytest.approx(-np.log([0.88, 0.05, 0.62, 0.40]).mean())
    edges = np.linspace(0, 1, 16)  # an edge belongs to the bin below it; 0 to the first
    assert _conf_bins(edges).tolist() == [0] + list(range(15))
    assert _conf_bins(edges[1:-1] + 1e-9).tolist() == list(range(1, 15))


def test_auc_with_ties_against_a_hand_count():
    scores = np.array([0.1, 0.4, 0.4, 0.8, 0.4])
    positive = np.array([0, 1, 0, 1, 1])
    # positives {0.4, 0.8, 0.4}, negatives {0.1, 0.4}: pairs 0.4>0.1 (1), 0.4=0.4 (1/2), 0.8>0.1 (1),
    # 0.8>0.4 (1), 0.4>0.1 (1), 0.4=0.4 (1/2): 5 of 6
    assert auc_mann_whitney(scores, positive) == pytest.approx(5 / 6, abs=1e-12)
    assert auc_mann_whitney(scores, 1 - positive) == pytest.approx(1 / 6, abs=1e-12)
    assert auc_mann_whitney(np.full(4, 0.3), np.array([0, 1, 0, 1])) == 0.5  # all tied
    assert math.isnan(auc_mann_whitney(scores, np.ones(5)))


def test_temperature_scaling_is_inverted_exactly():
    z = np.array([[1.0, -0.5, 0.3], [4.0, 0.0, -2.0], [-1.0, -1.0, 2.5]])
    temperature = np.array([1.7, 1.7, 0.6])
    p = softmax(z / temperature[:, None], axis=1)
    assert uncalibrated_probabilities(p, temperature) == pytest.approx(softmax(z, axis=1), abs=1e-12)
    assert uncalibrated_probabilities(p[:2], 1.7) == pytest.approx(softmax(z[:2], axis=1), abs=1e-12)  # scalar T
    assert uncalibrated_probabilities(p, np.ones(3)) == pytest.approx(p, abs=1e-15)


# --------------------------------------------------------------------------------------------- labels, clusters
def test_eyeq_labels_with_leading_index_column(tmp_path):
    lab = tmp_path / "Label_EyeQ_test.csv"
    lab.write_text(",image,quality,DR_grade\n0,1_right.jpeg,1,0\n1,10001_right.jpeg,0,2\n2,10004_left.jpeg,2,0\n")
    labels, fmt, columns = read_labels(lab, ["DR_grade"])
    assert fmt == "eyeq" and columns == ["", "image", "quality", "DR_grade"]
    assert list(labels) == ["1_right", "10001_right", "10004_left"] and labels["10004_left"]["quality"] == "2"
    both = tmp_path / "both.csv"  # a key column wins over image
    both.write_text("key,image,quality\nk1,10028_left.jpeg,0\n")
    assert read_labels(both)[:2] == ({"k1": {"key": "k1", "image": "10028_left.jpeg", "quality": "0"}}, "keyed")
    plain = tmp_path / "labels.csv"  # EyePACS-256's labels.csv: no index column
    plain.write_text("image,quality,DR_grade\n10028_left.jpeg,1,0\n")
    assert read_labels(plain)[0]["10028_left"]["DR_grade"] == "0"


def test_cluster_ids_keep_both_eyes_of_a_patient_together():
    keys = ["10_left", "10_right", "11_left", "110_right", "scan_a", "10"]
    codes, unit = cluster_ids(keys)
    assert unit == "patient"
    assert codes[0] == codes[1] and len(set(codes.tolist())) == 5  # 10_left ~ 10_right, the rest alone
    assert codes[5] != codes[0]  # a bare "10" is an image, not patient 10
    codes, unit = cluster_ids(["a", "b", "c"])
    assert unit == "image" and sorted(codes.tolist()) == [0, 1, 2]
    codes, unit = cluster_ids(["10_left", "10_right", "x1", "x2"], sources=["s1", "s2", "s1", ""])
    assert unit == "source photograph" and codes[0] == codes[2] and len(set(codes.tolist())) == 3  # s1, s2, x2 alone


def _write(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns or list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _result_row(key: str, truth: int, rng: np.random.Generator, t: float = 1.5, flags: dict | None = None) -> dict:
    z = rng.normal(0, 1, 3)
    z[truth] += 2.0
    p = softmax(z / t)
    row = {"key": key, "status": "ok", "error": "", "grade": GRADES[int(p.argmax())], "p_good": f"{p[0]:.6f}",
           "p_usable": f"{p[1]:.6f}", "p_reject": f"{p[2]:.6f}", "temperature": f"{t}", "seconds": "0.1"}
    for f, y in (flags or {}).items():
        row[f"p_{f}"] = f"{np.clip(0.3 * y + rng.uniform(0, 0.7), 0, 1):.4f}"
    return row


def test_cluster_bootstrap_both_eyes_count_as_one_patient(tmp_path):
    """Every patient's right eye a copy of the left: the patient bootstrap gives exactly the CIs of the
    left eyes alone (each resample = the same patients, each weighted twice); an image bootstrap would not."""
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 3, 30)
    left = [_result_row(f"{100 + i}_left", int(t), rng) for i, t in enumerate(truth)]
    right = [{**r, "key": r["key"].replace("_left", "_right")} for r in left]
    lab_rows = [{"image": f"{r['key']}.jpeg", "quality": int(t)} for rs in (left, right) for r, t in zip(rs, truth)]
    lab = _write(tmp_path / "labels.csv", lab_rows)
    one = evaluate_grades(_write(tmp_path / "l.csv", left), lab, n_boot=200, seed=1).summary
    both = evaluate_grades(_write(tmp_path / "lr.csv", left + right), lab, n_boot=200, seed=1).summary
    assert both["bootstrap"]["unit"] == "patient" and (one["n_clusters"], both["n_clusters"], both["n_images"]) == (30, 30, 60)
    for k in ("accuracy", "macro_f1", "kappa", "ece_after"):
        assert both["overall"][k] == pytest.approx(one["overall"][k], abs=1e-12)
        assert both["overall"]["ci95"][k] == pytest.approx(one["overall"]["ci95"][k], abs=1e-12)
    # the same 60 images as separate clusters (keys no longer EyeQ-style): narrower, different CIs
    renamed = [{**r, "key": "x" + r["key"]} for r in left + right]
    lab2 = _write(tmp_path / "labels2.csv", [{"key": r["key"], "quality": int(t)} for r, t in zip(renamed, np.tile(truth, 2))])
    per_image = evaluate_grades(_write(tmp_path / "x.csv", renamed), lab2, n_boot=200, seed=1).summary
    assert per_image["bootstrap"]["unit"] == "image" and per_image["n_clusters"] == 60
    lo, hi = per_image["overall"]["ci95"]["accuracy"]
    lo1, hi1 = one["overall"]["ci95"]["accuracy"]
    assert hi - lo < hi1 - lo1


# --------------------------------------------------------------------------------------------- CLI
FAMILIES = ("cofe", "recipe", "clean")


def _grade_set(tmp: Path) -> tuple[Path, Path]:
    """10 sources x 3 families = 30 images (keys with a sub-folder), flags blur and haze, and their results."""
    rng = np.random.default_rng(7)
    labels, results = [], []
    for s in range(10):
        for fam in FAMILIES:
            key = f"{fam}/s{s}"
            q = int(rng.integers(0, 3))
            flags = {"blur": int(rng.integers(0, 2)), "haze": int(rng.integers(0, 2))}
            labels.append({"key": key, "quality": q, "flag_blur": flags["blur"], "flag_haze": flags["haze"],
                           "source": f"s{s}", "family": fam})
            results.append(_result_row(key, q, rng, flags=flags))
    return _write(tmp / "run" / "results.csv", results), _write(tmp / "gset" / "labels.csv", labels)


def _run(*args: object) -> int:
    return main(["evaluate", "grade", *[str(a) for a in args]])


def test_cli_end_to_end_and_rerun(tmp_path, capsys):
    res, lab = _grade_set(tmp_path)
    assert _run(res, lab.parent, "--by", "family", "--bootstrap", "50", "--format", "json") == 0  # LABELS as a folder
    cap = capsys.readouterr()
    s = json.loads(cap.out)
    assert (s["n_images"], s["n_clusters"], s["n_problems"], s["labels_format"]) == (30, 10, 0, "keyed")
    assert s["bootstrap"] == {"n": 50, "seed": 0, "unit": "source photograph"} and s["flags"] == ["blur", "haze"]
    assert s["temperature"] == 1.5 and set(s["groups"]["family"]) == set(FAMILIES)
    o = s["overall"]
    assert sum(map(sum, o["confusion"])) == 30 and o["accuracy"] > 0.6 and o["auc"]["blur"] > 0.7
    assert o["mean_flag_auc"] == pytest.approx((o["auc"]["blur"] + o["auc"]["haze"]) / 2)
    assert o["pred_good"] + o["pred_usable"] + o["pred_reject"] == pytest.approx(1.0)
    assert set(o["ci95"]) == {"accuracy", "macro_f1", "kappa", "mean_flag_auc", "ece_after"}
    for k in ("accuracy", "macro_f1"):
        lo, hi = o["ci95"][k]
        assert lo < o[k] < hi
    assert len({tuple(ci) for ci in o["ci95"].values()}) == 5  # one CI per metric
    assert o["ece_before"] != o["ece_after"] and o["nll_before"] != o["nll_after"]
    assert {"kappa", "macro_f1", "ece", "flag_auc", "bootstrap", "probabilities"} <= set(s["definitions"])
    out = res.parent / "eval_grade"
    assert {p.name for p in out.iterdir()} == {"metrics.csv", "summary.json", "summary.md"}
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [(r["group_by"], r["group"]) for r in rows] == [("all", "all")] + [("family", f) for f in sorted(FAMILIES)]
    assert list(rows[0])[:9] == ["group_by", "group", "n", "n_clusters", "accuracy", "macro_f1", "kappa", "mean_flag_auc", "ece_after"]
    assert {"accuracy_ci_lo", "auc_blur", "auc_haze", "recall_usable", "n_good_as_reject"} <= set(rows[0])
    assert float(rows[0]["kappa"]) == pytest.approx(o["kappa"], abs=1e-6)
    assert (out / "summary.md").read_text().startswith("# Quality-grading evaluation")
    first = {p.name: p.read_bytes() for p in out.iterdir()}

    (out / "keep.txt").write_text("mine")
    assert _run(res, lab, "--by", "family", "--bootstrap", "50", "--format", "json") == 0  # same seed: same bytes
    assert "replacing the earlier reports in" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "keep.txt"} == first
    assert (out / "keep.txt").read_text() == "mine"

    assert _run(res, lab, "--bootstrap", "0", "--out", out) == 0  # human, no CIs, no groups: replaced
    cap = capsys.readouterr()
    assert "30 images of 10 clusters (source photograph) graded" in cap.out and "95% CI" not in cap.out
    assert "replacing the earlier reports" in cap.err
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 1 and "accuracy_ci_lo" not in rows[0]
    assert "ci95" not in json.loads((out / "summary.json").read_text())["overall"]

    # an --out whose report names are the inputs, or files no evaluation wrote: refused, nothing replaced
    clash = tmp_path / "clash"
    clash.mkdir()
    (clash / "metrics.csv").write_bytes(lab.read_bytes())
    (clash / "summary.md").write_bytes(res.read_bytes())
    before = {p.name: p.read_bytes() for p in clash.iterdir()}
    assert _run(clash / "summary.md", clash / "metrics.csv", "--bootstrap", "0", "--out", clash) == 2
    assert "would replace an input" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.json").write_text('{"my": "notes"}')
    assert _run(res, lab, "--bootstrap", "0", "--out", mine) == 2
    assert "that no evaluation wrote" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in clash.iterdir()} == before and (mine / "summary.json").read_text() == '{"my": "notes"}'


def test_cli_eyeq_labels_and_an_all_good_hand_made_set(tmp_path, capsys):
    rng = np.random.default_rng(1)
    lab = tmp_path / "Label_EyeQ_test.csv"
    truth = {"1_left": 0, "1_right": 1, "2_left": 2, "2_right": 0, "3_left": 0}
    lab.write_text(",image,quality,DR_grade\n" + "".join(f"{i},{k}.jpeg,{q},{i % 2}\n" for i, (k, q) in enumerate(truth.items())))
    res = _write(tmp_path / "results.csv", [_result_row(k, q, rng) for k, q in truth.items()])
    assert _run(res, lab, "--by", "DR_grade", "--bootstrap", "20", "--format", "json") == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["labels_format"], s["n_images"], s["n_clusters"], s["bootstrap"]["unit"]) == ("eyeq", 5, 3, "patient")
    assert set(s["groups"]["DR_grade"]) == {"0", "1"} and s["flags"] == [] and s["overall"]["mean_flag_auc"] is None

    good = _write(tmp_path / "all_good.csv", [{"key": k, "quality": 0} for k in truth])  # hand-made: all good
    assert _run(res, good, "--bootstrap", "0", "--format", "json") == 0
    cap = capsys.readouterr()
    o = json.loads(cap.out)["overall"]
    assert o["recall"]["usable"] is None and o["classes_absent_from_truth"] == ["usable", "reject"]
    assert o["pred_good"] == pytest.approx(o["accuracy"]) and o["kappa"] in (None, 0.0)
    assert "all=all: no usable, reject in the truth (recall n/a" in cap.err


def test_cli_problem_rows_exit_3(tmp_path, capsys):
    res, lab = _grade_set(tmp_path)
    rows = list(csv.DictReader(res.open()))
    rows[0].update(status="error", error="unreadable image", grade="", p_good="", p_usable="", p_reject="")
    rows[1]["grade"] = "excellent"
    rows[2]["p_usable"] = "nan"
    rows[3].update(p_good="0.5", p_usable="0.1", p_reject="0.1")
    rows[4]["temperature"] = "0"
    rows[5]["p_blur"] = ""
    rows.append({**rows[6], "key": "stranger"})
    del rows[7]  # a label row without a result: counted, not a problem
    _write(res, rows)
    assert _run(res, lab, "--bootstrap", "20", "--format", "json") == 3
    cap = capsys.readouterr()
    s = json.loads(cap.out)
    assert s["n_images"] == 30 - 1 - 6 and s["n_problems"] == 7 and s["n_labels_not_graded"] == 1
    problems = {p["key"]: p["status"] for p in s["problems"]}
    assert problems == {
        rows[0]["key"]: "status error: unreadable image",
        rows[1]["key"]: "grade 'excellent' is not good, usable or reject",
        rows[2]["key"]: "p_usable 'nan' is not a finite number",
        rows[3]["key"]: "p_good + p_usable + p_reject = 0.7 (not 1)",
        rows[4]["key"]: "temperature '0' is not a positive number",
        rows[5]["key"]: "empty p_blur",
        "stranger": "not in labels",
    }
    assert f"warning: {rows[0]['key']}: status error" in cap.err and "warning: stranger: not in labels" in cap.err
    assert "1 label row has no row in the results file (not graded)" in cap.err
    assert "## Not graded" in (res.parent / "eval_grade" / "summary.md").read_text()


def test_cli_usage_errors_are_one_line_exit_2(tmp_path, capsys):
    res, lab = _grade_set(tmp_path)
    rows = list(csv.DictReader(res.open()))
    no_usable = _write(tmp_path / "no_usable.csv", [{k: v for k, v in r.items() if k != "p_usable"} for r in rows])
    bad_quality = _write(tmp_path / "bad_q.csv", [{"key": r["key"], "quality": "3" if i == 2 else "0"} for i, r in enumerate(rows)])
    no_quality = _write(tmp_path / "no_q.csv", [{"key": r["key"], "grade": 0} for r in rows])
    cases = [
        ((no_usable, lab), "has no column 'p_usable' (columns: key, status, error, grade, p_good, p_reject, temperature"),
        ((res, lab, "--by", "family,colour"), "has no column 'colour'"),
        ((res, no_quality), "has no column 'quality'"),
        ((res, bad_quality), f"has quality '3' for key '{rows[2]['key']}' (expected 0, 1 or 2)"),
        ((res, tmp_path / "nope.csv"), f"LABELS is not a file: {tmp_path / 'nope.csv'}"),
    ]
    for args, msg in cases:
        assert _run(*args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("Error: ") and msg in err and "Traceback" not in err
    _write(res, [{**rows[0], "key": "elsewhere/x"}])
    assert _run(res, lab) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no key of the results file" in err
    assert not (res.parent / "eval_grade").exists()
