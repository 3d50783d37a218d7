"""Campaign 23a (the dataset builders) and 23b (inputs that change under a run), and their reviews."""

from __future__ import annotations

import json

from tests.test_run import photos, run, tiny, tiny_args  # noqa: F401  (fixtures)


# ------------------------------------------------------------------------------------------------ 23b HIGH-1
def test_a_photograph_the_scorer_read_in_another_version_is_not_joined(photos, tmp_path, tiny, capsys):  # noqa: F811
    """HIGH-1: the scorer reads the photograph as its enhancement's reference, and that read was not compared:
    a photograph replaced between enhance and score got an ok row whose gain came from two versions (and with the
    enhancement trusted, segment read the enhanced image, so nothing else caught it)."""
    out = tmp_path / "r"
    assert run("run", photos, out, *tiny_args(tiny, "--min-gain", "-1", "--steps", "enhance,score,segment")) == 0  # every one enhanced
    journal = out / "score" / ".fundus-journal.jsonl"
    lines = journal.read_text().splitlines()
    first = json.loads(lines[0])
    lines[0] = lines[0].replace(first["inputs_sha256"]["reference"], "f" * 64)  # as if the file changed before score read it
    journal.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    code = run("report", out)
    page = (out / "report.html").read_text()
    assert code == 0
    assert f"score read {'f' * 12}); its results mix two versions" in page
    assert page.count("its results mix two versions") == 1


# ------------------------------------------------------------------------------------------------ 23b M1
def test_a_resume_says_when_a_list_files_keys_changed(tmp_path, capsys):
    """M1: one file added to a list in another folder renames every key (they are relative to the deepest
    folder holding every listed file); --resume redid everything without a word and left the old outputs."""
    import numpy as np
    from PIL import Image

    for rel in ("imgs/a/x.png", "imgs/a/y.png", "imgs/b/z.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(tmp_path / rel)
    listing, out = tmp_path / "l.txt", tmp_path / "o"
    listing.write_text("imgs/a/x.png\nimgs/a/y.png\n")
    assert run("degrade", listing, out, "--types", "111") == 0
    assert run("degrade", listing, out, "--types", "111", "--resume") == 0  # nothing renamed: no note
    assert "listed now under another key" not in capsys.readouterr().err
    listing.write_text("imgs/a/x.png\nimgs/a/y.png\nimgs/b/z.png\n")
    assert run("degrade", listing, out, "--types", "111", "--resume") == 0
    err = capsys.readouterr().err
    assert "note: 2 photograph(s) done before are listed now under another key (e.g. 'x' is now 'a/x')" in err
    assert (out / "x.png").is_file() and (out / "a" / "x.png").is_file()


# ------------------------------------------------------------------------------------------------ 23a M2
def test_out_anywhere_in_a_linked_dataset_folder_is_refused(fake_data, tmp_path):
    """M2: with DRIVE/ a link to a folder outside the data root, an OUT elsewhere in that DRIVE folder than
    beside the files read (DRIVE/out2, DRIVE/test/out for the train part) was built into the dataset."""
    from tests.test_campaign11 import _qbuild, linked_drive

    big, data = linked_drive(fake_data, tmp_path)
    for out in (big / "DRIVE" / "out2", big / "DRIVE" / "test" / "out"):
        assert _qbuild(data, out) == 2, out
        assert not out.exists()


# ------------------------------------------------------------------------------------------------ 23a M1
def test_overwrite_removes_the_images_of_a_source_a_kill_cut_short(fake_data, tmp_path, monkeypatch):
    """M1: the images a source had written before a kill were in no record, and `--overwrite` with other options
    kept them: a stray pair that no table lists sat in PART/enhanced and PART/reference and was scored with the set."""
    import csv

    from fundus_pipeline import io
    from tests.test_campaign11 import _qbuild

    out = tmp_path / "q"
    real, calls = io.write_image_atomic, []

    def killed(path, *a, **k):
        real(path, *a, **k)
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(io, "write_image_atomic", killed)
    assert _qbuild(fake_data, out, "--enhancers", "clahe,identity,blur") == 130
    monkeypatch.setattr(io, "write_image_atomic", real)
    assert any((out / "train").rglob("*clahe*.png"))  # the cut source's image
    assert _qbuild(fake_data, out, "--overwrite") == 0  # identity,blur
    with open(out / "pairs.csv", newline="") as f:
        keys = {r["key"] for r in csv.DictReader(f)}
    for sub in ("enhanced", "reference"):
        assert {p.stem for p in (out / "train" / sub).glob("*.png")} == keys, sub
    assert not list((out / "rows").glob("*/*.partial"))


# ------------------------------------------------------------------------------------------------ 23a L3
def test_an_out_that_cannot_be_written_is_one_line_not_an_internal_error(fake_data, tmp_path, capsys):
    """L3: a read-only OUT was "internal error: OSError ... report it" (a file where OUT's parent should be, here:
    the same OSError path for root, whom permissions do not stop)."""
    from tests.test_campaign11 import _qbuild

    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _qbuild(fake_data, blocker / "set") == 1
    err = capsys.readouterr().err
    assert "cannot write the quality set into" in err and "internal error" not in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------------------ review 22 M1
def test_a_clean_original_read_in_two_versions_under_simulate_is_not_joined(photos, tmp_path, tiny, capsys):  # noqa: F811
    """Review 22 M1: under --simulate the clean original is read by the simulator, by segment_clean and by the
    comparison, and those reads were not compared: one replaced meanwhile gave an ok row whose before/after
    figures compared two photographs."""
    out = tmp_path / "s"
    assert run("run", photos, out, *tiny_args(tiny, "--simulate", "111", "--steps", "segment")) == 0
    journal = out / "segment_clean" / ".fundus-journal.jsonl"
    lines = journal.read_text().splitlines()
    first = json.loads(lines[0])
    lines[0] = lines[0].replace(first["input_sha256"], "e" * 64)
    journal.write_text("\n".join(lines) + "\n")
    code = run("report", out)
    page = (out / "report.html").read_text()
    assert code == 0
    assert f"segment_clean read {'e' * 12}" in page and page.count("its before/after figures would mix two versions") == 1


# ------------------------------------------------------------------------------------------------ review 22 L1, L4, L5
def test_decisive_keeps_three_decimals_and_a_small_negative_reads_so():
    """L1: the zeros were stripped to "+0." / "1.", and a small negative gain against a non-zero min-gain read "-0.000"."""
    from fundus_pipeline.chain import decisive, format_gain

    assert decisive(1.0, 1.0001) == "1.000" and format_gain(-0.0003, 0.01) == "-0.0003" and format_gain(0.0096, 0.01) == "+0.0096"


def test_a_damaged_journal_of_a_cut_source_does_not_break_overwrite_or_reach_outside(fake_data, tmp_path):
    """L4: a .partial line naming a folder made every --overwrite an internal error, and a line through a symbolic
    link out of OUT removed a file elsewhere. L5: a .partial left beside its source's record stayed for good."""
    from tests.test_campaign11 import _qbuild

    out = tmp_path / "q"
    assert _qbuild(fake_data, out) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.png").write_bytes(b"precious")
    (out / "train" / "away").symlink_to(elsewhere)
    record = next((out / "rows" / "train").glob("*.json"))
    record.with_suffix(".partial").write_text("train/enhanced\n")  # beside its record: removed by a resume
    assert _qbuild(fake_data, out) == 0
    assert not list((out / "rows").glob("*/*.partial"))
    (out / "rows" / "train" / "gone-source.partial").write_text("train/enhanced\ntrain/away/keep.png\n\udcff\n", errors="surrogateescape")
    assert _qbuild(fake_data, out, "--overwrite") == 0
    assert (elsewhere / "keep.png").read_bytes() == b"precious" and not list((out / "rows").glob("*/*.partial"))


def test_the_renamed_keys_note_counts_a_key_that_another_file_took(tmp_path, capsys):
    """Review 22 L2: an old key that another file takes now was not counted as renamed."""
    import numpy as np
    from PIL import Image

    for rel in ("imgs/x.png", "imgs/sub/x.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.random.default_rng(len(rel)).random((40, 40, 3)) * 255).astype(np.uint8)).save(tmp_path / rel)
    listing, out = tmp_path / "l.txt", tmp_path / "o"
    listing.write_text("imgs/sub/x.png\n")  # key 'x'
    assert run("degrade", listing, out, "--types", "111") == 0
    listing.write_text("imgs/sub/x.png\nimgs/x.png\n")  # keys 'sub/x' and 'x' (another file now)
    assert run("degrade", listing, out, "--types", "111", "--resume") == 0
    assert "note: 1 photograph(s) done before are listed now under another key (e.g. 'x' is now 'sub/x')" in capsys.readouterr().err
