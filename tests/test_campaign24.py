"""Known-left items of review 22 and campaign 23 (mended 2026-12-05), and campaigns 24a (the Ray engine) and
24b (the evaluate commands and grading as a screening programme)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import synthetic_fundus
from tests.test_campaign8 import _photos
from tests.test_run import photos, rows_of, run, tiny, tiny_args  # noqa: F401  (photos, tiny: fixtures)
from tests.test_campaign11 import built  # noqa: F401  (a fixture)


# ------------------------------------------------------------------------------------------------ review 22 L6
def test_a_row_whose_photograph_changed_under_the_run_carries_no_figure_and_counts_as_nothing(tmp_path, tiny, monkeypatch):  # noqa: F811
    """L6: the row was an error, yet it kept its grade, its gain from two versions and its vessel image, and the
    summary counted it as graded, enhanced and trusted."""
    from fundus_pipeline import chain

    folder = _photos(tmp_path / "in", 2)
    real = chain.Chain._stage

    def stage(self, name, *args, **kw):
        got = real(self, name, *args, **kw)
        if name == "enhance":  # replaced after it was graded and enhanced, before it is scored against its input
            Image.fromarray(synthetic_fundus(72, 80, 9)).save(folder / "p1.png")
        return got

    monkeypatch.setattr(chain.Chain, "_stage", stage)
    out = tmp_path / "out"
    assert run("run", folder, out, *tiny_args(tiny, "--min-gain", "-1", "--enhance-if", "good,usable,reject")) == 3
    rows = rows_of(out / "results.csv")
    assert rows["p0"]["status"] == "ok" and rows["p0"]["grade"] and rows["p0"]["segmented"] == "enhanced"
    bad = rows["p1"]
    assert bad["status"] == "error" and "changed during the run" in bad["error"]
    figures = {k: v for k, v in bad.items() if k not in ("key", "input", "status", "error")}
    assert not any(figures.values()), figures
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["error"] == 1 and counts["enhanced"] == counts["enhanced_used"] == counts["segmented"] == 1
    assert sum(counts[g] for g in ("good", "usable", "reject")) == 1


# ------------------------------------------------------------------------------------------------ review 22 L3
def _renamed_keys(tmp_path):
    """A list file of two photographs, then a third in another folder (every key renamed: 'x' is now 'a/x')."""
    for rel in ("imgs/a/x.png", "imgs/a/y.png", "imgs/b/z.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(synthetic_fundus(72, 80, len(rel))).save(tmp_path / rel)
    listing = tmp_path / "l.txt"
    listing.write_text("imgs/a/x.png\nimgs/a/y.png\n")
    return listing


def test_a_resumes_renamed_keys_are_noted_once_in_fundus_run_and_recorded_under_quiet(tmp_path, tiny, capsys):  # noqa: F811
    """L3: the note was said once per stage of `fundus run` (three times for grade, enhance, segment), and under
    --quiet or --format json it was said nowhere, not even in a manifest."""
    listing = _renamed_keys(tmp_path)
    out = tmp_path / "o"
    assert run("run", listing, out, *tiny_args(tiny)) == 0
    listing.write_text("imgs/a/x.png\nimgs/a/y.png\nimgs/b/z.png\n")
    capsys.readouterr()
    assert run("run", listing, out, *[a for a in tiny_args(tiny, "--resume") if a != "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("listed now under another key") == 1, err
    m = json.loads((out / "manifest.json").read_text())
    noted = {name: st.get("resume_notes") for name, st in m["stages"].items()}
    assert noted["grade"] and "e.g. 'x' is now 'a/x'" in noted["grade"][0], noted
    stage_m = json.loads((out / "grade" / "manifest.json").read_text())
    assert "listed now under another key" in stage_m["resume_notes"][0]

    out2 = tmp_path / "d"
    listing.write_text("imgs/a/x.png\nimgs/a/y.png\n")
    assert run("degrade", listing, out2, "--types", "111", "--quiet") == 0
    listing.write_text("imgs/a/x.png\nimgs/a/y.png\nimgs/b/z.png\n")
    capsys.readouterr()
    assert run("degrade", listing, out2, "--types", "111", "--resume", "--format", "json") == 0
    got = capsys.readouterr()
    assert "listed now under another key" not in got.err  # not said under --format json, but recorded
    assert "listed now under another key" in json.loads(got.out)["resume_notes"][0]
    assert "listed now under another key" in json.loads((out2 / "manifest.json").read_text())["resume_notes"][0]


# ------------------------------------------------------------------------------------------------ 23b LOW-1, LOW-3
def test_a_resume_says_what_it_redoes_and_drops_and_an_item_failing_now_names_its_earlier_outputs(tmp_path, capsys):
    """LOW-3: a resume after one photograph was replaced, one cut short and one deleted said only "2 already done,
    resumed". LOW-1: the one that fails now had an error row while the outputs of its earlier bytes stayed
    beside it, unmentioned (a glob of the folder picks up an image the table marks as failed)."""
    folder = _photos(tmp_path / "in", 4)
    out = tmp_path / "d"
    assert run("degrade", folder, out, "--types", "111", "--quiet") == 0
    Image.fromarray(synthetic_fundus(72, 80, 9)).save(folder / "p0.png")  # replaced
    data = (folder / "p1.png").read_bytes()
    (folder / "p1.png").write_bytes(data[: len(data) // 2])  # cut short: fails now
    (folder / "p3.png").unlink()  # deleted
    capsys.readouterr()
    assert run("degrade", folder, out, "--types", "111", "--resume") == 3
    err = capsys.readouterr().err
    assert "note: 2 photograph(s) done before changed since (its bytes differ from those recorded) and are processed again (e.g. 'p0')" in err
    assert "note: 1 photograph(s) done before are no longer among the inputs (e.g. 'p3')" in err
    rows = rows_of(out / "results.csv")
    assert set(rows) == {"p0", "p1", "p2"} and rows["p0"]["status"] == "ok" and rows["p1"]["status"] == "error"
    assert rows["p1"]["error"].endswith("(outputs of an earlier run from other bytes stay: p1.png)"), rows["p1"]["error"]
    assert (out / "p1.png").is_file() and (out / "p3.png").is_file()  # left, not removed
    notes = json.loads((out / "manifest.json").read_text())["resume_notes"]
    assert len(notes) == 2 and "no longer among the inputs" in notes[1]
    (out / "p2.png").unlink()  # an output removed: processed again, and said so
    assert run("degrade", folder, out, "--types", "111", "--resume") == 3
    err = capsys.readouterr().err
    assert "1 photograph(s) done before lost or changed an output file since and are processed again (e.g. 'p2')" in err
    assert "changed since" not in err  # p1 failed before: retried, not "changed"
    assert rows_of(out / "results.csv")["p1"]["error"].endswith("stay: p1.png)")  # still said on the next resume


# ------------------------------------------------------------------------------------------------ 24b F1, F4
def _sorted_results(out, rows):
    import csv

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["key", "input", "status", "grade"])
        for key, src, grade in rows:
            w.writerow([key, str(src), "ok", grade])


def test_a_regraded_or_retaken_photograph_in_a_sub_folder_leaves_no_stale_copy(tmp_path):
    """F1: the stale-copy check looked at OUT/<other>/NAME, not OUT/<other>/sub/NAME: a regraded photograph of a
    sub-folder sat in two class folders; and a photograph retaken under the same name (other bytes) always did."""
    from fundus_pipeline.cli.grade import sort_into

    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    sb, tb = src / "sub" / "sb.png", src / "tb.png"
    sb.write_bytes(b"photo sb")
    tb.write_bytes(b"photo tb")
    out = tmp_path / "out"
    _sorted_results(out, [("sub/sb", sb, "usable"), ("tb", tb, "usable")])
    sort_into(out)
    (out / "good").mkdir()
    (out / "good" / "sub").mkdir()
    (out / "good" / "sub" / "mine.png").write_bytes(b"the user's own")
    _sorted_results(out, [("sub/sb", sb, "reject"), ("tb", tb, "reject")])  # regraded
    sort_into(out)
    assert not (out / "usable" / "sub" / "sb.png").exists() and (out / "reject" / "sub" / "sb.png").read_bytes() == b"photo sb"
    assert not (out / "usable" / "tb.png").exists()
    sb.write_bytes(b"photo sb, retaken")  # the same name, other bytes: graded good now
    _sorted_results(out, [("sub/sb", sb, "good"), ("tb", tb, "reject")])
    (out / "reject" / "tb.png").write_bytes(b"edited by the user since")
    _sorted_results(out, [("sub/sb", sb, "good"), ("tb", tb, "good")])
    sort_into(out)
    assert not (out / "reject" / "sub" / "sb.png").exists() and (out / "good" / "sub" / "sb.png").read_bytes() == b"photo sb, retaken"
    assert (out / "reject" / "tb.png").read_bytes() == b"edited by the user since"  # changed since the sort wrote it: kept
    assert (out / "good" / "sub" / "mine.png").read_bytes() == b"the user's own"
    assert sb.read_bytes() == b"photo sb, retaken" and tb.read_bytes() == b"photo tb"
    paths = [json.loads(line)["path"] for line in (out / ".fundus-sorted.jsonl").read_text().splitlines()]
    assert paths == ["good/sub/sb.png", "good/tb.png", "reject/tb.png"]  # the copies in place, once each


def test_sort_into_reads_its_table_as_utf8_whatever_the_locale(tmp_path):
    """F4: results.csv (UTF-8) was read back in the locale's encoding: under LC_ALL=C a name such as Müller.png was
    an internal error and nothing was sorted."""
    import os
    import subprocess
    import sys

    src = tmp_path / "in"
    src.mkdir()
    (src / "Müller.png").write_bytes(b"photo")
    out = tmp_path / "out"
    _sorted_results(out, [("Müller", src / "Müller.png", "good")])
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    code = f"from pathlib import Path; from fundus_pipeline.cli.grade import sort_into; print(sort_into(Path({str(out)!r})))"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert (out / "good" / "Müller.png").read_bytes() == b"photo"


# ------------------------------------------------------------------------------------------------ 24b F2
def test_a_two_level_mask_is_its_brighter_level_and_an_empty_ground_truth_is_an_error(tmp_path):
    """F2: masks were cut at half the dtype maximum: a 16-bit 0/255 ground truth (as ImageJ or OpenCV write it)
    was empty (sensitivity 1, F1 0, exit 0), such a prediction against it a perfect 1.0, a 0/100 prediction empty."""
    import csv

    import numpy as np

    from fundus_pipeline.cli import main as cli_main

    rng = np.random.default_rng(0)
    truth = rng.random((40, 48)) < 0.15
    pred = truth.copy()
    pred[:5] = ~pred[:5]  # some errors: F1 strictly between 0 and 1
    tp, fp, fn = int((pred & truth).sum()), int((pred & ~truth).sum()), int((~pred & truth).sum())
    f1 = 2 * tp / (2 * tp + fp + fn)
    for name, g16, p_arr in (("a", truth.astype(np.uint16) * 255, pred.astype(np.uint16) * 255),  # 16-bit 0/255 both
                             ("b", truth.astype(np.uint8) * 255, pred.astype(np.uint8) * 100)):  # 8-bit 0/100 prediction
        (tmp_path / name / "g").mkdir(parents=True)
        (tmp_path / name / "p").mkdir()
        Image.fromarray(g16).save(tmp_path / name / "g" / "x.png")
        Image.fromarray(p_arr).save(tmp_path / name / "p" / "x.png")
        out = tmp_path / name / "out"
        assert cli_main(["evaluate", "segment", str(tmp_path / name / "p"), str(tmp_path / name / "g"), "--bootstrap", "0", "--out", str(out)]) == 0
        row = next(csv.DictReader(open(out / "metrics.csv")))
        assert abs(float(row["f1"]) - f1) < 1e-4, (name, row["f1"], f1)
    empty = tmp_path / "a" / "g" / "x.png"
    Image.fromarray(np.zeros((40, 48), np.uint16)).save(empty)  # no vessel at all: an error row, exit 3
    out = tmp_path / "a" / "out2"
    assert cli_main(["evaluate", "segment", str(tmp_path / "a" / "p"), str(tmp_path / "a" / "g"), "--bootstrap", "0", "--out", str(out)]) == 3
    row = next(csv.DictReader(open(out / "metrics.csv")))
    assert "no vessel pixel inside the FOV" in row["status"]


# ------------------------------------------------------------------------------------------------ 24b F3, F5, F6, F7
def test_evaluate_refuses_ragged_rows_a_near_miss_part_and_reads_an_empty_source_as_its_own(tmp_path, capsys):
    """F3: a short row (no key cell) was an internal error in evaluate grade and score, a long one's cells dropped in
    silence. F5: label rows of part 'TEST' or 'test ' were left out as "other parts". F6: every empty source was one
    source "" in evaluate score (its own in evaluate grade). F7: a header-only labels file and an empty quality."""
    from fundus_pipeline.cli import main as cli_main

    def ev(*args):
        capsys.readouterr()
        code = cli_main(["evaluate", *map(str, args), "--bootstrap", "0", "--out", str(tmp_path / "o")])
        return code, capsys.readouterr().err

    res, lab = tmp_path / "res.csv", tmp_path / "lab.csv"
    lab.write_text("key,quality\na,0\n")
    for body, cells in (("good,a,0.8,0.1,0.1\ngood\n", "1 cell(s) on line 3, its header 5"), ("good,a,0.8,0.1,0.1,9\n", "6 cell(s) on line 2, its header 5")):
        res.write_text("grade,key,p_good,p_usable,p_reject\n" + body)
        code, err = ev("grade", res, lab)
        assert code == 2 and cells in err and "internal error" not in err, err
    res.write_text("grade,key,p_good,p_usable,p_reject\ngood,a,0.8,0.1,0.1\n")
    lab.write_text("key,quality\n")
    code, err = ev("grade", res, lab)
    assert code == 2 and "the labels file" in err and "has no rows" in err
    lab.write_text("key,quality\na,\n")
    code, err = ev("grade", res, lab)
    assert code == 2 and "has an empty quality for key 'a'" in err

    scores, pairs = tmp_path / "s.csv", tmp_path / "p.csv"
    scores.write_text("status,key,score\nok,k0,0.1\nok,k1,0.5\nok,k2,0.3\nok\n")
    pairs.write_text("key,part,source,label\nk0,test,s0,0.1\nk1,test,s1,0.5\nk2,test,s2,0.3\n")
    code, err = ev("score", scores, pairs, "--by", "")
    assert code == 2 and "1 cell(s) on line 5, its header 3" in err and "internal error" not in err
    scores.write_text("key,score\n" + "".join(f"k{i},{i}\n" for i in range(6)))
    pairs.write_text("key,part,source,label\n" + "".join(f"k{i},{'TEST' if i == 5 else 'test'},,{i % 4}\n" for i in range(6)))
    code, err = ev("score", scores, pairs, "--by", "")
    assert code == 2 and "has part 'TEST' where 'test' is meant" in err
    pairs.write_text("key,part,source,label\n" + "".join(f"k{i},test,{'' if i < 4 else 'shared'},{i % 4}\n" for i in range(6)))
    assert ev("score", scores, pairs, "--by", "")[0] == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["n_sources"] == 5  # four pairs with no source, each its own, and one source of two


# ------------------------------------------------------------------------------------------------ 24b F7 (resume)
def test_a_resume_with_other_options_names_what_differs(photos, tmp_path, tiny, capsys):  # noqa: F811
    """F7: "written with a different configuration" did not say which option differed."""
    out = tmp_path / "g"
    grade = ("--weights", tiny["hemf_tiny"], "--arch", "hemf_tiny", "--device", "cpu", "--quiet")
    assert run("grade", photos, out, *grade) == 0
    capsys.readouterr()
    assert run("grade", photos, out, *grade, "--resume", "--flag-threshold", "0.3") == 2
    assert "different configuration (flag_threshold: 0.5 there, 0.3 now)" in capsys.readouterr().err
    out = tmp_path / "r"
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade")) == 0
    capsys.readouterr()
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade", "--resume", "--min-gain", "0.2")) == 2
    assert "another configuration or other weights (min_gain: 0.0 there, 0.2 now)" in capsys.readouterr().err


def test_an_unclosed_quote_is_named_not_read_as_the_rest_of_the_file(tmp_path, capsys):
    """F7: an unbalanced quote swallowed the rest of the file into one cell, reported as a bad grade."""
    from fundus_pipeline.cli import main as cli_main

    (tmp_path / "res.csv").write_text('grade,key,p_good,p_usable,p_reject\ngood,"a,0.8,0.1,0.1\ngood,b,0.8,0.1,0.1\n')
    (tmp_path / "lab.csv").write_text("key,quality\na,0\nb,0\n")
    assert cli_main(["evaluate", "grade", str(tmp_path / "res.csv"), str(tmp_path / "lab.csv"), "--bootstrap", "0", "--out", str(tmp_path / "o")]) == 2
    assert "a quote opened and never closed?" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ 23a L2, L6
def test_a_cut_photograph_is_found_before_any_source_is_built_and_progress_gives_the_time_left(fake_data, tmp_path, capsys):
    """L2: a truncated photograph was found only at its turn, after every source before it had been built (most of
    an hour in a default build). L6: the progress lines gave no time left, and a resume did not say what it kept."""
    import shutil

    from tests.test_campaign11 import _qbuild

    data = tmp_path / "data"
    shutil.copytree(fake_data, data)
    cut = data / "HEI-MED" / "images" / "00000000.jpg"
    raw = cut.read_bytes()
    cut.write_bytes(raw[: len(raw) // 2])
    out = tmp_path / "set"
    capsys.readouterr()
    assert _qbuild(data, out) == 1
    err = capsys.readouterr().err
    assert "00000000.jpg: truncated or corrupt JPEG" in err and len(err.strip().splitlines()) == 1, err
    assert not list(out.rglob("*.png")) and not list(out.rglob("rows/train/*.json"))  # nothing built
    cut.write_bytes(raw)
    assert _qbuild(data, out) == 0
    got = capsys.readouterr()
    text = got.out + got.err
    assert "checked the 3 source photograph(s) to build" in text and "so far, about" in text and "left)" in text
    (out / "rows" / "train" / f"{sorted(p.stem for p in (out / 'rows' / 'train').glob('*.json'))[0]}.json").unlink()
    assert _qbuild(data, out) == 0
    got = capsys.readouterr()
    assert "2 of 3 sources were built by an earlier run and are kept; 1 to build" in got.out + got.err


# ------------------------------------------------------------------------------------------------ 23a L5
def test_a_sets_manifest_names_the_code_the_command_and_the_environment(built):  # noqa: F811
    """L5: the set manifest recorded only fundus_version 0.1.0 (every commit), no command line and no versions."""
    import platform

    import numpy as np

    from fundus_pipeline import __version__

    m = json.loads((built / "manifest.json").read_text())
    assert m["code"]["version"] == __version__
    if (Path(__file__).resolve().parents[1] / ".git").exists():  # a checkout (CI's clean clone is one) records its commit
        assert len(m["code"]["git_commit"]) >= 40
    assert isinstance(m["command"], list) and m["command"]
    assert m["environment"]["python"] == platform.python_version() and m["environment"]["numpy"] == np.__version__


# ------------------------------------------------------------------------------------------------ 24a (the Ray engine)
class _FakeRay:
    """What RayEngine.start calls of Ray: an init that sets Ray's SIGTERM handler (as ray.init does), or hangs."""

    def __init__(self, hang: bool = False):
        self.hang, self.up = hang, False

    def is_initialized(self):
        return self.up

    def init(self, address=None, **kw):
        import signal
        import sys
        import time

        signal.signal(signal.SIGTERM, lambda s, f: sys.exit(15))
        while self.hang:  # a GCS that never answers: Ray retries for as long as it is left to
            time.sleep(0.01)
        self.up = True

    def shutdown(self):
        self.up = False


def test_ray_init_leaves_the_stop_signals_as_fundus_set_them(monkeypatch):
    """C24A-1: ray.init replaced the SIGTERM handler: a scheduler's SIGTERM exited 15 with no summary and a manifest
    "stopped" (or "running"), not 130 and "interrupted"."""
    import signal

    pytest.importorskip("ray")
    from fundus_pipeline.ray_engine import RayEngine

    mine = lambda s, f: None  # noqa: E731
    before = signal.signal(signal.SIGTERM, mine)
    try:
        engine = RayEngine()
        engine.ray = _FakeRay()
        engine.start()
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_cluster_address_that_never_answers_is_given_up_and_a_malformed_one_is_a_usage_error(monkeypatch, photos, tmp_path, capsys):  # noqa: F811
    """C24A-2: ray.init retried an address where another service listens for more than 11 minutes. C24A-3: a
    malformed --address was exit 1 with a hint about token authentication."""
    import time

    pytest.importorskip("ray")
    from fundus_pipeline import ray_engine
    from fundus_pipeline.errors import FundusError

    monkeypatch.setattr(ray_engine, "CONNECT_TIMEOUT_S", 0.3)
    monkeypatch.setattr(ray_engine, "_check_reachable", lambda address: None)  # (the port answers)
    engine = ray_engine.RayEngine(address="127.0.0.1:18765")
    engine.ray = _FakeRay(hang=True)
    t0 = time.monotonic()
    with pytest.raises(FundusError, match="no answer as a Ray cluster within 0 s"):
        engine.start()
    assert time.monotonic() - t0 < 5
    for bad in ("garbage", "127.0.0.1", "http://h:1"):
        capsys.readouterr()
        assert run("degrade", photos, tmp_path / "o", "--engine", "ray", "--address", bad) == 2
        err = capsys.readouterr().err
        assert "is not an address of a Ray cluster" in err and "token" not in err and not (tmp_path / "o").exists()


def test_rays_will_be_retried_line_is_not_shown_while_the_engine_stops_its_actors(capsys):
    """C24A-5: a Ctrl-C printed "There are 1 retries remaining, so the task will be retried" although the run stops."""
    ray = pytest.importorskip("ray")
    import sys

    from fundus_pipeline import ray_engine

    ray_engine._quiet(ray)
    show = sys.modules["ray._private.worker"].print_to_stdstream
    line = {"pid": "raylet", "lines": ["Task MapWorker.submit failed. There are 1 retries remaining, so the task will be retried. Error: killed"]}
    try:
        ray_engine._STOPPING[0] = True
        show(line)
        assert "will be retried" not in capsys.readouterr().err
        ray_engine._STOPPING[0] = False
        show(line)
        assert "ray: Task MapWorker.submit failed" in capsys.readouterr().err
    finally:
        ray_engine._STOPPING[0] = False


# ------------------------------------------------------------------------------------------------ 23a L8
def test_the_set_builders_options_state_their_ranges_alike(capsys):
    """L8: --limit showed [x>=1] with click's error, --draws, --seed and --size no range at all."""
    from fundus_pipeline.cli import main as cli_main

    for cmd, draws in (("quality-set", "(1-20)"), ("grade-set", "(1-50)")):
        assert cli_main(["build", cmd, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert f"Degradations per source photograph {draws}" in text and "Seed of every degradation draw (>= 0)" in text
        assert "(64-2048)" in text and "part (quick builds; >= 1)" in text and "x>=1" not in text


# ------------------------------------------------------------------------------------------------ 21a (left): SSIM per row
def test_a_simulated_runs_page_shows_each_photographs_ssim_before_and_after(photos, tmp_path, tiny):  # noqa: F811
    """21a left: the per-photograph SSIM against the clean original was in results.csv only; the page showed PSNR."""
    out = tmp_path / "s"
    assert run("run", photos, out, *tiny_args(tiny, "--simulate", "111", "--steps", "segment")) == 0
    page = (out / "report.html").read_text()
    assert "SSIM before" in page and "SSIM after" in page
    for r in rows_of(out / "results.csv").values():
        assert f'<td class="num">{float(r["ssim_before"]):.3f}</td><td class="num">{float(r["ssim_after"]):.3f}</td>' in page


# ------------------------------------------------------------------------------------------------ review 23 R23-1
def test_a_simulated_run_reads_a_0_1_or_16_bit_ground_truth_as_evaluate_segment_does(tmp_path, tiny):  # noqa: F811
    """R23-1: the F2 mend (a mask of two grey levels is its brighter level) reached evaluate segment only: fundus run
    --simulate --ground-truth read an 8-bit 0/1 or 16-bit 0/255 manual map as empty (f1_gt 1.0 or 0, exit 0)."""
    import numpy as np

    clean, out = tmp_path / "clean", {}
    clean.mkdir()
    img = synthetic_fundus(96, 96, 0)
    Image.fromarray(img).save(clean / "00_test.png")
    vessels = (img[..., 1] < 0.6 * img[..., 1][img.max(2) > 20].mean()) & (img.max(2) > 20)
    for name, arr in (("u8", vessels.astype(np.uint8) * 255), ("u8_01", vessels.astype(np.uint8)), ("u16", vessels.astype(np.uint16) * 255)):
        truth = tmp_path / name
        truth.mkdir()
        Image.fromarray(arr).save(truth / "00_manual1.png")
        out[name] = tmp_path / f"o_{name}"
        assert run("run", clean, out[name], *tiny_args(tiny, "--simulate", "001", "--steps", "segment", "--ground-truth", truth)) == 0
    ref = rows_of(out["u8"] / "results.csv")["00_test"]
    assert ref["f1_gt_before"] != "" and ref["status"] == "ok"
    for name in ("u8_01", "u16"):
        r = rows_of(out[name] / "results.csv")["00_test"]
        assert (r["f1_gt_before"], r["f1_gt_after"]) == (ref["f1_gt_before"], ref["f1_gt_after"]), name
    empty = tmp_path / "empty"
    empty.mkdir()
    Image.fromarray(np.zeros((96, 96), np.uint8)).save(empty / "00_manual1.png")
    assert run("run", clean, tmp_path / "o_empty", *tiny_args(tiny, "--simulate", "001", "--steps", "segment", "--ground-truth", empty)) == 3
    assert "no vessel pixel inside the FOV" in rows_of(tmp_path / "o_empty" / "results.csv")["00_test"]["error"]


# ------------------------------------------------------------------------------------------------ review 23 R23-2, R23-10
def test_fundus_runs_resume_notes_name_their_stage_and_a_key_naming_another_file_is_noted(tmp_path, tiny, capsys):  # noqa: F811
    """R23-2: a chained resume printed the same event twice with different counts and no stage ("2 photograph(s) no
    longer among the inputs", then "1 ..."). R23-10: a key that now names another file (p0.png replaced by p0.jpg)
    was processed again without a word."""
    folder = _photos(tmp_path / "in", 3)
    out = tmp_path / "r"
    loud = [a for a in tiny_args(tiny, "--resume") if a != "--quiet"]
    assert run("run", folder, out, *tiny_args(tiny)) == 0
    (folder / "p2.png").unlink()
    capsys.readouterr()
    assert run("run", folder, out, *loud) == 0
    err = capsys.readouterr().err
    assert "note: grade: 1 photograph(s) done before are no longer among the inputs (e.g. 'p2')" in err
    assert err.count("no longer among the inputs") == 1  # each stage found it: said once
    d = tmp_path / "d"
    assert run("degrade", folder, d, "--types", "111", "--quiet") == 0
    Image.open(folder / "p0.png").convert("RGB").save(folder / "p0.jpg", quality=95)
    (folder / "p0.png").unlink()
    capsys.readouterr()
    assert run("degrade", folder, d, "--types", "111", "--resume") == 0
    assert "note: 1 photograph(s) done before are listed now as another file under the same key and are processed again (e.g. 'p0')" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ review 23 R23-3
def test_sort_into_leaves_a_copy_the_user_put_in_another_class_folder(tmp_path):
    """R23-3: a copy moved or copied by hand into another class folder (a grader's own regrade) was deleted by the next
    sort because its bytes are the input's, although the sort's record shows it never wrote it."""
    import shutil

    from fundus_pipeline.cli.grade import sort_into

    src = tmp_path / "in"
    src.mkdir()
    (src / "x.png").write_bytes(b"photo x")
    out = tmp_path / "out"
    _sorted_results(out, [("x", src / "x.png", "usable")])
    sort_into(out)
    (out / "reject").mkdir()
    shutil.copyfile(out / "usable" / "x.png", out / "reject" / "x.png")  # the grader's own call
    sort_into(out)
    assert (out / "reject" / "x.png").read_bytes() == b"photo x" and (out / "usable" / "x.png").is_file()


# ------------------------------------------------------------------------------------------------ review 23 R23-5
def test_a_trailing_comma_and_an_empty_row_are_read_and_an_empty_key_is_refused(tmp_path, capsys):
    """R23-5: the strict reader refused a trailing comma (an empty cell more than the header, nothing lost) that had
    been read before, while a row with an empty key went through to odd messages."""
    from fundus_pipeline.cli import main as cli_main

    res, lab = tmp_path / "res.csv", tmp_path / "lab.csv"
    res.write_text("grade,key,p_good,p_usable,p_reject\ngood,a,0.8,0.1,0.1,\nreject,b,0.1,0.1,0.8\n,,,,\n")
    lab.write_text("key,quality\na,0,\nb,2\n,\n")
    assert cli_main(["evaluate", "grade", str(res), str(lab), "--bootstrap", "0", "--out", str(tmp_path / "o")]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["n_images"] == 2 and summary["n_problems"] == 0 and summary["n_labels_not_graded"] == 0
    lab.write_text('key,quality\na,0\n"",2\n')
    capsys.readouterr()
    assert cli_main(["evaluate", "grade", str(res), str(lab), "--bootstrap", "0", "--out", str(tmp_path / "o")]) == 2
    assert "has an empty key on line 3" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ review 23 R23-6
def test_an_8_bit_probability_map_saved_in_16_bits_is_an_error_row_not_f1_0(tmp_path):
    """R23-6: a 16-bit map of three or more levels within 0-255 read as probabilities under 0.004: F1 0, exit 0."""
    import csv

    import numpy as np

    from fundus_pipeline.cli import main as cli_main

    rng = np.random.default_rng(1)
    truth = rng.random((40, 48)) < 0.15
    (tmp_path / "g").mkdir()
    (tmp_path / "p").mkdir()
    Image.fromarray(truth.astype(np.uint8) * 255).save(tmp_path / "g" / "x.png")
    prob8 = np.clip(truth * 200 + rng.integers(0, 50, truth.shape), 0, 255).astype(np.uint16)  # many levels, all < 256
    Image.fromarray(prob8).save(tmp_path / "p" / "x.png")
    out = tmp_path / "o"
    assert cli_main(["evaluate", "segment", str(tmp_path / "p"), str(tmp_path / "g"), "--bootstrap", "0", "--out", str(out)]) == 3
    row = next(csv.DictReader(open(out / "metrics.csv")))
    assert "16-bit probability map whose values all stay below 256" in row["status"]


# ------------------------------------------------------------------------------------------------ review 23 R23-7
def test_a_refused_run_resume_names_a_step_or_its_weights_once(photos, tmp_path, tiny, capsys):  # noqa: F811
    """R23-7: steps no longer run were said as "enhance weights differs", and changed weights twice (the option and
    the sha256)."""
    import shutil

    import torch

    w = tmp_path / "hemf.pt"
    shutil.copyfile(tiny["hemf_tiny"], w)
    args = [a if a != tiny["hemf_tiny"] else str(w) for a in tiny_args(tiny)]
    out = tmp_path / "r"
    assert run("run", photos, out, *args) == 0
    capsys.readouterr()
    assert run("run", photos, out, *args, "--steps", "grade,segment", "--resume") == 2
    err = capsys.readouterr().err
    assert "steps: " in err and "weights" not in err.split("(", 1)[1], err
    sd = torch.load(w, weights_only=True)
    name = next(k for k, v in sd.items() if v.is_floating_point())
    sd[name] = sd[name] + 0.01
    torch.save(sd, w)  # other weights under the same name
    assert run("run", photos, out, *args, "--resume") == 2
    err = capsys.readouterr().err
    assert "(grade weights (sha256) differs)" in err or "grade weights (sha256): " in err, err
    assert err.count("weights") == err.count("grade weights (sha256)") + err.count("other weights"), err


# ------------------------------------------------------------------------------------------------ review 23 R23-8
def test_check_address_takes_ports_in_range_ipv6_zones_and_no_spaces():
    """R23-8: port 99999 passed (exit 1 later), an IPv6 address with a zone was refused, a leading space passed."""
    from fundus_pipeline.errors import UsageError
    from fundus_pipeline.ray_engine import check_address

    for ok in ("auto", "127.0.0.1:6379", "head-node.local:6379", "[::1]:6379", "[fe80::1%eth0]:6379", "ray://h:10001", "ray://[::1]:10001"):
        check_address(ok)
    for bad in ("h:99999", "h:0", " 127.0.0.1:6379", "127.0.0.1:6379 ", "garbage", "127.0.0.1", "http://h:1"):
        with pytest.raises(UsageError):
            check_address(bad)


# ------------------------------------------------------------------------------------------------ review 23 R23-9
def test_outputs_a_resume_left_in_place_stay_the_folders_own_for_overwrite(tmp_path, tiny):  # noqa: F811
    """R23-9: after a resume dropped a photograph of an input with sub-folders, its outputs (left in place, as the note
    says) were no longer listed anywhere, and `fundus run --overwrite` refused them as somebody else's files."""
    folder = tmp_path / "in"
    for rel in ("a/x.png", "a/y.png", "b/z.png"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(synthetic_fundus(72, 80, len(rel) + ord(rel[0]))).save(folder / rel)
    out = tmp_path / "r"
    args = tiny_args(tiny, "--steps", "grade,segment")
    assert run("run", folder, out, *args) == 0
    (folder / "b" / "z.png").unlink()
    assert run("run", folder, out, *args, "--resume") == 0
    assert (out / "segment" / "b" / "z_vessels.png").is_file()  # left in place
    assert run("run", folder, out, *args, "--overwrite") == 0
    assert not (out / "segment" / "b").exists()


# ------------------------------------------------------------------------------------------------ 26a C26a-1, -3, -9
def test_a_recipe_refuses_numbers_as_text_and_control_characters_and_sample_refuses_a_broken_fov():
    """C26a-1: "p": "0.5" and ["60", "70"] were read as numbers. C26a-9: a recipe name took NUL, newline, U+202E
    into every record. C26a-3: Degrader.sample took a NaN centre or radius 0 (ZeroDivisionError in apply) or a
    negative radius (a black image)."""
    from degradation.recipe import RecipeError, load_recipe, loads_recipe

    def recipe(step: str, name: str = "r") -> str:
        return json.dumps({"schema_version": 1, "name": name, "steps": [json.loads(step)]})

    for step in ('{"name": "j", "type": "jpeg", "p": "0.5"}', '{"name": "j", "type": "jpeg", "quality_range": ["60", "70"]}'):
        with pytest.raises(RecipeError, match="a number is needed, not text"):
            loads_recipe(recipe(step))
    for name in ("a\x00b", "a\nb", "a\u202eb"):
        with pytest.raises(RecipeError, match="control character"):
            loads_recipe(recipe('{"name": "j", "type": "jpeg"}', name))
    ok = json.loads(recipe('{"name": "j", "type": "jpeg"}'))
    ok["description"] = "two\nlines, a \u200c zero-width non-joiner"  # recipes of earlier runs may hold these (review 24)
    loads_recipe(json.dumps(ok))
    d = load_recipe("moderate")
    good = {"cx": 50.0, "cy": 50.0, "radius": 45.0, "height": 100, "width": 100}
    assert d.sample(0, "k", good)["fov"] == good
    for bad in ({"cx": float("nan")}, {"radius": 0.0}, {"radius": -5.0}, {"radius": 1e9}, {"width": 0}):
        with pytest.raises(ValueError, match="FOV"):
            d.sample(0, "k", {**good, **bad})


# ------------------------------------------------------------------------------------------------ 26a C26a-2
def test_a_degrade_replay_whose_record_does_not_reproduce_its_output_fails_the_item(tmp_path, capsys):
    """C26a-2: --replay never compared what it wrote with the recorded outputs_sha256: a hand-edited parameter record
    (JPEG quality 30 against a recorded 60) replayed to other bytes with exit 0."""
    folder = _photos(tmp_path / "in", 2)
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"schema_version": 1, "name": "r", "steps": [{"name": "j", "type": "jpeg", "quality_range": 60}]}))
    out = tmp_path / "d"
    assert run("degrade", folder, out, "--recipe", recipe, "--quiet") == 0
    assert run("degrade", folder, tmp_path / "same", "--replay", out, "--quiet") == 0  # an intact record replays
    m = json.loads((out / "manifest.json").read_text())
    item = next(r for r in m["items"] if r["key"] == "p1")
    step = item["params"]["default"]["steps"][0]
    key = next(k for k, v in step["params"].items() if v == 60)
    step["params"][key] = 30
    (out / "manifest.json").write_text(json.dumps(m))
    capsys.readouterr()
    assert run("degrade", folder, tmp_path / "again", "--replay", out, "--quiet") == 3
    rows = rows_of(tmp_path / "again" / "results.csv")
    assert rows["p0"]["status"] == "ok" and rows["p1"]["status"] == "error"
    assert "--replay: p1.png was written with other bytes than the replayed run's" in rows["p1"]["error"]


# ------------------------------------------------------------------------------------------------ 25b C25B-2
def test_a_seed_gives_the_same_degradation_bytes_in_separate_processes(tmp_path):
    """C25B-2: every same-seed check ran its two degrade runs in one process: a stream keyed by Python's salted hash()
    instead of blake2b passed them. Two processes with other PYTHONHASHSEEDs must write the same bytes."""
    import hashlib
    import os
    import subprocess
    import sys

    folder = _photos(tmp_path / "in", 2)
    digests = []
    for salt in ("1", "2"):
        out = tmp_path / f"o{salt}"
        r = subprocess.run([sys.executable, "-m", "fundus_pipeline", "degrade", str(folder), str(out), "--recipe", "severe", "--seed", "5", "--quiet"],
                           env={**os.environ, "PYTHONHASHSEED": salt}, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.png"))})
    assert len(digests[0]) == 2 and digests[0] == digests[1]


# ------------------------------------------------------------------------------------------------ 25b C25B-9
def test_a_shipped_file_with_one_tensor_changed_is_refused_by_its_sha256(tmp_path, monkeypatch):
    """C25B-9: the sha256 check was tested with a file of another architecture only (which the tensor shapes would
    refuse anyway); the same architecture with one value changed must be refused by its hash."""
    import shutil

    import torch

    from fundus_pipeline.errors import WeightsError
    from fundus_pipeline.models.weights import load_model, weights_dir

    w = tmp_path / "weights"
    w.mkdir()
    for name in ("manifest.json", "imff.pt"):
        shutil.copy(weights_dir() / name, w / name)
    monkeypatch.setenv("FUNDUS_WEIGHTS", str(w))
    assert load_model("imff")[1].spec.name == "imff"
    sd = torch.load(w / "imff.pt", weights_only=True)
    name = next(k for k, v in sd.items() if v.is_floating_point())
    sd[name] = sd[name].clone()
    sd[name].view(-1)[0] += 1e-3
    torch.save(sd, w / "imff.pt")
    with pytest.raises(WeightsError, match="does not match its sha256"):
        load_model("imff")
