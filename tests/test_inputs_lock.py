"""Input kinds (folder, single file, list of paths) and the output-folder lock."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from PIL import Image

from fundus_pipeline.cli import main
from fundus_pipeline.runner import LOCK
from tests.conftest import synthetic_fundus


def _photos(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    for i, name in enumerate(["a", "b", "sub/c"]):
        Image.fromarray(synthetic_fundus(64, 64, seed=i)).save(d / f"{name}.png")
    return d


def test_single_file_and_list_inputs(tmp_path):
    d = _photos(tmp_path)
    assert main(["degrade", str(d / "a.png"), str(tmp_path / "one"), "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "one").glob("*.png")) == ["a.png"]
    lst = tmp_path / "list.txt"
    lst.write_text("# two photos and a missing one\nin/b.png\n\nin/sub/c.png\nin/missing.png\n")
    assert main(["degrade", str(lst), str(tmp_path / "fromlist"), "--quiet"]) == 3  # the missing file fails as an item
    out = tmp_path / "fromlist"
    assert (out / "b.png").exists() and (out / "sub" / "c.png").exists()
    assert "missing" in (out / "results.csv").read_text()


def test_a_second_run_into_a_locked_output_is_refused(tmp_path, capsys):
    d = _photos(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["degrade", str(d), str(out), "--quiet"]) == 2
        assert "another fundus run" in capsys.readouterr().err
    finally:
        os.close(fd)
    assert main(["degrade", str(d), str(out), "--quiet"]) == 0


def test_a_byte_order_mark_and_crlf_in_a_list_are_no_part_of_a_path(tmp_path):
    _photos(tmp_path)
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"\xef\xbb\xbfin/a.png\r\nin/b.png\r\n")
    assert main(["degrade", str(lst), str(tmp_path / "out"), "--quiet"]) == 0  # was: '\ufeffin/a.png' not found, exit 3
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["a.png", "b.png"]


def test_an_entry_with_an_image_name_that_is_no_file_fails_as_an_item(tmp_path, capsys):
    d = _photos(tmp_path)
    (d / "dangling.png").symlink_to(tmp_path / "gone.png")
    (d / "loop1.png").symlink_to(d / "loop2.png")
    (d / "loop2.png").symlink_to(d / "loop1.png")
    os.mkfifo(d / "fifo.png")
    out = tmp_path / "out"
    assert main(["degrade", str(d), str(out), "--quiet"]) == 3  # was 0, the four skipped in silence
    text = (out / "results.csv").read_text()
    for key, why in (("dangling", "symbolic link to a missing file"), ("loop1", "loop"), ("loop2", "loop"), ("fifo", "not a regular file")):
        row = next(line for line in text.splitlines() if line.startswith(key + ","))
        assert ",error," in row and why in row, row
    assert (out / "a.png").exists() and (out / "sub" / "c.png").exists()


def test_a_folder_link_into_out_is_refused_before_outputs_are_read_back(tmp_path, capsys):
    d = _photos(tmp_path)
    out = tmp_path / "out"
    (d / "outlink").symlink_to(out, target_is_directory=True)  # dangling until OUT exists
    assert main(["degrade", str(d), str(out), "--quiet"]) == 0
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    capsys.readouterr()
    # the outputs are now reachable from IN through the link: resuming would degrade them again (was: exit 0,
    # keys outlink/a, outlink/b, ... and one level deeper at every resume)
    assert main(["degrade", str(d), str(out), "--quiet", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "lies inside the output folder" in err and "symbolic link" in err and len(err.strip().splitlines()) == 1
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


def test_resume_refuses_a_folder_whose_manifest_fundus_did_not_write(tmp_path, capsys):
    d = _photos(tmp_path)
    for text in ("{}", "not json", '{"stage": "degrade"}'):
        out = tmp_path / f"out{len(text)}"
        out.mkdir()
        (out / "manifest.json").write_text(text)
        (out / "results.csv").write_text("precious")
        (out / "a.png").write_text("precious")
        assert main(["degrade", str(d), str(out), "--quiet", "--resume"]) == 2  # was 0, all three replaced
        assert "no earlier fundus run" in capsys.readouterr().err
        assert (out / "manifest.json").read_text() == text
        assert (out / "results.csv").read_text() == (out / "a.png").read_text() == "precious"
        assert sorted(p.name for p in out.iterdir()) == ["a.png", "manifest.json", "results.csv"]


def test_parallelism_past_a_c_int_is_a_usage_error_before_out_is_made(tmp_path, capsys):
    d = _photos(tmp_path)
    for opt in ("--threads", "--workers"):
        out = tmp_path / opt.strip("-")
        assert main(["degrade", str(d), str(out), "--quiet", opt, "99999999999999999999"]) == 2  # was 1 (OverflowError)
        assert f"{opt} must be between 1 and" in capsys.readouterr().err
        assert not out.exists()  # was: a lock file and a 'running' manifest, refusing the corrected command


def test_an_empty_path_argument_is_refused(tmp_path, capsys, monkeypatch):
    d = _photos(tmp_path)
    monkeypatch.chdir(d)  # an empty OUT was the working folder: here the input folder itself
    for args in (["degrade", "", str(tmp_path / "o")], ["degrade", str(d), ""], ["run", "", str(tmp_path / "o")], ["run", str(d), ""]):
        assert main([*args, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "empty; give a folder or file name" in err and ("'IN'" in err or "'OUT'" in err), err
    assert not (tmp_path / "o").exists()
