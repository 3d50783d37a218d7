"""`fundus run` end to end with tiny registered models: the decisions (pure, and as the stages saw them),
the joined table, per-item errors and exit codes, the config file, replay byte for byte, resume after an
interruption and after a hard crash, the simulated mode with its full-reference figures, and
`fundus report`."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fundus_pipeline.chain import STAGE_DIRS, enhance_decision, segment_decision
from fundus_pipeline.cli import main
from fundus_pipeline.config import RunConfig
from fundus_pipeline.models.registry import build_model
from tests.conftest import synthetic_fundus

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def run(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("weights")
    out = {}
    for i, name in enumerate(("hemf_tiny", "cofe_tiny", "sdmp_tiny", "imff_tiny")):
        torch.manual_seed(i)
        out[name] = d / f"{name}.pt"
        torch.save(build_model(name).state_dict(), out[name])
    return out


def tiny_args(tiny, *extra) -> tuple:
    return (
        "--grade-weights", tiny["hemf_tiny"], "--grade-arch", "hemf_tiny", "--enhance-weights", tiny["cofe_tiny"], "--enhance-arch", "cofe_tiny",
        "--score-weights", tiny["sdmp_tiny"], "--score-arch", "sdmp_tiny", "--segment-weights", tiny["imff_tiny"], "--segment-arch", "imff_tiny",
        "--device", "cpu", "--quiet", "--thumbnail", "64", *extra,
    )  # fmt: skip


@pytest.fixture()
def photos(tmp_path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    for i, (h, w) in enumerate(((96, 112), (80, 80), (88, 96))):
        Image.fromarray(synthetic_fundus(h, w, i)).save(d / f"p{i}.png")
    return d


def rows_of(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {r["key"]: r for r in csv.DictReader(f)}


def output_bytes(out: Path) -> dict[str, bytes]:
    """Every file a run promises to reproduce: images, the joined table, the report (not the manifests,
    which hold times, nor the stages' own results.csv, which hold seconds)."""
    files = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_file() and (p.suffix == ".png" or rel in ("results.csv", "report.html")):
            files[rel] = p.read_bytes()
    return files


# ----------------------------------------------------------------------------------------- decisions
def test_enhance_decision_follows_the_grade():
    cfg = RunConfig()
    assert enhance_decision(cfg, {"status": "ok", "grade": "usable", "p_usable": 0.7})[0]
    assert enhance_decision(cfg, {"status": "ok", "grade": "reject", "p_reject": 0.9})[0]
    keep, why = enhance_decision(cfg, {"status": "ok", "grade": "good", "p_good": 0.8})
    assert not keep and "passed through" in why and "0.80" in why
    assert not enhance_decision(cfg, {"status": "error", "error": "x"})[0]
    assert enhance_decision(RunConfig(enhance_if="good"), {"status": "ok", "grade": "good", "p_good": 0.8})[0]
    assert enhance_decision(RunConfig(steps="enhance,segment"), None) == (True, "no grade step: every photograph is enhanced")
    assert not enhance_decision(RunConfig(steps="grade,segment"), {"status": "ok", "grade": "reject", "p_reject": 1})[0]


def test_segment_decision_trusts_an_enhancement_only_when_it_scores_above_its_input():
    cfg = RunConfig(min_gain=0.02, min_score=0.3)
    ok = {"status": "ok"}
    s = lambda v, vi: {"status": "ok", "score": v, "score_input": vi}  # noqa: E731
    assert segment_decision(cfg, False, None, None)[0] == "input"
    assert segment_decision(cfg, True, {"status": "error"}, None)[0] == "input"
    assert segment_decision(cfg, True, ok, s(0.6, 0.5))[0] == "enhanced"
    src, why = segment_decision(cfg, True, ok, s(0.51, 0.5))
    assert src == "input" and "min-gain" in why and "+0.010" in why
    assert segment_decision(cfg, True, ok, s(0.25, 0.1))[0] == "input"  # gain 0.15 but below min-score
    assert segment_decision(cfg, True, ok, {"status": "error"})[0] == "input"
    assert segment_decision(RunConfig(steps="grade,enhance,segment"), True, ok, None)[0] == "enhanced"


def test_config_validation():
    with pytest.raises(Exception, match="needs the enhance step"):
        RunConfig.build(steps="grade,score")
    with pytest.raises(Exception, match="enhance-if"):
        RunConfig.build(enhance_if="good,bad")
    assert RunConfig.build(steps="segment,grade").steps == ["grade", "segment"]
    assert RunConfig.build(simulate="010,001").simulate == "001,010"
    assert RunConfig.build(simulate="severe").simulate_options() == {"types": None, "recipe": "severe"}


# ----------------------------------------------------------------------------------------- end to end
def test_chain_writes_stage_folders_and_a_joined_table_with_its_decisions(photos, tmp_path, tiny):
    (photos / "broken.png").write_text("not an image")
    out = tmp_path / "out"
    assert run("run", photos, out, *tiny_args(tiny, "--enhance-if", "good,usable,reject", "--min-gain", "-1")) == 3
    for name in ("grade", "enhance", "score", "segment"):
        assert (out / name / "manifest.json").is_file() and (out / name / "results.csv").is_file(), name
    rows = rows_of(out / "results.csv")
    assert set(rows) == {"p0", "p1", "p2", "broken"}
    b = rows.pop("broken")
    assert b["status"] == "error" and b["error"].startswith("grade, segment: ") and b["enhanced"] == "no"
    seg = rows_of(out / "segment" / "results.csv")
    for key, r in rows.items():
        assert r["status"] == "ok" and r["grade"] in ("good", "usable", "reject") and r["enhanced"] == "yes", r
        assert r["enhanced_image"] == f"enhance/{key}.png" and (out / r["enhanced_image"]).is_file()
        assert abs(float(r["score_gain"]) - (float(r["score"]) - float(r["score_input"]))) < 2e-6
        # min-gain -1: every scored enhancement is trusted, and the segment stage really read it
        assert r["segmented"] == "enhanced" and "enhanced image is segmented" in r["segment_reason"]
        assert Path(seg[key]["input"]).resolve() == (out / "enhance" / f"{key}.png").resolve()
        assert r["vessels_image"] == f"segment/{key}_vessels.png" and (out / r["vessels_image"]).is_file()
        assert r["vessel_fraction"] == seg[key]["vessel_fraction"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["stage"] == "run" and m["status"] == "finished" and set(m["weights"]) == {"grade", "enhance", "score", "segment"}
    assert m["counts"]["error"] == 1 and m["counts"]["enhanced"] == 3
    # each input's sha256, hashed by the grader's worker from the bytes it read (the broken file too)
    assert m["inputs_sha256"] == {k: hashlib.sha256((photos / f"{k}.png").read_bytes()).hexdigest() for k in ("p0", "p1", "p2", "broken")}
    assert [r["key"] for r in m["items"]] == ["broken", "p0", "p1", "p2"] and [p["key"] for p in m["plan"]] == ["broken", "p0", "p1", "p2"]
    html = (out / "report.html").read_text()
    assert html.count('<tr data-grade=') == 4 and "data:image/jpeg;base64," in html and "http://" not in html and "https://" not in html

    # min-gain 1 (no enhancement can gain that much): the inputs are segmented, the reason says why
    out2 = tmp_path / "out2"
    assert run("run", photos, out2, *tiny_args(tiny, "--enhance-if", "good,usable,reject", "--min-gain", "1")) == 3
    seg2 = rows_of(out2 / "segment" / "results.csv")
    for key, r in rows_of(out2 / "results.csv").items():
        if key != "broken":
            assert r["segmented"] == "input" and "not trusted" in r["segment_reason"]
            assert Path(seg2[key]["input"]).resolve() == (photos / f"{key}.png").resolve()


def test_inputs_given_relative_to_the_working_folder_keep_their_thumbnails(photos, tmp_path, tiny, monkeypatch):
    """The quick start's form (`fundus run demo out`): `input` is recorded absolute, so the report finds
    every input (its thumbnail and vessel overlay), and `fundus report` and `--replay` work from any folder."""
    monkeypatch.chdir(tmp_path)
    assert run("run", "in", "out", *tiny_args(tiny, "--enhance-if", "reject")) == 0
    out = tmp_path / "out"
    rows = rows_of(out / "results.csv")
    assert {r["input"] for r in rows.values()} == {str(photos / f"{k}.png") for k in ("p0", "p1", "p2")}
    html = (out / "report.html").read_text()
    enhanced = sum(r["enhanced"] == "yes" for r in rows.values())
    assert html.count('src="data:image/jpeg;base64,') == 2 * len(rows) + enhanced  # input + vessels each, + enhanced
    monkeypatch.chdir(photos)
    (out / "report.html").unlink()
    assert run("report", out) == 0 and (out / "report.html").read_text() == html
    # the manifest names the input folder absolute: a replay from another folder finds the same files
    assert json.loads((out / "manifest.json").read_text())["input"]["path"] == str(photos)
    assert run("run", "--replay", out / "manifest.json", tmp_path / "again", "--quiet") == 0
    assert output_bytes(tmp_path / "again") == output_bytes(out)


def test_only_the_grades_named_are_enhanced(photos, tmp_path, tiny, monkeypatch):
    """The tiny grader grades every photograph alike, so the grades are pinned per photograph (p0 reject, p1
    usable, p2 good): both sides of the rule are exercised."""
    from fundus_pipeline.stages.grade import GradeStage

    pinned = {"p0": [0.1, 0.2, 0.7], "p1": [0.2, 0.7, 0.1], "p2": [0.8, 0.1, 0.1]}  # good, usable, reject
    fields = GradeStage.fields
    monkeypatch.setattr(GradeStage, "fields", lambda self, item, pg, pf: fields(self, item, np.array(pinned[item.key]), pf))
    out = tmp_path / "out"
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade,enhance", "--enhance-if", "usable,reject")) == 0
    rows = rows_of(out / "results.csv")
    assert {k: r["grade"] for k, r in rows.items()} == {"p0": "reject", "p1": "usable", "p2": "good"}
    enhanced = rows_of(out / "enhance" / "results.csv")
    assert sorted(enhanced) == ["p0", "p1"]
    for key, r in rows.items():
        assert (r["enhanced"] == "yes") == (r["grade"] in ("usable", "reject")) == (key in enhanced)
        assert r["segmented"] == "none" and r["vessels_image"] == ""
    assert not (out / "segment").exists() and not (out / "score").exists()


def test_replay_reproduces_the_run_byte_for_byte_and_report_rebuilds(photos, tmp_path, tiny):
    out, again = tmp_path / "out", tmp_path / "again"
    assert run("run", photos, out, *tiny_args(tiny, "--enhance-if", "good,usable,reject")) == 0
    assert run("run", "--replay", out / "manifest.json", again, "--quiet") == 0
    a, b = output_bytes(out), output_bytes(again)
    assert len(a) == 3 * 3 + 2 and a == b  # enhanced, vessels, prob per photograph
    # the report is rebuilt from the folders alone, identically
    (out / "report.html").unlink()
    assert run("report", out) == 0
    assert (out / "report.html").read_bytes() == a["report.html"]
    # a run killed while running (its manifest says so, without a plan yet): the report is not rebuilt empty
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**m, "status": "running", "plan": []}))
    assert run("report", out) == 2 and (out / "report.html").read_bytes() == a["report.html"]
    (out / "manifest.json").write_text(json.dumps(m))
    # replay refuses changed inputs and extra options
    Image.fromarray(synthetic_fundus(80, 80, 9)).save(photos / "p1.png")
    assert run("run", "--replay", out / "manifest.json", tmp_path / "x") == 2
    assert run("run", "--replay", out / "manifest.json", tmp_path / "y", "--min-gain", "0.1") == 2


def ctrl_c_at_second_item(monkeypatch, stage_cls) -> None:
    """``stage_cls.compute`` raises KeyboardInterrupt on its second call (monkeypatch.undo restores it)."""
    real, calls = stage_cls.compute, {"n": 0}

    def interrupt_second(self, item):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, item)

    monkeypatch.setattr(stage_cls, "compute", interrupt_second)


def test_resume_after_an_interruption_and_after_a_crash_is_byte_identical(photos, tmp_path, tiny, monkeypatch):
    ref = tmp_path / "ref"
    args = tiny_args(tiny, "--enhance-if", "good,usable,reject")
    assert run("run", photos, ref, *args) == 0
    expected = output_bytes(ref)

    # Ctrl-C in the middle of the segment step (the runner records the interruption, the chain stops)
    from fundus_pipeline.stages.segment import SegmentStage

    ctrl_c_at_second_item(monkeypatch, SegmentStage)
    out = tmp_path / "out"
    assert run("run", photos, out, *args) == 130
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
    assert rows_of(out / "results.csv")["p2"]["status"] == "pending"
    monkeypatch.undo()
    assert run("run", photos, out, *args) == 2  # not empty: needs --resume
    assert run("run", photos, out, *args, "--resume") == 0
    assert output_bytes(out) == expected

    # Ctrl-C in the enhance step: the photographs not reached yet are pending, not failed, and undecided
    from fundus_pipeline.stages.enhance import EnhanceStage

    ctrl_c_at_second_item(monkeypatch, EnhanceStage)
    stopped = tmp_path / "stopped"
    assert run("run", photos, stopped, *args) == 130
    pending = [r for r in rows_of(stopped / "results.csv").values() if r["status"] == "pending"]
    assert pending and all(r["error"] == "" for r in pending)
    for r in pending:
        if not r["enhanced_image"]:
            assert r["enhance_reason"].endswith("(not run yet: the run stopped before)") and r["segmented"] == "", r
            assert r["segment_reason"].startswith("not decided: the run stopped before"), r
    assert "failed</div>" not in (stopped / "report.html").read_text()
    monkeypatch.undo()
    assert run("run", photos, stopped, *args, "--resume") == 0
    assert output_bytes(stopped) == expected

    # Ctrl-C while the simulator degrades: the photographs it had not reached are pending rows, in the
    # run's own report and in the one `fundus report` rebuilds
    from fundus_pipeline.stages.degrade import DegradeStage

    ctrl_c_at_second_item(monkeypatch, DegradeStage)
    sim = tmp_path / "sim"
    assert run("run", photos, sim, *args, "--simulate", "001,010", "--workers", "1") == 130
    with open(sim / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len({r["key"] for r in table}) == len(table) == 6 and all(r["status"] == "pending" for r in table)
    assert sorted(r["key"] for r in table if r["clean_key"] != "p0") == ["p1_001", "p1_010", "p2_001", "p2_010"]
    own = (sim / "report.html").read_bytes()
    (sim / "report.html").unlink()
    assert run("report", sim) == 0 and (sim / "report.html").read_bytes() == own

    # a hard crash (the process exits at once, nothing is flushed or cleaned) in the enhance step
    crashed = tmp_path / "crashed"
    code = (
        "import os, sys\n"
        "from fundus_pipeline.stages.enhance import EnhanceStage\n"
        "real = EnhanceStage.compute\n"
        "n = [0]\n"
        "def crash(self, item):\n"
        "    n[0] += 1\n"
        "    if n[0] == 2: os._exit(9)\n"
        "    return real(self, item)\n"
        "EnhanceStage.compute = crash\n"
        "from fundus_pipeline.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code, "run", str(photos), str(crashed), *map(str, args)], env=env, capture_output=True, timeout=300)
    assert r.returncode == 9, r.stderr.decode()[-2000:]
    assert (crashed / "manifest.json").is_file() and not (crashed / "results.csv").exists()
    assert run("run", photos, crashed, *args, "--resume") == 0
    assert output_bytes(crashed) == expected


def test_resume_refuses_another_configuration(photos, tmp_path, tiny):
    out = tmp_path / "out"
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade")) == 0
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade", "--flag-threshold", "0.3"), "--resume") == 2
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade"), "--resume") == 0
    # resuming checks each input once (the chain before its first stage; that stage does not again)
    import fundus_pipeline.chain as chain_mod
    import fundus_pipeline.runner as runner_mod

    checked = []

    def counting(row, *args, real=runner_mod.input_state):
        checked.append(row["key"])
        return real(row, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner_mod, "input_state", counting)
        mp.setattr(chain_mod, "input_state", counting)
        assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade"), "--resume") == 0
    assert sorted(checked) == ["p0", "p1", "p2"]
    # an input changed since the run started: resuming would mix two versions
    Image.fromarray(synthetic_fundus(80, 80, 7)).save(photos / "p1.png")
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade"), "--resume") == 2
    # ... unless it is no longer an input: it drops out of the table (was refused as 'changed')
    (photos / "p1.png").rename(tmp_path / "p1.png")
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade"), "--resume") == 0
    assert set(rows_of(out / "results.csv")) == {"p0", "p2"}
    (tmp_path / "p1.png").rename(photos / "p1.png")
    # --overwrite replaces the run's own folders
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade,segment"), "--overwrite") == 0
    assert (out / "segment").is_dir() and set(rows_of(out / "results.csv")) == {"p0", "p1", "p2"}


def test_config_file_and_command_line_override(photos, tmp_path, tiny, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text('steps = ["grade", "enhance"]\nenhance_if = "good,usable,reject"\nmin_gain = 0.05\n')
    out = tmp_path / "out"
    assert run("run", photos, out, "--config", cfg, *tiny_args(tiny, "--enhance-if", "reject")) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["steps"] == ["grade", "enhance"] and m["config"]["enhance_if"] == ["reject"] and m["config"]["min_gain"] == 0.05
    capsys.readouterr()
    cfg.write_text("min_gian = 0.1\n")
    assert run("run", photos, tmp_path / "o2", "--config", cfg) == 2
    assert "unknown key 'min_gian'" in capsys.readouterr().err
    cfg.write_text("min_gain = [\n")
    assert run("run", photos, tmp_path / "o3", "--config", cfg) == 2
    cfg.write_text("min_gain = 7\n")
    assert run("run", photos, tmp_path / "o4", "--config", cfg) == 2
    assert f"invalid --config {cfg}: min_gain 7:" in capsys.readouterr().err  # the file and its key are named
    # TOML values have types: a value of another type is refused, not converted (were: 1 worker, 1.0, True)
    for text, key in (("workers = true", "workers"), ("min_gain = true", "min_gain"), ('keep_outside = "yes"', "keep_outside"),
                      ('seed = "3"', "seed"), ("ground_truth = 5", "ground_truth")):
        cfg.write_text(text + "\n")
        assert run("run", photos, tmp_path / "o5", "--config", cfg) == 2, text
        err = capsys.readouterr().err.strip()
        assert f"invalid --config {cfg}: {key}" in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "o5").exists()
    cfg.write_bytes(b'\xef\xbb\xbfsteps = ["grade", "enhance"]\nenhance_if = "good,usable,reject"\nmin_gain = 0.05\nseed = 0\n')
    assert run("run", photos, tmp_path / "o6", "--config", cfg, *tiny_args(tiny)) == 0  # a byte-order mark is allowed


def test_correction_sigma_reaches_the_enhance_stage_from_the_file_and_the_command_line(photos, tmp_path, tiny):
    cfg = tmp_path / "run.toml"
    cfg.write_text('steps = ["grade", "enhance"]\nenhance_if = "good,usable,reject"\ncorrection_sigma = 4.0\n')
    for extra, want in (((), 4.0), (("--correction-sigma", "2"), 2.0)):
        out = tmp_path / f"out{want:g}"
        assert run("run", photos, out, "--config", cfg, *tiny_args(tiny, *extra)) == 0
        assert json.loads((out / "manifest.json").read_text())["config"]["correction_sigma"] == want
        assert json.loads((out / "enhance" / "manifest.json").read_text())["config"]["correction_sigma"] == want


def test_bad_invocations_exit_2_or_1_with_one_line(photos, tmp_path, tiny, capsys):
    t = tiny_args(tiny)
    assert run("run", tmp_path / "missing", tmp_path / "o", *t) == 2
    assert run("run", photos, photos / "inside", *t) == 2
    assert run("run", photos, tmp_path / "o", *t, "--ground-truth", tmp_path) == 2  # needs --simulate
    assert run("run", photos, tmp_path / "o", *t, "--steps", "grade,score") == 2
    assert run("run", photos, tmp_path / "o", *t, "--simulate", "no-such-recipe") == 2
    assert run("run", photos, tmp_path / "o", "--grade-weights", "nonexistent", "--quiet") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "grade step: weights not found" in err
    assert not (tmp_path / "o").exists()  # nothing was created by a refused run


def test_simulated_run_measures_what_the_restoration_bought(tmp_path, tiny):
    clean, truth = tmp_path / "clean", tmp_path / "truth"
    clean.mkdir()
    truth.mkdir()
    for i in range(2):
        img = synthetic_fundus(96, 96, i)
        Image.fromarray(img).save(clean / f"{i:02d}_test.png")
        vessels = (img[..., 1] < 0.6 * img[..., 1][img.max(2) > 20].mean()) & (img.max(2) > 20)
        Image.fromarray(vessels.astype(np.uint8) * 255).save(truth / f"{i:02d}_manual1.png")
    out = tmp_path / "out"
    args = tiny_args(tiny, "--simulate", "001,100", "--seed", "3", "--ground-truth", truth, "--enhance-if", "good,usable,reject", "--min-gain", "-1")
    assert run("run", clean, out, *args) == 0
    rows = rows_of(out / "results.csv")
    assert set(rows) == {"00_test_001", "00_test_100", "01_test_001", "01_test_100"}
    for key, r in rows.items():
        assert r["clean_key"] == key[:7] and r["degradation"] == key[-3:] and r["input"].endswith(f"degrade/{key}.png")
        for col in ("psnr_before", "psnr_after", "ssim_before", "ssim_after", "f1_before", "f1_after", "f1_gt_before", "f1_gt_after"):
            assert np.isfinite(float(r[col])), (key, col)
        if r["degradation"] == "001":  # illumination changes every pixel (a blur can be a no-op on a 96-px image)
            assert float(r["psnr_before"]) < 40 and float(r["ssim_before"]) < 0.99
    assert (out / "segment_clean" / "00_test_vessels.png").is_file() and (out / "segment_input" / "00_test_001_vessels.png").is_file()
    html = (out / "report.html").read_text()
    assert 'id="by-degradation"' in html and ">001<" in html and ">100<" in html
    # the simulator's parameters replay exactly
    again = tmp_path / "again"
    assert run("run", "--replay", out / "manifest.json", again, "--quiet") == 0
    assert output_bytes(again) == output_bytes(out)
    # other annotations are another configuration: a resume with them is refused, never mixed in
    other = tmp_path / "truth2"
    other.mkdir()
    for p in truth.iterdir():
        (other / p.name).write_bytes(p.read_bytes())
    assert run("run", clean, out, *tiny_args(tiny, "--simulate", "001,100", "--seed", "3", "--ground-truth", other, "--enhance-if",
                                           "good,usable,reject", "--min-gain", "-1", "--resume")) == 2
    # a moved output folder still finds its own degraded images: its report rebuilds the same page
    moved = tmp_path / "moved"
    out.rename(moved)
    (moved / "report.html").rename(tmp_path / "report_before.html")
    assert run("report", moved) == 0 and (moved / "report.html").read_bytes() == (tmp_path / "report_before.html").read_bytes()


def test_a_photograph_the_simulator_cannot_read_gives_an_error_row_per_type_with_keys_that_never_collide(tmp_path, tiny):
    clean = tmp_path / "clean"
    clean.mkdir()
    Image.fromarray(synthetic_fundus(80, 80, 0)).save(clean / "p.png")
    (clean / "p_001.png").write_text("not an image")  # its error rows must not take the key of p's 001 version
    out = tmp_path / "out"
    assert run("run", clean, out, *tiny_args(tiny, "--simulate", "001,010", "--steps", "grade")) == 3
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["key"] for r in rows) == ["p_001", "p_001_001", "p_001_010", "p_010"]
    for r in rows:
        assert (r["status"] == "error") == (r["clean_key"] == "p_001"), r
        assert r["degradation"] == r["key"][-3:] and (r["status"] == "ok" or r["error"].startswith("degrade: "))


def test_stage_folders_match_the_stage_commands(photos, tmp_path, tiny):
    """OUT/grade is what `fundus grade` writes for the same inputs and weights (same rows, same columns)."""
    out, alone = tmp_path / "out", tmp_path / "alone"
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade")) == 0
    assert run("grade", photos, alone, "--weights", tiny["hemf_tiny"], "--arch", "hemf_tiny", "--device", "cpu", "--quiet") == 0
    a, b = rows_of(out / "grade" / "results.csv"), rows_of(alone / "results.csv")
    strip = lambda rows: {k: {c: v for c, v in r.items() if c != "seconds"} for k, r in rows.items()}  # noqa: E731
    assert strip(a) == strip(b)
    assert set(STAGE_DIRS) >= {"grade", "enhance", "score", "segment"}


def test_example_config_is_valid_and_the_clinic_script_processes_and_resumes(tmp_path, tiny):
    from fundus_pipeline.cli.run import build_config

    cfg, _ = build_config(ROOT / "examples" / "run.toml", {})
    assert cfg.steps == ["grade", "enhance", "score", "segment"] and cfg.workers == 2
    site = tmp_path / "site.toml"
    site.write_text(
        f'grade_weights = "{tiny["hemf_tiny"]}"\ngrade_arch = "hemf_tiny"\nenhance_weights = "{tiny["cofe_tiny"]}"\nenhance_arch = "cofe_tiny"\n'
        f'score_weights = "{tiny["sdmp_tiny"]}"\nscore_arch = "sdmp_tiny"\nsegment_weights = "{tiny["imff_tiny"]}"\nsegment_arch = "imff_tiny"\n'
        'device = "cpu"\nthumbnail = 64\nenhance_if = ["good", "usable", "reject"]\n'
    )
    week = tmp_path / "week"
    for c, n in (("clinic_a", 2), ("clinic_b", 1)):
        (week / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(synthetic_fundus(80, 80, i)).save(week / c / f"{i}.png")
    script = ROOT / "examples" / "clinics.sh"
    r = subprocess.run(["bash", str(script), str(week), str(tmp_path / "res"), str(site)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "clinic_a: ok" in r.stdout and "clinic_b: ok" in r.stdout
    assert len(rows_of(tmp_path / "res" / "clinic_a" / "results.csv")) == 2 and (tmp_path / "res" / "clinic_b" / "report.html").is_file()
    before = output_bytes(tmp_path / "res" / "clinic_a")
    r = subprocess.run(["bash", str(script), str(week), str(tmp_path / "res"), str(site)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.count(": ok") == 2, r.stdout + r.stderr  # resumed: nothing to do, same bytes
    assert output_bytes(tmp_path / "res" / "clinic_a") == before

    # campaign 14a E1, E2, E8: a photograph that arrives later is processed on the next run (it was skipped
    # with the clinic, "already finished"); a clinic without photographs is said and skipped; the exit status
    # is the most serious clinic's (a clinic that ended on an error, then one with failed photographs)
    Image.fromarray(synthetic_fundus(80, 80, 5)).save(week / "clinic_a" / "late.png")
    (week / "clinic_empty").mkdir()
    (week / "clinic_c").mkdir()
    (week / "clinic_c" / "broken.png").write_bytes(b"not an image")
    Image.fromarray(synthetic_fundus(80, 80, 6)).save(week / "clinic_c" / "ok.png")
    (week / "clinic_d").mkdir()
    (week / "clinic_d" / "notes.txt").write_text("no photograph here")  # review 15: not a photograph, so said and skipped
    (week / "clinic_d" / ".DS_Store").write_bytes(b"\0")
    (week / "clinic_e").mkdir()
    (week / "clinic_e" / "bad.png").write_bytes(b"")  # a photograph fundus cannot read: exit 3
    (week / "clinic_l").mkdir()
    (week / "clinic_l" / "0.png").symlink_to(week / "clinic_b" / "0.png")  # review 15: a link is a photograph
    r = subprocess.run(["bash", str(script), str(week), str(tmp_path / "res"), str(site)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "late" in rows_of(tmp_path / "res" / "clinic_a" / "results.csv")
    assert "clinic_empty: no photographs" in r.stdout and "clinic_c: finished, some photographs failed" in r.stdout
    assert "clinic_d: no photographs" in r.stdout and "clinic_l: ok" in r.stdout
    assert len(r.stdout.strip().splitlines()) == 7  # one line per clinic
    site.write_text(site.read_text() + 'steps = ["grade", "score"]\n')  # a site configuration fundus refuses: exit 2
    r = subprocess.run(["bash", str(script), str(week), str(tmp_path / "res2"), str(site)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "clinic_a: fundus run exited 2" in r.stdout, r.stdout + r.stderr  # the most serious status wins


def test_workers_do_not_change_the_outputs(photos, tmp_path, tiny):
    """--workers 2 (one pool of worker processes kept across the stages) writes the bytes of --workers 1."""
    (photos / "broken.png").write_text("not an image")
    a, b = tmp_path / "a", tmp_path / "b"
    args = tiny_args(tiny, "--enhance-if", "good,usable,reject", "--threads", "1")
    assert run("run", photos, a, *args) == 3
    assert run("run", photos, b, *args, "--workers", "2") == 3
    assert output_bytes(a) == output_bytes(b)


def test_the_input_scored_against_itself_in_the_same_pass_equals_a_separate_call():
    from fundus_pipeline.quality.scoring import predict_pair

    torch.manual_seed(0)
    m = build_model("sdmp_tiny").eval()
    rng = np.random.default_rng(0)
    e, r = (rng.random((448, 448, 3), dtype=np.float32) for _ in range(2))
    pair, own = predict_pair(m, e, r, identity=True)
    assert pair == predict_pair(m, e, r) and own == predict_pair(m, r, r) and pair != own


def test_grade_batches_give_the_grades_of_one_at_a_time(photos, tmp_path, tiny):
    (photos / "broken.png").write_text("not an image")
    for i in range(3, 6):
        Image.fromarray(synthetic_fundus(90, 90, i)).save(photos / f"p{i}.png")
    w = ("--weights", tiny["hemf_tiny"], "--arch", "hemf_tiny", "--device", "cpu", "--quiet", "--threads", "1")
    assert run("grade", photos, tmp_path / "one", *w) == 3
    assert run("grade", photos, tmp_path / "four", *w, "--batch-size", "4") == 3
    a, b = rows_of(tmp_path / "one" / "results.csv"), rows_of(tmp_path / "four" / "results.csv")
    assert set(a) == set(b) and b["broken"]["status"] == "error"
    for key in a:
        if key != "broken":
            assert a[key]["grade"] == b[key]["grade"] and a[key]["flags"] == b[key]["flags"]
            for col in ("p_good", "p_usable", "p_reject", "p_blur"):
                assert abs(float(a[key][col]) - float(b[key][col])) <= 1e-5, (key, col)
    assert run("grade", photos, tmp_path / "bad", *w, "--batch-size", "0") == 2


def test_score_batches_give_the_scores_of_one_at_a_time(photos, tmp_path, tiny):
    w = ("--weights", tiny["sdmp_tiny"], "--arch", "sdmp_tiny", "--device", "cpu", "--quiet", "--threads", "1", "--input-score")
    assert run("score", photos, tmp_path / "one", "--reference", photos, *w) == 0
    assert run("score", photos, tmp_path / "three", "--reference", photos, *w, "--batch-size", "3") == 0
    a, b = rows_of(tmp_path / "one" / "results.csv"), rows_of(tmp_path / "three" / "results.csv")
    assert set(a) == set(b) == {"p0", "p1", "p2"}
    for key in a:
        for col in ("score", "score_spread", "score_input", "score_input_spread"):
            assert abs(float(a[key][col]) - float(b[key][col])) <= 1e-5, (key, col)


def test_a_long_report_is_split_into_pages_and_a_shorter_one_removes_them(photos, tmp_path, tiny, monkeypatch):
    import fundus_pipeline.report as report

    out = tmp_path / "out"
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade,segment", "--quiet")) == 0
    monkeypatch.setattr(report, "PAGE_ROWS", 2)  # 1,000 in a real run
    assert run("report", out) == 0
    one, two = (out / "report.html").read_text(), (out / "report-2.html").read_text()
    assert one.count("<tr data-grade=") == 2 and two.count("<tr data-grade=") == 1
    assert 'href="report-2.html"' in one and 'href="report.html"' in two
    assert "Photographs 1&ndash;2 of 3, page 1 of 2" in one and "Photographs 3&ndash;3 of 3, page 2 of 2" in two
    for page in (one, two):  # each page carries the whole run's figures
        assert '<div class="big" id="n-total">3</div>' in page
    monkeypatch.setattr(report, "PAGE_ROWS", 1000)
    assert run("report", out) == 0
    assert not (out / "report-2.html").exists() and (out / "report.html").read_text().count("<tr data-grade=") == 3
    assert "page 1 of" not in (out / "report.html").read_text()
