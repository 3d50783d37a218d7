"""Session 2026-12-05 (third stop): known-left findings of earlier campaigns, campaigns 30a/30b and their mends.
Each test fails on the code before its mend."""

from __future__ import annotations

import pytest

from tests.test_run import photos, rows_of, run, tiny, tiny_args  # noqa: F401  (photos, tiny: fixtures)


# ------------------------------------------------------------------------------------------------ campaign 28b F4
def test_a_file_no_step_can_read_has_its_message_once_in_the_error_cell(photos, tmp_path, tiny):  # noqa: F811
    """28b F4: a photograph that cannot be read fails the grade step and the segment step with the same message,
    and the joined table's error cell said it twice ("grade: X; segment: X")."""
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png")
    out = tmp_path / "out"
    assert run("run", photos, out, *tiny_args(tiny)) == 3
    row = rows_of(out / "results.csv")["broken"]
    assert row["status"] == "error"
    grade = rows_of(out / "grade" / "results.csv")["broken"]["error"]
    assert grade and row["error"] == f"grade, segment: {grade}"
    assert row["error"].count(grade) == 1


# ------------------------------------------------------------------------------------------------ campaign 30b F2
def test_a_refusal_that_depends_on_out_starts_no_local_ray_instance(photos, tmp_path, tiny, monkeypatch, capsys):  # noqa: F811
    """30b F2: with --engine ray, a resume refused for OUT's sake (another stage's folder, another configuration)
    started a local Ray instance first: 8-11 s and a /tmp/ray session folder for a one-line refusal."""
    import pytest

    pytest.importorskip("ray", reason="Ray is not installed (pip install 'fundus-pipeline[ray]')")
    from fundus_pipeline.ray_engine import RayEngine

    started = []
    monkeypatch.setattr(RayEngine, "start", lambda self: started.append(self))
    assert run("degrade", photos, tmp_path / "d", "--quiet") == 0
    seg = ("--weights", tiny["imff_tiny"], "--arch", "imff_tiny", "--device", "cpu", "--quiet")
    assert run("segment", photos, tmp_path / "d", *seg, "--engine", "ray", "--resume") == 2  # a degrade folder
    assert "degrade" in capsys.readouterr().err
    assert run("segment", photos, tmp_path / "s", *seg) == 0
    assert run("segment", photos, tmp_path / "s", *seg, "--threshold", "0.3", "--engine", "ray", "--resume") == 2
    assert "different configuration" in capsys.readouterr().err
    assert run("run", photos, tmp_path / "s", *tiny_args(tiny), "--engine", "ray", "--resume") == 2
    assert started == []


# ------------------------------------------------------------------------------------------------ campaign 30b F1
def test_a_photograph_squashed_out_of_shape_is_warned_about_and_not_failed_as_a_wrong_pair(tmp_path, tiny):  # noqa: F811
    """30b F1: a fundus photograph resized out of shape (565x200) had a field of view found, twice the frame's short
    side across, so no `squashed frame` warning; `fundus run` then enhanced it and failed it at the score step: "the
    reference's field of view is not where the enhanced photograph's is ... not the photograph it was made from?",
    a pair the run had made itself."""
    import numpy as np
    from PIL import Image

    from fundus_pipeline.stages.base import Fov
    from tests.conftest import synthetic_fundus

    d = tmp_path / "in"
    d.mkdir()
    photo = Image.fromarray(synthetic_fundus(300, 300, 1))
    photo.resize((300, 100), Image.BILINEAR).save(d / "squashed.png")
    photo.save(d / "round.png")
    fov = Fov.estimate(np.asarray(Image.open(d / "squashed.png")))
    assert fov.found and fov.geometry.diameter > 1.6 * 100  # the case: a circle far wider than the frame is tall
    out = tmp_path / "out"
    assert run("run", d, out, *tiny_args(tiny, "--enhance-if", "good,usable,reject")) == 0
    rows = rows_of(out / "results.csv")
    assert rows["squashed"]["status"] == "ok" and rows["squashed"]["enhanced"] == "yes" and rows["squashed"]["score"]
    assert rows["squashed"]["warning"].startswith("squashed frame: 300x100 whose field of view"), rows["squashed"]["warning"]
    assert not rows["round"]["warning"].startswith("squashed")
    # `fundus score` alone still checks the pairs it is given
    assert run("score", out / "enhance", tmp_path / "sc", "--reference", d, "--weights", tiny["sdmp_tiny"], "--arch", "sdmp_tiny",
               "--device", "cpu", "--quiet") == 3
    assert "not the photograph it was made from" in rows_of(tmp_path / "sc" / "results.csv")["squashed"]["error"]


# ------------------------------------------------------------------------------------------------ campaign 29a F4
def test_a_sigterm_while_the_command_line_is_imported_exits_130(tmp_path):
    """29a F4: a SIGTERM in the first ~0.4 s, while the command line was imported and before it set its handlers,
    killed the process (exit 143, -15 here) where the exit table promises 130. Sent once numpy is mapped: the
    imports are under way (fundus_pipeline.console itself maps no numpy)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import pytest

    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc (Linux)")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    p = subprocess.Popen([sys.executable, "-m", "fundus_pipeline", "segment", str(tmp_path / "none"), str(tmp_path / "out")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and p.poll() is None:
            try:
                if "_multiarray_umath" in Path(f"/proc/{p.pid}/maps").read_text():
                    break
            except OSError:
                pass
            time.sleep(0.002)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, (p.returncode, err)
    assert err.strip().splitlines()[-1] == "Error: interrupted"


# ------------------------------------------------------------------------------------------------ campaign 30a H1
def test_a_build_is_refused_while_another_writes_its_folder(fake_data, tmp_path, capsys):
    """30a H1: `fundus build` took no lock on OUT: a second build (an --overwrite one among them) ran alongside the
    first, both exited 0, and the set left said "finished" while naming images the other build had removed."""
    from fundus_pipeline.runner import LOCK, OutputLock
    from tests.test_quality import _build, _tree

    out = tmp_path / "set"
    assert _build(fake_data, out) == 0
    before = _tree(out)
    with OutputLock(out, out):  # a build under way in another process holds it
        for extra in ((), ("--overwrite",)):
            assert _build(fake_data, out, *extra) == 2
            assert "another fundus run is writing to" in capsys.readouterr().err
            assert _tree(out) == before
        # a grade set too, and a new folder is left as it was not
        from fundus_pipeline.cli import main as cli_main

        args = ["build", "grade-set", str(out), "--data", str(fake_data), "--parts", "train", "--limit", "1", "--draws", "1",
                "--size", "64", "--store-size", "32", "--threads", "1"]
        assert cli_main(args) == 2
    assert _build(fake_data, out) == 0 and _tree(out) == before  # resumed: nothing to do
    assert (out / LOCK).is_file()  # the build's lock stays, as a stage's does


# ------------------------------------------------------------------------------------------------ campaign 30a M1
@pytest.mark.parametrize("args", [
    ["train", "segment", "--arch", "imff_tiny", "--steps", "1", "--out", ""],
    ["train", "segment", "--arch", "imff_tiny", "--steps", "1", "--out", "{tmp}/o", "--data", ""],
    ["train", "enhance", "--arch", "unet_enh_tiny", "--steps", "1", "--out", "{tmp}/o", "--cache", ""],
    ["train", "score", "--arch", "sdmp_tiny", "--steps", "1", "--out", "{tmp}/o", "--quality-set", ""],
    ["train", "grade", "--arch", "hemf_tiny", "--steps", "1", "--out", "{tmp}/o", "--grade-set", ""],
    ["build", "quality-set", ""],
    ["build", "grade-set", "{tmp}/o", "--data", ""],
    ["sample", ""],
    ["evaluate", "segment", "{tmp}", ""],
    ["report", ""],
])
def test_an_empty_path_is_refused_not_taken_as_the_working_folder(args, tmp_path, monkeypatch, capsys):
    """30a M1: an empty --out (train) or OUT (build) was the working folder: a run or a set written there, exit 0
    (`--out "$RUN"` with $RUN unset); so were `fundus sample ""` and the other commands' empty path arguments."""
    from fundus_pipeline.cli import main as cli_main

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert cli_main([a.replace("{tmp}", str(tmp_path)) for a in args]) == 2
    assert "empty; give a folder or file name" in capsys.readouterr().err
    assert not any(work.iterdir()) and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ campaign 30a M2
def test_a_training_is_not_written_into_the_set_it_reads(tmp_path, capsys):
    """30a M2: `fundus train score|grade` accepted --out equal to or inside its --quality-set / --grade-set: best.pt,
    last.pt and train.log among the set's images."""
    from fundus_pipeline.cli import main as cli_main

    qs, gs = tmp_path / "qs", tmp_path / "gs"
    for folder, table in ((qs, "pairs.csv"), (gs, "labels.csv")):
        (folder / "train").mkdir(parents=True)
        (folder / table).write_text("key\n")
    cases = [["train", "score", "--arch", "sdmp_tiny", "--quality-set", str(qs), "--cnn-init", "none", "--vit-init", "none", "--out", str(out)]
             for out in (qs, qs / "train", qs / "new")]
    cases += [["train", "grade", "--arch", "hemf_tiny", "--grade-set", str(gs), "--real-p", "0", "--out", str(out)] for out in (gs, gs / "train" / "x")]
    for args in cases:
        assert cli_main([*args, "--steps", "1"]) == 2
        assert "choose a folder outside it (the set is only read)" in capsys.readouterr().err
    assert sorted(p.name for p in qs.rglob("*")) == ["pairs.csv", "train"] and sorted(p.name for p in gs.rglob("*")) == ["labels.csv", "train"]


# ------------------------------------------------------------------------------------------------ campaign 30a M3
def test_a_training_seed_beyond_what_torch_takes_is_a_usage_error(fake_data, tmp_path, capsys):
    """30a M3: a --seed above 2^64-1 (torch's seed range) was an internal error to report (exit 1) in every
    `fundus train`; the largest one it takes trains."""
    from fundus_pipeline.cli import main as cli_main

    assert cli_main(["train", "segment", "--arch", "imff_tiny", "--steps", "1", "--out", str(tmp_path / "o"), "--seed", str(2**64),
                    "--data", str(fake_data)]) == 2
    err = capsys.readouterr().err
    assert "--seed" in err and "internal error" not in err and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ campaign 30a M4, L1
def test_a_cache_that_cannot_be_written_is_one_line_and_leaves_no_run_folder(fake_data, tmp_path, capsys, monkeypatch):
    """30a M4: a --cache where nothing can be written (/proc/x.npz) was an internal error to report (exit 1), and
    L1: a run failing before its first step with anything but fundus's own errors (out of memory preparing the data
    too) left its new --out behind (train.log, the lock)."""
    from pathlib import Path

    import pytest

    from fundus_pipeline.cli import main as cli_main

    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc")
    out = tmp_path / "run"
    args = ["train", "enhance", "--arch", "unet_enh_tiny", "--data", str(fake_data), "--datasets", "drive", "--size", "64", "--crop", "32",
            "--steps", "2", "--batch-size", "1", "--val-every", "2", "--threads", "1", "--out", str(out), "--cache", "/proc/fundus_x.npz"]
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert "cannot write --cache /proc/fundus_x.npz" in err and "internal error" not in err, err
    assert not out.exists()
    assert "preparing 20 clean sources" in err and "HEI-MED" not in err  # L6: --datasets drive prepares no HEI-MED source

    from fundus_pipeline.train import enhance as trainer

    def no_memory(*a, **k):
        raise MemoryError

    monkeypatch.setattr(trainer, "prepare_sources", no_memory)
    assert cli_main(args[:-2]) == 1
    assert "out of memory" in capsys.readouterr().err and not out.exists()


# ------------------------------------------------------------------------------------------------ campaign 30a L2
def test_a_grade_training_stopped_while_fitting_its_temperature_says_so_in_its_log(tmp_path, monkeypatch):
    """30a L2: `fundus train grade` interrupted while fitting the temperature exited 130, but train.log ended with
    "done:" and calibration.json was missing, with no word of it."""
    import pytest

    from fundus_pipeline.train import grade as trainer

    out = tmp_path / "run"
    out.mkdir()

    class Cfg:
        pass

    cfg = Cfg()
    cfg.out, cfg.device = out, "cpu"
    monkeypatch.setattr(trainer, "GradeTask", lambda c: None)
    monkeypatch.setattr(trainer, "fit", lambda task, c: (out / "train.log").write_text("00:00:00 done: {}\n") and {})

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "calibrate", stop)
    with pytest.raises(KeyboardInterrupt):
        trainer.train_grade(cfg)
    last = (out / "train.log").read_text().splitlines()[-1]
    assert "interrupted while fitting the temperature" in last and "--resume" in last


# ------------------------------------------------------------------------------------------------ campaign 30a L3
def test_grading_with_a_runs_own_weights_says_they_are_not_calibrated(photos, tmp_path, tiny, capsys):  # noqa: F811
    """30a L3: `fundus grade --weights RUN/best.pt` graded with temperature 1 in silence, the temperature its run had
    fitted lying beside it in RUN/calibration.json."""
    import json
    import shutil

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copyfile(tiny["hemf_tiny"], run_dir / "best.pt")
    opts = ("--weights", run_dir / "best.pt", "--arch", "hemf_tiny", "--device", "cpu")
    assert run("grade", photos, tmp_path / "g1", *opts) == 0
    err = capsys.readouterr().err
    assert "best.pt has no entry in weights/manifest.json: its probabilities are not calibrated (temperature 1)" in err
    (run_dir / "calibration.json").write_text(json.dumps({"temperature": 0.37317}))
    assert run("grade", photos, tmp_path / "g2", *opts) == 0
    assert "calibration.json holds the temperature its run fitted (0.37317)" in capsys.readouterr().err
    assert json.loads((tmp_path / "g2" / "manifest.json").read_text())["config"]["temperature"] == 1.0  # as said


# ------------------------------------------------------------------------------------------------ campaign 30a L4
@pytest.mark.parametrize("args", [
    ["train", "segment", "--arch", "imff_tiny", "--degrade-p", "nan"],
    ["train", "enhance", "--arch", "unet_enh_tiny", "--disc-weight", "inf"],
    ["train", "enhance", "--arch", "unet_enh_tiny", "--vessel-weight", "nan"],
    ["train", "grade", "--arch", "hemf_tiny", "--grade-set", "{gs}", "--real-p", "0", "--grey-p", "nan"],
    ["segment", "{photos}", "{tmp}/o", "--threshold", "nan"],
    ["grade", "{photos}", "{tmp}/o", "--flag-threshold", "nan"],
    ["run", "{photos}", "{tmp}/o", "--min-gain", "nan"],
])
def test_nan_and_infinite_option_values_are_refused_as_such(args, photos, fake_data, tmp_path, capsys):  # noqa: F811
    """30a L4: NaN got misleading messages ("should be less than or equal to 1") and --disc-weight inf was accepted
    until the run diverged at its first step, with a hint to lower --lr."""
    from fundus_pipeline.cli import main as cli_main

    gs = tmp_path / "gs"
    gs.mkdir()
    (gs / "labels.csv").write_text("key\n")
    args = [a.replace("{tmp}", str(tmp_path)).replace("{photos}", str(photos)).replace("{gs}", str(gs)) for a in args]
    if args[0] == "train":
        args += ["--steps", "1", "--out", str(tmp_path / "run")] + (["--data", str(fake_data)] if args[1] != "grade" else [])
    assert cli_main(args) == 2
    assert "finite number" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ campaign 30a L5
def test_a_frozen_stream_that_does_not_fit_names_its_own_option():
    """30a L5: --vit-init imff (segmenter weights for the ViT stream) said "--cnn-init or --vit-init (None, imff)"."""
    from fundus_pipeline.errors import WeightsError
    from fundus_pipeline.models.registry import build_model
    from fundus_pipeline.train.score import load_streams

    model = build_model("sdmp_tiny")
    with pytest.raises(WeightsError) as e:
        load_streams(model, None, "imff")
    assert e.value.message.startswith("--vit-init (imff): the weights do not fit") and "--cnn-init" not in e.value.message
    with pytest.raises(WeightsError) as e:
        load_streams(model, "vit_fundus", None)
    assert e.value.message.startswith("--cnn-init (vit_fundus): the weights do not fit")


# ------------------------------------------------------------------------------------------------ campaign 30a L7
def test_an_incomplete_fundus_data_is_named_as_such_not_as_data(tmp_path, monkeypatch, capsys):
    """30a L7: an empty or incomplete $FUNDUS_DATA was reported as "--data ..." although no --data was given."""
    from fundus_pipeline.cli import main as cli_main

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("FUNDUS_DATA", str(empty))
    assert cli_main(["build", "quality-set", str(tmp_path / "q"), "--parts", "train", "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"Error: $FUNDUS_DATA {empty} lacks"), err
    assert cli_main(["build", "grade-set", str(tmp_path / "g"), "--data", str(empty), "--parts", "train", "--limit", "1"]) == 2
    assert capsys.readouterr().err.startswith(f"Error: --data {empty} lacks")


# ------------------------------------------------------------------------------------------------ campaign 30a L8
def test_a_resumed_runs_checkpoint_records_the_runs_options_not_its_resume(tmp_path, monkeypatch):
    """30a L8: a resumed run's last.pt recorded "resume": true in its options, and pickled the optimiser's keys apart,
    so its bytes were not those of the uninterrupted run (weights, optimiser and random state equal)."""
    import json

    import torch

    import shutil

    from fundus_pipeline.train.config import TrainConfig
    from fundus_pipeline.train.loop import fit
    from tests.test_train_segment import _ToyTask, fit_interrupted_then_resumed

    def cfg(**kw):
        return TrainConfig(out=tmp_path / "run", steps=5, batch_size=4, lr=1e-2, seed=5, val_every=2, ckpt_every=1, **kw)

    fit(_ToyTask(cfg()), cfg())  # uninterrupted, in the same folder (its path is among the options recorded)
    shutil.move(tmp_path / "run", tmp_path / "ref")
    fit_interrupted_then_resumed(cfg, monkeypatch)
    recorded = json.loads(torch.load(tmp_path / "run" / "last.pt", weights_only=True)["config"])
    assert recorded["resume"] is False
    # and the bytes: a resumed optimiser holds the keys it read from last.pt, which pickle had written apart
    assert (tmp_path / "run" / "last.pt").read_bytes() == (tmp_path / "ref" / "last.pt").read_bytes()


def test_sigterm_is_caught_from_the_first_import_to_the_end_of_the_command(tmp_path):
    """Review 30 M2: the console restored the default SIGTERM handler after importing the command line, and the command
    set its own 0.2 s later (after importing the runner): a SIGTERM there still killed it (exit 143). Polled from
    outside (/proc/PID/status SigCgt): once caught, SIGTERM stays caught until the interpreter shuts down."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc (Linux)")
    root = Path(__file__).resolve().parents[1]
    p = subprocess.Popen([sys.executable, "-m", "fundus_pipeline", "segment", str(tmp_path / "none"), str(tmp_path / "out")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(root)})
    states = []
    bit = 1 << (signal.SIGTERM - 1)
    try:
        deadline = time.monotonic() + 60
        while p.poll() is None and time.monotonic() < deadline:
            try:
                line = next(x for x in Path(f"/proc/{p.pid}/status").read_text().splitlines() if x.startswith("SigCgt:"))
            except (OSError, StopIteration):
                break
            caught = bool(int(line.split()[1], 16) & bit)
            if not states or states[-1] != caught:
                states.append(caught)
            time.sleep(0.001)
        p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 2  # IN does not exist
    # one caught stretch (the interpreter resets its handlers as it shuts down, so the last state may be uncaught)
    assert states.count(True) == 1, states


# ------------------------------------------------------------------------------------------------ review 30 M1
def test_the_report_counts_an_enhancement_that_failed_with_the_same_message_as_a_later_step(photos, tmp_path, tiny):  # noqa: F811
    """Review 30 M1: the report counted a failed enhancement by "enhance: " in the error cell, which the joined cell
    ("enhance, segment: ...", campaign 28b F4) no longer holds: "3 enhanced" where it had said "3 enhanced, 1 failed"."""
    from fundus_pipeline.report import summary

    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png")
    out = tmp_path / "out"
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "enhance,segment")) == 3
    rows = rows_of(out / "results.csv")
    assert rows["broken"]["error"].startswith("enhance, segment: ")
    s = summary(rows.values(), simulate=False, truth=False)
    assert s["enhanced"] == 3 and s["enhance_failed"] == 1
    assert "3 enhanced, 1 failed" in " ".join((out / "report.html").read_text().split()).replace("</div><div>", " ")


# ------------------------------------------------------------------------------------------------ review 30 L1
def test_a_local_ray_instance_that_cannot_start_says_how_to_go_on(photos, tmp_path, monkeypatch, capsys):  # noqa: F811
    """Review 30 L1: the local Ray instance now starts with the first stage's work, after OUT is created; its failure
    left OUT "stopped" with no word of --resume, and a plain rerun was refused."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'fundus-pipeline[ray]')")
    from fundus_pipeline import ray_engine

    def broken(ray, address, kwargs):
        raise ValueError("no space left for the object store")

    monkeypatch.setattr(ray_engine, "_init", broken)
    out = tmp_path / "out"
    assert run("degrade", photos, out, "--engine", "ray", "--quiet") == 1
    err = capsys.readouterr().err
    assert "cannot start a local Ray instance: ValueError: no space left for the object store" in err and "rerun with --resume" in err
    assert run("degrade", photos, out, "--resume", "--quiet") == 0  # as the hint says


# ------------------------------------------------------------------------------------------------ campaign 31b
def _console(tmp_path, script: str, *args: str):
    """Run ``script`` (Python, which ends by calling the console's main) in a fresh interpreter."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    path = tmp_path / "console_script.py"
    path.write_text(script)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), str(root)])}
    return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, env=env, timeout=300)


def test_a_finished_command_keeps_its_status_when_a_sigterm_comes_during_the_interpreters_teardown(tmp_path):
    """31b M1: Python resets the command's handlers to the default before it tears its modules down; a SIGTERM
    then (here sent from a finaliser that runs during the teardown) killed a finished command: 143."""
    r = _console(tmp_path, "import os, signal, sys, time\n"
                           "class Late:\n"
                           "    def __del__(self, kill=os.kill, pid=os.getpid(), sleep=time.sleep):\n"
                           "        kill(pid, signal.SIGTERM)\n"
                           "        sleep(0.05)\n"
                           "sys.modules['__main__'].late = Late()\n"
                           "from fundus_pipeline.console import main\n"
                           "sys.argv = ['fundus', 'models']\n"
                           "main()\n")
    assert r.returncode == 0, (r.returncode, r.stderr[-500:])
    assert "imff" in r.stdout


def test_a_stop_signal_during_torchs_import_waits_for_the_import_to_finish(tmp_path):
    """31b H1: a KeyboardInterrupt raised inside torch's C++ initialisation aborted the process (exit 134,
    "terminate called after throwing an instance of 'pybind11::error_already_set'"). The console holds the stop
    signals while torch is first imported: here a stand-in torch that signals itself and then finishes.
    With another thread running (OpenBLAS's, where OMP_NUM_THREADS is unset, as in CI), a signal blocked in the main
    thread went to that thread and Python raised the interrupt in the import all the same: the handlers hold it."""
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import os, signal, time\nos.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(0.2)\n"
                                      "import sys\nsys.stderr.write('import finished\\n')\n")
    r = _console(tmp_path, "import sys, threading, time\n"
                           "threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n"
                           "from fundus_pipeline.console import main\n"
                           "import fundus_pipeline.cli.app as app\n"
                           "def cmd(argv=None):\n"
                           "    import torch\n"
                           "    sys.stderr.write('after the import\\n')\n"
                           "app.main = cmd\n"
                           "import fundus_pipeline.cli as cli\n"
                           "cli.main = cmd\n"
                           "main()\n")
    assert r.returncode == 130, (r.returncode, r.stderr[-800:])
    assert "import finished" in r.stderr and "after the import" not in r.stderr and r.stderr.strip().endswith("Error: interrupted")


def test_a_stop_whose_interrupt_a_library_turned_into_its_own_error_is_an_interruption(photos, tmp_path, monkeypatch, capsys):  # noqa: F811
    """31b M2: a SIGTERM landing while pydantic built a model became a SchemaError: "internal error ... report it",
    exit 1. H2: one raised where Python drops it (an import lock's clean-up callback) let the run go on to exit 0."""
    import os
    import signal

    from fundus_pipeline.cli import main as cli_main
    from fundus_pipeline.stages import degrade

    real = degrade.DegradeStage.__init__

    def converted(self, *a, **k):
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the command's own handler raises KeyboardInterrupt here
            __import__("time").sleep(0.1)
        except KeyboardInterrupt as e:
            raise RuntimeError("Error calling __set_name__") from e
        real(self, *a, **k)

    monkeypatch.setattr(degrade.DegradeStage, "__init__", converted)
    assert cli_main(["degrade", str(photos), str(tmp_path / "a"), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "internal error" not in err

    def dropped(self, *a, **k):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            __import__("time").sleep(0.1)
        except KeyboardInterrupt:
            pass  # "Exception ignored in ..."
        real(self, *a, **k)

    monkeypatch.setattr(degrade.DegradeStage, "__init__", dropped)
    assert cli_main(["degrade", str(photos), str(tmp_path / "b"), "--quiet"]) == 130
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.setattr(degrade.DegradeStage, "__init__", real)
    assert cli_main(["degrade", str(photos), str(tmp_path / "c"), "--quiet"]) == 0  # the next command is not stopped by it
