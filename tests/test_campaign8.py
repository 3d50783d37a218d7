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
    assert f"no shipped weights: {tmp_path / 'w'} (the folder FUNDUS_WEIGHTS names) holds no manifest.json" in err
    assert "Traceback" not in err and "pip install -e ." in err  # campaign 18b F1: how to get the weights


def _table(path: Path, rows: list[dict]) -> None:
    import csv

    path.mkdir(parents=True)
    with open(path / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_run_figures_script_computes_the_readme_figures_from_the_joined_tables(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import run_figures

    def row(key, enhanced, segmented, gain, pb, pa, **kw):
        base = dict(key=key, status="ok", grade="usable" if enhanced == "yes" else "good", p_good="0.2", flags="blur", enhanced=enhanced,
                    score_gain=str(gain), segmented=segmented, warning="", psnr_before=str(pb), psnr_after=str(pa), ssim_before="0.7",
                    ssim_after="0.8", f1_before="0.9", f1_after="0.8", f1_gt_before="0.8", f1_gt_after="0.7")  # fmt: skip
        return {**base, **kw}

    default = [row("a", "yes", "enhanced", 0.01, 14, 18), row("b", "yes", "input", -0.02, 12, 12), row("c", "no", "input", "", 20, 20)]
    forced = [row("a", "yes", "enhanced", 0.01, 14, 18), row("b", "yes", "enhanced", -0.02, 12, 16), row("c", "no", "input", "", 20, 20)]
    _table(tmp_path / "d", default)
    _table(tmp_path / "f", forced)
    fig = run_figures.simulate_figures(run_figures.read_rows(tmp_path / "d"), run_figures.read_rows(tmp_path / "f"))
    assert fig["enhanced"] == 2 and fig["trusted"] == ["a"] and list(fig["not_enhanced"]) == ["c"]
    assert fig["means_over_enhanced_default_gate"]["psnr_after"] == 15.0  # (18 + 12) / 2: the untrusted one delivers its input
    assert fig["means_over_enhanced_every_enhancement_trusted"]["psnr_after"] == 17.0
    assert fig["psnr_gain_per_photograph"] == {"a": 4.0, "b": 4.0}
    assert fig["score_gain_of_enhanced"] == {"min": -0.02, "median": -0.005, "max": 0.01}
    real = run_figures.real_figures(default)
    assert real["grades"] == {"usable": 2, "good": 1} and real["flags"] == {"blur": 3} and real["trusted"] == 1
    # a run that did not finish is refused, not summarised
    _table(tmp_path / "cut", [row("a", "yes", "enhanced", 0.01, 14, 18, status="pending")])
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_figures.py"), "--cofenet", str(tmp_path / "cut")], capture_output=True, text=True)
    assert r.returncode == 2 and "did not finish" in r.stderr and "Traceback" not in r.stderr


def _photos(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(synthetic_fundus(72, 80, i)).save(folder / f"p{i}.png")
    return folder


def test_an_input_folder_inside_the_output_folder_is_refused_before_anything_is_removed(tmp_path, tiny, capsys):  # noqa: F811
    study = tmp_path / "study"
    photos = _photos(study / "degrade")  # a fundus output folder used as the next input, the natural chaining
    (study / "degrade" / "manifest.json").write_text('{"stage": "degrade"}')
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    # was: --overwrite removed study/degrade (the input) with the run's stage folders
    assert run("run", photos, study, *tiny_args(tiny, "--steps", "segment"), "--overwrite") == 2
    assert "lies inside the output folder" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before
    # a stage command too: it wrote over an input of the same key (was: exit 0, input replaced)
    out = tmp_path / "out"
    _photos(out / "in")
    (out / "in" / ".notes.tmp").write_text("mine")
    assert run("degrade", out / "in", out, "--overwrite", "--quiet") == 2
    assert (out / "in" / ".notes.tmp").read_text() == "mine"


def test_stale_temporaries_are_only_fundus_own(tmp_path):
    from fundus_pipeline.io import _temp_name
    from fundus_pipeline.runner import remove_stale_temporaries

    (tmp_path / "sub").mkdir()
    ours = tmp_path / "sub" / _temp_name("a.png", "0123456789ab")
    theirs = tmp_path / ".notes.tmp"
    ours.write_bytes(b"x")
    theirs.write_text("mine")
    remove_stale_temporaries(tmp_path)
    assert not ours.exists() and theirs.read_text() == "mine"


def test_the_lock_file_is_never_written_through_a_link_or_into_a_fifo(tmp_path, capsys):
    import os

    photos = _photos(tmp_path / "photos", 1)
    precious = tmp_path / "precious.png"
    precious.write_bytes((photos / "p0.png").read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    (out / ".fundus-lock").symlink_to(precious)
    assert run("degrade", photos, out, "--quiet") == 2  # was: exit 0 and precious.png truncated to the pid
    assert precious.read_bytes() == (photos / "p0.png").read_bytes()
    assert ".fundus-lock is not a regular file" in capsys.readouterr().err
    fifo = tmp_path / "out2"
    fifo.mkdir()
    os.mkfifo(fifo / ".fundus-lock")
    assert run("degrade", photos, fifo, "--quiet") == 2  # was: "internal error: OSError ... Invalid argument", exit 1
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert run("degrade", photos, loop, "--quiet") == 2  # was: "internal error: RuntimeError: Symlink loop", exit 1
    assert "Traceback" not in capsys.readouterr().err


class _GoneReader:
    """A stderr whose reader has gone: every write fails, as a pipe to a finished `head` does."""

    def write(self, s):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")

    def isatty(self):
        return False


def test_a_stderr_that_cannot_be_written_silences_the_progress_not_the_run(tmp_path, monkeypatch):
    import json

    photos = _photos(tmp_path / "in", 4)
    monkeypatch.setattr(sys, "stderr", _GoneReader())
    # progress on (no --quiet): the first progress line used to end the run with exit 1 and a 'finished' manifest of 1 row
    code = run("degrade", photos, tmp_path / "out", "--types", "001,010")
    monkeypatch.undo()
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert code == 0 and m["status"] == "finished" and m["counts"]["ok"] == 4


def test_a_run_that_stops_on_an_error_is_not_recorded_as_finished(tmp_path, monkeypatch):
    import json

    from fundus_pipeline import runner

    photos = _photos(tmp_path / "in", 3)
    real = runner.Progress.update
    seen = []

    def failing(self, row):
        seen.append(row["key"])
        if len(seen) == 2:
            raise RuntimeError("simulated failure after one item")
        real(self, row)

    monkeypatch.setattr(runner.Progress, "update", failing)
    assert run("degrade", photos, tmp_path / "out", "--quiet") == 1
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    # was: status "finished", interrupted false, counts of the rows done and nothing said of the rest
    assert m["status"] == "stopped" and m["counts"]["not_processed"] >= 1
    monkeypatch.undo()
    assert run("degrade", photos, tmp_path / "out", "--quiet", "--resume") == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["status"] == "finished"


def test_sigterm_ends_a_run_as_ctrl_c_does(tmp_path):
    import json

    photos = _photos(tmp_path / "in", 3)
    out = tmp_path / "out"
    # the process sends itself SIGTERM (as kill, timeout, systemd or a scheduler would) after its first item
    code = f"""
import os, signal, sys
from fundus_pipeline import runner
real = runner.Progress.update
def update(self, row):
    real(self, row)
    os.kill(os.getpid(), signal.SIGTERM)
runner.Progress.update = update
from fundus_pipeline.cli import main
sys.exit(main(["degrade", {str(photos)!r}, {str(out)!r}, "--quiet"]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    # was: killed by the signal (exit -15 / 143), no message, no manifest.json nor results.csv
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "interrupted" and m["counts"]["ok"] == 1 and m["counts"]["not_processed"] == 2
    assert run("degrade", photos, out, "--quiet", "--resume") == 0


def test_run_joins_a_file_name_that_is_not_utf8(tmp_path, tiny):  # noqa: F811
    import os

    photos = _photos(tmp_path / "in", 1)
    (photos / "p0.png").rename(photos / os.fsdecode(b"bad\xff.png"))
    out = tmp_path / "out"
    # was: "internal error: UnicodeEncodeError ... surrogates not allowed" at the join, every time, --resume too
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade")) == 0
    with open(out / "results.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        import csv

        keys = [r["key"] for r in csv.DictReader(f)]
    assert [os.fsencode(k) for k in keys] == [b"bad\xff"]


def test_a_run_that_leaves_photographs_pending_without_an_interruption_is_not_exit_0(tmp_path):
    from fundus_pipeline.chain import ChainResult

    # campaign 8: another command rewrote a running chain's grade folder; every row came out `pending` with exit 0
    assert ChainResult(tmp_path, [], {"total": 2, "ok": 0, "error": 0, "pending": 2}, False, 1.0).exit_code == 3
    assert ChainResult(tmp_path, [], {"total": 2, "ok": 0, "error": 0, "pending": 2}, True, 1.0).exit_code == 130
    assert ChainResult(tmp_path, [], {"total": 2, "ok": 2, "error": 0, "pending": 0}, False, 1.0).exit_code == 0


def test_an_output_folder_removed_during_the_run_is_reported_not_recreated_as_a_success(tmp_path, monkeypatch, capsys):
    import shutil

    from fundus_pipeline import runner

    photos = _photos(tmp_path / "in", 3)
    out = tmp_path / "out"
    real, seen = runner.Progress.update, []

    def update(self, row):
        real(self, row)
        seen.append(row["key"])
        if len(seen) == 1:
            shutil.rmtree(out)  # someone removes OUT while the run writes to it

    monkeypatch.setattr(runner.Progress, "update", update)
    # was: exit 0, a manifest 'finished' listing outputs that no longer exist, in a re-created folder without lock or journal
    assert run("degrade", photos, out, "--quiet") == 1
    err = capsys.readouterr().err
    assert "was removed or replaced" in err and "Traceback" not in err
    assert not (out / "manifest.json").exists() and not (out / "results.csv").exists()


def test_a_full_tmpdir_at_the_join_is_named_and_a_linked_stage_folder_is_not_removed_through(tmp_path, tiny, monkeypatch, capsys):  # noqa: F811
    import sqlite3

    from fundus_pipeline import chain

    photos = _photos(tmp_path / "in", 2)
    out = tmp_path / "out"

    def full(self, out):
        raise sqlite3.OperationalError("database or disk is full")

    with monkeypatch.context() as mp:
        mp.setattr(chain.FolderRows, "__init__", full)
        assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade")) == 1
    err = capsys.readouterr().err
    # was: "internal error: OperationalError: database or disk is full ... report it"
    assert "temporary files in" in err and "TMPDIR" in err and "internal error" not in err
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade"), "--resume") == 0
    # a stage folder that is a symbolic link: refused before anything is removed (was an internal error from rmtree)
    (out / "grade").rename(tmp_path / "grade_kept")
    (out / "grade").symlink_to(tmp_path / "grade_kept")
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade"), "--overwrite") == 2
    assert "is a symbolic link" in capsys.readouterr().err and (tmp_path / "grade_kept" / "results.csv").is_file()


class _FullDisk:
    def write(self, s):
        raise OSError(28, "No space left on device")

    def flush(self):
        pass

    def isatty(self):
        return False


def test_a_stdout_that_cannot_be_written_is_one_line_not_an_internal_error(tmp_path, monkeypatch, capsys):
    photos = _photos(tmp_path / "in", 1)
    monkeypatch.setattr(sys, "stdout", _FullDisk())
    code = run("degrade", photos, tmp_path / "out", "--quiet", "--format", "json")
    monkeypatch.undo()
    err = capsys.readouterr().err
    # was: "internal error: OSError ... report it" although the run itself completed
    assert code == 1 and "cannot write the command's output: No space left on device" in err and "internal error" not in err
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_run_does_not_join_two_versions_of_a_photograph_replaced_between_its_steps(tmp_path, tiny, monkeypatch):  # noqa: F811
    from fundus_pipeline import chain

    photos = _photos(tmp_path / "in", 2)
    real = chain.Chain._stage

    def stage(self, name, *args, **kw):
        got = real(self, name, *args, **kw)
        if name == "grade":  # the photograph is replaced after it was graded and before it is segmented
            Image.fromarray(synthetic_fundus(72, 80, 9)).save(photos / "p1.png")
        return got

    monkeypatch.setattr(chain.Chain, "_stage", stage)
    out = tmp_path / "out"
    # was: exit 0, the grade of the old bytes joined with the vessels of the new ones, the manifest recording the old
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade,segment")) == 3
    rows = rows_of(out / "results.csv")
    assert rows["p0"]["status"] == "ok" and rows["p1"]["status"] == "error"
    assert "changed during the run" in rows["p1"]["error"] and "grade read" in rows["p1"]["error"]


def test_ctrl_c_while_the_command_line_is_imported_is_one_line_and_exit_130():
    # a Ctrl-C during the second the CLI takes to import (simulated: importing it raises KeyboardInterrupt)
    code = """
import sys
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "fundus_pipeline.cli":
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
from fundus_pipeline.console import main
main()
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    # was: the interpreter's KeyboardInterrupt traceback of whatever module was being imported
    assert r.returncode == 130 and r.stderr == "Error: interrupted\n"


def test_the_console_script_is_the_guarded_entry_point():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'fundus = "fundus_pipeline.console:main"' in text
    r = subprocess.run([sys.executable, "-m", "fundus_pipeline", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.startswith("fundus ")
