"""Campaign 19a (2026-12-04): a hostile or damaged output folder must not make fundus write, remove or show
anything outside the folders it was given. Each test fails on the code before its mend."""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image

from tests.conftest import synthetic_fundus
from tests.test_run import photos, run, tiny, tiny_args  # noqa: F401  (fixtures)


def _nested(tmp_path: Path) -> Path:
    src = tmp_path / "nin"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(synthetic_fundus(80, 88, 1)).save(src / "sub" / "p.png")
    Image.fromarray(synthetic_fundus(88, 96, 2)).save(src / "q.png")
    return src


def test_a_linked_sub_folder_of_out_is_never_written_through(tmp_path, capsys):
    """F1: a key's sub-folder of OUT replaced by a link before --resume/--overwrite: the run wrote its outputs
    into the link's target, over files of the same names outside OUT."""
    src = _nested(tmp_path)
    out = tmp_path / "out"
    assert run("degrade", src, out, "--threads", "1", "--quiet") == 0
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "p.png").write_bytes(b"canary")
    for flag in ("--overwrite", "--resume"):
        for p in (out / "sub").iterdir():
            p.unlink()
        (out / "sub").rmdir()
        os.symlink(victim, out / "sub")
        assert run("degrade", src, out, "--threads", "1", "--quiet", flag) == 3
        assert (victim / "p.png").read_bytes() == b"canary" and sorted(os.listdir(victim)) == ["p.png"]
        assert "is a symbolic link or lies through one" in capsys.readouterr().err
        os.unlink(out / "sub")
        (out / "sub").mkdir()


def test_run_refuses_a_linked_stage_folder_on_resume_and_overwrites_its_own_sub_folders(photos, tmp_path, tiny, capsys):  # noqa: F811
    """F1: `fundus run --resume` with OUT/segment linked to another run's folder rewrote that run's outputs and
    tables; F7: `fundus run --overwrite` refused any run of an input with sub-folders (its own outputs)."""
    src = _nested(tmp_path)
    out = tmp_path / "rn"
    args = tiny_args(tiny, "--steps", "segment", "--no-report")
    assert run("run", src, out, *args) == 0
    assert (out / "segment" / "sub" / "p_vessels.png").is_file()
    assert run("run", src, out, *args, "--overwrite") == 0  # F7: was exit 2 ("was not written by fundus run")
    (out / "segment" / "eval").mkdir()
    (out / "segment" / "eval" / "summary.json").write_text("{}")
    assert run("run", src, out, *args, "--overwrite") == 2 and "eval/summary.json is not an output that a row of segment lists" in capsys.readouterr().err
    (out / "segment" / "eval" / "summary.json").unlink()
    (out / "segment" / "eval").rmdir()
    other = tmp_path / "other"
    os.rename(out / "segment", other)
    before = {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()}
    os.symlink(other, out / "segment")
    assert run("run", src, out, *args, "--resume") == 2
    assert "is a symbolic link; fundus writes and removes nothing through a link" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()} == before


def test_sort_into_refuses_a_linked_class_folder_and_never_deletes_an_input(photos, tmp_path, tiny, capsys):  # noqa: F811
    """F2: OUT/usable linked to the input folder: the clean-up of stale copies deleted the input itself."""
    out = tmp_path / "g"
    out.mkdir()
    os.symlink(photos, out / "usable")
    before = sorted(os.listdir(photos))
    code = run("grade", photos, out, "--weights", tiny["hemf_tiny"], "--arch", "hemf_tiny", "--device", "cpu", "--quiet",
               "--sort-into", "--overwrite")
    assert code == 2 and "is a symbolic link: --sort-into writes its copies only into OUT's own folders" in capsys.readouterr().err
    assert sorted(os.listdir(photos)) == before


def test_the_report_shows_no_image_from_outside_the_run(photos, tmp_path, tiny, capsys):  # noqa: F811
    """F3: a manifest plan input without its recorded sha256, a link in OUT/enhance or a '../' vessels name put
    any image file readable by the user into the self-contained report.html."""
    out = tmp_path / "r"
    assert run("run", photos, out, *tiny_args(tiny, "--enhance-if", "good,usable,reject", "--min-gain", "-1")) == 0
    secret = tmp_path / "secret.png"
    Image.fromarray(synthetic_fundus(64, 64, 9)).save(secret)
    m = json.loads((out / "manifest.json").read_text())
    key = m["plan"][0]["key"]
    m["plan"][0]["input"] = str(secret)
    del m["inputs_sha256"][key]
    (out / "manifest.json").write_text(json.dumps(m))
    enhanced = sorted((out / "enhance").glob("*.png"))[0]
    enhanced.unlink()
    os.symlink(secret, enhanced)
    capsys.readouterr()
    assert run("report", out) == 0
    err = capsys.readouterr().err
    page = (out / "report.html").read_text()
    from fundus_pipeline.report import data_uri, thumb_array

    assert data_uri(thumb_array(secret, 64)) not in page
    assert "image(s) that the run's rows name are missing, unreadable or changed" in err


def _one_prediction(tmp_path: Path) -> tuple[Path, Path]:
    """PRED/a_prob.png and GT/a.png, random."""
    import numpy as np

    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(pred / "a_prob.png")
    Image.fromarray(((rng.random((32, 32)) > 0.5) * 255).astype(np.uint8)).save(gt / "a.png")
    return pred, gt


def test_a_manifest_threshold_out_of_range_is_refused_not_used(tmp_path, capsys):
    """F6: `evaluate segment` used a manifest's threshold -5 as it was, true as 1, and replaced "abc" by 0.5."""
    pred, gt = _one_prediction(tmp_path)
    for bad in (-5, True, "abc", 10**400):  # review 20 R8: a 400-digit integer was an OverflowError
        (pred / "manifest.json").write_text(json.dumps({"config": {"threshold": bad}}))
        assert run("evaluate", "segment", pred, gt, "--out", tmp_path / "e", "--bootstrap", "0", "--no-cldice") == 2
        assert "not a number in (0, 1); give --threshold" in capsys.readouterr().err


def test_sort_into_never_writes_through_a_link_inside_a_class_folder(photos, tmp_path, tiny, capsys):  # noqa: F811
    """Review 19 R2: only OUT/good|usable|reject themselves were checked; OUT/good/sub linked elsewhere had a
    file outside OUT (or an input of the same name) replaced by the copy."""
    src = _nested(tmp_path)
    out = tmp_path / "g"
    grade = ("--weights", tiny["hemf_tiny"], "--arch", "hemf_tiny", "--device", "cpu", "--quiet")
    assert run("grade", src, out, *grade) == 0
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "p.png").write_bytes(b"canary")
    for g in ("good", "usable", "reject"):
        (out / g).mkdir()
        os.symlink(victim, out / g / "sub")
    before = (out / "manifest.json").read_bytes()
    # review 20 R1: refused before grading (exit 2), not after it with exit 1
    assert run("grade", src, out, *grade, "--sort-into", "--overwrite") == 2
    assert "sub is a symbolic link: --sort-into writes its copies only into OUT's own folders" in capsys.readouterr().err
    assert (out / "manifest.json").read_bytes() == before
    assert (victim / "p.png").read_bytes() == b"canary"


def test_fundus_report_shows_no_input_of_an_ended_run_without_its_recorded_sha256(photos, tmp_path, tiny, capsys):  # noqa: F811
    """Review 19 R1: deleting the whole inputs_sha256 field (or setting it to {}) let an edited plan input show."""
    out = tmp_path / "r"
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade")) == 0
    secret = tmp_path / "secret.png"
    Image.fromarray(synthetic_fundus(64, 64, 9)).save(secret)
    from fundus_pipeline.report import data_uri, thumb_array

    for field in ("drop", {}):
        m = json.loads((out / "manifest.json").read_text())
        m["plan"][0]["input"] = str(secret)
        if field == "drop":
            m.pop("inputs_sha256", None)
        else:
            m["inputs_sha256"] = field
        (out / "manifest.json").write_text(json.dumps(m))
        capsys.readouterr()
        assert run("report", out) == 0
        assert data_uri(thumb_array(secret, 64)) not in (out / "report.html").read_text()
        assert "no sha256 recorded by the run" in capsys.readouterr().err


def test_the_report_page_carries_no_control_characters():
    """19a F8: a NUL in a hand-edited row's text reached report.html (an HTML parse error); tab and newline stay,
    and markup the template marks safe is untouched."""
    from fundus_pipeline.report import _environment

    t = _environment().from_string("<p>{{ v }}</p>{{ m|safe }}")
    out = t.render(v="a\x00b\x1b[31m<i>\tc\nd", m="<b>\x07</b>")
    assert out == "<p>a\ufffdb\ufffd[31m&lt;i&gt;\tc\nd</p><b>\x07</b>"


def test_an_unreadable_manifest_is_refused_not_replaced_by_half(tmp_path, capsys):
    """Known left of review 20: a manifest that cannot be read (a 5000-digit threshold is beyond json's integer
    limit; a cut or broken file) was passed over, and the predictions were scored at 0.5 in silence."""
    pred, gt = _one_prediction(tmp_path)
    args = ("evaluate", "segment", pred, gt, "--out", tmp_path / "e", "--bootstrap", "0", "--no-cldice")
    for text in ('{"config": {"threshold": ' + "1" * 5000 + "}}", '{"config": {"threshold": 0.3', ""):
        (pred / "manifest.json").write_text(text)
        assert run(*args) == 2
        err = capsys.readouterr().err
        assert "manifest.json cannot be read (" in err and "give --threshold" in err and len(err.splitlines()) == 1
    # another tool's manifest (not an object with a config table) records no threshold: 0.5, as before
    (pred / "manifest.json").write_text("[1, 2]")
    assert run(*args, "--format", "json") == 0
    assert json.loads(capsys.readouterr().out)["threshold_source"] == "default"
