"""Eighth campaign (documentation audit, a fresh machine, the environment), and its mends."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image

from fundus_pipeline.cli import main
from tests.conftest import synthetic_fundus
from tests.test_run import rows_of, tiny, tiny_args  # noqa: F401  (tiny is a fixture)

ROOT = Path(__file__).resolve().parents[1]


def run(*args) -> int:
    return main([str(a) for a in args])


def test_run_overwrite_refuses_a_folder_it_did_not_write_inside_a_stage_folder(tmp_path, tiny, capsys):  # noqa: F811
    photos = tmp_path / "in"
    photos.mkdir()
    for i in range(2):
        Image.fromarray(synthetic_fundus(80, 88, i)).save(photos / f"p{i}.png")
    out = tmp_path / "out"
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade")) == 0
    # `fundus evaluate grade out/grade LABELS` writes its reports into out/grade/eval_grade by default
    report = out / "grade" / "eval_grade" / "summary.md"
    report.parent.mkdir()
    report.write_text("an evaluation of the earlier grades\n")
    capsys.readouterr()
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade"), "--overwrite") == 2
    err = capsys.readouterr().err
    assert "eval_grade" in err and "move it away" in err and "Traceback" not in err
    # nothing was removed: the refusal comes before any deletion (was: the report deleted silently)
    assert report.read_text() == "an evaluation of the earlier grades\n"
    assert (out / "grade" / "results.csv").is_file() and (out / "results.csv").is_file()
    report.parent.rename(tmp_path / "kept")
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade"), "--overwrite") == 0
    assert set(rows_of(out / "results.csv")) == {"p0", "p1"}


def test_grade_check_script_needs_the_weights_name():
    # without it the check file of one grader could be rewritten with another's output when the default changes
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "grade_check.py")], capture_output=True, text=True)
    assert r.returncode == 2 and "grade_check.py hemf_4k >" in r.stderr and r.stdout == ""


def test_an_empty_weights_folder_is_named_in_the_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FUNDUS_WEIGHTS", str(tmp_path / "w"))
    (tmp_path / "w").mkdir()
    Image.fromarray(synthetic_fundus(64, 64)).save(tmp_path / "a.png")
    assert run("grade", tmp_path / "a.png", tmp_path / "out", "--quiet") == 1
    err = capsys.readouterr().err
    # was "shipped weights: none", which names neither the folder searched nor the variable that chose it
    assert f"none in {tmp_path / 'w'} (the folder FUNDUS_WEIGHTS names)" in err and "Traceback" not in err
