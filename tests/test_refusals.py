"""Refusals found by the second bad-input campaign (2026-12-02): `fundus run --replay` checks the weights and
the whole manifest, corrupt weights are refused when loaded, option errors name the option and the value,
`fundus score` keeps its output out of --reference, `fundus sample` refuses what is in its way, and a
refused --overwrite leaves the folder exactly as it was (no lock file, nothing removed)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from fundus_pipeline.config import RunConfig
from fundus_pipeline.errors import UsageError
from tests.test_run import output_bytes, photos, rows_of, run, tiny, tiny_args  # noqa: F401  (fixtures)

torch.set_num_threads(1)


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    return err


def _listing(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(d.rglob("*"))}


# ------------------------------------------------------------------------------------- replay
def test_replay_checks_the_weights_and_every_field_of_the_manifest(photos, tmp_path, tiny, capsys):  # noqa: F811
    w = tmp_path / "grader.pt"
    shutil.copy(tiny["hemf_tiny"], w)
    out = tmp_path / "out"
    args = ("--steps", "grade", "--grade-weights", w, "--grade-arch", "hemf_tiny", "--device", "cpu", "--quiet", "--no-report")
    assert run("run", photos, out, *args) == 0
    expected = rows_of(out / "results.csv")

    # a copy of the manifest under another name, and the run folder itself, both replay
    copy = tmp_path / "kept-run.json"
    shutil.copy(out / "manifest.json", copy)
    assert run("run", "--replay", copy, tmp_path / "again1", "--quiet") == 0
    assert run("run", "--replay", out, tmp_path / "again2", "--quiet") == 0
    assert rows_of(tmp_path / "again1" / "results.csv") == rows_of(tmp_path / "again2" / "results.csv") == expected
    capsys.readouterr()

    # other weights under the same file name: refused before any work
    sd = torch.load(w, weights_only=True)
    name = next(k for k, v in sd.items() if v.is_floating_point())
    sd[name] = sd[name] + 0.01
    torch.save(sd, w)
    assert run("run", "--replay", copy, tmp_path / "changed") == 2
    assert "grade step's weights" in _err(capsys) and not (tmp_path / "changed").exists()
    shutil.copy(tiny["hemf_tiny"], w)

    good = json.loads(copy.read_text())
    cases = {
        "input": ("x", "invalid run manifest (input 'x': Input should be"),
        "output": (None, "invalid run manifest (output: Field required)"),
        "inputs_sha256": (["a"], "invalid run manifest (inputs_sha256: Input should be a valid dictionary)"),
        "config": (None, "invalid run manifest (config: Input should be a valid dictionary)"),
        "schema_version": (999, "schema_version 999"),
        "status": ("running", "did not finish"),
        "weights": ({}, "no weights recorded for the grade step"),
    }
    for i, (key, (value, says)) in enumerate(cases.items()):
        m = json.loads(json.dumps(good))
        if value is None and key == "output":
            del m[key]
        else:
            m[key] = value
        bad = tmp_path / f"bad{i}.json"
        bad.write_text(json.dumps(m))
        assert run("run", "--replay", bad, tmp_path / f"o{i}") == 2, key
        err = _err(capsys)
        assert says in err and "--replay" in err, (key, err)
    m = json.loads(json.dumps(good))
    m["config"]["min_gain"] = "abc"
    (tmp_path / "badcfg.json").write_text(json.dumps(m))
    assert run("run", "--replay", tmp_path / "badcfg.json", tmp_path / "o_cfg") == 2
    assert "config.min_gain 'abc'" in _err(capsys)
    (tmp_path / "trunc.json").write_text(copy.read_text()[:100])
    assert run("run", "--replay", tmp_path / "trunc.json", tmp_path / "o_t") == 2
    assert "is not JSON" in _err(capsys)
    assert run("run", "--replay", copy, tmp_path / "o_nr", "--no-report") == 2
    assert "--no-report" in _err(capsys)


# ------------------------------------------------------------------------------------- weights
def test_corrupt_weights_are_refused_when_loaded(photos, tmp_path, tiny, capsys):  # noqa: F811
    sd = torch.load(tiny["hemf_tiny"], weights_only=True)
    name = next(k for k, v in sd.items() if v.is_floating_point())
    sd[name] = torch.full_like(sd[name], math.nan)
    torch.save(sd, tmp_path / "nan.pt")
    assert run("grade", photos, tmp_path / "g", "--weights", tmp_path / "nan.pt", "--arch", "hemf_tiny", "--device", "cpu", "--quiet") == 1
    err = _err(capsys)
    assert "NaN or infinite" in err and name in err and not (tmp_path / "g" / "results.csv").exists()

    (tmp_path / "text.pt").write_text("not weights")
    assert run("grade", photos, tmp_path / "g2", "--weights", tmp_path / "text.pt", "--arch", "hemf_tiny", "--device", "cpu", "--quiet") == 1
    err = _err(capsys)
    assert "not a PyTorch file" in err and "pickled" not in err

    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a whole pickled module: refused for safety
    assert run("grade", photos, tmp_path / "g3", "--weights", tmp_path / "module.pt", "--arch", "hemf_tiny", "--device", "cpu", "--quiet") == 1
    assert "pickled" in _err(capsys)


# ------------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "values, says",
    [
        ({"steps": "grade,segmnt"}, "invalid --steps 'segmnt': Input should be"),
        ({"flag_threshold": math.nan}, "invalid --flag-threshold nan: Input should be a finite number"),
        ({"min_gain": 5.0}, "invalid --min-gain 5.0: Input should be less than or equal to 1"),
        ({"enhance_if": ""}, "leave enhance out of --steps"),
        ({"simulate": " "}, "invalid --simulate ' ': empty"),
        ({"simulate": "1111"}, "invalid --simulate '1111': '1111': use codes from 001"),
        ({"simulate": "abc,111"}, None),  # a recipe name; its check comes with the degrade stage (below)
    ],
)
def test_option_errors_name_the_option_and_the_value(values, says):
    if says is None:
        assert RunConfig.build(**values).simulate_options()["recipe"] == values["simulate"]
        return
    with pytest.raises(UsageError) as e:
        RunConfig.build(**values)
    assert says in e.value.message and ".1" not in e.value.message


def test_run_names_its_own_options_in_errors(photos, tmp_path, tiny, capsys):  # noqa: F811
    assert run("run", photos, tmp_path / "o1", *tiny_args(tiny, "--simulate", "bogus")) == 2
    err = _err(capsys)
    assert "invalid --simulate bogus: unknown recipe" in err and "--recipe" not in err
    assert run("run", photos, tmp_path / "o2", *tiny_args(tiny, "--simulate", "11")) == 2
    assert "use codes from 001" in _err(capsys)


def test_a_failed_segmentation_is_marked_and_the_hint_fits_the_command(photos, tmp_path, tiny, capsys):  # noqa: F811
    Image.new("RGB", (80, 80), (120, 60, 30)).save(photos / "cropped.png")  # no dark surround
    out = tmp_path / "out"
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "segment", "--no-report")) == 3
    r = rows_of(out / "results.csv")["cropped"]
    assert r["status"] == "error" and r["segment_reason"].endswith("(failed)")
    assert "fundus segment --fov full" in r["error"] and "pass --fov full" not in r["error"]
    assert not rows_of(out / "results.csv")["p0"]["segment_reason"].endswith("(failed)")


# ------------------------------------------------------------------------------------- score, sample, overwrite
def test_score_keeps_its_output_out_of_the_reference_folder(photos, tmp_path, tiny, capsys):  # noqa: F811
    ref = tmp_path / "ref"
    shutil.copytree(photos, ref)
    before = _listing(ref)
    args = ("--weights", tiny["sdmp_tiny"], "--arch", "sdmp_tiny", "--device", "cpu", "--quiet")
    assert run("score", photos, ref / "scores", "--reference", ref, *args) == 2
    assert "--reference folder" in _err(capsys) and _listing(ref) == before
    (tmp_path / "empty").mkdir()
    assert run("score", photos, tmp_path / "s", "--reference", tmp_path / "empty", *args) == 2
    assert "no images found in the --reference folder" in _err(capsys)


def test_sample_refuses_what_is_in_its_way(tmp_path, capsys):
    d = tmp_path / "demo"
    (d / "retina.png").mkdir(parents=True)
    assert run("sample", d, "--clean-only") == 2
    assert "is not a file" in _err(capsys)
    d2 = tmp_path / "demo2"
    d2.mkdir()
    (d2 / "retina.png").write_bytes(b"\x89PNG broken")
    assert run("sample", d2) == 2
    assert "was already there and cannot be degraded" in _err(capsys)
    assert (d2 / "retina.png").read_bytes() == b"\x89PNG broken" and sorted(os.listdir(d2)) == ["retina.png"]


def test_a_refused_overwrite_leaves_the_folder_as_it_was(photos, tmp_path, tiny, capsys):  # noqa: F811
    user = tmp_path / "user"
    (user / "grade").mkdir(parents=True)
    (user / "grade" / "notes.txt").write_text("mine")
    (user / "results.csv").write_text("mine")
    before = _listing(user)
    assert run("run", photos, user, *tiny_args(tiny, "--overwrite")) == 2
    assert "holds results.csv that no fundus run wrote" in _err(capsys) and _listing(user) == before
    (user / "results.csv").unlink()
    before = _listing(user)
    assert run("run", photos, user, *tiny_args(tiny, "--overwrite")) == 2
    assert "was not written by fundus" in _err(capsys) and _listing(user) == before  # no .fundus-lock either
    # a stage command: a results.csv that no fundus run wrote is not replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.csv").write_text("mine")
    assert run("degrade", photos, mine, "--overwrite", "--quiet") == 2
    assert "holds results.csv that no fundus run wrote" in _err(capsys) and (mine / "results.csv").read_text() == "mine"
    # the folder of a stage command is not a run's: `fundus run --overwrite` leaves it alone
    stage_out = tmp_path / "degraded"
    assert run("degrade", photos, stage_out, "--quiet") == 0
    before = _listing(stage_out)
    assert run("run", photos, stage_out, *tiny_args(tiny, "--overwrite")) == 2
    assert "holds the outputs of `fundus degrade` (its manifest.json), not of `fundus run`" in _err(capsys) and _listing(stage_out) == before
    # a fundus run's own folder is still replaced
    out = tmp_path / "out"
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade", "--no-report")) == 0
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade", "--no-report", "--overwrite")) == 0
    assert len(output_bytes(out)) == 1 and (out / "grade" / "results.csv").exists()


# ------------------------------------------------------------------------------------- third campaign (2026-12-03)
def test_unknown_architecture_and_empty_weights_are_usage_errors(photos, tmp_path, capsys):  # noqa: F811
    # an unknown --arch is exit 2 whatever the weights (it was 1 with shipped weights: "holds weights for ...")
    assert run("grade", photos, tmp_path / "a", "--arch", "bogus", "--quiet") == 2
    assert "unknown model 'bogus'" in _err(capsys) and not (tmp_path / "a").exists()
    assert run("run", photos, tmp_path / "b", "--steps", "grade", "--grade-arch", "bogus", "--quiet") == 2
    assert "unknown model 'bogus'" in _err(capsys) and not (tmp_path / "b").exists()
    assert run("grade", photos, tmp_path / "c", "--weights", "", "--quiet") == 2
    assert "empty weights name" in _err(capsys) and not (tmp_path / "c").exists()


@pytest.mark.parametrize("what", ["grade-set", "quality-set"])
def test_build_refuses_bad_parts_missing_data_and_a_file_as_out(what, tmp_path, capsys):
    from fundus_pipeline.cli import main as cli_main

    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "file").write_text("mine")
    cases = [
        ([str(tmp_path / "a"), "--data", str(empty), "--parts", "test,test"], "more than once"),
        ([str(tmp_path / "b"), "--data", str(empty), "--parts", ","], "names no part"),
        ([str(tmp_path / "c"), "--data", str(empty)], "lacks"),  # was an internal error (exit 1) leaving OUT/rows behind
        ([str(tmp_path / "file"), "--data", str(empty)], "is not a folder"),
    ]
    for args, message in cases:
        assert cli_main(["build", what, *args, "--limit", "1", "--threads", "1"]) == 2
        err = _err(capsys)
        assert message in err and len(err.strip().splitlines()) <= 2, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file"] and (tmp_path / "file").read_text() == "mine"


def test_report_warns_about_images_and_stage_results_gone_since_the_run(photos, tmp_path, tiny, capsys):  # noqa: F811
    out = tmp_path / "out"
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade,segment")) == 0
    capsys.readouterr()
    assert run("report", out) == 0
    assert "warning" not in capsys.readouterr().err  # nothing missing: no warning
    vessels = sorted((out / "segment").glob("*_vessels.png"))
    vessels[0].unlink()
    assert run("report", out) == 0
    err = capsys.readouterr().err
    assert "1 image(s) that the run's rows name are missing, unreadable or changed since the run" in err and vessels[0].name in err
    shutil.rmtree(out / "segment")
    assert run("report", out) == 0
    assert "3 photograph(s) have no result in a stage folder" in capsys.readouterr().err
