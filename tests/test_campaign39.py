"""Session of 2026-12-05 (evening): campaign 39b (a run folder of an older version used by this one) and the
known-left items of earlier reviews mended on the way."""

from __future__ import annotations

from pathlib import Path

from fundus_pipeline.stages.base import Stage
from tests.test_run import photos, tiny  # noqa: F401  (fixtures)

REV = Stage.results_revision  # every stage's (none overrides it)


def _degraded(root: Path, n: int) -> tuple[Path, Path, list[str]]:
    """(ROOT/in of n BMP photographs p0.bmp ..., ROOT/out, the argv) of a finished `fundus degrade` run of one worker."""
    from fundus_pipeline.cli import main
    from tests.test_campaign36 import _bmp

    root.mkdir(exist_ok=True)
    src, out = root / "in", root / "out"
    src.mkdir()
    for k in range(n):
        _bmp(src / f"p{k}.bmp", k)
    args = ["degrade", str(src), str(out), "--types", "111", "--workers", "1"]
    assert main([*args, "--quiet"]) == 0
    return src, out, args


def _refused_resume(tmp_path: Path, photos: Path, tiny, edit, capsys) -> str:  # noqa: F811
    """The refusal (exit 2) of a `--resume` of a finished grade run whose manifest ``edit`` changed (its run_sha256
    made another, as a record of other options or another version has)."""
    import json

    from tests.test_run import run, tiny_args

    out = tmp_path / "out"
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade")) == 0
    m = json.loads((out / "manifest.json").read_text())
    edit(m)
    m["run_sha256"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(m, indent=2))
    capsys.readouterr()
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade"), "--resume") == 2
    return capsys.readouterr().err


def test_an_input_unreadable_now_does_not_say_its_earlier_outputs_came_from_other_bytes(tmp_path, monkeypatch):
    """Known left of review 38: a photograph done before whose file's status changed and that cannot be read now is
    processed again and fails; its error said the earlier outputs that stay were "from other bytes", which nobody
    knows (a chmod changes the status, not the bytes). A photograph replaced since still says "other bytes"."""
    from fundus_pipeline import runner
    from fundus_pipeline.cli import main
    from fundus_pipeline.models import weights
    from tests.test_campaign36 import _bmp, _rows

    src, out, args = _degraded(tmp_path, 2)
    (src / "p0.bmp").chmod(0o600)  # its status changes, its bytes stay
    _bmp(src / "p1.bmp", 7)  # replaced by another photograph

    def denied(path, *a, **kw):
        raise PermissionError(13, "Permission denied", str(path))

    real_sha, real_read = weights.sha256_file, runner.read_image
    monkeypatch.setattr(weights, "sha256_file", lambda p, *a, **kw: denied(p) if Path(p).name == "p0.bmp" else real_sha(p, *a, **kw))
    monkeypatch.setattr(runner, "read_image", lambda p, *a, **kw: denied(p) if Path(p).name in ("p0.bmp", "p1.bmp") else real_read(p, *a, **kw))
    runner._DIGESTS_READ.clear()
    assert main([*args, "--resume"]) == 3
    rows = _rows(out)
    assert rows["p0"]["status"] == rows["p1"]["status"] == "error"
    assert rows["p0"]["error"].endswith("(outputs of an earlier run stay: p0.png)"), rows["p0"]["error"]
    assert rows["p1"]["error"].endswith("(outputs of an earlier run from other bytes stay: p1.png)"), rows["p1"]["error"]


def test_a_resume_processes_again_the_rows_another_version_made(tmp_path, capsys):
    """39b F1 (HIGH): a resume after an upgrade kept, exit 0 and without a word, the rows the earlier code had made
    (without the small-photograph, grey and no-FOV warnings of today's grade, with another FOV rule): the resume
    compared the options only. Each row records the stage's results revision; rows of another (or of a version
    before the record) are processed again and said, and the new rows are kept by the next resume."""
    import json

    from fundus_pipeline.cli import main
    from fundus_pipeline.runner import JOURNAL

    src, out, args = _degraded(tmp_path, 3)
    journal = out / JOURNAL
    lines = journal.read_text().splitlines()
    assert all(line.endswith(f', "results_revision": {REV}}}') for line in lines)
    assert json.loads((out / "manifest.json").read_text())["results_revision"] == REV
    assert "results_revision" not in (out / "results.csv").read_text()  # the journal's tag, not a column
    before = {p.name: p.read_bytes() for p in out.glob("*.png")}
    # as an earlier version wrote it: no revision in p0's and p1's lines, revision 0 (another) in p2's
    edited = [line.replace(f', "results_revision": {REV}}}', "}") for line in lines[:2]] + [lines[2].replace(f'"results_revision": {REV}}}', '"results_revision": 0}')]
    journal.write_text("\n".join(edited) + "\n")
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0
    said = capsys.readouterr()
    err = said.err
    assert ("note: 3 photograph(s) done before were made by another version of fundus (results revision 0, or before they were "
            f"recorded; this one computes revision {REV}), whose results can differ, and are processed again (e.g. 'p0')") in err, err
    assert "3 ok, 0 failed ->" in said.out and "already done" not in said.out + err
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == before and len(before) == 3  # made again: the same bytes here
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0
    assert "3 ok, 0 failed (3 already done, resumed)" in capsys.readouterr().out


def test_a_row_of_an_older_version_with_a_relative_input_is_said_to_be_of_that_version(tmp_path, capsys):
    """39b F3: versions before 2026-12-02 recorded the input as typed (relative); their rows were processed again with
    the note "listed now as another file under the same key", which they are not."""
    import json
    import os

    from fundus_pipeline.cli import main
    from fundus_pipeline.runner import JOURNAL

    src, out, args = _degraded(tmp_path, 1)
    row = json.loads((out / JOURNAL).read_text())
    row.pop("results_revision", None)
    row["input"] = os.path.relpath(row["input"])  # as typed, in the working folder
    (out / JOURNAL).write_text(json.dumps(row) + "\n")
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert "1 photograph(s) done before were made by another version of fundus" in err and "another file" not in err, err


def test_a_run_whose_record_differs_where_no_option_does_is_refused_as_another_versions(tmp_path, photos, tiny, capsys):  # noqa: F811
    """39b F2: a run folder of a version before 2026-12-02 (whose record of the run lacked a key added since) was
    refused as "another configuration or other weights; rerun with the same options", naming no option: the user
    had used the same ones."""
    import json

    from tests.test_run import run, tiny_args

    out = tmp_path / "out"
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade")) == 0
    m = json.loads((out / "manifest.json").read_text())
    m["run_sha256"] = "0" * 64  # as the hash of a record without a key added since
    (out / "manifest.json").write_text(json.dumps(m, indent=2))
    capsys.readouterr()
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade"), "--resume") == 2
    err = capsys.readouterr().err
    assert "was written by another version of fundus, whose record of the run differs where no option does" in err, err
    assert "rerun with the same options" not in err


def test_a_replay_whose_rows_and_images_are_the_same_and_page_not_is_not_a_difference(tmp_path, photos, tiny, capsys):  # noqa: F811
    """39b F5: a replay of a run one day old exited 3, "the results differ from the recorded run", when every row and
    image was the same and only report.html, drawn by the newer page code, was not. Said, exit 0; with a row that
    differs too the page is counted among the files that differ, as before."""
    import json

    from tests.test_run import run, tiny_args

    x = tmp_path / "x"
    assert run("run", photos, x, *tiny_args(tiny, "--steps", "grade")) == 0
    page = x / "report.html"
    page.write_text(page.read_text().replace("<title>", "<title>old page code: "))  # as an earlier version drew it
    capsys.readouterr()
    assert run("run", "--replay", x, tmp_path / "r1") == 0
    err = capsys.readouterr().err
    assert "--replay: identical results (3 rows and" in err and "but report.html differs" in err, err
    m = json.loads((x / "manifest.json").read_text())
    m["items"][0]["grade"] = "x" + m["items"][0]["grade"]  # a recorded row that differs too
    (x / "manifest.json").write_text(json.dumps(m, indent=2))
    capsys.readouterr()
    assert run("run", "--replay", x, tmp_path / "r2") == 3
    err = capsys.readouterr().err
    assert "--replay: the results differ from the recorded run: 1 of 3 rows" in err, err
    assert "1 of " in err.split("rows", 1)[1] and "files (first: report.html)" in err and "but report.html differs" not in err, err


def test_manifests_say_which_code_wrote_them(tmp_path, photos, tiny):  # noqa: F811
    """39b F9: nothing in a folder said which fundus wrote it (tool.version 0.1.0 in every version): the stage and run
    manifests record the git commit (and whether the checkout had changes) where fundus runs from a checkout, as a
    set's and a training run's did, and each stage its results revision."""
    import json
    import re
    import subprocess

    from tests.test_run import run, tiny_args

    x = tmp_path / "x"
    assert run("run", photos, x, *tiny_args(tiny, "--steps", "grade")) == 0
    root = Path(__file__).resolve().parents[1]
    for m in (json.loads((x / "manifest.json").read_text()), json.loads((x / "grade" / "manifest.json").read_text())):
        tool = m["tool"]
        assert tool["name"] == "fundus-pipeline" and tool["version"]
        if (root / ".git").exists():
            head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
            assert re.fullmatch(r"[0-9a-f]{40,64}", tool["git_commit"]) and tool["git_commit"] == head and isinstance(tool["dirty"], bool)
    assert json.loads((x / "grade" / "manifest.json").read_text())["results_revision"] == REV


def test_review40_a_precision_left_out_is_named_not_taken_for_another_version(tmp_path, photos, tiny, capsys):  # noqa: F811
    """Review 40 M-1: a run made with --precision bf16 and resumed without it was refused as "written by another
    version of fundus" (the options compared left out precision and compile, as the record does at their defaults)."""
    from tests.test_run import run, tiny_args

    out = tmp_path / "out"
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade", "--precision", "bf16")) == 0
    capsys.readouterr()
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade"), "--resume") == 2
    err = capsys.readouterr().err
    assert 'precision: "bf16" there, "fp32" now' in err and "another version" not in err, err


def test_review40_an_upgrades_first_resume_reads_no_input_for_a_note_and_keeps_earlier_outputs_owned(tmp_path, capsys, monkeypatch):
    """Review 40 M-3: a first resume after an upgrade that was interrupted left every earlier output unlisted (the
    journal is rewritten with the kept rows only), so that the folder's own files read as somebody else's. Review 41
    F1: the rows of another revision are computed again without reading their inputs first for a note (every input
    of a 2026-12-01..05 folder had been read in full before the first item); one replaced since is among them."""
    import json

    from fundus_pipeline.cli import main
    from fundus_pipeline.runner import JOURNAL, left_outputs
    from tests.test_campaign36 import _bmp

    src, out, args = _degraded(tmp_path, 2)
    journal = out / JOURNAL
    journal.write_text(journal.read_text().replace(f', "results_revision": {REV}}}', "}"))  # as an earlier version wrote it
    _bmp(src / "p1.bmp", 7)  # replaced since
    from fundus_pipeline import runner
    from fundus_pipeline.models import weights

    reads: list = []
    real = weights.sha256_file
    monkeypatch.setattr(weights, "sha256_file", lambda p, *a, **kw: reads.append(Path(p).name) or real(p, *a, **kw))
    runner._DIGESTS_READ.clear()
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert "2 photograph(s) done before were made by another version of fundus" in err and "(e.g. 'p0')" in err, err
    assert not [n for n in reads if n.endswith(".bmp")], reads  # no input read before its item
    # M-3: while they are processed again, their earlier outputs are the folder's own (an interruption keeps them so)
    assert {k: sorted(v) for k, v in left_outputs(out).items()} == {"p0": ["p0.png"], "p1": ["p1.png"]}
    assert json.loads((out / "manifest.json").read_text())["counts"]["ok"] == 2


def test_review40_fundus_report_reads_a_manifest_with_sorted_keys_and_refuses_a_plan_entry_not_an_object(tmp_path, photos, tiny, capsys):  # noqa: F811
    """Review 40 LOW: reading the run manifest's head only, fundus report refused one whose keys a tool had sorted
    ("items" before "stage": not a run's manifest) and passed over a plan entry that is not an object."""
    import json

    from tests.test_run import run, tiny_args

    out = tmp_path / "out"
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade")) == 0
    before = (out / "report.html").read_bytes()
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True))
    assert run("report", out) == 0 and (out / "report.html").read_bytes() == before
    m["plan"].append(7)
    (out / "manifest.json").write_text(json.dumps(m, indent=2))
    capsys.readouterr()
    assert run("report", out) == 2
    assert "invalid run manifest (plan:" in capsys.readouterr().err


def test_review41_a_run_recorded_before_precision_existed_is_another_versions_and_odd_outputs_do_not_crash(tmp_path, photos, tiny, capsys):  # noqa: F811
    """Review 41 F3: a run of a version before 2026-12-01 (its recorded configuration without precision and compile)
    was refused as "precision: null there, "fp32" now; rerun with the same options", an option nobody can repeat: a
    key the record lacks is its default there. F4: a hand-edited row whose outputs held a number ended a resume that
    processed it again in an internal error (exit 1)."""
    import json

    from fundus_pipeline.cli import main
    from fundus_pipeline.runner import JOURNAL

    def older(m: dict) -> None:
        del m["config"]["precision"], m["config"]["compile"]

    err = _refused_resume(tmp_path, photos, tiny, older, capsys)
    assert "written by another version of fundus" in err and "precision" not in err, err

    _, deg, args = _degraded(tmp_path / "d", 1)
    row = json.loads((deg / JOURNAL).read_text())
    row["outputs"] = [7, None, "p0.png"]
    row.pop("results_revision")
    (deg / JOURNAL).write_text(json.dumps(row) + "\n")
    assert main(args + ["--resume"]) == 0


def test_review41_an_upgraded_run_folder_is_resumed_without_reading_or_refusing_its_inputs_first(tmp_path, photos, tiny, capsys):  # noqa: F811
    """Review 41 F1 (fundus run): the chain's check of the first stage's inputs read in full every input an older
    version recorded by size and time, and refused the resume for a photograph replaced since, although every row of
    another revision is computed again (nothing would mix)."""
    import json

    from tests.test_run import run, tiny_args

    out = tmp_path / "out"
    args = tiny_args(tiny, "--steps", "grade,segment")
    assert run("run", photos, out, *args) == 0
    for step in ("grade", "segment"):  # as a version of 2026-12-04 wrote them: no revision, a stat of size and time
        journal = out / step / ".fundus-journal.jsonl"
        rows = [json.loads(line) for line in journal.read_text().splitlines()]
        for r in rows:
            r.pop("results_revision")
            r["input_stat"] = r["input_stat"][:2]
        journal.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from PIL import Image

    from tests.conftest import synthetic_fundus

    Image.fromarray(synthetic_fundus(96, 112, 9)).save(photos / "p0.png")  # replaced since by another photograph
    capsys.readouterr()
    assert run("run", photos, out, *args, "--resume") == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["ok"] == 3 and all(n.startswith("3 photograph(s) done before were made by another version")
                                          for n in m["stages"]["grade"]["resume_notes"]), m["stages"]["grade"]


def test_review42_a_record_lacking_a_key_added_since_is_another_versions_whatever_else_differs(tmp_path, photos, tiny, capsys):  # noqa: F811
    """Review 42 F1: a run of a version before 2026-12-02 13:44 made with its default weights was refused naming the
    weights ("rerun with the same options"), and refused again as another version's once they were given."""


    def older(m: dict) -> None:
        del m["config"]["correction_sigma"]  # a key added on 2026-12-02
        m["config"]["grade_weights"] = "hemf"  # that version's default

    err = _refused_resume(tmp_path, photos, tiny, older, capsys)
    assert "written by another version of fundus" in err and "grade_weights" not in err, err


def test_review42_the_newest_row_of_a_key_decides_whether_its_input_is_checked_first(tmp_path, photos, tiny):  # noqa: F811
    """Review 42 F2: a row of this revision followed by a newer one of another (a downgrade's, a hand edit) had its
    replaced input refuse the whole resume, although the key is computed again anyway."""
    import json

    from PIL import Image

    from tests.conftest import synthetic_fundus
    from tests.test_run import run, tiny_args

    out = tmp_path / "out"
    args = tiny_args(tiny, "--steps", "grade")
    assert run("run", photos, out, *args) == 0
    journal = out / "grade" / ".fundus-journal.jsonl"
    lines = journal.read_text().splitlines()
    newer = json.loads(lines[0])
    newer["results_revision"] = 0  # a newer row of the same key, made by other code
    journal.write_text("\n".join(lines + [json.dumps(newer)]) + "\n")
    Image.fromarray(synthetic_fundus(96, 112, 9)).save(photos / f"{newer['key']}.png")  # replaced since
    assert run("run", photos, out, *args, "--resume") == 0
