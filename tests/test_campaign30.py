"""Session 2026-12-05 (third stop): known-left findings of earlier campaigns, campaigns 30a/30b and their mends.
Each test fails on the code before its mend."""

from __future__ import annotations

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
