"""Session of 2026-12-04 (fourth part): what campaign 13b (the stages' output contract) found. Each test
fails on the code before its mend."""

from __future__ import annotations

from tests.conftest import synthetic_fundus
from tests.test_run import photos, tiny  # noqa: F401  (fixtures)


def test_the_report_of_a_simulated_run_rebuilds_its_thumbnails(photos, tmp_path, tiny, capsys):  # noqa: F811
    """13b D1: `fundus report` on a `--simulate` run checked each row's input (the degraded image) against the
    sha256 of its clean original, called every input "changed since the run" and dropped the input thumbnails
    and vessel overlays. A degraded image replaced since the run is still named."""
    import numpy as np
    from PIL import Image

    from tests.test_campaign9 import run
    from tests.test_run import tiny_args

    for code in ("111", "001,100"):
        out = tmp_path / f"s{code.replace(',', '_')}"
        assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade,segment", "--simulate", code, "--seed", "3")) == 0
        capsys.readouterr()
        written = (out / "report.html").read_bytes()
        assert run("report", out) == 0
        assert "warning" not in capsys.readouterr().err
        assert (out / "report.html").read_bytes() == written  # the page the run wrote, byte for byte
    degraded = sorted((out / "degrade").glob("*.png"))[0]
    a = np.asarray(Image.open(degraded))
    Image.fromarray(synthetic_fundus(a.shape[1], a.shape[0], 9)).save(degraded)
    assert run("report", out) == 0
    err = capsys.readouterr().err
    assert "changed since the run" in err and degraded.stem in err


def test_a_stage_manifest_records_the_threads_that_fix_its_bytes(photos, tmp_path, tiny):  # noqa: F811
    """13b D4: a stage folder did not say which --threads would reproduce its bytes (the default follows
    --workers, and the thread count can move a 16-bit probability by one level); `fundus run` recorded it."""
    import json

    from fundus_pipeline.runner import default_threads
    from tests.test_campaign9 import run

    for i, (extra, want) in enumerate(((("--threads", "1"), 1), (("--workers", "2"), default_threads(2)))):
        out = tmp_path / f"seg{i}"
        assert run("segment", photos, out, "--weights", tiny["imff_tiny"], "--arch", "imff_tiny", "--device", "cpu", "-q", *extra) == 0
        assert json.loads((out / "manifest.json").read_text())["threads_used"] == want
    out = tmp_path / "deg"
    assert run("degrade", photos, out, "--threads", "1", "-q") == 0
    assert json.loads((out / "manifest.json").read_text())["threads_used"] == 1


def test_an_interrupted_run_does_not_say_a_photograph_was_segmented(photos, tmp_path, tiny, monkeypatch):  # noqa: F811
    """13b D9: rows an interrupted run had not segmented read "not enhanced: the input is segmented", as if
    done; they now say that step has not run yet (the decision stands: it is what a --resume will do)."""
    from fundus_pipeline.stages.segment import SegmentStage
    from tests.test_campaign9 import run
    from tests.test_run import ctrl_c_at_second_item, rows_of, tiny_args

    ctrl_c_at_second_item(monkeypatch, SegmentStage)
    out = tmp_path / "out"
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade,segment", "--workers", "1")) == 130
    rows = rows_of(out / "results.csv").values()
    done = [r for r in rows if r["vessels_image"]]
    waiting = [r for r in rows if r["status"] == "pending"]
    assert done and waiting and all(r["segmented"] == "input" for r in rows)
    assert all(r["segment_reason"].endswith("(not run yet: the run stopped before)") for r in waiting)
    assert not any("not run yet" in r["segment_reason"] for r in done)


def test_degrade_variants_that_pair_with_nothing_get_a_hint(tmp_path, capsys):
    """13b D5: predictions of `fundus degrade --types 001,111` outputs (KEY_<code>) pair with no ground truth;
    the evaluators said only that nothing paired, with no way on."""
    from PIL import Image

    from tests.test_campaign9 import run

    pred, gt, enh, ref = tmp_path / "pred", tmp_path / "gt", tmp_path / "enh", tmp_path / "ref"
    for d in (pred, gt, enh, ref):
        d.mkdir()
    img = synthetic_fundus(64, 64, 1)
    for code in ("001", "111"):
        Image.fromarray(img[..., 1]).save(pred / f"01_test_{code}_prob.png")
        Image.fromarray(img).save(enh / f"01_test_{code}.png")
    Image.fromarray((img[..., 1] > 100).astype("uint8") * 255).save(gt / "01_manual1.png")
    Image.fromarray(img).save(ref / "01_test.png")
    for args in (("evaluate", "segment", pred, gt), ("evaluate", "enhance", enh, ref)):
        assert run(*args) == 2
        err = capsys.readouterr().err
        assert "Hint: these look like `fundus degrade` variants" in err and "--simulate" in err, err
    # review 14 R4: files merely numbered _001 .. that would not pair without the number get no such hint
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray((img[..., 1] > 100).astype("uint8") * 255).save(other / "case_001_manual1.png")
    assert run("evaluate", "segment", pred, other) == 2
    assert "fundus degrade" not in capsys.readouterr().err


def test_a_replay_shows_itself_its_own_way_and_always_says_its_outcome(photos, tmp_path, tiny, capsys):  # noqa: F811
    """13b D10: a replay took the recorded run's --format json and --quiet (a JSON document under -q, no
    progress), and with --format json its one line on stderr was not printed."""
    import json

    from tests.test_campaign9 import run
    from tests.test_run import tiny_args

    out = tmp_path / "out"
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade,segment", "--format", "json")) == 0
    capsys.readouterr()
    assert run("run", "--replay", out / "manifest.json", tmp_path / "again") == 0
    got = capsys.readouterr()
    assert not got.out.lstrip().startswith("{") and "--replay: identical to the recorded run" in got.err  # human, the default
    assert "grade: 3/3" in got.err  # progress: the recorded --quiet is not replayed either (review 14 R10)
    assert run("run", "--replay", out / "manifest.json", tmp_path / "again2", "--format", "json") == 0
    got = capsys.readouterr()
    assert json.loads(got.out)["replay"]["differs"] == 0 and "--replay: identical to the recorded run" in got.err


def test_a_ctrl_c_after_the_command_has_ended_does_not_change_its_exit_status(tmp_path):
    """13b D12: a SIGINT that arrived while the interpreter shut down (after the summary was printed and the
    manifest said finished) made the exit status 130."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = (
        "import atexit, os, signal, sys, time\n"
        "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.2)))\n"
        "from fundus_pipeline.cli import main\n"
        "sys.argv = ['fundus', 'models']\n"
        "main()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-2000:])


def test_a_resume_on_another_thread_count_is_recorded(photos, tmp_path, tiny, monkeypatch):  # noqa: F811
    """Review 14 R1: after a --resume on another --threads the manifests recorded only the last count, though
    rows made with the first are in the folder (a count can move a probability by one level)."""
    import json

    from fundus_pipeline.stages.segment import SegmentStage
    from tests.test_campaign9 import run
    from tests.test_run import ctrl_c_at_second_item, tiny_args

    seg = ("--weights", tiny["imff_tiny"], "--arch", "imff_tiny", "--device", "cpu", "-q", "--workers", "1")
    ctrl_c_at_second_item(monkeypatch, SegmentStage)
    assert run("segment", photos, tmp_path / "s", *seg, "--threads", "2") == 130
    monkeypatch.undo()
    assert run("segment", photos, tmp_path / "s", *seg, "--threads", "1", "--resume") == 0
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["threads_used"] == [1, 2] and sorted(r["threads"] for r in m["items"]) == [1, 1, 2]

    args = tiny_args(tiny, "--steps", "grade,segment", "--workers", "1")
    ctrl_c_at_second_item(monkeypatch, SegmentStage)
    assert run("run", photos, tmp_path / "r", *args, "--threads", "2") == 130
    monkeypatch.undo()
    assert run("run", photos, tmp_path / "r", *args, "--threads", "1", "--resume") == 0
    m = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert m["threads_used"] == [1, 2] and m["stages"]["segment"]["threads_used"] == [1, 2]
    assert m["stages"]["grade"]["threads_used"] == 2  # graded before the interruption, all on 2
    assert run("run", photos, tmp_path / "u", *args, "--threads", "1") == 0  # one count: a number
    assert json.loads((tmp_path / "u" / "manifest.json").read_text())["threads_used"] == 1



def test_without_address_the_ray_engine_starts_its_own_local_instance():
    """Found while campaign 14b ran a cluster on this machine: without --address, ray.init() connected to the
    cluster that `ray start --head` had started here (or RAY_ADDRESS names) and refused the CPU count, so
    every --engine ray run failed ("When connecting to an existing cluster, num_cpus ... must not be provided");
    the README promises a local instance of the run's own."""
    import pytest

    pytest.importorskip("ray")
    from fundus_pipeline.ray_engine import RayEngine

    calls = []

    class FakeRay:
        def is_initialized(self):
            return False

        def init(self, **kwargs):
            calls.append(kwargs)

    engine = RayEngine(workers=1)
    engine.ray = FakeRay()
    engine.start()
    assert calls[0]["address"] == "local" and calls[0]["num_cpus"] >= 1


def test_ground_truth_files_of_one_key_are_refused_and_an_empty_one_is_not_the_working_folder(photos, tmp_path, tiny, capsys):  # noqa: F811
    """Campaign 14a E3: --ground-truth (or the config's ground_truth) pointed at a folder holding two files of
    one key (DRIVE/test: the 1st observer and the FOV mask) paired with the last one silently (f1_gt 0.24
    instead of 0.82, exit 0), where `fundus evaluate segment` refuses; ground_truth = "" was the working folder."""
    import numpy as np
    from PIL import Image

    from fundus_pipeline.config import RunConfig
    from tests.test_campaign9 import run
    from tests.test_run import tiny_args

    gt = tmp_path / "test"
    for sub in ("1st_manual", "mask"):
        (gt / sub).mkdir(parents=True)
    for i, shape in enumerate(((96, 112), (80, 80), (88, 96))):  # the photos fixture's sizes
        manual = np.zeros(shape, np.uint8)
        manual[shape[0] // 2, :] = 255  # a vessel: a ground truth without one is an error row since review 23 R23-1
        Image.fromarray(manual).save(gt / "1st_manual" / f"p{i}_manual1.png")
        Image.fromarray(np.full(shape, 255, np.uint8)).save(gt / "mask" / f"p{i}_mask.png")
    args = tiny_args(tiny, "--steps", "grade,segment", "--simulate", "111")
    assert run("run", photos, tmp_path / "o", *args, "--ground-truth", gt) == 2
    err = capsys.readouterr().err
    assert "two --ground-truth files pair under the same key" in err and not (tmp_path / "o").exists()
    assert run("run", photos, tmp_path / "o2", *args, "--ground-truth", gt / "1st_manual") == 0
    cfg = tmp_path / "c.toml"
    cfg.write_text('ground_truth = ""\n')
    assert run("run", photos, tmp_path / "o3", *args, "--config", cfg) == 2
    assert "--ground-truth '': empty" in capsys.readouterr().err
    assert run("run", photos, tmp_path / "o4", *args, "--ground-truth", "") == 2  # review 15: on the command line too
    assert "empty" in capsys.readouterr().err and not (tmp_path / "o4").exists()
    import pytest

    from fundus_pipeline.errors import UsageError

    with pytest.raises(UsageError, match="empty"):
        RunConfig.build(ground_truth="", simulate="111")


def test_the_command_line_overrides_a_config_value_that_would_fail_alone(photos, tmp_path, tiny):  # noqa: F811
    """Campaign 14a E4: the file was validated alone before the command line was applied, so steps = ["grade",
    "score"] (score needs enhance) aborted a run whose --steps replaced it."""
    from tests.test_campaign9 import run
    from tests.test_run import tiny_args

    cfg = tmp_path / "c.toml"
    cfg.write_text('steps = ["grade", "score"]\nmin_gain = 7.0\n')
    args = tiny_args(tiny, "--config", cfg)
    assert run("run", photos, tmp_path / "o", *args) == 2  # the file alone is still checked
    assert run("run", photos, tmp_path / "o", *args, "--steps", "grade,segment", "--min-gain", "0.1") == 0

