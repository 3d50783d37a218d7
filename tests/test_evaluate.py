"""`fundus evaluate segment`: pairing, binarisation, hand-checked metrics, exit codes, DRIVE 2nd observer."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import typer
from PIL import Image
from typer.testing import CliRunner

from fundus_pipeline.cli.evaluate import evaluate_app
from fundus_pipeline.errors import UsageError
from fundus_pipeline.evaluation.segment import pairing_key

H, W = 20, 24


def _app() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(evaluate_app, name="evaluate")
    return app


def _run(*args: str):
    return CliRunner().invoke(_app(), ["evaluate", "segment", *[str(a) for a in args]])


# Hand-checkable case, inside the FOV (columns 0..19 of 24):
#   GT vessel rows 5..9. prob 0.9 on GT cols 0..11 (60 TP), 0.3 on GT cols 12..19 (40 FN at T=0.5),
#   0.7 on rows 15..16 cols 0..5 (12 FP), 0.1 elsewhere (288 TN).
#   AUC-ROC = (60*300 + 40*288) / (100*300) = 0.984.
def _case():
    gt = np.zeros((H, W), np.uint8)
    gt[5:10, :] = 255
    prob = np.full((H, W), 0.1)
    prob[5:10, :12] = 0.9
    prob[5:10, 12:] = 0.3
    prob[15:17, :6] = 0.7
    fov = np.zeros((H, W), np.uint8)
    fov[:, :20] = 255
    return prob, gt, fov


def _png16(path: Path, prob: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.rint(prob * 65535).astype(np.uint16))


def _png8(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr)


def _gif_l(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode="L").save(path)


def _gif_palette(path: Path, binary: np.ndarray) -> None:
    """DRIVE 2nd_manual style: indices {0,1}, palette grey 3 / 253."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(binary.astype(np.uint8), mode="P")
    im.putpalette([3, 3, 3, 253, 253, 253] + [0, 0, 0] * 254)
    im.save(path)


def _drive_tree(tmp: Path, keys=("01", "02"), vessels=True, prob=True) -> tuple[Path, Path, Path]:
    p, g, f = _case()
    pred, gt, fov = tmp / "pred", tmp / "gt", tmp / "fov"
    for k in keys:
        if prob:
            _png16(pred / f"{k}_test_prob.png", p)
        if vessels:
            _png8(pred / f"{k}_test_vessels.png", np.where(p >= 0.5, 255, 0).astype(np.uint8))
        _gif_l(gt / "1st_manual" / f"{k}_manual1.gif", g)
        _gif_l(fov / "mask" / f"{k}_test_mask.gif", f)
    return pred, gt, fov


def test_pairing_key_rule():
    assert pairing_key("01_test_prob") == "01"
    assert pairing_key("01_test_vessels.png") == "01"
    assert pairing_key("1st_manual/01_manual1") == "01"
    assert pairing_key("02_manual2.gif") == "02"
    assert pairing_key("mask/01_test_mask.gif") == "01"
    assert pairing_key("21_training_mask.gif") == "21"
    assert pairing_key("01_h") == "01_h"
    assert pairing_key("mask/01_h_mask.tif") == "01_h"
    assert pairing_key("05_DR_prob.png") == "05_dr"
    assert pairing_key("_mask") == "_mask"  # never strips to an empty key


def test_drive_naming_probabilities_hand_checked(tmp_path):
    pred, gt, fov = _drive_tree(tmp_path)
    r = _run(pred, gt, "--fov", fov, "--format", "json", "--bootstrap", "50")
    assert r.exit_code == 0, (r.output, r.exception)
    s = json.loads(r.stdout)
    assert s["threshold"] == 0.5 and s["threshold_source"] == "default"
    assert s["n_images"] == 2 and s["n_unpaired"] == 0 and s["prediction_source"] == ["prob"]
    pooled = s["pooled"]
    assert (pooled["tp"], pooled["fp"], pooled["tn"], pooled["fn"]) == (120, 24, 576, 80)
    assert pooled["sensitivity"] == pytest.approx(0.6)
    assert pooled["precision"] == pytest.approx(60 / 72)
    assert pooled["accuracy"] == pytest.approx(348 / 400)
    assert pooled["f1"] == pytest.approx(120 / 172)
    assert pooled["auc_roc"] == pytest.approx(0.984)
    assert s["mean"]["auc_roc"] == pytest.approx(0.984)
    out = pred / "eval"
    assert {p.name for p in out.iterdir()} == {"metrics.csv", "summary.json", "summary.md"}
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [row["key"] for row in rows] == ["01", "02"]
    assert rows[0]["status"] == "ok" and int(rows[0]["tp"]) == 60 and int(rows[0]["fn"]) == 40
    assert rows[0]["gt"].endswith("01_manual1.gif") and rows[0]["fov"].endswith("01_test_mask.gif")
    assert json.loads((out / "summary.json").read_text())["pooled"]["tp"] == 120
    assert "| f1 |" in (out / "summary.md").read_text()


def test_threshold_from_manifest_and_option(tmp_path):
    pred, gt, fov = _drive_tree(tmp_path, keys=("01",))
    (pred / "manifest.json").write_text(json.dumps({"config": {"threshold": 0.25}}))
    r = _run(pred, gt, "--fov", fov, "--format", "json", "--bootstrap", "0")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["threshold"] == 0.25 and s["threshold_source"] == "manifest"
    assert (s["pooled"]["tp"], s["pooled"]["fn"], s["pooled"]["fp"]) == (100, 0, 12)
    r = _run(pred, gt, "--fov", fov, "--format", "json", "--threshold", "0.8", "--overwrite", "--bootstrap", "0")
    s = json.loads(r.stdout)
    assert s["threshold"] == 0.8 and s["threshold_source"] == "option"
    assert (s["pooled"]["tp"], s["pooled"]["fn"], s["pooled"]["fp"]) == (60, 40, 0)


def test_threshold_of_a_run_folder_is_its_segment_manifests(tmp_path):
    """A `fundus run` folder's manifest records no threshold; its segment/ folder's records the one its masks
    were written with, and that is the one to score at (was: 0.5)."""
    pred, gt, fov = _drive_tree(tmp_path, keys=("01", "02"))
    run = tmp_path / "run"
    (run / "segment").mkdir(parents=True)
    for f in pred.iterdir():
        f.rename(run / "segment" / f.name)
    (run / "manifest.json").write_text(json.dumps({"config": {"threshold": None}}))
    (run / "segment" / "manifest.json").write_text(json.dumps({"config": {"threshold": 0.25}}))
    r = _run(run, gt, "--fov", fov, "--format", "json", "--bootstrap", "0")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["threshold"] == 0.25 and s["threshold_source"] == "manifest segment/manifest.json"
    assert (s["pooled"]["tp"], s["pooled"]["fn"], s["pooled"]["fp"]) == (200, 0, 24)
    # two folders written with different thresholds: no single one to use
    (run / "other").mkdir()
    (run / "segment" / "02_test_prob.png").rename(run / "other" / "02_test_prob.png")
    (run / "segment" / "02_test_vessels.png").rename(run / "other" / "02_test_vessels.png")
    (run / "other" / "manifest.json").write_text(json.dumps({"config": {"threshold": 0.8}}))
    r = _run(run, gt, "--fov", fov, "--overwrite", "--bootstrap", "0")
    assert isinstance(r.exception, UsageError) and r.exception.exit_code == 2
    assert "give --threshold" in r.exception.message and "other: 0.8, segment: 0.25" in r.exception.message


def test_vessels_only_gives_null_auc(tmp_path):
    pred, gt, fov = _drive_tree(tmp_path, keys=("01",), prob=False)
    r = _run(pred, gt, "--fov", fov, "--format", "json", "--bootstrap", "20")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["prediction_source"] == ["mask"]
    assert s["pooled"]["auc_roc"] is None and s["mean"]["auc_pr"] is None
    assert (s["pooled"]["tp"], s["pooled"]["fp"], s["pooled"]["tn"], s["pooled"]["fn"]) == (60, 12, 288, 40)


def test_no_fov_means_whole_image(tmp_path):
    pred, gt, _ = _drive_tree(tmp_path, keys=("01",))
    r = _run(pred, gt, "--bootstrap", "0")
    assert r.exit_code == 0, r.output
    s = json.loads((pred / "eval" / "summary.json").read_text())
    assert "whole image" in s["fov"]
    p = s["pooled"]
    assert p["tp"] + p["fp"] + p["tn"] + p["fn"] == H * W
    assert (p["tp"], p["fn"]) == (60, 60)  # cols 12..23 of the GT rows are 0.3 -> missed
    assert "whole image" in r.stdout and "f1" in r.stdout


def test_hrf_naming_rgb_tiff_masks(tmp_path):
    p, g, f = _case()
    pred, gt, fov = tmp_path / "seg", tmp_path / "HRF" / "manual1", tmp_path / "HRF" / "mask"
    gt.mkdir(parents=True)
    fov.mkdir(parents=True)
    for k in ("01_h", "02_dr"):
        _png16(pred / f"{k}_prob.png", p)
        tifffile.imwrite(gt / f"{k}.tif", g)
        tifffile.imwrite(fov / f"{k}_mask.tif", np.repeat(f[..., None], 3, axis=2))
    r = _run(pred, gt, "--fov", fov, "--format", "json", "--bootstrap", "0")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["n_images"] == 2
    assert (s["pooled"]["tp"], s["pooled"]["fp"], s["pooled"]["tn"], s["pooled"]["fn"]) == (120, 24, 576, 80)


def test_palette_gt_vs_gt(tmp_path):
    """Second-observer style: palette GIFs (indices 0/1, grey 3/253) as predictions against L GIFs."""
    _, g, f = _case()
    obs2, obs1, mask = tmp_path / "2nd_manual", tmp_path / "1st_manual", tmp_path / "mask"
    b2 = g > 0
    b2[5, :4] = False  # 4 FN
    b2[0, :3] = True  # 3 FP
    _gif_palette(obs2 / "01_manual2.gif", b2)
    _gif_l(obs1 / "01_manual1.gif", g)
    _gif_l(mask / "01_test_mask.gif", f)
    r = _run(obs2, obs1, "--fov", mask, "--out", tmp_path / "ev", "--format", "json", "--bootstrap", "0")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["prediction_mode"] == "plain" and s["prediction_source"] == ["mask"]
    assert (s["pooled"]["tp"], s["pooled"]["fp"], s["pooled"]["fn"]) == (96, 3, 4)
    # palette as ground truth too: identical -> perfect
    r = _run(obs2, obs2, "--out", tmp_path / "ev2", "--format", "json", "--bootstrap", "0")
    s = json.loads(r.stdout)
    assert s["pooled"]["f1"] == 1.0 and s["pooled"]["tp"] == int(b2.sum())


def test_missing_pairs_exit_3(tmp_path):
    """A prediction without GT or without FOV mask is a problem (exit 3); GT without prediction is only counted."""
    pred, gt, fov = _drive_tree(tmp_path, keys=("01", "02", "03"))
    (gt / "1st_manual" / "03_manual1.gif").unlink()
    _gif_l(gt / "1st_manual" / "04_manual1.gif", _case()[1])
    (fov / "mask" / "02_test_mask.gif").unlink()
    r = _run(pred, gt, "--fov", fov, "--bootstrap", "0")
    assert r.exit_code == 3, r.output
    rows = {row["key"]: row for row in csv.DictReader((pred / "eval" / "metrics.csv").open())}
    assert set(rows) == {"01", "02", "03"}  # the GT-only key 04 is not a row
    assert rows["01"]["status"] == "ok"
    assert rows["02"]["status"] == "unpaired: no FOV mask"
    assert rows["03"]["status"] == "unpaired: no ground truth"
    s = json.loads((pred / "eval" / "summary.json").read_text())
    assert s["n_images"] == 1 and s["n_unpaired"] == 2 and s["pooled"]["tp"] == 60
    assert s["n_gt_without_prediction"] == 1 and s["gt_without_prediction"] == ["04"]
    assert [p["key"] for p in s["problems"]] == ["02", "03"]
    assert "warning: 03: unpaired: no ground truth" in r.stderr
    assert "warning: 02: unpaired: no FOV mask" in r.stderr
    assert "1 ground-truth image has no prediction (not scored)" in r.stderr
    assert "04" not in r.stderr


def test_subset_of_ground_truth_exit_0(tmp_path):
    """Predictions for 5 of 20 DRIVE-style GT images: the 5 are scored, one summary line, exit 0."""
    keys = [f"{i:02d}" for i in range(1, 21)]
    pred, gt, fov = _drive_tree(tmp_path, keys=keys)
    for k in keys[5:]:
        (pred / f"{k}_test_prob.png").unlink()
        (pred / f"{k}_test_vessels.png").unlink()
    r = _run(pred, gt / "1st_manual", "--fov", fov / "mask", "--bootstrap", "0", "--format", "json")
    assert r.exit_code == 0, (r.output, r.exception)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == ["15 ground-truth images have no prediction (not scored)"]
    s = json.loads(r.stdout)
    assert s["n_images"] == 5 and s["n_unpaired"] == 0 and s["n_errors"] == 0 and s["problems"] == []
    assert s["n_gt_without_prediction"] == 15 and s["gt_without_prediction"] == keys[5:]
    assert s["pooled"]["tp"] == 5 * 60 and s["pooled"]["fn"] == 5 * 40
    assert json.loads((pred / "eval" / "summary.json").read_text())["gt_without_prediction"] == keys[5:]
    rows = list(csv.DictReader((pred / "eval" / "metrics.csv").open()))
    assert [row["key"] for row in rows] == keys[:5] and all(row["status"] == "ok" for row in rows)
    md = (pred / "eval" / "summary.md").read_text()
    assert "ground truth without prediction (not scored): 15" in md
    # the human table says so too
    r = _run(pred, gt / "1st_manual", "--fov", fov / "mask", "--bootstrap", "0")
    assert r.exit_code == 0 and "15 ground truth without prediction" in r.stdout


def test_no_pairs_exit_2(tmp_path):
    pred, _, _ = _drive_tree(tmp_path, keys=("01",))
    other = tmp_path / "other"
    _gif_l(other / "09_manual1.gif", _case()[1])
    r = _run(pred, other)
    assert isinstance(r.exception, UsageError) and r.exception.exit_code == 2
    assert "no prediction" in r.exception.message and "\n" not in r.exception.message
    assert not (pred / "eval").exists()


def test_size_mismatch_is_an_error_row(tmp_path):
    pred, gt, fov = _drive_tree(tmp_path, keys=("01", "02"))
    _gif_l(gt / "1st_manual" / "02_manual1.gif", np.zeros((H + 4, W), np.uint8))
    r = _run(pred, gt, "--fov", fov, "--bootstrap", "0")
    assert r.exit_code == 3, r.output
    rows = {row["key"]: row for row in csv.DictReader((pred / "eval" / "metrics.csv").open())}
    assert rows["01"]["status"] == "ok"
    assert rows["02"]["status"].startswith("error: size mismatch")


def test_unreadable_file_is_an_error_row(tmp_path):
    pred, gt, fov = _drive_tree(tmp_path, keys=("01", "02"))
    (gt / "1st_manual" / "02_manual1.gif").write_bytes(b"not an image")
    r = _run(pred, gt, "--fov", fov, "--bootstrap", "0")
    assert r.exit_code == 3
    rows = {row["key"]: row for row in csv.DictReader((pred / "eval" / "metrics.csv").open())}
    assert rows["02"]["status"].startswith("error:")


def test_rerun_replaces_reports(tmp_path):
    """A second run replaces the three reports (one stderr line), keeps foreign files, leaves no temp files."""
    pred, gt, fov = _drive_tree(tmp_path, keys=("01",))
    r = _run(pred, gt, "--fov", fov, "--bootstrap", "0")
    assert r.exit_code == 0, r.output
    assert "replacing" not in r.stderr  # first run: nothing to replace
    out = pred / "eval"
    (out / "notes.txt").write_text("mine")
    (out / "summary.md").write_text("stale")
    r = _run(pred, gt, "--fov", fov, "--bootstrap", "0", "--threshold", "0.8")
    assert r.exit_code == 0, (r.output, r.exception)
    assert r.stderr.strip().splitlines() == [f"replacing the earlier reports in {out}"]
    assert json.loads((out / "summary.json").read_text())["threshold"] == 0.8
    assert (out / "summary.md").read_text().startswith("# Vessel segmentation evaluation")
    assert (out / "notes.txt").read_text() == "mine"
    assert {p.name for p in out.iterdir()} == {"metrics.csv", "summary.json", "summary.md", "notes.txt"}
    # --overwrite is still accepted (no effect); a non-empty foreign --out folder is fine too
    r = _run(pred, gt, "--fov", fov, "--bootstrap", "0", "--overwrite")
    assert r.exit_code == 0, r.output
    other = tmp_path / "other_out"
    other.mkdir()
    (other / "keep.png").write_bytes(b"x")
    r = _run(pred, gt, "--fov", fov, "--bootstrap", "0", "--out", other)
    assert r.exit_code == 0 and "replacing" not in r.stderr
    assert (other / "keep.png").read_bytes() == b"x" and (other / "summary.json").is_file()
    assert not [p for d in (out, other) for p in d.iterdir() if p.name.startswith(".")]  # no temp files left


def test_writes_reports_atomically(tmp_path, monkeypatch):
    import fundus_pipeline.io as fio

    pred, gt, fov = _drive_tree(tmp_path, keys=("01",))
    written = []
    real = fio.write_bytes_atomic
    monkeypatch.setattr(fio, "write_bytes_atomic", lambda path, data: (written.append(Path(path).name), real(path, data)))
    assert _run(pred, gt, "--fov", fov, "--bootstrap", "0").exit_code == 0
    assert sorted(written) == ["metrics.csv", "summary.json", "summary.md"]


def test_unusable_out_is_one_line_usage_error(tmp_path):
    pred, gt, fov = _drive_tree(tmp_path, keys=("01",))
    f = tmp_path / "a_file"
    f.write_text("x")
    r = _run(pred, gt, "--fov", fov, "--out", f)
    assert isinstance(r.exception, UsageError) and "not a folder" in r.exception.message
    blocked = tmp_path / "blocked"
    (blocked / "summary.json").mkdir(parents=True)
    r = _run(pred, gt, "--fov", fov, "--out", blocked)
    assert isinstance(r.exception, UsageError) and "\n" not in r.exception.message
    assert not (blocked / "metrics.csv").exists()  # refused before anything was written


def test_bootstrap_zero_has_no_ci(tmp_path):
    pred, gt, fov = _drive_tree(tmp_path, keys=("01", "02"))
    r = _run(pred, gt, "--fov", fov, "--bootstrap", "0")
    assert r.exit_code == 0, r.output
    assert "n/a, n/a" not in r.stdout and "95% CI" not in r.stdout
    header = next(ln for ln in r.stdout.splitlines() if ln.startswith("metric"))
    assert header.split() == ["metric", "pooled", "mean"]
    s = json.loads((pred / "eval" / "summary.json").read_text())
    assert "ci95" not in s and s["bootstrap"]["n"] == 0
    assert s["pooled"]["f1"] == pytest.approx(120 / 172)
    md = (pred / "eval" / "summary.md").read_text()
    assert "| metric | pooled | mean of images |" in md and "95% CI |" not in md and "n/a, n/a" not in md
    assert "- bootstrap: none" in md
    r = _run(pred, gt, "--fov", fov, "--bootstrap", "0", "--format", "json")
    assert "ci95" not in json.loads(r.stdout)
    # with resamples the CI columns are there
    r = _run(pred, gt, "--fov", fov, "--bootstrap", "20", "--out", tmp_path / "b")
    assert r.exit_code == 0 and "mean 95% CI" in r.stdout
    s = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert s["bootstrap"]["n"] == 20 and len(s["ci95"]["pooled"]["f1"]) == 2
    assert "| metric | pooled [95% CI] | mean of images | mean 95% CI |" in (tmp_path / "b" / "summary.md").read_text()


def _main(capsys, *args: str) -> tuple[int, str, str]:
    from fundus_pipeline.cli import main

    code = main(["evaluate", "segment", *[str(a) for a in args]])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_help_shows_defaults(capsys):
    code, out, _ = _main(capsys, "--help")
    assert code == 0
    flat = " ".join(out.split())
    assert "[default: PRED_DIR/eval]" in flat
    assert "[default: config.threshold of PRED_DIR/manifest.json, or of the nearest manifest above it" in flat and "else 0.5]" in flat
    assert "--threshold T" in flat and "0.0<=x<=1.0" in flat
    assert "--format <human|json>" in flat
    assert "<bool>" not in out  # --overwrite / --no-cldice are plain flags
    assert "--overwrite " in out and "compatibility" in flat


@pytest.mark.parametrize(
    "extra, needle",
    [
        (("--threshold", "1.5"), "--threshold"),
        (("--format", "xml"), "--format"),
        (("--bootstrap", "-1"), "--bootstrap"),
        (("--seed", "-1"), "--seed"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, capsys, extra, needle):
    pred, gt, fov = _drive_tree(tmp_path, keys=("01",))
    r = _run(pred, gt, "--fov", fov, *extra)
    assert r.exit_code == 2 and f"Invalid value for '{needle}" in r.output
    # through the real entry point: one "Error:" line, never a traceback, nothing written
    code, out, err = _main(capsys, pred, gt, "--fov", fov, *extra)
    assert code != 0 and "Traceback" not in err
    assert err.startswith("Error: ") and len([ln for ln in err.splitlines() if ln.startswith("Error")]) == 1
    assert not (pred / "eval").exists()


def test_missing_folders_are_one_line_errors(tmp_path, capsys):
    pred, gt, fov = _drive_tree(tmp_path, keys=("01",))
    for args in ((tmp_path / "nope", gt), (pred, tmp_path / "nope"), (pred, gt, "--fov", tmp_path / "nope")):
        code, _, err = _main(capsys, *args)
        assert code == 2 and "Traceback" not in err and "is not a folder" in err.splitlines()[0]
    other = tmp_path / "other"
    _gif_l(other / "09_manual1.gif", _case()[1])
    code, _, err = _main(capsys, pred, other)
    assert code == 2 and err.splitlines()[0].startswith("Error: no prediction") and "Traceback" not in err


def test_bootstrap_deterministic(tmp_path):
    """The same seed gives the same CIs, another seed other CIs (the images differ, so resamples do)."""
    pred, gt, fov = _drive_tree(tmp_path, keys=("01", "02", "03", "04"))
    p = _case()[0]
    for i, k in enumerate(("01", "02", "03", "04")):  # a different prediction per image
        _png16(pred / f"{k}_test_prob.png", np.clip(p * (0.55 + 0.3 * i), 0, 1))
        (pred / f"{k}_test_vessels.png").unlink()

    def ci(seed: int, out: str) -> dict:
        r = json.loads(_run(pred, gt, "--fov", fov, "--format", "json", "--bootstrap", "30", "--seed", str(seed), "--out", tmp_path / out).stdout)
        assert r["bootstrap"]["seed"] == seed
        return r["ci95"]

    a, b, c = ci(5, "a"), ci(5, "b"), ci(6, "c")
    assert a == b
    assert a["mean"]["f1"][0] < a["mean"]["f1"][1] and a["pooled"]["f1"][0] < a["pooled"]["f1"][1], a  # not degenerate
    assert a != c


def _data_root() -> Path:
    env = os.environ.get("FUNDUS_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.data
def test_drive_second_observer(tmp_path):
    test = _data_root() / "DRIVE" / "test"
    if not (test / "2nd_manual").is_dir():
        pytest.skip(f"DRIVE test set not found under {_data_root()} (set FUNDUS_DATA)")
    r = _run(test / "2nd_manual", test / "1st_manual", "--fov", test / "mask", "--out", tmp_path / "ev",
             "--format", "json", "--bootstrap", "100", "--no-cldice")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["n_images"] == 20
    assert s["pooled"]["accuracy"] == pytest.approx(0.947, abs=0.005)
    assert s["pooled"]["f1"] == pytest.approx(0.788, abs=0.01)
    assert s["mean"]["accuracy"] == pytest.approx(0.947, abs=0.005)
    assert s["mean"]["f1"] == pytest.approx(0.788, abs=0.01)


def test_inverted_palette_uses_displayed_grey(tmp_path):
    """A palette whose index 0 is white: the displayed grey decides (the raw-index rule would invert it)."""
    _, g, _ = _case()
    pal = tmp_path / "pal"
    pal.mkdir()
    im = Image.fromarray((g == 0).astype(np.uint8), mode="P")  # vessels -> index 0
    im.putpalette([255, 255, 255, 0, 0, 0] + [0, 0, 0] * 254)
    im.save(pal / "01_manual2.gif")
    ref = tmp_path / "ref"
    _gif_l(ref / "01_manual1.gif", g)
    r = _run(pal, ref, "--out", tmp_path / "ev", "--format", "json", "--bootstrap", "0")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["pooled"]["f1"] == 1.0
