"""``fundus grade --sort-into``: copies each graded input into OUT/<grade>/, removes a copy of the same input
that an earlier sort left in another grade's folder, and never removes a file the sort did not write; a
file where a grade folder should be is refused with exit 2 before anything is graded."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from fundus_pipeline.cli.grade import sort_into
from fundus_pipeline.cli import main as cli_main
from fundus_pipeline.errors import UsageError


def _results(out: Path, rows: list[tuple[str, Path, str]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "input", "status", "grade"])
        for key, src, grade in rows:
            w.writerow([key, str(src), "ok", grade])


def test_sort_keeps_files_it_did_not_write(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    a, b = src / "a.png", src / "b.png"
    a.write_bytes(b"photo a")
    b.write_bytes(b"photo b")
    out = tmp_path / "out"
    _results(out, [("a", a, "usable"), ("b", b, "good")])
    (out / "reject").mkdir()
    (out / "reject" / "a.png").write_bytes(b"the user's own file")  # same name, other bytes: not the sort's
    (out / "reject" / "b.png").write_bytes(b"photo b")  # a copy of b left by an earlier sort (regraded since)
    assert sort_into(out) == {"good": 1, "usable": 1, "reject": 0}
    assert (out / "usable" / "a.png").read_bytes() == b"photo a" and (out / "good" / "b.png").read_bytes() == b"photo b"
    assert (out / "reject" / "a.png").read_bytes() == b"the user's own file"
    assert not (out / "reject" / "b.png").exists()
    assert a.read_bytes() == b"photo a" and b.read_bytes() == b"photo b"


def test_sort_refuses_a_file_in_place_of_a_grade_folder(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(b"photo a")
    out = tmp_path / "out"
    _results(out, [("a", src / "a.png", "usable")])
    (out / "usable").write_bytes(b"not a folder")
    with pytest.raises(UsageError, match="not a folder"):
        sort_into(out)
    assert (out / "usable").read_bytes() == b"not a folder"
    # the command refuses before grading: exit 2, nothing written (the weights are never loaded)
    assert cli_main(["grade", str(src), str(out), "--sort-into", "--overwrite", "--quiet"]) == 2
    assert (out / "usable").read_bytes() == b"not a folder"
