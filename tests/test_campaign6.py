"""Defects found by the sixth bad-input campaign (2026-12-03: crashes, resumes, tampered folders): a resume
notices a changed --reference, files fundus did not write are never replaced, an interrupt at the very end
keeps the tables, workers do not outlive a killed run, evaluate refuses ambiguous predictions, a full disk is
named, and a tampered stage journal is one line in the report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from PIL import Image

from tests.conftest import synthetic_fundus
from tests.test_refusals import _err
from tests.test_run import photos, rows_of, run, tiny  # noqa: F401  (fixtures)


def test_score_resume_recomputes_a_row_whose_reference_changed(photos, tmp_path, tiny):  # noqa: F811
    ref = tmp_path / "ref"
    shutil.copytree(photos, ref)
    args = ("--weights", tiny["sdmp_tiny"], "--arch", "sdmp_tiny", "--device", "cpu", "--quiet", "--input-score")
    out = tmp_path / "s"
    assert run("score", photos, out, "--reference", ref, *args) == 0
    before = rows_of(out / "results.csv")
    Image.fromarray(synthetic_fundus(80, 80, 11)).save(ref / "p1.png")  # same path and size, other bytes
    assert run("score", photos, out, "--reference", ref, *args, "--resume") == 0
    after = rows_of(out / "results.csv")
    fresh = tmp_path / "fresh"
    assert run("score", photos, fresh, "--reference", ref, *args) == 0
    again = rows_of(fresh / "results.csv")
    assert after["p1"]["score"] == again["p1"]["score"] != before["p1"]["score"]  # was: the stale score kept
    assert after["p0"]["score"] == before["p0"]["score"]
    m = json.loads((out / "manifest.json").read_text())
    row = next(r for r in m["items"] if r["key"] == "p1")
    assert set(row["inputs_sha256"]) == set(row["inputs_stat"]) == {"reference"}


def test_tables_fundus_did_not_write_are_never_replaced(photos, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "d"
    assert run("degrade", photos, out, "--quiet") == 0
    own_manifest = (out / "manifest.json").read_bytes()
    theirs = b"patient,diagnosis\nP1,glaucoma\n"
    # a foreign manifest beside fundus's journal, and a foreign results.csv beside fundus's manifest (were replaced, exit 0)
    for manifest, flag in ((b'{"hello": 1}', "--resume"), (own_manifest, "--resume"), (own_manifest, "--overwrite"), (b'{"hello": 1}', "--overwrite")):
        (out / "manifest.json").write_bytes(manifest)
        (out / "results.csv").write_bytes(theirs)
        assert run("degrade", photos, out, "--quiet", flag) == 2, (manifest, flag)
        assert "that no fundus run wrote" in _err(capsys)
        assert (out / "results.csv").read_bytes() == theirs and (out / "manifest.json").read_bytes() == manifest
    (out / "results.csv").unlink()
    (out / "manifest.json").write_bytes(own_manifest)
    assert run("degrade", photos, out, "--quiet", "--resume") == 0  # fundus's own tables are resumed as before


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def test_workers_end_when_the_run_is_killed_and_resume_is_not_refused(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    src = tmp_path / "in"
    src.mkdir()
    for i in range(24):
        Image.fromarray(synthetic_fundus(192, 192, i)).save(src / f"p{i:02d}.png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fundus_pipeline", "degrade", str(src), str(out), "--types", "all", "-j", "2", "--threads", "1", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (len(_children(proc.pid)) >= 2 and list(out.glob("*.png"))):
        time.sleep(0.2)
    workers = _children(proc.pid)
    assert len(workers) >= 2 and proc.poll() is None, "the run ended before its workers could be seen"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    def running(w: int) -> bool:  # an exited orphan may stay a zombie where PID 1 does not reap it
        try:
            return (Path(f"/proc/{w}") / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False

    deadline = time.time() + 20
    while time.time() < deadline and any(running(w) for w in workers):
        time.sleep(0.2)
    alive = [w for w in workers if running(w)]
    for w in alive:  # never leave them behind, whatever the assertion says
        os.kill(w, signal.SIGKILL)
    assert not alive, "worker processes outlived the killed run (they hold OUT's lock)"
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr  # was: 'another fundus run is writing to OUT' (exit 2)


def test_ctrl_c_while_the_tables_are_written_waits_for_them(photos, tmp_path, monkeypatch, capsys):  # noqa: F811
    import os
    import signal

    import fundus_pipeline.runner as runner

    real, sent = runner.write_reports, []

    def interrupted_at_the_end(*a, **k):
        if not k.get("running") and not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C as the final tables start
        return real(*a, **k)

    monkeypatch.setattr(runner, "write_reports", interrupted_at_the_end)
    out = tmp_path / "d"
    # the tables are completed first (was: 130 with neither results.csv nor manifest.json); the command then ends as
    # interrupted, 130, since 2026-12-05 (review 43 M3: what would come after the tables, grade's copies, a chain's next
    # stage, an API caller's next call, is not to run), its manifest "finished" when every photograph was
    assert run("degrade", photos, out, "--quiet") == 130
    assert sent and "finishing results.csv and manifest.json first" in capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text())["status"] == "finished"
    assert set(rows_of(out / "results.csv")) == {"p0", "p1", "p2"}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_ctrl_c_while_sorting_into_grade_folders_is_an_interrupted_run(photos, tmp_path, tiny, monkeypatch, capsys):  # noqa: F811
    import fundus_pipeline.cli.grade as grade_cli

    def interrupted(out_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(grade_cli, "sort_into", interrupted)
    out = tmp_path / "g"
    code = run("grade", photos, out, "--weights", tiny["hemf_tiny"], "--arch", "hemf_tiny", "--device", "cpu", "--sort-into", "--format", "json")
    captured = capsys.readouterr()
    assert code == 130  # was 130 with nothing on stdout
    summary = json.loads(captured.out)
    assert summary["interrupted"] is True and summary["exit_code"] == 130
    assert "rerun with --resume to finish the copies" in captured.err


def test_evaluate_segment_says_which_images_beside_segment_outputs_it_leaves_out(tmp_path, capsys):
    import numpy as np

    from fundus_pipeline.cli import main

    rng = np.random.default_rng(0)
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    truth = (rng.random((64, 64)) > 0.8).astype(np.uint8) * 255
    Image.fromarray(truth).save(gt / "01_manual1.png")
    Image.fromarray(truth).save(pred / "01_vessels.png")
    Image.fromarray(255 - truth).save(pred / "01.png")  # not a prediction in a segment output folder
    assert main(["evaluate", "segment", str(pred), str(gt), "--bootstrap", "0", "--no-cldice"]) == 0
    err = capsys.readouterr().err
    assert "1 other image(s) in" in err and "only *_prob and *_vessels files are predictions" in err, err  # was silent


def test_a_full_disk_while_journalling_is_named_not_an_internal_error(photos, tmp_path, monkeypatch, capsys):  # noqa: F811
    import errno

    import fundus_pipeline.runner as runner

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.f.close()

    def full_open(path, mode="r", *a, **k):
        f = open(path, mode, *a, **k)
        return Full(f) if mode == "a" else f

    monkeypatch.setattr(runner, "open", full_open, raising=False)
    out = tmp_path / "d"
    assert run("degrade", photos, out, "--quiet") == 1
    err = capsys.readouterr().err
    assert "internal error" not in err and "cannot write to output folder" in err and "No space left on device" in err, err
    assert "rerun with --resume" in err  # was: 'internal error: OSError ... report it'
    monkeypatch.undo()
    assert run("degrade", photos, out, "--quiet", "--resume") == 0
    assert set(rows_of(out / "results.csv")) == {"p0", "p1", "p2"}


def test_report_on_a_hand_edited_stage_journal_is_one_line(photos, tmp_path, tiny, capsys):  # noqa: F811
    from tests.test_run import tiny_args

    out = tmp_path / "r"
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade")) == 0
    journal = out / "grade" / ".fundus-journal.jsonl"
    lines = [json.loads(x) for x in journal.read_text().splitlines()]
    for edit in (lambda r: r.pop("grade"),):
        rows = [dict(r) for r in lines]
        edit(rows[0])
        journal.write_text("".join(json.dumps(r) + "\n" for r in rows))
        capsys.readouterr()
        assert run("report", out) == 2  # was 1, 'internal error: KeyError ... report it'
        err = _err(capsys).strip()
        assert "do not read as fundus wrote them" in err and len(err.splitlines()) == 1, err
